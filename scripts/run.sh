#!/usr/bin/env bash
# `make run`: starts what exists of the layer with embedded backends and says what to try.
set -euo pipefail
BIN=${1:?usage: run.sh PATH_TO_ACCESS}
"$BIN" --version
"$BIN" check-config
cat <<MSG
No role has landed yet. Try:
  $BIN --help
  $BIN print-config
MSG
