// A condition input checked as the operator types: the node compiles it
// (POST /api/v1/conditions/check, the same compiler the writes use) and
// answers how many devices it matches, or what is wrong at which column.

import { api, debounce, h, num, fill } from "./lib.js";
import { failText } from "./shell.js";

// conditionInput returns {el, input, check, state}. kind is "target"
// (deviceId and tags) or "metric" (a custom metric query, which may also
// name properties.reported). label is a visible label, or with quiet only
// an accessible name.
export function conditionInput({ id, label, kind = "target", value = "", help, quiet, onInput, onResult }) {
  const msgId = id + "-check";
  const input = h("input", {
    id, type: "text", class: "mono wide", spellcheck: "false", autocomplete: "off", value,
    "aria-describedby": msgId + (help ? " " + id + "-help" : ""), "aria-label": quiet ? label : null,
  });
  const msg = h("div", { id: msgId, class: "check", "aria-live": "polite", "data-check": id });
  const state = { valid: null, condition: null };
  let seq = 0;

  const show = (cond, r) => {
    state.valid = r.valid;
    state.condition = cond;
    msg.dataset.valid = String(r.valid);
    input.setAttribute("aria-invalid", r.valid ? "false" : "true");
    if (r.valid) {
      delete msg.dataset.column;
      msg.className = "check ok";
      const what = kind === "metric" ? "Valid query." : `Valid: matches ${num(r.matches)} device${r.matches === 1 ? "" : "s"} now.`;
      fill(msg, h("span", { "data-matches": r.matches === undefined ? "" : String(r.matches) }, what),
        r.message ? " " + r.message : "");
    } else {
      msg.className = "check bad";
      const parts = [r.column ? `Column ${r.column}: ${r.message}` : r.message];
      if (r.column) {
        msg.dataset.column = String(r.column);
        // The condition with a caret under the column (columns count
        // characters; the font is monospace).
        parts.push(h("pre", { class: "caret", "aria-hidden": "true" }, cond + "\n" + " ".repeat(Math.max(0, r.column - 1)) + "^"));
      }
      fill(msg, ...parts);
    }
    if (onResult) onResult(r);
  };

  const check = async () => {
    const my = ++seq;
    const cond = input.value;
    try {
      const r = await api("/api/v1/conditions/check", { method: "POST", body: { condition: cond, kind } });
      if (my === seq) show(cond, r);
      return r;
    } catch (err) {
      if (my !== seq) return null;
      state.valid = null;
      msg.className = "check bad";
      msg.textContent = "Cannot check the condition: " + failText(err);
      return null;
    }
  };
  const later = debounce(check, 250);
  input.addEventListener("input", () => {
    state.valid = null;
    msg.className = "check";
    msg.textContent = "Checking…";
    delete msg.dataset.valid;
    if (onInput) onInput();
    later();
  });
  if (value) check();

  const el = quiet
    ? h("div", { class: "field" }, input, msg)
    : h("div", { class: "field" }, h("label", { for: id }, label),
      help ? h("div", { class: "help", id: id + "-help" }, help) : null, input, msg);
  return { el, input, check, state };
}
