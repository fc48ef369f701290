// Deployments: the list (from the overview, one call for all of them) and
// one deployment with its devices by category, its history, and delete
// with its dry run.

import {
  CATEGORIES, HEALTH, OVERVIEW_MS, api, bar, call, count, deploymentHref, deploymentLink, deviceLink, enc, h,
  notFound, num, stateChip, table, when, fill,
} from "./lib.js";
import { failText, live, notice, section, setView } from "./shell.js";
import { dryRunPreview } from "./dryrun.js";
import { fetchRollout, rolloutSection } from "./rollout.js";

// ---- the list ---------------------------------------------------------------

export function deploymentsView() {
  const body = h("div", {});
  setView("Deployments",
    h("div", { class: "title-row" },
      h("h1", {}, "Deployments"),
      h("a", { class: "button", href: "#/new-deployment", id: "new-deployment" }, "New deployment")),
    body);
  live(() => api("/api/v1/overview"), (o) => fill(body, ...renderDeployments(o)), OVERVIEW_MS);
}

function healthLegend(id, counts) {
  return h("div", { class: "legend" }, HEALTH.map((c) =>
    h("span", {}, h("span", { class: "dot seg-" + c, "aria-hidden": "true" }), c + " ",
      count("b", counts[c], { "data-deployment": id, "data-count": c }))));
}

function healthBar(id, counts, big) {
  return bar(HEALTH.map((c) => [c, counts[c] || 0]), counts.applied || 0,
    { class: big ? "bar big" : "bar", "data-deployment": id, "data-bar": "health" });
}

function renderDeployments(o) {
  const d = o.devices;
  const items = o.deployments.items || [];
  const rows = items.map((s) => h("tr", { "data-deployment": s.id },
    h("td", { class: "nowrap" }, deploymentLink(s.id)),
    h("td", {}, stateChip(s.state, { "data-deployment": s.id })),
    h("td", { class: "num", "data-deployment": s.id, "data-field": "priority" }, s.priority),
    h("td", { class: "cond" }, h("code", {}, s.targetCondition || "")),
    h("td", { class: "num" }, count("span", s.counts.targeted, { "data-deployment": s.id, "data-count": "targeted" })),
    h("td", { class: "num" }, count("span", s.counts.applied, { "data-deployment": s.id, "data-count": "applied" })),
    h("td", {}, healthBar(s.id, s.counts, false), healthLegend(s.id, s.counts))));
  const withDeployment = d.total - (d.health.none || 0);
  return [
    h("p", { class: "muted", id: "deployments-shown" },
      `${num(o.deployments.total)} deployments${o.deployments.truncated ? `, the first ${items.length} shown` : ""}. `,
      "Device totals count each device once, under the deployment that applies to it (a device two deployments target is targeted twice in the rows, applied once)."),
    h("div", { class: "cards" },
      card("Devices", d.total, "devices"),
      card("With a deployment", withDeployment, "applied"),
      HEALTH.map((k) => card(k, d.health[k], k))),
    table({ id: "deployments" }, { text: "Deployments by id", quiet: true },
      ["ID", "State", { text: "Priority", num: true }, "Target condition", { text: "Targeted", num: true },
        { text: "Applied", num: true }, "Health of applied devices"],
      rows, "No deployments yet: create one with New deployment."),
  ];
}

function card(label, n, key) {
  return h("div", { class: "card" }, h("div", { class: "label" }, label),
    count("div", n, { class: "value", id: "total-" + key, "data-total": key }));
}

// ---- one deployment -----------------------------------------------------------

export function deploymentView(id) {
  const path = "/api/v1/deployments/" + enc(id);
  let etag = "";
  const body = h("div", {});
  const deletePanel = h("div", { id: "delete-panel" });
  const del = h("button", { type: "button", class: "danger", id: "delete-deployment" }, "Delete…");
  setView(id,
    h("nav", { class: "crumbs", "aria-label": "Breadcrumb" }, h("a", { href: "#/deployments" }, "Deployments"), " / "),
    h("div", { class: "title-row" },
      h("h1", { class: "mono", id: "deployment-id" }, id),
      h("div", { class: "actions" },
        h("a", { class: "button secondary", href: deploymentHref(id) + "/edit", id: "edit-deployment" }, "Edit"),
        del)),
    deletePanel, body);
  del.addEventListener("click", () => confirmDelete(id, path, () => etag, deletePanel));
  const actions = del.parentElement;
  const refresh = live(async () => {
    try {
      const [dep, st, hist, rollout] = await Promise.all([
        call(path), api(path + "/status?limit=1000"), api(path + "/history?limit=20"), fetchRollout(id),
      ]);
      return { dep: dep.body, etag: dep.etag, st, hist, rollout };
    } catch (err) {
      if (notFound(err)) return null;
      throw err;
    }
  }, (r) => {
    actions.hidden = !r;
    if (!r) {
      fill(body, h("p", { class: "error", id: "deployment-missing" }, `There is no deployment ${id}: it was deleted, or never existed.`));
      return;
    }
    etag = r.etag;
    fill(body, ...renderDeployment(r.dep, r.st, r.hist, rolloutSection(id, r.rollout, refresh)));
  });
}

// modulesOf lists a manifest's modules for people: name, type, image or
// command.
export function modulesOf(content) {
  const agent = ((content || {}).modulesContent || {}).$edgeAgent || {};
  const desired = agent["properties.desired"] || {};
  return Object.entries(desired.modules || {}).sort(([a], [b]) => a.localeCompare(b)).map(([name, m]) => {
    const s = m.settings || {};
    const what = s.image || (Array.isArray(s.command) ? s.command.join(" ") : "");
    return { name, type: m.type || "", status: m.status || "", restartPolicy: m.restartPolicy || "", what };
  });
}

