//! Rules: their shape, their validation (every problem names its field) and resource globs.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::error::ApiError;

/// The actions of `docs/contracts.md`; `*` in a rule means all of them.
pub const ACTIONS: &[&str] = &["read", "write", "delete", "admin", "subscribe"];

/// Allow or deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Effect {
    /// Grants the action.
    Allow,
    /// Refuses the action (beats an allow at the same priority).
    Deny,
}

/// Condition operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Operator {
    /// JSON equality.
    Equals,
    /// JSON inequality.
    NotEquals,
    /// The field (or, for a list field, any element) is in the value list.
    In,
    /// The field (or, for a list field, every element) is not in the value list.
    NotIn,
    /// Number greater than the value.
    GreaterThan,
    /// Number less than the value.
    LessThan,
    /// List membership (list field) or substring (string field).
    Contains,
    /// String prefix.
    StartsWith,
    /// String suffix.
    EndsWith,
    /// The field is present (value `true`, the default) or absent (`false`).
    Exists,
}

/// One condition; all of a rule's must hold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Condition {
    /// `user_id`, `tenant_id`, `roles`, `resource`, `action` or `context.<path>`.
    pub field: String,
    /// The comparison.
    pub operator: Operator,
    /// The operand (default `true`): a string, number, boolean, or a list of them for `in` and
    /// `not_in`. A string `"$tenant_id"` (or another field name after `$`) refers to that field
    /// of the request.
    #[serde(default = "default_value")]
    #[schema(value_type = Operand)]
    pub value: Value,
}

/// A condition's operand as the API documents it (the field is any JSON value; these are the
/// ones the operators compare).
#[derive(utoipa::ToSchema)]
#[serde(untagged)]
#[allow(dead_code)]
enum Operand {
    /// A string (or a `$field` reference).
    Text(String),
    /// A number.
    Number(f64),
    /// A boolean (`exists`).
    Flag(bool),
    /// A list (`in`, `not_in`).
    List(Vec<Scalar>),
}

/// One element of a list operand.
#[derive(utoipa::ToSchema)]
#[serde(untagged)]
#[allow(dead_code)]
enum Scalar {
    /// A string.
    Text(String),
    /// A number.
    Number(f64),
    /// A boolean.
    Flag(bool),
}

fn default_value() -> Value {
    Value::Bool(true)
}

/// What a client sends to create or replace a rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[schema(example = json!({"name": "traders read NG", "effect": "allow", "resource": "instrument:NG-*", "actions": ["read"], "tenant_id": "t1", "roles": ["trader"], "priority": 10}))]
#[serde(deny_unknown_fields)]
pub struct RuleInput {
    /// A short name.
    pub name: String,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// Allow or deny.
    pub effect: Effect,
    /// Resource glob (`market_data`, `curve:*`, `instrument:EURUSD`).
    pub resource: String,
    /// Actions, or `["*"]`.
    pub actions: Vec<String>,
    /// Only this tenant; unset means any.
    #[serde(default)]
    pub tenant_id: Option<String>,
    /// Only this user; unset means any.
    #[serde(default)]
    pub user_id: Option<String>,
    /// Any of these roles; empty means any.
    #[serde(default)]
    pub roles: Vec<String>,
    /// All must hold.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Higher decides first.
    #[serde(default)]
    pub priority: i32,
    /// Disabled rules are kept but never apply.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// After this instant (UTC) the rule no longer applies.
    #[serde(default)]
    pub expires_at: Option<DateTime<Utc>>,
    /// For `PUT`: the version being replaced (or `If-Match`). Never written back.
    #[serde(default, skip_serializing_if = "request_only")]
    pub version: Option<i64>,
}

/// `RuleInput::version` is read from requests and never written (`skip_serializing`, spelled
/// so that the API document still lists it for `PUT`).
fn request_only(_: &Option<i64>) -> bool {
    true
}

