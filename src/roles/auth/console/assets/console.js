// The access console: one module, no dependencies, no build step.
//
// Rules this file keeps (the page's Content-Security-Policy enforces the first two):
// - no inline script, no eval, no markup built from strings: every element is made with
//   createElement and every piece of data goes in as text (textContent, text nodes, attribute
//   values set one by one), so a rule named <img src=x onerror=alert(1)> shows as text;
// - every call goes to this origin (/console/...), with the operator's own token;
// - the token lives in sessionStorage (this tab only, gone when it closes), never in a URL,
//   a cookie or any storage that outlives the tab.

const SESSION_KEY = "access.console.session";
const PKCE_KEY = "access.console.pkce";
const ACTIONS = ["read", "write", "delete", "admin", "subscribe"];
const SVG_NS = "http://www.w3.org/2000/svg";

// ---------------------------------------------------------------------------------------------
// DOM helpers: data is only ever text.

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) throw new Error("no inline handlers: use listen()");
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key === "value") node.value = value;
    else if (key === "checked") node.checked = Boolean(value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  return append(node, ...children);
}

function append(node, ...children) {
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function svg(tag, attrs, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "text") node.textContent = value;
    else node.setAttribute(key, String(value));
  }
  for (const child of children.flat(Infinity)) if (child) node.append(child);
  return node;
}

function listen(node, event, handler) {
  node.addEventListener(event, handler);
  return node;
}

function button(label, handler, cls) {
  return listen(el("button", { type: "button", class: cls, text: label }), "click", handler);
}

function clear(node) {
  while (node.firstChild) node.firstChild.remove();
  return node;
}

const $ = (id) => document.getElementById(id);

function notice(message, kind) {
  const box = $("notice");
  box.className = "notice" + (kind ? " " + kind : "");
  box.textContent = message;
  box.hidden = !message;
}

function when(seconds) {
  if (seconds === null || seconds === undefined) return "—";
  const d = typeof seconds === "number" ? new Date(seconds * 1000) : new Date(seconds);
  return isNaN(d) ? String(seconds) : d.toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z");
}

function list(value) {
  return String(value || "").split(",").map((s) => s.trim()).filter(Boolean);
}

// A generic, text-only rendering of any JSON value (objects as tables).
function view(value) {
  if (value === null || value === undefined) return el("span", { class: "muted", text: "—" });
  if (Array.isArray(value)) {
    if (value.length === 0) return el("span", { class: "muted", text: "none" });
    if (value.every((v) => v && typeof v === "object" && !Array.isArray(v))) {
      const keys = [...new Set(value.flatMap((v) => Object.keys(v)))];
      return el("table", {},
        el("thead", {}, el("tr", {}, keys.map((k) => el("th", { text: k })))),
        el("tbody", {}, value.map((v) => el("tr", {}, keys.map((k) => cell(v[k]))))));
    }
    return el("span", { text: value.map((v) => typeof v === "object" ? JSON.stringify(v) : String(v)).join(", ") });
  }
  if (typeof value === "object") {
    return el("table", {}, el("tbody", {}, Object.entries(value).map(([k, v]) =>
      el("tr", {}, el("th", { text: k }), cell(v)))));
  }
  return el("span", { text: String(value) });
}

function cell(v) {
  if (typeof v === "number") return el("td", { class: "num", text: String(v) });
  if (v && typeof v === "object") return el("td", {}, view(v));
  return el("td", { text: v === null || v === undefined ? "—" : String(v) });
}

// ---------------------------------------------------------------------------------------------
// Session and calls.

function session() {
  try {
    const s = JSON.parse(sessionStorage.getItem(SESSION_KEY) || "null");
    if (s && s.token && s.expires_at * 1000 > Date.now()) return s;
  } catch (_) { /* a damaged entry is no session */ }
  sessionStorage.removeItem(SESSION_KEY);
  return null;
}

class ApiError extends Error {
  constructor(status, body) {
    super((body && body.message) || "HTTP " + status);
    this.status = status;
    this.body = body || {};
  }
}

// Calls a role's API through the console's relay, as the signed-in operator.
async function api(role, method, path, body, headers) {
  const s = session();
  if (!s) { signedOut("Your session ended; sign in again."); throw new ApiError(401, { message: "signed out" }); }
  const init = { method, headers: Object.assign({ Authorization: "Bearer " + s.token }, headers || {}), cache: "no-store", credentials: "omit" };
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  const response = await fetch("/console/api/" + role + path, init);
  const text = await response.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (_) { data = { message: text }; }
  if (response.status === 401) { signedOut("Your token was refused (" + ((data && data.reason) || "unauthenticated") + "); sign in again."); }
  if (!response.ok) throw new ApiError(response.status, data);
  return { data, etag: response.headers.get("etag"), status: response.status };
}

