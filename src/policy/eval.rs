//! Rule evaluation over an immutable snapshot (documented in `docs/entitlements.md`).
//!
//! 1. Default deny.
//! 2. A rule applies when it is enabled, not expired, its resource glob matches, its actions
//!    include the action (or `*`), its subject scope matches (tenant, user, any of its roles; each
//!    unset means any) and all its conditions hold.
//! 3. Among applicable rules the highest priority decides; at equal priority a deny beats an
//!    allow; the deciding rule reported is the one with the smallest id, so the answer is the same
//!    on every replica.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use super::rules::{glob_matches, literal_prefix, Effect, Operator, Rule};

/// "May this subject do this action on this resource?"
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"user_id": "alice", "tenant_id": "t1", "roles": ["trader"], "resource": "instrument:NG-H27", "action": "read", "context": {}}))]
pub struct CheckRequest {
    /// The subject.
    pub user_id: String,
    /// The subject's tenant.
    pub tenant_id: String,
    /// The subject's roles.
    #[serde(default)]
    pub roles: Vec<String>,
    /// The resource (`instrument:EURUSD`).
    pub resource: String,
    /// The action (`read`).
    pub action: String,
    /// Anything else conditions may test (`context.<path>`): a free-form JSON object.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub context: Value,
}

/// Why a decision was reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[schema(as = DecisionReason)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// An allow rule decided.
    AllowedByRule,
    /// A deny rule decided.
    DeniedByRule,
    /// No rule applied.
    DefaultDeny,
}

/// The outcome of evaluating one request against one snapshot.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Outcome {
    /// Whether the action is allowed.
    pub allowed: bool,
    /// Why.
    pub reason: Reason,
    /// The deciding rule, if any.
    pub rule_id: Option<Uuid>,
}

/// All enabled rules at one rules version, indexed for lookup by resource.
pub struct Snapshot {
    version: i64,
    /// Rules whose resource has no `*`, by resource.
    exact: HashMap<String, Vec<Arc<Rule>>>,
    /// Rules with a glob, checked by literal prefix first.
    globs: Vec<Arc<Rule>>,
    /// Every rule (disabled ones too), by id, for the rules API.
    all: Vec<Arc<Rule>>,
    /// When enabled rules expire, sorted: a decision remembered at this version holds until the
    /// next of these.
    expiries: Vec<DateTime<Utc>>,
    loaded_at: DateTime<Utc>,
}

impl Snapshot {
    /// Indexes `rules` as rules version `version`.
    pub fn new(mut rules: Vec<Rule>, version: i64) -> Self {
        rules.sort_by_key(|r| r.id);
        let all: Vec<Arc<Rule>> = rules.into_iter().map(Arc::new).collect();
        let mut exact: HashMap<String, Vec<Arc<Rule>>> = HashMap::new();
        let mut globs = Vec::new();
        for rule in all.iter().filter(|r| r.input.enabled) {
            if rule.input.resource.contains('*') {
                globs.push(rule.clone());
            } else {
                exact.entry(rule.input.resource.clone()).or_default().push(rule.clone());
            }
        }
        let mut expiries: Vec<DateTime<Utc>> =
            all.iter().filter(|r| r.input.enabled).filter_map(|r| r.input.expires_at).collect();
        expiries.sort();
        Snapshot { version, exact, globs, all, expiries, loaded_at: Utc::now() }
    }

    /// The first instant after `now` at which a rule expires: decisions made now may change
    /// then, without a new version.
    pub fn next_expiry(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let i = self.expiries.partition_point(|at| *at <= now);
        self.expiries.get(i).copied()
    }

    /// The rules version.
    pub fn version(&self) -> i64 {
        self.version
    }

    /// When this snapshot was built.
    pub fn loaded_at(&self) -> DateTime<Utc> {
        self.loaded_at
    }

    /// Every rule, ordered by id.
    pub fn rules(&self) -> &[Arc<Rule>] {
        &self.all
    }

