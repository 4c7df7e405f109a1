//! Claim validation and role extraction: pure functions over a verified token's payload.
//!
//! Order of checks (the first failure is the reason): `sub` and `exp` present (`malformed`),
//! `exp` (`expired`), `nbf` and `iat` (`not_yet_valid`), issuer (`wrong_issuer`), audience or
//! `azp` (`wrong_audience`), tenant (`missing_tenant`). All times allow `leeway`.

use serde_json::{Map, Value};

use super::{Identity, IdentityKind, Reason};

/// What claims must satisfy; built from the `auth` config section.
#[derive(Debug, Clone)]
pub struct ClaimRules {
    /// Exact `iss`; `None` accepts any issuer (dev mode only: production requires it).
    pub issuer: Option<String>,
    /// Our client id: `aud` must contain it, or `azp` must equal it. `None` skips the check.
    pub audience: Option<String>,
    /// Allowed clock skew, seconds.
    pub leeway: u64,
    /// Tenant for tokens without `tenant_id`; `None` refuses them.
    pub default_tenant: Option<String>,
    /// The role marking a service caller.
    pub service_role: String,
}

/// The user-facing view of a token (`user_info` in the verify answer).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct UserInfo {
    /// `sub`.
    pub user_id: String,
    /// The tenant (claim or default).
    pub tenant_id: String,
    /// `email`, when present.
    pub email: Option<String>,
    /// `preferred_username`, when present.
    pub username: Option<String>,
    /// Our roles (realm, `roles` claim and our client's roles).
    pub roles: Vec<String>,
    /// Our client's roles only.
    pub client_roles: Vec<String>,
    /// OAuth scopes: kept apart, never roles.
    pub scopes: Vec<String>,
    /// `exp`.
    pub exp: u64,
    /// `iat`, when present.
    pub iat: Option<u64>,
}

/// Validates `claims` at time `now` (unix seconds) and builds the caller's identity.
pub fn validate(
    claims: &Map<String, Value>,
    rules: &ClaimRules,
    now: u64,
) -> Result<(Identity, UserInfo), Reason> {
    let subject = claims
        .get("sub")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or(Reason::Malformed)?;
    let exp = number(claims, "exp")?.ok_or(Reason::Malformed)?;
    if now > exp.saturating_add(rules.leeway) {
        return Err(Reason::Expired);
    }
    if let Some(nbf) = number(claims, "nbf")? {
        if nbf > now.saturating_add(rules.leeway) {
            return Err(Reason::NotYetValid);
        }
    }
    let iat = number(claims, "iat")?;
    if iat.is_some_and(|iat| iat > now.saturating_add(rules.leeway)) {
        return Err(Reason::NotYetValid);
    }
    if let Some(issuer) = &rules.issuer {
        if claims.get("iss").and_then(Value::as_str) != Some(issuer.as_str()) {
            return Err(Reason::WrongIssuer);
        }
    }
    if let Some(audience) = &rules.audience {
        let in_aud = match claims.get("aud") {
            Some(Value::String(a)) => a == audience,
            Some(Value::Array(list)) => list.iter().any(|a| a.as_str() == Some(audience)),
            _ => false,
        };
        let is_azp = claims.get("azp").and_then(Value::as_str) == Some(audience.as_str());
        if !in_aud && !is_azp {
            return Err(Reason::WrongAudience);
        }
    }
    let tenant = match claims.get("tenant_id").and_then(Value::as_str).filter(|t| !t.is_empty()) {
        Some(t) => t.to_string(),
        None => rules.default_tenant.clone().ok_or(Reason::MissingTenant)?,
    };
    let client_roles = rules
        .audience
        .as_deref()
        .map(|client| {
            strings(
                claims
                    .get("resource_access")
                    .and_then(|r| r.get(client))
                    .and_then(|c| c.get("roles")),
            )
        })
        .unwrap_or_default();
    let mut roles = strings(claims.get("roles"));
    roles.extend(strings(claims.get("realm_access").and_then(|r| r.get("roles"))));
    roles.extend(client_roles.iter().cloned());
    roles.sort();
    roles.dedup();
    let scopes = claims
        .get("scope")
        .and_then(Value::as_str)
        .map(|s| s.split_whitespace().map(String::from).collect())
        .unwrap_or_default();
    let kind = if roles.iter().any(|r| r == &rules.service_role) {
        IdentityKind::Service
    } else {
        IdentityKind::User
    };
    let identity = Identity {
        subject: subject.to_string(),
        tenant: tenant.clone(),
        roles: roles.clone(),
        kind,
        expires_at: exp,
    };
    let info = UserInfo {
        user_id: subject.to_string(),
        tenant_id: tenant,
        email: claims.get("email").and_then(Value::as_str).map(String::from),
        username: claims.get("preferred_username").and_then(Value::as_str).map(String::from),
        roles,
        client_roles,
        scopes,
        exp,
        iat,
    };
    Ok((identity, info))
}

