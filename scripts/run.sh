#!/usr/bin/env bash
# `make run`: runs what exists of the layer on this machine with embedded backends (no servers
# needed) and prints what to try. Today: the auth, entitlements and metrics roles, in dev mode.
set -euo pipefail
BIN=${1:?usage: run.sh PATH_TO_ACCESS}
export ACCESS_LOG_FORMAT=${ACCESS_LOG_FORMAT:-text}
AUTH=${ACCESS_AUTH__PORT:-8010}
ENT=${ACCESS_ENTITLEMENTS__PORT:-8011}
MET=${ACCESS_METRICS__PORT:-8012}

"$BIN" check-config >/dev/null
TOKEN=$("$BIN" token --sub alice --tenant t1 --roles trader,admin --ttl 8h)
SERVICE=$("$BIN" token --sub service:demo --tenant platform --roles service --ttl 8h)

"$BIN" entitlements &
ENT_PID=$!
"$BIN" metrics &
MET_PID=$!
trap 'kill -TERM $ENT_PID $MET_PID 2>/dev/null; wait $ENT_PID $MET_PID 2>/dev/null' EXIT

cat <<MSG

access $("$BIN" --version | cut -d' ' -f2): the auth role on :$AUTH, the entitlements role on :$ENT and the
metrics role on :$MET, in dev mode (embedded backends, a local dev key, the shipped seed rules).
The gateway runs too ($BIN gateway), but its sample upstream arrives with "access all", not
built yet; the stream role has not landed.

A dev token for alice (tenant t1, roles trader and admin), valid 8 hours:

  TOKEN=$TOKEN
  SERVICE=$SERVICE   # a service token (metrics ingest)

Verify it:

  curl -s -X POST http://localhost:$AUTH/auth/verify -H 'content-type: application/json' -d "{\"token\":\"\$TOKEN\"}"

Ask for a permission, add a rule, ask again:

  curl -s -X POST http://localhost:$ENT/entitlements/check -H "Authorization: Bearer \$TOKEN" \\
    -d '{"user_id":"alice","tenant_id":"t1","resource":"market_data","action":"read"}' -H 'content-type: application/json'
  curl -s -X POST http://localhost:$ENT/entitlements/rules -H "Authorization: Bearer \$TOKEN" -H 'content-type: application/json' \\
    -d '{"name":"no-jpy","effect":"deny","resource":"instrument:*JPY","actions":["*"],"priority":950}'

Push a metric and see it exported:

  curl -s -X POST http://localhost:$MET/metrics/track -H "Authorization: Bearer \$SERVICE" -H 'content-type: application/json' \\
    -d '{"name":"jobs_done","type":"counter","value":1,"service":"demo"}'
  curl -s http://localhost:$MET/metrics | grep jobs_done

Also: /auth/me, /auth/logout, /entitlements/rules, /entitlements/stats, /ready, /metrics on each.
More tokens: $BIN token --sub bob --tenant t2 --roles trader

Ctrl-C stops them (after the grace period; press twice to skip it).

MSG
"$BIN" auth
