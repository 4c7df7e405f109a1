//! The Pushgateway-compatible path: `PUT`/`POST`/`DELETE /metrics/job/<job>{/<label>/<value>}`
//! with Prometheus text format. As in Pushgateway, values are absolute; `PUT` replaces the whole
//! group, `POST` replaces only the families it names, `DELETE` removes the group; each sample gets
//! the grouping labels, and each group exports `push_time_seconds`.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use base64::Engine;

use super::registry::{
    check_labels, escape_help, sample, valid_label_name, valid_metric_name, Labels, Limits,
    Rejection, SeriesInfo,
};

/// One parsed family.
#[derive(Debug, Clone, PartialEq)]
pub struct Family {
    /// Its name.
    pub name: String,
    /// `counter`, `gauge`, `histogram`, `summary` or `untyped`.
    pub kind: String,
    /// `# HELP` text.
    pub help: Option<String>,
    /// (sample name, labels, value).
    pub samples: Vec<(String, Labels, f64)>,
}

/// A malformed push; `line` is 1-based.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct ParseError {
    /// Where.
    pub line: usize,
    /// What.
    pub message: String,
}

/// Parses Prometheus text exposition format (0.0.4).
pub fn parse(text: &str) -> Result<Vec<Family>, ParseError> {
    let mut families: Vec<Family> = Vec::new();
    let err = |line: usize, message: &str| ParseError { line, message: message.to_string() };
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        let line = raw.trim();
        if line.is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let mut words = comment.trim_start().splitn(3, ' ');
            match (words.next(), words.next(), words.next()) {
                (Some("TYPE"), Some(name), Some(kind)) => {
                    let kind = kind.trim();
                    if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                        return Err(err(n, &format!("unknown type {kind:?}")));
                    }
                    if !valid_metric_name(name) {
                        return Err(err(n, &format!("invalid metric name {name:?}")));
                    }
                    let family = family_mut(&mut families, name);
                    if !family.samples.is_empty() || family.kind != "untyped" {
                        return Err(err(n, &format!("TYPE for {name} after its samples or twice")));
                    }
                    family.kind = kind.to_string();
                }
                (Some("HELP"), Some(name), help) => {
                    family_mut(&mut families, name).help =
                        Some(help.unwrap_or_default().replace("\\n", "\n").replace("\\\\", "\\"));
                }
                _ => {}
            }
            continue;
        }
        let (name, labels, value) = parse_sample(line).map_err(|m| err(n, &m))?;
        let family_name = families
            .iter()
            .rev()
            .find(|f| belongs(&f.kind, &f.name, &name))
            .map(|f| f.name.clone())
            .unwrap_or_else(|| name.clone());
        family_mut(&mut families, &family_name).samples.push((name, labels, value));
    }
    families.retain(|f| !f.samples.is_empty());
    Ok(families)
}

fn family_mut<'a>(families: &'a mut Vec<Family>, name: &str) -> &'a mut Family {
    if let Some(i) = families.iter().position(|f| f.name == name) {
        return &mut families[i];
    }
    families.push(Family {
        name: name.to_string(),
        kind: "untyped".into(),
        help: None,
        samples: Vec::new(),
    });
    families.last_mut().expect("just pushed")
}

/// The names a pushed family occupies: its name and its samples' names.
fn claimed(kind: &str, family: &str) -> Vec<String> {
    let suffixes: &[&str] = match kind {
        "histogram" => &["", "_bucket", "_sum", "_count"],
        "summary" => &["", "_sum", "_count"],
        _ => &[""],
    };
    suffixes.iter().map(|s| format!("{family}{s}")).collect()
}

fn belongs(kind: &str, family: &str, sample: &str) -> bool {
    sample == family
        || match kind {
            "histogram" => {
                ["_bucket", "_sum", "_count"].iter().any(|s| sample.strip_suffix(s) == Some(family))
            }
            "summary" => ["_sum", "_count"].iter().any(|s| sample.strip_suffix(s) == Some(family)),
            _ => false,
        }
}

