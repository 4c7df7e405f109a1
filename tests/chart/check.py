#!/usr/bin/env python3
"""Offline checks of charts/access, the way chart maintainers check without a cluster.

For the default, dev, staging and prod values: render with Helm's own Go library (PyPI
helm-python-sdk), lint strictly, validate every object against the Kubernetes schemas
(kubernetes-validate, strict; kinds without a bundled schema are listed in
charts/access/ci/schema-skip.txt with the reason), run checkov on the rendered manifests (no failed
check; waivers live in the chart as checkov.io/skip annotations with their reason), and assert the
deployment guide's promises. Also: a typo in values fails the schema. Run by `make test`.
"""

import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile

import kubernetes_validate
import yaml
from helm_python import chart as helm

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "access"
KUBE_VERSION = "1.30.0"
NAMESPACE = "254carbon-access"
ENVS = {"default": None, "dev": "values-dev.yaml", "staging": "values-staging.yaml", "prod": "values-prod.yaml"}

# The guide's names, subcommands, ports and resources (requests/limits).
ROLES = {
    "gateway": ("gateway-deployment", "gateway", "gateway-service", 8000, 3, ("250m", "500m", "256Mi", "512Mi")),
    "stream": ("streaming-deployment", "streaming", "streaming-service", 8001, 2, ("500m", "1000m", "512Mi", "1Gi")),
    "auth": ("auth-deployment", "auth", "auth-service", 8010, 2, ("100m", "250m", "128Mi", "256Mi")),
    "entitlements": ("entitlements-deployment", "entitlements", "entitlements-service", 8011, 2, ("250m", "500m", "256Mi", "512Mi")),
    "metrics": ("metrics-deployment", "metrics", "metrics-service", 8012, 1, ("500m", "1000m", "512Mi", "1Gi")),
}

failures = []


def check(ok, what):
    if not ok:
        failures.append(what)


def values_for(env):
    """An environment's values as an offline render takes them: no cluster to show its APIs, so
    checkPrerequisites is off (prerequisites() checks it on)."""
    name = ENVS[env]
    values = helm.values_from_yaml((CHART / name).read_text()) if name else {}
    values["checkPrerequisites"] = False
    return values


def render(values):
    c = helm.Chart.load(str(CHART))
    values = {"checkPrerequisites": False, **values}  # offline: no cluster APIs (see kit())
    out = c.render(values, name="access", namespace=NAMESPACE, is_install=True)
    docs = []
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs, out.get("access/templates/NOTES.txt", "")


def skipped_kinds():
    kinds = {}
    for line in (CHART / "ci" / "schema-skip.txt").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            kind, _, reason = line.partition(" ")
            kinds[kind] = reason.strip()
    return kinds


def by(docs, kind, name):
    return next((d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name), None)


# Infrastructure and monitoring for non-production: the guide's names, ports and volume sizes.
INFRA = {
    "redis": ("redis-deployment", "redis-service", 6379, "redis-data", "1Gi"),
    "postgres": ("postgres-deployment", "postgres-service", 5432, "postgres-data", "5Gi"),
    "kafka": ("kafka-deployment", "kafka-service", 9092, "kafka-data", "5Gi"),
    "prometheus": ("prometheus-deployment", "prometheus-service", 9090, "prometheus-data", "10Gi"),
    "grafana": ("grafana-deployment", "grafana-service", 3000, "grafana-data", "5Gi"),
}


def infrastructure(env, docs):
    in_cluster = env in ("dev", "staging")
    for name, (deployment, service, port, pvc, size) in INFRA.items():
        d, s, p = by(docs, "Deployment", deployment), by(docs, "Service", service), by(docs, "PersistentVolumeClaim", pvc)
        if not in_cluster:
            check(d is None and s is None, f"{env}: no in-cluster {name}")
            continue
        check(d is not None and s is not None and s["spec"]["ports"][0]["port"] == port, f"{env}: {deployment} and {service}:{port}")
        check(p is not None and p["spec"]["resources"]["requests"]["storage"] == size, f"{env}: {pvc} of {size}")
    if in_cluster:
        pg = by(docs, "Secret", "postgres-secret")
        check(pg is not None and {"user", "database", "password", "dsn"} <= set(pg["data"]), f"{env}: postgres-secret with user, database, password, dsn")
        check(by(docs, "Secret", "grafana-secret") is not None, f"{env}: grafana-secret (generated admin password)")
        cm = by(docs, "ConfigMap", "access-config")["data"]
        check(cm.get("ACCESS_REDIS_URL") == "redis://redis-service:6379" and cm.get("ACCESS_KAFKA_BOOTSTRAP") == "kafka-service:9092", f"{env}: the roles use the in-cluster backends")
        prom = by(docs, "ConfigMap", "prometheus-config")["data"]
        check("access.rules.yaml" in prom and "kubernetes_sd_configs" in prom["prometheus.yml"], f"{env}: Prometheus discovers every pod and loads the rules")
        dash = by(docs, "ConfigMap", "grafana-dashboards")["data"]
        check({"access-gateway.json", "access-stream.json", "access-layer.json"} <= set(dash), f"{env}: the three dashboards are provisioned")
    else:
        check(by(docs, "ServiceMonitor", "access") is not None and by(docs, "PrometheusRule", "access") is not None, f"{env}: ServiceMonitor and PrometheusRule for the operator")


