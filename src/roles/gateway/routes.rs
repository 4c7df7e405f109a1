//! The route table: what the gateway forwards, where, and under which rules.
//!
//! Loaded from `gateway.routes_file` (YAML) or the built-in `config/routes.yaml`, validated in
//! full (every problem names the route and field), compiled into a `matchit` router, and swapped
//! whole on SIGHUP: a bad file is refused and the old table kept.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http::Method;
use serde::{Deserialize, Serialize};
use url::Url;

/// The built-in table.
pub const DEFAULT_ROUTES: &str = include_str!("../../../config/routes.yaml");

/// Whether a route needs a caller identity.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// 401 without valid credentials.
    #[default]
    Required,
    /// Credentials are verified when sent (bad ones are 401); none is anonymous.
    Optional,
    /// Credentials are ignored.
    None,
}

/// The entitlement a route needs: `resource` may name path parameters (`instrument:{id}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EntitlementSpec {
    /// Resource template.
    pub resource: String,
    /// The action; by default GET/HEAD read, POST/PUT/PATCH write, DELETE delete.
    #[serde(default)]
    pub action: Option<String>,
    /// Per-item entitlements of a list response: each caller sees only the items it may read
    /// ([`super::items`]).
    #[serde(default)]
    pub items: Option<super::items::ItemsSpec>,
}

/// One route as configured.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    /// Name: the `route` label of metrics, and how operators refer to it.
    pub name: String,
    /// Path pattern: `{name}` matches one segment, `{*name}` the rest.
    pub path: String,
    /// Methods; empty means all.
    #[serde(default)]
    pub methods: Vec<String>,
    /// An upstream group from `gateway.upstreams`.
    #[serde(default)]
    pub upstream: Option<String>,
    /// Upstream base URLs (round-robin), instead of a group.
    #[serde(default)]
    pub upstreams: Vec<Url>,
    /// Prefix removed from the path before forwarding.
    #[serde(default)]
    pub strip_prefix: Option<String>,
    /// Upstream deadline for the response head.
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
    /// Retries on another upstream after a failed connection, idempotent methods only.
    #[serde(default)]
    pub retries: Option<u32>,
    /// Credentials.
    #[serde(default)]
    pub auth: AuthMode,
    /// The entitlement checked for an identified caller.
    #[serde(default)]
    pub entitlement: Option<EntitlementSpec>,
    /// Rate-limit policies (applied by the rate limiter).
    #[serde(default)]
    pub rate_limits: Vec<String>,
    /// Cache policy: present means GET and HEAD responses may be cached.
    #[serde(default)]
    pub cache: Option<super::cache::CachePolicy>,
    /// Forward the caller's own `Authorization` (and `X-API-Key`) to the upstream. Off by
    /// default: an upstream that logs headers would hold live credentials.
    #[serde(default)]
    pub forward_authorization: bool,
}

/// A validated, compiled route.
#[derive(Debug)]
pub struct Route {
    /// The spec it came from.
    pub spec: RouteSpec,
    /// Allowed methods (empty: all).
    pub methods: Vec<Method>,
    /// Upstream base URLs.
    pub upstreams: Vec<Url>,
    /// The deadline.
    pub timeout: Duration,
    /// Retries.
    pub retries: u32,
    /// Round-robin position over `upstreams`.
    pub next: std::sync::atomic::AtomicUsize,
    /// The cache policy, if the route is cached.
    pub cache: Option<super::cache::CachePolicy>,
    /// `access_gateway_upstream_duration_seconds` for this route, registered once.
    pub upstream_duration: metrics::Histogram,
    /// `access_gateway_cache_results_total` for this route by result, registered once.
    pub cache_results: super::cache::ResultCounters,
    /// The per-item check of list responses, if the route has one.
    pub items: Option<super::items::ItemCheck>,
}

