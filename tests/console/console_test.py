#!/usr/bin/env python3
"""The operator's console in a real browser: Debian's chromium, driven headless by Selenium.

Two layers are started and tested the same way (and a third, `oidc`, signs in through an IdP):
  embedded  `access all` (every role in one process, embedded backends), as `make run` runs it;
  backends  the five roles as separate processes on the machine's Redis and PostgreSQL (a
            database and a Redis prefix of their own), the console's relay reaching the other
            roles over HTTP as in a cluster.

In each: sign in with the dev code; create a deny rule whose name is markup and see the gateway
refuse with it; ask "why?" and see that rule named; a stale edit refused and shown; the rule's
history; create an API key (the secret shown once), use it, revoke it and see it refused; revoke
a user and watch their WebSocket close; the live layer's panels and plots. And the page's
defences: no script from the page's data ever runs (`window.__xss` stays undefined), the CSP
blocks an injected inline script (a page without the CSP runs the same script: the check can
fail), the page refuses to be framed by another origin, the token is in no URL and in no
storage that outlives the tab.

A screenshot of each page goes to $CARGO_TARGET_DIR/console-screenshots/ (the test artifact);
--readme-screenshot FILE also writes the live layer's to FILE (docs/console.png).

Usage: console_test.py --binary PATH_TO_ACCESS [--mode embedded|backends|oidc|all] [--readme-screenshot FILE]
"""

import argparse
import base64
import hashlib
import http.server
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import Select, WebDriverWait

ROLES = ["gateway", "stream", "auth", "entitlements", "metrics"]
REPO = Path(__file__).resolve().parents[2]
XSS_NAME = 'no-brent <img src=x onerror="window.__xss=1"><script>window.__xss=2</script>'


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def say(*args):
    print("console:", *args, flush=True)


def wait_for(what, check, within=15.0, every=0.1):
    deadline = time.monotonic() + within
    last = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except Exception as e:  # noqa: BLE001 - reported if the deadline passes
            last = e
        time.sleep(every)
    raise AssertionError(f"not within {within}s: {what}" + (f" (last error: {last})" if last else ""))