def guide_promises(env, docs, notes):
    v = values_for(env)
    for role, (deployment, container, service, port, replicas, (req_cpu, lim_cpu, req_mem, lim_mem)) in ROLES.items():
        d = by(docs, "Deployment", deployment)
        check(d is not None, f"{env}: Deployment {deployment}")
        if d is None:
            continue
        pod = d["spec"]["template"]["spec"]
        c = pod["containers"][0]
        check(c["name"] == container, f"{env}: {deployment} container is {container}")
        check(c["args"][0] == (role if role != "stream" else "stream") and str(port) in c["args"], f"{env}: {deployment} runs `access {role} --port {port}`: {c['args']}")
        check(c["ports"][0]["containerPort"] == port, f"{env}: {deployment} port {port}")
        live, ready = c["livenessProbe"], c["readinessProbe"]
        check(live["httpGet"]["path"] == "/health" and live["initialDelaySeconds"] == 30 and live["periodSeconds"] == 10, f"{env}: {deployment} liveness /health 30s/10s")
        check(ready["httpGet"]["path"] == "/ready" and ready["initialDelaySeconds"] == 5 and ready["periodSeconds"] == 5, f"{env}: {deployment} readiness /ready 5s/5s")
        sc = c["securityContext"]
        check(sc["runAsUser"] == 1000 and sc["runAsNonRoot"] and sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"] and sc["capabilities"]["drop"] == ["ALL"] and sc["seccompProfile"]["type"] == "RuntimeDefault", f"{env}: {deployment} security context")
        check(pod["enableServiceLinks"] is False, f"{env}: {deployment} enableServiceLinks false")
        check("checksum/config" in d["spec"]["template"]["metadata"]["annotations"], f"{env}: {deployment} rolls on config change")
        if env == "default":
            r = c["resources"]
            check((r["requests"]["cpu"], r["limits"]["cpu"], r["requests"]["memory"], r["limits"]["memory"]) == (req_cpu, lim_cpu, req_mem, lim_mem), f"default: {deployment} resources {r}")
            hpa = by(docs, "HorizontalPodAutoscaler", deployment)
            count = hpa["spec"]["minReplicas"] if hpa else d["spec"]["replicas"]
            check(count == replicas, f"default: {deployment} has {replicas} replicas (got {count})")
        s = by(docs, "Service", service)
        check(s is not None and s["spec"]["ports"][0]["port"] == port, f"{env}: Service {service}:{port}")
        check(f"svc/{service}" in notes, f"{env}: NOTES has the port-forward line for {service}")
    cm = by(docs, "ConfigMap", "access-config")
    for key in ["ACCESS_ENV", "ACCESS_LOG_LEVEL", "ACCESS_AUTH_SERVICE_URL", "ACCESS_ENTITLEMENTS_SERVICE_URL", "ACCESS_METRICS_SERVICE_URL", "ACCESS_ENABLE_TRACING"]:
        check(key in cm["data"], f"{env}: access-config has {key}")
    if env in ("staging", "prod"):
        for key in ["ACCESS_REDIS_URL", "ACCESS_KAFKA_BOOTSTRAP", "ACCESS_JWKS_URL"]:
            check(key in cm["data"], f"{env}: access-config has {key}")
    if env == "prod":
        check(cm["data"]["ACCESS_ENV"] == "production", "prod: ACCESS_ENV=production")
        check(by(docs, "Secret", "access-dev-key") is None, "prod: no dev key")
    api, stream = by(docs, "Ingress", "access-api"), by(docs, "Ingress", "access-stream")
    hosts = v.get("ingress", {})
    api_host = hosts.get("api", {}).get("host", "api.254carbon.local")
    stream_host = hosts.get("stream", {}).get("host", "stream.254carbon.local")
    check(api["spec"]["rules"][0]["host"] == api_host, f"{env}: api ingress host {api_host}")
    api_paths = {p["path"]: p["backend"]["service"]["name"] for p in api["spec"]["rules"][0]["http"]["paths"]}
    check(api_paths.get("/health") == "gateway-service" and "/api/v1/prices" in api_paths, f"{env}: api ingress paths {api_paths}")
    check(not any(p.startswith("/api/v1/status") or p.startswith("/api/v1/cache") or p == "/api" for p in api_paths), f"{env}: admin endpoints are not exposed")
    stream_paths = {p["path"]: p["backend"]["service"]["name"] for p in stream["spec"]["rules"][0]["http"]["paths"]}
    check(stream["spec"]["rules"][0]["host"] == stream_host and stream_paths == {"/ws/": "streaming-service", "/sse/": "streaming-service"}, f"{env}: stream ingress {stream_paths}")
    ann = stream["metadata"]["annotations"]
    check(ann.get("nginx.ingress.kubernetes.io/proxy-buffering") == "off" and int(ann["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 3600, f"{env}: stream ingress annotations for WebSockets/SSE")
    if v.get("ingress", {}).get("clusterIssuer"):
        check("cert-manager.io/cluster-issuer" in api["metadata"]["annotations"] and api["spec"].get("tls"), f"{env}: TLS through cert-manager")
    check(any(d["kind"] == "Pod" and d["metadata"].get("annotations", {}).get("helm.sh/hook") == "test" for d in docs), f"{env}: a helm test pod")
    check(len([d for d in docs if d["kind"] == "PodDisruptionBudget"]) >= (4 if env != "dev" else 0), f"{env}: PodDisruptionBudgets")
    policies = {d["metadata"]["name"] for d in docs if d["kind"] == "NetworkPolicy"}
    check({r[0] for r in ROLES.values()} <= policies, f"{env}: a NetworkPolicy per role")


# What each backend image needs of its pod, from the image's documentation (they cannot be pulled
# and run here): the user it runs as, the paths it writes (each must be a volume under a read-only
# root), and where its data lives (strictly below the volume's root: an ext4 volume's root holds
# lost+found, which Kafka and PostgreSQL's initdb refuse).
IMAGE_CONTRACTS = {
    # apache/kafka (docker/ in apache/kafka): runs as appuser 1000; /etc/kafka/docker/run writes
    # /opt/kafka/config/server.properties (and log4j files) from KAFKA_* at every start;
    # kafka-run-class.sh writes /opt/kafka/logs; CLUSTER_ID must be Uuid.toString(): 16 bytes in
    # 22 base64url characters.
    "kafka": {"uid": 1000, "writes": ["/opt/kafka/config", "/opt/kafka/logs", "/tmp"], "data_env": "KAFKA_LOG_DIRS"},
    # postgres:16-alpine: postgres is UID 70; PGDATA below the mount (the image's docs: "a
    # subdirectory ... if the mount point is a volume"); the socket in /var/run/postgresql.
    "postgres": {"uid": 70, "writes": ["/var/lib/postgresql/data", "/var/run/postgresql", "/tmp"], "data_env": "PGDATA"},
    # redis:7-alpine: redis is UID 999; data in /data (the image's WORKDIR and VOLUME).
    "redis": {"uid": 999, "writes": ["/data"], "data_arg": "--dir"},
}


def kafka_cluster_id_ok(value):
    import base64
    import re
    if not re.fullmatch(r"[A-Za-z0-9_-]{22}", value or ""):
        return False
    raw = base64.urlsafe_b64decode(value + "==")
    return len(raw) == 16 and base64.urlsafe_b64encode(raw).rstrip(b"=").decode() == value


def infra_contracts(env, docs):
    """The backends' pods against their images' contracts (IMAGE_CONTRACTS)."""
    for name, contract in IMAGE_CONTRACTS.items():
        d = by(docs, "Deployment", f"{name}-deployment")
        if d is None:
            continue
        pod = d["spec"]["template"]["spec"]
        c = pod["containers"][0]
        sc = c["securityContext"]
        check(sc.get("runAsUser") == contract["uid"] and pod["securityContext"].get("fsGroup") == contract["uid"], f"{env}: {name} runs as the image's user {contract['uid']}")
        mounts = {m["mountPath"] for m in c.get("volumeMounts", []) if not m.get("readOnly")}
        if sc.get("readOnlyRootFilesystem"):
            for path in contract["writes"]:
                check(any(path == m or path.startswith(m + "/") for m in mounts), f"{env}: {name} writes {path}, which is no volume under its read-only root")
        env_vars = {e["name"]: e.get("value") for e in c.get("env", [])}
        if "data_env" in contract:
            data = env_vars.get(contract["data_env"], "")
            check(any(data.startswith(m + "/") for m in mounts), f"{env}: {name}'s {contract['data_env']}={data} is not strictly below a volume's root")
        if "data_arg" in contract:
            args = c.get("args", [])
            data = args[args.index(contract["data_arg"]) + 1] if contract["data_arg"] in args else ""
            check(data in mounts, f"{env}: {name}'s data directory {data} is not its volume")
        if name == "kafka":
            check(kafka_cluster_id_ok(env_vars.get("CLUSTER_ID")), f"{env}: Kafka's CLUSTER_ID {env_vars.get('CLUSTER_ID')!r} is not a UUID in 22 base64url characters")
            check(env_vars.get("KAFKA_PROCESS_ROLES") == "broker,controller" and "CONTROLLER" in env_vars.get("KAFKA_LISTENERS", ""), f"{env}: Kafka is one KRaft broker-controller")


def matches(selector, labels):
    ok = all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())
    for e in selector.get("matchExpressions") or []:
        if e["operator"] == "In":
            ok = ok and labels.get(e["key"]) in e["values"]
    return ok


def selectors(env, docs):
    """Only the roles carry app.kubernetes.io/name=access; a backend admits the roles alone (not
    Prometheus, Grafana or the test pod); auth and metrics admit platform namespaces."""
    pods = {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"] for d in docs if d["kind"] == "Deployment"}
    pods["access-test-ready"] = next((d["metadata"]["labels"] for d in docs if d["kind"] == "Pod"), {})
    roles = {r[0] for r in ROLES.values()}
    for name, labels in pods.items():
        if name not in roles and name != "access-test-ready":
            check(labels.get("app.kubernetes.io/name") != "access", f"{env}: {name} carries the layer's app.kubernetes.io/name=access")
    for backend in ("redis", "postgres", "kafka"):
        policy = by(docs, "NetworkPolicy", backend)
        if policy is None:
            continue
        admitted = {name for name, labels in pods.items() for rule in policy["spec"]["ingress"] for src in rule["from"] if "podSelector" in src and matches(src["podSelector"], labels)}
        check(admitted == roles, f"{env}: {backend} admits exactly the roles: {sorted(admitted)}")
    for deployment in ("auth-deployment", "metrics-deployment"):
        policy = by(docs, "NetworkPolicy", deployment)
        sources = [src for rule in policy["spec"]["ingress"] for src in rule["from"]] if policy else []
        platform = [s for s in sources if "namespaceSelector" in s and s["namespaceSelector"]["matchLabels"] not in ({"kubernetes.io/metadata.name": n} for n in ["monitoring", "ingress-nginx"])]
        check(policy is None or platform, f"{env}: {deployment} admits no platform namespace")


def render_error(values):
    """The chart's refusal of these values (None when it renders)."""
    try:
        render({"checkPrerequisites": False, **values})
        return None
    except Exception as e:  # noqa: BLE001 - the refusal's text is what is checked
        return str(e)


def kit():
    """The deployment guide's values work as written, and the kit's combinations that would
    install and not work are refused, each naming the value to set."""
    import urllib.parse

    def rendered(values, what):
        """The docs, or a failure recorded (and an empty list) when the chart refuses them."""
        try:
            return render({"checkPrerequisites": False, **values})[0]
        except Exception as e:  # noqa: BLE001 - reported as the failure it is
            failures.append(f"{what}: the chart refuses it: {str(e)[-300:]}")
            return []

    def find(docs, kind, name):
        return by(docs, kind, name) or {"metadata": {"labels": {}}, "data": {}, "stringData": {}, "spec": {}}
    default = rendered({}, "default values")
    cm = find(default, "ConfigMap", "access-config")["data"]
    check(cm.get("ACCESS_REDIS_URL") and cm.get("ACCESS_KAFKA_BOOTSTRAP") and by(default, "Deployment", "postgres-deployment"), "default: the multi-replica install brings Redis, PostgreSQL and Kafka")
    off = {"infrastructure": {"redis": {"enabled": False}, "postgres": {"enabled": False}, "kafka": {"enabled": False}}}
    err = render_error({"infrastructure": {"redis": {"enabled": False}}})
    check(err and "infrastructure.redis.enabled=true" in err and "config.redisUrl" in err, f"default replicas without Redis are refused, naming the value: {err}")
    err = render_error({"infrastructure": {"postgres": {"enabled": False}}})
    check(err and "infrastructure.postgres.enabled=true" in err, f"two entitlements replicas without PostgreSQL are refused: {err}")
    err = render_error({"infrastructure": {"kafka": {"enabled": False}}})
    check(err and "config.kafkaBootstrap" in err, f"two stream replicas without Kafka are refused: {err}")
    one = {**off, "roles": {r: {"replicaCount": 1, "autoscaling": {"enabled": False}} for r in ("gateway", "stream", "auth", "entitlements")}}
    one["roles"] = {"gateway": {"enabled": True, "replicaCount": 1, "autoscaling": {"enabled": False}}, **{r: {"enabled": False} for r in ("stream", "auth", "entitlements", "metrics")}}
    check(render_error(one) is None, f"one pod on in-process stores renders: {render_error(one)}")
    # The guide's customisation block: top-level role keys.
    guide = {"gateway": {"replicaCount": 5, "resources": {"requests": {"cpu": "500m", "memory": "512Mi"}, "limits": {"cpu": "1", "memory": "1Gi"}},
                         "autoscaling": {"minReplicas": 5, "maxReplicas": 20}},
             "streaming": {"autoscaling": {"enabled": False}, "replicaCount": 4},
             "auth": {"replicaCount": 3, "autoscaling": {"enabled": False}},
             "entitlements": {"autoscaling": {"minReplicas": 3, "maxReplicas": 6}}, "metrics": {"resources": {"limits": {"memory": "2Gi"}}}}
    err = render_error(guide)
    check(err is None, f"the guide's customisation block (top-level role keys) renders: {err}")
    if err is None:
        docs = rendered(guide, "the guide's block")
        hpa = find(docs, "HorizontalPodAutoscaler", "gateway-deployment")
        gw = find(docs, "Deployment", "gateway-deployment")["spec"]["template"]["spec"]["containers"][0]["resources"]
        check(hpa["spec"]["minReplicas"] == 5 and hpa["spec"]["maxReplicas"] == 20 and gw["limits"]["cpu"] == "1" and gw["requests"]["memory"] == "512Mi", f"gateway.* of the guide applies: {hpa['spec']} {gw}")
        check(find(docs, "Deployment", "streaming-deployment")["spec"].get("replicas") == 4 and by(docs, "HorizontalPodAutoscaler", "streaming-deployment") is None, "streaming.* of the guide applies (autoscaling off, 4 replicas)")
        check(find(docs, "Deployment", "auth-deployment")["spec"].get("replicas") == 3, "auth.replicaCount of the guide applies")
        mem = find(docs, "Deployment", "metrics-deployment")["spec"]["template"]["spec"]["containers"][0]["resources"]
        check(mem["limits"] == {"cpu": "1000m", "memory": "2Gi"}, f"metrics.resources of the guide merges key by key: {mem}")
    check(render_error({"gateway": {"replicas": 5}}) is not None, "the schema refuses a misspelt key in the guide's form too")
    # TLS from Secrets: the gateway mounts each upstream group's Secret and names its files;
    # every role mounts the backends' CA bundles; the binary accepts what it reads.
    # (Groups given in the environment replace the built-in ones: the routes' three are named.)
    tls_values = {"config": {"extra": {"ACCESS_GATEWAY__UPSTREAMS__MARKET_DATA": '["https://market-data.internal:8443"]',
                                       "ACCESS_GATEWAY__UPSTREAMS__CURVES": '["http://curves:8080"]',
                                       "ACCESS_GATEWAY__UPSTREAMS__PROJECTIONS": '["http://projections:8080"]'}},
                  "tls": {"upstreams": {"market_data": {"secretName": "md-mtls", "clientCertificate": True, "serverName": "market-data.internal", "http2": False}},
                          "backends": {"redis": {"caSecret": "redis-ca"}, "postgres": {"caSecret": "pg-ca"}, "kafka": {"caSecret": ""}}}}
    docs = rendered(tls_values, "upstream and backend TLS from Secrets")
    if docs:
        pod = find(docs, "Deployment", "gateway-deployment")["spec"]["template"]["spec"]
        env = {e["name"]: e["value"] for e in pod["containers"][0]["env"]}
        var = "ACCESS_GATEWAY__UPSTREAM_TLS__MARKET_DATA__"
        check(env.get(var + "CA_FILE") == "/var/run/secrets/access-tls/upstream-market_data/ca.crt"
              and env.get(var + "CLIENT_KEY_FILE", "").endswith("/tls.key") and env.get(var + "SERVER_NAME") == "market-data.internal"
              and env.get(var + "HTTP2") == "false" and env.get("ACCESS_REDIS__CA_FILE") and env.get("ACCESS_POSTGRES__CA_FILE") and "ACCESS_KAFKA__CA_FILE" not in env,
              f"tls: the gateway's TLS variables: {env}")
        volumes = {v["name"]: v for v in pod["volumes"]}
        check(volumes.get("upstream-tls-market-data", {}).get("secret", {}).get("secretName") == "md-mtls" and "redis-ca" in volumes,
              f"tls: the gateway mounts the Secrets: {sorted(volumes)}")
        stream = find(docs, "Deployment", "streaming-deployment")["spec"]["template"]["spec"]
        stream_env = {e["name"] for e in stream["containers"][0]["env"]}
        check("ACCESS_REDIS__CA_FILE" in stream_env and not any(n.startswith(var) for n in stream_env)
              and "upstream-tls-market-data" not in {v["name"] for v in stream["volumes"]},
              "tls: the backends' CA reaches every role, the upstream certificates only the gateway")
        config_accepted("upstream and backend TLS", docs)
    check(render_error({"tls": {"upstreams": {"Market-Data": {"secretName": "x"}}}}) is not None, "tls: an upstream group name the environment cannot carry is refused")
    # The guide's env files: environment and logLevel under config; production logs at warn.
    prod = rendered(values_for("prod"), "prod")
    pcm = find(prod, "ConfigMap", "access-config")["data"]
    check(pcm["ACCESS_ENV"] == "production" and pcm["ACCESS_LOG_LEVEL"] == "warn", f"prod: config.environment and config.logLevel (warn): {pcm['ACCESS_ENV']} {pcm['ACCESS_LOG_LEVEL']}")
    # One Redis URL: the Secret's wins over the in-cluster Redis or config.redisUrl.
    for values in ({"secrets": {"redisUrl": "redis://:pw@redis-service:6379"}}, {"config": {"redisUrl": "redis://r:6379"}, "secrets": {"redisUrl": "redis://:pw@r:6379"}}):
        docs = rendered(values, f"a Redis secret beside {list(values)}")
        rcm = find(docs, "ConfigMap", "access-config")["data"]
        env_names = {e["name"] for e in find(docs, "Deployment", "gateway-deployment")["spec"]["template"]["spec"]["containers"][0]["env"]}
        check("ACCESS_REDIS_URL" not in rcm and "ACCESS_REDIS_URL_FILE" in env_names, f"a Redis secret beside {list(values)}: one of ACCESS_REDIS_URL and _FILE, not both")
        config_accepted(f"redis secret beside {list(values)}", docs)
    # The generated DSN percent-encodes the password.
    password = "p@ss:w/rd #1?&%+"
    docs = rendered({"infrastructure": {"postgres": {"enabled": True, "password": password}}}, "a postgres password")
    import base64
    dsn = base64.b64decode(find(docs, "Secret", "postgres-secret")["data"]["dsn"]).decode()
    parsed = urllib.parse.urlsplit(dsn)
    check(parsed.hostname == "postgres-service" and parsed.path == "/access" and urllib.parse.unquote(parsed.password or "") == password, f"the DSN escapes the password: {dsn}")
    # An ACME issuer cannot issue for .local names; staging uses a private CA.
    err = render_error({"ingress": {"clusterIssuer": "letsencrypt-staging", "api": {"host": "api.staging.254carbon.local"}}})
    check(err and "not a public DNS name" in err, f"letsencrypt for a .local host is refused: {err}")
    check("letsencrypt" not in values_for("staging")["ingress"]["clusterIssuer"], "staging's .local hosts use a private CA issuer")
    # kube-prometheus-stack selects ServiceMonitors and PrometheusRules by its release label.
    for kind in ("ServiceMonitor", "PrometheusRule"):
        o = find(prod, kind, "access")
        check(o["metadata"]["labels"].get("release") == "kube-prometheus-stack", f"prod: the {kind} has the release label kube-prometheus-stack selects on")
    # Alerts reach someone: Alertmanager (off by default) with a receiver, or an existing one.
    check(by(default, "Deployment", "alertmanager-deployment") is None, "default: no Alertmanager")
    err = render_error({"monitoring": {"prometheus": {"enabled": True}, "alertmanager": {"enabled": True}}})
    check(err and "receiver.webhookUrl" in err, f"an Alertmanager without a receiver is refused: {err}")
    docs = rendered({"monitoring": {"prometheus": {"enabled": True}, "alertmanager": {"enabled": True, "receiver": {"webhookUrl": "https://hooks.example.com/alerts"}}}}, "an Alertmanager")
    prom = yaml.safe_load(find(docs, "ConfigMap", "prometheus-config")["data"].get("prometheus.yml") or "{}")
    amcfg = yaml.safe_load(find(docs, "Secret", "alertmanager-config")["stringData"].get("alertmanager.yml") or '{"receivers": [{"webhook_configs": [{}]}], "route": {}}')
    check(prom.get("alerting", {}).get("alertmanagers", [{}])[0].get("static_configs", [{}])[0].get("targets") == ["alertmanager-service:9093"]
          and by(docs, "Service", "alertmanager-service") and amcfg["receivers"][0]["webhook_configs"][0].get("url") == "https://hooks.example.com/alerts"
          and amcfg["route"].get("receiver") == "access", f"Prometheus sends alerts to the shipped Alertmanager, which sends them to the receiver: {prom.get('alerting')} {amcfg}")
    docs = rendered({"monitoring": {"prometheus": {"enabled": True, "alertmanagerUrl": "http://alertmanager-operated.monitoring:9093"}}}, "an existing Alertmanager")
    prom = yaml.safe_load(find(docs, "ConfigMap", "prometheus-config")["data"].get("prometheus.yml") or "{}")
    check(prom.get("alerting", {}).get("alertmanagers", [{}])[0].get("static_configs", [{}])[0].get("targets") == ["alertmanager-operated.monitoring:9093"], f"Prometheus routes to an existing Alertmanager: {prom.get('alerting')}")
    # Prerequisites Helm can see: without the cluster's APIs production is refused, naming them.
    for values, needle in ((values_for("prod"), "VerticalPodAutoscaler"), ({"monitoring": {"serviceMonitor": {"enabled": True}}}, "monitoring.coreos.com"),
                           ({"ingress": {"clusterIssuer": "254carbon-internal-ca"}}, "cert-manager")):
        try:
            render({**values, "checkPrerequisites": True})
            failures.append(f"checkPrerequisites: rendered without {needle}'s API")
        except Exception as e:  # noqa: BLE001
            check(needle in str(e), f"checkPrerequisites names {needle}: {e}")
    # Staging without a service-token client: the gateway and stream would exit 1 at start.
    err = render_error({"config": {"jwksUrl": "https://idp/certs"}})
    check(err and "config.tokenUrl" in err, f"a JWKS without a service-token client is refused: {err}")
    # The console: off by default; on, the auth role is told where the gateway and the stream
    # are, writes its dev code under the writable /tmp, and may call every role.
    check("ACCESS_CONSOLE__ENABLED" not in cm, "default: no console")
    docs = rendered({"console": {"enabled": True, "oidcClientId": "access-console"}}, "the console")
    ccm = find(docs, "ConfigMap", "access-config")["data"]
    check(ccm.get("ACCESS_CONSOLE__ENABLED") == "true" and ccm.get("ACCESS_CONSOLE__GATEWAY_URL") == "http://gateway-service:8000"
          and ccm.get("ACCESS_CONSOLE__STREAM_URL") == "http://streaming-service:8001" and ccm.get("ACCESS_CONSOLE__DEV_CODE_FILE") == "/tmp/console-code"
          and ccm.get("ACCESS_CONSOLE__OIDC_CLIENT_ID") == "access-console", f"console.enabled configures the console: {ccm}")
    for deployment in ("gateway-deployment", "streaming-deployment", "entitlements-deployment", "metrics-deployment"):
        sources = find(docs, "NetworkPolicy", deployment)["spec"].get("ingress", [{}])[0].get("from", [])
        check({"podSelector": {"matchLabels": {"app.kubernetes.io/name": "access", "app.kubernetes.io/component": "auth"}}} in sources,
              f"console.enabled: the auth pods (the console's relay) may call {deployment}")
    if docs:
        config_accepted("console", docs)
    print("kit: the guide's values and the refusals hold")


# Stand-ins for the Secret files a cluster would mount, so the binary can read its whole config.
SECRET_STANDINS = {
    "postgres-dsn": "postgres://access@postgres-service:5432/access",
    "redis-url": "redis://:password@redis-service:6379",
    "client-secret": "a-client-secret",
    "kafka-sasl-password": "a-password",
    "dsn": "postgres://access:generated@postgres-service:5432/access",
}


def tls_standins(directory):
    """A CA (ca.crt) and a client certificate signed by it (tls.crt, tls.key) made by openssl:
    what a TLS Secret mounted under /var/run/secrets/access-tls/<name>/ holds."""
    directory.mkdir(parents=True, exist_ok=True)
    def openssl(*args):
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "1", "-subj", "/CN=chart check ca",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign")
    openssl("req", *ec, "-keyout", "tls.key", "-out", "tls.csr", "-subj", "/CN=chart check client")
    (directory / "tls.ext").write_text("basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n")
    openssl("x509", "-req", "-in", "tls.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-days", "1", "-out", "tls.crt", "-extfile", "tls.ext")


def config_accepted(env, docs):
    """Every role's rendered configuration passes `access check-config` (the strict loader)."""
    target = os.environ.get("CARGO_TARGET_DIR") or str(pathlib.Path.home() / ".cache/access/target")
    binary = os.environ.get("ACCESS_BIN") or str(pathlib.Path(target) / "debug" / "access")
    if not pathlib.Path(binary).exists():
        failures.append(f"{env}: no access binary at {binary} to check the rendered config (build first)")
        return
    work = pathlib.Path(tempfile.mkdtemp(prefix=f"access-config-{env}-"))
    files = by(docs, "ConfigMap", "access-files")["data"]
    for name, text in files.items():
        (work / name).write_text(text.replace("/etc/access", str(work)))
    for name, value in SECRET_STANDINS.items():
        (work / name).write_text(value)
    tls_dir = work / "tls"
    tls_standins(tls_dir)
    base = dict(by(docs, "ConfigMap", "access-config")["data"])
    for role, (deployment, *_rest) in ROLES.items():
        container = by(docs, "Deployment", deployment)["spec"]["template"]["spec"]["containers"][0]
        env_vars = dict(base)
        for e in container.get("env", []):
            value = e["value"]
            value = re.sub(r"/var/run/secrets/access-tls/[^/]+/", f"{tls_dir}/", value)
            for mount in ("/var/run/secrets/access-dev-key", "/var/run/secrets/access", "/var/run/secrets/postgres"):
                value = value.replace(mount, str(work))
            env_vars[e["name"]] = value
        args = [a.replace("/etc/access", str(work)) for a in container["args"]]
        r = subprocess.run([binary, *args[1:3], "check-config"], env={**env_vars, "PATH": "/usr/bin:/bin"}, capture_output=True, text=True)
        check(r.returncode == 0, f"{env}: {deployment}'s rendered configuration is refused by the binary: {r.stderr.strip()}")


def exported_metrics():
    """The metric names the code exports: the `access_*` name constants under src/."""
    import re
    names = set()
    for path in (ROOT / "src").rglob("*.rs"):
        names.update(re.findall(r'"(access_[a-z0-9_]+)"', path.read_text()))
    # Pushed by the gateway and stream into the metrics role, which exports them.
    names.update({"access_usage_requests_total", "access_usage_bytes_total", "access_usage_messages_total"})
    return names


def metric_names(expr):
    """The series names a PromQL expression reads (label names and functions skipped)."""
    import re
    expr = re.sub(r'\{[^}]*\}', "", expr)  # label matchers
    expr = re.sub(r'"[^"]*"', "", expr)
    expr = re.sub(r'\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)', "", expr)
    tokens = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr))
    return {t for t in tokens if t.startswith("access_") or ":" in t or t == "up"}


def monitoring():
    """promtool passes the rules; the dashboards parse; every metric they read is exported (or
    recorded by a rule)."""
    rules_dir = CHART / "files" / "rules"
    for path in rules_dir.glob("*.yaml"):
        r = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True)
        check(r.returncode == 0, f"promtool check rules {path.name}: {r.stdout}{r.stderr}")
    exported = exported_metrics()
    recorded, exprs = set(), []
    for path in rules_dir.glob("*.yaml"):
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                if "record" in rule:
                    recorded.add(rule["record"])
                exprs.append((f"{path.name}: {rule.get('record') or rule.get('alert')}", rule["expr"]))
    dashboards = list((CHART / "files" / "dashboards").glob("*.json"))
    check(len(dashboards) == 3, "three dashboards: gateway, stream, layer")
    for path in dashboards:
        try:
            board = json.loads(path.read_text())
        except ValueError as e:
            failures.append(f"{path.name} does not parse: {e}")
            continue
        check(board.get("uid") and board.get("panels"), f"{path.name}: a uid and panels")
        for panel in board["panels"]:
            for target in panel.get("targets", []):
                exprs.append((f"{path.name}: {panel['title']}", target["expr"]))
    checked = 0
    for where, expr in exprs:
        for name in metric_names(expr):
            checked += 1
            if name == "up":
                continue
            if ":" in name:
                check(name in recorded, f"{where}: {name} is recorded by no rule")
                continue
            base = name
            for suffix in ("_bucket", "_sum", "_count"):
                if name.endswith(suffix) and name[: -len(suffix)] in exported:
                    base = name[: -len(suffix)]
            check(base in exported, f"{where}: {name} is not a metric the code exports")
    check(checked > 40, f"the name comparison read only {checked} names")
    print(f"monitoring: rules pass promtool; {len(dashboards)} dashboards parse; {checked} metric references all exported or recorded")


def deploy_script():
    """deploy/deploy-k8s.sh: dry runs print locally rendered manifests and call no kubectl; without
    a cluster it stops before acting with a clear message; the committed plain manifests are what
    the chart renders now (no drift)."""
    script = str(ROOT / "deploy" / "deploy-k8s.sh")
    # The deploy kit's one stand-in for a cluster (tests/deploy/fakecluster.py), with no cluster
    # answering: it logs every call, so a dry run that touched kubectl shows.
    state = pathlib.Path(tempfile.mkdtemp(prefix="unreachable-cluster-"))
    calls = state / "calls.log"
    bin_dir = state / "bin"
    bin_dir.mkdir()
    (bin_dir / "kubectl").symlink_to(ROOT / "tests" / "deploy" / "fakecluster.py")
    base_path = os.environ.get("PATH", "/usr/bin:/bin")
    with_fake = {**os.environ, "PATH": f"{bin_dir}:{base_path}", "FAKE_CLUSTER": str(state), "FAKE_CLUSTER_UNREACHABLE": "1"}
    # A PATH with bash and nothing else: no kubectl, whatever this machine has installed.
    bare = pathlib.Path(tempfile.mkdtemp(prefix="bare-path-"))
    (bare / "bash").symlink_to(subprocess.run(["bash", "-c", "command -v bash"], capture_output=True, text=True).stdout.strip())
    no_kubectl = {**os.environ, "PATH": str(bare)}

    def run(args, env):
        return subprocess.run([script, *args], capture_output=True, text=True, env=env)

    r = run(["-h"], with_fake)
    check(r.returncode == 0 and "-m METHOD" in r.stdout, f"deploy-k8s.sh -h: {r.stdout}{r.stderr}")
    for env in ("dev", "staging", "production"):
        committed = pathlib.Path(ROOT / "deploy" / "k8s" / env)
        with tempfile.TemporaryDirectory() as fresh:
            subprocess.run([sys.executable, str(ROOT / "scripts" / "render-chart.py"), "--env", env, "--plain", "--out", fresh], check=True, capture_output=True)
            now = {p.name: p.read_text() for p in pathlib.Path(fresh).glob("*.yaml")}
        then = {p.name: p.read_text() for p in committed.glob("*.yaml")}
        drift = sorted(set(now) ^ set(then)) + sorted(n for n in set(now) & set(then) if now[n] != then[n])
        check(not drift, f"deploy/k8s/{env} drifted from the chart (run make manifests): {drift[:5]}")
        for method in ("kubectl", "helm"):
            r = run(["-d", "-m", method, "-e", env], with_fake)
            docs = [d for d in yaml.safe_load_all(r.stdout) if d] if r.returncode == 0 else []
            names = {(d["kind"], d["metadata"]["name"]) for d in docs}
            check(r.returncode == 0 and ("Deployment", "gateway-deployment") in names, f"deploy-k8s.sh -d -m {method} -e {env}: {r.returncode} {r.stderr[-300:]}")
            if method == "kubectl":
                check(len(docs) == len(then), f"deploy-k8s.sh -d -m kubectl -e {env} prints the {len(then)} committed manifests ({len(docs)})")
    check(not calls.exists(), f"a dry run called kubectl: {calls.read_text() if calls.exists() else ''}")
    r = run(["-m", "kubectl", "-e", "staging"], with_fake)
    check(r.returncode == 3 and "no reachable Kubernetes cluster" in r.stderr, f"no cluster: {r.returncode} {r.stderr}")
    made = calls.read_text().split("\n") if calls.exists() else []
    check(all(c.startswith("kubectl cluster-info") or not c for c in made), f"without a cluster it acted anyway: {made}")
    r = run(["-m", "kubectl"], no_kubectl)
    check(r.returncode == 3 and "kubectl is not installed" in r.stderr, f"no kubectl: {r.returncode} {r.stderr}")
    r = run(["-e", "qa"], with_fake)
    check(r.returncode == 2 and "-e must be" in r.stderr, f"bad -e: {r.returncode} {r.stderr}")
    print("deploy-k8s.sh: dry runs render locally and touch nothing; no cluster stops it with exit 3; deploy/k8s matches the chart")


def backups():
    """make db-backup / db-restore against the machine's PostgreSQL: a private database with the
    layer's migrations and a rule; backup; change it; restore; the rule is back, the change gone."""
    import uuid
    db = f"access_backup_{uuid.uuid4().hex[:12]}"
    admin = ["psql", "-h", "127.0.0.1", "-U", "postgres", "-v", "ON_ERROR_STOP=1", "-q"]
    dsn = f"postgres://postgres@127.0.0.1:5432/{db}"
    sql = lambda q: subprocess.run([*admin, "-d", db, "-At", "-c", q], capture_output=True, text=True, check=True).stdout.strip()
    subprocess.run([*admin, "-d", "postgres", "-c", f"CREATE DATABASE {db}"], check=True, capture_output=True)
    try:
        for m in sorted((ROOT / "migrations").glob("*.sql")):
            subprocess.run([*admin, "-d", db, "-f", str(m)], check=True, capture_output=True)
        rule = "INSERT INTO access_rules VALUES ('{id}', '{{\"name\": \"{name}\"}}', 't1', NULL, 'instrument:*', now(), now(), 1)"
        sql(rule.format(id=uuid.uuid4(), name="kept"))
        env = {**os.environ, "ACCESS_POSTGRES_DSN": dsn}
        out = pathlib.Path(tempfile.mkdtemp(prefix="access-backup-"))
        r = subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), "db-backup", f"BACKUP_DIR={out}"], capture_output=True, text=True, env=env)
        dumps = list(out.glob("access-*.dump"))
        check(r.returncode == 0 and len(dumps) == 1, f"make db-backup: {r.returncode} {r.stdout}{r.stderr}")
        if not dumps:
            return
        sql("DELETE FROM access_rules")
        sql(rule.format(id=uuid.uuid4(), name="after the backup"))
        r = subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), "db-restore", f"FILE={dumps[0]}"], capture_output=True, text=True, env=env)
        check(r.returncode == 0, f"make db-restore: {r.stdout}{r.stderr}")
        names = sql("SELECT rule->>'name' FROM access_rules ORDER BY 1")
        check(names == "kept", f"after the restore the rules are the backup's: {names!r}")
        r = subprocess.run([str(ROOT / "deploy" / "backup" / "db-restore.sh"), "-y", str(out / "missing.dump")], capture_output=True, text=True, env=env)
        check(r.returncode == 2 and "existing dump" in r.stderr, f"restore of a missing file: {r.returncode} {r.stderr}")
        print("backups: make db-backup and make db-restore round-trip the layer's tables")
    finally:
        subprocess.run([*admin, "-d", "postgres", "-c", f"DROP DATABASE IF EXISTS {db} WITH (FORCE)"], capture_output=True)


