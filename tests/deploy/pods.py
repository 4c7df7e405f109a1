#!/usr/bin/env python3
"""The real image, and every rendered role started from it as the kubelet would. Run by `make
check-image` (part of `make test`).

1. The image is built from the operators' Containerfile, unchanged, with Debian's podman
   (`podman build --isolation chroot --pull=never`). No container registry is reachable here, so
   the two FROM images are stand-ins made on this machine and tagged under the Containerfile's
   names for the build only (the tags are removed after it):
   - the runtime base (debian:bookworm-slim) is a Debian bookworm made by
     `mmdebstrap --variant=minbase` (cached under $CARGO_TARGET_DIR/image-ci/), and the final
     stage's `RUN apt-get` installs libssl3 and ca-certificates from Debian's mirror as it would;
   - the build stage's base (rust:1.95-bookworm) is that bookworm with a `cargo` that installs the
     binary `make test` already built (debug, its debug info stripped) where `cargo build
     --release` would put it: two cores cannot afford a second, release build of the crate.
2. For dev, staging and production, the chart is rendered (scripts/render-chart.py) and each
   role's Deployment runs in a container made from the image (`podman create` + `podman mount`;
   `podman run` cannot set up cgroups in this sandbox): the container's args, its env and envFrom
   from the rendered ConfigMap, its volumes mounted at their paths (ConfigMaps and Secrets as
   files, emptyDirs writable), the image's root read-only, UID and GID 1000, inside a mount
   namespace of its own (unshare + chroot). The Service names resolve to 127.0.0.1 through the
   container's /etc/hosts, where this machine's real Redis (6379), PostgreSQL (5432, a database
   of this run) and tansu (19092) answer. What cannot be the cluster's is mapped, and only that:
   each role's port is a free one here (the URLs naming it follow), kafka-service:9092 is tansu's
   port, production's TLS Redis and Kafka are this machine's plain ones, the IdP's JWKS and token
   URLs are a JWKS server of this test over HTTP, the DSN's user and database are this machine's
   (its password, as the chart escaped it, is kept: trust authentication ignores it).
3. Every role must turn ready (GET /ready 200) and, on SIGTERM, exit 0 within the pod's
   terminationGracePeriodSeconds.

The backends' own images (Redis, PostgreSQL, Kafka, Prometheus, Grafana) cannot be pulled here;
tests/chart/check.py checks their pods against each image's documented contract instead.
"""

import argparse
import base64
import importlib.util
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ROOT = pathlib.Path(__file__).resolve().parents[2]
CACHE = pathlib.Path(os.environ.get("CARGO_TARGET_DIR") or pathlib.Path.home() / ".cache/access/target") / "image-ci"
IMAGE = "localhost/access:ci"
BASE = "localhost/access-ci/debian:bookworm-minbase"
BUILDER = "localhost/access-ci/builder:latest"
ROLES = {"gateway": "gateway-deployment", "stream": "streaming-deployment", "auth": "auth-deployment",
         "entitlements": "entitlements-deployment", "metrics": "metrics-deployment"}
KAFKA, REDIS_PORT, PG_PORT = "127.0.0.1:19092", 6379, 5432
READY_WITHIN = 90
ENTRYPOINT = []  # the image's, set once it is built

spec = importlib.util.spec_from_file_location("render_chart", ROOT / "scripts" / "render-chart.py")
render_chart = importlib.util.module_from_spec(spec)
spec.loader.exec_module(render_chart)


def say(*a):
    print("pods:", *a, file=sys.stderr, flush=True)


def sh(*cmd, **kw):
    return subprocess.run(cmd, check=True, text=True, capture_output=True, **kw).stdout.strip()


# --- the image ---------------------------------------------------------------------------------

def tools():
    missing = [p for p, cmd in (("podman", "podman"), ("mmdebstrap", "mmdebstrap")) if not shutil.which(cmd)]
    if missing:
        say(f"installing {' '.join(missing)} (Debian)")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, stdout=subprocess.DEVNULL)
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, env=env, stdout=subprocess.DEVNULL)


