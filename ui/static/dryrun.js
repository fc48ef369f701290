// A dry run's result, shown before anything is saved: counts, the devices,
// and where each group of devices would move. Fields this page does not
// know yet (richer dry runs) are shown as they come, so an API that says
// more is never hidden.

import { count, deploymentLink, deviceLink, h, jsonPretty, num, table } from "./lib.js";

const KNOWN = new Set(["targetedCount", "wouldApplyCount", "targetedDevices", "wouldApplyDevices", "moves"]);

function deviceList(ids, total, attrs) {
  if (!ids || ids.length === 0) return h("span", Object.assign({ class: "muted" }, attrs), "none");
  return h("div", Object.assign({ class: "ids" }, attrs),
    ids.map((d) => deviceLink(d, { class: "chip mono", "data-device": d })),
    total > ids.length ? h("span", { class: "muted" }, ` … and ${num(total - ids.length)} more`) : null);
}

function deploymentOrNone(id) {
  return id ? deploymentLink(id) : h("span", { class: "muted" }, "none (its modules are removed)");
}

// dryRunPreview renders r. opts.deleting names the deployment a delete
// would remove.
export function dryRunPreview(r, opts = {}) {
  const moves = r.moves || [];
  const applied = moves.filter((m) => m.from === opts.deleting).reduce((n, m) => n + m.count, 0);
  const counts = opts.deleting
    ? h("div", { class: "cards" },
      h("div", { class: "card" }, h("div", { class: "label" }, "targets now"), count("div", r.targetedCount, { class: "value", "data-dry-run": "targetedCount" })),
      h("div", { class: "card" }, h("div", { class: "label" }, "applies to now"), count("div", applied, { class: "value", "data-dry-run": "appliedCount" })))
    : h("div", { class: "cards" },
      h("div", { class: "card" }, h("div", { class: "label" }, "would target"), count("div", r.targetedCount, { class: "value", "data-dry-run": "targetedCount" })),
      h("div", { class: "card" }, h("div", { class: "label" }, "would apply to"), count("div", r.wouldApplyCount, { class: "value", "data-dry-run": "wouldApplyCount" })),
      h("div", { class: "card" }, h("div", { class: "label" }, "devices that would change deployment"),
        count("div", moves.reduce((n, m) => n + m.count, 0), { class: "value", "data-dry-run": "moved" })));
  const moveRows = moves.map((m) => h("tr", { "data-move-from": m.from, "data-move-to": m.to },
    h("td", {}, deploymentOrNone(m.from)),
    h("td", {}, deploymentOrNone(m.to)),
    h("td", { class: "num" }, count("span", m.count)),
    h("td", {}, deviceList(m.devices, m.count))));
  const extra = Object.entries(r).filter(([k]) => !KNOWN.has(k));
  return h("div", { class: "dry-run", id: "dry-run" },
    counts,
    table({ id: "dry-run-moves" }, { text: opts.deleting ? "Where its devices would go" : "Devices whose deployment would change" },
      ["From", "To", { text: "Devices", num: true }, "Which"], moveRows,
      opts.deleting ? "It applies to no device: deleting it moves none." : "No device would change deployment."),
    opts.deleting ? null : h("div", { class: "two-col" },
      h("div", {}, h("h3", {}, `Would target (${num(r.targetedCount)})`),
        deviceList(r.targetedDevices, r.targetedCount, { "data-dry-run-list": "targeted" })),
      h("div", {}, h("h3", {}, `Would apply to (${num(r.wouldApplyCount)})`),
        deviceList(r.wouldApplyDevices, r.wouldApplyCount, { "data-dry-run-list": "wouldApply" }))),
    extra.length ? h("details", { class: "extra" }, h("summary", {}, "More from the dry run"),
      h("pre", {}, jsonPretty(Object.fromEntries(extra)))) : null);
}
