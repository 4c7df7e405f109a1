#!/usr/bin/env bash
# Deploys the 254Carbon Access Layer to Kubernetes, with kubectl (the plain manifests of
# deploy/k8s/<env>/, generated from the chart by `make manifests`) or with Helm (charts/access).
#
# Usage: deploy/deploy-k8s.sh [-m kubectl|helm] [-n NAMESPACE] [-e dev|staging|production]
#                             [-i IMAGE] [-V VALUES.yaml]... [-r] [-d] [-f] [-h]
#
#   -m METHOD     kubectl (default: the guide's Method 1) or helm
#   -n NAMESPACE  target namespace (default 254carbon-access)
#   -e ENV        dev (default), staging or production (production uses values-prod.yaml)
#   -i IMAGE      the image every role runs (repository:tag, as pushed by make image); default the
#                 chart's ghcr.io/254carbon/access:<appVersion>
#   -V FILE       another values file, merged after the environment's (repeatable; with -m
#                 kubectl the manifests are then rendered from the chart, which needs python3)
#   -r            roll back instead: helm rollback to the previous revision, or kubectl rollout
#                 undo of every Deployment
#   -d            dry run: print the manifests that would be applied, rendered locally; touches
#                 no cluster
#   -f            force: no confirmation prompt for production
#   -h            this help
#
# Before applying it checks its tools (kubectl; helm for -m helm), that the cluster answers and
# has the resource definitions the environment needs (production: the VerticalPodAutoscaler, the
# Prometheus operator's ServiceMonitor and PrometheusRule, cert-manager). With kubectl it creates
# the namespace and the Secrets the plain manifests leave out (the dev key, the PostgreSQL and
# Grafana passwords); with Helm the chart creates them, and Secrets made earlier by kubectl are
# handed to the release (Helm's adoption annotations) so their values are kept. Staging's and
# production's Secret access-secrets must exist first. Then it applies and waits for every
# Deployment to roll out. Exit codes: 0 done, 2 usage, 3 a tool or the cluster is missing, 4 a precondition failed
# (secrets, resource definitions, confirmation), 5 the apply or the rollout failed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
METHOD=kubectl
NAMESPACE=254carbon-access
ENVIRONMENT=dev
IMAGE=""
EXTRA_VALUES=()
ROLLBACK=0
DRY_RUN=0
FORCE=0
RELEASE=access

# The comment block above, without the shebang and without the code after it.
usage() { sed -n '2,/^[^#]/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'; }
die() { local code=$1; shift; echo "deploy-k8s: error: $*" >&2; exit "$code"; }
say() { echo "deploy-k8s: $*" >&2; }

while getopts ":m:n:e:i:V:rdfh" opt; do
  case $opt in
    m) METHOD=$OPTARG ;;
    n) NAMESPACE=$OPTARG ;;
    e) ENVIRONMENT=$OPTARG ;;
    i) IMAGE=$OPTARG ;;
    V) [ -f "$OPTARG" ] || die 2 "-V $OPTARG: no such values file"; EXTRA_VALUES+=("$(cd "$(dirname "$OPTARG")" && pwd)/$(basename "$OPTARG")") ;;
    r) ROLLBACK=1 ;;
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
  production | prod) ENVIRONMENT=production VALUES=values-prod.yaml ;;
  *) die 2 "-e must be dev, staging or production, not '$ENVIRONMENT'" ;;
esac
[[ $NAMESPACE =~ ^[a-z0-9]([-a-z0-9]*[a-z0-9])?$ ]] || die 2 "'$NAMESPACE' is not a valid namespace name"
[ -z "$IMAGE" ] || [[ $IMAGE =~ ^[a-z0-9]([-a-z0-9._/:]*[a-z0-9])?(:[A-Za-z0-9_][-A-Za-z0-9_.]{0,127})?(@sha256:[a-f0-9]{64})?$ ]] \
  || die 2 "-i '$IMAGE' is not an image reference (registry/repository:tag)"
