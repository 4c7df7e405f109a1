#!/usr/bin/env bash
# Figures for dependency faults (issue #21; not part of `make test`):
#   gateway: requests/s and p50/p99 with Redis up, killed and frozen (SIGSTOP), in the
#            `local` and `open` rate_limit_on_store_error modes. The gateway and the entitlements
#            role share one private Redis (rate limits, revocations, the rules version channel,
#            the entitlements role's decision cache); every request names a new instrument, so no
#            cache answers and the gateway's rules mirror decides each one. The first TRANSITION
#            (1 s) after the fault is shown on its own line: a killed Redis opens the process's
#            one Redis breaker when its connection closes, a frozen one after `trip_after`
#            (500 ms); then DURATION from there. Goal: at least 0.8 of the Redis-up rate, p99
#            under 10 ms, within 1 s of the failure.
#   stream:  time from a silent broker healing to the first missed record delivered (the fault
#            test `faults::a_silent_broker_stalls_nothing_once_it_heals` prints it). Goal: < 2 s.
# Needs redis-server, nginx (the upstream), wrk, curl; the stream figure needs the test services
# (`make services`).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/access/target}
DURATION=${DURATION:-5s}
TRANSITION=${TRANSITION:-1s}
CONNECTIONS=${CONNECTIONS:-16}
THREADS=${THREADS:-1}
for tool in redis-server nginx wrk curl; do
  command -v "$tool" >/dev/null || { echo "figures: $tool is missing" >&2; exit 1; }
done
if [ -z "${BIN:-}" ]; then
  cargo build --release --locked -q
  BIN=$CARGO_TARGET_DIR/release/access
fi
WORK=$(mktemp -d)
PIDS=()
REDIS_PID=
cleanup() {
  [ -f "$WORK/nginx.pid" ] && kill "$(cat "$WORK/nginx.pid")" 2>/dev/null || true
  [ -n "$REDIS_PID" ] && { kill -CONT "$REDIS_PID" 2>/dev/null; kill "$REDIS_PID" 2>/dev/null; } || true
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

REDIS=18191; ENT=18192; GW=18193; UP=18194
redis_up() {
  redis-server --port $REDIS --bind 127.0.0.1 --save "" --appendonly no >"$WORK/redis.log" 2>&1 &
  REDIS_PID=$!
  for _ in $(seq 1 100); do redis-cli -p $REDIS ping >/dev/null 2>&1 && return; sleep 0.05; done
  echo "figures: redis did not start" >&2; exit 1
}
# Waits until $1/ready says "ready" (not degraded): every breaker closed again.
wait_ready() {
  for _ in $(seq 1 200); do
    curl -s "$1/ready" | grep -q '"status":"ready"' && return
    sleep 0.05
  done
  echo "figures: $1 not ready" >&2; curl -s "$1/ready" >&2; exit 1
}

mkdir -p "$WORK/nginx"
cat >"$WORK/nginx.conf" <<NGINX
worker_processes 1;
pid $WORK/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $WORK/nginx; proxy_temp_path $WORK/nginx; fastcgi_temp_path $WORK/nginx;
  uwsgi_temp_path $WORK/nginx; scgi_temp_path $WORK/nginx;
  server {
    listen 127.0.0.1:$UP;
    location / { default_type application/json; return 200 '{"bid":1.0841,"ask":1.0843}'; }
  }
}
NGINX
nginx -c "$WORK/nginx.conf"
cat >"$WORK/seed.yaml" <<SEED
- { name: figures, effect: allow, resource: "instrument:*", actions: [read], roles: [trader], priority: 10 }
SEED
cat >"$WORK/routes.yaml" <<ROUTES
- { name: px, path: "/px/{instrument_id}", upstreams: ["http://127.0.0.1:$UP"], strip_prefix: /px, rate_limits: [roomy], entitlement: { resource: "instrument:{instrument_id}" } }
ROUTES
cat >"$WORK/gateway.toml" <<TOML
[gateway.rate_limits.roomy]
rate = 100000000
period = "1s"
burst = 100000000
[gateway.ip_limit]
rate = 100000000
period = "1s"
burst = 100000000
TOML
cat >"$WORK/new-instrument.lua" <<'LUA'
-- Every request names a new instrument, so the gateway's local decision cache never answers.
local n = 0
request = function()
  n = n + 1
  return wrk.format(nil, "/px/I" .. math.random(1, 1000000000) .. "-" .. n)