    /// A rule by id.
    pub fn get(&self, id: Uuid) -> Option<&Arc<Rule>> {
        self.all.binary_search_by_key(&id, |r| r.id).ok().map(|i| &self.all[i])
    }

    /// Evaluates `req` at instant `now`.
    pub fn evaluate(&self, req: &CheckRequest, now: DateTime<Utc>) -> Outcome {
        let exact = self.exact.get(&req.resource).map(Vec::as_slice).unwrap_or_default();
        let globs = self.globs.iter().filter(|r| {
            req.resource.starts_with(literal_prefix(&r.input.resource))
                && glob_matches(&r.input.resource, &req.resource)
        });
        // (priority, is deny, id) of the best rule so far: higher priority, then deny, then the
        // smaller id wins.
        let mut best: Option<(i32, bool, Uuid)> = None;
        for rule in exact.iter().chain(globs) {
            if !applies(rule, req, now) {
                continue;
            }
            let candidate = (rule.input.priority, rule.input.effect == Effect::Deny, rule.id);
            best = Some(match best {
                None => candidate,
                Some(b) if (candidate.0, candidate.1) > (b.0, b.1) => candidate,
                Some(b) if (candidate.0, candidate.1) == (b.0, b.1) && candidate.2 < b.2 => {
                    candidate
                }
                Some(b) => b,
            });
        }
        match best {
            None => Outcome { allowed: false, reason: Reason::DefaultDeny, rule_id: None },
            Some((_, true, id)) => {
                Outcome { allowed: false, reason: Reason::DeniedByRule, rule_id: Some(id) }
            }
            Some((_, false, id)) => {
                Outcome { allowed: true, reason: Reason::AllowedByRule, rule_id: Some(id) }
            }
        }
    }
}

/// Why a rule whose resource glob matches did or did not take part in a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Standing {
    /// It applied and decided.
    Decided,
    /// It applied and lost (lower priority, an allow beside a deny, or a larger id).
    Lost,
    /// Disabled.
    Disabled,
    /// Past its `expires_at`.
    Expired,
    /// Its actions do not include the action.
    OtherAction,
    /// It names another tenant.
    OtherTenant,
    /// It names another user.
    OtherUser,
    /// The subject has none of its roles.
    NoMatchingRole,
    /// A condition does not hold (the first one, by index, is named).
    ConditionFailed,
}

/// One rule's part in an explained decision.
#[derive(Debug, Clone)]
pub struct Considered {
    /// The rule.
    pub rule: Arc<Rule>,
    /// Its standing.
    pub standing: Standing,
    /// For `ConditionFailed`: the index of the first condition that does not hold.
    pub condition: Option<usize>,
}

impl Snapshot {
    /// Evaluates `req` as [`Snapshot::evaluate`] does, and says what every rule whose resource
    /// glob matches (disabled ones included) did: decided, applied and lost, or why it did not
    /// apply. The outcome is `evaluate`'s, so an explanation never disagrees with a check.
    pub fn explain(&self, req: &CheckRequest, now: DateTime<Utc>) -> (Outcome, Vec<Considered>) {
        let outcome = self.evaluate(req, now);
        let mut considered: Vec<Considered> = self
            .all
            .iter()
            .filter(|r| glob_matches(&r.input.resource, &req.resource))
            .map(|rule| {
                let (standing, condition) = standing(rule, req, now);
                let standing = match standing {
                    Standing::Decided if outcome.rule_id == Some(rule.id) => Standing::Decided,
                    Standing::Decided => Standing::Lost,
                    other => other,
                };
                Considered { rule: rule.clone(), standing, condition }
            })
            .collect();
        // The decider first, then the losers by what would have decided next, then the rest.
        let rank = |c: &Considered| match c.standing {
            Standing::Decided => 0,
            Standing::Lost => 1,
            _ => 2,
        };
        considered.sort_by(|a, b| {
            rank(a).cmp(&rank(b)).then_with(|| {
                let key = |c: &Considered| {
                    (
                        std::cmp::Reverse(c.rule.input.priority),
                        c.rule.input.effect != Effect::Deny,
                        c.rule.id,
                    )
                };
                key(a).cmp(&key(b))
            })
        });
        (outcome, considered)
    }
}

