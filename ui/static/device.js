// One device: connection and node, editable tags, the deployments that
// target it in precedence order with why each wins or loses, its modules
// as last reported, the report itself, and its assignment history.

import {
  ago, api, call, deploymentLink, enc, h, healthChip, jsonPretty, notFound, table, tagChips, tagValue, when, fill,
} from "./lib.js";
import { failText, live, notice, section, setView } from "./shell.js";
import { troubleshootPanel } from "./troubleshoot.js";

export function deviceView(id) {
  const path = "/api/v1/devices/" + enc(id);
  const header = h("div", { id: "device-header" });
  const tagsBox = h("div", { id: "device-tags" });
  const body = h("div", {});
  const historyBox = h("div", {});
  let last = null; // the latest {dev, etag}
  let editing = false;

  const renderTags = () => {
    if (editing || !last) return;
    const edit = h("button", { type: "button", class: "secondary small", id: "edit-tags" }, "Edit tags");
    edit.addEventListener("click", () => {
      editing = true;
      fill(tagsBox, tagEditor(last.dev, last.etag, path, (saved) => {
        editing = false;
        if (saved) refresh();
        else renderTags();
      }));
      const firstInput = tagsBox.querySelector("input");
      if (firstInput) firstInput.focus();
    });
    fill(tagsBox, section("Tags", {},
      h("div", { class: "tag-list", "data-tags": JSON.stringify(last.dev.tags || {}) }, tagChips(last.dev.tags)),
      h("p", { class: "muted" }, "Tags decide which deployments target this device: changing them re-targets it at once."),
      edit));
  };

  // Built once: it keeps the lines shown and a follow going while the
  // rest of the page refreshes.
  const trouble = troubleshootPanel(id, () => refresh());
  setView(id,
    h("nav", { class: "crumbs", "aria-label": "Breadcrumb" }, h("a", { href: "#/devices" }, "Devices"), " / "),
    h("h1", { class: "mono", id: "device-id" }, id),
    header, tagsBox, body, trouble.panel, historyBox);
  const refresh = live(async () => {
    try {
      const [dev, hist] = await Promise.all([call(path), api(path + "/history?limit=50")]);
      return { dev: dev.body, etag: dev.etag, hist };
    } catch (err) {
      if (notFound(err)) return null;
      throw err;
    }
  }, (r) => {
    if (!r) {
      fill(header, h("p", { class: "error", id: "device-missing" }, `There is no device ${id}: it was deleted, or never existed.`));
      fill(tagsBox);
      fill(body);
      fill(historyBox);
      trouble.stop();
      trouble.panel.hidden = true;
      return;
    }
    trouble.panel.hidden = false;
    const before = last && appliedOf(last.dev);
    last = { dev: r.dev, etag: r.etag };
    fill(header, renderHeader(r.dev));
    renderTags();
    fill(body, ...renderBody(r.dev));
    fill(historyBox, renderHistory(r.hist));
    const rep = parseReport(r.dev);
    trouble.modulesChanged(Object.keys((rep && rep.modules) || {}));
    const after = appliedOf(r.dev);
    if (before !== null && before !== undefined && before !== after) {
      notice(`Re-targeted: ${id} now applies ${after || "no deployment"} (was ${before || "none"}).`);
    }
  });
}

function appliedOf(dev) {
  const e = Object.entries(dev.configurations || {}).find(([, c]) => c.status === "Applied");
  return e ? e[0] : "";
}

function parseReport(dev) {
  if (!dev.reported) return null;
  const doc = dev.reported.document;
  try { return typeof doc === "string" ? JSON.parse(doc) : doc; } catch (_) { return null; }
}

function renderHeader(dev) {
  const on = dev.connectionState === "Connected";
  const rep = parseReport(dev);
  const applied = appliedOf(dev);
  const running = rep && rep.deploymentId;
  const inSync = rep && rep.lastDesiredVersion === dev.desiredVersion;
  return h("dl", { class: "meta" },
    h("dt", {}, "Health"), h("dd", {}, healthChip(dev.health, { id: "device-health" })),
    h("dt", {}, "Connection"), h("dd", { id: "device-connection", "data-state": dev.connectionState },
      h("span", { class: "dot " + (on ? "seg-connected" : "seg-disconnected"), "aria-hidden": "true" }),
      on ? `Online on node ${dev.connectedNode || "?"}, active ${ago(dev.lastActivityTime)}` : dev.presence === "offline" ? "Offline" : "Disconnected",
      !on && dev.lastContactTime ? h("span", { class: "muted" }, ` (last contact ${ago(dev.lastContactTime)})`) : null),
    dev.kept ? h("dt", {}, "Kept") : null, dev.kept ? h("dd", { id: "device-kept" }, dev.kept.note) : null,
    dev.document && (dev.document.layers || []).length ? h("dt", {}, "Layers") : null,
    dev.document && (dev.document.layers || []).length ? h("dd", { id: "device-layers" },
      dev.document.layers.map((l) => deploymentLink(l, { class: "chip" })), h("span", { class: "muted" }, " merged on the base, in this order")) : null,
    h("dt", {}, "Status"), h("dd", {}, dev.status || "enabled"),
    h("dt", {}, "Applied deployment"), h("dd", { id: "device-applied" }, applied ? deploymentLink(applied) : h("span", { class: "muted" }, "none")),
    h("dt", {}, "Running"), h("dd", {},
      running === undefined || running === null ? h("span", { class: "muted" }, "no report yet")
        : running === "" ? "no deployment (reported)" : deploymentLink(running),
      rep ? h("span", { class: "muted" }, inSync ? " · in sync with desired version " + dev.desiredVersion
        : ` · reported version ${rep.lastDesiredVersion}, desired ${dev.desiredVersion}`) : null),
    h("dt", {}, "Created"), h("dd", {}, when(dev.createdTimeUtc)),
    h("dt", {}, "Updated"), h("dd", {}, when(dev.lastUpdatedTimeUtc)));
}