def exists(image):
    return subprocess.run(["podman", "image", "exists", image]).returncode == 0


def image_id(image):
    return sh("podman", "image", "inspect", "--format", "{{.Id}}", image) if exists(image) else None


def build(binary):
    froms = re.findall(r"^FROM\s+(\S+)", (ROOT / "Containerfile").read_text(), re.M)
    rust_base, runtime_base = froms[0], froms[-1]
    CACHE.mkdir(parents=True, exist_ok=True)
    if not exists(BASE):
        tar = CACHE / "bookworm-minbase.tar"
        if not tar.exists():
            say("making a Debian bookworm base with mmdebstrap (cached in", tar, ")")
            partial = tar.with_suffix(".partial.tar")
            sh("mmdebstrap", "--quiet", "--variant=minbase", "--format=tar", "bookworm", str(partial))
            os.replace(partial, tar)
        sh("podman", "import", str(tar), BASE)
    ctx = pathlib.Path(tempfile.mkdtemp(prefix="access-builder-"))
    try:
        sh("objcopy", "--strip-debug", str(binary), str(ctx / "access"))
        (ctx / "cargo").write_text("#!/bin/sh\n# CI stand-in for cargo: the binary `make test` built, where cargo build --release puts it.\n"
                                   "set -e\nmkdir -p target/release\ncp /opt/prebuilt/access target/release/access\n")
        (ctx / "cargo").chmod(0o755)
        (ctx / "Containerfile").write_text(f"FROM {BASE}\nCOPY access /opt/prebuilt/access\nCOPY cargo /usr/local/bin/cargo\n")
        old_builder = image_id(BUILDER)
        sh("podman", "build", "--isolation", "chroot", "--pull=never", "--layers=false", "-q", "-t", BUILDER, str(ctx))
        if old_builder and old_builder != image_id(BUILDER):
            subprocess.run(["podman", "rmi", old_builder], capture_output=True)
    finally:
        shutil.rmtree(ctx)
    # Stand-ins under the Containerfile's names for this build only; a real image of that name,
    # if this machine has one, gets its tag back.
    before = {name: image_id(name) for name in (rust_base, runtime_base)}
    sh("podman", "tag", BUILDER, rust_base)
    sh("podman", "tag", BASE, runtime_base)
    old_image = image_id(IMAGE)
    try:
        # --layers=false: no intermediate images left behind per binary (the apt-get step, about
        # 20 s, runs each time instead of coming from a cache that grows by 400 MB a build).
        r = subprocess.run(["podman", "build", "--isolation", "chroot", "--pull=never", "--layers=false", "-f", "Containerfile", "-t", IMAGE, "."],
                           cwd=ROOT, text=True, capture_output=True)
        if r.returncode != 0:
            sys.exit(f"pods: podman build of the Containerfile failed:\n{r.stdout[-3000:]}{r.stderr[-3000:]}")
    finally:
        for name, old in before.items():
            subprocess.run(["podman", "untag", image_id(name) or "none", name], capture_output=True)
            if old:
                subprocess.run(["podman", "tag", old, name], capture_output=True)
        if old_image and old_image != image_id(IMAGE):
            subprocess.run(["podman", "rmi", old_image], capture_output=True)
    cfg = json.loads(sh("podman", "image", "inspect", IMAGE))[0]["Config"]
    assert cfg.get("User") == "1000:1000", f"the image runs as {cfg.get('User')}, not 1000:1000"
    return cfg


# --- the cluster's stand-ins -------------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class IdP:
    """The identity provider's JWKS (an RSA key of this run) and token endpoint, over HTTP."""

    def __init__(self):
        key = tempfile.mktemp()
        sh("openssl", "genrsa", "-out", key, "2048")
        modulus = sh("openssl", "rsa", "-in", key, "-noout", "-modulus").split("=", 1)[1]
        os.unlink(key)
        jwks = {"keys": [{"kty": "RSA", "kid": "pods-test", "use": "sig", "alg": "RS256",
                          "n": b64url(bytes.fromhex(modulus)), "e": "AQAB"}]}
        body = json.dumps(jwks).encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                self.send_response(401)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def psql(db, sql):
    return sh("psql", "-h", "127.0.0.1", "-U", "postgres", "-d", db, "-v", "ON_ERROR_STOP=1", "-qAt", "-c", sql)


