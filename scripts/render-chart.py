#!/usr/bin/env python3
"""Renders charts/access locally with Helm's own Go library (PyPI helm-python-sdk; no helm binary,
no cluster) for one environment.

  render-chart.py --env staging                 all objects, to stdout
  render-chart.py --env staging --plain --out deploy/k8s/staging
                                                the plain manifests for the kubectl method
  render-chart.py --env dev --image registry.example.com/access:0.1.0 --values mine.yaml
                                                another image, and more values files (as helm -f)

Offline there is no cluster to ask for its APIs, so checkPrerequisites is false here (the deploy
script checks the cluster's CRDs itself before it applies).

--plain leaves out what must not be committed or cannot be applied as is: Secrets whose values the
chart generates (deploy/deploy-k8s.sh creates them in the cluster instead), the checksum of those
Secrets, and the `helm test` pod; Helm hook annotations are dropped (kubectl applies hook objects
like any other). The output is deterministic, so a test can compare it with the committed files.
"""

import argparse
import pathlib
import sys

import yaml
from helm_python import chart as helm

ROOT = pathlib.Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "access"
VALUES = {"dev": "values-dev.yaml", "staging": "values-staging.yaml", "production": "values-prod.yaml"}
# Secrets deploy-k8s.sh creates (generated values) or expects the operator to have created.
GENERATED_SECRETS = {"access-dev-key", "postgres-secret", "grafana-secret", "access-secrets"}


def merge(into, more):
    """Helm's merge of values files: maps merge key by key, anything else is replaced."""
    for k, v in more.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            merge(into[k], v)
        else:
            into[k] = v
    return into


def image_values(image):
    """repository:tag (or repository@digest, or repository:tag@digest) as the chart's image values."""
    repo, at, digest = image.partition("@")
    name, colon, tag = repo.rpartition(":")
    if not colon or "/" in tag:
        name, tag = repo, ""
    tag = tag + (f"@{digest}" if at else "")
    return {"image": {"repository": name, "tag": tag}}


def render(env, namespace, plain, image=None, extra_values=()):
    values = helm.values_from_yaml((CHART / VALUES[env]).read_text())
    for path in extra_values:
        merge(values, helm.values_from_yaml(pathlib.Path(path).read_text()))
    if image:
        merge(values, image_values(image))
    merge(values, {"checkPrerequisites": False})
    out = helm.Chart.load(str(CHART)).render(values, name="access", namespace=namespace, is_install=True)
    docs = []
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt"):
            continue
        for d in yaml.safe_load_all(text):
            if not d:
                continue
            if plain:
                ann = d.get("metadata", {}).get("annotations") or {}
                if d["kind"] == "Secret" and d["metadata"]["name"] in GENERATED_SECRETS:
                    continue
                if ann.get("helm.sh/hook") == "test":
                    continue
                for key in [k for k in ann if k.startswith("helm.sh/hook")]:
                    del ann[key]
                pod_ann = d.get("spec", {}).get("template", {}).get("metadata", {}).get("annotations") or {}
                pod_ann.pop("checksum/secret", None)
            docs.append(d)
    return docs


def file_name(d):
    return f"{d['kind'].lower()}-{d['metadata']['name']}.yaml"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env", required=True, choices=sorted(VALUES))
    p.add_argument("--namespace", default="254carbon-access")
    p.add_argument("--plain", action="store_true", help="the kubectl method's manifests (see above)")
    p.add_argument("--out", help="write one file per object into this directory (replacing it)")
    p.add_argument("--image", help="the image every role runs (repository:tag), instead of the chart's")
    p.add_argument("--values", action="append", default=[], help="another values file, merged last (repeatable)")
    a = p.parse_args()
    docs = render(a.env, a.namespace, a.plain, a.image, a.values)
    header = f"# Generated from charts/access with {VALUES[a.env]} by scripts/render-chart.py; do not edit (make manifests).\n"
    if a.out:
        out = pathlib.Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        for old in out.glob("*.yaml"):
            old.unlink()
        for d in docs:
            (out / file_name(d)).write_text(header + yaml.safe_dump(d, sort_keys=False))
        print(f"{len(docs)} manifests in {out}", file=sys.stderr)
    else:
        sys.stdout.write(header + yaml.safe_dump_all(docs, sort_keys=False))


if __name__ == "__main__":
    main()
