// The fleet overview: devices by connection and by health, deployments by
// state, the latest deployment changes. Every number comes from
// GET /api/v1/overview, which counts each device and each deployment once.

import { DEVICE_HEALTH, OVERVIEW_MS, STATES, api, bar, count, deploymentLink, h, table, when, fill } from "./lib.js";
import { live, section, setView } from "./shell.js";

export function overviewView() {
  const body = h("div", { id: "overview" });
  setView("Overview", h("h1", {}, "Overview"), body);
  live(() => api("/api/v1/overview"), (o) => fill(body, ...renderOverview(o)), OVERVIEW_MS);
}

// stat is one labelled number of the overview, tagged for tests:
// data-overview="devices.health.healthy".
function stat(label, n, key, extra) {
  return h("div", { class: "card" + (extra ? " " + extra : "") },
    h("div", { class: "label" }, label),
    count("div", n, { class: "value", "data-overview": key }));
}

export function renderOverview(o) {
  const d = o.devices;
  const deps = o.deployments;
  const healthParts = DEVICE_HEALTH.map((k) => [k, d.health[k] || 0]);
  const stateParts = STATES.map((k) => [k, deps.states[k] || 0]);
  const recent = (o.recent || []).map((e) => h("tr", {},
    h("td", { class: "nowrap" }, when(e.time)),
    h("td", {}, deploymentLink(e.subject)),
    h("td", {}, e.kind),
    h("td", {}, e.actor || "–"),
    h("td", { class: "what" }, e.what)));
  return [
    section("Devices", { "aria-label": "Devices" },
      h("div", { class: "cards" },
        stat("Devices", d.total, "devices.total"),
        stat("Connected", d.connected, "devices.connected", "good"),
        stat("Disconnected", d.disconnected, "devices.disconnected"),
        stat("Offline", d.offline || 0, "devices.offline")),
      h("p", { class: "muted" }, "Offline: disconnected, and nothing heard from it for longer than the node's --offline-after; its health below is what it last reported."),
      h("h3", {}, "Connection"),
      bar([["connected", d.connected], ["disconnected", d.disconnected]], d.total, { "data-bar": "connection" }),
      h("h3", {}, "Health under the deployment applied to each device"),
      bar(healthParts, d.total, { "data-bar": "health" }),
      h("div", { class: "cards small" }, healthParts.map(([k, n]) =>
        stat(k === "none" ? "no deployment" : k, n, "devices.health." + k, "seg-border-" + k))),
      h("p", { class: "muted" }, `Each device is counted once: by the one deployment that applies to it. A device is healthy when every module that should run has run for ${o.soakSeconds} s.`)),
    section("Deployments", { "aria-label": "Deployments" },
      h("div", { class: "cards" },
        stat("Deployments", deps.total, "deployments.total"),
        stateParts.map(([k, n]) => stat(k, n, "deployments.states." + k, "seg-border-" + k))),
      h("p", { class: "muted" },
        "failing: a device it applies to is unhealthy; converging: some have not reported it yet or are soaking; ",
        "superseded: deployments of higher precedence take all its devices; idle: its condition matches no device. ",
        h("a", { href: "#/deployments" }, "All deployments"))),
    section("Recent changes", { "aria-label": "Recent changes" },
      table({ id: "recent" }, { text: "The latest deployment changes, newest first", quiet: true },
        ["When", "Deployment", "Change", "By", "What"], recent, "No deployment changes recorded on this node.")),
  ];
}
