#!/usr/bin/env bash
# Deploys the 254Carbon Access Layer to Kubernetes, with Helm (charts/access) or with kubectl
# (the plain manifests of deploy/k8s/<env>/, generated from the chart by `make manifests`).
#
# Usage: deploy/deploy-k8s.sh [-m kubectl|helm] [-n NAMESPACE] [-e dev|staging|production] [-d] [-f] [-h]
#
#   -m METHOD     helm (default) or kubectl
#   -n NAMESPACE  target namespace (default 254carbon-access)
#   -e ENV        dev (default), staging or production (production uses values-prod.yaml)
#   -d            dry run: print the manifests that would be applied, rendered locally; touches
#                 no cluster
#   -f            force: no confirmation prompt for production
#   -h            this help
#
# Before applying it checks its tools (kubectl; helm for -m helm) and that the cluster answers, then
# creates the namespace and the secrets the chart does not ship as plain manifests (the dev key,
# the PostgreSQL and Grafana passwords; production's access-secrets must already exist), applies,
# and waits for every Deployment to roll out. Exit codes: 0 done, 2 usage, 3 a tool or the cluster
# is missing, 4 a precondition failed (secrets, confirmation), 5 the rollout failed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
METHOD=helm
NAMESPACE=254carbon-access
ENVIRONMENT=dev
DRY_RUN=0
FORCE=0

usage() { sed -n '2,21p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
die() { local code=$1; shift; echo "deploy-k8s: error: $*" >&2; exit "$code"; }
say() { echo "deploy-k8s: $*" >&2; }

while getopts ":m:n:e:dfh" opt; do
  case $opt in
    m) METHOD=$OPTARG ;;
    n) NAMESPACE=$OPTARG ;;
    e) ENVIRONMENT=$OPTARG ;;
    d) DRY_RUN=1 ;;
    f) FORCE=1 ;;
    h) usage; exit 0 ;;
    :) die 2 "-$OPTARG needs a value (see -h)" ;;
    *) die 2 "unknown option -$OPTARG (see -h)" ;;
  esac
done
shift $((OPTIND - 1))
[ $# -eq 0 ] || die 2 "unexpected arguments: $* (see -h)"
case $METHOD in helm | kubectl) ;; *) die 2 "-m must be helm or kubectl, not '$METHOD'" ;; esac
case $ENVIRONMENT in
  dev) VALUES=values-dev.yaml ;;
  staging) VALUES=values-staging.yaml ;;
  production) VALUES=values-prod.yaml ;;
  *) die 2 "-e must be dev, staging or production, not '$ENVIRONMENT'" ;;
esac
[[ $NAMESPACE =~ ^[a-z0-9]([-a-z0-9]*[a-z0-9])?$ ]] || die 2 "'$NAMESPACE' is not a valid namespace name"
MANIFESTS="$ROOT/deploy/k8s/$ENVIRONMENT"

render() {
  python3 "$ROOT/scripts/render-chart.py" --env "$ENVIRONMENT" --namespace "$NAMESPACE" --plain
}

# --- dry run: render locally, print, touch nothing ----------------------------------------------
if [ "$DRY_RUN" = 1 ]; then
  say "dry run ($METHOD, $ENVIRONMENT, namespace $NAMESPACE): nothing is applied"
  if [ "$METHOD" = kubectl ]; then
    [ -d "$MANIFESTS" ] || die 4 "$MANIFESTS is missing; run make manifests"
    if [ "$NAMESPACE" = 254carbon-access ]; then
      for f in "$MANIFESTS"/*.yaml; do echo "---"; grep -v '^# Generated' "$f"; done
    else
      render
    fi
  else
    render
  fi
  say "would also create, if absent: the secrets generated at install (see -h)"
  exit 0
fi

# --- preconditions ------------------------------------------------------------------------------
command -v kubectl >/dev/null || die 3 "kubectl is not installed (needed for both methods)"
if [ "$METHOD" = helm ]; then
  command -v helm >/dev/null || die 3 "helm is not installed; use -m kubectl or install helm 3.8+"
fi
if ! CLUSTER=$(kubectl cluster-info --request-timeout=5s 2>&1); then
  die 3 "no reachable Kubernetes cluster (kubectl cluster-info failed): $(echo "$CLUSTER" | tail -1)"
fi
if [ "$ENVIRONMENT" = production ] && [ "$FORCE" != 1 ]; then
  [ -t 0 ] || die 4 "production needs confirmation: run it at a terminal or pass -f"
  read -r -p "deploy to PRODUCTION in namespace $NAMESPACE of $(kubectl config current-context)? [y/N] " answer
  [ "$answer" = y ] || die 4 "not confirmed"
fi

# --- namespace and secrets ----------------------------------------------------------------------
kubectl get namespace "$NAMESPACE" >/dev/null 2>&1 || kubectl create namespace "$NAMESPACE"
secret_exists() { kubectl -n "$NAMESPACE" get secret "$1" >/dev/null 2>&1; }
random() { head -c 48 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | head -c 32; }
if [ "$ENVIRONMENT" = production ]; then
  secret_exists access-secrets || die 4 "production reads its PostgreSQL DSN and client secret from Secret access-secrets (keys postgres-dsn, client-secret) in $NAMESPACE; create it first"
else
  if ! secret_exists access-dev-key; then
    command -v openssl >/dev/null || die 3 "openssl is needed to generate the dev key"
    key=$(mktemp)
    openssl ecparam -name prime256v1 -genkey -noout -out "$key"
    kubectl -n "$NAMESPACE" create secret generic access-dev-key --from-file=dev-key.pem="$key"
    rm -f "$key"
    say "created Secret access-dev-key (the dev signing key every role shares)"
  fi
  if ! secret_exists postgres-secret; then
    pw=$(random)
    kubectl -n "$NAMESPACE" create secret generic postgres-secret \
      --from-literal=user=access --from-literal=database=access --from-literal=password="$pw" \
      --from-literal=dsn="postgres://access:$pw@postgres-service:5432/access"
    say "created Secret postgres-secret (generated password)"
  fi
  if ! secret_exists grafana-secret; then
    kubectl -n "$NAMESPACE" create secret generic grafana-secret \
      --from-literal=admin-user=admin --from-literal=admin-password="$(random)"
    say "created Secret grafana-secret (generated admin password; read it with kubectl get secret)"
  fi
fi

# --- apply --------------------------------------------------------------------------------------
if [ "$METHOD" = helm ]; then
  helm upgrade --install access "$ROOT/charts/access" -n "$NAMESPACE" -f "$ROOT/charts/access/$VALUES" --wait --timeout 10m \
    || die 5 "helm upgrade failed; see helm history access -n $NAMESPACE, and helm rollback access -n $NAMESPACE to go back"
else
  [ -d "$MANIFESTS" ] || die 4 "$MANIFESTS is missing; run make manifests"
  if [ "$NAMESPACE" = 254carbon-access ]; then
    kubectl apply -n "$NAMESPACE" -f "$MANIFESTS"
  else
    render | kubectl apply -n "$NAMESPACE" -f -
  fi
  for d in $(kubectl -n "$NAMESPACE" get deployments -l app.kubernetes.io/instance=access -o name); do
    kubectl -n "$NAMESPACE" rollout status "$d" --timeout=5m || die 5 "$d did not roll out; kubectl -n $NAMESPACE describe $d"
  done
fi
say "deployed ($METHOD, $ENVIRONMENT) to namespace $NAMESPACE"
kubectl -n "$NAMESPACE" get pods -l app.kubernetes.io/name=access