function explainError(e) {
  if (!(e instanceof ApiError)) return String(e);
  const b = e.body || {};
  return [b.code || e.status, b.message, b.field ? "(field " + b.field + ")" : "", b.retry_after ? "retry in " + b.retry_after + " s" : ""]
    .filter(Boolean).join(" ");
}

// ---------------------------------------------------------------------------------------------
// Sign-in.

function base64url(bytes) {
  let s = "";
  for (const b of new Uint8Array(bytes)) s += String.fromCharCode(b);
  return btoa(s).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

function randomString(n) {
  return base64url(crypto.getRandomValues(new Uint8Array(n)));
}

function consoleUrl() {
  return location.origin + "/console/";
}

async function startOidc(setup) {
  const verifier = randomString(48);
  const state = randomString(24);
  const challenge = base64url(await crypto.subtle.digest("SHA-256", new TextEncoder().encode(verifier)));
  // Only for the round trip to the IdP; removed as soon as the code comes back.
  sessionStorage.setItem(PKCE_KEY, JSON.stringify({ verifier, state }));
  const url = new URL(setup.authorization_url);
  url.searchParams.set("response_type", "code");
  url.searchParams.set("client_id", setup.client_id || "");
  url.searchParams.set("redirect_uri", consoleUrl());
  url.searchParams.set("scope", (setup.scopes || ["openid"]).join(" "));
  url.searchParams.set("state", state);
  url.searchParams.set("code_challenge", challenge);
  url.searchParams.set("code_challenge_method", "S256");
  location.assign(url.toString());
}

async function finishOidc() {
  const params = new URLSearchParams(location.search);
  if (!params.has("code") && !params.has("error")) return;
  // The code leaves the address bar (and the history) at once.
  history.replaceState(null, "", "/console/");
  const saved = JSON.parse(sessionStorage.getItem(PKCE_KEY) || "null");
  sessionStorage.removeItem(PKCE_KEY);
  if (params.has("error")) { notice("The identity provider refused: " + params.get("error"), "error"); return; }
  if (!saved || saved.state !== params.get("state")) { notice("Sign-in answer not expected (state mismatch); try again.", "error"); return; }
  const response = await fetch("/console/session/oidc", {
    method: "POST", headers: { "Content-Type": "application/json" }, credentials: "omit",
    body: JSON.stringify({ code: params.get("code"), code_verifier: saved.verifier, redirect_uri: consoleUrl() }),
  });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) { notice("Sign-in refused: " + (data.message || response.status), "error"); return; }
  sessionStorage.setItem(SESSION_KEY, JSON.stringify(data));
}

async function signInPage() {
  $("nav").hidden = true;
  $("signout").hidden = true;
  $("who").textContent = "";
  const main = clear($("main"));
  let setup;
  try {
    const r = await fetch("/console/session/setup", { credentials: "omit" });
    setup = await r.json();
    if (!r.ok) throw new Error(setup.message || r.status);
  } catch (e) {
    append(main, el("p", { class: "notice error", text: "The console cannot reach its sign-in: " + e.message }));
    return;
  }
  append(main, el("h2", { text: "Sign in" }),
    el("p", { class: "muted", text: "Only the " + setup.admin_role + " role gets in. Everything you do is done with your own token, checked and audited by each role." }));
  if (setup.mode === "oidc") {
    append(main, button("Sign in with the identity provider", () => startOidc(setup), "primary"));
    return;
  }
  const code = el("input", { id: "signin-code", name: "code", autocomplete: "off", required: true, placeholder: "xxxxx-xxxxx-xxxxx-xxxxx" });
  const operator = el("input", { id: "signin-operator", name: "operator", value: "operator", autocomplete: "username" });
  const form = el("form", { class: "grid", id: "signin-form" },
    el("label", { class: "wide" }, "Dev mode. The one-time sign-in code is in " + setup.code_file + " on the machine running the layer (make run prints it; cat the file for the next one).",
      code),
    el("label", {}, "Your name (the audit records it)", operator),
    el("div", { class: "row" }, el("button", { type: "submit", class: "primary", id: "signin-submit", text: "Sign in" })));
  listen(form, "submit", async (event) => {
    event.preventDefault();
    const response = await fetch("/console/session/dev", {
      method: "POST", headers: { "Content-Type": "application/json" }, credentials: "omit",
      body: JSON.stringify({ code: code.value, operator: operator.value }),
    });
    const data = await response.json().catch(() => ({}));
    if (!response.ok) { notice("Sign-in refused: " + (data.message || response.status), "error"); return; }
    sessionStorage.setItem(SESSION_KEY, JSON.stringify(data));
    notice("");
    route();
  });
  append(main, form);
}

