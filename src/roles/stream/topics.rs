//! The topic registry (topic -> resource and action to subscribe, and the resource template and
//! action every record is checked against; `docs/contracts.md`, Streams) and the
//! per-subscription filters applied to a record's top-level fields before it is sent.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// One topic clients may subscribe to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicSpec {
    /// The Kafka topic.
    pub name: String,
    /// The entitlement resource a subscriber needs.
    pub resource: String,
    /// The entitlement action (default `subscribe`).
    #[serde(default = "subscribe")]
    pub action: String,
    /// The resource each record is checked against, a template over the record's top-level
    /// fields (`instrument:{instrument_id}`): a record reaches a subscriber only when the
    /// subscriber may `record_action` it. Unset: records are not checked one by one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record_resource: Option<String>,
    /// The action of the per-record check (default `read`).
    #[serde(default = "read")]
    pub record_action: String,
    /// What the topic carries, shown by `list_topics`.
    #[serde(default)]
    pub description: String,
}

fn subscribe() -> String {
    "subscribe".into()
}

fn read() -> String {
    "read".into()
}

/// The platform's topics: prices are checked per instrument, curves per curve, as the gateway
/// checks `GET /api/v1/prices/latest/{instrument_id}` and `/curves/{curve_id}/snapshot`.
pub fn default_registry() -> Vec<TopicSpec> {
    [
        (
            "served.market.latest_prices.v1",
            "market_data",
            "instrument:{instrument_id}",
            "Latest price per instrument",
        ),
        (
            "market.data.updates.v1",
            "market_data",
            "instrument:{instrument_id}",
            "Market data updates",
        ),
        ("pricing.curve.updates.v1", "curve", "curve:{curve_id}", "Forward curve updates"),
    ]
    .into_iter()
    .map(|(name, resource, record_resource, description)| TopicSpec {
        name: name.into(),
        resource: resource.into(),
        action: subscribe(),
        record_resource: Some(record_resource.into()),
        record_action: read(),
        description: description.into(),
    })
    .collect()
}

pub use crate::resource::Template;

/// Most conditions one filter may hold, and most values one membership list may hold: bounds
/// on the work a single subscription can add to every record's fan-out.
pub const MAX_CONDITIONS: usize = 16;
/// See [`MAX_CONDITIONS`].
pub const MAX_MEMBERS: usize = 1000;

/// A filter on a record's top-level fields; every condition must hold.
#[derive(Debug, Clone, PartialEq)]
pub struct Filter {
    conditions: Vec<(String, Condition)>,
}

#[derive(Debug, Clone, PartialEq)]
enum Condition {
    /// `{"field": value}`
    Eq(Value),
    /// `{"field": [a, b]}`
    In(Vec<Value>),
    /// `{"field": {"gte": 1, "lt": 2}}`
    Range { gt: Option<f64>, gte: Option<f64>, lt: Option<f64>, lte: Option<f64> },
}

impl Filter {
    /// Parses `{"field": scalar | [scalars] | {"gt"|"gte"|"lt"|"lte": number}}`; the error names
    /// the field at fault.
    pub fn parse(value: &Value) -> Result<Filter, String> {
        let Value::Object(fields) = value else {
            return Err("a filter is an object of field conditions".into());
        };
        if fields.len() > MAX_CONDITIONS {
            return Err(format!("a filter holds at most {MAX_CONDITIONS} conditions"));
        }
        let mut conditions = Vec::with_capacity(fields.len());
        for (field, cond) in fields {
            let condition = match cond {
                Value::Array(items) => {
                    if items.len() > MAX_MEMBERS {
                        return Err(format!("{field}: at most {MAX_MEMBERS} values"));
                    }
                    if items.iter().any(|v| v.is_array() || v.is_object()) {
                        return Err(format!("{field}: membership values must be scalars"));
                    }
                    Condition::In(items.clone())
                }
                Value::Object(bounds) => range(field, bounds)?,
                scalar => Condition::Eq(scalar.clone()),
            };
            conditions.push((field.clone(), condition));
        }
        Ok(Filter { conditions })
    }

    /// Whether `data` passes. A record that is not an object passes only an empty filter.
    pub fn matches(&self, data: &Value) -> bool {
        let Value::Object(fields) = data else { return self.conditions.is_empty() };
        self.conditions.iter().all(|(field, cond)| match (cond, fields.get(field)) {
            (_, None) => false,
            (Condition::Eq(want), Some(got)) => same(want, got),
            (Condition::In(wants), Some(got)) => wants.iter().any(|w| same(w, got)),
            (Condition::Range { gt, gte, lt, lte }, Some(got)) => got.as_f64().is_some_and(|x| {
                gt.is_none_or(|b| x > b)
                    && gte.is_none_or(|b| x >= b)
                    && lt.is_none_or(|b| x < b)
                    && lte.is_none_or(|b| x <= b)
            }),
        })
    }
}