fn yes() -> bool {
    true
}

/// A stored rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rule {
    /// Server-generated.
    pub id: Uuid,
    /// The rule's content.
    #[serde(flatten)]
    pub input: RuleInput,
    /// When created.
    pub created_at: DateTime<Utc>,
    /// When last changed.
    pub updated_at: DateTime<Utc>,
    /// Bumped by every change; `PUT` and `DELETE` must name the current one.
    pub version: i64,
}

/// The fields a stored rule has beside its [`RuleInput`] (the schema of [`Rule`]'s own part).
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
struct Stored {
    /// Server-generated.
    id: Uuid,
    /// When created.
    created_at: DateTime<Utc>,
    /// When last changed.
    updated_at: DateTime<Utc>,
    /// Bumped by every change; `PUT` and `DELETE` must name the current one (its `ETag`).
    version: i64,
}

impl utoipa::PartialSchema for Rule {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        crate::server::openapi::flattened(
            <RuleInput as utoipa::PartialSchema>::schema(),
            <Stored as utoipa::PartialSchema>::schema(),
        )
    }
}

impl utoipa::ToSchema for Rule {
    fn schemas(
        schemas: &mut Vec<(String, utoipa::openapi::RefOr<utoipa::openapi::schema::Schema>)>,
    ) {
        <RuleInput as utoipa::ToSchema>::schemas(schemas);
    }
}

impl RuleInput {
    /// Checks every field; the first problem found is returned as 422 naming its field.
    pub fn validate(&self) -> Result<(), ApiError> {
        if self.name.trim().is_empty() || self.name.len() > 200 {
            return Err(ApiError::validation("name", "name must be 1 to 200 characters"));
        }
        validate_glob(&self.resource).map_err(|m| ApiError::validation("resource", m))?;
        if self.actions.is_empty() {
            return Err(ApiError::validation("actions", "at least one action (or \"*\")"));
        }
        for (i, action) in self.actions.iter().enumerate() {
            if action != "*" && !ACTIONS.contains(&action.as_str()) {
                return Err(ApiError::validation(
                    format!("actions[{i}]"),
                    format!("unknown action {action:?}; one of {} or *", ACTIONS.join(", ")),
                ));
            }
        }
        for (key, value) in [("tenant_id", &self.tenant_id), ("user_id", &self.user_id)] {
            if value.as_deref().is_some_and(|v| v.is_empty()) {
                return Err(ApiError::validation(key, "must not be empty (omit it to mean any)"));
            }
        }
        for (i, c) in self.conditions.iter().enumerate() {
            validate_condition(c).map_err(|(field, m)| {
                ApiError::validation(format!("conditions[{i}].{field}"), m)
            })?;
        }
        Ok(())
    }
}

fn validate_condition(c: &Condition) -> Result<(), (&'static str, String)> {
    let known = ["user_id", "tenant_id", "roles", "resource", "action"].contains(&c.field.as_str())
        || c.field
            .strip_prefix("context.")
            .is_some_and(|p| !p.is_empty() && p.split('.').all(|s| !s.is_empty()));
    if !known {
        return Err((
            "field",
            format!(
                "{:?} is not user_id, tenant_id, roles, resource, action or context.<path>",
                c.field
            ),
        ));
    }
    let ok = match c.operator {
        Operator::Equals | Operator::NotEquals | Operator::Contains => !c.value.is_null(),
        Operator::In | Operator::NotIn => c.value.is_array(),
        Operator::GreaterThan | Operator::LessThan => c.value.is_number(),
        Operator::StartsWith | Operator::EndsWith => c.value.is_string(),
        Operator::Exists => c.value.is_boolean(),
    };
    if !ok {
        let wanted = match c.operator {
            Operator::In | Operator::NotIn => "a list",
            Operator::GreaterThan | Operator::LessThan => "a number",
            Operator::StartsWith | Operator::EndsWith => "a string",
            Operator::Exists => "true or false",
            _ => "a value",
        };
        return Err(("value", format!("{:?} needs {wanted}", c.operator)));
    }
    Ok(())
}