function signedOut(message) {
  sessionStorage.removeItem(SESSION_KEY);
  stopTimers();
  notice(message || "", message ? "error" : "");
  location.hash = "";
  signInPage();
}

// ---------------------------------------------------------------------------------------------
// Pages. Each live page registers its timers here; leaving the page stops them.

let timers = [];
function every(ms, fn) { fn(); timers.push(setInterval(fn, ms)); }
function stopTimers() { timers.forEach(clearInterval); timers = []; }

const PAGES = { rules: rulesPage, why: whyPage, keys: keysPage, sessions: sessionsPage, live: livePage };

async function route() {
  stopTimers();
  notice("");
  const s = session();
  if (!s) { signInPage(); return; }
  $("nav").hidden = false;
  $("signout").hidden = false;
  $("who").textContent = s.subject + " (" + s.roles.join(", ") + ")";
  const [, name, arg] = (location.hash || "#/rules").split("/");
  const page = PAGES[name] ? name : "rules";
  for (const a of document.querySelectorAll("#nav a")) a.classList.toggle("active", a.dataset.page === page);
  const main = clear($("main"));
  main.dataset.page = page;
  try {
    await PAGES[page](main, arg ? decodeURIComponent(arg) : undefined);
  } catch (e) {
    append(main, el("p", { class: "notice error", text: explainError(e) }));
  }
}

// --- Rules ------------------------------------------------------------------------------------

function ruleForm(rule, onSaved) {
  const r = rule || { effect: "allow", actions: ["read"], priority: 0, enabled: true, conditions: [] };
  const f = {
    name: el("input", { name: "name", value: r.name || "", required: true }),
    description: el("input", { name: "description", value: r.description || "" }),
    effect: el("select", { name: "effect" }, ["allow", "deny"].map((v) => el("option", { value: v, text: v }))),
    resource: el("input", { name: "resource", value: r.resource || "", required: true, placeholder: "instrument:BRN-*" }),
    actions: el("input", { name: "actions", value: (r.actions || []).join(", "), placeholder: ACTIONS.join(", ") + " or *" }),
    tenant_id: el("input", { name: "tenant_id", value: r.tenant_id || "", placeholder: "any" }),
    user_id: el("input", { name: "user_id", value: r.user_id || "", placeholder: "any" }),
    roles: el("input", { name: "roles", value: (r.roles || []).join(", "), placeholder: "any" }),
    priority: el("input", { name: "priority", type: "number", value: String(r.priority || 0) }),
    enabled: el("input", { name: "enabled", type: "checkbox", checked: r.enabled !== false }),
    expires_at: el("input", { name: "expires_at", value: r.expires_at || "", placeholder: "2027-01-01T00:00:00Z (optional)" }),
    conditions: el("textarea", { name: "conditions", value: JSON.stringify(r.conditions || [], null, 1) }),
  };
  f.effect.value = r.effect;
  const form = el("form", { class: "grid", id: "rule-form" },
    el("label", {}, "Name", f.name), el("label", {}, "Effect", f.effect), el("label", {}, "Resource (glob)", f.resource),
    el("label", {}, "Actions", f.actions), el("label", {}, "Tenant", f.tenant_id), el("label", {}, "User", f.user_id),
    el("label", {}, "Roles (any of)", f.roles), el("label", {}, "Priority", f.priority), el("label", {}, "Expires at", f.expires_at),
    el("label", {}, "Enabled", f.enabled), el("label", { class: "wide" }, "Description", f.description),
    el("label", { class: "wide" }, "Conditions (JSON list of {field, operator, value})", f.conditions),
    el("div", { class: "row" }, el("button", { type: "submit", class: "primary", id: "rule-save", text: rule ? "Save version " + rule.version : "Create rule" }),
      button("Cancel", () => form.remove())));
  listen(form, "submit", async (event) => {
    event.preventDefault();
    let conditions;
    try { conditions = JSON.parse(f.conditions.value || "[]"); } catch (e) { notice("Conditions are not JSON: " + e.message, "error"); return; }
    const body = {
      name: f.name.value, description: f.description.value, effect: f.effect.value, resource: f.resource.value,
      actions: list(f.actions.value), roles: list(f.roles.value), priority: Number(f.priority.value || 0),
      enabled: f.enabled.checked, conditions,
    };
    if (f.tenant_id.value.trim()) body.tenant_id = f.tenant_id.value.trim();
    if (f.user_id.value.trim()) body.user_id = f.user_id.value.trim();
    if (f.expires_at.value.trim()) body.expires_at = f.expires_at.value.trim();
    try {
      const saved = rule
        ? await api("entitlements", "PUT", "/entitlements/rules/" + encodeURIComponent(rule.id), body, { "If-Match": '"' + rule.version + '"' })
        : await api("entitlements", "POST", "/entitlements/rules", body);
      notice((rule ? "Saved " : "Created ") + saved.data.name + " (version " + saved.data.version + ").", "ok");
      onSaved();
    } catch (e) {
      if (e.status === 409) {
        form.classList.add("stale");
        notice("Refused: someone changed this rule since you opened it (you edited version " + rule.version + "). " +
          "Your edit was not applied; reopen the rule to see the current version.", "error");
      } else notice("Refused: " + explainError(e), "error");
    }
  });
  return form;
}