# --- one environment ----------------------------------------------------------------------------

def host_of(url):
    m = re.match(r"^[a-z]+://(?:[^@/]*@)?([^:/]+)", url)
    return m.group(1) if m else None


def localize(env, ports, idp_port, hosts):
    """The rendered env with this machine's endpoints (see the module's doc), nothing else."""
    out = {}
    for k, v in env.items():
        for service, (port, local) in ports.items():
            v = v.replace(f"{service}:{port}", f"{service}:{local}")
        if k == "ACCESS_KAFKA_BOOTSTRAP":
            brokers = [b.rsplit(":", 1)[0] for b in v.split(",")]
            hosts.update(brokers)
            v = ",".join(f"{b}:{KAFKA.rsplit(':', 1)[1]}" for b in brokers)
        elif k == "ACCESS_REDIS_URL":
            hosts.add(host_of(v))
            v = re.sub(r"^rediss://([^/:]+)(:\d+)?", rf"redis://\1:{REDIS_PORT}", v)
        elif k in ("ACCESS_KAFKA__TLS",):
            v = "false"
        elif k in ("ACCESS_JWKS_URL", "ACCESS_AUTH__TOKEN_URL"):
            hosts.add(host_of(v))
            v = re.sub(r"^https?://([^/:]+)(:\d+)?", rf"http://\1:{idp_port}", v)
        elif re.match(r"^https?://", v):
            hosts.add(host_of(v))
        out[k] = v
    return out


def local_dsn(dsn, db, hosts):
    m = re.match(r"^postgres(?:ql)?://([^:@/]+)(:[^@]*)?@([^:/]+)(:\d+)?/([^?]+)(\?.*)?$", dsn)
    assert m, f"the DSN {dsn!r} is not a postgres:// URL"
    hosts.add(m.group(3))
    return f"postgres://postgres{m.group(2) or ''}@{m.group(3)}:{PG_PORT}/{db}"


