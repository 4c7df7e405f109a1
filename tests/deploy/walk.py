#!/usr/bin/env python3
"""deploy/deploy-k8s.sh walked through on a stateful fake cluster (tests/deploy/fakecluster.py:
fake kubectl and helm that keep objects, namespaces and Helm ownership, refuse foreign objects and
unknown kinds, and roll a Deployment out only when its pods could start). Run by `make
check-deploy`.

For both methods and dev and staging: a fresh install of a pushed image (as `make deploy` runs
it), an upgrade to another image, a roll back (-r) to the first; for production: an install
without the VPA and Prometheus-operator CRDs (refused with 4 before anything is applied), then
with them; an apply the API server refuses (exit 5); an image never pushed (the rollout fails:
exit 5). Also: db-restore.sh -k checks a dump with the in-cluster pg_restore (a PostgreSQL 16 dump
that this machine's pg_restore 15 refuses), the guide's ./scripts/deploy-k8s.sh path, and the
scripts' -h.
"""

import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "deploy" / "deploy-k8s.sh"
NS = "254carbon-access"
PUSHED = ["registry.example.com/access:0.1.0", "registry.example.com/access:0.1.1"]
CRDS = {"verticalpodautoscalers.autoscaling.k8s.io": ("VerticalPodAutoscaler", "autoscaling.k8s.io"),
        "servicemonitors.monitoring.coreos.com": ("ServiceMonitor", "monitoring.coreos.com"),
        "prometheusrules.monitoring.coreos.com": ("PrometheusRule", "monitoring.coreos.com"),
        "clusterissuers.cert-manager.io": ("ClusterIssuer", "cert-manager.io")}

failures = []
clusters = []  # their directories, removed at the end


def check(ok, what):
    if not ok:
        failures.append(what)
    return ok


class Cluster:
    def __init__(self):
        self.dir = pathlib.Path(tempfile.mkdtemp(prefix="fake-cluster-"))
        clusters.append(self.dir)
        bin_dir = self.dir / "bin"
        bin_dir.mkdir()
        for tool in ("kubectl", "helm"):
            (bin_dir / tool).symlink_to(ROOT / "tests" / "deploy" / "fakecluster.py")
        self.env = {**os.environ, "FAKE_CLUSTER": str(self.dir), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
        self.kubectl("version")  # creates nothing; the state starts empty
        state = self.state()
        state["images"] = list(PUSHED)
        self.save(state)

    def state(self):
        import json
        p = self.dir / "state.json"
        return json.loads(p.read_text()) if p.exists() else {"namespaces": [], "objects": {}, "crds": {}, "images": [], "releases": {}, "history": {}, "refuse": {}}

    def save(self, s):
        import json
        (self.dir / "state.json").write_text(json.dumps(s))

    def kubectl(self, *args, stdin=None):
        return subprocess.run(["kubectl", *args], env=self.env, capture_output=True, text=stdin is None or isinstance(stdin, str), input=stdin)

    def deploy(self, *args, script=SCRIPT):
        return subprocess.run([str(script), *args], env=self.env, capture_output=True, text=True, stdin=subprocess.DEVNULL)

    def install_crds(self, names=CRDS):
        for name in names:
            kind, group = CRDS[name]
            doc = {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition", "metadata": {"name": name},
                   "spec": {"group": group, "names": {"kind": kind}}}
            r = self.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(doc))
            assert r.returncode == 0, r.stderr

    def operator_secret(self, env):
        self.kubectl("create", "namespace", NS)
        args = ["--from-literal=client-secret=s3cret"]
        if env == "production":
            args.append("--from-literal=postgres-dsn=postgres://access:pw@db.254carbon-data:5432/access")
        r = self.kubectl("-n", NS, "create", "secret", "generic", "access-secrets", *args)
        assert r.returncode == 0, r.stderr

    def objects(self, kind):
        return {o["metadata"]["name"]: o for o in self.state()["objects"].values() if o["kind"] == kind and o["metadata"].get("namespace") == NS}

    def images(self):
        return {c["image"] for name, d in self.objects("Deployment").items() if not name.split("-")[0] in ("redis", "postgres", "kafka", "prometheus", "grafana", "alertmanager")
                for c in d["spec"]["template"]["spec"]["containers"]}


