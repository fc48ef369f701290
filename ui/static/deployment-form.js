// Creating and updating deployments in the browser. Nothing is saved
// before its dry run has been shown for exactly the inputs on screen.
//
// Create: the manifest (pasted or uploaded; an Azure modulesContent file,
// a whole configuration object, or an iotedgedev template with a .env) is
// expanded by the node as the CLI would (POST /api/v1/manifests/expand),
// then PUT ?dryRun=true shows what it would target and move; Create sends
// the same request without dryRun, create-only (If-None-Match: *).
// Update: the parts that can change (condition, priority, labels,
// metrics), previewed with PATCH ?dryRun=true and saved with the etag read.

import { api, call, deploymentHref, enc, h, jsonPretty, fill } from "./lib.js";
import { current, failText, generationNow, notice, section, setView } from "./shell.js";
import { conditionInput } from "./condition.js";
import { dryRunPreview } from "./dryrun.js";
import { modulesOf } from "./deployments.js";

// pairsEditor edits key=value pairs (labels; metric name = query). It
// returns {el, get(), set(obj)}; get() leaves out rows without a key.
function pairsEditor({ id, legend, keyLabel, valueLabel, pairs, metric, onInput }) {
  const rows = h("div", { class: "pairs", id });
  let n = 0;
  const add = (k = "", v = "") => {
    const i = ++n;
    const key = h("input", { type: "text", class: "mono", value: k, "aria-label": `${keyLabel} ${i}`, "data-pair": "key", spellcheck: "false" });
    key.addEventListener("input", () => onInput && onInput());
    let value;
    let valueEl;
    if (metric) {
      const c = conditionInput({ id: `${id}-query-${i}`, label: `${valueLabel} ${i}`, kind: "metric", value: v, quiet: true, onInput });
      value = c.input;
      valueEl = c.el;
    } else {
      value = h("input", { type: "text", value: v, "aria-label": `${valueLabel} ${i}`, "data-pair": "value" });
      value.addEventListener("input", () => onInput && onInput());
      valueEl = value;
    }
    const row = h("div", { class: "pair" }, key, valueEl);
    const remove = h("button", { type: "button", class: "secondary small", "aria-label": `Remove ${keyLabel.toLowerCase()} ${i}` }, "Remove");
    remove.addEventListener("click", () => { row.remove(); if (onInput) onInput(); });
    row.append(remove);
    row._get = () => [key.value.trim(), value.value];
    rows.append(row);
    return key;
  };
  for (const [k, v] of Object.entries(pairs || {})) add(k, v);
  const addButton = h("button", { type: "button", class: "secondary small" }, `Add ${keyLabel.toLowerCase()}`);
  addButton.addEventListener("click", () => { add().focus(); if (onInput) onInput(); });
  const el = h("fieldset", { class: "field" }, h("legend", {}, legend), rows, addButton);
  const get = () => {
    const out = {};
    for (const row of rows.children) {
      const [k, v] = row._get();
      if (k) out[k] = v;
    }
    return out;
  };
  const set = (obj) => {
    fill(rows);
    for (const [k, v] of Object.entries(obj || {})) add(k, v);
  };
  return { el, get, set };
}

function field(id, label, input, help) {
  return h("div", { class: "field" }, h("label", { for: id }, label),
    help ? h("div", { class: "help", id: id + "-help" }, help) : null, input);
}

// errorAt shows an API error next to the input it names.
function errorAt(err, box, inputs) {
  const text = failText(err);
  box.textContent = text;
  box.hidden = !text;
  for (const el of Object.values(inputs)) el.removeAttribute("aria-invalid");
  const f = err.field || "";
  const key = Object.keys(inputs).find((k) => f === k || f.startsWith(k + "."));
  if (key) inputs[key].setAttribute("aria-invalid", "true");
  box.focus();
}

// ---- create -------------------------------------------------------------------