impl Route {
    /// The action an entitlement check uses for `method`: the route's own, else GET, HEAD and
    /// OPTIONS read, POST, PUT and PATCH write, DELETE delete, and any other method (an
    /// extension method, or a standard one in another case, such as `delete`, which some
    /// upstreams honour) `admin`: what the gateway cannot classify it checks as the strongest
    /// action, never as a read.
    pub fn action(&self, method: &Method) -> String {
        if let Some(action) = self.spec.entitlement.as_ref().and_then(|e| e.action.clone()) {
            return action;
        }
        match *method {
            Method::GET | Method::HEAD | Method::OPTIONS => "read",
            Method::POST | Method::PUT | Method::PATCH => "write",
            Method::DELETE => "delete",
            _ => "admin",
        }
        .to_string()
    }

    /// Whether the route takes `method` (CORS preflights are answered before routes, by the
    /// CORS layer, so OPTIONS is only forwarded where a route lists it or takes every method).
    pub fn allows(&self, method: &Method) -> bool {
        self.methods.is_empty() || self.methods.contains(method)
    }
}

/// The compiled table.
pub struct Table {
    router: matchit::Router<usize>,
    routes: Vec<Arc<Route>>,
}

/// A matched route with its path parameters.
pub struct Matched {
    /// The route.
    pub route: Arc<Route>,
    /// Parameters by name.
    pub params: Vec<(String, String)>,
}

impl Table {
    /// Compiles `specs`, resolving upstream groups; every problem is reported.
    pub fn compile(
        specs: Vec<RouteSpec>,
        groups: &BTreeMap<String, Vec<Url>>,
        default_timeout: Duration,
        default_retries: u32,
    ) -> Result<Table, Vec<String>> {
        let mut problems = Vec::new();
        let mut router = matchit::Router::new();
        let mut routes = Vec::new();
        let mut names = std::collections::HashSet::new();
        for (i, spec) in specs.into_iter().enumerate() {
            let at = format!("routes[{i}] ({})", spec.name);
            if spec.name.is_empty() || !names.insert(spec.name.clone()) {
                problems.push(format!("{at}.name: empty or used twice"));
            }
            if !spec.path.starts_with('/') {
                problems.push(format!("{at}.path: must start with /"));
            }
            let mut methods = Vec::new();
            for m in &spec.methods {
                match Method::from_bytes(m.to_ascii_uppercase().as_bytes()) {
                    Ok(method) => methods.push(method),
                    Err(_) => problems.push(format!("{at}.methods: {m:?} is not a method")),
                }
            }
            let upstreams = match (&spec.upstream, spec.upstreams.is_empty()) {
                (Some(group), true) => match groups.get(group) {
                    Some(urls) if !urls.is_empty() => urls.clone(),
                    _ => {
                        problems.push(format!(
                            "{at}.upstream: no upstream group {group:?} in gateway.upstreams"
                        ));
                        Vec::new()
                    }
                },
                (None, false) => spec.upstreams.clone(),
                _ => {
                    problems.push(format!(
                        "{at}: name exactly one of upstream (a group) or upstreams (URLs)"
                    ));
                    Vec::new()
                }
            };
            for u in &upstreams {
                if !matches!(u.scheme(), "http" | "https") || u.host_str().is_none() {
                    problems.push(format!(
                        "{at}.upstreams: {u} must be an http:// or https:// URL with a host"
                    ));
                }
            }
            if let Some(prefix) = &spec.strip_prefix {
                if !spec.path.starts_with(prefix.as_str()) {
                    problems.push(format!(
                        "{at}.strip_prefix: the path does not start with {prefix:?}"
                    ));
                }
            }
            if let Some(e) = &spec.entitlement {
                let params = path_params(&spec.path);
                for name in template_params(&e.resource) {
                    if !params.contains(&name) {
                        problems.push(format!(
                            "{at}.entitlement.resource: {{{name}}} is not a parameter of the path"
                        ));
                    }
                }
                if let Some(action) = &e.action {
                    if !crate::policy::rules::ACTIONS.contains(&action.as_str()) {
                        problems
                            .push(format!("{at}.entitlement.action: unknown action {action:?}"));
                    }
                }
            }
            let items = match spec.entitlement.as_ref().and_then(|e| e.items.as_ref()) {
                Some(_) if spec.auth != AuthMode::Required => {
                    problems.push(format!(
                        "{at}.entitlement.items: needs auth: required (an anonymous caller has no entitlements to filter by)"
                    ));
                    None
                }
                Some(items) => match super::items::ItemCheck::compile(items) {
                    Ok(check) => Some(check),
                    Err(e) => {
                        problems.push(format!("{at}.entitlement.items.{e}"));
                        None
                    }
                },
                None => None,
            };
            if let Err(e) = router.insert(spec.path.clone(), routes.len()) {
                problems.push(format!("{at}.path: {e}"));
            }
            let timeout = spec.timeout.unwrap_or(default_timeout);
            let retries = spec.retries.unwrap_or(default_retries);
            let cache = spec.cache.clone();
            let upstream_duration = metrics::histogram!(super::proxy::names::UPSTREAM_DURATION,
                "role" => "gateway", "route" => spec.name.clone());
            let cache_results = super::cache::ResultCounters::new(&spec.name);
            routes.push(Arc::new(Route {
                spec,
                methods,
                upstreams,
                timeout,
                retries,
                next: Default::default(),
                cache,
                upstream_duration,
                cache_results,
                items,
            }));
        }
        if problems.is_empty() {
            Ok(Table { router, routes })
        } else {
            Err(problems)
        }
    }