async function rulesPage(main) {
  append(main, el("h2", { text: "Rules" }));
  const filters = {
    tenant_id: el("input", { name: "tenant_id", placeholder: "tenant" }),
    user_id: el("input", { name: "user_id", placeholder: "user" }),
    resource: el("input", { name: "resource", placeholder: "resource it matches" }),
    text: el("input", { name: "text", id: "rule-filter", placeholder: "name contains" }),
  };
  const formSlot = el("div", { id: "rule-form-slot" });
  const table = el("div", { id: "rules-table" });
  const detail = el("div", { id: "rule-detail" });
  const load = async () => {
    const q = new URLSearchParams({ limit: "1000" });
    for (const k of ["tenant_id", "user_id", "resource"]) if (filters[k].value.trim()) q.set(k, filters[k].value.trim());
    const { data } = await api("entitlements", "GET", "/entitlements/rules?" + q);
    const text = filters.text.value.trim().toLowerCase();
    const rules = data.rules.filter((r) => !text || r.name.toLowerCase().includes(text));
    clear(table);
    append(table, el("p", { class: "muted", text: rules.length + " of " + data.total + " rules; rules version " + data.rules_version }),
      el("table", {},
        el("thead", {}, el("tr", {}, ["Name", "Effect", "Resource", "Actions", "Scope", "Priority", "State", "Version", ""].map((h) => el("th", { text: h })))),
        el("tbody", {}, rules.map((r) => el("tr", { "data-rule": r.id },
          el("td", { class: "rule-name", text: r.name }),
          el("td", {}, el("span", { class: "badge " + r.effect, text: r.effect })),
          el("td", { text: r.resource }), el("td", { text: r.actions.join(", ") }),
          el("td", { text: [r.tenant_id && "tenant " + r.tenant_id, r.user_id && "user " + r.user_id, r.roles.length && "roles " + r.roles.join("|")].filter(Boolean).join("; ") || "everyone" }),
          el("td", { class: "num", text: String(r.priority) }),
          el("td", {}, el("span", { class: "badge " + (r.enabled ? "allow" : "off"), text: r.enabled ? "enabled" : "disabled" })),
          el("td", { class: "num", text: String(r.version) }),
          el("td", {},
            button("Edit", () => { clear(formSlot); append(formSlot, ruleForm(r, load)); }),
            button(r.enabled ? "Disable" : "Enable", async () => {
              const body = Object.assign({}, r, { enabled: !r.enabled });
              for (const k of ["id", "version", "created_at", "updated_at"]) delete body[k];
              try {
                await api("entitlements", "PUT", "/entitlements/rules/" + encodeURIComponent(r.id), body, { "If-Match": '"' + r.version + '"' });
                notice((r.enabled ? "Disabled " : "Enabled ") + r.name + ".", "ok");
              } catch (e) { notice("Refused: " + explainError(e), "error"); }
              load();
            }),
            button("History", () => showHistory(r, detail)),
            button("Delete", async () => {
              if (!confirm("Delete the rule \u201c" + r.name + "\u201d?")) return;
              try {
                await api("entitlements", "DELETE", "/entitlements/rules/" + encodeURIComponent(r.id), undefined, { "If-Match": '"' + r.version + '"' });
                notice("Deleted " + r.name + ".", "ok");
              } catch (e) { notice("Refused: " + explainError(e), "error"); }
              load();
            }, "danger")))))));
  };
  const filterForm = el("form", { class: "row", id: "rule-filters" }, Object.values(filters),
    el("button", { type: "submit", text: "Filter" }),
    button("New rule", () => { clear(formSlot); append(formSlot, ruleForm(null, load)); }, "primary"));
  listen(filterForm, "submit", (e) => { e.preventDefault(); load(); });
  append(main, filterForm, formSlot, table, detail);
  await load();
}