def run_env(env, idp):
    values_file = render_chart.VALUES[env]
    docs = render_chart.render(env, "254carbon-access", False)
    if env == "dev":
        # A password the DSN must escape: it reaches the binary through the chart's DSN.
        extra = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False)
        extra.write('infrastructure: {postgres: {password: "p@ss:w/rd #1?&%"}}\n')
        extra.close()
        docs = render_chart.render(env, "254carbon-access", False, None, [extra.name])
    by = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    db = f"access_pods_{uuid.uuid4().hex[:10]}"
    psql("postgres", f"CREATE DATABASE {db}")
    work = pathlib.Path(tempfile.mkdtemp(prefix=f"access-pods-{env}-"))
    procs = []
    failures = []
    try:
        secrets = {}
        for (kind, name), d in by.items():
            if kind == "Secret":
                data = {k: base64.b64decode(v).decode() for k, v in (d.get("data") or {}).items()}
                data.update(d.get("stringData") or {})
                secrets[name] = data
        hosts = {"redis-service", "postgres-service", "kafka-service"}
        if env in ("staging", "production"):
            # The Secret the operator creates (existingSecret access-secrets in their values).
            secrets["access-secrets"] = {"client-secret": "a-client-secret"}
        if env == "production":
            secrets["access-secrets"]["postgres-dsn"] = "postgres://access:a%2Fpassword@postgres.254carbon-data.svc.cluster.local:5432/access"
        for name, data in secrets.items():
            for key in ("dsn", "postgres-dsn"):
                if key in data:
                    data[key] = local_dsn(data[key], db, hosts)
        configmaps = {name: d["data"] for (kind, name), d in by.items() if kind == "ConfigMap"}
        deployments = {role: by[("Deployment", name)] for role, name in ROLES.items() if ("Deployment", name) in by}
        services = {by[("Service", n)]["metadata"]["name"]: by[("Service", n)]["spec"]["ports"][0]["port"]
                    for (k, n) in by if k == "Service"}
        role_ports = {}
        for role, d in deployments.items():
            port = d["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"]
            service = next(s for s, p in services.items() if s.startswith({"stream": "streaming"}.get(role, role) + "-service"))
            role_ports[service] = (port, free_port())
        hosts.update(role_ports)
        ports = dict(role_ports)
        ports["kafka-service"] = (9092, int(KAFKA.rsplit(":", 1)[1]))
        for role, d in deployments.items():
            pod = d["spec"]["template"]["spec"]
            c = pod["containers"][0]
            env_vars = {}
            for src in c.get("envFrom", []):
                env_vars.update(configmaps[src["configMapRef"]["name"]])
            for e in c.get("env", []):
                env_vars[e["name"]] = e["value"]
            env_vars = localize(env_vars, ports, idp.port, hosts)
            args = list(c.get("args", []))
            port, local = role_ports[next(s for s, (p, _) in role_ports.items() if p == c["ports"][0]["containerPort"])]
            args[args.index("--port") + 1] = str(local)
            sc = {**pod.get("securityContext", {}), **c.get("securityContext", {})}
            assert sc.get("readOnlyRootFilesystem") and sc.get("runAsUser") == 1000 and sc.get("runAsGroup") == 1000, f"{role}: {sc}"
            procs.append(start(env, role, d, c, env_vars, args, secrets, configmaps, hosts, work, local))
        deadline = time.time() + READY_WITHIN
        for p in procs:
            status = wait_ready(p, deadline)
            ok = status == 200
            say(f"{env}: {p['deployment']} {'ready' if ok else 'NOT READY'} on port {p['port']}")
            if not ok:
                failures.append(f"{env}: {p['deployment']} not ready: {status}\n{tail(p)}")
        for p in procs:
            if p["proc"].poll() is None:
                p["stopped_at"] = time.time()
                p["proc"].send_signal(signal.SIGTERM)
        for p in procs:
            grace = p["grace"]
            try:
                code = p["proc"].wait(timeout=max(0.1, p.get("stopped_at", time.time()) + grace - time.time()))
                took = time.time() - p.get("stopped_at", time.time())
                if code != 0:
                    failures.append(f"{env}: {p['deployment']} exited {code} after SIGTERM\n{tail(p)}")
                else:
                    say(f"{env}: {p['deployment']} stopped on SIGTERM with 0 after {took:.1f}s (grace {grace}s)")
            except subprocess.TimeoutExpired:
                p["proc"].kill()
                failures.append(f"{env}: {p['deployment']} still running {grace}s after SIGTERM")
    finally:
        for p in procs:
            if p["proc"].poll() is None:
                p["proc"].kill()
                p["proc"].wait()
            subprocess.run(["podman", "umount", p["cid"]], capture_output=True)
            subprocess.run(["podman", "rm", "-f", p["cid"]], capture_output=True)
        subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", "postgres", "-qc", f"DROP DATABASE IF EXISTS {db} WITH (FORCE)"], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    return failures


def in_root(root, path):
    """path inside the container's root, its symlinks resolved there (the image's /var/run is a
    link to /run: followed on the host it would lead out of the container)."""
    here = root
    parts = [p for p in path.split("/") if p]
    hops = 0
    while parts:
        part = parts.pop(0)
        nxt = here / part
        if nxt.is_symlink():
            hops += 1
            assert hops < 20, f"symlink loop at {path}"
            target = os.readlink(nxt)
            parts = [p for p in target.split("/") if p] + parts
            if target.startswith("/"):
                here = root
            continue
        here = nxt
    assert here == root or root in here.parents, f"{path} leads out of the container"
    return here


def tail(p):
    p["log"].flush()
    return "\n".join(pathlib.Path(p["log"].name).read_text().splitlines()[-15:])


