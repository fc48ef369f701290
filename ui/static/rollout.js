// The rollout part of a deployment's page: its state, why, what the next
// step waits for, each wave's devices, and the operator's actions. Built
// from GET /deployments/{id}/rollout; the actions POST
// /deployments/{id}/rollout/{action}.

import { api, enc, h, fill, notFound, num, table, when } from "./lib.js";
import { failText, section } from "./shell.js";

// fetchRollout reads a deployment's rollout, null when it has none.
export async function fetchRollout(id) {
  try {
    return await api("/api/v1/deployments/" + enc(id) + "/rollout");
  } catch (err) {
    if (notFound(err)) return null;
    throw err;
  }
}

// Which actions make sense in each state (the node refuses the others).
function actionsFor(ro) {
  switch (ro.state) {
    case "running": return ["pause", "promote", "abort", "rollback"];
    case "paused": return ["resume", "promote", "abort", "rollback"];
    case "halted": return ro.aborted ? ["rollback"] : ["resume", "promote", "abort", "rollback"];
    case "completed": return ["rollback"];
    default: return [];
  }
}

const LABELS = { pause: "Pause", resume: "Resume", promote: "Promote wave", abort: "Abort…", rollback: "Roll back…" };
const CONFIRM = {
  abort: "Abort this rollout for good? Devices it reached keep the deployment; the others never get it.",
  rollback: "Roll back? Every device this rollout reached returns to what it ran before.",
};

// rolloutSection renders a deployment's rollout (ro null: it has none);
// changed is called after an action took, to read it again.
export function rolloutSection(id, ro, changed) {
  if (!ro) {
    return section("Rollout", { id: "rollout", "data-rollout-state": "none" },
      h("p", { class: "muted" }, "This deployment goes to every device it targets at once: it was created without a rollout policy (appliance deployment create --waves 1%,10%,100% … rolls out in waves)."));
  }
  const message = h("p", { class: "error", role: "alert", id: "rollout-message" });
  const buttons = actionsFor(ro).map((a) => {
    const b = h("button", { type: "button", class: a === "rollback" || a === "abort" ? "danger" : "secondary", "data-rollout-action": a }, LABELS[a]);
    b.addEventListener("click", async () => {
      if (CONFIRM[a] && !window.confirm(CONFIRM[a])) return;
      b.disabled = true;
      fill(message);
      try {
        await api("/api/v1/deployments/" + enc(id) + "/rollout/" + a, { method: "POST" });
        changed();
      } catch (err) {
        b.disabled = false;
        fill(message, failText(err));
      }
    });
    return b;
  });
  const p = ro.policy || {};
  const state = ro.state + (ro.aborted ? " (aborted)" : "");
  return section("Rollout", { id: "rollout", "data-rollout-state": ro.state },
    h("dl", { class: "meta" },
      h("dt", {}, "State"), h("dd", {}, h("span", { class: "chip rollout-" + ro.state, id: "rollout-state" }, state)),
      ro.reason ? [h("dt", {}, "Why"), h("dd", { id: "rollout-reason" }, ro.reason)] : null,
      h("dt", {}, "Next"), h("dd", { id: "rollout-next" }, ro.next),
      h("dt", {}, "Reached"), h("dd", {}, `${num(ro.reached)} devices, ${num(ro.exposed)} run it now, ${num(ro.failed)} failed` +
        (ro.state === "running" ? ` (it stops beyond ${num(ro.failureLimit)})` : "")),
      h("dt", {}, "Policy"), h("dd", {}, (p.canary ? `canary ${p.canary}, ` : "") +
        `waves ${(p.waves || []).join(", ")}; each healthy at ${p.waveSuccess} for ${p.waveSoak}; silent after ${p.waveTimeout} counts as failed; ` +
        `stops beyond ${p.maxFailures} failed and then ${p.onFailure === "rollback" ? "rolls back" : "halts"}`)),
    table({ id: "rollout-waves" }, { text: "Waves, in order", quiet: true },
      ["Wave", "Reaches", "State", { text: "Devices", num: true }, { text: "Healthy", num: true }, { text: "Failed", num: true }, { text: "Pending", num: true }, "Started"],
      (ro.waves || []).map((w) => h("tr", { "data-wave": w.number, "data-wave-state": w.state },
        h("td", {}, w.number), h("td", {}, w.target), h("td", {}, w.state),
        h("td", { class: "num" }, num(w.size)), h("td", { class: "num" }, num(w.healthy)),
        h("td", { class: "num" }, num(w.failed)), h("td", { class: "num" }, num(w.pending)),
        h("td", { class: "nowrap" }, w.startedTimeUtc ? when(w.startedTimeUtc) : "–"))),
      "No waves."),
    buttons.length ? h("div", { class: "actions", id: "rollout-actions" }, buttons) : null,
    message);
}