async function showHistory(rule, slot) {
  clear(slot);
  const { data } = await api("entitlements", "GET", "/entitlements/rules/" + encodeURIComponent(rule.id) + "/history");
  append(slot, el("h3", { text: "History of " + rule.name }),
    el("table", { id: "rule-history" },
      el("thead", {}, el("tr", {}, ["When", "Change", "By", "Rules version", "Before", "After"].map((h) => el("th", { text: h })))),
      el("tbody", {}, data.history.map((h) => el("tr", {},
        el("td", { text: when(h.at) }), el("td", { text: h.change }), el("td", { text: h.actor }),
        el("td", { class: "num", text: String(h.rules_version) }),
        el("td", {}, el("pre", { class: "json", text: h.old ? JSON.stringify(h.old, null, 1) : "—" })),
        el("td", {}, el("pre", { class: "json", text: h.new ? JSON.stringify(h.new, null, 1) : "—" })))))));
}

// --- Why? -------------------------------------------------------------------------------------

async function whyPage(main) {
  append(main, el("h2", { text: "Why?" }),
    el("p", { class: "muted", text: "The decision for a user, tenant, roles, resource and action; the rule that decided, the rules that applied and lost, and the rules version. The same evaluator the gateway and the stream use." }));
  const f = {
    user_id: el("input", { name: "user_id", required: true, placeholder: "alice" }),
    tenant_id: el("input", { name: "tenant_id", required: true, placeholder: "t1" }),
    roles: el("input", { name: "roles", placeholder: "trader, quant" }),
    resource: el("input", { name: "resource", required: true, placeholder: "instrument:BRN-F27" }),
    action: el("select", { name: "action" }, ACTIONS.map((a) => el("option", { value: a, text: a }))),
    context: el("textarea", { name: "context", value: "{}" }),
  };
  const out = el("div", { id: "why-result" });
  const form = el("form", { class: "grid", id: "why-form" },
    el("label", {}, "User", f.user_id), el("label", {}, "Tenant", f.tenant_id), el("label", {}, "Roles", f.roles),
    el("label", {}, "Resource", f.resource), el("label", {}, "Action", f.action),
    el("label", { class: "wide" }, "Context (JSON)", f.context),
    el("div", { class: "row" }, el("button", { type: "submit", class: "primary", id: "why-submit", text: "Why?" })));
  listen(form, "submit", async (event) => {
    event.preventDefault();
    let context;
    try { context = JSON.parse(f.context.value || "{}"); } catch (e) { notice("Context is not JSON: " + e.message, "error"); return; }
    try {
      const { data } = await api("entitlements", "POST", "/entitlements/explain", {
        user_id: f.user_id.value.trim(), tenant_id: f.tenant_id.value.trim(), roles: list(f.roles.value),
        resource: f.resource.value.trim(), action: f.action.value, context,
      });
      renderExplanation(clear(out), data);
    } catch (e) { notice("Refused: " + explainError(e), "error"); }
  });
  append(main, form, out);
}

function ruleRows(rules, id) {
  if (!rules.length) return el("p", { class: "muted", text: "none" });
  return el("table", { id },
    el("thead", {}, el("tr", {}, ["Rule", "Effect", "Resource", "Actions", "Priority", "Why"].map((h) => el("th", { text: h })))),
    el("tbody", {}, rules.map((r) => el("tr", { "data-rule": r.id },
      el("td", { class: "rule-name", text: r.name }), el("td", {}, el("span", { class: "badge " + r.effect, text: r.effect })),
      el("td", { text: r.resource }), el("td", { text: r.actions.join(", ") }), el("td", { class: "num", text: String(r.priority) }),
      el("td", { text: r.because })))));
}

function renderExplanation(out, data) {
  append(out,
    el("div", { class: "decision " + (data.allowed ? "allow" : "deny"), id: "why-decision", text: data.allowed ? "ALLOWED" : "DENIED" }),
    el("p", { id: "why-reason" }, "Reason: " + data.reason + "; rules version " + data.rules_version + "."),
    el("h3", { text: "Deciding rule" }),
    data.deciding_rule
      ? el("div", { class: "card", id: "why-deciding" },
        el("b", { class: "rule-name", text: data.deciding_rule.name }), " ",
        el("span", { class: "badge " + data.deciding_rule.effect, text: data.deciding_rule.effect }),
        el("div", { class: "muted", text: data.deciding_rule.resource + " · " + data.deciding_rule.actions.join(", ") + " · priority " + data.deciding_rule.priority + " · " + data.deciding_rule.because }))
      : el("div", { class: "card", id: "why-deciding", text: "No rule applies: denied by default." }),
    el("h3", { text: "Applied and lost" }), ruleRows(data.applied_and_lost, "why-lost"),
    el("h3", { text: "Matched the resource but did not apply" }), ruleRows(data.not_applicable, "why-not-applicable"));
}

// --- API keys ---------------------------------------------------------------------------------

