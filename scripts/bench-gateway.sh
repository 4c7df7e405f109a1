#!/usr/bin/env bash
# Gateway benchmark (not part of `make test`): wrk against, in one run on this machine,
#   (a) the upstream directly (nginx answering a small JSON body),
#   (b) nginx as a plain keep-alive reverse proxy to it,
#   (c) the gateway with JWT, rate limit (GCRA in Redis) and entitlement, on a cache miss,
#   (d) the gateway on a cache hit,
#   (e) as (c) to an HTTPS upstream (the same nginx answer behind TLS, certificate made here by
#       openssl, verified against its CA), HTTP/2 by ALPN, and (f) the same in HTTP/1.1,
#   (g) and (h) as (c) and (d) on a second gateway whose rate limits are leased
#       (gateway.rate_limit_mode = leased) instead of exact.
# Prints requests/s and p50/p99 per case. Needs nginx, wrk and openssl (Debian), Redis on 6379.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/access/target}
DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-64}
THREADS=${THREADS:-2}
# REDIS_URL=<url>: the gateway's Redis (a redis-sentinel:// URL measures a Sentinel set's primary,
# a redis-cluster://<node>?node=<node> URL a Redis Cluster).
REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379}
# The gateway's I/O threads (server.io_threads; 0: the shared multi-threaded runtime).
IO_THREADS=${IO_THREADS:-$(nproc)}
for tool in nginx wrk redis-cli openssl; do
  command -v "$tool" >/dev/null || { echo "bench: $tool is missing (apt-get install nginx wrk)" >&2; exit 1; }
done
# BIN=<path>: measure that binary (say, one built from another commit) instead of building.
if [ -z "${BIN:-}" ]; then
  cargo build --release --locked -q
  BIN=$CARGO_TARGET_DIR/release/access
