#!/usr/bin/env bash
# `make run`: runs what exists of the layer on this machine with embedded backends (no servers
# needed) and prints what to try. Today: the auth role and the entitlements role, in dev mode.
set -euo pipefail
BIN=${1:?usage: run.sh PATH_TO_ACCESS}
export ACCESS_LOG_FORMAT=${ACCESS_LOG_FORMAT:-text}
AUTH=${ACCESS_AUTH__PORT:-8010}
ENT=${ACCESS_ENTITLEMENTS__PORT:-8011}

"$BIN" check-config >/dev/null
TOKEN=$("$BIN" token --sub alice --tenant t1 --roles trader,admin --ttl 8h)

"$BIN" entitlements &
ENT_PID=$!
trap 'kill -TERM $ENT_PID 2>/dev/null; wait $ENT_PID 2>/dev/null' EXIT

cat <<MSG

access $("$BIN" --version | cut -d' ' -f2): the auth role on :$AUTH and the entitlements role on :$ENT, in
dev mode (embedded backends, a local dev key, the shipped seed rules). The gateway, stream and
metrics roles have not landed yet.

A dev token for alice (tenant t1, roles trader and admin), valid 8 hours:

  TOKEN=$TOKEN

Verify it:

  curl -s -X POST http://localhost:$AUTH/auth/verify -H 'content-type: application/json' -d "{\"token\":\"\$TOKEN\"}"

Ask for a permission, add a rule, ask again:

  curl -s -X POST http://localhost:$ENT/entitlements/check -H "Authorization: Bearer \$TOKEN" \\
    -d '{"user_id":"alice","tenant_id":"t1","resource":"market_data","action":"read"}' -H 'content-type: application/json'
  curl -s -X POST http://localhost:$ENT/entitlements/rules -H "Authorization: Bearer \$TOKEN" -H 'content-type: application/json' \\
    -d '{"name":"no-jpy","effect":"deny","resource":"instrument:*JPY","actions":["*"],"priority":950}'

Also: /auth/me, /auth/logout, /entitlements/rules, /entitlements/stats, /ready, /metrics on each.
More tokens: $BIN token --sub bob --tenant t2 --roles trader

Ctrl-C stops both (after the grace period; press twice to skip it).

MSG
"$BIN" auth
