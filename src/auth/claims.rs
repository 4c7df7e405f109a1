//! Claim validation and role extraction: pure functions over a verified token's payload.
//!
//! Order of checks (the first failure is the reason): `sub` and `exp` present (`malformed`),
//! `exp` (`expired`), `nbf` and `iat` (`not_yet_valid`), issuer (`wrong_issuer`), audience or
//! `azp` (`wrong_audience`), tenant (`missing_tenant`). All times allow `leeway`.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;

use serde::de::{self, Deserializer, IgnoredAny, SeqAccess, Visitor};
use serde::Deserialize;

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

impl From<&crate::config::AuthConfig> for ClaimRules {
    fn from(auth: &crate::config::AuthConfig) -> Self {
        ClaimRules {
            issuer: auth.issuer.clone(),
            audience: auth.audience.clone(),
            leeway: auth.leeway.as_secs(),
            default_tenant: auth.default_tenant.clone(),
            service_role: auth.service_role.clone(),
        }
    }
}

/// The user-facing view of a token (`user_info` in the verify answer).
#[derive(Debug, Clone, PartialEq, serde::Serialize, utoipa::ToSchema)]
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

/// The claims we read, borrowed from the payload where possible (no map of every claim is
/// built). Unknown claims are skipped. A claim of the wrong type makes the token `malformed`,
/// except role lists, where anything that is not a string is ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Claims<'a> {
    #[serde(borrow)]
    sub: Option<Cow<'a, str>>,
    exp: Option<NumericDate>,
    nbf: Option<NumericDate>,
    iat: Option<NumericDate>,
    #[serde(borrow)]
    iss: Option<Cow<'a, str>>,
    #[serde(borrow)]
    aud: Option<Audience<'a>>,
    #[serde(borrow)]
    azp: Option<Cow<'a, str>>,
    #[serde(borrow)]
    tenant_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    email: Option<Cow<'a, str>>,
    #[serde(borrow)]
    preferred_username: Option<Cow<'a, str>>,
    #[serde(borrow)]
    scope: Option<Cow<'a, str>>,
    roles: StrList,
    realm_access: RoleHolder,
    #[serde(borrow)]
    resource_access: HashMap<Cow<'a, str>, RoleHolder>,
}

impl<'a> Claims<'a> {
    /// Parses a JWT payload; anything that is not a JSON object of the right shape is `malformed`.
    pub fn parse(payload: &'a [u8]) -> Result<Self, Reason> {
        serde_json::from_slice(payload).map_err(|_| Reason::Malformed)
    }
}

/// `aud`: one string or a list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Audience<'a> {
    #[serde(borrow)]
    One(Cow<'a, str>),
    #[serde(borrow)]
    Many(Vec<Cow<'a, str>>),
}

/// A NumericDate: a non-negative number of seconds (fractions are truncated).
#[derive(Debug, Clone, Copy)]
struct NumericDate(u64);

impl<'de> Deserialize<'de> for NumericDate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = f64::deserialize(d)?;
        if v.is_finite() && v >= 0.0 {
            Ok(NumericDate(v as u64))
        } else {
            Err(de::Error::custom("a NumericDate must be a non-negative number"))
        }
    }
}

/// `{"roles": [...]}`, as in `realm_access` and each `resource_access` entry; any other shape
/// counts as no roles.
#[derive(Debug, Default)]
struct RoleHolder(Vec<String>);

impl<'de> Deserialize<'de> for RoleHolder {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RoleHolder;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object with roles")
            }
            fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<RoleHolder, A::Error> {
                let mut roles = Vec::new();
                while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                    if key == "roles" {
                        roles = map.next_value::<StrList>()?.0;
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(RoleHolder(roles))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<RoleHolder, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(RoleHolder::default())
            }
            fn visit_str<E>(self, _: &str) -> Result<RoleHolder, E> {
                Ok(RoleHolder::default())
            }
            fn visit_bool<E>(self, _: bool) -> Result<RoleHolder, E> {
                Ok(RoleHolder::default())
            }
            fn visit_i64<E>(self, _: i64) -> Result<RoleHolder, E> {
                Ok(RoleHolder::default())
            }
            fn visit_u64<E>(self, _: u64) -> Result<RoleHolder, E> {
                Ok(RoleHolder::default())
            }
            fn visit_f64<E>(self, _: f64) -> Result<RoleHolder, E> {
                Ok(RoleHolder::default())
            }
            fn visit_unit<E>(self) -> Result<RoleHolder, E> {
                Ok(RoleHolder::default())
            }
        }
        d.deserialize_any(V)
    }
}