function showSecret(slot, title, key) {
  clear(slot);
  append(slot, el("div", { class: "card", id: "key-secret" },
    el("b", { text: title }),
    el("p", { class: "muted", text: "Shown once: only its hash is stored. Copy it now." }),
    el("div", { class: "secret", id: "key-secret-value", text: key }),
    el("div", { class: "row" },
      button("Copy", () => navigator.clipboard && navigator.clipboard.writeText(key)),
      button("I have stored it", () => clear(slot)))));
}

async function keysPage(main) {
  append(main, el("h2", { text: "API keys" }));
  const secretSlot = el("div");
  const table = el("div", { id: "keys-table" });
  const audit = el("div", { id: "key-audit" });
  const f = {
    name: el("input", { name: "name", required: true, placeholder: "pricing-batch" }),
    tenant_id: el("input", { name: "tenant_id", required: true, placeholder: "t1" }),
    roles: el("input", { name: "roles", placeholder: "trader" }),
    expires_at: el("input", { name: "expires_at", placeholder: "2027-01-01T00:00:00Z (optional)" }),
  };
  const form = el("form", { class: "grid", id: "key-form" },
    el("label", {}, "Name", f.name), el("label", {}, "Tenant", f.tenant_id), el("label", {}, "Roles", f.roles),
    el("label", {}, "Expires at", f.expires_at),
    el("div", { class: "row" }, el("button", { type: "submit", class: "primary", id: "key-create", text: "Create key" })));
  const load = async () => {
    const { data } = await api("auth", "GET", "/auth/api-keys");
    clear(table);
    append(table, el("table", {},
      el("thead", {}, el("tr", {}, ["Id", "Name", "Tenant", "Roles", "Created", "Expires", "Previous secret until", "Last used", "State", ""].map((h) => el("th", { text: h })))),
      el("tbody", {}, data.api_keys.map((k) => {
        const overlap = el("select", { "aria-label": "overlap" }, ["0s", "5m", "1h", "24h"].map((o) => el("option", { value: o, text: "overlap " + o })));
        return el("tr", { "data-key": k.id },
          el("td", { text: k.id }), el("td", { class: "key-name", text: k.name }), el("td", { text: k.tenant_id }), el("td", { text: k.roles.join(", ") }),
          el("td", { text: when(k.created_at) }), el("td", { text: when(k.expires_at) }), el("td", { text: when(k.previous_valid_until) }),
          el("td", { text: when(k.last_used_at) }),
          el("td", {}, el("span", { class: "badge " + (k.revoked_at ? "deny" : "allow"), text: k.revoked_at ? "revoked" : "active" })),
          el("td", {}, k.revoked_at ? null : [overlap,
            button("Rotate", async () => {
              try {
                const { data: rotated } = await api("auth", "POST", "/auth/api-keys/" + encodeURIComponent(k.id) + "/rotate", { overlap: overlap.value });
                showSecret(secretSlot, "New secret of " + k.name + " (the old one works until " + when(rotated.previous_valid_until) + ")", rotated.key);
              } catch (e) { notice("Refused: " + explainError(e), "error"); }
              load();
            }),
            button("Revoke", async () => {
              if (!confirm("Revoke the API key \u201c" + k.name + "\u201d? Its callers are refused at once.")) return;
              try { await api("auth", "DELETE", "/auth/api-keys/" + encodeURIComponent(k.id)); notice("Revoked " + k.name + ".", "ok"); }
              catch (e) { notice("Refused: " + explainError(e), "error"); }
              load();
            }, "danger")],
          button("Audit", async () => {
            const { data: trail } = await api("auth", "GET", "/auth/api-keys/" + encodeURIComponent(k.id) + "/audit");
            clear(audit);
            append(audit, el("h3", { text: "Audit of " + k.name }), view(trail.audit.map((a) => ({ when: when(a.at), action: a.action, by: a.actor }))));
          })));
      }))));
  };
  listen(form, "submit", async (event) => {
    event.preventDefault();
    const body = { name: f.name.value.trim(), tenant_id: f.tenant_id.value.trim(), roles: list(f.roles.value) };
    if (f.expires_at.value.trim()) body.expires_at = f.expires_at.value.trim();
    try {
      const { data } = await api("auth", "POST", "/auth/api-keys", body);
      showSecret(secretSlot, "API key " + data.name + " (" + data.id + ")", data.key);
      form.reset();
    } catch (e) { notice("Refused: " + explainError(e), "error"); }
    load();
  });
  append(main, form, secretSlot, table, audit);
  await load();
}

// --- Sessions ---------------------------------------------------------------------------------

