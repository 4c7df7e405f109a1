//! Dependencies point one way: `main`/`cli` -> `roles` (the dispatch) -> each role -> what roles
//! share (`roles::common`) -> the shared modules (`server`, `auth`, `backends`, `config`,
//! `telemetry`, `error`, `policy`, `ratelimit`, ...), never back; no role imports another, and
//! the modules import each other without a cycle. `docs/development.md` says where new code goes.
//!
//! The check reads the sources: every `crate::` path (`use` groups included) and every `super::`
//! path, resolved to the module it names, outside comments. A planted back-edge makes it fail
//! (the last tests).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Where a module stands. Lower layers never import higher ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Layer {
    /// Modules every role may use; they know no role.
    Shared,
    /// `roles::common`: the contract every role implements (start-up error, dependencies).
    Common,
    /// One role (`roles::gateway`, ...): may use `Common` and `Shared`, never another role.
    Role,
    /// `roles` itself: dispatch from a role name to its module.
    Dispatch,
    /// `main`, `lib` and `cli`.
    Top,
}

/// The component a module path belongs to: a role with everything below it is one component;
/// a shared module likewise.
fn component(path: &[String], roles: &BTreeSet<String>) -> String {
    match path {
        [] => "lib".into(),
        [first, role, ..] if first == "roles" && roles.contains(role) => format!("roles::{role}"),
        [first, ..] => first.clone(),
    }
}

fn layer(component: &str) -> Layer {
    match component {
        "lib" | "main" | "cli" => Layer::Top,
        "roles" => Layer::Dispatch,
        "roles::common" => Layer::Common,
        c if c.starts_with("roles::") => Layer::Role,
        _ => Layer::Shared,
    }
}

/// The module path of a source file under `src/` (`roles/gateway/mod.rs` is `roles::gateway`).
fn module_of(file: &str) -> Vec<String> {
    let stem = file.trim_end_matches(".rs");
    let mut parts: Vec<String> = stem.split('/').map(String::from).collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    if parts == ["lib"] {
        parts.clear();
    }
    parts
}

/// The text without comments (line comments, doc comments and block comments).
fn strip_comments(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let bytes = text.as_bytes();
    let (mut i, mut in_str) = (0, false);
    while i < bytes.len() {
        let c = bytes[i];
        if in_str {
            if c == b'\\' {
                i += 2;
                continue;
            }
            if c == b'"' {
                in_str = false;
            }
            out.push(c as char);
            i += 1;
        } else if text[i..].starts_with("'\"'") || text[i..].starts_with("'\\\"'") {
            // A char literal of a double quote is not the start of a string.
            let len = if bytes[i + 1] == b'\\' { 4 } else { 3 };
            out.push_str(&text[i..i + len]);
            i += len;
        } else if let Some(hashes) = raw_string_start(&text[i..]) {
            // A raw string ends at its quote and as many hashes; quotes inside do not count.
            let open = 2 + hashes;
            let close = format!("\"{}", "#".repeat(hashes));
            let end =
                text[i + open..].find(&close).map_or(bytes.len(), |e| i + open + e + close.len());
            out.push_str(&text[i..end]);
            i = end;
        } else if c == b'"' {
            in_str = true;
            out.push('"');
            i += 1;
        } else if text[i..].starts_with("//") {
            while i < bytes.len() && bytes[i] != b'\n' {
                i += 1;
            }
        } else if text[i..].starts_with("/*") {
            i = text[i..].find("*/").map_or(bytes.len(), |end| i + end + 2);
        } else {
            let ch = text[i..].chars().next().unwrap_or(' ');
            out.push(ch);
            i += ch.len_utf8();
        }
    }
    out
}

/// The number of hashes of a raw string starting at `text` (`r"`, `r#"`, `br##"`), if one does.
fn raw_string_start(text: &str) -> Option<usize> {
    let rest = text.strip_prefix('b').unwrap_or(text).strip_prefix('r')?;
    let hashes = rest.chars().take_while(|c| *c == '#').count();
    rest[hashes..].starts_with('"').then_some(hashes)
}

/// The inline modules of `text` (`mod tests { ... }`): (start, end, name), by brace matching.
fn inline_modules(text: &str) -> Vec<(usize, usize, String)> {
    let mut found = Vec::new();
    let mut from = 0;
    while let Some(at) = text[from..].find("mod ") {
        let at = from + at;
        from = at + 4;
        if text[..at].chars().last().is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let rest = &text[at + 4..];
        let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
        let after = rest[name.len()..].trim_start();
        if name.is_empty() || !after.starts_with('{') {
            continue;
        }
        let open = text.len() - after.len();
        let mut depth = 0;
        let mut end = text.len();
        for (i, c) in text[open..].char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = open + i;
                        break;
                    }
                }
                _ => {}
            }
        }
        found.push((open, end, name));
    }
    found
}

