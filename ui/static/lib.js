// Shared pieces of the dashboard: building elements, calling the API,
// polling, formatting. Everything is built with DOM calls and text nodes,
// never by parsing HTML strings, because tags and ids come from operators
// and devices.

export const POLL_MS = 2000;
// OVERVIEW_MS paces views built on GET /overview, which reads every
// reporting device's last report: at 100,000 devices it costs far more
// than a page of devices (docs/benchmarks.md).
export const OVERVIEW_MS = 5000;
const TOKEN_KEY = "appliance.adminToken";

// Health of a device under its applied deployment, in bar order; "none"
// is a device no deployment applies to.
export const HEALTH = ["healthy", "soaking", "unhealthy", "unknown"];
export const DEVICE_HEALTH = [...HEALTH, "none"];
export const CATEGORIES = ["targeted", "applied", "healthy", "soaking", "unhealthy", "unknown", "offline", "kept"];
export const STATES = ["failing", "converging", "healthy", "superseded", "idle"];

// Unauthorized is thrown by api() on a 401: the token is gone or wrong.
export class Unauthorized extends Error {}

// ApiError is any other error answer: status, the API's code, field and
// message.
export class ApiError extends Error {
  constructor(path, status, detail) {
    super(detail.message || `${path}: ${status}`);
    this.status = status;
    this.code = detail.code || "";
    this.field = detail.field || "";
  }
}

// notFound tells a 404 (a device or deployment that does not exist, or
// no longer does) from other errors.
export const notFound = (err) => err instanceof ApiError && err.status === 404;

export const $ = (id) => document.getElementById(id);

// h builds an element: h("td", {class: "num", "data-count": "applied"}, "3").
// An attribute whose value is a function ("onclick") becomes a listener.
export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (typeof v === "function" && k.startsWith("on")) el.addEventListener(k.slice(2), v);
    // Styles go through the CSSOM: the page's CSP refuses style attributes.
    else if (k === "style") Object.assign(el.style, v);
    else if (k === "value" && "value" in el) el.value = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

// fill replaces an element's children, skipping null, undefined and false
// (which replaceChildren would print).
export function fill(el, ...children) {
  el.replaceChildren(...children.flat(Infinity).filter((c) => c !== undefined && c !== null && c !== false));
  return el;
}

export function token() { return sessionStorage.getItem(TOKEN_KEY) || ""; }
export function setToken(t) { sessionStorage.setItem(TOKEN_KEY, t); }
export function forgetToken() { sessionStorage.removeItem(TOKEN_KEY); }

// api calls the node: api(path) reads, api(path, {method, body, etag,
// create}) writes. It returns {body, etag}.
export async function call(path, opts = {}) {
  const headers = { "Authorization": "Bearer " + token(), "Accept": "application/json" };
  const init = { method: opts.method || "GET", headers, cache: "no-store" };
  if (opts.body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(opts.body);
  }
  if (opts.etag) headers["If-Match"] = `"${opts.etag}"`;
  if (opts.create) headers["If-None-Match"] = "*";
  const resp = await fetch(path, init);
  if (resp.status === 401) throw new Unauthorized();
  let body = null;
  try { body = await resp.json(); } catch (_) { /* 204, or not JSON: reported below */ }
  if (!resp.ok) {
    throw new ApiError(path, resp.status, body && body.error ? body.error : { message: `${path}: ${resp.status} ${resp.statusText}` });
  }
  return { body, etag: (resp.headers.get("ETag") || "").replace(/^W\//, "").replace(/"/g, "") };
}

export async function api(path, opts) { return (await call(path, opts)).body; }

export const enc = encodeURIComponent;
export const deviceHref = (id) => "#/devices/" + enc(id);
export const deploymentHref = (id) => "#/deployments/" + enc(id);

export function deviceLink(id, attrs) {
  return h("a", Object.assign({ href: deviceHref(id), class: "mono", "data-device-link": id }, attrs), id);
}

export function deploymentLink(id, attrs) {
  return h("a", Object.assign({ href: deploymentHref(id), class: "mono", "data-deployment-link": id }, attrs), id);
}

// ---- formatting -------------------------------------------------------------

export function num(n) {
  return n === undefined || n === null ? "–" : Number(n).toLocaleString("en-US");
}

// count is a number for people with its exact value for scripts and tests.
export function count(tag, n, attrs) {
  return h(tag, Object.assign({ "data-value": n === undefined || n === null ? "" : String(n) }, attrs), num(n));
}

export function when(t) {
  if (!t) return "–";
  const d = new Date(t);
  return isNaN(d) || d.getFullYear() < 2000 ? "–" : d.toLocaleString();
}

export function ago(t) {
  if (!t) return "";
  const d = new Date(t);
  if (isNaN(d) || d.getFullYear() < 2000) return "";
  const s = Math.max(0, Math.round((Date.now() - d.getTime()) / 1000));
  if (s < 60) return `${s} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
  return `${Math.floor(s / 86400)} d ago`;
}

export function tagValue(v) { return typeof v === "string" ? v : JSON.stringify(v); }

export function tagChips(tags) {
  const chips = Object.entries(tags || {}).sort(([a], [b]) => a.localeCompare(b))
    .map(([k, v]) => h("span", { class: "chip" }, `${k}=${tagValue(v)}`));
  return chips.length ? chips : h("span", { class: "muted" }, "–");
}

export function healthChip(health, attrs) {
  const label = health === "none" ? "no deployment" : health || "–";
  return h("span", Object.assign({ class: "chip health-" + (health || "none"), "data-health": health || "" }, attrs),
    h("span", { class: "dot seg-" + (health || "none"), "aria-hidden": "true" }), label);
}

export function stateChip(state, attrs) {
  return h("span", Object.assign({ class: "chip state-" + state, "data-state": state }, attrs), state);
}

export function emptyRow(cols, text) {
  return h("tr", {}, h("td", { colspan: cols, class: "empty" }, text));
}

// table builds a table with a caption (read by screen readers, hidden
// from sight when quiet) and column headers.
export function table(attrs, caption, headers, rows, emptyText) {
  return h("div", { class: "table-wrap" }, h("table", attrs,
    h("caption", { class: caption.quiet ? "sr-only" : "" }, caption.text),
    h("thead", {}, h("tr", {}, headers.map((c) =>
      h("th", { scope: "col", class: c.num ? "num" : "" }, c.text || c)))),
    h("tbody", {}, rows.length ? rows : emptyRow(headers.length, emptyText))));
}

// bar draws shares of a whole as a stacked bar with a text equivalent.
export function bar(parts, total, attrs) {
  const el = h("div", Object.assign({ class: "bar", role: "img",
    "aria-label": parts.map(([k, n]) => `${k} ${n}`).join(", ") + ` of ${total}` }, attrs));
  if (total > 0) {
    for (const [k, n] of parts) {
      if (n > 0) el.append(h("span", { class: "seg-" + k, style: { width: `${(100 * n) / total}%` } }));
    }
  }
  return el;
}

export function debounce(fn, ms) {
  let t = null;
  return (...args) => { clearTimeout(t); t = setTimeout(() => fn(...args), ms); };
}

// jsonPretty shows a JSON value indented, for reported documents.
export function jsonPretty(v) {
  try { return JSON.stringify(typeof v === "string" ? JSON.parse(v) : v, null, 2); } catch (_) { return String(v); }
}