/// A list of strings where anything else (numbers, nulls, objects, a non-list) is ignored.
#[derive(Debug, Default)]
struct StrList(Vec<String>);

impl<'de> Deserialize<'de> for StrList {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        /// One element: a string, or something ignored.
        struct Item(Option<String>);
        impl<'de> Deserialize<'de> for Item {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl<'de> Visitor<'de> for V {
                    type Value = Item;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str("anything")
                    }
                    fn visit_str<E>(self, s: &str) -> Result<Item, E> {
                        Ok(Item(Some(s.to_string())))
                    }
                    fn visit_map<A: de::MapAccess<'de>>(self, mut m: A) -> Result<Item, A::Error> {
                        while m.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                        Ok(Item(None))
                    }
                    fn visit_seq<A: SeqAccess<'de>>(self, mut s: A) -> Result<Item, A::Error> {
                        while s.next_element::<IgnoredAny>()?.is_some() {}
                        Ok(Item(None))
                    }
                    fn visit_bool<E>(self, _: bool) -> Result<Item, E> {
                        Ok(Item(None))
                    }
                    fn visit_i64<E>(self, _: i64) -> Result<Item, E> {
                        Ok(Item(None))
                    }
                    fn visit_u64<E>(self, _: u64) -> Result<Item, E> {
                        Ok(Item(None))
                    }
                    fn visit_f64<E>(self, _: f64) -> Result<Item, E> {
                        Ok(Item(None))
                    }
                    fn visit_unit<E>(self) -> Result<Item, E> {
                        Ok(Item(None))
                    }
                }
                d.deserialize_any(V)
            }
        }
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = StrList;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a list of strings")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<StrList, A::Error> {
                let mut out = Vec::new();
                while let Some(Item(item)) = seq.next_element::<Item>()? {
                    out.extend(item);
                }
                Ok(StrList(out))
            }
            fn visit_map<A: de::MapAccess<'de>>(self, mut m: A) -> Result<StrList, A::Error> {
                while m.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(StrList::default())
            }
            fn visit_str<E>(self, _: &str) -> Result<StrList, E> {
                Ok(StrList::default())
            }
            fn visit_bool<E>(self, _: bool) -> Result<StrList, E> {
                Ok(StrList::default())
            }
            fn visit_i64<E>(self, _: i64) -> Result<StrList, E> {
                Ok(StrList::default())
            }
            fn visit_u64<E>(self, _: u64) -> Result<StrList, E> {
                Ok(StrList::default())
            }
            fn visit_f64<E>(self, _: f64) -> Result<StrList, E> {
                Ok(StrList::default())
            }
            fn visit_unit<E>(self) -> Result<StrList, E> {
                Ok(StrList::default())
            }
        }
        d.deserialize_any(V)
    }
}