    /// The route for `path`, a canonical path ([`crate::server::target`]), if any. Parameters
    /// are percent-decoded: each is the one string the upstream will see for its segment(s).
    pub fn find(&self, path: &str) -> Option<Matched> {
        let m = self.router.at(path).ok()?;
        let mut params = Vec::with_capacity(m.params.len());
        for (k, v) in m.params.iter() {
            // `{*rest}` spans segments; no segment of a canonical path holds an encoded `/`,
            // so decoding the whole stays unambiguous.
            params.push((k.to_string(), crate::server::target::decode(v)?.into_owned()));
        }
        Some(Matched { route: self.routes[*m.value].clone(), params })
    }

    /// Every route, in table order.
    pub fn routes(&self) -> &[Arc<Route>] {
        &self.routes
    }
}

/// A route file: a list of routes, or `{routes: [...], rate_limits: {name: policy}}` so that
/// policies are reloaded with the routes.
#[derive(Debug, Default)]
pub struct RouteFile {
    /// The routes.
    pub routes: Vec<RouteSpec>,
    /// Policies defined (or redefined) by the file, over `gateway.rate_limits`.
    pub rate_limits: BTreeMap<String, crate::ratelimit::Policy>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FullFile {
    routes: Vec<RouteSpec>,
    #[serde(default)]
    rate_limits: BTreeMap<String, crate::ratelimit::Policy>,
}

/// Reads a route file (or the built-in table).
pub fn load_file(path: Option<&Path>) -> Result<RouteFile, String> {
    let text = match path {
        Some(p) => std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?,
        None => DEFAULT_ROUTES.to_string(),
    };
    let value: serde_yaml::Value =
        serde_yaml::from_str(&text).map_err(|e| format!("routes: {e}"))?;
    if value.is_sequence() {
        let routes = serde_yaml::from_value(value).map_err(|e| format!("routes: {e}"))?;
        Ok(RouteFile { routes, rate_limits: BTreeMap::new() })
    } else {
        let full: FullFile = serde_yaml::from_value(value).map_err(|e| format!("routes: {e}"))?;
        Ok(RouteFile { routes: full.routes, rate_limits: full.rate_limits })
    }
}

/// The routes of a route file (or of the built-in table).
pub fn load_specs(path: Option<&Path>) -> Result<Vec<RouteSpec>, String> {
    load_file(path).map(|f| f.routes)
}

fn path_params(path: &str) -> Vec<String> {
    path.split('/')
        .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
        .map(|s| s.trim_start_matches('*').to_string())
        .collect()
}

fn template_params(template: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        let Some(end) = rest[start..].find('}') else { break };
        out.push(rest[start + 1..start + end].to_string());
        rest = &rest[start + end + 1..];
    }
    out
}

