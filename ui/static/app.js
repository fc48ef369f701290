// The appliance dashboard: hash-routed views over the node's /api/v1/
// (every call carries the Authorization bearer token the operator signed
// in with; see lib.js), refreshed while shown.
//
//   #/overview                   the fleet at a glance
//   #/deployments                deployments with their state and health
//   #/new-deployment             create one: manifest, condition, dry run, save
//   #/deployments/ID             one deployment; #/deployments/ID/edit changes it
//   #/devices?prefix=&condition= devices, searched and filtered, a page at a time
//   #/devices/ID                 one device
//
// Deployment and device ids never hold "/", so the routes cannot collide.

import { $, setToken, token } from "./lib.js";
import { navigated, newView, showApp, showLogin } from "./shell.js";
import { overviewView } from "./overview.js";
import { deploymentsView, deploymentView } from "./deployments.js";
import { createDeploymentView, editDeploymentView } from "./deployment-form.js";
import { devicesView } from "./devices.js";
import { deviceView } from "./device.js";

// parseHash splits "#/devices/a%2Fb/edit?x=1" into ["devices", "a/b",
// "edit"] and its query.
function parseHash() {
  const raw = location.hash.replace(/^#\/?/, "");
  const [path, query] = raw.split("?", 2);
  const parts = path.split("/").filter((p) => p !== "").map((p) => {
    try { return decodeURIComponent(p); } catch (_) { return p; }
  });
  return { parts, query: new URLSearchParams(query || "") };
}

function route() {
  if (!token()) { showLogin(""); return; }
  const { parts, query } = parseHash();
  const [section, id, sub] = parts;
  const nav = section === "new-deployment" ? "deployments" : section || "overview";
  for (const a of document.querySelectorAll("[data-nav]")) {
    const on = a.dataset.nav === nav;
    a.classList.toggle("active", on);
    if (on) a.setAttribute("aria-current", "page"); else a.removeAttribute("aria-current");
  }
  newView();
  let view = section || "overview";
  switch (section) {
    case "deployments":
      if (id && sub === "edit") { view = "edit-deployment"; editDeploymentView(id); }
      else if (id) { view = "deployment"; deploymentView(id); }
      else deploymentsView();
      break;
    case "new-deployment": createDeploymentView(query); break;
    case "devices":
      if (id) { view = "device"; deviceView(id); }
      else devicesView(query);
      break;
    default:
      view = "overview";
      overviewView();
  }
  document.body.dataset.view = view;
}

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const t = $("login-token").value.trim();
    if (!t) return;
    setToken(t);
    $("login-token").value = "";
    showApp(route);
  });
  $("logout").addEventListener("click", () => showLogin("Signed out."));
  // The skip link moves the focus; it must not change the route.
  document.querySelector(".skip").addEventListener("click", (ev) => {
    ev.preventDefault();
    $("view").focus();
  });
  window.addEventListener("hashchange", () => {
    navigated();
    if (token()) route();
  });
  if (token()) showApp(route); else showLogin("");
});
