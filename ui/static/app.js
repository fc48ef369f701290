// The appliance dashboard: hash-routed views over the node's /api/v1/,
// refreshed every POLL_MS. Everything is built with DOM calls and text
// nodes, never by parsing HTML strings, because tags and ids come from
// operators and devices.
"use strict";

const POLL_MS = 2000;
const TOKEN_KEY = "appliance.adminToken";
// Health segments of a deployment's applied devices, in bar order.
const HEALTH = ["healthy", "soaking", "unhealthy", "unknown"];
const CATEGORIES = ["targeted", "applied", "healthy", "soaking", "unhealthy", "unknown"];

// Unauthorized is thrown by api() on a 401: the token is gone or wrong.
class Unauthorized extends Error {}

const $ = (id) => document.getElementById(id);

// h builds an element: h("td", {class: "num", "data-count": "applied"}, "3").
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    // Styles go through the CSSOM: the page's CSP refuses style attributes.
    if (k === "style") Object.assign(el.style, v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function token() { return sessionStorage.getItem(TOKEN_KEY) || ""; }

async function api(path) {
  const resp = await fetch(path, {
    headers: { "Authorization": "Bearer " + token(), "Accept": "application/json" },
    cache: "no-store",
  });
  if (resp.status === 401) throw new Unauthorized();
  let body = null;
  try { body = await resp.json(); } catch (_) { /* not JSON: reported below */ }
  if (!resp.ok) {
    const msg = body && body.error ? body.error.message : resp.statusText;
    const err = new Error(`${path}: ${resp.status} ${msg}`);
    err.status = resp.status;
    throw err;
  }
  return body;
}

// allPages follows ?after= until the list ends (or max items, so a huge
// fleet cannot make one refresh unbounded).
async function allPages(path, max) {
  const items = [];
  let after = "";
  for (;;) {
    const sep = path.includes("?") ? "&" : "?";
    const page = await api(path + sep + "limit=1000" + (after ? "&after=" + encodeURIComponent(after) : ""));
    items.push(...(page.items || []));
    if (!page.next || items.length >= max) return { items, truncated: !!page.next };
    after = page.next;
  }
}

// ---- login ----------------------------------------------------------------

function showLogin(message) {
  stopPolling();
  sessionStorage.removeItem(TOKEN_KEY);
  $("view").hidden = true;
  $("nav").hidden = true;
  $("logout").hidden = true;
  $("banner").hidden = true;
  $("updated").textContent = "";
  $("login").hidden = false;
  $("login-message").textContent = message || "";
  $("login-token").value = "";
  $("login-token").focus();
}

function showApp() {
  $("login").hidden = true;
  $("view").hidden = false;
  $("nav").hidden = false;
  $("logout").hidden = false;
  route();
}

// ---- polling --------------------------------------------------------------

let timer = null;
let generation = 0; // bumped on every route change; stale results are dropped

function stopPolling() {
  generation++;
  clearTimeout(timer);
  timer = null;
}

// poll runs load() now and every POLL_MS after the previous run finished,
// so a slow node never gets overlapping requests from one tab.
function poll(load) {
  stopPolling();
  const gen = generation;
  const tick = async () => {
    try {
      const render = await load();
      if (gen !== generation) return;
      render();
      $("banner").hidden = true;
      $("updated").textContent = "Updated " + new Date().toLocaleTimeString();
      document.body.dataset.loaded = "true";
    } catch (err) {
      if (gen !== generation) return;
      if (err instanceof Unauthorized) {
        showLogin("The node refused the token (401). Sign in again.");
        return;
      }
      $("banner").textContent = "Cannot refresh: " + err.message + " (retrying)";
      $("banner").hidden = false;
    }
    if (gen === generation) timer = setTimeout(tick, POLL_MS);
  };
  tick();
}

function setView(...children) {
  const view = $("view");
  view.replaceChildren(...children);
}

// ---- routing ----------------------------------------------------------------

function route() {
  if (!token()) { showLogin(""); return; }
  const hash = location.hash.replace(/^#\/?/, "");
  const [section, ...rest] = hash.split("/");
  const arg = rest.length ? decodeURIComponent(rest.join("/")) : "";
  for (const a of document.querySelectorAll("[data-nav]")) {
    a.classList.toggle("active", a.dataset.nav === (section || "deployments"));
  }
  delete document.body.dataset.loaded;
  document.body.dataset.view = section === "deployments" && arg ? "deployment" : (section || "deployments");
  switch (section) {
    case "devices": poll(() => loadDevices(arg)); break;
    case "deployments":
      if (arg) { poll(() => loadDeployment(arg)); break; }
      // fall through
    default: poll(loadDeployments);
  }
}

// ---- pieces -----------------------------------------------------------------

const depHref = (id) => "#/deployments/" + encodeURIComponent(id);

function num(n) { return n === undefined || n === null ? "–" : String(n); }

// healthBar draws healthy / soaking / unhealthy / unknown as shares of the
// applied devices; an empty bar means nothing is applied yet.
function healthBar(id, counts, big) {
  const applied = counts.applied || 0;
  const bar = h("div", { class: big ? "bar big" : "bar", "data-deployment": id, "data-bar": "health",
    title: HEALTH.map((c) => `${c} ${counts[c] || 0}`).join(", ") + ` of ${applied} applied` });
  if (applied > 0) {
    for (const c of HEALTH) {
      const n = counts[c] || 0;
      if (n > 0) bar.append(h("span", { class: "seg-" + c, style: { width: `${(100 * n) / applied}%` } }));
    }
  }
  return bar;
}

function legend(id, counts) {
  return h("div", { class: "legend" }, HEALTH.map((c) =>
    h("span", {}, h("span", { class: "dot seg-" + c }), c + " ",
      h("b", { "data-deployment": id, "data-count": c }, num(counts[c])))));
}

function card(label, value, attrs) {
  return h("div", { class: "card" }, h("div", { class: "label" }, label), h("div", Object.assign({ class: "value" }, attrs), num(value)));
}

function emptyRow(cols, text) {
  return h("tr", {}, h("td", { colspan: cols, class: "empty" }, text));
}

function when(t) {
  if (!t) return "–";
  const d = new Date(t);
  return isNaN(d) || d.getFullYear() < 2000 ? "–" : d.toLocaleString();
}

// ---- view: deployments --------------------------------------------------------

async function loadDeployments() {
  const { items, truncated } = await allPages("/api/v1/deployments", 500);
  const statuses = await Promise.all(items.map((d) =>
    api("/api/v1/deployments/" + encodeURIComponent(d.id) + "/status?limit=1").catch((err) => {
      if (err instanceof Unauthorized) throw err;
      return null; // deleted between the list and this call, or the node is busy
    })));
  return () => renderDeployments(items, statuses, truncated);
}

function renderDeployments(items, statuses, truncated) {
  const total = { targeted: 0, applied: 0, healthy: 0, soaking: 0, unhealthy: 0, unknown: 0 };
  const rows = items.map((d, i) => {
    const st = statuses[i];
    const results = (d.systemMetrics && d.systemMetrics.results) || {};
    const counts = st ? st.counts : { targeted: results.targetedCount, applied: results.appliedCount };
    for (const k of Object.keys(total)) total[k] += counts[k] || 0;
    return h("tr", { "data-deployment": d.id },
      h("td", { class: "nowrap" }, h("a", { href: depHref(d.id), class: "mono", "data-deployment-link": d.id }, d.id)),
      h("td", { class: "num", "data-deployment": d.id, "data-field": "priority" }, d.priority),
      h("td", { class: "cond" }, h("code", {}, d.targetCondition || "")),
      h("td", { class: "num", "data-deployment": d.id, "data-count": "targeted" }, num(counts.targeted)),
      h("td", { class: "num", "data-deployment": d.id, "data-count": "applied" }, num(counts.applied)),
      h("td", {}, healthBar(d.id, counts, false), legend(d.id, counts)));
  });
  setView(
    h("h2", {}, "Deployments", h("span", { class: "muted" }, `${items.length}${truncated ? "+" : ""} in this cluster`)),
    h("div", { class: "cards" },
      card("Deployments", items.length, { id: "total-deployments" }),
      ...Object.keys(total).map((k) => card(k, total[k], { id: "total-" + k, "data-total": k }))),
    h("div", { class: "table-wrap" }, h("table", { id: "deployments" },
      h("thead", {}, h("tr", {},
        h("th", {}, "ID"), h("th", { class: "num" }, "Priority"), h("th", {}, "Target condition"),
        h("th", { class: "num" }, "Targeted"), h("th", { class: "num" }, "Applied"),
        h("th", {}, "Health of applied devices"))),
      h("tbody", {}, rows.length ? rows : emptyRow(6, "No deployments yet.")))));
}

// ---- view: one deployment ------------------------------------------------------

async function loadDeployment(id) {
  const path = "/api/v1/deployments/" + encodeURIComponent(id);
  const [dep, st] = await Promise.all([api(path), api(path + "/status?limit=1000")]);
  return () => renderDeployment(dep, st);
}

function renderDeployment(dep, st) {
  const id = dep.id;
  const sm = st.systemMetrics || {};
  const labels = Object.entries(dep.labels || {}).map(([k, v]) => h("span", { class: "chip" }, `${k}=${v}`));
  setView(
    h("h2", {}, h("a", { href: "#/deployments" }, "Deployments"), "/", h("span", { class: "mono", id: "deployment-id" }, id)),
    h("dl", { class: "meta" },
      h("dt", {}, "Target condition"), h("dd", {}, h("code", {}, dep.targetCondition || "")),
      h("dt", {}, "Priority"), h("dd", { "data-field": "priority" }, dep.priority),
      h("dt", {}, "Created"), h("dd", {}, when(dep.createdTimeUtc)),
      h("dt", {}, "Labels"), h("dd", {}, labels.length ? labels : "–"),
      h("dt", {}, "Soak"), h("dd", {}, `${st.soakSeconds} s of running before a device counts as healthy`)),
    h("div", { class: "cards" },
      CATEGORIES.map((c) => card(c, st.counts[c], { "data-deployment": id, "data-count": c })),
      card("reported successful", sm.reportedSuccessfulCount, { "data-deployment": id, "data-metric": "reportedSuccessfulCount" }),
      card("reported failed", sm.reportedFailedCount, { "data-deployment": id, "data-metric": "reportedFailedCount" })),
    healthBar(id, st.counts, true),
    legend(id, st.counts),
    h("h2", { class: "section" }, "Devices by category"),
    h("div", { class: "categories" }, CATEGORIES.map((c) => {
      const ids = (st.devices && st.devices[c]) || [];
      const more = st.next && st.next[c];
      return h("div", { class: "category", "data-category": c },
        h("h3", {}, HEALTH.includes(c) ? h("span", { class: "dot seg-" + c }) : null, `${c} (${st.counts[c]})`),
        h("div", { class: "ids" },
          ids.length ? ids.map((d) => h("span", { class: "chip mono", "data-device": d }, d)) : h("span", { class: "muted" }, "none"),
          more ? h("div", { class: "muted" }, `… first ${ids.length} shown`) : null));
    })));
}

// ---- view: devices ----------------------------------------------------------

// pages remembers the ?after= of each page seen, for the Previous button.
const devicePages = { stack: [""] };

async function loadDevices(after) {
  const q = "/api/v1/devices?limit=100" + (after ? "&after=" + encodeURIComponent(after) : "");
  const page = await api(q);
  return () => renderDevices(page, after);
}

function renderDevices(page, after) {
  const items = page.items || [];
  const rows = items.map((d) => {
    const tags = Object.entries(d.tags || {}).map(([k, v]) =>
      h("span", { class: "chip" }, `${k}=${typeof v === "string" ? v : JSON.stringify(v)}`));
    const confs = Object.entries(d.configurations || {}).sort(([a], [b]) => a.localeCompare(b)).map(([dep, c]) =>
      h("a", { href: depHref(dep), class: "chip " + (c.status === "Applied" ? "applied" : "targeted"),
        title: c.status, "data-device": d.deviceId, "data-configuration": dep, "data-status": c.status }, dep));
    const connected = d.connectionState === "Connected";
    return h("tr", { "data-device": d.deviceId },
      h("td", { class: "mono nowrap" }, d.deviceId),
      h("td", {}, d.status || ""),
      h("td", { class: "nowrap " + (connected ? "state-connected" : "state-disconnected"), "data-device": d.deviceId, "data-field": "connectionState" },
        h("span", { class: connected ? "dot seg-healthy" : "dot seg-unknown" }), d.connectionState || "Disconnected"),
      h("td", {}, tags.length ? tags : h("span", { class: "muted" }, "–")),
      h("td", {}, confs.length ? confs : h("span", { class: "muted" }, "none")),
      h("td", { class: "nowrap" }, when(d.lastActivityTime)),
      h("td", { class: "nowrap" }, d.reported ? when(d.reported.receivedTimeUtc) : "–"));
  });
  const stack = devicePages.stack;
  const at = stack.indexOf(after || "");
  if (at === -1) stack.push(after); else stack.length = at + 1;
  const prev = h("button", { type: "button", class: "secondary", disabled: stack.length < 2 }, "Previous");
  prev.addEventListener("click", () => {
    location.hash = "#/devices/" + encodeURIComponent(stack[stack.length - 2] || "");
  });
  const next = h("button", { type: "button", class: "secondary", disabled: !page.next }, "Next");
  next.addEventListener("click", () => { location.hash = "#/devices/" + encodeURIComponent(page.next); });
  setView(
    h("h2", {}, "Devices", h("span", { class: "muted", id: "devices-shown" },
      `${items.length} shown${after ? " after " + after : ""}${page.next ? ", more follow" : ""}`)),
    h("div", { class: "table-wrap" }, h("table", { id: "devices" },
      h("thead", {}, h("tr", {},
        h("th", {}, "Device"), h("th", {}, "Status"), h("th", {}, "Connection"), h("th", {}, "Tags"),
        h("th", {}, "Deployments"), h("th", {}, "Last activity"), h("th", {}, "Last report"))),
      h("tbody", {}, rows.length ? rows : emptyRow(7, "No devices yet.")))),
    h("div", { class: "pager" }, prev, next));
}

// ---- start --------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const t = $("login-token").value.trim();
    if (!t) return;
    sessionStorage.setItem(TOKEN_KEY, t);
    $("login-token").value = "";
    showApp();
  });
  $("logout").addEventListener("click", () => showLogin("Signed out."));
  window.addEventListener("hashchange", () => { if (token()) route(); });
  if (token()) showApp(); else showLogin("");
});