def call(method, url, token=None, body=None, headers=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if token:
        req.add_header("Authorization", "Bearer " + token)
    if body is not None:
        req.add_header("Content-Type", "application/json")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            text = r.read().decode()
            return r.status, (json.loads(text) if text else None), {k.lower(): v for k, v in r.headers.items()}
    except urllib.error.HTTPError as e:
        text = e.read().decode()
        try:
            return e.code, json.loads(text), {k.lower(): v for k, v in e.headers.items()}
        except ValueError:
            return e.code, text, {k.lower(): v for k, v in e.headers.items()}


class Layer:
    """A running layer: ports, the dev key's environment, the processes."""

    def __init__(self, binary, mode, work):
        self.binary, self.mode, self.work = binary, mode, Path(work)
        self.ports = {r: free_port() for r in ROLES}
        self.upstream = free_port()
        self.procs = []
        self.db = None
        key = self.work / "dev-key.json"
        self.env = {
            "PATH": os.environ.get("PATH", ""),
            "HOME": str(self.work),
            "ACCESS_LOG_LEVEL": "warn",
            "ACCESS_SERVER__HOST": "127.0.0.1",
            "ACCESS_AUTH__DEV_KEY_FILE": str(key),
            "ACCESS_CONSOLE__ENABLED": "true",
            "ACCESS_GATEWAY__USAGE_INTERVAL": "1s",
            "ACCESS_STREAM__USAGE_INTERVAL": "1s",
            "ACCESS_GATEWAY__DECISION_CACHE_TTL": "1s",
        }
        for role, port in self.ports.items():
            self.env[f"ACCESS_{role.upper()}__PORT"] = str(port)
        self.code_file = key.with_name("console-code")

    def url(self, role, path=""):
        return f"http://127.0.0.1:{self.ports[role]}{path}"

    def start(self):
        if self.mode == "embedded":
            self.spawn(["all", "--upstream-port", str(self.upstream)], "all")
        else:
            self.db = "access_console_" + secrets.token_hex(6)
            subprocess.run(["psql", "-q", "-h", "127.0.0.1", "-U", "postgres", "-c", f"CREATE DATABASE {self.db}"], check=True)
            self.env.update({
                "ACCESS_REDIS_URL": os.environ.get("ACCESS_TEST_REDIS", "redis://127.0.0.1:6379"),
                "ACCESS_REDIS__PREFIX": f"console-test:{secrets.token_hex(6)}:",
                "ACCESS_POSTGRES_DSN": f"postgres://postgres@127.0.0.1:5432/{self.db}",
                "ACCESS_ENTITLEMENTS_SERVICE_URL": self.url("entitlements"),
                "ACCESS_METRICS_SERVICE_URL": self.url("metrics"),
                "ACCESS_AUTH_SERVICE_URL": self.url("auth"),
                "ACCESS_CONSOLE__GATEWAY_URL": self.url("gateway"),
                "ACCESS_CONSOLE__STREAM_URL": self.url("stream"),
            })
            for group in ["market_data", "curves", "projections"]:
                self.env[f"ACCESS_GATEWAY__UPSTREAMS__{group.upper()}"] = f'["http://127.0.0.1:{self.upstream}"]'
            self.sample_upstream()
            # Entitlements first: it migrates PostgreSQL, and the others load its rules.
            for role in ["entitlements", "auth", "metrics", "gateway", "stream"]:
                self.spawn([role], role)
                if role == "entitlements":
                    self.wait_ready([role])
                    self.seed_rules()
        self.wait_ready(ROLES)

    def seed_rules(self):
        """PostgreSQL starts with no rules: load the shipped seed, as an operator would."""
        import yaml
        admin = self.token("seeder", "t0", "admin")
        for rule in yaml.safe_load((REPO / "config" / "seed-rules.yaml").read_text()):
            status, body, _ = call("POST", self.url("entitlements", "/entitlements/rules"), admin, rule)
            assert status == 201, f"seed rule {rule['name']}: {status} {body}"

    def sample_upstream(self):
        """A little upstream for the gateway's price routes (`access all` has its own)."""
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - the stdlib's name
                body = json.dumps({"instrument_id": self.path.rsplit("/", 1)[-1], "price": 71.5}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", self.upstream), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self.upstream_server = server

    def spawn(self, args, name):
        log = open(self.work / f"{name}.log", "w")
        self.procs.append((name, subprocess.Popen([self.binary, *args], env=self.env, stdout=log, stderr=subprocess.STDOUT)))

    def wait_ready(self, roles):
        for role in roles:
            wait_for(f"{role} /ready", lambda: call("GET", self.url(role, "/ready"))[0] == 200, within=30)

    def token(self, sub, tenant, roles):
        out = subprocess.run([self.binary, "token", "--sub", sub, "--tenant", tenant, "--roles", roles, "--ttl", "1h"],
                             env=self.env, check=True, capture_output=True, text=True)
        return out.stdout.strip()

    def stop(self):
        for name, p in self.procs:
            p.terminate()
        for name, p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
        if getattr(self, "upstream_server", None):
            self.upstream_server.shutdown()
        if self.db:
            subprocess.run(["psql", "-q", "-h", "127.0.0.1", "-U", "postgres", "-c", f"DROP DATABASE IF EXISTS {self.db} WITH (FORCE)"], check=False)

    def logs(self):
        return "\n".join(f"--- {p.name}\n" + p.read_text()[-3000:] for p in self.work.glob("*.log"))


def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1100",
                 "--disable-gpu", "--no-first-run", "--disable-extensions", "--password-store=basic"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def when_text(row):
    """An API key row's "previous secret until" cell."""
    return row.find_elements(By.TAG_NAME, "td")[6].text


class ConsoleTest:
    def __init__(self, layer, driver, shots):
        self.l, self.d, self.shots = layer, driver, shots
        # Generous: the machine that runs `make test` may be busy building.
        self.wait = WebDriverWait(driver, 20)

    # --- helpers -------------------------------------------------------------------------------

    def shot(self, page):
        path = self.shots / f"{self.l.mode}-{page}.png"
        self.d.save_screenshot(str(path))
        return path

    def find(self, css):
        return self.wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, css)))

    def click(self, css):
        # Live pages re-render: an element found a moment ago may have been replaced.
        for _ in range(5):
            try:
                self.wait.until(EC.element_to_be_clickable((By.CSS_SELECTOR, css))).click()
                return
            except StaleElementReferenceException:
                time.sleep(0.1)
        raise AssertionError(f"{css} kept being replaced")

    def press(self, row_css, label):
        """Clicks the button named `label` in the row `row_css`, found afresh: tables re-render
        after every change, so a row found a moment ago may be gone."""
        def attempt():
            try:
                self.find(row_css).find_element(By.XPATH, f".//button[text()='{label}']").click()
                return True
            except StaleElementReferenceException:
                return False
        wait_for(f"{label} in {row_css}", attempt)

    def fill(self, css, text):
        field = self.find(css)
        field.clear()
        field.send_keys(text)

    def accept_confirm(self):
        self.wait.until(EC.alert_is_present())
        self.d.switch_to.alert.accept()

    def no_script_ran(self, where):
        xss = self.d.execute_script("return window.__xss")
        assert xss is None, f"script from the page's data ran ({where}): window.__xss = {xss!r}"

    def go(self, page):
        """Opens a page afresh (the same address with only a fragment is no navigation: reload)."""
        url = self.l.url("auth", f"/console/#/{page}")
        same = self.d.current_url == url
        self.d.get(url)
        if same:
            self.d.refresh()
        self.find(f'main[data-page="{page}"]')

    def notice(self):
        return self.find("#notice").text

    # --- the walk ------------------------------------------------------------------------------

    def run(self):
        self.sign_in()
        rule_id = self.rules_and_the_gateway()
        self.why()
        self.stale_edit_and_history(rule_id)
        self.disable_and_delete(rule_id)
        self.api_keys()
        self.sessions()
        self.live()
        self.defences()

    def sign_in(self):
        self.d.get(self.l.url("auth", "/console/"))
        self.find("#signin-form")
        self.shot("signin")
        self.fill("#signin-code", "00000-00000-00000-00000")
        self.click("#signin-submit")
        wait_for("a wrong code is refused", lambda: "refused" in self.notice())
        code = self.l.code_file.read_text().strip()
        self.fill("#signin-code", code)
        self.fill("#signin-operator", "test-operator")
        self.click("#signin-submit")
        self.find('main[data-page="rules"]')
        assert "test-operator" in self.find("#who").text
        assert self.l.code_file.read_text().strip() != code, "the code is spent and replaced"
        say(self.l.mode, "signed in")

    def rules_and_the_gateway(self):
        alice = self.l.token("alice", "t1", "trader")
        price = self.l.url("gateway", "/api/v1/prices/latest/BRN-F27")
        status, body, _ = call("GET", price, alice)
        assert status == 200, f"before the rule alice reads BRN-F27: {status} {body}"
        self.click("#rule-filters button.primary")  # New rule
        self.fill('#rule-form input[name="name"]', XSS_NAME)
        Select(self.find('#rule-form select[name="effect"]')).select_by_value("deny")
        self.fill('#rule-form input[name="resource"]', "instrument:BRN-*")
        self.fill('#rule-form input[name="actions"]', "read")
        self.fill('#rule-form input[name="priority"]', "500")
        self.click("#rule-save")
        wait_for("the rule is created", lambda: "Created" in self.notice())
        row = wait_for("the rule's row", lambda: [r for r in self.d.find_elements(By.CSS_SELECTOR, "#rules-table tr[data-rule]")
                                                  if r.find_element(By.CSS_SELECTOR, ".rule-name").text == XSS_NAME])[0]
        assert not self.d.find_elements(By.CSS_SELECTOR, "#rules-table img"), "the name became markup"
        self.no_script_ran("rules table")
        self.shot("rules")
        status = wait_for("the gateway refuses alice BRN-F27 with the new rule",
                          lambda: (lambda s: s if s[0] == 403 else None)(call("GET", price, alice)), within=10)
        say(self.l.mode, "gateway refuses with the new rule:", status[0], status[1].get("code"))
        return row.get_attribute("data-rule")

    def why(self):
        self.go("why")
        self.fill('#why-form input[name="user_id"]', "alice")
        self.fill('#why-form input[name="tenant_id"]', "t1")
        self.fill('#why-form input[name="roles"]', "trader")
        self.fill('#why-form input[name="resource"]', "instrument:BRN-F27")
        self.click("#why-submit")
        decision = self.find("#why-decision")
        assert decision.text == "DENIED", decision.text
        deciding = self.find("#why-deciding .rule-name").text
        assert deciding == XSS_NAME, f"the deciding rule is named: {deciding!r}"
        assert "rules version" in self.find("#why-reason").text
        lost = [e.text for e in self.d.find_elements(By.CSS_SELECTOR, "#why-lost .rule-name")]
        assert lost, "the seed's allow for traders applied and lost"
        self.no_script_ran("why")
        self.shot("why")

    def stale_edit_and_history(self, rule_id):
        self.go("rules")
        self.press(f'tr[data-rule="{rule_id}"]', "Edit")
        self.find("#rule-form")
        # Meanwhile someone else changes the rule.
        admin = self.l.token("other-admin", "t1", "admin")
        url = self.l.url("entitlements", f"/entitlements/rules/{rule_id}")
        status, rule, headers = call("GET", url, admin)
        change = {k: rule[k] for k in ["name", "effect", "resource", "actions", "priority", "enabled"]}
        change["description"] = "changed elsewhere"
        status, body, _ = call("PUT", url, admin, change, {"If-Match": headers["etag"]})
        assert status == 200, body
        self.fill('#rule-form input[name="description"]', "my stale edit")
        self.click("#rule-save")
        wait_for("the stale edit is refused and shown", lambda: "someone changed this rule" in self.notice())
        assert "stale" in self.find("#rule-form").get_attribute("class")
        status, now, _ = call("GET", url, admin)
        assert now["description"] == "changed elsewhere", "the stale edit was not applied"
        self.shot("rules-stale")
        self.go("rules")
        self.press(f'tr[data-rule="{rule_id}"]', "History")
        actors = wait_for("the history", lambda: [r.text for r in self.d.find_elements(By.CSS_SELECTOR, "#rule-history tbody tr")])
        assert any("test-operator" in a for a in actors) and any("other-admin" in a for a in actors), actors
        self.no_script_ran("history")
        self.shot("rules-history")

    def disable_and_delete(self, rule_id):
        alice = self.l.token("alice", "t1", "trader")
        price = self.l.url("gateway", "/api/v1/prices/latest/BRN-F27")
        self.go("rules")
        self.press(f'tr[data-rule="{rule_id}"]', "Disable")
        wait_for("the rule shows disabled", lambda: "disabled" in self.find(f'tr[data-rule="{rule_id}"]').text)
        wait_for("a disabled rule refuses nothing", lambda: call("GET", price, alice)[0] == 200, within=10)
        self.press(f'tr[data-rule="{rule_id}"]', "Enable")
        wait_for("the rule shows enabled", lambda: "enabled" in self.find(f'tr[data-rule="{rule_id}"]').text)
        wait_for("enabled again, it refuses", lambda: call("GET", price, alice)[0] == 403, within=10)
        self.press(f'tr[data-rule="{rule_id}"]', "Delete")
        self.accept_confirm()
        wait_for("the rule's row is gone", lambda: not self.d.find_elements(By.CSS_SELECTOR, f'tr[data-rule="{rule_id}"]'))
        wait_for("deleted, it refuses nothing", lambda: call("GET", price, alice)[0] == 200, within=10)
        self.no_script_ran("rules after delete")
        say(self.l.mode, "disabled, enabled and deleted the rule; the gateway followed each")

    def api_keys(self):
        self.go("keys")
        self.fill('#key-form input[name="name"]', "batch <b>job</b>")
        self.fill('#key-form input[name="tenant_id"]', "t1")
        self.fill('#key-form input[name="roles"]', "trader")
        self.click("#key-create")
        key = self.find("#key-secret-value").text
        assert key.startswith("ak_"), key
        self.shot("keys-created")
        price = self.l.url("gateway", "/api/v1/prices/latest/NG-H27")
        status, body, _ = call("GET", price, headers={"X-API-Key": key})
        assert status == 200, f"the new key works at the gateway: {status} {body}"
        key_id = key.split("_")[1]
        row = self.find(f'tr[data-key="{key_id}"]')
        assert row.find_element(By.CSS_SELECTOR, ".key-name").text == "batch <b>job</b>"
        # Rotate with an overlap: a new secret, shown once; the old one keeps working meanwhile.
        Select(row.find_element(By.CSS_SELECTOR, "select")).select_by_value("5m")
        row.find_element(By.XPATH, ".//button[text()='Rotate']").click()
        rotated = wait_for("the new secret is shown", lambda: (lambda t: t if t != key else None)(self.find("#key-secret-value").text))
        assert rotated.startswith(f"ak_{key_id}_"), rotated
        for secret in (key, rotated):
            status, body, _ = call("GET", price, headers={"X-API-Key": secret})
            assert status == 200, f"within the overlap both secrets work: {status} {body}"
        self.shot("keys-rotated")
        # The rotation reloads the table: wait for its new state before pressing on.
        wait_for("the row shows the overlap", lambda: when_text(self.find(f'tr[data-key="{key_id}"]')) != "—")
        self.press(f'tr[data-key="{key_id}"]', "Revoke")
        self.accept_confirm()
        wait_for("the key shows revoked", lambda: "revoked" in self.find(f'tr[data-key="{key_id}"]').text)
        for secret in (key, rotated):
            wait_for("the gateway refuses the revoked key",
                     lambda: call("GET", price, headers={"X-API-Key": secret})[0] == 401, within=10)
        self.press(f'tr[data-key="{key_id}"]', "Audit")
        audit = wait_for("the key's audit", lambda: self.find("#key-audit").text)
        assert all(a in audit for a in ("create", "rotate", "revoke")), audit
        self.shot("keys")

    def sessions(self):
        alice = self.l.token("alice", "t1", "trader")
        ws = self.l.url("stream", "/ws/stream").replace("http://", "ws://")
        sub = subprocess.Popen([self.l.binary, "subscribe", "--url", ws, "--topic", "served.market.latest_prices.v1"],
                               env={**self.l.env, "ACCESS_TOKEN": alice}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            self.go("sessions")
            self.fill("#session-user", "alice")
            self.click("#session-lookup")
            wait_for("alice's stream is listed open", lambda: self.d.find_elements(By.CSS_SELECTOR, "#session-streams tr.open"))
            self.shot("sessions-open")
            self.click("#session-result button.danger")
            self.accept_confirm()
            wait_for("the console shows the stream closed", lambda: self.d.find_elements(By.CSS_SELECTOR, "#session-streams tr.closing")
                     and not self.d.find_elements(By.CSS_SELECTOR, "#session-streams tr.open"), within=10)
            code = sub.wait(timeout=5)
            err = sub.stderr.read()
            assert code != 0 and "4003" in err, f"the WebSocket closed with 4003 (revoked): exit {code}, {err!r}"
            self.shot("sessions-revoked")
            say(self.l.mode, "revocation closed alice's WebSocket:", err.strip().splitlines()[-1])
        finally:
            if sub.poll() is None:
                sub.kill()

    def live(self):
        # Some traffic for the plots.
        trader = self.l.token("bob", "t2", "trader")
        for _ in range(5):
            call("GET", self.l.url("gateway", "/api/v1/prices/latest/NG-H27"), trader)
        self.go("live")
        self.find("#live-routes table")
        self.find("#live-breakers")
        self.find("#live-ratelimits table")
        self.find("#live-cache table")
        self.find("#live-stream table")
        wait_for("the usage plot draws a line per tenant", lambda: len(self.d.find_elements(By.CSS_SELECTOR, "#live-usage svg polyline")) >= 1, within=15)
        first = self.find("#live-updated").text
        wait_for("the page updates without a reload", lambda: self.find("#live-updated").text != first, within=6)
        self.shot("live")

    def defences(self):
        # The token lives in this tab's sessionStorage only: no URL, no localStorage, no cookie.
        assert self.d.execute_script("return localStorage.length") == 0
        assert not self.d.get_cookies(), self.d.get_cookies()
        token = json.loads(self.d.execute_script("return sessionStorage.getItem('access.console.session')"))["token"]
        assert token not in self.d.current_url
        # The CSP blocks an injected inline script; the same injection runs on a page without it.
        inject = "var s=document.createElement('script'); s.textContent='window.__inline=1'; document.head.appendChild(s); return window.__inline;"
        assert self.d.execute_script(inject) is None, "the CSP let an inline script run"
        logs = [e["message"] for e in self.d.get_log("browser")]
        assert any("Content Security Policy" in m for m in logs), logs
        self.d.get("about:blank")
        assert self.d.execute_script(inject) == 1, "control: without the CSP the injected script runs"
        # Another origin may not frame the console; it may frame a page that allows it.
        framer = free_port()
        target = self.l.url("auth", "/console/")

        class Framer(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                src = target if self.path == "/console" else f"http://127.0.0.1:{framer}/plain"
                body = (f'<iframe id="f" src="{src}"></iframe>' if self.path in ("/console", "/control")
                        else '<p id="main">framable</p>').encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", framer), Framer)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            def framed_main(page):
                self.d.get(f"http://localhost:{framer}/{page}")
                time.sleep(1.0)
                self.d.switch_to.frame(self.find("#f"))
                try:
                    return bool(self.d.find_elements(By.ID, "main"))
                finally:
                    self.d.switch_to.default_content()
            assert framed_main("control"), "control: a framable page loads in the frame"
            assert not framed_main("console"), "the console loaded inside another origin's frame"
        finally:
            server.shutdown()
        # Signing out forgets the token.
        self.d.get(self.l.url("auth", "/console/#/rules"))
        self.click("#signout")
        self.find("#signin-form")
        assert self.d.execute_script("return sessionStorage.length") == 0
        self.shot("signed-out")


def readme_shot(layer, driver, path):
    """The live layer with some traffic from three tenants and two subscribers, for the README."""
    tokens = {t: layer.token(f"user-{t}", t, "trader") for t in ("t1", "t2", "t3")}
    ws = layer.url("stream", "/ws/stream").replace("http://", "ws://")
    subs = [subprocess.Popen([layer.binary, "subscribe", "--url", ws, "--topic", "served.market.latest_prices.v1"],
                             env={**layer.env, "ACCESS_TOKEN": tokens[t]}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for t in ("t1", "t2")]
    stop = threading.Event()

    def traffic():
        i = 0
        while not stop.is_set():
            for tenant, every in (("t1", 1), ("t2", 2), ("t3", 5)):
                if i % every == 0:
                    call("GET", layer.url("gateway", f"/api/v1/prices/latest/NG-H{27 + i % 3}"), tokens[tenant])
            i += 1
            time.sleep(0.2)

    thread = threading.Thread(target=traffic, daemon=True)
    thread.start()
    try:
        driver.set_window_size(1400, 1000)
        driver.get(layer.url("auth", "/console/"))
        wait = WebDriverWait(driver, 10)
        wait.until(EC.presence_of_element_located((By.ID, "signin-code"))).send_keys(layer.code_file.read_text().strip())
        driver.find_element(By.ID, "signin-operator").clear()
        driver.find_element(By.ID, "signin-operator").send_keys("ops")
        driver.find_element(By.ID, "signin-submit").click()
        wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, 'main[data-page="rules"]')))
        driver.get(layer.url("auth", "/console/#/live"))
        time.sleep(25)
        WebDriverWait(driver, 10).until(EC.presence_of_element_located((By.CSS_SELECTOR, "#live-usage svg polyline")))
        driver.save_screenshot(path)
    finally:
        stop.set()
        thread.join()
        for sub in subs:
            sub.kill()
            sub.wait()