async function sessionsPage(main, preset) {
  append(main, el("h2", { text: "Sessions" }),
    el("p", { class: "muted", text: "Look a user up; revoke every token they hold and watch their open streams close." }));
  const user = el("input", { name: "user", id: "session-user", required: true, placeholder: "alice", value: preset || "" });
  const out = el("div", { id: "session-result" });
  const form = el("form", { class: "row", id: "session-form" }, user, el("button", { type: "submit", class: "primary", id: "session-lookup", text: "Look up" }));
  // Connections seen open during this look-up; those gone since are shown closed.
  let seen = new Map();
  const show = async (id) => {
    const [info, conns] = await Promise.all([
      api("auth", "GET", "/auth/users/" + encodeURIComponent(id)).then((r) => r.data).catch((e) => (e.status === 404 ? null : Promise.reject(e))),
      api("stream", "GET", "/stats/users/" + encodeURIComponent(id)).then((r) => r.data).catch((e) => ({ error: explainError(e), connections: [] })),
    ]);
    clear(out);
    append(out, el("div", { class: "card", id: "session-info" },
      info ? [el("b", { text: info.user_id }), " tenant " + (info.tenant_id || "—") + ", roles " + (info.roles || []).join(", ") +
        ", last seen " + when(info.last_seen) + ", tokens revoked before " + when(info.revoked_before)]
        : el("span", { class: "muted", text: "No verified request by " + id + " has been recorded (seen users are sampled once a minute)." })),
    el("div", { class: "row" }, button("Revoke all of " + id + "'s tokens", async () => {
      if (!confirm("Revoke every token of " + id + " issued until now? Their open streams close.")) return;
      try {
        const { data } = await api("auth", "POST", "/auth/users/" + encodeURIComponent(id) + "/revoke");
        notice("Revoked every token of " + data.user_id + " issued before " + when(data.revoked_before) + ".", "ok");
      } catch (e) { notice("Refused: " + explainError(e), "error"); }
    }, "danger")));
    const now = new Map(conns.connections.map((c) => [c.id, c]));
    for (const c of now.values()) seen.set(c.id, c);
    const closed = [...seen.values()].filter((c) => !now.has(c.id));
    append(out, el("h3", { text: "Open streams (" + conns.connections.length + ")" }),
      conns.error ? el("p", { class: "muted", text: "Stream role: " + conns.error }) : null,
      el("table", { id: "session-streams" },
        el("thead", {}, el("tr", {}, ["Connection", "Transport", "Tenant", "Topics", "Frames", "State"].map((h) => el("th", { text: h })))),
        el("tbody", {},
          conns.connections.map((c) => el("tr", { "data-conn": c.id, class: "open" },
            el("td", { text: c.id }), el("td", { text: c.transport }), el("td", { text: c.tenant_id }),
            el("td", { text: c.topics.join(", ") }), el("td", { class: "num", text: String(c.delivered) }), el("td", { text: "open" }))),
          closed.map((c) => el("tr", { "data-conn": c.id, class: "closing" },
            el("td", { text: c.id }), el("td", { text: c.transport }), el("td", { text: c.tenant_id }),
            el("td", { text: c.topics.join(", ") }), el("td", { class: "num", text: String(c.delivered) }), el("td", { text: "closed" }))))));
  };
  listen(form, "submit", (event) => {
    event.preventDefault();
    const id = user.value.trim();
    if (!id) return;
    stopTimers();
    seen = new Map();
    every(1000, () => show(id).catch((e) => notice(explainError(e), "error")));
  });
  append(main, form, out);
  if (preset) form.requestSubmit();
}

// --- The live layer ---------------------------------------------------------------------------

function panel(id, title) {
  const body = el("div", { class: "panel-body" });
  return { node: el("section", { class: "panel", id }, el("h3", { text: title }), body), body };
}

function plot(series, since, until) {
  const W = 600, H = 200, L = 44, B = 20;
  const max = Math.max(1, ...series.flatMap((s) => s.points.map((p) => p[1])));
  const x = (t) => L + ((t - since) / Math.max(1, until - since)) * (W - L - 4);
  const y = (v) => H - B - (v / max) * (H - B - 8);
  const chart = svg("svg", { class: "plot", viewBox: "0 0 " + W + " " + H, role: "img", "aria-label": "usage per tenant" },
    svg("line", { x1: L, y1: H - B, x2: W, y2: H - B, stroke: "#b8c2cc" }),
    svg("line", { x1: L, y1: 4, x2: L, y2: H - B, stroke: "#b8c2cc" }),
    svg("text", { x: 2, y: 12, text: String(Math.round(max)) }),
    svg("text", { x: 2, y: H - B, text: "0" }),
    svg("text", { x: L, y: H - 4, text: when(since).slice(11) }),
    svg("text", { x: W - 60, y: H - 4, text: when(until).slice(11) }),
    series.map((s, i) => svg("polyline", {
      class: "c" + (i % 6), fill: "none", "stroke-width": 2,
      points: s.points.map((p) => x(p[0]).toFixed(1) + "," + y(p[1]).toFixed(1)).join(" "),
    })));
  const legend = el("div", { class: "legend" }, series.map((s, i) => el("span", {}, el("i", { class: "c" + (i % 6) }), (s.tenant_id || "(no tenant)") + ": " + Math.round(s.total))));
  return [chart, legend];
}

