#!/usr/bin/env bash
# Backs up the layer's PostgreSQL data (rules, their audit, API keys, the migration record) in
# pg_dump's custom format.
#
# Usage: deploy/backup/db-backup.sh [-k NAMESPACE] [-o DIR]
#   default   pg_dump of $ACCESS_POSTGRES_DSN (a URL or key=value DSN)
#   -k NS     from the chart's in-cluster PostgreSQL: kubectl exec into postgres-deployment in NS
#   -o DIR    where the file goes (default ./backups); prints the file's path
set -euo pipefail
OUT=backups
NAMESPACE=""
while getopts ":k:o:h" opt; do
  case $opt in
    k) NAMESPACE=$OPTARG ;;
    o) OUT=$OPTARG ;;
    h) sed -n '2,/^[^#]/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "db-backup: unknown option (see -h)" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUT"
FILE="$OUT/access-$(date -u +%Y%m%dT%H%M%SZ).dump"
TMP="$FILE.partial"
trap 'rm -f "$TMP"' EXIT
if [ -n "$NAMESPACE" ]; then
  command -v kubectl >/dev/null || { echo "db-backup: kubectl is not installed" >&2; exit 3; }
  kubectl -n "$NAMESPACE" exec deploy/postgres-deployment -c postgres -- \
    sh -c 'pg_dump --format=custom --no-owner -U "$POSTGRES_USER" "$POSTGRES_DB"' >"$TMP"
else
  : "${ACCESS_POSTGRES_DSN:?set ACCESS_POSTGRES_DSN to the database to back up (or use -k NAMESPACE)}"
  command -v pg_dump >/dev/null || { echo "db-backup: pg_dump is not installed (Debian: postgresql-client)" >&2; exit 3; }
  pg_dump --format=custom --no-owner --dbname="$ACCESS_POSTGRES_DSN" --file="$TMP"
fi
# Only a complete dump gets the final name: pg_restore --list reads its table of contents (the
# in-cluster one for -k: this machine's may be older than the server that wrote the dump).
if [ -n "$NAMESPACE" ]; then
  kubectl -n "$NAMESPACE" exec -i deploy/postgres-deployment -c postgres -- pg_restore --list <"$TMP" >/dev/null 2>&1
else
  pg_restore --list "$TMP" >/dev/null 2>&1
fi || { echo "db-backup: the dump is unreadable" >&2; exit 1; }
mv "$TMP" "$FILE"
trap - EXIT
echo "$FILE"
