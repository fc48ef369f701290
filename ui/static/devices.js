// The device list: one page of 100 at a time (the API pages with
// limit/after, so a fleet of any size costs one page), searched by id
// prefix and filtered by a target condition checked as it is typed.

import { ago, api, count, deploymentLink, deviceLink, enc, h, healthChip, num, table, tagChips, when, fill } from "./lib.js";
import { current, generationNow, live, setView } from "./shell.js";
import { conditionInput } from "./condition.js";

const PAGE = 100;

// pages remembers the ?after= of each page seen under one search, for the
// Previous button (the API pages forward only).
const pages = { key: "", stack: [""] };

function devicesHash(prefix, condition, after) {
  const q = new URLSearchParams();
  if (prefix) q.set("prefix", prefix);
  if (condition) q.set("condition", condition);
  if (after) q.set("after", after);
  const s = q.toString();
  return "#/devices" + (s ? "?" + s : "");
}

export async function devicesView(query) {
  const prefix = query.get("prefix") || "";
  const condition = query.get("condition") || "";
  const after = query.get("after") || "";
  const gen = generationNow();
  const key = JSON.stringify([prefix, condition]);
  if (pages.key !== key) { pages.key = key; pages.stack = [""]; }
  const at = pages.stack.indexOf(after);
  if (at === -1) pages.stack.push(after); else pages.stack.length = at + 1;

  const search = h("input", { id: "device-search", type: "search", class: "mono", value: prefix, spellcheck: "false", autocomplete: "off",
    "aria-describedby": "device-search-help" });
  const filter = conditionInput({ id: "device-filter", label: "Filter by target condition", value: condition,
    help: "The language of deployments' target conditions, e.g. tags.environment='prod' AND NOT tags.ring='canary'." });
  const apply = h("button", { type: "submit", id: "device-apply" }, "Search");
  const clear = h("a", { class: "button secondary", href: "#/devices", id: "device-clear" }, "Clear");
  const form = h("form", { class: "filters", id: "device-form", role: "search" },
    h("div", { class: "field" }, h("label", { for: "device-search" }, "Device id starts with"), search,
      h("div", { class: "help", id: "device-search-help" }, "A prefix: press-0 finds press-01 … press-09.")),
    filter.el,
    h("div", { class: "actions" }, apply, clear));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const cond = filter.input.value.trim();
    if (cond) {
      const r = await filter.check();
      if (!r || !r.valid) { filter.input.focus(); return; }
    }
    location.hash = devicesHash(search.value.trim(), cond, "");
  });
  const body = h("div", { id: "devices-body" });
  setView("Devices", h("h1", {}, "Devices"), form, body);
  if (condition) {
    const r = await filter.check();
    if (!current(gen)) return;
    if (!r || !r.valid) {
      fill(body, h("p", { class: "muted", id: "devices-shown" }, "Fix the condition above to list its devices."));
      document.body.dataset.loaded = "true";
      return;
    }
  }
  const q = new URLSearchParams({ limit: String(PAGE) });
  if (prefix) q.set("prefix", prefix);
  if (condition) q.set("condition", condition);
  if (after) q.set("after", after);
  live(() => api("/api/v1/devices?" + q.toString()), (page) => fill(body, ...renderDevices(page, prefix, condition, after)));
}

function connectionCell(d) {
  const on = d.connectionState === "Connected";
  return h("td", { class: "nowrap " + (on ? "state-connected" : "state-disconnected"),
    "data-device": d.deviceId, "data-field": "connectionState", "data-state": d.connectionState || "Disconnected" },
  h("span", { class: "dot " + (on ? "seg-connected" : "seg-disconnected"), "aria-hidden": "true" }),
  on ? "Online" : d.presence === "offline" ? "Offline" : "Disconnected",
  on && d.connectedNode ? h("span", { class: "muted" }, " on " + d.connectedNode) : null);
}

// lastSeen: an online device's last activity; an offline one's last
// contact (its last session's last bytes, or its last report).
function lastSeenCell(d) {
  if (d.connectionState === "Connected") {
    return h("td", { class: "nowrap", "data-field": "lastSeen" }, "active " + ago(d.lastActivityTime));
  }
  const t = d.lastContactTime || (d.reported && d.reported.receivedTimeUtc);
  return h("td", { class: "nowrap", "data-field": "lastSeen", title: t ? when(t) : "" },
    t ? "last report " + ago(t) : h("span", { class: "muted" }, "never reported"));
}

function renderDevices(page, prefix, condition, after) {
  const items = page.items || [];
  const rows = items.map((d) => {
    const confs = Object.entries(d.configurations || {});
    const applied = confs.find(([, c]) => c.status === "Applied");
    const others = confs.filter(([, c]) => c.status !== "Applied").map(([id]) => id).sort();
    return h("tr", { "data-device": d.deviceId },
      h("td", { class: "nowrap" }, deviceLink(d.deviceId)),
      h("td", { "data-field": "health" }, healthChip(d.health, { "data-device": d.deviceId })),
      connectionCell(d),
      lastSeenCell(d),
      h("td", {}, tagChips(d.tags)),
      h("td", {},
        applied ? deploymentLink(applied[0], { class: "chip applied", "data-device": d.deviceId, "data-configuration": applied[0], "data-status": "Applied" })
          : h("span", { class: "muted" }, "none"),
        others.map((dep) => deploymentLink(dep, { class: "chip targeted", title: "targets it, does not apply", "data-device": d.deviceId, "data-configuration": dep, "data-status": "Targeted" }))),
      h("td", {}, d.status || "enabled"));
  });
  const stack = pages.stack;
  const first = (stack.length - 1) * PAGE + 1;
  const shown = items.length
    ? `${num(first)}–${num(first + items.length - 1)}${page.total !== undefined ? " of " + num(page.total) : page.next ? ", more follow" : ""}`
    : "none";
  const prev = h("a", { class: "button secondary", id: "devices-prev", role: "button",
    href: stack.length > 1 ? devicesHash(prefix, condition, stack[stack.length - 2]) : null,
    "aria-disabled": stack.length > 1 ? null : "true" }, "Previous");
  const next = h("a", { class: "button secondary", id: "devices-next", role: "button",
    href: page.next ? devicesHash(prefix, condition, page.next) : null,
    "aria-disabled": page.next ? null : "true" }, "Next");
  return [
    h("p", { class: "muted", id: "devices-shown" },
      "Showing ", h("span", { "data-count": "shown", "data-value": String(items.length) }, shown),
      page.total !== undefined ? count("span", page.total, { hidden: true, "data-count": "total" }) : null,
      condition ? [" matching ", h("code", {}, condition), ". ",
        h("a", { href: "#/new-deployment?condition=" + enc(condition) }, "New deployment for these devices")] : null),
    table({ id: "devices" }, { text: "Devices by id", quiet: true },
      ["Device", "Health", "Connection", "Last seen", "Tags", "Deployment", "Status"],
      rows, prefix || condition ? "No device matches." : "No devices yet."),
    h("nav", { class: "pager", "aria-label": "Pages" }, prev, next),
  ];
}