fn range(field: &str, bounds: &Map<String, Value>) -> Result<Condition, String> {
    if bounds.is_empty() {
        return Err(format!("{field}: a range needs gt, gte, lt or lte"));
    }
    let get = |name: &str| -> Result<Option<f64>, String> {
        match bounds.get(name) {
            None => Ok(None),
            Some(v) => {
                v.as_f64().map(Some).ok_or_else(|| format!("{field}.{name}: must be a number"))
            }
        }
    };
    let condition =
        Condition::Range { gt: get("gt")?, gte: get("gte")?, lt: get("lt")?, lte: get("lte")? };
    if let Some(unknown) = bounds.keys().find(|k| !["gt", "gte", "lt", "lte"].contains(&k.as_str()))
    {
        return Err(format!("{field}.{unknown}: unknown bound (gt, gte, lt, lte)"));
    }
    Ok(condition)
}

/// JSON equality, except that numbers compare by value (`1` equals `1.0`).
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn filter(v: Value) -> Filter {
        Filter::parse(&v).unwrap()
    }

    #[test]
    fn equality_membership_and_ranges_on_top_level_fields() {
        let f = filter(
            json!({"instrument_id": ["A", "B"], "venue": "ICE", "price": {"gte": 10, "lt": 20}}),
        );
        assert!(f.matches(&json!({"instrument_id": "A", "venue": "ICE", "price": 10})));
        assert!(f.matches(&json!({"instrument_id": "B", "venue": "ICE", "price": 19.99})));
        assert!(!f.matches(&json!({"instrument_id": "C", "venue": "ICE", "price": 15})));
        assert!(!f.matches(&json!({"instrument_id": "A", "venue": "CME", "price": 15})));
        assert!(!f.matches(&json!({"instrument_id": "A", "venue": "ICE", "price": 20})));
        assert!(
            !f.matches(&json!({"instrument_id": "A", "venue": "ICE"})),
            "a missing field fails"
        );
        assert!(!f.matches(&json!({"instrument_id": "A", "venue": "ICE", "price": "15"})));
        assert!(!f.matches(&json!("not an object")));
        assert!(filter(json!({})).matches(&json!("anything")));
    }

    #[test]
    fn numbers_compare_by_value() {
        assert!(filter(json!({"n": 1})).matches(&json!({"n": 1.0})));
        assert!(filter(json!({"n": [2, 3]})).matches(&json!({"n": 3.0})));
        assert!(filter(json!({"n": {"gt": 1}})).matches(&json!({"n": 1.5})));
        assert!(!filter(json!({"n": {"gt": 1}})).matches(&json!({"n": 1})));
        assert!(filter(json!({"n": {"lte": 1}})).matches(&json!({"n": 1})));
    }

    #[test]
    fn bad_filters_say_which_field() {
        let err = |v: Value| Filter::parse(&v).unwrap_err();
        assert!(err(json!([1])).contains("object"));
        assert!(err(json!({"p": {"gte": "x"}})).contains("p.gte"));
        assert!(err(json!({"p": {"near": 1}})).contains("p.near"));
        assert!(err(json!({"p": {}})).contains("p:"));
        assert!(err(json!({"p": [[1]]})).contains("scalars"));
        let many: Map<String, Value> = (0..17).map(|i| (format!("f{i}"), json!(1))).collect();
        assert!(err(Value::Object(many)).contains("at most"));
        assert!(err(json!({"p": vec![1; 1001]})).contains("at most"));
    }

    #[test]
    fn the_default_registry_uses_the_subscribe_action() {
        let r = default_registry();
        assert_eq!(r.len(), 3);
        assert!(r.iter().all(|t| t.action == "subscribe"));
        assert_eq!(r[2].resource, "curve");
    }

    #[test]
    fn the_default_registry_checks_prices_per_instrument_and_curves_per_curve() {
        let r = default_registry();
        assert_eq!(r[0].record_resource.as_deref(), Some("instrument:{instrument_id}"));
        assert_eq!(r[2].record_resource.as_deref(), Some("curve:{curve_id}"));
        assert!(r.iter().all(|t| t.record_action == "read"));
    }
}
