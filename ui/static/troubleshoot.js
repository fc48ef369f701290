// The device page's troubleshooting panel: ping the device's agent, read a
// module's output (the last lines, or since a time, and follow new ones),
// restart a module, download a support bundle. Every action is one of the
// agent's own direct methods (module $edgeAgent), called through
// POST /api/v1/devices/{id}/modules/$edgeAgent/methods/{method}: the node
// holding the device's session passes it on; nothing goes through raft.
// The panel is built once per device page and keeps its state (the lines
// shown, a follow in progress) while the rest of the page refreshes.

import { api, enc, fill, h } from "./lib.js";
import { current, failText, generationNow, notice, section } from "./shell.js";

const AGENT_LOG = "edgeAgent";
const FOLLOW_MS = 1000;
const MAX_LINES = 5000; // lines kept on the page; older ones scroll away
const BUNDLE_CHUNK_CALLS_MAX = 2000;

// callAgent calls one of the agent's methods; it returns the payload of a
// 200 and throws with the agent's message otherwise.
async function callAgent(device, method, payload, timeout = 30) {
  const res = await api("/api/v1/devices/" + enc(device) + "/modules/" + enc("$edgeAgent") + "/methods/" + enc(method),
    { method: "POST", body: { payload, responseTimeoutInSeconds: timeout } });
  if (res.status !== 200) {
    const msg = res.payload && res.payload.message ? res.payload.message : JSON.stringify(res.payload);
    const err = new Error(`${msg} (status ${res.status})`);
    err.status = res.status;
    throw err;
  }
  return res.payload;
}

// moduleLogs reads a module's lines as JSON messages (text, stream, time).
async function moduleLogs(device, module, filter) {
  const items = await callAgent(device, "GetModuleLogs", {
    schemaVersion: "1.0", contentType: "json", encoding: "none",
    items: [{ id: "^" + module.replace(/[.*+?^${}()|[\]\\]/g, "\\$&") + "$", filter }],
  });
  const item = (items || []).find((i) => i.id === module);
  if (!item) return { lines: [], truncated: false };
  return { lines: item.payload ? JSON.parse(item.payload) : [], truncated: !!item.truncated };
}

// blobHref is a link to a blob made here (the bundle the page saves).
const blobHref = URL.createObjectURL.bind(URL);

function b64bytes(s) {
  const bin = atob(s || "");
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}

async function sha256hex(blob) {
  const d = await crypto.subtle.digest("SHA-256", await blob.arrayBuffer());
  return [...new Uint8Array(d)].map((b) => b.toString(16).padStart(2, "0")).join("");
}

