#!/usr/bin/env bash
# `make run`: runs what exists of the layer on this machine with embedded backends (no servers
# needed) and prints what to try. Today that is the auth role in dev mode.
set -euo pipefail
BIN=${1:?usage: run.sh PATH_TO_ACCESS}
export ACCESS_LOG_FORMAT=${ACCESS_LOG_FORMAT:-text}
PORT=${ACCESS_AUTH__PORT:-8010}

"$BIN" check-config >/dev/null
TOKEN=$("$BIN" token --sub alice --tenant t1 --roles trader,admin --ttl 8h)
cat <<MSG

access $("$BIN" --version | cut -d' ' -f2): starting the auth role on :$PORT in dev mode (embedded
backends, local dev key). The gateway, stream, entitlements and metrics roles have not landed yet.

A dev token for alice (tenant t1, roles trader and admin), valid 8 hours:

  TOKEN=$TOKEN

Verify it:

  curl -s -X POST http://localhost:$PORT/auth/verify -H 'content-type: application/json' -d "{\"token\":\"\$TOKEN\"}"

Also try:

  curl -s http://localhost:$PORT/auth/me -H "Authorization: Bearer \$TOKEN"
  curl -s http://localhost:$PORT/auth/users/alice -H "Authorization: Bearer \$TOKEN"
  curl -s -X POST http://localhost:$PORT/auth/logout -H "Authorization: Bearer \$TOKEN"   # then verify again
  curl -s http://localhost:$PORT/ready; curl -s http://localhost:$PORT/metrics | head
  $BIN token --sub bob --tenant t2 --roles trader    # more tokens

Ctrl-C stops it (after the grace period; press twice to skip it).

MSG
exec "$BIN" auth