MANIFESTS="$ROOT/deploy/k8s/$ENVIRONMENT"
CHART="$ROOT/charts/access"
HELM_ARGS=(-n "$NAMESPACE" -f "$CHART/$VALUES")
for f in "${EXTRA_VALUES[@]}"; do HELM_ARGS+=(-f "$f"); done
if [ -n "$IMAGE" ]; then
  # repository:tag[@digest] -> the chart's image.repository and image.tag.
  ref=${IMAGE%%@*} digest=${IMAGE#"$ref"}
  if [[ ${ref##*/} == *:* ]]; then repo=${ref%:*} tag=${ref##*:}; else repo=$ref tag=latest; fi
  HELM_ARGS+=(--set "image.repository=$repo" --set "image.tag=$tag$digest")
fi

# The kubectl method's manifests: the committed ones when they fit (default namespace, no extra
# values), else rendered from the chart; with -i the layer's image replaced.
manifests() {
  if [ "$NAMESPACE" = 254carbon-access ] && [ ${#EXTRA_VALUES[@]} -eq 0 ]; then
    [ -d "$MANIFESTS" ] || die 4 "$MANIFESTS is missing; run make manifests"
    for f in "$MANIFESTS"/*.yaml; do echo "---"; grep -v '^# Generated' "$f"; done
  else
    local args=(--env "$ENVIRONMENT" --namespace "$NAMESPACE" --plain)
    for f in "${EXTRA_VALUES[@]}"; do args+=(--values "$f"); done
    python3 "$ROOT/scripts/render-chart.py" "${args[@]}"
  fi | if [ -n "$IMAGE" ]; then sed -E "s#^([[:space:]]*image: )ghcr\.io/254carbon/access:[^[:space:]]+\$#\1$IMAGE#"; else cat; fi
}
render() {
  if [ "$METHOD" = kubectl ]; then manifests; return; fi
  local args=(--env "$ENVIRONMENT" --namespace "$NAMESPACE")
  for f in "${EXTRA_VALUES[@]}"; do args+=(--values "$f"); done
  [ -z "$IMAGE" ] || args+=(--image "$IMAGE")
  python3 "$ROOT/scripts/render-chart.py" "${args[@]}"
}

# --- dry run: render locally, print, touch nothing ----------------------------------------------
if [ "$DRY_RUN" = 1 ]; then
  say "dry run ($METHOD, $ENVIRONMENT, namespace $NAMESPACE): nothing is applied"
  render
  if [ "$METHOD" = kubectl ]; then say "would also create, if absent: the secrets generated at install (see -h)"; fi
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

# --- roll back ----------------------------------------------------------------------------------
if [ "$ROLLBACK" = 1 ]; then
  if [ "$METHOD" = helm ]; then
    helm rollback "$RELEASE" -n "$NAMESPACE" --wait --timeout 10m \
      || die 5 "helm rollback failed; see helm history $RELEASE -n $NAMESPACE"
  else
    # The roles' Deployments (an upgrade changes their image; the backends' have no earlier revision).
    deployments=$(kubectl -n "$NAMESPACE" get deployments -l "app.kubernetes.io/name=access,app.kubernetes.io/instance=$RELEASE" -o name)
    [ -n "$deployments" ] || die 4 "no Deployments of $RELEASE in $NAMESPACE to roll back"
    for d in $deployments; do kubectl -n "$NAMESPACE" rollout undo "$d" || die 5 "kubectl rollout undo $d failed"; done
    for d in $deployments; do
      kubectl -n "$NAMESPACE" rollout status "$d" --timeout=5m || die 5 "$d did not roll back; kubectl -n $NAMESPACE describe $d"
    done
  fi
  say "rolled back ($METHOD) in namespace $NAMESPACE"
  exit 0
fi

# --- resource definitions the manifests need (the VPA, the Prometheus operator, cert-manager) -----
RENDERED=$(if [ "$METHOD" = helm ]; then helm template "$RELEASE" "$CHART" "${HELM_ARGS[@]}" --set checkPrerequisites=false; else manifests; fi) \
  || die 5 "the manifests do not render; see the error above"
KINDS=$(sed -n 's/^kind: *//p' <<<"$RENDERED" | sort -u)
missing=()
need_crd() { kubectl get crd "$1" >/dev/null 2>&1 || missing+=("$1 ($2)"); }
if grep -qx VerticalPodAutoscaler <<<"$KINDS"; then need_crd verticalpodautoscalers.autoscaling.k8s.io "the VerticalPodAutoscaler"; fi
if grep -qx ServiceMonitor <<<"$KINDS"; then need_crd servicemonitors.monitoring.coreos.com "the Prometheus operator"; fi
if grep -qx PrometheusRule <<<"$KINDS"; then need_crd prometheusrules.monitoring.coreos.com "the Prometheus operator"; fi
if grep -q 'cert-manager.io/cluster-issuer' <<<"$RENDERED"; then need_crd clusterissuers.cert-manager.io "cert-manager, for ingress.clusterIssuer"; fi
[ ${#missing[@]} -eq 0 ] || die 4 "the cluster lacks resource definitions the $ENVIRONMENT manifests use: ${missing[*]}; install them first (docs/operations.md, Prerequisites)"

# --- namespace and secrets ----------------------------------------------------------------------
kubectl get namespace "$NAMESPACE" >/dev/null 2>&1 || kubectl create namespace "$NAMESPACE"
secret_exists() { kubectl -n "$NAMESPACE" get secret "$1" >/dev/null 2>&1; }
random() { head -c 48 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | head -c 32; }
if [ "$ENVIRONMENT" = production ]; then
  secret_exists access-secrets || die 4 "production reads its PostgreSQL DSN and client secret from Secret access-secrets (keys postgres-dsn, client-secret) in $NAMESPACE; create it first"
fi
if [ "$ENVIRONMENT" = staging ]; then
  secret_exists access-secrets || die 4 "staging reads its IdP client secret from Secret access-secrets (key client-secret) in $NAMESPACE; create it first"
fi
if [ "$ENVIRONMENT" = production ]; then
  :
elif [ "$METHOD" = helm ]; then
  # The chart renders these Secrets (generated values, kept across upgrades). One created by an
  # earlier kubectl deploy is handed to the release, so Helm adopts it (and keeps its values)
  # instead of refusing it as foreign.
  for s in access-dev-key postgres-secret grafana-secret; do
    secret_exists "$s" || continue
    owner=$(kubectl -n "$NAMESPACE" get secret "$s" -o jsonpath='{.metadata.annotations.meta\.helm\.sh/release-name}' 2>/dev/null || true)
    [ "$owner" = "$RELEASE" ] && continue
    [ -z "$owner" ] || die 4 "Secret $s in $NAMESPACE belongs to Helm release '$owner', not $RELEASE"
    kubectl -n "$NAMESPACE" annotate secret "$s" --overwrite "meta.helm.sh/release-name=$RELEASE" "meta.helm.sh/release-namespace=$NAMESPACE" >/dev/null
    kubectl -n "$NAMESPACE" label secret "$s" --overwrite app.kubernetes.io/managed-by=Helm >/dev/null
    say "Secret $s (made before by kubectl) is handed to Helm release $RELEASE; its values are kept"
  done
else
  needs() { grep -q "secretName: $1\$" <<<"$RENDERED"; }
  if needs access-dev-key && ! secret_exists access-dev-key; then
    command -v openssl >/dev/null || die 3 "openssl is needed to generate the dev key"
    key=$(mktemp)
    openssl ecparam -name prime256v1 -genkey -noout -out "$key"
    kubectl -n "$NAMESPACE" create secret generic access-dev-key --from-file=dev-key.pem="$key"
    rm -f "$key"
    say "created Secret access-dev-key (the dev signing key every role shares)"
  fi
  if needs postgres-secret && ! secret_exists postgres-secret; then
    pw=$(random) # letters and digits: nothing in the DSN needs escaping
    kubectl -n "$NAMESPACE" create secret generic postgres-secret \
      --from-literal=user=access --from-literal=database=access --from-literal=password="$pw" \
      --from-literal=dsn="postgres://access:$pw@postgres-service:5432/access"
    say "created Secret postgres-secret (generated password)"
  fi
  if needs grafana-secret && ! secret_exists grafana-secret; then
    kubectl -n "$NAMESPACE" create secret generic grafana-secret \
      --from-literal=admin-user=admin --from-literal=admin-password="$(random)"
    say "created Secret grafana-secret (generated admin password; read it with kubectl get secret)"
  fi
fi

# --- apply and wait -----------------------------------------------------------------------------
if [ "$METHOD" = helm ]; then
  helm upgrade --install "$RELEASE" "$CHART" "${HELM_ARGS[@]}" --wait --timeout 10m \
    || die 5 "helm upgrade failed; see helm history $RELEASE -n $NAMESPACE, and deploy-k8s.sh -m helm -r (helm rollback) to go back"
else
  manifests | kubectl apply -n "$NAMESPACE" -f - \
    || die 5 "kubectl apply failed (the objects before the error may be applied); fix the cause and run again"
  for d in $(kubectl -n "$NAMESPACE" get deployments -l "app.kubernetes.io/instance=$RELEASE" -o name); do
    kubectl -n "$NAMESPACE" rollout status "$d" --timeout=5m || die 5 "$d did not roll out; kubectl -n $NAMESPACE describe $d"
  done
fi
say "deployed ($METHOD, $ENVIRONMENT) to namespace $NAMESPACE"
kubectl -n "$NAMESPACE" get pods -l app.kubernetes.io/name=access
