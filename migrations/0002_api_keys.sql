-- API keys: secrets stored as SHA-256 only; a rotation keeps the previous secret valid until a
-- chosen time; every admin action is audited.
CREATE TABLE access_api_keys (
    id                      text PRIMARY KEY,
    name                    text        NOT NULL,
    tenant_id               text        NOT NULL,
    roles                   text[]      NOT NULL DEFAULT '{}',
    secret_hash             text        NOT NULL,
    previous_hash           text,
    previous_valid_until    timestamptz,
    created_at              timestamptz NOT NULL DEFAULT now(),
    expires_at              timestamptz,
    revoked_at              timestamptz,
    last_used_at            timestamptz
);

CREATE TABLE access_api_keys_audit (
    id          bigserial PRIMARY KEY,
    key_id      text        NOT NULL,
    action      text        NOT NULL CHECK (action IN ('create', 'rotate', 'revoke')),
    actor       text        NOT NULL,
    at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX access_api_keys_audit_key ON access_api_keys_audit (key_id, id);
