#!/usr/bin/env bash
# `make run`: the whole layer on this machine with `access all` (every role in one process, the
# embedded backends, a sample upstream, sample price updates every second), then what to try.
# Set ACCESS_REDIS_URL, ACCESS_POSTGRES_DSN or ACCESS_KAFKA_BOOTSTRAP to use real servers instead.
set -euo pipefail
BIN=${1:?usage: run.sh PATH_TO_ACCESS}
export ACCESS_LOG_FORMAT=${ACCESS_LOG_FORMAT:-text}
GW=${ACCESS_GATEWAY__PORT:-8000}
ST=${ACCESS_STREAM__PORT:-8001}
AUTH=${ACCESS_AUTH__PORT:-8010}
ENT=${ACCESS_ENTITLEMENTS__PORT:-8011}
MET=${ACCESS_METRICS__PORT:-8012}
UPSTREAM=${SAMPLE_UPSTREAM_PORT:-8100}
# The operator's console on the auth role; its one-time sign-in code goes to this file (0600).
export ACCESS_CONSOLE__ENABLED=${ACCESS_CONSOLE__ENABLED:-true}
export ACCESS_CONSOLE__DEV_CODE_FILE=${ACCESS_CONSOLE__DEV_CODE_FILE:-${XDG_DATA_HOME:-$HOME/.local/share}/access/console-code}

"$BIN" check-config >/dev/null
TOKEN=$("$BIN" token --sub alice --tenant t1 --roles trader --ttl 8h)
ADMIN=$("$BIN" token --sub root --tenant t1 --roles admin --ttl 8h)

"$BIN" all --upstream-port "$UPSTREAM" &
PID=$!
# Ctrl-C reaches the whole foreground process group, so the layer gets it too and stops on its
# own (a second Ctrl-C skips its grace period); this script ignores it, waits for the layer and
# exits with the layer's status, instead of dying of the signal (which `make run` reported as an
# error). Ignored, not trapped: a trapped signal interrupts `wait`, and one that lands in a child
# of this script (the readiness `curl`, `sleep`) would end it under `set -e`.
trap '' INT
trap 'kill -TERM $PID 2>/dev/null' TERM
trap 'kill -TERM $PID 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
  curl -fs "http://localhost:$GW/ready" >/dev/null 2>&1 && curl -fs "http://localhost:$ST/ready" >/dev/null 2>&1 \
    && curl -fs "http://localhost:$AUTH/ready" >/dev/null 2>&1 && break
  sleep 0.2
done

cat <<MSG

access $("$BIN" --version | cut -d' ' -f2) runs every role in one process: gateway :$GW, stream :$ST, auth :$AUTH,
entitlements :$ENT, metrics :$MET, with a sample upstream on :$UPSTREAM and sample price updates every
second (embedded backends, a local dev key, the shipped routes and seed rules).

$(if [ "$ACCESS_CONSOLE__ENABLED" = true ]; then cat <<CONSOLE
The operator's console (rules, "why?", API keys, sessions, the live layer):

  http://localhost:$AUTH/console/
  sign-in code: $(cat "$ACCESS_CONSOLE__DEV_CODE_FILE" 2>/dev/null || echo "(not written: see the log)")   (one use; the next one: cat $ACCESS_CONSOLE__DEV_CODE_FILE)
CONSOLE
fi)

Tokens (valid 8 hours): alice, a trader of tenant t1; root, an admin.

  export TOKEN=$TOKEN
  export ADMIN=$ADMIN

Through the gateway: auth, entitlement, RateLimit-* headers; a repeat within 5 s is X-Cache: HIT.

  curl -si http://localhost:$GW/api/v1/prices/latest/NG-H27 -H "Authorization: Bearer \$TOKEN"
  curl -si http://localhost:$GW/api/v1/prices/latest/NG-H27 -H "Authorization: Bearer \$TOKEN" | grep -i -e x-cache -e ratelimit

Deny alice an instrument, and see the 403, and the instrument gone from her copy of the list (the
stream below stops sending its prices too, within a second):

  curl -s -X POST http://localhost:$ENT/entitlements/rules -H "Authorization: Bearer \$ADMIN" -H 'content-type: application/json' \\
    -d '{"name":"no-brent","effect":"deny","resource":"instrument:BRN-*","actions":["read"],"priority":500}'
  curl -si http://localhost:$GW/api/v1/prices/latest/BRN-F27 -H "Authorization: Bearer \$TOKEN"
  curl -s http://localhost:$GW/api/v1/prices/latest -H "Authorization: Bearer \$TOKEN"

Live prices over WebSocket and SSE:

  ACCESS_TOKEN=\$TOKEN $BIN subscribe --topic served.market.latest_prices.v1
  curl -N "http://localhost:$ST/sse/stream?topics=served.market.latest_prices.v1&token=\$TOKEN"

Log alice out, and her next call is a 401:

  curl -s -X POST http://localhost:$AUTH/auth/logout -H "Authorization: Bearer \$TOKEN"

Also: /health, /ready, /metrics on every port; /stats on :$ST; docs/stream-protocol.md.
Ctrl-C stops the layer (after the grace period; press twice to skip it).

MSG
# The layer's exit status (0 after a clean shutdown) is this script's.
wait "$PID"