/// A resource glob: 1 to 256 printable characters without spaces; `*` matches any run of
/// characters (`:` included); `**` is refused as meaningless.
pub fn validate_glob(glob: &str) -> Result<(), String> {
    if glob.is_empty() || glob.len() > 256 {
        return Err("resource must be 1 to 256 characters".into());
    }
    if glob.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("resource must not contain spaces or control characters".into());
    }
    if glob.contains("**") {
        return Err("\"**\" is not a valid glob; use \"*\"".into());
    }
    Ok(())
}

/// Whether `resource` matches `glob` (`*` matches any run of characters).
pub fn glob_matches(glob: &str, resource: &str) -> bool {
    let mut parts = glob.split('*');
    let first = parts.next().unwrap_or_default();
    let Some(mut rest) = resource.strip_prefix(first) else { return false };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else { return rest.is_empty() };
    for part in middle {
        match rest.find(part) {
            Some(i) => rest = &rest[i + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

/// The literal text before a glob's first `*` (the whole string for an exact resource).
pub fn literal_prefix(glob: &str) -> &str {
    glob.split('*').next().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_as_documented() {
        let table = [
            ("market_data", "market_data", true),
            ("market_data", "market_data2", false),
            ("curve:*", "curve:EUR", true),
            ("curve:*", "curve:", true),
            ("curve:*", "curves:EUR", false),
            ("*", "anything:at:all", true),
            ("instrument:*USD", "instrument:EURUSD", true),
            ("instrument:*USD", "instrument:USDJPY", false),
            ("a*b*c", "aXbYc", true),
            ("a*b*c", "acb", false),
            ("a*a", "a", false),
            ("*:*", "topic:x", true),
        ];
        for (glob, resource, expected) in table {
            assert_eq!(glob_matches(glob, resource), expected, "{glob} vs {resource}");
        }
    }

    #[test]
    fn bad_globs_are_refused() {
        for bad in ["", "a b", "curve:**", &"x".repeat(300)] {
            assert!(validate_glob(bad).is_err(), "{bad:?}");
        }
    }

    fn input() -> RuleInput {
        serde_json::from_value(serde_json::json!({
            "name": "r", "effect": "allow", "resource": "curve:*", "actions": ["read"]
        }))
        .unwrap()
    }

    #[test]
    fn validation_names_the_field() {
        let mut r = input();
        r.actions = vec!["fly".into()];
        assert_eq!(field_of(r.validate()), "actions[0]");
        let mut r = input();
        r.resource = "a**".into();
        assert_eq!(field_of(r.validate()), "resource");
        let mut r = input();
        r.conditions =
            vec![Condition { field: "context.x".into(), operator: Operator::In, value: 3.into() }];
        assert_eq!(field_of(r.validate()), "conditions[0].value");
        let mut r = input();
        r.conditions = vec![Condition {
            field: "password".into(),
            operator: Operator::Exists,
            value: true.into(),
        }];
        assert_eq!(field_of(r.validate()), "conditions[0].field");
        assert!(input().validate().is_ok());
        let unknown_operator = serde_json::from_value::<Condition>(
            serde_json::json!({"field": "roles", "operator": "resembles", "value": 1}),
        );
        assert!(unknown_operator.is_err());
    }

    fn field_of(r: Result<(), ApiError>) -> String {
        use axum::response::IntoResponse;
        let response = r.unwrap_err().into_response();
        assert_eq!(response.status(), 422);
        let body =
            futures::executor::block_on(http_body_util::BodyExt::collect(response.into_body()))
                .unwrap()
                .to_bytes();
        serde_json::from_slice::<Value>(&body).unwrap()["field"].as_str().unwrap().to_string()
    }
}