/// Whether a rule applies to `req` (`Decided`) or the first reason it does not, in the order
/// `applies` tests them.
fn standing(rule: &Rule, req: &CheckRequest, now: DateTime<Utc>) -> (Standing, Option<usize>) {
    let r = &rule.input;
    if !r.enabled {
        return (Standing::Disabled, None);
    }
    if r.expires_at.is_some_and(|at| at <= now) {
        return (Standing::Expired, None);
    }
    if !r.actions.iter().any(|a| a == "*" || *a == req.action) {
        return (Standing::OtherAction, None);
    }
    if r.tenant_id.as_deref().is_some_and(|t| t != req.tenant_id) {
        return (Standing::OtherTenant, None);
    }
    if r.user_id.as_deref().is_some_and(|u| u != req.user_id) {
        return (Standing::OtherUser, None);
    }
    if !(r.roles.is_empty() || r.roles.iter().any(|role| req.roles.contains(role))) {
        return (Standing::NoMatchingRole, None);
    }
    match r.conditions.iter().position(|c| !condition_holds(c.operator, &c.field, &c.value, req)) {
        Some(i) => (Standing::ConditionFailed, Some(i)),
        None => (Standing::Decided, None),
    }
}

fn applies(rule: &Rule, req: &CheckRequest, now: DateTime<Utc>) -> bool {
    let r = &rule.input;
    r.enabled
        && r.expires_at.is_none_or(|at| at > now)
        && r.actions.iter().any(|a| a == "*" || *a == req.action)
        && r.tenant_id.as_deref().is_none_or(|t| t == req.tenant_id)
        && r.user_id.as_deref().is_none_or(|u| u == req.user_id)
        && (r.roles.is_empty() || r.roles.iter().any(|role| req.roles.contains(role)))
        && r.conditions.iter().all(|c| condition_holds(c.operator, &c.field, &c.value, req))
}

/// The value of a request field (`context.a.b` walks the context object).
fn field<'a>(req: &'a CheckRequest, name: &str) -> Option<Cow<'a, Value>> {
    match name {
        "user_id" => Some(Cow::Owned(Value::String(req.user_id.clone()))),
        "tenant_id" => Some(Cow::Owned(Value::String(req.tenant_id.clone()))),
        "resource" => Some(Cow::Owned(Value::String(req.resource.clone()))),
        "action" => Some(Cow::Owned(Value::String(req.action.clone()))),
        "roles" => {
            Some(Cow::Owned(Value::Array(req.roles.iter().cloned().map(Value::String).collect())))
        }
        other => {
            let path = other.strip_prefix("context.")?;
            let mut v = &req.context;
            for key in path.split('.') {
                v = v.get(key)?;
            }
            Some(Cow::Borrowed(v))
        }
    }
}

fn condition_holds(op: Operator, name: &str, operand: &Value, req: &CheckRequest) -> bool {
    let actual = field(req, name);
    if op == Operator::Exists {
        return actual.is_some() == operand.as_bool().unwrap_or(true);
    }
    let Some(actual) = actual else { return false };
    // "$field" refers to another field of the request.
    let operand: Cow<'_, Value> = match operand.as_str().and_then(|s| s.strip_prefix('$')) {
        Some(reference) => match field(req, reference) {
            Some(v) => v,
            None => return false,
        },
        None => Cow::Borrowed(operand),
    };
    let (actual, operand) = (actual.as_ref(), operand.as_ref());
    match op {
        Operator::Equals => actual == operand,
        Operator::NotEquals => actual != operand,
        Operator::In | Operator::NotIn => {
            let Some(list) = operand.as_array() else { return false };
            let found = match actual {
                Value::Array(items) => items.iter().any(|i| list.contains(i)),
                scalar => list.contains(scalar),
            };
            found == (op == Operator::In)
        }
        Operator::GreaterThan => compare(actual, operand).is_some_and(|o| o.is_gt()),
        Operator::LessThan => compare(actual, operand).is_some_and(|o| o.is_lt()),
        Operator::Contains => match (actual, operand) {
            (Value::Array(items), v) => items.contains(v),
            (Value::String(s), Value::String(sub)) => s.contains(sub.as_str()),
            _ => false,
        },
        Operator::StartsWith => {
            matches!((actual, operand), (Value::String(s), Value::String(p)) if s.starts_with(p.as_str()))
        }
        Operator::EndsWith => {
            matches!((actual, operand), (Value::String(s), Value::String(p)) if s.ends_with(p.as_str()))
        }
        Operator::Exists => unreachable!("handled above"),
    }
}

