#!/usr/bin/env bash
# Restores a dump made by db-backup.sh, replacing the layer's tables (and their rows) with the
# dump's. The roles re-read rules on their own (LISTEN, or the reload interval).
#
# Usage: deploy/backup/db-restore.sh [-k NAMESPACE] [-y] FILE
#   default   into $ACCESS_POSTGRES_DSN
#   -k NS     into the chart's in-cluster PostgreSQL (kubectl exec into postgres-deployment)
#   -y        do not ask for confirmation
set -euo pipefail
NAMESPACE=""
YES=0
while getopts ":k:yh" opt; do
  case $opt in
    k) NAMESPACE=$OPTARG ;;
    y) YES=1 ;;
    h) sed -n '2,/^[^#]/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "db-restore: unknown option (see -h)" >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
FILE=${1:-}
[ -n "$FILE" ] && [ -f "$FILE" ] || { echo "db-restore: name an existing dump file (see -h)" >&2; exit 2; }
# The dump is read by the pg_restore that will restore it: with -k the in-cluster PostgreSQL's
# (a workstation's older pg_restore refuses a newer server's dumps), else this machine's.
if [ -n "$NAMESPACE" ]; then
  kubectl -n "$NAMESPACE" exec -i deploy/postgres-deployment -c postgres -- pg_restore --list <"$FILE" >/dev/null 2>&1 \
    || { echo "db-restore: $FILE is not a pg_dump custom-format file that the in-cluster pg_restore reads" >&2; exit 2; }
else
  pg_restore --list "$FILE" >/dev/null 2>&1 || { echo "db-restore: $FILE is not a pg_dump custom-format file" >&2; exit 2; }
fi
if [ "$YES" != 1 ]; then
  [ -t 0 ] || { echo "db-restore: this replaces the database's tables; confirm at a terminal or pass -y" >&2; exit 4; }
  read -r -p "replace the layer's tables with $FILE? [y/N] " answer
  [ "$answer" = y ] || { echo "db-restore: not confirmed" >&2; exit 4; }
fi
if [ -n "$NAMESPACE" ]; then
  kubectl -n "$NAMESPACE" exec -i deploy/postgres-deployment -c postgres -- \
    sh -c 'pg_restore --clean --if-exists --no-owner --single-transaction -U "$POSTGRES_USER" -d "$POSTGRES_DB"' <"$FILE"
else
  : "${ACCESS_POSTGRES_DSN:?set ACCESS_POSTGRES_DSN to the database to restore into (or use -k NAMESPACE)}"
  pg_restore --clean --if-exists --no-owner --single-transaction --dbname="$ACCESS_POSTGRES_DSN" "$FILE"
fi
echo "db-restore: restored $FILE" >&2
