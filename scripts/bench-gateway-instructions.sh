#!/usr/bin/env bash
# Instructions per gateway request, counted by valgrind's callgrind (not part of `make test`).
# Wall-clock figures on a two-core machine shared with the load generator, nginx and Redis move by
# a fifth between runs; an instruction count is the same run after run, whatever else the machine
# does, so it tells whether a change made the request path more or less expensive.
#
# For the cache-hit and cache-miss routes of bench-gateway (JWT, GCRA in Redis, entitlement, the
# same upstream nginx), the gateway runs under callgrind and serves N1 and then N2 requests on one
# keep-alive connection in two separate runs; (Ir(N2) - Ir(N1)) / (N2 - N1) is the cost of one
# request with start-up and shutdown taken out. Needs valgrind, nginx, python3, Redis on 6379.
#   BIN=<path> scripts/bench-gateway-instructions.sh      (default: a release build of this tree)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/access/target}
N1=${N1:-200}; N2=${N2:-1200}
for tool in valgrind callgrind_annotate nginx python3 redis-cli; do
  command -v "$tool" >/dev/null || { echo "bench: $tool is missing (apt-get install valgrind nginx)" >&2; exit 1; }
done
if [ -z "${BIN:-}" ]; then
  cargo build --release --locked -q
  BIN=$CARGO_TARGET_DIR/release/access
fi
WORK=$(mktemp -d)
UP=18191; ENT=18192; GW=18193
cleanup() {
  [ -f "$WORK/nginx.pid" ] && kill "$(cat "$WORK/nginx.pid")" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
cat >"$WORK/nginx.conf" <<NGINX
worker_processes 1;
pid $WORK/nginx.pid;
error_log $WORK/nginx-error.log warn;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path $WORK; proxy_temp_path $WORK; fastcgi_temp_path $WORK; uwsgi_temp_path $WORK; scgi_temp_path $WORK;
  server {
    listen 127.0.0.1:$UP;
    location / {
      default_type application/json;
      add_header Cache-Control "max-age=300";
      return 200 '{"instrument":"EURUSD","bid":1.0841,"ask":1.0843,"ts":1795600000}';
    }
  }
}
NGINX
nginx -c "$WORK/nginx.conf"
cat >"$WORK/seed.yaml" <<SEED
- { name: bench, effect: allow, resource: "instrument:*", actions: [read], roles: [trader], priority: 10 }
SEED
cat >"$WORK/routes.yaml" <<ROUTES
- { name: miss, path: "/api/v1/miss/{instrument_id}", upstreams: ["http://127.0.0.1:$UP"], strip_prefix: /api/v1/miss, rate_limits: [bench], entitlement: { resource: "instrument:{instrument_id}" } }
- { name: hit, path: "/api/v1/hit/{instrument_id}", upstreams: ["http://127.0.0.1:$UP"], strip_prefix: /api/v1/hit, rate_limits: [bench], entitlement: { resource: "instrument:{instrument_id}" }, cache: {} }
ROUTES
cat >"$WORK/gateway.toml" <<TOML
log_level = "warn"
[gateway.rate_limits.bench]
rate = 100000000
period = "1s"
burst = 100000000
[gateway.ip_limit]
rate = 100000000
period = "1s"
burst = 100000000
TOML
export ACCESS_AUTH__DEV_KEY_FILE=$WORK/dev-key.json ACCESS_LOG_LEVEL=warn ACCESS_SERVER__HOST=127.0.0.1 ACCESS_SERVER__GRACE_PERIOD=0s
ACCESS_ENTITLEMENTS__SEED_FILE=$WORK/seed.yaml "$BIN" entitlements --port $ENT 2>"$WORK/ent.log" &
ENT_PID=$!
trap 'kill $ENT_PID 2>/dev/null || true; cleanup' EXIT
for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$ENT/ready" >/dev/null && break; sleep 0.1; done
TOKEN=$("$BIN" token --sub bench --tenant t1 --roles trader --ttl 1h)

# instructions PATH N: the gateway's whole-run instruction count for N requests to PATH.
instructions() {
  local out="$WORK/cg.out" pid
  ACCESS_REDIS_URL=redis://127.0.0.1:6379 ACCESS_REDIS__PREFIX="bench-cg:$$:$RANDOM:" \
    ACCESS_GATEWAY__ROUTES_FILE=$WORK/routes.yaml ACCESS_ENTITLEMENTS_SERVICE_URL=http://127.0.0.1:$ENT \
    valgrind --tool=callgrind --callgrind-out-file="$out" "$BIN" --config "$WORK/gateway.toml" gateway --port $GW 2>"$WORK/gw.log" &
  pid=$!
  for _ in $(seq 1 600); do curl -sf "http://127.0.0.1:$GW/ready" >/dev/null && break; sleep 0.2; done
  python3 - "$GW" "$TOKEN" "$2" "$1" <<'PY'
import http.client, sys
port, token, n, path = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
c = http.client.HTTPConnection("127.0.0.1", port)
for _ in range(n):
    c.request("GET", path, headers={"Authorization": "Bearer " + token})
    r = c.getresponse()
    r.read()
    if r.status != 200:
        sys.exit(f"bench: {path} answered {r.status}")
PY
  kill -TERM "$pid"; wait "$pid" || true
  callgrind_annotate "$out" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}'
}

echo "gateway instructions per request (callgrind; ($N2 - $N1) requests on one keep-alive connection)"
for case in hit miss; do
  a=$(instructions "/api/v1/$case/EURUSD" "$N1")
  b=$(instructions "/api/v1/$case/EURUSD" "$N2")
  printf "%-6s %10d\n" "$case" $(((b - a) / (N2 - N1)))
done