end
LUA
export ACCESS_AUTH__DEV_KEY_FILE=$WORK/dev-key.json ACCESS_LOG_LEVEL=warn ACCESS_SERVER__HOST=127.0.0.1
export ACCESS_SERVER__MAX_CONCURRENCY=100000 ACCESS_REDIS_URL=redis://127.0.0.1:$REDIS
TOKEN=$("$BIN" token --sub figures --tenant t1 --roles trader --ttl 1h)

run() { # label
  local out rps p50 p99 errors
  out=$(wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency -s "$WORK/new-instrument.lua" \
    -H "Authorization: Bearer $TOKEN" "http://127.0.0.1:$GW")
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  p50=$(awk '$1=="50%" {print $2}' <<<"$out")
  p99=$(awk '$1=="99%" {print $2}' <<<"$out")
  errors=$(awk '/Non-2xx|Socket errors/ {print}' <<<"$out" | tr '\n' ' ')
  printf "%-44s %10s %10s %10s  %s\n" "$1" "$rps" "$p50" "$p99" "$errors"
}
transition() { # label: wrk for the TRANSITION right after the fault
  local saved=$DURATION
  DURATION=$TRANSITION run "$1"
  DURATION=$saved
}

echo "wrk -t$THREADS -c$CONNECTIONS -d$DURATION on $(nproc) cores, shared by wrk, the gateway, the entitlements role and Redis"
printf "%-44s %10s %10s %10s\n" "case" "req/s" "p50" "p99"
for mode in local open; do
  redis_up
  ACCESS_ENTITLEMENTS__SEED_FILE=$WORK/seed.yaml "$BIN" entitlements --port $ENT 2>"$WORK/ent.log" & PIDS+=($!)
  ACCESS_GATEWAY__ROUTES_FILE=$WORK/routes.yaml ACCESS_GATEWAY__RATE_LIMIT_ON_STORE_ERROR=$mode \
    ACCESS_ENTITLEMENTS_SERVICE_URL=http://127.0.0.1:$ENT \
    "$BIN" --config "$WORK/gateway.toml" gateway --port $GW 2>"$WORK/gw.log" & PIDS+=($!)
  wait_ready "http://127.0.0.1:$ENT"; wait_ready "http://127.0.0.1:$GW"
  curl -sf -H "Authorization: Bearer $TOKEN" "http://127.0.0.1:$GW/px/WARM" >/dev/null \
    || { echo "figures: the gateway does not answer" >&2; tail "$WORK/gw.log" >&2; exit 1; }
  run "$mode: Redis up"

  kill -9 "$REDIS_PID"; wait "$REDIS_PID" 2>/dev/null || true; REDIS_PID=
  transition "$mode: Redis killed, first $TRANSITION"
  run "$mode: Redis killed, after that"
  redis_up
  wait_ready "http://127.0.0.1:$ENT"; wait_ready "http://127.0.0.1:$GW"
  run "$mode: Redis back"

  kill -STOP "$REDIS_PID"
  transition "$mode: Redis frozen, first $TRANSITION"
  run "$mode: Redis frozen, after that"
  kill -CONT "$REDIS_PID"
  wait_ready "http://127.0.0.1:$ENT"; wait_ready "http://127.0.0.1:$GW"

  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
  PIDS=()
  kill "$REDIS_PID"; wait "$REDIS_PID" 2>/dev/null || true; REDIS_PID=
done

if [ -f "$CARGO_TARGET_DIR/test-services.env" ] && [ "${SKIP_STREAM:-}" != 1 ]; then
  # shellcheck disable=SC1091
  source "$CARGO_TARGET_DIR/test-services.env"
  echo
  echo "stream: the broker's connections silent for 3 s (packets dropped), then healed:"
  cargo test --locked -q --test it faults::a_silent_broker_stalls_nothing_once_it_heals -- --nocapture 2>&1 \
    | grep -E "first missed record|test result" || true
fi
