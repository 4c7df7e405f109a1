#!/usr/bin/env bash
# Runs schemathesis (PyPI) against each role's own OpenAPI document (/openapi.json), with a valid
# token that has the admin, service and trader roles, on `access all` started on free ports (with
# the operator's console on, so its sign-in endpoints are checked too).
# Fails on any 5xx and on any response (status, headers, body) that breaks its documented
# schema. First it generates a Python client from each document (openapi-python-client, PyPI),
# imports it and calls the role through it (tests/contracts/clients.py), so a document a
# generator cannot read fails too. Run by `make test` (make check-contracts).
set -euo pipefail
BIN=${1:?usage: schemathesis.sh PATH_TO_ACCESS}
EXAMPLES=${SCHEMATHESIS_EXAMPLES:-30}
WORK=$(mktemp -d)
trap 'kill -TERM $PID 2>/dev/null; wait $PID 2>/dev/null; rm -rf "$WORK"' EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
declare -A PORT
for role in gateway stream auth entitlements metrics; do PORT[$role]=$(free_port); done
UPSTREAM=$(free_port)
export HOME=$WORK ACCESS_LOG_LEVEL=warn ACCESS_SERVER__HOST=127.0.0.1 ACCESS_CONSOLE__ENABLED=true \
  ACCESS_GATEWAY__PORT=${PORT[gateway]} ACCESS_STREAM__PORT=${PORT[stream]} ACCESS_AUTH__PORT=${PORT[auth]} \
  ACCESS_ENTITLEMENTS__PORT=${PORT[entitlements]} ACCESS_METRICS__PORT=${PORT[metrics]}
"$BIN" all --upstream-port "$UPSTREAM" --no-samples >"$WORK/access.log" 2>&1 &
PID=$!
for role in "${!PORT[@]}"; do
  for _ in $(seq 1 100); do
    curl -fs "http://127.0.0.1:${PORT[$role]}/ready" >/dev/null 2>&1 && break
    sleep 0.1
  done
done
TOKEN=$("$BIN" token --sub schemathesis --tenant t1 --roles admin,service,trader --ttl 1h)
failed=0
# The generated clients first: on a fresh layer, before schemathesis spends the admin rate limit.
clients=()
for role in auth entitlements metrics gateway stream; do clients+=("$role=http://127.0.0.1:${PORT[$role]}"); done
if ! ACCESS_TOKEN=$TOKEN python3 "$(dirname "$0")/clients.py" "${clients[@]}"; then
  failed=1
fi
for role in auth entitlements metrics gateway stream; do
  echo "schemathesis: $role (http://127.0.0.1:${PORT[$role]}/openapi.json)"
  # Logging out would revoke the token the rest of the run uses.
  if ! st run "http://127.0.0.1:${PORT[$role]}/openapi.json" \
      --checks not_a_server_error,response_schema_conformance,status_code_conformance,content_type_conformance,response_headers_conformance \
      --header "Authorization: Bearer $TOKEN" \
      --exclude-path /auth/logout \
      --max-examples "$EXAMPLES" --generation-deterministic --request-timeout 10 \
      --workers 2 --warnings off; then
    failed=1
  fi
done
if [ "$failed" != 0 ]; then
  echo "schemathesis: failures above; the layer's log:" >&2
  grep -v '"level":"INFO"' "$WORK/access.log" | tail -20 >&2
  exit 1
fi
echo "schemathesis: every role's API holds to its OpenAPI document (no 5xx, no schema violation), and a client generated from each works"