// troubleshootPanel builds the panel for device id. modulesChanged(names)
// is returned: the page calls it with the modules of each report.
export function troubleshootPanel(id, onRestarted) {
  const gen = generationNow();
  const alive = () => current(gen);

  // ---- ping
  const pingResult = h("span", { id: "ts-ping-result", role: "status", class: "muted" });
  const ping = h("button", { type: "button", class: "secondary", id: "ts-ping" }, "Ping the agent");
  ping.addEventListener("click", async () => {
    ping.disabled = true;
    fill(pingResult, "Asking…");
    pingResult.className = "muted";
    const start = performance.now();
    try {
      await callAgent(id, "ping", null, 5);
      fill(pingResult, `Answered in ${Math.round(performance.now() - start)} ms.`);
      pingResult.className = "ok";
      pingResult.dataset.result = "answered";
    } catch (err) {
      fill(pingResult, failText(err));
      pingResult.className = "error";
      pingResult.dataset.result = "failed";
    } finally {
      ping.disabled = false;
    }
  });

  // ---- logs
  const moduleSel = h("select", { id: "ts-module" }, h("option", { value: AGENT_LOG }, "edgeAgent (the agent's own log)"));
  const tail = h("input", { type: "number", id: "ts-tail", min: "0", value: "100", class: "short" });
  const since = h("input", { type: "text", id: "ts-since", class: "mono short", placeholder: "10m, 1h, 1d", spellcheck: "false" });
  const show = h("button", { type: "button", id: "ts-show" }, "Show logs");
  const follow = h("button", { type: "button", class: "secondary", id: "ts-follow", "aria-pressed": "false" }, "Follow");
  const status = h("p", { id: "ts-log-status", role: "status", class: "muted" });
  const output = h("pre", { id: "ts-log-output", class: "content logs", tabindex: "0", "aria-label": "Module output", "data-lines": "0" });
  let lines = 0;
  let cursor = { at: "", seen: 0 }; // the last line shown: its time and how many had it
  let following = null;

  const append = (msgs) => {
    let skip = 0;
    const frag = document.createDocumentFragment();
    for (const m of msgs) {
      if (cursor.at && m.timestamp === cursor.at && skip < cursor.seen) { skip++; continue; }
      frag.append(h("span", { class: "log-line " + (m.stream === "stderr" ? "stderr" : ""), "data-stream": m.stream, title: m.timestamp }, m.text + "\n"));
      lines++;
      if (m.timestamp === cursor.at) cursor.seen++;
      else { cursor = { at: m.timestamp, seen: 1 }; }
    }
    const atBottom = output.scrollTop + output.clientHeight >= output.scrollHeight - 4;
    output.append(frag);
    while (output.childNodes.length > MAX_LINES) output.firstChild.remove();
    output.dataset.lines = String(lines);
    if (atBottom) output.scrollTop = output.scrollHeight;
  };

  const stopFollow = () => {
    if (following) clearTimeout(following);
    following = null;
    follow.setAttribute("aria-pressed", "false");
    follow.textContent = "Follow";
  };

  const load = async () => {
    stopFollow();
    const module = moduleSel.value;
    const filter = {};
    const n = Number(tail.value);
    if (tail.value.trim() !== "" && (!Number.isInteger(n) || n < 0)) { fill(status, "Tail: write a whole number of lines (0: as many as one answer holds)."); status.className = "error"; return false; }
    if (n > 0) filter.tail = n;
    if (since.value.trim()) filter.since = since.value.trim();
    show.disabled = true;
    fill(status, `Reading ${module}'s output…`);
    status.className = "muted";
    try {
      const r = await moduleLogs(id, module, filter);
      if (!alive()) return false;
      fill(output);
      lines = 0;
      cursor = { at: "", seen: 0 };
      append(r.lines);
      output.dataset.module = module;
      fill(status, `${r.lines.length} lines of ${module}` + (r.truncated ? " (older lines left out: one answer holds at most 127 KB; narrow with tail or since)" : "") + ".");
      return true;
    } catch (err) {
      fill(status, failText(err));
      status.className = "error";
      return false;
    } finally {
      show.disabled = false;
    }
  };

  const poll = async () => {
    if (!alive() || !document.body.contains(output)) { following = null; return; }
    const module = moduleSel.value;
    let more = false;
    try {
      const r = await moduleLogs(id, module, cursor.at ? { since: cursor.at } : {});
      if (!alive() || !following) return;
      append(r.lines);
      more = r.truncated;
      fill(status, `Following ${module}: ${lines} lines shown, new ones every second.`);
      status.className = "muted";
    } catch (err) {
      if (!following) return;
      fill(status, `Following ${module}: ${failText(err)} (trying again)`);
      status.className = "error";
    }
    if (following) following = setTimeout(poll, more ? 0 : FOLLOW_MS);
  };

  show.addEventListener("click", load);
  follow.addEventListener("click", async () => {
    if (following) { stopFollow(); fill(status, `Stopped following ${moduleSel.value}.`); return; }
    if (output.dataset.module !== moduleSel.value && !(await load())) return;
    follow.setAttribute("aria-pressed", "true");
    follow.textContent = "Stop following";
    following = setTimeout(poll, 0);
  });
  moduleSel.addEventListener("change", stopFollow);

  // ---- restart
  const restartResult = h("span", { id: "ts-restart-result", role: "status" });
  const restart = h("button", { type: "button", class: "danger", id: "ts-restart" }, "Restart module…");
  restart.addEventListener("click", async () => {
    const module = moduleSel.value;
    if (module === AGENT_LOG) { fill(restartResult, "Choose a module: the agent itself is not restarted from here."); restartResult.className = "error"; return; }
    if (!window.confirm(`Restart module ${module} on ${id}? Its process (or container) is stopped and started again.`)) return;
    restart.disabled = true;
    fill(restartResult, `Restarting ${module}…`);
    restartResult.className = "muted";
    try {
      await callAgent(id, "RestartModule", { schemaVersion: "1.0", id: module });
      fill(restartResult, `${module} restarted.`);
      restartResult.className = "ok";
      restartResult.dataset.result = "restarted";
      notice(`Module ${module} of ${id} restarted.`);
      onRestarted();
    } catch (err) {
      fill(restartResult, failText(err));
      restartResult.className = "error";
      restartResult.dataset.result = "failed";
    } finally {
      restart.disabled = false;
    }
  });

  // ---- support bundle
  const bundleStatus = h("span", { id: "ts-bundle-status", role: "status", class: "muted" });
  const bundleLink = h("a", { id: "ts-bundle-link", hidden: true }, "Save the support bundle");
  const bundle = h("button", { type: "button", class: "secondary", id: "ts-bundle" }, "Download support bundle");
  bundle.addEventListener("click", async () => {
    bundle.disabled = true;
    bundleLink.hidden = true;
    fill(bundleStatus, "Asking the device for a support bundle…");
    bundleStatus.className = "muted";
    try {
      const parts = [];
      let req = { schemaVersion: "1.0" };
      let got = 0;
      let last = null;
      for (let i = 0; i < BUNDLE_CHUNK_CALLS_MAX; i++) {
        const c = await callAgent(id, "GetSupportBundle", req, 60);
        if (!alive()) return;
        if (c.offset !== got) throw new Error(`the device sent bytes from ${c.offset} when ${got} were asked for`);
        const bytes = b64bytes(c.data);
        parts.push(bytes);
        got += bytes.length;
        last = c;
        fill(bundleStatus, `Support bundle: ${Math.round(got / 1024)} of ${Math.round(c.size / 1024)} KiB…`);
        if (got >= c.size) break;
        req = { schemaVersion: "1.0", id: c.id, offset: got };
      }
      const blob = new Blob(parts, { type: "application/zip" });
      if (!last || got !== last.size || (await sha256hex(blob)) !== last.sha256) throw new Error("the bundle received does not match its digest: ask again");
      const name = `${id}-support-bundle-${new Date().toISOString().replace(/[:.]/g, "-")}.zip`;
      bundleLink.href = blobHref(blob);
      bundleLink.download = name;
      bundleLink.textContent = `Save ${name} again`;
      bundleLink.hidden = false;
      bundleLink.dataset.bytes = String(got);
      bundleLink.dataset.sha256 = last.sha256;
      bundleLink.click();
      fill(bundleStatus, `Support bundle downloaded: ${name}, ${Math.round(got / 1024)} KiB (secrets redacted on the device).`);
      bundleStatus.className = "ok";
      bundleStatus.dataset.result = "downloaded";
    } catch (err) {
      fill(bundleStatus, failText(err));
      bundleStatus.className = "error";
      bundleStatus.dataset.result = "failed";
    } finally {
      bundle.disabled = false;
    }
  });

  const panel = section("Troubleshooting", { id: "device-troubleshooting" },
    h("p", { class: "muted" }, "Through the device's agent, over its connection to the cluster: works while the device is online. Secrets are redacted on the device."),
    h("div", { class: "actions" }, ping, pingResult),
    h("div", { class: "ts-controls" },
      h("div", { class: "field" }, h("label", { for: "ts-module" }, "Module"), moduleSel),
      h("div", { class: "field" }, h("label", { for: "ts-tail" }, "Last lines"), tail),
      h("div", { class: "field" }, h("label", { for: "ts-since" }, "Since"), since),
      h("div", { class: "actions" }, show, follow, restart)),
    restartResult, status, output,
    h("div", { class: "actions" }, bundle, bundleStatus, bundleLink));

  // modulesChanged keeps the module list current, and the selection.
  const modulesChanged = (names) => {
    const want = [AGENT_LOG, ...names.filter((n) => n !== AGENT_LOG).sort()];
    const have = [...moduleSel.options].map((o) => o.value);
    if (want.join("\n") === have.join("\n")) return;
    const selected = moduleSel.value;
    fill(moduleSel, want.map((n) => h("option", { value: n }, n === AGENT_LOG ? "edgeAgent (the agent's own log)" : n)));
    moduleSel.value = want.includes(selected) ? selected : (names.length ? want[1] : AGENT_LOG);
  };
  return { panel, modulesChanged, stop: stopFollow };
}
