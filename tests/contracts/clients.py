#!/usr/bin/env python3
"""Generates a Python client from each role's OpenAPI document and uses it.

For each `role=URL` argument (the role's base URL on a running layer), this script:

1. reads `URL/openapi.json`;
2. generates a client package with openapi-python-client (PyPI), failing on any warning, so a
   document the generator cannot fully read fails the check;
3. imports every module of the package (the models and one module per operation);
4. calls every GET operation that takes no parameter through the generated client, with the
   bearer token in $ACCESS_TOKEN (every role: admin, service, trader), and checks that it
   answers 200 and that the answer was parsed into the documented model (not left unparsed,
   not an error body).

Run by tests/contracts/schemathesis.sh (make check-contracts) against `access all`.
"""

import importlib
import inspect
import json
import os
import pkgutil
import subprocess
import sys
import tempfile
import urllib.request


def generate(role: str, doc_path: str, out: str) -> str:
    """Generates the client of one role's document into `out`; returns its package name."""
    package = f"access_{role}_client"
    config = os.path.join(os.path.dirname(out), f"{role}-config.json")
    with open(config, "w") as f:
        # No post hooks: formatting the generated code is not what is under test.
        json.dump({"package_name_override": package, "post_hooks": []}, f)
    run = subprocess.run(
        [
            "openapi-python-client", "generate", "--path", doc_path, "--output-path", out,
            "--meta", "none", "--fail-on-warning", "--config", config,
        ],
        capture_output=True,
        text=True,
    )
    if run.returncode != 0:
        raise SystemExit(f"{role}: the client generator refused the document:\n{run.stdout}{run.stderr}")
    return package


def import_all(package: str) -> list:
    """Imports the package and every module in it; returns the operation modules."""
    root = importlib.import_module(package)
    operations = []
    for info in pkgutil.walk_packages(root.__path__, prefix=f"{package}."):
        module = importlib.import_module(info.name)
        if hasattr(module, "sync_detailed"):
            operations.append(module)
    return operations


def call_parameterless_gets(role: str, package: str, operations: list, base_url: str, token: str) -> int:
    """Calls every GET without parameters; each must answer 200, parsed into its model."""
    client_module = importlib.import_module(f"{package}.client")
    client = client_module.AuthenticatedClient(base_url=base_url, token=token, raise_on_unexpected_status=True)
    called = 0
    for module in operations:
        parameters = [p for p in inspect.signature(module._get_kwargs).parameters.values()]
        if parameters:
            continue
        kwargs = module._get_kwargs()
        if kwargs["method"].lower() != "get":
            continue
        response = module.sync_detailed(client=client)
        url = kwargs["url"]
        if response.status_code != 200:
            # The token has every role: a parameterless GET that is not 200 is a finding.
            raise SystemExit(f"{role}: GET {url}: {response.status_code} {response.content[:200]!r}")
        parsed = response.parsed
        if parsed is None:
            raise SystemExit(f"{role}: GET {url}: 200 not parsed by the generated client")
        if type(parsed).__name__ == "ErrorBody":
            raise SystemExit(f"{role}: GET {url}: 200 parsed as an error body")
        called += 1
    return called


def main() -> None:
    token = os.environ.get("ACCESS_TOKEN", "")
    work = tempfile.mkdtemp(prefix="access-clients-")
    sys.path.insert(0, work)
    failed = False
    for arg in sys.argv[1:]:
        role, base_url = arg.split("=", 1)
        doc_path = os.path.join(work, f"{role}.json")
        with urllib.request.urlopen(f"{base_url}/openapi.json", timeout=10) as answer, open(doc_path, "wb") as f:
            f.write(answer.read())
        try:
            package = generate(role, doc_path, os.path.join(work, f"access_{role}_client"))
            operations = import_all(package)
            called = call_parameterless_gets(role, package, operations, base_url, token)
        except SystemExit as e:
            print(f"clients: {e}", file=sys.stderr)
            failed = True
            continue
        except Exception as e:  # a generated module that does not import, or a parse error
            print(f"clients: {role}: {type(e).__name__}: {e}", file=sys.stderr)
            failed = True
            continue
        print(f"clients: {role}: generated {package} ({len(operations)} operations), "
              f"{called} GETs answered and parsed")
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