class LocalIdp:
    """A real OIDC identity provider over HTTP for the sign-in (no Keycloak runs here, so the test
    serves the protocol itself, as the JWKS tests serve generated keys): a discovery document, a JWKS, an authorization
    endpoint that sends the browser straight back with a code (remembering its PKCE challenge),
    and a token endpoint that redeems the code only with the matching verifier. Its tokens are
    signed by a key of its own, minted with `access token` (issuer and audience set to its)."""

    def __init__(self, binary, work):
        self.binary, self.work = binary, Path(work)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.key = self.work / "idp-key.json"
        self.codes = {}
        self.redeemed = []
        idp = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def answer(self, status, body, headers=None):
                data = json.dumps(body).encode()
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):  # noqa: N802
                url = urllib.parse.urlparse(self.path)
                q = dict(urllib.parse.parse_qsl(url.query))
                if url.path == "/.well-known/openid-configuration":
                    self.answer(200, {"issuer": idp.url, "authorization_endpoint": idp.url + "/auth",
                                      "token_endpoint": idp.url + "/token", "jwks_uri": idp.url + "/certs"})
                elif url.path == "/certs":
                    jwk = json.loads(idp.key.read_text())
                    jwk.pop("d", None)
                    self.answer(200, {"keys": [jwk]})
                elif url.path == "/auth":
                    ok = q.get("response_type") == "code" and q.get("client_id") == "access-console" \
                        and q.get("code_challenge_method") == "S256" and q.get("code_challenge")
                    if not ok:
                        self.answer(400, {"error": "invalid_request", "got": q})
                        return
                    code = secrets.token_urlsafe(16)
                    idp.codes[code] = (q["code_challenge"], q["redirect_uri"])
                    back = q["redirect_uri"] + "?" + urllib.parse.urlencode({"code": code, "state": q.get("state", "")})
                    self.answer(302, {}, {"Location": back})
                else:
                    self.answer(404, {})

            def do_POST(self):  # noqa: N802
                form = dict(urllib.parse.parse_qsl(self.rfile.read(int(self.headers["Content-Length"])).decode()))
                found = idp.codes.pop(form.get("code"), None)
                verifier = form.get("code_verifier", "")
                challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
                if not found or found != (challenge, form.get("redirect_uri")) or form.get("client_id") != "access-console":
                    self.answer(400, {"error": "invalid_grant"})
                    return
                idp.redeemed.append(form["code"])
                self.answer(200, {"access_token": idp.token("ops-oidc", "admin"), "token_type": "Bearer", "expires_in": 600})

            def log_message(self, *args):
                pass

        self.token("warm-up", "admin")  # creates the key
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def token(self, sub, roles):
        env = {"PATH": os.environ.get("PATH", ""), "HOME": str(self.work), "ACCESS_AUTH__DEV_KEY_FILE": str(self.key),
               "ACCESS_AUTH__ISSUER": self.url, "ACCESS_AUTH__AUDIENCE": "access"}
        out = subprocess.run([self.binary, "token", "--sub", sub, "--tenant", "t1", "--roles", roles, "--ttl", "10m"],
                             env=env, check=True, capture_output=True, text=True)
        return out.stdout.strip()