/// The paths of a use group's top-level items (`{a, b::c, d::{e, f}}` gives `a`, `b::c`, `d`).
fn group_items(group: &str) -> Vec<String> {
    let (mut depth, mut item, mut items) = (0, String::new(), Vec::new());
    for c in group.chars() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => break,
            '}' => depth -= 1,
            ',' if depth == 0 => items.push(std::mem::take(&mut item)),
            _ if depth == 0 => item.push(c),
            _ => {}
        }
    }
    items.push(item);
    items
}

fn is_ident(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_alphanumeric() || c == '_')
}

/// The leading path of `text` (`a::b::c` of `a::b::c::{...}` or `a::b::c(x)`).
fn leading_path(text: &str) -> Vec<String> {
    text.split("::")
        .map(|s| {
            s.trim().chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect::<String>()
        })
        .take_while(|s| is_ident(s))
        .collect()
}

/// Every module path `text` (a file of module `module`) refers to: `crate::a::b`,
/// `crate::{a, b::c}`, `super::x`, `super::{x, y}`, with `super` resolved from the inline module
/// it is written in.
fn references(module: &[String], text: &str) -> Vec<Vec<String>> {
    let text = strip_comments(text);
    let inline = inline_modules(&text);
    let mut found = Vec::new();
    for (at, _) in text.match_indices("crate::").chain(text.match_indices("super::")) {
        if text[..at]
            .chars()
            .last()
            .is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':' || c == '$')
        {
            continue;
        }
        let mut tail = &text[at..];
        let base: Vec<String> = if let Some(t) = tail.strip_prefix("crate::") {
            tail = t;
            Vec::new()
        } else {
            // The module this `super` is written in: the file's, plus the inline modules around.
            let mut here = module.to_vec();
            let mut around: Vec<&(usize, usize, String)> =
                inline.iter().filter(|(s, e, _)| *s < at && at < *e).collect();
            around.sort();
            here.extend(around.into_iter().map(|(_, _, n)| n.clone()));
            let mut ups = 0;
            while let Some(t) = tail.strip_prefix("super::") {
                ups += 1;
                tail = t;
            }
            here.truncate(here.len().saturating_sub(ups));
            here
        };
        let paths: Vec<Vec<String>> = match tail.strip_prefix('{') {
            Some(group) => group_items(group).iter().map(|i| leading_path(i)).collect(),
            None => vec![leading_path(tail)],
        };
        for path in paths {
            // `self` in a group names the base itself.
            let path: Vec<String> = path.into_iter().filter(|p| p != "self").collect();
            if path.is_empty() && base.is_empty() {
                continue;
            }
            let mut full = base.clone();
            full.extend(path);
            found.push(full);
        }
    }
    found
}