fn parse_sample(line: &str) -> Result<(String, Labels, f64), String> {
    let name_end = line.find(|c: char| c == '{' || c.is_whitespace()).unwrap_or(line.len());
    let name = &line[..name_end];
    if !valid_metric_name(name) {
        return Err(format!("invalid metric name {name:?}"));
    }
    let mut rest = &line[name_end..];
    let mut labels = Labels::new();
    if let Some(body) = rest.strip_prefix('{') {
        let mut chars = body.char_indices().peekable();
        loop {
            while chars.peek().is_some_and(|(_, c)| c.is_whitespace() || *c == ',') {
                chars.next();
            }
            match chars.peek() {
                Some((i, '}')) => {
                    rest = &body[i + 1..];
                    break;
                }
                None => return Err("unterminated label set".into()),
                _ => {}
            }
            let start = chars.peek().map(|(i, _)| *i).unwrap_or(0);
            let mut end = start;
            while let Some((i, c)) = chars.peek().copied() {
                if c == '=' {
                    end = i;
                    break;
                }
                chars.next();
            }
            let label = body[start..end].trim();
            if !valid_label_name(label) {
                return Err(format!("invalid label name {label:?}"));
            }
            chars.next(); // '='
            if chars.next().map(|(_, c)| c) != Some('"') {
                return Err(format!("label {label} needs a quoted value"));
            }
            let mut value = String::new();
            loop {
                match chars.next() {
                    Some((_, '\\')) => match chars.next() {
                        Some((_, 'n')) => value.push('\n'),
                        Some((_, c)) => value.push(c),
                        None => return Err("unterminated label value".into()),
                    },
                    Some((_, '"')) => break,
                    Some((_, c)) => value.push(c),
                    None => return Err("unterminated label value".into()),
                }
            }
            if labels.iter().any(|(k, _)| k == label) {
                return Err(format!("label {label} given twice"));
            }
            labels.push((label.to_string(), value));
        }
    }
    let mut words = rest.split_whitespace();
    let value = words.next().ok_or("a sample needs a value")?;
    let value = match value {
        "+Inf" | "Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse().map_err(|_| format!("{v:?} is not a number"))?,
    };
    if words.next().is_some_and(|t| t.parse::<i64>().is_err()) {
        return Err("the timestamp is not an integer".into());
    }
    labels.sort();
    Ok((name.to_string(), labels, value))
}

/// The grouping key of a path after `/metrics/job/`: `job/<job>{/<label>/<value>}`, values in
/// `<label>@base64/<base64url value>` form decoded.
pub fn grouping_key(path: &str) -> Result<Labels, String> {
    let mut parts = path.split('/').filter(|p| !p.is_empty());
    let job = parts.next().ok_or("the job name is missing")?;
    let mut labels = vec![("job".to_string(), job.to_string())];
    let rest: Vec<&str> = parts.collect();
    if rest.len() % 2 != 0 {
        return Err("labels come in name/value pairs".into());
    }
    for pair in rest.chunks(2) {
        let (name, value) = match pair[0].strip_suffix("@base64") {
            Some(name) => {
                let bytes = base64::engine::general_purpose::URL_SAFE
                    .decode(pair[1].trim_end_matches('='))
                    .or_else(|_| {
                        base64::engine::general_purpose::URL_SAFE_NO_PAD
                            .decode(pair[1].trim_end_matches('='))
                    })
                    .map_err(|_| format!("{name}: not base64url"))?;
                (name, String::from_utf8(bytes).map_err(|_| format!("{name}: not UTF-8"))?)
            }
            None => (pair[0], pair[1].to_string()),
        };
        if !valid_label_name(name) {
            return Err(format!("invalid label name {name:?}"));
        }
        if labels.iter().any(|(k, _)| k == name) {
            return Err(format!("label {name} given twice"));
        }
        labels.push((name.to_string(), value));
    }
    labels.sort();
    Ok(labels)
}

struct Group {
    families: BTreeMap<String, Family>,
    push_time: f64,
}

/// Pushed groups.
#[derive(Default)]
pub struct Groups {
    groups: BTreeMap<Labels, Group>,
}

/// `PUT` or `POST`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Replace the group.
    Replace,
    /// Replace the named families only.
    Merge,
}

impl Groups {
    /// Series held in all groups.
    pub fn series_count(&self) -> usize {
        self.groups.values().flat_map(|g| g.families.values()).map(|f| f.samples.len()).sum()
    }

    /// Whether a family name is used by any group.
    pub fn has_family(&self, name: &str) -> bool {
        self.groups.values().any(|g| g.families.contains_key(name))
    }