/// Fills `{name}` in a resource template from path parameters.
pub fn render_resource(template: &str, params: &[(String, String)]) -> String {
    let mut out = template.to_string();
    for (name, value) in params {
        out = out.replace(&format!("{{{name}}}"), value);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn groups() -> BTreeMap<String, Vec<Url>> {
        ["market_data", "curves", "projections"]
            .iter()
            .map(|g| (g.to_string(), vec![Url::parse(&format!("http://{g}:8080")).unwrap()]))
            .collect()
    }

    #[test]
    fn the_default_table_compiles_and_matches() {
        let table =
            Table::compile(load_specs(None).unwrap(), &groups(), Duration::from_secs(10), 1)
                .unwrap();
        let m = table.find("/api/v1/prices/latest/EURUSD").unwrap();
        assert_eq!(m.route.spec.name, "latest_prices");
        assert_eq!(m.params, vec![("instrument_id".to_string(), "EURUSD".to_string())]);
        let e = m.route.spec.entitlement.as_ref().unwrap();
        assert_eq!(render_resource(&e.resource, &m.params), "instrument:EURUSD");
        assert_eq!(m.route.action(&Method::GET), "read");
        assert_eq!(
            table.find("/api/v1/curves/EUR-OIS/snapshot").unwrap().route.spec.name,
            "curve_snapshot"
        );
        assert!(table.find("/api/v2/nothing").is_none());
        assert_eq!(
            table.find("/api/v1/projections/var").unwrap().route.timeout,
            Duration::from_secs(30)
        );
    }

    #[test]
    fn every_problem_names_its_route_and_field() {
        let specs: Vec<RouteSpec> = serde_yaml::from_str(
            r#"
- { name: a, path: no-slash, upstream: market_data }
- { name: a, path: "/b/{id}", upstream: nowhere, entitlement: { resource: "x:{other}", action: fly } }
- { name: c, path: /c, upstreams: ["ftp://secure:443"], methods: [GE T] }
- { name: d, path: /d, upstream: market_data, strip_prefix: /e }
"#,
        )
        .unwrap();
        let Err(problems) = Table::compile(specs, &groups(), Duration::from_secs(1), 0) else {
            panic!("compiled")
        };
        let text = problems.join("\n");
        for expected in [
            "routes[0] (a).path",
            "routes[1] (a).name",
            "routes[1] (a).upstream",
            "routes[1] (a).entitlement.resource",
            "routes[1] (a).entitlement.action",
            "routes[2] (c).upstreams",
            "routes[2] (c).methods",
            "routes[3] (d).strip_prefix",
        ] {
            assert!(text.contains(expected), "{expected} missing from:\n{text}");
        }
    }

    #[test]
    fn actions_follow_methods_unless_the_route_says() {
        let specs: Vec<RouteSpec> =
            serde_yaml::from_str("- { name: a, path: /a, upstreams: ['http://x'], entitlement: { resource: r } }\n- { name: b, path: /b, upstreams: ['http://x'], entitlement: { resource: r, action: admin } }").unwrap();
        let t = Table::compile(specs, &BTreeMap::new(), Duration::from_secs(1), 0).unwrap();
        let a = &t.routes()[0];
        assert_eq!(
            (a.action(&Method::POST), a.action(&Method::DELETE), a.action(&Method::HEAD)),
            ("write".into(), "delete".into(), "read".into())
        );
        assert_eq!(t.routes()[1].action(&Method::GET), "admin");
        for unknown in ["delete", "Delete", "post", "PURGE", "MKCOL", "TRACE", "X"] {
            let method = Method::from_bytes(unknown.as_bytes()).unwrap();
            assert_eq!(a.action(&method), "admin", "{unknown} is checked as the strongest action");
        }
    }
}