def out(r):
    return f"exit {r.returncode}: {(r.stderr or '')[-1200:]}"


def walk(method, env):
    c = Cluster()
    what = f"{method} {env}"
    if env == "staging":
        c.install_crds(["clusterissuers.cert-manager.io"])
        c.operator_secret(env)
    r = c.deploy("-m", method, "-e", env, "-i", PUSHED[0])
    if not check(r.returncode == 0, f"{what}: a fresh install: {out(r)}"):
        return
    deployments = c.objects("Deployment")
    check({"gateway-deployment", "streaming-deployment", "auth-deployment", "entitlements-deployment", "metrics-deployment"} <= set(deployments), f"{what}: the five roles' Deployments: {sorted(deployments)}")
    check(c.images() == {PUSHED[0]}, f"{what}: every role runs the pushed image: {c.images()}")
    secrets = c.objects("Secret")
    check({"access-dev-key", "postgres-secret", "grafana-secret"} & set(secrets) == ({"postgres-secret", "grafana-secret"} | ({"access-dev-key"} if env == "dev" else set())), f"{what}: the generated Secrets: {sorted(secrets)}")
    before = {n: s.get("data") for n, s in c.objects("Secret").items()}
    r = c.deploy("-m", method, "-e", env, "-i", PUSHED[1])
    check(r.returncode == 0 and c.images() == {PUSHED[1]}, f"{what}: an upgrade to {PUSHED[1]}: {out(r)} {c.images()}")
    if method == "kubectl":
        after = {n: s.get("data") for n, s in c.objects("Secret").items()}
        check(all(after.get(n) == before[n] for n in ("postgres-secret", "grafana-secret")), f"{what}: the upgrade kept the generated passwords")
    r = c.deploy("-m", method, "-e", env, "-r")
    check(r.returncode == 0 and c.images() == {PUSHED[0]}, f"{what}: a roll back to {PUSHED[0]}: {out(r)} {c.images()}")
    if method == "kubectl":
        # The guide deploys with the bare script (Method 1, kubectl) from ./scripts/.
        r = c.deploy("-e", env, "-i", PUSHED[0], script=ROOT / "scripts" / "deploy-k8s.sh")
        check(r.returncode == 0 and "deployed (kubectl" in r.stderr, f"{what}: ./scripts/deploy-k8s.sh without -m deploys with kubectl: {out(r)}")
    else:
        # A namespace deployed first with kubectl's Secrets: Helm adopts them, keeping their values.
        c2 = Cluster()
        if env == "staging":
            c2.install_crds(["clusterissuers.cert-manager.io"])
            c2.operator_secret(env)
        c2.kubectl("create", "namespace", NS)
        c2.kubectl("-n", NS, "create", "secret", "generic", "postgres-secret", "--from-literal=password=kept")
        r = c2.deploy("-m", "helm", "-e", env, "-i", PUSHED[0])
        owned = (c2.objects("Secret").get("postgres-secret", {}).get("metadata", {}).get("annotations") or {}).get("meta.helm.sh/release-name")
        check(r.returncode == 0 and owned == "access", f"{what}: Helm adopts a Secret made before by kubectl: {out(r)} owner {owned}")
    # An image nobody pushed never starts: the rollout fails with 5.
    r = Cluster().deploy("-m", method, "-e", "dev", "-i", "registry.example.com/access:never-pushed")
    check(r.returncode == 5, f"{what}: an image not in the registry fails the rollout with 5: {out(r)}")


