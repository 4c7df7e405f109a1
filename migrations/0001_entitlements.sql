-- Entitlement rules, their audit trail and the global rules version.
CREATE SEQUENCE access_rules_version;

CREATE TABLE access_rules (
    id          uuid PRIMARY KEY,
    rule        jsonb       NOT NULL,  -- the rule's content (RuleInput)
    tenant_id   text,
    user_id     text,
    resource    text        NOT NULL,
    created_at  timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL,
    version     bigint      NOT NULL
);
CREATE INDEX access_rules_tenant ON access_rules (tenant_id);
CREATE INDEX access_rules_user ON access_rules (user_id);
CREATE INDEX access_rules_resource ON access_rules (resource);

CREATE TABLE access_rules_audit (
    id             bigserial PRIMARY KEY,
    rule_id        uuid        NOT NULL,
    change         text        NOT NULL CHECK (change IN ('create', 'update', 'delete')),
    actor          text        NOT NULL,
    at             timestamptz NOT NULL DEFAULT now(),
    old_rule       jsonb,
    new_rule       jsonb,
    rules_version  bigint      NOT NULL
);
CREATE INDEX access_rules_audit_rule ON access_rules_audit (rule_id, id);