fi
WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  [ -f "$WORK/nginx.pid" ] && kill "$(cat "$WORK/nginx.pid")" 2>/dev/null || true
  cp "$WORK"/*.log /tmp/ 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

UP=18181; PROXY=18182; ENT=18183; GW=18184; UPS=18185; GWL=18186
# A previous run's processes may still be draining: wait (up to 30 s) until the ports are free.
for port in $UP $PROXY $ENT $GW $UPS $GWL; do
  for _ in $(seq 1 300); do
    ss -Hltn "sport = :$port" | grep -q . || break
    sleep 0.1
  done
done
mkdir -p "$WORK/nginx"
# A CA and a certificate for localhost signed by it, for the HTTPS upstream.
EC=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
openssl req -x509 "${EC[@]}" -keyout "$WORK/ca.key" -out "$WORK/ca.crt" -days 1 -subj "/CN=bench ca" \
  -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign 2>/dev/null
openssl req "${EC[@]}" -keyout "$WORK/up.key" -out "$WORK/up.csr" -subj "/CN=localhost" 2>/dev/null
printf "basicConstraints=CA:FALSE\nsubjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\n" >"$WORK/up.ext"
openssl x509 -req -in "$WORK/up.csr" -CA "$WORK/ca.crt" -CAkey "$WORK/ca.key" -CAcreateserial -days 1 \
  -out "$WORK/up.crt" -extfile "$WORK/up.ext" 2>/dev/null
cat >"$WORK/nginx.conf" <<NGINX
worker_processes 1;
pid $WORK/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  # Connections are kept for the whole run (nginx closes one after 1000 requests by default:
  # the upstream side of the proxies would then measure reconnections).
  keepalive_requests 100000000;
  client_body_temp_path $WORK/nginx; proxy_temp_path $WORK/nginx; fastcgi_temp_path $WORK/nginx;
  uwsgi_temp_path $WORK/nginx; scgi_temp_path $WORK/nginx;
  upstream app { server 127.0.0.1:$UP; keepalive 128; }
  server {
    listen 127.0.0.1:$UP;
    location / {
      default_type application/json;
      add_header Cache-Control "max-age=300";
      return 200 '{"instrument":"EURUSD","bid":1.0841,"ask":1.0843,"ts":1795600000}';
    }
  }
  server {
    listen 127.0.0.1:$UPS ssl http2;
    ssl_certificate $WORK/up.crt; ssl_certificate_key $WORK/up.key;
    location / {
      default_type application/json;
      add_header Cache-Control "max-age=300";
      return 200 '{"instrument":"EURUSD","bid":1.0841,"ask":1.0843,"ts":1795600000}';
    }
  }
  server {
    listen 127.0.0.1:$PROXY;
    location / { proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection ""; }
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
- { name: tls, path: "/api/v1/tls/{instrument_id}", upstream: tls, strip_prefix: /api/v1/tls, rate_limits: [bench], entitlement: { resource: "instrument:{instrument_id}" } }
- { name: tls_h1, path: "/api/v1/tls_h1/{instrument_id}", upstream: tls_h1, strip_prefix: /api/v1/tls_h1, rate_limits: [bench], entitlement: { resource: "instrument:{instrument_id}" } }
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
[gateway.upstreams]
tls = ["https://localhost:$UPS"]
tls_h1 = ["https://localhost:$UPS"]
[gateway.upstream_tls.tls]
ca_file = "$WORK/ca.crt"
[gateway.upstream_tls.tls_h1]
ca_file = "$WORK/ca.crt"
http2 = false
TOML
export ACCESS_AUTH__DEV_KEY_FILE=$WORK/dev-key.json ACCESS_LOG_LEVEL=warn ACCESS_SERVER__HOST=127.0.0.1
export ACCESS_SERVER__MAX_CONCURRENCY=100000
# wrk is one client with one identity: its share caps stay on (their cost is measured), set above
# what it can hold in flight so none trips.
export ACCESS_SERVER__MAX_IN_FLIGHT_PER_CLIENT=$((CONNECTIONS * 4)) ACCESS_SERVER__MAX_CONNECTIONS_PER_CLIENT=$((CONNECTIONS * 4))
export ACCESS_GATEWAY__MAX_IN_FLIGHT_PER_IDENTITY=$((CONNECTIONS * 4))
ACCESS_ENTITLEMENTS__SEED_FILE=$WORK/seed.yaml "$BIN" entitlements --port $ENT 2>"$WORK/ent.log" & PIDS+=($!)
ACCESS_REDIS_URL=$REDIS_URL ACCESS_REDIS__PREFIX="bench:$$:" ACCESS_GATEWAY__ROUTES_FILE=$WORK/routes.yaml \
  ACCESS_ENTITLEMENTS_SERVICE_URL=http://127.0.0.1:$ENT ACCESS_SERVER__IO_THREADS=$IO_THREADS "$BIN" --config "$WORK/gateway.toml" gateway --port $GW 2>"$WORK/gw.log" & PIDS+=($!)
ACCESS_REDIS_URL=$REDIS_URL ACCESS_REDIS__PREFIX="bench:$$:leased:" ACCESS_GATEWAY__ROUTES_FILE=$WORK/routes.yaml \
  ACCESS_ENTITLEMENTS_SERVICE_URL=http://127.0.0.1:$ENT ACCESS_SERVER__IO_THREADS=$IO_THREADS \
  ACCESS_GATEWAY__RATE_LIMIT_MODE=leased "$BIN" --config "$WORK/gateway.toml" gateway --port $GWL 2>"$WORK/gwl.log" & PIDS+=($!)
for port in $ENT $GW $GWL; do
  for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$port/ready" >/dev/null && break; sleep 0.1; done
done
TOKEN=$("$BIN" token --sub bench --tenant t1 --roles trader --ttl 1h)
AUTH="Authorization: Bearer $TOKEN"
curl -sf -H "$AUTH" "http://127.0.0.1:$GW/api/v1/miss/EURUSD" >/dev/null || { echo "bench: the gateway does not answer" >&2; tail "$WORK/gw.log" >&2; exit 1; }
curl -sf -H "$AUTH" "http://127.0.0.1:$GW/api/v1/hit/EURUSD" >/dev/null
curl -sf -H "$AUTH" "http://127.0.0.1:$GW/api/v1/tls/EURUSD" >/dev/null || { echo "bench: the HTTPS upstream does not answer through the gateway" >&2; tail "$WORK/gw.log" >&2; exit 1; }

GW_PID=${PIDS[1]}
GWL_PID=${PIDS[2]}
NGINX_WORKER=$(pgrep -P "$(cat "$WORK/nginx.pid")" | head -1)
TICK_US=$((1000000 / $(getconf CLK_TCK)))
# CPU time (user + system, clock ticks) a process has used so far.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# SYSCALLS=1: also count the server process's system calls during each case (perf stat on the
# syscall tracepoints): all of them, the writes (write(2) carries the I/O driver's eventfd wake-ups;
# sockets are written with writev and sendto) and epoll_wait, per request.
SYSCALL_EVENTS=raw_syscalls:sys_enter,syscalls:sys_enter_write,syscalls:sys_enter_epoll_wait
run() { # name pid url [header]: the server process whose CPU per request is reported
  local out before after counter=""
  if [ -n "${SYSCALLS:-}" ]; then
    perf stat -x, -e "$SYSCALL_EVENTS" -p "$2" -o "$WORK/syscalls.txt" & counter=$!
    sleep 0.2
  fi
  before=$(cpu_ticks "$2")
  if [ -n "${4:-}" ]; then out=$(wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency -H "$4" "$3"); else out=$(wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency "$3"); fi
  after=$(cpu_ticks "$2")
  local rps p50 p99 errors requests cpu
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  p50=$(awk '$1=="50%" {print $2}' <<<"$out")
  p99=$(awk '$1=="99%" {print $2}' <<<"$out")
  requests=$(awk '/requests in/ {print $1}' <<<"$out")
  cpu=$(awk -v t=$((after - before)) -v us="$TICK_US" -v n="$requests" 'BEGIN { printf "%.1f", n ? t * us / n : 0 }')
  errors=$(awk '/Non-2xx|Socket errors/ {print}' <<<"$out" | tr '\n' ' ')
  printf "%-52s %12s %10s %10s %12s  %s\n" "$1" "$rps" "$p50" "$p99" "$cpu" "$errors"
  if [ -n "$counter" ]; then
    kill -INT "$counter"; wait "$counter" || true
    awk -F, -v n="$requests" '$3 ~ /sys_enter/ { c[$3] = $1 } END {
      printf "%52s syscalls/req %.2f, write %.2f, epoll_wait %.2f\n", "", c["raw_syscalls:sys_enter"] / n,
        c["syscalls:sys_enter_write"] / n, c["syscalls:sys_enter_epoll_wait"] / n }' "$WORK/syscalls.txt"
  fi
  RPS[${1:1:1}]=$rps; CPU[${1:1:1}]=$cpu
}
declare -A RPS CPU
ratio() { # case: its throughput and CPU per request against the nginx proxy's, (b)
  awk -v r="${RPS[$1]}" -v rb="${RPS[b]}" -v c="${CPU[$1]}" -v cb="${CPU[b]}" -v n="$1" \
    'BEGIN { printf "(%s) against (b): %.2f of its throughput, %.2f times its CPU per request\n", n, r / rb, c / cb }'
}
echo
echo "wrk -t$THREADS -c$CONNECTIONS -d$DURATION on $(nproc) cores; server and load share them; gateway io_threads=$IO_THREADS"
echo "CPU µs/req: user + system time of the server process per request: nginx's one worker in"
echo "(a) and (b) (in (b) it serves the proxy and the upstream both), the gateway in (c) and (d)"
printf "%-52s %12s %10s %10s %12s\n" "case" "req/s" "p50" "p99" "CPU µs/req"
run "(a) upstream directly (nginx)" "$NGINX_WORKER" "http://127.0.0.1:$UP/EURUSD"
run "(b) nginx keep-alive reverse proxy" "$NGINX_WORKER" "http://127.0.0.1:$PROXY/EURUSD"
# PERF=<file>: record a profile of the whole machine during case (c), or (d) with PERF_CASE=d;
# PERF_ARGS replaces the sampling options (default "-F 999 -g"; "-F 299 --call-graph dwarf,8192"
# follows calls through libc).
profile() { if [ -n "${PERF:-}" ] && [ "${PERF_CASE:-c}" = "$1" ]; then perf record ${PERF_ARGS:--F 999 -g} -a -o "$PERF" -- sleep 6 >/dev/null 2>&1 & fi; }
profile c
run "(c) gateway: JWT + rate limit + entitlement, miss" "$GW_PID" "http://127.0.0.1:$GW/api/v1/miss/EURUSD" "$AUTH"
profile d
run "(d) gateway: JWT + rate limit + entitlement, hit" "$GW_PID" "http://127.0.0.1:$GW/api/v1/hit/EURUSD" "$AUTH"
run "(e) as (c), HTTPS upstream, HTTP/2 (ALPN)" "$GW_PID" "http://127.0.0.1:$GW/api/v1/tls/EURUSD" "$AUTH"
run "(f) as (c), HTTPS upstream, HTTP/1.1" "$GW_PID" "http://127.0.0.1:$GW/api/v1/tls_h1/EURUSD" "$AUTH"
run "(g) as (c), leased rate limits" "$GWL_PID" "http://127.0.0.1:$GWL/api/v1/miss/EURUSD" "$AUTH"
run "(h) as (d), leased rate limits" "$GWL_PID" "http://127.0.0.1:$GWL/api/v1/hit/EURUSD" "$AUTH"
echo
for c in c d e f g h; do ratio $c; done
# How well concurrent checks shared Redis script calls, over (c) to (f) together.
curl -s "http://127.0.0.1:$GW/metrics" | awk '
  /^access_gateway_rate_limit_batch_size_sum/ { sum = $2 }
  /^access_gateway_rate_limit_batch_size_count/ { count = $2 }
  END { if (count) printf "rate-limit checks per Redis script call: %.1f (%d calls)\n", sum / count, count }' || true