def production(method):
    what = f"{method} production"
    c = Cluster()
    c.operator_secret("production")
    r = c.deploy("-m", method, "-e", "production", "-f", "-i", PUSHED[0])
    check(r.returncode == 4 and "verticalpodautoscalers.autoscaling.k8s.io" in r.stderr and "servicemonitors.monitoring.coreos.com" in r.stderr,
          f"{what} without the CRDs is refused with 4, naming them: {out(r)}")
    check(not c.objects("Deployment"), f"{what} without the CRDs applied nothing")
    c.install_crds()
    state = c.state()
    state["refuse"] = {"PodDisruptionBudget": "policy forbids it"}
    c.save(state)
    r = c.deploy("-m", method, "-e", "production", "-f", "-i", PUSHED[0])
    check(r.returncode == 5, f"{what}: an apply the API server refuses exits 5: {out(r)}")
    state = c.state()
    state["refuse"] = {}
    c.save(state)
    r = c.deploy("-m", method, "-e", "production", "-f", "-i", PUSHED[0])
    check(r.returncode == 0 and c.images() == {PUSHED[0]}, f"{what} with the CRDs: {out(r)}")
    kinds = {o["kind"] for o in c.state()["objects"].values()}
    check({"VerticalPodAutoscaler", "ServiceMonitor", "PrometheusRule"} <= kinds, f"{what}: the operator's objects are applied: {kinds}")
    check("access-dev-key" not in c.objects("Secret"), f"{what}: no dev key")


def restore_from_cluster():
    """db-restore.sh -k reads the dump with the in-cluster pg_restore: a dump whose header says
    archive 1.15 (PostgreSQL 16's pg_dump) is refused by pg_restore 15, not by the pod's."""
    c = Cluster()
    c.install_crds(["clusterissuers.cert-manager.io"])
    r = c.deploy("-m", "kubectl", "-e", "dev", "-i", PUSHED[0])
    assert r.returncode == 0, out(r)
    dump = c.dir / "pg16.dump"
    dump.write_bytes(b"PGDMP" + bytes([1, 15, 0]) + b"\x00" * 64)
    r = subprocess.run([str(ROOT / "deploy" / "backup" / "db-restore.sh"), "-k", NS, "-y", str(dump)], env=c.env, capture_output=True, text=True)
    check(r.returncode == 0, f"db-restore.sh -k with a PostgreSQL 16 dump: {out(r)}")


def help_texts():
    for script in ("deploy/deploy-k8s.sh", "deploy/backup/db-backup.sh", "deploy/backup/db-restore.sh"):
        r = subprocess.run([str(ROOT / script), "-h"], capture_output=True, text=True)
        check(r.returncode == 0 and "Usage:" in r.stdout and "set -e" not in r.stdout and "#!" not in r.stdout, f"{script} -h prints its help and nothing else: {r.stdout[-300:]}")


def main():
    started = time.time()
    help_texts()
    for method in ("kubectl", "helm"):
        for env in ("dev", "staging"):
            walk(method, env)
        production(method)
    restore_from_cluster()
    r = subprocess.run(["make", "-n", "--no-print-directory", "-C", str(ROOT), "deploy", "ENV=staging", "IMAGE=registry.example.com/access:0.1.0", "VALUES=mine.yaml"], capture_output=True, text=True)
    check("-i registry.example.com/access:0.1.0" in r.stdout and "-V mine.yaml" in r.stdout and "-e staging" in r.stdout, f"make deploy passes the image and values files: {r.stdout}")
    for d in clusters:
        shutil.rmtree(d, ignore_errors=True)
    if failures:
        print("deploy walk FAILED:", *failures, sep="\n  ")
        sys.exit(1)
    print(f"deploy walk: fresh install, upgrade, roll back for kubectl and helm in dev and staging; production refused without CRDs and installed with them; failed applies and rollouts exit 5 ({time.time() - started:.0f}s)")


if __name__ == "__main__":
    main()