/// A numeric date claim: absent is `None`, present but not a non-negative number is malformed.
fn number(claims: &Map<String, Value>, name: &str) -> Result<Option<u64>, Reason> {
    match claims.get(name) {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .or_else(|| v.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
            .map(Some)
            .ok_or(Reason::Malformed),
    }
}

/// A list of strings; anything else in the list is ignored.
fn strings(value: Option<&Value>) -> Vec<String> {
    match value {
        Some(Value::Array(items)) => {
            items.iter().filter_map(Value::as_str).map(String::from).collect()
        }
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const NOW: u64 = 1_800_000_000;

    fn rules() -> ClaimRules {
        ClaimRules {
            issuer: Some("https://idp/realms/254carbon".into()),
            audience: Some("access".into()),
            leeway: 60,
            default_tenant: None,
            service_role: "service".into(),
        }
    }

    fn good() -> Value {
        json!({
            "sub": "alice", "iss": "https://idp/realms/254carbon", "aud": ["account", "access"],
            "exp": NOW + 300, "iat": NOW - 10, "nbf": NOW - 10, "tenant_id": "t1",
            "email": "alice@example.com", "preferred_username": "alice", "scope": "openid profile",
            "realm_access": {"roles": ["trader"]},
            "resource_access": {"access": {"roles": ["analyst"]}, "other-client": {"roles": ["admin"]}},
            "roles": ["viewer"]
        })
    }

    fn with(patch: Value) -> Map<String, Value> {
        let mut claims = good().as_object().unwrap().clone();
        for (k, v) in patch.as_object().unwrap() {
            if v.is_null() {
                claims.remove(k);
            } else {
                claims.insert(k.clone(), v.clone());
            }
        }
        claims
    }

    #[test]
    fn every_rejection_reason() {
        let table: Vec<(&str, Value, ClaimRules, Reason)> = vec![
            ("no sub", json!({"sub": null}), rules(), Reason::Malformed),
            ("empty sub", json!({"sub": ""}), rules(), Reason::Malformed),
            ("no exp", json!({"exp": null}), rules(), Reason::Malformed),
            ("exp not a number", json!({"exp": "soon"}), rules(), Reason::Malformed),
            ("negative nbf", json!({"nbf": -5}), rules(), Reason::Malformed),
            ("expired past leeway", json!({"exp": NOW - 61}), rules(), Reason::Expired),
            ("nbf in the future", json!({"nbf": NOW + 61}), rules(), Reason::NotYetValid),
            ("iat in the future", json!({"iat": NOW + 120}), rules(), Reason::NotYetValid),
            ("other issuer", json!({"iss": "https://evil"}), rules(), Reason::WrongIssuer),
            ("no issuer", json!({"iss": null}), rules(), Reason::WrongIssuer),
            ("other audience", json!({"aud": "account"}), rules(), Reason::WrongAudience),
            ("no audience", json!({"aud": null}), rules(), Reason::WrongAudience),
            ("no tenant", json!({"tenant_id": null}), rules(), Reason::MissingTenant),
            ("empty tenant", json!({"tenant_id": ""}), rules(), Reason::MissingTenant),
        ];
        for (name, patch, rules, reason) in table {
            assert_eq!(validate(&with(patch), &rules, NOW).unwrap_err(), reason, "{name}");
        }
    }

    #[test]
    fn leeway_is_honoured_both_ways() {
        assert!(validate(&with(json!({"exp": NOW - 59})), &rules(), NOW).is_ok());
        assert!(validate(&with(json!({"nbf": NOW + 59})), &rules(), NOW).is_ok());
        let strict = ClaimRules { leeway: 0, ..rules() };
        assert_eq!(
            validate(&with(json!({"exp": NOW - 1})), &strict, NOW).unwrap_err(),
            Reason::Expired
        );
    }

    #[test]
    fn audience_may_be_a_string_or_azp() {
        assert!(validate(&with(json!({"aud": "access"})), &rules(), NOW).is_ok());
        assert!(validate(&with(json!({"aud": "account", "azp": "access"})), &rules(), NOW).is_ok());
        let open = ClaimRules { issuer: None, audience: None, ..rules() };
        assert!(validate(&with(json!({"aud": null, "iss": null})), &open, NOW).is_ok());
    }

    #[test]
    fn a_default_tenant_admits_tokens_without_one() {
        let r = ClaimRules { default_tenant: Some("t0".into()), ..rules() };
        let (identity, _) = validate(&with(json!({"tenant_id": null})), &r, NOW).unwrap();
        assert_eq!(identity.tenant, "t0");
    }

    #[test]
    fn roles_come_only_from_our_sources_and_scopes_stay_scopes() {
        let (identity, info) = validate(&with(json!({})), &rules(), NOW).unwrap();
        assert_eq!(identity.roles, vec!["analyst", "trader", "viewer"]);
        assert!(
            !identity.roles.contains(&"admin".to_string()),
            "another client's admin role is not ours"
        );
        assert!(!identity.roles.contains(&"openid".to_string()), "scopes are not roles");
        assert_eq!(info.client_roles, vec!["analyst"]);
        assert_eq!(info.scopes, vec!["openid", "profile"]);
        assert_eq!(identity.kind, IdentityKind::User);
        assert_eq!(identity.subject, "alice");
        assert_eq!(identity.tenant, "t1");
        assert_eq!(identity.expires_at, NOW + 300);
        assert_eq!(info.email.as_deref(), Some("alice@example.com"));
    }

    #[test]
    fn the_service_role_makes_a_service_identity() {
        let (identity, _) = validate(&with(json!({"roles": ["service"]})), &rules(), NOW).unwrap();
        assert_eq!(identity.kind, IdentityKind::Service);
    }

    #[test]
    fn junk_in_role_lists_is_ignored() {
        let (identity, _) = validate(
            &with(json!({"roles": ["a", 1, null], "realm_access": {"roles": "x"}})),
            &rules(),
            NOW,
        )
        .unwrap();
        assert_eq!(identity.roles, vec!["a", "analyst"]);
    }
}