function statusChip(s) {
  const cls = { running: "healthy", stopped: "none", backoff: "soaking", failed: "unhealthy", dead: "unhealthy", unhealthy: "unhealthy" }[s] || "unknown";
  return h("span", { class: "chip health-" + cls, "data-runtime-status": s || "" }, s || "–");
}

function moduleRows(mods, system) {
  return Object.entries(mods || {}).sort(([a], [b]) => a.localeCompare(b)).map(([name, m]) =>
    h("tr", { "data-module": name },
      h("td", { class: "mono" }, name, system ? h("span", { class: "muted" }, " (system)") : null),
      h("td", {}, statusChip(m.runtimeStatus)),
      h("td", {}, m.status || "–"),
      h("td", { class: "num", "data-field": "exitCode" }, m.exitCode === undefined ? "–" : m.exitCode),
      h("td", { class: "num", "data-field": "restartCount" }, m.restartCount === undefined ? "–" : m.restartCount),
      h("td", { class: "nowrap" }, when(m.lastStartTimeUtc)),
      h("td", { class: "nowrap" }, when(m.lastExitTimeUtc)),
      h("td", { class: "mono" }, (m.settings && m.settings.image) || "–"),
      h("td", { class: "what" }, m.statusDescription || "")));
}

function renderBody(dev) {
  const rep = parseReport(dev);
  const prec = dev.precedence || [];
  const precRows = prec.map((p, i) => h("tr", { "data-precedence": p.deployment, "data-status": p.status },
    h("td", { class: "num" }, i + 1),
    h("td", {}, deploymentLink(p.deployment)),
    h("td", {}, h("span", { class: "chip " + (p.status === "Applied" ? "applied" : "targeted") }, p.status)),
    h("td", { class: "num" }, p.priority),
    h("td", { class: "nowrap" }, when(p.createdTimeUtc)),
    h("td", { class: "what", "data-field": "reason" }, p.reason)));
  const mods = rep ? [...moduleRows(rep.systemModules, true), ...moduleRows(rep.modules, false)] : [];
  const status = rep && rep.lastDesiredStatus;
  return [
    section("Deployments that target it", { id: "device-precedence" },
      h("p", { class: "muted" }, "In precedence order: the highest priority applies; a tie goes to the most recently created, then to the smaller id."),
      table({}, { text: "Deployments whose condition matches this device, first applies", quiet: true },
        [{ text: "#", num: true }, "Deployment", "Status", { text: "Priority", num: true }, "Created", "Why"],
        precRows, "No deployment's condition matches this device.")),
    section("Modules", { id: "device-modules" },
      rep ? null : h("p", { class: "muted" }, "The device has not reported yet."),
      rep ? table({ id: "modules" }, { text: "Modules as last reported", quiet: true },
        ["Module", "Runtime status", "Desired", { text: "Exit code", num: true }, { text: "Restarts", num: true },
          "Last start", "Last exit", "Image", "Description"], mods, "The report lists no modules.") : null),
    section("Last report", { id: "device-report" },
      dev.reported ? h("dl", { class: "meta" },
        h("dt", {}, "Received"), h("dd", {}, when(dev.reported.receivedTimeUtc), " ", h("span", { class: "muted" }, ago(dev.reported.receivedTimeUtc))),
        h("dt", {}, "Result"), h("dd", {}, status ? `${status.code}${status.description ? " — " + status.description : ""}` : "–"),
        h("dt", {}, "Device health"), h("dd", {}, (rep && rep.deviceHealth) || "–"),
        h("dt", {}, "Agent"), h("dd", {}, rep ? [rep.version || "–", rep.runtime && rep.runtime.platform ?
          ` · ${rep.runtime.platform.os || ""}/${rep.runtime.platform.architecture || ""}` : ""] : "–"),
      ) : h("p", { class: "muted" }, "No report yet."),
      dev.reported ? h("details", {}, h("summary", {}, "Reported properties (the whole document)"),
        h("pre", { class: "content", id: "reported-json" }, jsonPretty(dev.reported.document))) : null),
  ];
}

