//! Resource templates: how an entitlement resource is named from data, shared by every role
//! that checks entitlements per item: the stream (a topic's `record_resource`, rendered from
//! each record) and the gateway (a route's `entitlement.items.resource`, rendered from each item
//! of a list response).

use serde_json::Value;

/// A resource template: literal text and `{field}` references to a JSON object's top-level
/// fields (`instrument:{instrument_id}`), or `{.}` for the value itself (an item of a list of
/// ids). A field renders as its string, or its number's text; a value without it (or with
/// another kind of value there) has no resource, and so is readable by no one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Field(String),
}

impl Template {
    /// Parses a template; the error says what is wrong.
    pub fn parse(text: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            match rest.find(['{', '}']) {
                None => {
                    parts.push(Part::Text(rest.to_string()));
                    break;
                }
                Some(i) if rest.as_bytes()[i] == b'}' => {
                    return Err(format!("unmatched '}}' in {text:?}"));
                }
                Some(i) => {
                    if i > 0 {
                        parts.push(Part::Text(rest[..i].to_string()));
                    }
                    let after = &rest[i + 1..];
                    let end =
                        after.find('}').ok_or_else(|| format!("unclosed '{{' in {text:?}"))?;
                    let field = &after[..end];
                    if field.is_empty() || field.contains('{') {
                        return Err(format!("a field name is needed between braces in {text:?}"));
                    }
                    parts.push(Part::Field(field.to_string()));
                    rest = &after[end + 1..];
                }
            }
        }
        if parts.is_empty() {
            return Err("must not be empty".into());
        }
        Ok(Template { parts })
    }

    /// The resource of `data`, or `None` when a field it names is missing or not a string or
    /// number.
    pub fn render(&self, data: &Value) -> Option<String> {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Field(f) => {
                    let value = if f == "." { data } else { data.get(f)? };
                    match value {
                        Value::String(s) => out.push_str(s),
                        Value::Number(n) => out.push_str(&n.to_string()),
                        _ => return None,
                    }
                }
            }
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn templates_render_top_level_fields() {
        let t = Template::parse("instrument:{instrument_id}").unwrap();
        assert_eq!(
            t.render(&json!({"instrument_id": "BRN-F27"})).as_deref(),
            Some("instrument:BRN-F27")
        );
        assert_eq!(t.render(&json!({"instrument_id": 7})).as_deref(), Some("instrument:7"));
        assert_eq!(t.render(&json!({"instrument_id": null})), None);
        assert_eq!(t.render(&json!({"other": "x"})), None);
        assert_eq!(t.render(&json!("not an object")), None);
        let two = Template::parse("{venue}/{id}!").unwrap();
        assert_eq!(two.render(&json!({"venue": "ICE", "id": "B"})).as_deref(), Some("ICE/B!"));
        assert_eq!(Template::parse("fixed").unwrap().render(&json!({})).as_deref(), Some("fixed"));
        let id = Template::parse("curve:{.}").unwrap();
        assert_eq!(id.render(&json!("NG-HH")).as_deref(), Some("curve:NG-HH"));
        assert_eq!(id.render(&json!({"id": "x"})), None);
        for bad in ["", "a{", "a}", "{}", "x:{a{b}"] {
            assert!(Template::parse(bad).is_err(), "{bad:?}");
        }
    }
}