/// The problems of a set of sources ((path under `src/`, text)): back-edges, role-to-role
/// imports, and cycles between components.
fn problems(files: &[(String, String)]) -> Vec<String> {
    // The roles are the directories below `roles/` (`roles/gateway/...`), and `roles/common.rs`
    // is their contract; any other file there (`roles/config_tests.rs`) belongs to `roles`
    // itself, and anything else named `roles::x` is an item of `roles`.
    let mut roles: BTreeSet<String> = files
        .iter()
        .filter_map(|(f, _)| f.strip_prefix("roles/"))
        .filter_map(|rest| rest.split_once('/'))
        .map(|(dir, _)| dir.to_string())
        .collect();
    roles.insert("common".into());
    let mut edges: BTreeMap<String, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for (file, text) in files {
        let module = module_of(file);
        let from = component(&module, &roles);
        for target in references(&module, text) {
            let to = component(&target, &roles);
            if to != from {
                edges.entry(from.clone()).or_default().entry(to).or_default().insert(file.clone());
            }
        }
    }
    let mut problems = Vec::new();
    for (from, tos) in &edges {
        for (to, files) in tos {
            let (lf, lt) = (layer(from), layer(to));
            let files = files.iter().cloned().collect::<Vec<_>>().join(", ");
            if lt > lf {
                problems.push(format!(
                    "{from} ({lf:?}) imports {to} ({lt:?}), a higher layer: {files}"
                ));
            } else if lf == Layer::Role && lt == Layer::Role {
                problems.push(format!("role {from} imports role {to}: {files}"));
            }
        }
    }
    // Cycles between components (Tarjan's strongly connected components).
    let nodes: Vec<&String> = edges.keys().collect();
    let index_of: BTreeMap<&String, usize> =
        nodes.iter().enumerate().map(|(i, n)| (*n, i)).collect();
    let succ: Vec<Vec<usize>> = nodes
        .iter()
        .map(|n| edges[*n].keys().filter_map(|t| index_of.get(t).copied()).collect())
        .collect();
    struct Tarjan<'a> {
        succ: &'a [Vec<usize>],
        index: Vec<Option<usize>>,
        low: Vec<usize>,
        on_stack: Vec<bool>,
        stack: Vec<usize>,
        next: usize,
        sccs: Vec<Vec<usize>>,
    }
    impl Tarjan<'_> {
        fn visit(&mut self, v: usize) {
            self.index[v] = Some(self.next);
            self.low[v] = self.next;
            self.next += 1;
            self.stack.push(v);
            self.on_stack[v] = true;
            for &w in &self.succ[v] {
                match self.index[w] {
                    None => {
                        self.visit(w);
                        self.low[v] = self.low[v].min(self.low[w]);
                    }
                    Some(iw) if self.on_stack[w] => self.low[v] = self.low[v].min(iw),
                    _ => {}
                }
            }
            if Some(self.low[v]) == self.index[v] {
                let mut scc = Vec::new();
                while let Some(w) = self.stack.pop() {
                    self.on_stack[w] = false;
                    scc.push(w);
                    if w == v {
                        break;
                    }
                }
                if scc.len() > 1 {
                    self.sccs.push(scc);
                }
            }
        }
    }
    let n = nodes.len();
    let mut t = Tarjan {
        succ: &succ,
        index: vec![None; n],
        low: vec![0; n],
        on_stack: vec![false; n],
        stack: Vec::new(),
        next: 0,
        sccs: Vec::new(),
    };
    for v in 0..n {
        if t.index[v].is_none() {
            t.visit(v);
        }
    }
    for scc in t.sccs {
        let members: BTreeSet<&String> = scc.iter().map(|&i| nodes[i]).collect();
        let detail: Vec<String> = members
            .iter()
            .flat_map(|from| {
                edges[*from].iter().filter(|(to, _)| members.contains(to)).map(
                    move |(to, files)| {
                        format!(
                            "{from} -> {to} ({})",
                            files.iter().cloned().collect::<Vec<_>>().join(", ")
                        )
                    },
                )
            })
            .collect();
        problems.push(format!("import cycle: {}", detail.join("; ")));
    }
    problems
}

fn sources() -> Vec<(String, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    let mut dirs = vec![root.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let name = path.strip_prefix(&root).unwrap().to_string_lossy().replace('\\', "/");
                files.push((name, std::fs::read_to_string(&path).unwrap()));
            }
        }
    }
    files.sort();
    files
}

#[test]
fn dependencies_point_one_way_without_cycles() {
    let files = sources();
    assert!(files.len() > 50, "read the sources: {}", files.len());
    let problems = problems(&files);
    assert!(problems.is_empty(), "{} problem(s):\n{}", problems.len(), problems.join("\n"));
}

/// The check itself: a planted edge from a shared module to a role, from one role to another,
/// and a cycle between two shared modules, each reported; `super::` and use groups resolved.
#[test]
fn a_planted_back_edge_fails_the_check() {
    let mut files = sources();
    let plant = |files: &mut Vec<(String, String)>, file: &str, line: &str| {
        let at = files.iter().position(|(f, _)| f == file).unwrap_or_else(|| panic!("{file}"));
        files[at].1.push_str(line);
    };
    let mut shared_to_role = files.clone();
    plant(
        &mut shared_to_role,
        "server/mod.rs",
        "\nuse crate::{error::ApiError, roles::gateway::State};\n",
    );
    let found = problems(&shared_to_role);
    assert!(
        found.iter().any(|p| p.starts_with("server (Shared) imports roles::gateway (Role)")),
        "{found:?}"
    );

    let mut role_to_role = files.clone();
    plant(
        &mut role_to_role,
        "roles/stream/hub.rs",
        "\nfn f() { super::super::gateway::build(); }\n",
    );
    let found = problems(&role_to_role);
    assert!(
        found.iter().any(|p| p.starts_with("role roles::stream imports role roles::gateway")),
        "{found:?}"
    );

    let mut to_cli = files.clone();
    plant(&mut to_cli, "auth/mod.rs", "\nfn f() -> crate::cli::Cli { todo!() }\n");
    assert!(problems(&to_cli).iter().any(|p| p.starts_with("auth (Shared) imports cli (Top)")));

    // A cycle between two shared modules: `error` imports `server`, which imports `error`.
    plant(&mut files, "error.rs", "\nuse crate::server::Context;\n");
    let found = problems(&files);
    assert!(
        found.iter().any(|p| p.starts_with("import cycle:") && p.contains("error -> server")),
        "{found:?}"
    );

    // Comments and strings that merely mention a path are not imports.
    let quiet = vec![(
        "error.rs".to_string(),
        "// crate::roles::gateway\n/* crate::cli */ fn f() {}\n".to_string(),
    )];
    assert!(problems(&quiet).is_empty());
}