def start(env, role, d, c, env_vars, args, secrets, configmaps, hosts, work, port):
    """One pod's container: its volumes, a read-only root, UID 1000, in a mount namespace."""
    pod = d["spec"]["template"]["spec"]
    cid = sh("podman", "create", IMAGE)
    root = pathlib.Path(sh("podman", "mount", cid))
    (root / "etc" / "hosts").write_text("127.0.0.1 localhost\n" + "".join(f"127.0.0.1 {h}\n" for h in sorted(hosts) if h))
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    binds = []
    for m in c.get("volumeMounts", []):
        v = volumes[m["name"]]
        src = work / role / m["name"]
        if not src.exists():
            src.mkdir(parents=True)
            if "configMap" in v or "secret" in v:
                data = configmaps[v["configMap"]["name"]] if "configMap" in v else secrets.get(v["secret"]["secretName"])
                if data is None:
                    assert v["secret"].get("optional"), f"{role}: Secret {v['secret']['secretName']} is missing"
                    data = {}
                items = (v.get("configMap") or v.get("secret")).get("items")
                for key, path in ([(i["key"], i["path"]) for i in items] if items else [(k, k) for k in data]):
                    (src / path).write_text(data[key])
                    (src / path).chmod(0o644)
            elif "emptyDir" in v:
                os.chown(src, 0, 1000)  # fsGroup 1000
                src.chmod(0o2775)
        dst = in_root(root, m["mountPath"])
        dst.mkdir(parents=True, exist_ok=True)
        binds.append((src, dst, m.get("readOnly", False)))
    (root / "proc").mkdir(exist_ok=True)
    (root / "dev").mkdir(exist_ok=True)
    script = [f"mount --bind '{root}' '{root}'", f"mount -o remount,ro,bind '{root}'",
              f"mount -t proc proc '{root}/proc'", f"mount --rbind /dev '{root}/dev'"]
    for src, dst, ro in binds:
        script.append(f"mount --bind '{src}' '{dst}'")
        if ro:
            script.append(f"mount -o remount,ro,bind '{dst}'")
    command = c.get("command") or ENTRYPOINT  # the kubelet's rule: command replaces the entrypoint
    script.append("exec chroot --userspec=1000:1000 '%s' %s" % (root, " ".join(f"'{a}'" for a in [*command, *args])))
    log = open(work / f"{role}.log", "w")
    full_env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOSTNAME": f"{d['metadata']['name']}-0", **env_vars}
    proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-ec", "; ".join(script)],
                            env=full_env, stdout=log, stderr=subprocess.STDOUT)
    return {"proc": proc, "cid": cid, "deployment": d["metadata"]["name"], "port": port, "log": log,
            "grace": pod.get("terminationGracePeriodSeconds", 30)}


def wait_ready(p, deadline):
    status = None
    while time.time() < deadline:
        if p["proc"].poll() is not None:
            return f"exited {p['proc'].returncode}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{p['port']}/ready", timeout=2) as r:
                return r.status
        except urllib.error.HTTPError as e:
            status = f"{e.code} {e.read()[:300]!r}"
        except OSError as e:
            status = str(e)
        time.sleep(0.3)
    return status


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", required=True, help="the access binary to put in the image (make test's debug build)")
    ap.add_argument("--env", action="append", choices=["dev", "staging", "production"], help="only these (default all)")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("pods: needs root (podman mount, unshare, chroot), as CI runs")
    if not pathlib.Path(a.binary).exists():
        sys.exit(f"pods: no binary at {a.binary}; build it first (make build)")
    started = time.time()
    tools()
    cfg = build(a.binary)
    ENTRYPOINT[:] = cfg["Entrypoint"]
    say(f"image {IMAGE} built from the Containerfile in {time.time() - started:.0f}s (user {cfg['User']}, entrypoint {cfg['Entrypoint']})")
    idp = IdP()
    failures = []
    for env in a.env or ["dev", "staging", "production"]:
        t = time.time()
        failures += run_env(env, idp)
        say(f"{env}: done in {time.time() - t:.0f}s")
    if failures:
        print("pods FAILED:", *failures, sep="\n  ")
        sys.exit(1)
    print(f"pods: every role of dev, staging and production ran from the image, turned ready and stopped on SIGTERM ({time.time() - started:.0f}s)")


if __name__ == "__main__":
    main()