def main():
    skip = skipped_kinds()
    lint = helm.lint(str(CHART), {"checkPrerequisites": False}, strict=True, namespace=NAMESPACE, kube_version=f"v{KUBE_VERSION}")
    check(not lint["messages"] and not lint["errors"], f"helm lint: {lint}")
    out_dir = pathlib.Path(tempfile.mkdtemp(prefix="access-chart-"))
    for env in ENVS:
        values = values_for(env)
        lint = helm.lint(str(CHART), values, strict=True, namespace=NAMESPACE, kube_version=f"v{KUBE_VERSION}")
        check(not lint["messages"] and not lint["errors"], f"helm lint {env}: {lint}")
        docs, notes = render(values)
        for d in docs:
            kind = d["kind"]
            if kind in skip:
                continue
            try:
                kubernetes_validate.validate(d, KUBE_VERSION, strict=True)
            except Exception as e:  # noqa: BLE001 - every validation error is a failure to report
                failures.append(f"{env}: {kind}/{d['metadata']['name']}: {e}")
        guide_promises(env, docs, notes)
        config_accepted(env, docs)
        if env != "default":
            infrastructure(env, docs)
        infra_contracts(env, docs)
        selectors(env, docs)
        path = out_dir / f"{env}.yaml"
        path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
        r = subprocess.run(["checkov", "-f", str(path), "--framework", "kubernetes", "--quiet", "--compact", "-o", "json"], capture_output=True, text=True)
        report = json.loads(r.stdout or "{}")
        reports = report if isinstance(report, list) else [report]
        for rep in reports:
            for f in rep.get("results", {}).get("failed_checks", []):
                failures.append(f"{env}: checkov {f['check_id']} {f['check_name']} on {f['resource']}")
        print(f"chart {env}: {len(docs)} objects rendered, linted, validated, checkov clean" if not failures else f"chart {env}: checked")
    monitoring()
    kit()
    deploy_script()
    backups()
    # The schema rejects typos and an updating VPA beside an HPA.
    for bad, what in [
        ({"roles": {"gateway": {"replicas": 3}}}, "a misspelt key"),
        ({"roles": {"gateway": {"vpa": {"enabled": True, "updateMode": "Auto"}}}}, "an updating VPA beside an HPA"),
        ({"config": {"redisUrl": "http://x"}}, "a redis URL that is not redis://"),
    ]:
        try:
            render(bad)
            failures.append(f"the schema accepted {what}")
        except Exception:  # noqa: BLE001 - a refusal is what we want
            pass
    if failures:
        print("chart checks FAILED:", *failures, sep="\n  ")
        sys.exit(1)
    print(f"chart checks passed (rendered manifests in {out_dir})")


if __name__ == "__main__":
    main()