function renderHistory(hist) {
  return section("History", { id: "device-history" },
    table({}, { text: "Assignment changes and operators' actions on this device, newest first", quiet: true },
      ["When", "Change", "By", "What"],
      (hist.items || []).map((e) => h("tr", { "data-kind": e.kind, "data-to": e.deployment || "" },
        h("td", { class: "nowrap" }, when(e.time)), h("td", {}, e.kind), h("td", {}, e.actor || "–"), h("td", { class: "what" }, e.what))),
      "No history on this node."));
}

// ---- tag editor -------------------------------------------------------------

const TYPES = [["string", "text"], ["number", "number"], ["boolean", "true/false"], ["json", "JSON"]];

function typeOf(v) {
  if (typeof v === "string") return "string";
  if (typeof v === "number") return "number";
  if (typeof v === "boolean") return "boolean";
  return "json";
}

// tagEditor edits a device's top-level tags and saves them as a JSON merge
// patch (a removed tag is sent as null) with the etag read, so a change
// made meanwhile by someone else is not overwritten. done(saved) ends it.
function tagEditor(dev, etag, path, done) {
  const rows = h("div", { class: "pairs", id: "tag-rows" });
  let n = 0;
  const add = (k = "", v = "") => {
    const i = ++n;
    const key = h("input", { type: "text", class: "mono", value: k, "aria-label": `Tag name ${i}`, "data-tag": "key", spellcheck: "false" });
    const type = h("select", { "aria-label": `Tag type ${i}`, "data-tag": "type" },
      TYPES.map(([val, label]) => h("option", { value: val }, label)));
    type.value = k ? typeOf(v) : "string";
    const value = h("input", { type: "text", class: "mono", value: k ? (type.value === "json" ? JSON.stringify(v) : String(v)) : "",
      "aria-label": `Tag value ${i}`, "data-tag": "value", spellcheck: "false" });
    const remove = h("button", { type: "button", class: "secondary small", "aria-label": `Remove tag ${i}` }, "Remove");
    const row = h("div", { class: "pair" }, key, type, value, remove);
    remove.addEventListener("click", () => row.remove());
    row._get = () => [key.value.trim(), type.value, value.value];
    rows.append(row);
    return key;
  };
  for (const [k, v] of Object.entries(dev.tags || {}).sort(([a], [b]) => a.localeCompare(b))) add(k, v);
  const error = h("p", { class: "error", role: "alert", id: "tag-error" });
  const addButton = h("button", { type: "button", class: "secondary small", id: "add-tag" }, "Add tag");
  addButton.addEventListener("click", () => add().focus());
  const save = h("button", { type: "submit", id: "save-tags" }, "Save tags");
  const cancel = h("button", { type: "button", class: "secondary" }, "Cancel");
  cancel.addEventListener("click", () => done(false));
  const form = h("form", { class: "form", id: "tag-form" },
    h("fieldset", { class: "field" }, h("legend", {}, "Tags (name, type, value)"), rows, addButton),
    error, h("div", { class: "actions" }, save, cancel));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const next = {};
    for (const row of rows.children) {
      const [k, t, raw] = row._get();
      if (!k) continue;
      let v = raw;
      if (t === "number") {
        v = Number(raw);
        if (raw.trim() === "" || !Number.isFinite(v)) { error.textContent = `Tag ${k}: "${raw}" is not a number.`; return; }
      } else if (t === "boolean") {
        if (raw !== "true" && raw !== "false") { error.textContent = `Tag ${k}: write true or false.`; return; }
        v = raw === "true";
      } else if (t === "json") {
        try { v = JSON.parse(raw); } catch (e) { error.textContent = `Tag ${k}: not JSON (${e.message}).`; return; }
      }
      if (k in next) { error.textContent = `Tag ${k} is given twice.`; return; }
      next[k] = v;
    }
    const patch = {};
    for (const [k, v] of Object.entries(next)) {
      if (JSON.stringify((dev.tags || {})[k]) !== JSON.stringify(v)) patch[k] = v;
    }
    for (const k of Object.keys(dev.tags || {})) if (!(k in next)) patch[k] = null;
    if (Object.keys(patch).length === 0) { done(false); return; }
    save.disabled = true;
    try {
      await call(path, { method: "PATCH", body: { tags: patch }, etag });
      notice(`Tags saved (${Object.entries(patch).map(([k, v]) => v === null ? "removed " + k : k + "=" + tagValue(v)).join(", ")}).`);
      done(true);
    } catch (err) {
      save.disabled = false;
      error.textContent = err.status === 412
        ? "The device changed since this page read it (someone else edited it, or it enrolled again): cancel and edit again."
        : failText(err);
    }
  });
  return section("Edit tags", {}, form);
}
