//! Per-item entitlements of list responses: a route whose `entitlement.items` names the list in
//! its JSON response (`array`: a top-level field, or the whole body) and a resource template
//! over each item (`instrument:{instrument_id}`, or `curve:{.}` for a list of ids) returns to
//! each caller only the items that caller may read. The route's own entitlement (`market_data`)
//! admits the request; the items decide what it sees, so an instrument denied to a user is
//! denied in the bulk response as in the single one and on the stream.
//!
//! Applied after the cache: the cache keeps the upstream's whole body (shared per tenant, or per
//! user with `vary_user`), and every caller's copy is filtered at the rules version in force.
//! Fails closed: a 2xx body that is not JSON, or has no such list, or is larger than
//! `max_bytes`, is not passed on (502 `upstream_unavailable`, reason `unfilterable_response`); an item
//! the template cannot name (a missing field) reaches no one. Validators (`ETag`,
//! `Last-Modified`) describe the upstream's whole body, not a caller's share, so they are
//! removed and the request's conditional and range headers are not honoured (no 304, no 206);
//! a HEAD answer does not tell the whole body's size (`Content-Length: 0`). Only the named list is
//! filtered: the body's other fields, and error (non-2xx) bodies, pass as the upstream wrote
//! them, so an upstream must not put items elsewhere.

use std::collections::HashMap;

use axum::body::Body;
use axum::response::Response;
use chrono::Utc;
use http::header::{self, HeaderValue};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::auth::Identity;
use crate::error::{ApiError, ErrorCode};
use crate::policy::mirror::{self, Mirror};
use crate::resource::Template;

/// Metric names.
pub mod names {
    /// List items removed from responses, by route and reason.
    pub const FILTERED: &str = "access_gateway_items_filtered_total";

    /// Registers the description.
    pub fn describe() {
        metrics::describe_counter!(
            FILTERED,
            "Items removed from list responses by route and reason (denied: the caller may not read it; no_resource: the item lacks a field of the template)"
        );
    }
}

fn default_max_bytes() -> usize {
    8 * 1024 * 1024
}

/// `entitlement.items` of a route, as configured.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ItemsSpec {
    /// The top-level field of the response object that holds the list; absent: the response
    /// body is the list.
    #[serde(default)]
    pub array: Option<String>,
    /// The resource of one item: a template over the item's top-level fields (`{.}`: the item
    /// itself, for a list of ids).
    pub resource: String,
    /// The action checked per item (default `read`).
    #[serde(default)]
    pub action: Option<String>,
    /// The largest response body filtered; a larger one is refused (502).
    #[serde(default = "default_max_bytes")]
    pub max_bytes: usize,
}

/// A compiled `entitlement.items`.
#[derive(Debug, Clone)]
pub struct ItemCheck {
    array: Option<String>,
    template: Template,
    action: String,
    max_bytes: usize,
}

impl ItemCheck {
    /// Compiles the spec; the error says what is wrong with which field.
    pub fn compile(spec: &ItemsSpec) -> Result<ItemCheck, String> {
        let template = Template::parse(&spec.resource).map_err(|e| format!("resource: {e}"))?;
        let action = spec.action.clone().unwrap_or_else(|| "read".into());
        if !crate::policy::rules::ACTIONS.contains(&action.as_str()) {
            return Err(format!("action: unknown action {action:?}"));
        }
        if spec.array.as_deref() == Some("") {
            return Err("array: must name a field (leave it out when the body is the list)".into());
        }
        if spec.max_bytes == 0 {
            return Err("max_bytes: must be greater than 0".into());
        }
        Ok(ItemCheck { array: spec.array.clone(), template, action, max_bytes: spec.max_bytes })
    }

    /// Keeps the items of `list` that `identity` may read (per `allowed`); returns how many
    /// were removed as denied and as unnamed.
    fn retain(&self, list: &mut Vec<Value>, mut allowed: impl FnMut(&str) -> bool) -> (u64, u64) {
        let (mut denied, mut unnamed) = (0, 0);
        // Lists repeat resources (ticks of one instrument): one decision per resource.
        let mut decided: HashMap<String, bool> = HashMap::new();
        list.retain(|item| match self.template.render(item) {
            None => {
                unnamed += 1;
                false
            }
            Some(resource) => {
                let ok = match decided.get(&resource) {
                    Some(ok) => *ok,
                    None => {
                        let ok = allowed(&resource);
                        decided.insert(resource, ok);
                        ok
                    }
                };
                if !ok {
                    denied += 1;
                }
                ok
            }
        });
        (denied, unnamed)
    }
}

fn unfilterable(why: &str) -> ApiError {
    ApiError::new(
        ErrorCode::UpstreamUnavailable,
        format!("the upstream's response cannot be filtered per item: {why}"),
    )
    .with_reason("unfilterable_response")
}