    /// Whether a pushed family occupies `name` in the exposition: its own name, or one of its
    /// samples' (a histogram's `_bucket`, `_sum`, `_count`; a summary's `_sum`, `_count`).
    pub fn claims(&self, name: &str) -> bool {
        self.groups
            .values()
            .flat_map(|g| g.families.values())
            .any(|f| belongs(&f.kind, &f.name, name))
    }

    /// Applies a push after checking it; nothing changes when it is refused. (The arguments are
    /// the push and the limits it is checked against; a struct would only rename them.)
    #[allow(clippy::too_many_arguments)]
    pub fn push(
        &mut self,
        key: Labels,
        families: Vec<Family>,
        mode: Mode,
        now: f64,
        limits: &Limits,
        other_series: usize,
        taken: impl Fn(&str) -> bool,
    ) -> Result<(), (Rejection, String)> {
        for family in &families {
            if family.name.starts_with("access_") && !family.name.starts_with("access_usage_")
                || family.name == "push_time_seconds"
            {
                return Err((Rejection::ReservedName, format!("{} is reserved", family.name)));
            }
            if claimed(&family.kind, &family.name).iter().any(|name| taken(name)) {
                return Err((
                    Rejection::TypeConflict,
                    format!("{} is a tracked metric", family.name),
                ));
            }
            let elsewhere = self
                .groups
                .iter()
                .filter(|(k, _)| **k != key)
                .filter_map(|(_, g)| g.families.get(&family.name))
                .next();
            if let Some(other) = elsewhere.filter(|o| o.kind != family.kind) {
                return Err((
                    Rejection::TypeConflict,
                    format!("{} is a {} in another group", family.name, other.kind),
                ));
            }
            for (_, labels, _) in &family.samples {
                let mut all = labels.clone();
                for (k, v) in &key {
                    match labels.iter().find(|(name, _)| name == k) {
                        Some((_, mine)) if mine != v => {
                            return Err((
                                Rejection::InvalidLabel,
                                format!(
                                    "{} sets {k}={mine:?} against the grouping key",
                                    family.name
                                ),
                            ));
                        }
                        Some(_) => {}
                        None => all.push((k.clone(), v.clone())),
                    }
                }
                check_labels(&all, limits)
                    .map_err(|r| (r, format!("{}: {}", family.name, r.as_str())))?;
            }
        }
        let current = self
            .groups
            .get(&key)
            .map(|g| g.families.values().map(|f| f.samples.len()).sum::<usize>())
            .unwrap_or(0);
        let replaced: usize = match mode {
            Mode::Replace => current,
            Mode::Merge => self
                .groups
                .get(&key)
                .map(|g| {
                    families
                        .iter()
                        .filter_map(|f| g.families.get(&f.name))
                        .map(|f| f.samples.len())
                        .sum()
                })
                .unwrap_or(0),
        };
        let incoming: usize = families.iter().map(|f| f.samples.len()).sum();
        if self.series_count() - replaced + incoming + other_series > limits.max_series {
            return Err((Rejection::SeriesCap, "the series cap is reached".into()));
        }
        let group = self
            .groups
            .entry(key)
            .or_insert_with(|| Group { families: BTreeMap::new(), push_time: now });
        if mode == Mode::Replace {
            group.families.clear();
        }
        for family in families {
            group.families.insert(family.name.clone(), family);
        }
        group.push_time = now;
        Ok(())
    }

    /// Removes a group; whether it existed.
    pub fn delete(&mut self, key: &Labels) -> bool {
        self.groups.remove(key).is_some()
    }

    /// Drops groups not pushed since `cutoff`; returns the series dropped.
    pub fn expire(&mut self, cutoff: f64) -> usize {
        let before = self.series_count();
        self.groups.retain(|_, g| g.push_time >= cutoff);
        before - self.series_count()
    }