export function createDeploymentView(query) {
  const idInput = h("input", { id: "dep-id", type: "text", class: "mono", required: true, spellcheck: "false", autocomplete: "off",
    pattern: "[a-z0-9\\-+%_*!'.]{1,128}", "aria-describedby": "dep-id-help" });
  const manifest = h("textarea", { id: "dep-manifest", class: "mono", rows: "16", spellcheck: "false", required: true, "aria-describedby": "dep-manifest-help" });
  const upload = h("input", { id: "dep-upload", type: "file", accept: ".json,application/json" });
  const env = h("textarea", { id: "dep-env", class: "mono", rows: "4", spellcheck: "false", "aria-describedby": "dep-env-help" });
  const priority = h("input", { id: "dep-priority", type: "number", min: "0", step: "1", value: "0", required: true });
  const layered = h("input", { id: "dep-layered", type: "checkbox" });
  const stale = () => markStale();
  const cond = conditionInput({ id: "dep-condition", label: "Target condition", value: query.get("condition") || "", onInput: stale,
    help: "Which devices, over deviceId and tags: tags.environment='prod' AND tags.location='westus'. '*' targets every device." });
  const labels = pairsEditor({ id: "dep-labels", legend: "Labels", keyLabel: "Label", valueLabel: "Value", onInput: stale });
  const metrics = pairsEditor({ id: "dep-metrics", legend: "Custom metrics", keyLabel: "Metric", valueLabel: "Query", metric: true, onInput: stale });
  const error = h("div", { class: "form-error", role: "alert", tabindex: "-1", id: "dep-error", hidden: true });
  const preview = h("div", { id: "dep-preview", "aria-live": "polite" });
  const previewButton = h("button", { type: "button", id: "dep-preview-button" }, "Preview (dry run)");
  const createButton = h("button", { type: "submit", id: "dep-create", disabled: true }, "Create deployment");
  const status = h("p", { class: "muted", id: "dep-status", role: "status" }, "Preview first: nothing is saved before you have seen what it does.");
  let previewed = null; // {signature, request}

  const signature = () => JSON.stringify([idInput.value, manifest.value, env.value, cond.input.value, priority.value,
    labels.get(), metrics.get(), layered.checked]);
  function markStale() {
    if (previewed && previewed.signature !== signature()) {
      createButton.disabled = true;
      preview.classList.add("stale");
      status.textContent = "The inputs changed since the preview: preview again before creating.";
    }
  }
  for (const el of [idInput, manifest, env, priority, layered]) el.addEventListener("input", stale);
  upload.addEventListener("change", async () => {
    const file = upload.files && upload.files[0];
    if (!file) return;
    manifest.value = await file.text();
    stale();
  });
  const inputs = { id: idInput, manifest, env, targetCondition: cond.input, priority, content: manifest };

  previewButton.addEventListener("click", async () => {
    error.hidden = true;
    if (!idInput.value.trim()) {
      errorAt({ message: "id: give the deployment an id (lowercase letters, digits and - + % _ * ! ' .)", field: "id" }, error, inputs);
      idInput.focus();
      return;
    }
    previewButton.disabled = true;
    status.textContent = "Expanding the manifest and running the dry run…";
    try {
      const expanded = await api("/api/v1/manifests/expand", { method: "POST", body: { manifest: manifest.value, env: env.value } });
      const cfg = expanded.configuration;
      const taken = [];
      if (cfg) { // a whole configuration object: start from what it says
        if (cfg.targetCondition !== undefined && !cond.input.value.trim()) { cond.input.value = cfg.targetCondition; cond.check(); taken.push("target condition"); }
        if (cfg.priority !== undefined && priority.value === "0") { priority.value = String(cfg.priority); taken.push("priority"); }
        if (cfg.labels && Object.keys(labels.get()).length === 0) { labels.set(cfg.labels); taken.push("labels"); }
        if (cfg.metrics && cfg.metrics.queries && Object.keys(metrics.get()).length === 0) { metrics.set(cfg.metrics.queries); taken.push("metrics"); }
      }
      const request = {
        content: expanded.content, targetCondition: cond.input.value, priority: Number(priority.value || 0),
        labels: labels.get(), metrics: { queries: metrics.get() }, layered: layered.checked,
      };
      const id = idInput.value.trim();
      const dry = await api("/api/v1/deployments/" + enc(id) + "?dryRun=true", { method: "PUT", body: request });
      previewed = { signature: signature(), request, id };
      preview.classList.remove("stale");
      const mods = modulesOf(expanded.content);
      fill(preview, section("Preview: what creating " + id + " would do", { id: "dep-preview-panel" },
        taken.length ? h("p", { class: "muted" }, "Taken from the configuration in the file: " + taken.join(", ") + ".") : null,
        h("p", {}, `Modules: ${mods.length ? mods.map((m) => m.name).join(", ") : "none"}`,
          expanded.placeholders.length ? `; placeholders filled: ${expanded.placeholders.join(", ")}` : ""),
        dryRunPreview(dry)));
      createButton.disabled = false;
      status.textContent = "Preview ready. Create sends exactly what was previewed.";
    } catch (err) {
      previewed = null;
      createButton.disabled = true;
      fill(preview);
      status.textContent = "";
      if (err.field === "env" || /placeholder/.test(err.message)) envBox.open = true;
      errorAt(err, error, inputs);
    } finally {
      previewButton.disabled = false;
    }
  });

  const envBox = h("details", { class: "field", id: "dep-env-box" },
    h("summary", {}, "Template variables (.env)"),
    h("label", { for: "dep-env" }, "KEY=value lines for the manifest's ${VAR} placeholders"),
    h("div", { class: "help", id: "dep-env-help" }, "Only these values are used (never the node's environment). They are sent to the node over this connection and are not stored apart from the deployment."),
    env);
  const form = h("form", { id: "dep-form", class: "form", novalidate: true },
    error,
    field("dep-id", "Deployment id", idInput, null),
    h("div", { class: "help", id: "dep-id-help" }, "Lowercase letters, digits and - + % _ * ! ' . (up to 128). It cannot be renamed."),
    h("div", { class: "field" },
      h("label", { for: "dep-manifest" }, "Manifest"),
      h("div", { class: "help", id: "dep-manifest-help" },
        "Paste an Azure IoT Edge deployment: {\"modulesContent\": …}, a whole IoT Hub configuration, or an iotedgedev deployment.template.json. The content cannot change after creation."),
      manifest,
      h("div", { class: "upload" }, h("label", { for: "dep-upload" }, "…or upload a file: "), upload)),
    envBox,
    cond.el,
    field("dep-priority", "Priority", priority, null),
    h("div", { class: "help" }, "The highest priority that targets a device applies to it; a tie goes to the newest."),
    labels.el,
    metrics.el,
    h("div", { class: "field checkbox" }, layered, h("label", { for: "dep-layered" }, "Layered deployment (its keys set paths inside properties.desired)")),
    // A rollout policy is set from the CLI for now; the deployment's page
    // shows and steers its rollout (rollout.js).
    h("fieldset", { class: "field placeholder", disabled: true, "data-placeholder": "rollout-policy-form" },
      h("legend", {}, "Rollout policy"),
      h("p", { class: "muted" }, "A deployment created here goes to every device it targets at once. To roll out in waves, create it with the CLI: appliance deployment create ID --content FILE --waves 5%,25%,100% --on-failure rollback; its page then shows the waves and pauses, resumes, promotes or rolls back.")),
    h("div", { class: "actions" }, previewButton, createButton),
    status);
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    if (!previewed || previewed.signature !== signature()) {
      markStale();
      return;
    }
    createButton.disabled = true;
    status.textContent = "Creating…";
    try {
      await call("/api/v1/deployments/" + enc(previewed.id), { method: "PUT", body: previewed.request, create: true });
      notice(`Deployment ${previewed.id} created.`, true);
      location.hash = deploymentHref(previewed.id);
    } catch (err) {
      createButton.disabled = false;
      status.textContent = "";
      if (err.status === 409) err.message = `A deployment ${previewed.id} exists already: pick another id (content cannot change; create a new deployment with a higher priority instead).`;
      errorAt(err, error, inputs);
    }
  });
  setView("New deployment",
    h("nav", { class: "crumbs", "aria-label": "Breadcrumb" }, h("a", { href: "#/deployments" }, "Deployments"), " / "),
    h("h1", {}, "New deployment"), form, preview);
  document.body.dataset.loaded = "true";
}