fn compare(a: &Value, b: &Value) -> Option<std::cmp::Ordering> {
    a.as_f64()?.partial_cmp(&b.as_f64()?)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::policy::rules::RuleInput;

    fn rule(n: u128, body: Value) -> Rule {
        let mut input =
            json!({"name": format!("r{n}"), "effect": "allow", "resource": "*", "actions": ["*"]});
        for (k, v) in body.as_object().unwrap() {
            input[k] = v.clone();
        }
        let input: RuleInput = serde_json::from_value(input).unwrap();
        input.validate().unwrap();
        Rule {
            id: Uuid::from_u128(n),
            input,
            created_at: Utc::now(),
            updated_at: Utc::now(),
            version: 1,
        }
    }

    fn req(patch: Value) -> CheckRequest {
        let mut r = json!({"user_id": "alice", "tenant_id": "t1", "roles": ["trader"], "resource": "instrument:EURUSD",
            "action": "read", "context": {"desk": "fx", "size": 10, "tenant_id": "t1", "tags": ["a", "b"]}});
        for (k, v) in patch.as_object().unwrap() {
            r[k] = v.clone();
        }
        serde_json::from_value(r).unwrap()
    }

    fn decide(rules: Vec<Rule>, r: &CheckRequest) -> Outcome {
        Snapshot::new(rules, 1).evaluate(r, Utc::now())
    }

    #[test]
    fn explain_names_the_decider_the_losers_and_why_the_rest_did_not_apply() {
        let rules = vec![
            rule(1, json!({"resource": "instrument:*", "priority": 10})),
            rule(2, json!({"resource": "instrument:EURUSD", "effect": "deny", "priority": 50})),
            rule(3, json!({"resource": "instrument:*", "actions": ["write"]})),
            rule(4, json!({"resource": "instrument:*", "tenant_id": "t2"})),
            rule(5, json!({"resource": "instrument:*", "enabled": false})),
            rule(6, json!({"resource": "instrument:*", "roles": ["quant"]})),
            rule(
                7,
                json!({"resource": "instrument:*", "conditions": [
                {"field": "context.desk", "operator": "equals", "value": "fx"},
                {"field": "context.size", "operator": "greater_than", "value": 100}]}),
            ),
            rule(8, json!({"resource": "curve:*"})),
        ];
        let snap = Snapshot::new(rules, 7);
        let r = req(json!({}));
        let (outcome, considered) = snap.explain(&r, Utc::now());
        assert_eq!(outcome, snap.evaluate(&r, Utc::now()));
        assert_eq!(outcome.rule_id, Some(Uuid::from_u128(2)));
        let standing: Vec<(u128, Standing)> =
            considered.iter().map(|c| (c.rule.id.as_u128(), c.standing)).collect();
        assert_eq!(standing[0], (2, Standing::Decided));
        assert_eq!(standing[1], (1, Standing::Lost));
        let of = |n: u128| considered.iter().find(|c| c.rule.id.as_u128() == n).unwrap();
        assert_eq!(of(3).standing, Standing::OtherAction);
        assert_eq!(of(4).standing, Standing::OtherTenant);
        assert_eq!(of(5).standing, Standing::Disabled);
        assert_eq!(of(6).standing, Standing::NoMatchingRole);
        assert_eq!((of(7).standing, of(7).condition), (Standing::ConditionFailed, Some(1)));
        assert!(considered.iter().all(|c| c.rule.id.as_u128() != 8), "another resource");
    }

    #[test]
    fn the_next_expiry_is_the_first_after_now_among_enabled_rules() {
        let now = Utc::now();
        let at = |s: i64| (now + chrono::Duration::seconds(s)).to_rfc3339();
        let snap = Snapshot::new(
            vec![
                rule(1, json!({"expires_at": at(-5)})),
                rule(2, json!({"expires_at": at(30)})),
                rule(3, json!({"expires_at": at(10), "enabled": false})),
                rule(4, json!({"expires_at": at(20)})),
            ],
            1,
        );
        let next = snap.next_expiry(now).unwrap();
        assert!((next - now).num_seconds() >= 19 && (next - now).num_seconds() <= 20);
        assert_eq!(Snapshot::new(vec![], 1).next_expiry(now), None);
    }

    #[test]
    fn default_deny() {
        let o = decide(vec![], &req(json!({})));
        assert_eq!(o, Outcome { allowed: false, reason: Reason::DefaultDeny, rule_id: None });
        let o = decide(vec![rule(1, json!({"resource": "curve"}))], &req(json!({})));
        assert!(!o.allowed);
    }

    #[test]
    fn highest_priority_decides_and_deny_wins_ties() {
        let allow_hi = rule(1, json!({"priority": 10}));
        let deny_lo = rule(2, json!({"priority": 5, "effect": "deny"}));
        let o = decide(vec![allow_hi.clone(), deny_lo.clone()], &req(json!({})));
        assert_eq!((o.allowed, o.rule_id), (true, Some(Uuid::from_u128(1))));
        let deny_same = rule(3, json!({"priority": 10, "effect": "deny"}));
        let o = decide(vec![allow_hi, deny_lo, deny_same], &req(json!({})));
        assert_eq!(
            (o.allowed, o.reason, o.rule_id),
            (false, Reason::DeniedByRule, Some(Uuid::from_u128(3)))
        );
    }

    #[test]
    fn ties_report_the_smallest_id_whatever_the_order() {
        let a = rule(7, json!({}));
        let b = rule(4, json!({}));
        assert_eq!(
            decide(vec![a.clone(), b.clone()], &req(json!({}))).rule_id,
            Some(Uuid::from_u128(4))
        );
        assert_eq!(decide(vec![b, a], &req(json!({}))).rule_id, Some(Uuid::from_u128(4)));
    }

    #[test]
    fn globs_actions_and_subject_scope() {
        let rules = vec![rule(
            1,
            json!({"resource": "instrument:*", "actions": ["read"], "tenant_id": "t1", "roles": ["trader", "analyst"]}),
        )];
        assert!(decide(rules.clone(), &req(json!({}))).allowed);
        assert!(!decide(rules.clone(), &req(json!({"action": "write"}))).allowed, "action");
        assert!(!decide(rules.clone(), &req(json!({"tenant_id": "t2"}))).allowed, "tenant scope");
        assert!(!decide(rules.clone(), &req(json!({"roles": ["viewer"]}))).allowed, "roles any-of");
        assert!(!decide(rules.clone(), &req(json!({"resource": "curve:EUR"}))).allowed, "glob");
        let user = vec![rule(1, json!({"user_id": "bob"}))];
        assert!(!decide(user.clone(), &req(json!({}))).allowed);
        assert!(decide(user, &req(json!({"user_id": "bob"}))).allowed);
    }

    #[test]
    fn disabled_and_expired_rules_never_apply() {
        assert!(!decide(vec![rule(1, json!({"enabled": false}))], &req(json!({}))).allowed);
        let past = (Utc::now() - chrono::Duration::seconds(1)).to_rfc3339();
        let future = (Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
        assert!(!decide(vec![rule(1, json!({"expires_at": past}))], &req(json!({}))).allowed);
        assert!(decide(vec![rule(1, json!({"expires_at": future}))], &req(json!({}))).allowed);
    }

    #[test]
    fn every_operator() {
        let cases: Vec<(Value, bool)> = vec![
            (json!({"field": "context.desk", "operator": "equals", "value": "fx"}), true),
            (json!({"field": "context.desk", "operator": "equals", "value": "rates"}), false),
            (json!({"field": "context.desk", "operator": "not_equals", "value": "rates"}), true),
            (
                json!({"field": "context.tenant_id", "operator": "equals", "value": "$tenant_id"}),
                true,
            ),
            (
                json!({"field": "context.tenant_id", "operator": "not_equals", "value": "$tenant_id"}),
                false,
            ),
            (json!({"field": "context.desk", "operator": "in", "value": ["fx", "rates"]}), true),
            (json!({"field": "roles", "operator": "in", "value": ["admin", "trader"]}), true),
            (json!({"field": "roles", "operator": "not_in", "value": ["admin"]}), true),
            (json!({"field": "context.desk", "operator": "not_in", "value": ["fx"]}), false),
            (json!({"field": "context.size", "operator": "greater_than", "value": 5}), true),
            (json!({"field": "context.size", "operator": "greater_than", "value": 10}), false),
            (json!({"field": "context.size", "operator": "less_than", "value": 10.5}), true),
            (json!({"field": "context.desk", "operator": "less_than", "value": 1}), false),
            (json!({"field": "context.tags", "operator": "contains", "value": "b"}), true),
            (json!({"field": "roles", "operator": "contains", "value": "admin"}), false),
            (json!({"field": "resource", "operator": "contains", "value": "EUR"}), true),
            (json!({"field": "resource", "operator": "starts_with", "value": "instrument:"}), true),
            (json!({"field": "resource", "operator": "ends_with", "value": "JPY"}), false),
            (json!({"field": "action", "operator": "ends_with", "value": "ad"}), true),
            (json!({"field": "context.desk", "operator": "exists", "value": true}), true),
            (json!({"field": "context.nope", "operator": "exists", "value": false}), true),
            (json!({"field": "context.nope", "operator": "exists"}), false),
            (json!({"field": "context.nope", "operator": "not_equals", "value": "x"}), false),
            (json!({"field": "user_id", "operator": "equals", "value": "alice"}), true),
        ];
        for (condition, expected) in cases {
            let r = rule(1, json!({"conditions": [condition.clone()]}));
            assert_eq!(decide(vec![r], &req(json!({}))).allowed, expected, "{condition}");
        }
    }

    #[test]
    fn all_conditions_must_hold() {
        let r = rule(
            1,
            json!({"conditions": [
            {"field": "context.desk", "operator": "equals", "value": "fx"},
            {"field": "context.size", "operator": "greater_than", "value": 100}]}),
        );
        assert!(!decide(vec![r], &req(json!({}))).allowed);
    }

    #[test]
    fn tenant_isolation_as_the_seed_writes_it() {
        let isolation = rule(
            1,
            json!({"effect": "deny", "priority": 1000, "conditions": [
            {"field": "context.tenant_id", "operator": "exists", "value": true},
            {"field": "context.tenant_id", "operator": "not_equals", "value": "$tenant_id"},
            {"field": "roles", "operator": "not_in", "value": ["admin"]}]}),
        );
        let allow = rule(2, json!({"priority": 100}));
        let rules = vec![isolation, allow];
        assert!(decide(rules.clone(), &req(json!({}))).allowed, "own tenant");
        let foreign = req(json!({"context": {"tenant_id": "t2"}}));
        assert!(!decide(rules.clone(), &foreign).allowed, "another tenant's data");
        let admin = req(json!({"context": {"tenant_id": "t2"}, "roles": ["admin"]}));
        assert!(decide(rules, &admin).allowed, "admins cross tenants");
    }

    #[test]
    fn exact_and_glob_rules_combine() {
        let rules = vec![
            rule(1, json!({"resource": "instrument:*", "priority": 1})),
            rule(2, json!({"resource": "instrument:EURUSD", "effect": "deny", "priority": 2})),
        ];
        assert!(!decide(rules.clone(), &req(json!({}))).allowed);
        assert!(decide(rules, &req(json!({"resource": "instrument:USDJPY"}))).allowed);
    }
}