function renderDeployment(dep, st, hist, rollout) {
  const id = dep.id;
  const sm = st.systemMetrics || {};
  const labels = Object.entries(dep.labels || {}).map(([k, v]) => h("span", { class: "chip" }, `${k}=${v}`));
  const metrics = Object.entries((dep.metrics && dep.metrics.queries) || {});
  const modules = modulesOf(dep.content);
  return [
    h("dl", { class: "meta" },
      h("dt", {}, "Target condition"), h("dd", {}, h("code", { id: "deployment-condition" }, dep.targetCondition || "")),
      h("dt", {}, "Priority"), h("dd", { "data-field": "priority" }, dep.priority),
      h("dt", {}, "Created"), h("dd", {}, when(dep.createdTimeUtc)),
      h("dt", {}, "Updated"), h("dd", {}, when(dep.lastUpdatedTimeUtc)),
      h("dt", {}, "Labels"), h("dd", {}, labels.length ? labels : "–"),
      h("dt", {}, "Layered"), h("dd", {}, dep.layered ? "yes" : "no"),
      h("dt", {}, "Modules"), h("dd", {}, modules.length ? modules.map((m) =>
        h("span", { class: "chip", title: m.what }, `${m.name} (${m.type}${m.what ? ": " + m.what : ""})`)) : "–"),
      h("dt", {}, "Soak"), h("dd", {}, `${st.soakSeconds} s of running before a device counts as healthy`)),
    h("div", { class: "cards" },
      CATEGORIES.map((c) => h("div", { class: "card" }, h("div", { class: "label" }, c),
        count("div", st.counts[c], { class: "value", "data-deployment": id, "data-count": c }))),
      h("div", { class: "card" }, h("div", { class: "label" }, "reported successful"),
        count("div", sm.reportedSuccessfulCount, { class: "value", "data-deployment": id, "data-metric": "reportedSuccessfulCount" })),
      h("div", { class: "card" }, h("div", { class: "label" }, "reported failed"),
        count("div", sm.reportedFailedCount, { class: "value", "data-deployment": id, "data-metric": "reportedFailedCount" }))),
    healthBar(id, st.counts, true),
    healthLegend(id, st.counts),
    metrics.length ? section("Custom metrics", {},
      table({ id: "metrics" }, { text: "Applied devices whose document matches each query", quiet: true },
        ["Metric", "Query", { text: "Devices", num: true }],
        metrics.map(([name, q]) => h("tr", {}, h("td", {}, name), h("td", {}, h("code", {}, q)),
          h("td", { class: "num" }, count("span", (st.metrics || {})[name], { "data-custom-metric": name })))), "")) : null,
    rollout,
    section("Devices by category", {},
      h("div", { class: "categories" }, CATEGORIES.map((c) => {
        const ids = (st.devices && st.devices[c]) || [];
        const more = st.next && st.next[c];
        return h("div", { class: "category", "data-category": c },
          h("h3", {}, HEALTH.includes(c) ? h("span", { class: "dot seg-" + c, "aria-hidden": "true" }) : null, `${c} (${num(st.counts[c])})`),
          h("div", { class: "ids" },
            ids.length ? ids.map((d) => deviceLink(d, { class: "chip mono", "data-device": d })) : h("span", { class: "muted" }, "none"),
            more ? h("div", { class: "muted" }, `… the first ${ids.length} shown`) : null));
      }))),
    section("History", {},
      table({ id: "deployment-history" }, { text: "Changes of this deployment, newest first", quiet: true },
        ["When", "Change", "By", "What"],
        (hist.items || []).map((e) => h("tr", {}, h("td", { class: "nowrap" }, when(e.time)), h("td", {}, e.kind),
          h("td", {}, e.actor || "–"), h("td", { class: "what" }, e.what))),
        "No history on this node.")),
  ];
}

// confirmDelete shows what deleting would do (its dry run), then deletes
// on confirmation with the etag read last, so a deployment changed in
// between is not deleted blind.
async function confirmDelete(id, path, etag, panel) {
  fill(panel, h("p", { class: "muted", role: "status" }, "Working out what deleting would do…"));
  let res;
  try {
    res = await api(path + "?dryRun=true", { method: "DELETE" });
  } catch (err) {
    fill(panel, h("p", { class: "error", role: "alert" }, failText(err)));
    return;
  }
  const message = h("p", { class: "error", role: "alert" });
  const confirm = h("button", { type: "button", class: "danger", id: "confirm-delete" }, `Delete ${id}`);
  const cancel = h("button", { type: "button", class: "secondary" }, "Cancel");
  cancel.addEventListener("click", () => fill(panel));
  confirm.addEventListener("click", async () => {
    confirm.disabled = true;
    try {
      await call(path, { method: "DELETE", etag: etag() });
      notice(`Deployment ${id} deleted.`, true);
      location.hash = "#/deployments";
    } catch (err) {
      confirm.disabled = false;
      message.textContent = err.status === 412
        ? "The deployment changed since this page read it; look again, then delete."
        : failText(err);
    }
  });
  fill(panel, h("section", { class: "panel dialog", role: "region", "aria-label": "Delete " + id, id: "delete-dry-run" },
    h("h2", {}, `Delete ${id}?`),
    dryRunPreview(res, { deleting: id }),
    message,
    h("div", { class: "actions" }, confirm, cancel)));
  confirm.focus();
}