// ---- update -------------------------------------------------------------------

// patchOf is the PATCH that turns dep into the form's values (a label or
// metric left out is sent as "" to remove it), or null when nothing
// changed.
function patchOf(dep, v) {
  const p = {};
  if (v.targetCondition !== dep.targetCondition) p.targetCondition = v.targetCondition;
  if (v.priority !== dep.priority) p.priority = v.priority;
  const diff = (before, after) => {
    const out = {};
    for (const [k, val] of Object.entries(after)) if (before[k] !== val) out[k] = val;
    for (const k of Object.keys(before)) if (!(k in after)) out[k] = "";
    return Object.keys(out).length ? out : null;
  };
  const labels = diff(dep.labels || {}, v.labels);
  if (labels) p.labels = labels;
  const metrics = diff((dep.metrics && dep.metrics.queries) || {}, v.metrics);
  if (metrics) p.metrics = { queries: metrics };
  return Object.keys(p).length ? p : null;
}

export async function editDeploymentView(id) {
  const path = "/api/v1/deployments/" + enc(id);
  const gen = generationNow();
  setView("Edit " + id, h("h1", {}, "Edit " + id), h("p", { class: "muted" }, "Loading…"));
  let dep, etag;
  try {
    ({ body: dep, etag } = await call(path));
  } catch (err) {
    if (!current(gen)) return;
    setView("Edit " + id, h("h1", {}, "Edit " + id), h("p", { class: "error", role: "alert" }, failText(err)));
    return;
  }
  if (!current(gen)) return; // the operator went elsewhere meanwhile
  const stale = () => markStale();
  const cond = conditionInput({ id: "dep-condition", label: "Target condition", value: dep.targetCondition, onInput: stale,
    help: "Which devices, over deviceId and tags. '*' targets every device; an empty condition targets none." });
  const priority = h("input", { id: "dep-priority", type: "number", min: "0", step: "1", value: String(dep.priority), required: true });
  priority.addEventListener("input", stale);
  const labels = pairsEditor({ id: "dep-labels", legend: "Labels", keyLabel: "Label", valueLabel: "Value", pairs: dep.labels, onInput: stale });
  const metrics = pairsEditor({ id: "dep-metrics", legend: "Custom metrics", keyLabel: "Metric", valueLabel: "Query", metric: true,
    pairs: (dep.metrics && dep.metrics.queries) || {}, onInput: stale });
  const error = h("div", { class: "form-error", role: "alert", tabindex: "-1", id: "dep-error", hidden: true });
  const preview = h("div", { id: "dep-preview", "aria-live": "polite" });
  const previewButton = h("button", { type: "button", id: "dep-preview-button" }, "Preview (dry run)");
  const saveButton = h("button", { type: "submit", id: "dep-save", disabled: true }, "Save changes");
  const status = h("p", { class: "muted", id: "dep-status", role: "status" }, "Preview first: nothing is saved before you have seen what it does.");
  const inputs = { targetCondition: cond.input, priority };
  let previewed = null;
  const values = () => ({ targetCondition: cond.input.value, priority: Number(priority.value || 0), labels: labels.get(), metrics: metrics.get() });
  const signature = () => JSON.stringify(values());
  function markStale() {
    if (previewed && previewed.signature !== signature()) {
      saveButton.disabled = true;
      preview.classList.add("stale");
      status.textContent = "The inputs changed since the preview: preview again before saving.";
    }
  }
  previewButton.addEventListener("click", async () => {
    error.hidden = true;
    const patch = patchOf(dep, values());
    if (!patch) {
      status.textContent = "Nothing changed.";
      return;
    }
    previewButton.disabled = true;
    try {
      const dry = await api(path + "?dryRun=true", { method: "PATCH", body: patch });
      previewed = { signature: signature(), patch };
      preview.classList.remove("stale");
      fill(preview, section("Preview: what this change would do", { id: "dep-preview-panel" }, dryRunPreview(dry)));
      saveButton.disabled = false;
      status.textContent = "Preview ready. Save sends exactly what was previewed.";
    } catch (err) {
      previewed = null;
      saveButton.disabled = true;
      errorAt(err, error, inputs);
    } finally {
      previewButton.disabled = false;
    }
  });
  const form = h("form", { id: "dep-form", class: "form", novalidate: true },
    error, cond.el, h("div", { class: "field" }, h("label", { for: "dep-priority" }, "Priority"), priority),
    labels.el, metrics.el,
    h("details", { class: "field" }, h("summary", {}, "Content (cannot change; secrets redacted)"),
      h("pre", { class: "content" }, jsonPretty(dep.content))),
    h("div", { class: "actions" }, previewButton, saveButton, h("a", { class: "button secondary", href: deploymentHref(id) }, "Cancel")),
    status);
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    if (!previewed || previewed.signature !== signature()) { markStale(); return; }
    saveButton.disabled = true;
    try {
      await call(path, { method: "PATCH", body: previewed.patch, etag });
      notice(`Deployment ${id} updated.`, true);
      location.hash = deploymentHref(id);
    } catch (err) {
      if (err.status === 412) err.message = "The deployment changed since this form read it: reload the page and make the change again.";
      errorAt(err, error, inputs);
    }
  });
  setView("Edit " + id,
    h("nav", { class: "crumbs", "aria-label": "Breadcrumb" }, h("a", { href: "#/deployments" }, "Deployments"), " / ",
      h("a", { href: deploymentHref(id), class: "mono" }, id), " / "),
    h("h1", {}, "Edit " + id), form, preview);
  document.body.dataset.loaded = "true";
}