async function livePage(main) {
  append(main, el("h2", { text: "The live layer" }), el("p", { class: "muted", id: "live-updated", text: "" }));
  const p = {
    usage: panel("live-usage", "Requests per tenant (gateway usage, 10 s buckets, last 15 min)"),
    messages: panel("live-messages", "Stream messages per tenant (10 s buckets, last 15 min)"),
    stream: panel("live-stream", "Stream: connections and subscriptions"),
    breakers: panel("live-breakers", "Circuit breakers"),
    limits: panel("live-ratelimits", "Rate limits"),
    cache: panel("live-cache", "Response cache"),
    lag: panel("live-lag", "Stream: partitions and lag"),
    routes: panel("live-routes", "Gateway routes"),
  };
  append(main, el("div", { class: "panels" }, Object.values(p).map((x) => x.node)));
  const fill = async (target, call, render) => {
    try { const r = await call(); clear(target.body); append(target.body, render(r.data)); }
    catch (e) { clear(target.body); append(target.body, el("p", { class: "muted", text: explainError(e) })); }
  };
  const usage = (name) => (data) => {
    if (!data.tenants.length) return el("p", { class: "muted", text: "no usage pushed yet" });
    // From the first bucket with data (not the window's start), so a young layer's few
    // buckets are not squeezed against the right edge.
    const until = Date.now() / 1000;
    const first = Math.min(...data.tenants.flatMap((t) => t.points.map((p) => p[0])));
    const since = Math.max(data.since, first - data.step_seconds);
    return plot(data.tenants.slice(0, 6), since, until);
  };
  every(2000, async () => {
    await Promise.all([
      fill(p.routes, () => api("gateway", "GET", "/api/v1/metadata/routes"), (d) => view(d.routes.map((r) => ({ name: r.name, path: r.path, methods: (r.methods || []).join(" "), upstreams: (r.upstreams || []).join(" "), rate_limits: (r.rate_limits || []).join(" ") })))),
      fill(p.breakers, () => api("gateway", "GET", "/api/v1/circuit-breakers"), (d) => view(d.circuit_breakers)),
      fill(p.limits, () => api("gateway", "GET", "/api/v1/rate-limits"), (d) => view(d.policies.map((x) => ({ policy: x.name, rate: x.rate + "/" + x.period_seconds + "s", burst: x.burst, allowed: x.allowed, limited: x.limited, store_errors: x.store_errors })))),
      fill(p.cache, () => api("gateway", "GET", "/api/v1/cache/stats"), (d) => view(d)),
      fill(p.stream, () => api("stream", "GET", "/stats"), (d) => [
        view({ connections: d.connections, users: d.users, tenants: d.tenants, messages_queued: d.messages_queued, messages_dropped: d.messages_dropped, slow_consumer_closes: d.slow_consumer_closes, source: d.source }),
        el("h4", { text: "Subscriptions per topic" }), view(Object.entries(d.subscriptions || {}).map(([topic, n]) => ({ topic, subscriptions: n })))]),
      fill(p.lag, () => api("stream", "GET", "/stats"), (d) => d.kafka
        ? view(d.kafka.partitions.map((x) => ({ topic: x.topic, partition: x.partition, lag: x.lag, next_offset: x.state && x.state.next_offset, high_watermark: x.state && x.state.high_watermark })))
        : el("p", { class: "muted", text: "No Kafka: the in-process bus (" + d.source + ") has no partitions or lag." })),
      fill(p.usage, () => api("metrics", "GET", "/metrics/usage?name=access_usage_requests_total&window=15m&step=10s"), usage()),
      fill(p.messages, () => api("metrics", "GET", "/metrics/usage?name=access_usage_messages_total&window=15m&step=10s"), usage()),
    ]);
    const updated = $("live-updated");
    if (updated) updated.textContent = "Updated " + when(Date.now() / 1000) + " (every 2 s).";
  });
}

// ---------------------------------------------------------------------------------------------

async function start() {
  listen($("signout"), "click", () => signedOut("Signed out."));
  listen(window, "hashchange", route);
  await finishOidc();
  await route();
}

start();