/// Validates `claims` at time `now` (unix seconds) and builds the caller's identity.
pub fn validate(
    claims: &Claims<'_>,
    rules: &ClaimRules,
    now: u64,
) -> Result<(Identity, UserInfo), Reason> {
    let subject = claims.sub.as_deref().filter(|s| !s.is_empty()).ok_or(Reason::Malformed)?;
    let exp = claims.exp.ok_or(Reason::Malformed)?.0;
    if now > exp.saturating_add(rules.leeway) {
        return Err(Reason::Expired);
    }
    if claims.nbf.is_some_and(|nbf| nbf.0 > now.saturating_add(rules.leeway)) {
        return Err(Reason::NotYetValid);
    }
    let iat = claims.iat.map(|d| d.0);
    if iat.is_some_and(|iat| iat > now.saturating_add(rules.leeway)) {
        return Err(Reason::NotYetValid);
    }
    if let Some(issuer) = &rules.issuer {
        if claims.iss.as_deref() != Some(issuer.as_str()) {
            return Err(Reason::WrongIssuer);
        }
    }
    if let Some(audience) = &rules.audience {
        let in_aud = match &claims.aud {
            Some(Audience::One(a)) => a == audience,
            Some(Audience::Many(list)) => list.iter().any(|a| a == audience),
            None => false,
        };
        if !in_aud && claims.azp.as_deref() != Some(audience.as_str()) {
            return Err(Reason::WrongAudience);
        }
    }
    let tenant = match claims.tenant_id.as_deref().filter(|t| !t.is_empty()) {
        Some(t) => t.to_string(),
        None => rules.default_tenant.clone().ok_or(Reason::MissingTenant)?,
    };
    let client_roles = rules
        .audience
        .as_deref()
        .and_then(|client| claims.resource_access.get(client))
        .map(|holder| holder.0.clone())
        .unwrap_or_default();
    let mut roles = claims.roles.0.clone();
    roles.extend(claims.realm_access.0.iter().cloned());
    roles.extend(client_roles.iter().cloned());
    roles.sort();
    roles.dedup();
    let scopes = claims
        .scope
        .as_deref()
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
        email: claims.email.as_deref().map(String::from),
        username: claims.preferred_username.as_deref().map(String::from),
        roles,
        client_roles,
        scopes,
        exp,
        iat,
    };
    Ok((identity, info))
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

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

    fn with(patch: Value) -> Vec<u8> {
        let mut claims = good().as_object().unwrap().clone();
        for (k, v) in patch.as_object().unwrap() {
            if v.is_null() {
                claims.remove(k);
            } else {
                claims.insert(k.clone(), v.clone());
            }
        }
        serde_json::to_vec(&claims).unwrap()
    }

    fn check(payload: &[u8], rules: &ClaimRules) -> Result<(Identity, UserInfo), Reason> {
        validate(&Claims::parse(payload)?, rules, NOW)
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
            assert_eq!(check(&with(patch), &rules).unwrap_err(), reason, "{name}");
        }
    }

    #[test]
    fn leeway_is_honoured_both_ways() {
        assert!(check(&with(json!({"exp": NOW - 59})), &rules()).is_ok());
        assert!(check(&with(json!({"nbf": NOW + 59})), &rules()).is_ok());
        let strict = ClaimRules { leeway: 0, ..rules() };
        assert_eq!(check(&with(json!({"exp": NOW - 1})), &strict).unwrap_err(), Reason::Expired);
    }

    #[test]
    fn audience_may_be_a_string_or_azp() {
        assert!(check(&with(json!({"aud": "access"})), &rules()).is_ok());
        assert!(check(&with(json!({"aud": "account", "azp": "access"})), &rules()).is_ok());
        let open = ClaimRules { issuer: None, audience: None, ..rules() };
        assert!(check(&with(json!({"aud": null, "iss": null})), &open).is_ok());
    }

    #[test]
    fn a_default_tenant_admits_tokens_without_one() {
        let r = ClaimRules { default_tenant: Some("t0".into()), ..rules() };
        let (identity, _) = check(&with(json!({"tenant_id": null})), &r).unwrap();
        assert_eq!(identity.tenant, "t0");
    }

    #[test]
    fn roles_come_only_from_our_sources_and_scopes_stay_scopes() {
        let (identity, info) = check(&with(json!({})), &rules()).unwrap();
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
        let (identity, _) = check(&with(json!({"roles": ["service"]})), &rules()).unwrap();
        assert_eq!(identity.kind, IdentityKind::Service);
    }

    #[test]
    fn junk_in_role_lists_is_ignored() {
        let (identity, _) = check(
            &with(json!({"roles": ["a", 1, null, {"x": 1}], "realm_access": {"roles": "x"}})),
            &rules(),
        )
        .unwrap();
        assert_eq!(identity.roles, vec!["a", "analyst"]);
        let (identity, _) =
            check(&with(json!({"realm_access": 7, "resource_access": {"access": []}})), &rules())
                .unwrap();
        assert_eq!(identity.roles, vec!["viewer"]);
    }

    #[test]
    fn payloads_that_are_not_claim_objects_are_malformed() {
        for payload in [&b"[]"[..], b"\"x\"", b"{", b"{\"sub\": 1, \"exp\": 1}", b"{\"aud\": 5}"] {
            assert_eq!(
                check(payload, &rules()).unwrap_err(),
                Reason::Malformed,
                "{}",
                String::from_utf8_lossy(payload)
            );
        }
    }
}