def run_oidc(binary, shots):
    """Sign-in through the IdP: authorization code with PKCE, in the browser."""
    with tempfile.TemporaryDirectory(prefix="console-oidc-") as work:
        idp = LocalIdp(binary, work)
        port = free_port()
        env = {"PATH": os.environ.get("PATH", ""), "HOME": work, "ACCESS_LOG_LEVEL": "warn",
               "ACCESS_SERVER__HOST": "127.0.0.1", "ACCESS_JWKS_URL": idp.url + "/certs",
               "ACCESS_AUTH__ISSUER": idp.url, "ACCESS_AUTH__AUDIENCE": "access",
               "ACCESS_CONSOLE__ENABLED": "true", "ACCESS_CONSOLE__OIDC_CLIENT_ID": "access-console"}
        log = open(Path(work) / "auth.log", "w")
        auth = subprocess.Popen([binary, "auth", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
        driver = None
        try:
            base = f"http://127.0.0.1:{port}"
            wait_for("auth /ready", lambda: call("GET", base + "/ready")[0] == 200, within=30)
            driver = browser()
            wait = WebDriverWait(driver, 10)
            driver.get(base + "/console/")
            button = wait.until(EC.element_to_be_clickable((By.XPATH, "//button[text()='Sign in with the identity provider']")))
            driver.save_screenshot(str(shots / "oidc-signin.png"))
            button.click()
            wait.until(EC.text_to_be_present_in_element((By.ID, "who"), "ops-oidc (admin)"))
            assert idp.redeemed, "the code was redeemed at the IdP's token endpoint"
            assert driver.current_url == base + "/console/", f"the code left the address bar: {driver.current_url}"
            assert driver.execute_script("return sessionStorage.getItem('access.console.pkce')") is None, "the PKCE verifier is gone"
            assert driver.execute_script("return localStorage.length") == 0
            driver.save_screenshot(str(shots / "oidc-signed-in.png"))
            say("oidc: signed in through the IdP (authorization code with PKCE)")
        except Exception:
            if driver:
                driver.save_screenshot(str(shots / "oidc-FAILED.png"))
            log.flush()
            print((Path(work) / "auth.log").read_text()[-3000:], file=sys.stderr)
            raise
        finally:
            if driver:
                driver.quit()
            auth.terminate()
            auth.wait(timeout=15)
            idp.server.shutdown()


def run_mode(binary, mode, shots, readme):
    with tempfile.TemporaryDirectory(prefix=f"console-{mode}-") as work:
        layer = Layer(binary, mode, work)
        driver = None
        try:
            started = time.monotonic()
            layer.start()
            say(mode, f"layer ready in {time.monotonic() - started:.1f}s")
            driver = browser()
            ConsoleTest(layer, driver, shots).run()
            if readme:
                readme_shot(layer, driver, readme)
            say(mode, f"passed in {time.monotonic() - started:.1f}s")
        except Exception:
            if driver:
                try:
                    driver.save_screenshot(str(shots / f"{mode}-FAILED.png"))
                except WebDriverException:
                    pass
            print(layer.logs(), file=sys.stderr)
            raise
        finally:
            if driver:
                driver.quit()
            layer.stop()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", required=True)
    ap.add_argument("--mode", default="all", choices=["embedded", "backends", "oidc", "all"])
    ap.add_argument("--readme-screenshot")
    args = ap.parse_args()
    target = Path(os.environ.get("CARGO_TARGET_DIR", Path.home() / ".cache/access/target"))
    shots = target / "console-screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    for stale in shots.glob("*-FAILED.png"):
        stale.unlink()
    modes = ["embedded", "backends", "oidc"] if args.mode == "all" else [args.mode]
    for mode in modes:
        if mode == "oidc":
            run_oidc(os.path.abspath(args.binary), shots)
        else:
            run_mode(os.path.abspath(args.binary), mode, shots, args.readme_screenshot if mode == "embedded" else None)
    say("screenshots in", shots)


if __name__ == "__main__":
    main()