    /// Prometheus text: each family once across groups, then `push_time_seconds`.
    pub fn render(&self, out: &mut String) {
        let mut by_name: BTreeMap<&str, Vec<(&Labels, &Family)>> = BTreeMap::new();
        for (key, group) in &self.groups {
            for family in group.families.values() {
                by_name.entry(&family.name).or_default().push((key, family));
            }
        }
        for (name, members) in by_name {
            let first = members[0].1;
            let help = first.help.clone().unwrap_or_else(|| format!("Pushed metric {name}"));
            let _ = writeln!(out, "# HELP {name} {}", escape_help(&help));
            let _ = writeln!(out, "# TYPE {name} {}", first.kind);
            for (key, family) in members {
                for (sample_name, labels, value) in &family.samples {
                    let mut all = labels.clone();
                    for (k, v) in key {
                        if !all.iter().any(|(name, _)| name == k) {
                            all.push((k.clone(), v.clone()));
                        }
                    }
                    all.sort();
                    // `le` and `quantile` stay last, where Prometheus writes them.
                    let (mut plain, special): (Labels, Labels) =
                        all.into_iter().partition(|(k, _)| k != "le" && k != "quantile");
                    plain.extend(special);
                    sample(out, sample_name, &plain, None, *value);
                }
            }
        }
        if !self.groups.is_empty() {
            let _ = writeln!(out, "# HELP push_time_seconds Last Unix time when this group was changed in the metrics role.");
            let _ = writeln!(out, "# TYPE push_time_seconds gauge");
            for (key, group) in &self.groups {
                sample(out, "push_time_seconds", key, None, group.push_time);
            }
        }
    }

    /// Every pushed series, for `GET /metrics/series`.
    pub fn list(&self) -> Vec<SeriesInfo> {
        let mut out = Vec::new();
        for (key, group) in &self.groups {
            let source = format!(
                "pushed:{}",
                key.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
            );
            for family in group.families.values() {
                for (name, labels, value) in &family.samples {
                    let mut all: BTreeMap<String, String> = key.iter().cloned().collect();
                    all.extend(labels.iter().cloned());
                    out.push(SeriesInfo {
                        name: name.clone(),
                        kind: match family.kind.as_str() {
                            "counter" => "counter",
                            "gauge" => "gauge",
                            "histogram" => "histogram",
                            "summary" => "summary",
                            _ => "untyped",
                        },
                        labels: all,
                        value: *value,
                        sum: None,
                        last_push: group.push_time,
                        source: source.clone(),
                    });
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP batch_duration_seconds How long the batch took.
# TYPE batch_duration_seconds gauge
batch_duration_seconds 12.5
# TYPE rows_processed_total counter
rows_processed_total{table="prices",note="a \"quoted\"\nline"} 1000 1700000000000
# TYPE lat histogram
lat_bucket{le="0.5"} 3
lat_bucket{le="+Inf"} 4
lat_sum 1.5
lat_count 4
untyped_thing NaN
"#;

    #[test]
    fn text_format_parses() {
        let families = parse(TEXT).unwrap();
        let names: Vec<_> =
            families.iter().map(|f| (f.name.as_str(), f.kind.as_str(), f.samples.len())).collect();
        assert_eq!(
            names,
            vec![
                ("batch_duration_seconds", "gauge", 1),
                ("rows_processed_total", "counter", 1),
                ("lat", "histogram", 4),
                ("untyped_thing", "untyped", 1)
            ]
        );
        assert_eq!(families[0].help.as_deref(), Some("How long the batch took."));
        let (_, labels, value) = &families[1].samples[0];
        assert_eq!(*value, 1000.0);
        assert_eq!(
            labels,
            &vec![
                ("note".to_string(), "a \"quoted\"\nline".to_string()),
                ("table".to_string(), "prices".to_string())
            ]
        );
        assert!(families[3].samples[0].2.is_nan());
    }

    #[test]
    fn malformed_text_names_the_line() {
        for (text, line) in [
            ("ok 1\nbad-name 2", 2),
            ("m{a=\"x} 1", 1),
            ("m{a=x} 1", 1),
            ("m 1\nm{1a=\"x\"} 2", 2),
            ("m one", 1),
            ("# TYPE m flower\nm 1", 1),
            ("m{a=\"1\",a=\"2\"} 1", 1),
        ] {
            assert_eq!(parse(text).unwrap_err().line, line, "{text}");
        }
    }

    #[test]
    fn grouping_keys_parse_with_base64() {
        assert_eq!(
            grouping_key("nightly/instance/db1").unwrap(),
            vec![("instance".into(), "db1".into()), ("job".into(), "nightly".into())]
        );
        assert_eq!(
            grouping_key("nightly/path@base64/L3Zhci90bXA=").unwrap()[0],
            ("job".into(), "nightly".into())
        );
        assert_eq!(
            grouping_key("nightly/path@base64/L3Zhci90bXA=").unwrap()[1],
            ("path".into(), "/var/tmp".into())
        );
        assert!(grouping_key("").is_err());
        assert!(grouping_key("j/odd").is_err());
        assert!(grouping_key("j/job/again").is_err());
    }
}