/// Removes the request headers that ask for a conditional or partial answer (`If-None-Match`,
/// `If-Modified-Since`, `If-Match`, `If-Unmodified-Since`, `If-Range`, `Range`): they refer to
/// the upstream's whole body, which no caller of a filtered list receives.
pub fn strip_conditionals(headers: &mut http::HeaderMap) {
    for name in [
        header::IF_NONE_MATCH,
        header::IF_MODIFIED_SINCE,
        header::IF_MATCH,
        header::IF_UNMODIFIED_SINCE,
        header::IF_RANGE,
        header::RANGE,
    ] {
        headers.remove(name);
    }
}

/// Filters `response` (from the upstream or the cache) for `identity` at the rules in force.
/// Non-2xx responses pass unchanged but for their validators (they carry no items).
pub async fn filter(
    check: &ItemCheck,
    rules: &Mirror,
    identity: &Identity,
    route: &str,
    head: bool,
    response: Response,
) -> Result<Response, ApiError> {
    let (mut parts, body) = response.into_parts();
    parts.headers.remove(header::ETAG);
    parts.headers.remove(header::LAST_MODIFIED);
    if !parts.status.is_success() {
        return Ok(Response::from_parts(parts, body));
    }
    if head || parts.status == http::StatusCode::NO_CONTENT {
        parts.headers.remove(header::CONTENT_LENGTH);
        return Ok(Response::from_parts(parts, Body::empty()));
    }
    let bytes = axum::body::to_bytes(body, check.max_bytes).await.map_err(|_| {
        unfilterable(&format!("larger than {} bytes, or cut short", check.max_bytes))
    })?;
    let mut value: Value =
        serde_json::from_slice(&bytes).map_err(|_| unfilterable("the body is not JSON"))?;
    let list = match &check.array {
        None => value.as_array_mut(),
        Some(field) => value.get_mut(field.as_str()).and_then(Value::as_array_mut),
    }
    .ok_or_else(|| unfilterable("the configured list is not in the body"))?;
    // One snapshot for the whole list: every item is decided at the same rules version.
    let (denied, unnamed) = if rules.is_loaded() {
        let snapshot = rules.snapshot();
        let now = Utc::now();
        check.retain(list, |resource| {
            snapshot.evaluate(&mirror::request(identity, resource, &check.action), now).allowed
        })
    } else if rules.fails_open() {
        (0, 0)
    } else {
        return Err(ApiError::dependency("entitlements", anyhow::anyhow!("no rules snapshot yet")));
    };
    for (reason, n) in [("denied", denied), ("no_resource", unnamed)] {
        if n > 0 {
            metrics::counter!(names::FILTERED, "role" => "gateway", "route" => route.to_string(), "reason" => reason)
                .increment(n);
        }
    }
    let filtered = serde_json::to_vec(&value).map_err(|e| unfilterable(&e.to_string()))?;
    parts.headers.insert(header::CONTENT_LENGTH, HeaderValue::from(filtered.len()));
    Ok(Response::from_parts(parts, Body::from(filtered)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(array: Option<&str>, resource: &str) -> ItemCheck {
        ItemCheck::compile(&ItemsSpec {
            array: array.map(str::to_string),
            resource: resource.into(),
            action: None,
            max_bytes: 1024,
        })
        .unwrap()
    }

    #[test]
    fn keeps_what_is_allowed_and_drops_what_has_no_resource() {
        let c = check(Some("prices"), "instrument:{instrument_id}");
        let mut list = vec![
            json!({"instrument_id": "NG"}),
            json!({"instrument_id": "BRN"}),
            json!({"price": 1}),
            json!("NG"),
            json!({"instrument_id": "BRN"}),
            json!({"instrument_id": 7}),
        ];
        let mut asked = Vec::new();
        let (denied, unnamed) = c.retain(&mut list, |r| {
            asked.push(r.to_string());
            r != "instrument:BRN"
        });
        assert_eq!(list, vec![json!({"instrument_id": "NG"}), json!({"instrument_id": 7})]);
        assert_eq!((denied, unnamed), (2, 2));
        assert_eq!(asked, ["instrument:NG", "instrument:BRN", "instrument:7"], "once each");
    }

    #[test]
    fn a_list_of_ids_names_itself() {
        let c = check(None, "curve:{.}");
        let mut list = vec![json!("NG-HH"), json!("BRN"), json!(null)];
        assert_eq!(c.retain(&mut list, |r| r == "curve:BRN"), (1, 1));
        assert_eq!(list, vec![json!("BRN")]);
    }

    #[test]
    fn bad_specs_are_refused() {
        let spec = |array: Option<&str>, resource: &str, action: Option<&str>| ItemsSpec {
            array: array.map(str::to_string),
            resource: resource.into(),
            action: action.map(str::to_string),
            max_bytes: 10,
        };
        assert!(ItemCheck::compile(&spec(None, "x:{", None)).is_err());
        assert!(ItemCheck::compile(&spec(None, "x:{a}", Some("peek"))).is_err());
        assert!(ItemCheck::compile(&spec(Some(""), "x:{a}", None)).is_err());
        assert!(ItemCheck::compile(&spec(Some("a"), "x:{a}", Some("read"))).is_ok());
    }
}
