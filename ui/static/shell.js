// The page's frame: sign-in, the current view, its live regions (each
// polls the node while the view is shown), the error banner and notices.

import { $, h, POLL_MS, Unauthorized, forgetToken, fill } from "./lib.js";

let generation = 0; // bumped on every route change: stale results are dropped
let stopFns = [];

// newView stops everything the previous view started.
export function newView() {
  generation++;
  for (const stop of stopFns) stop();
  stopFns = [];
  delete document.body.dataset.loaded;
  return generation;
}

export function current(gen) { return gen === generation; }
export function generationNow() { return generation; }

// live runs load() now and every ms after the previous run finished (so a
// slow node never gets overlapping requests from one tab), and hands each
// result to render while the view that started it is shown. It returns
// refresh(), which loads again at once (after a save).
export function live(load, render, ms = POLL_MS) {
  const gen = generation;
  let timer = null;
  let running = false;
  let again = false;
  const tick = async () => {
    clearTimeout(timer);
    if (running) { again = true; return; }
    running = true;
    try {
      const data = await load();
      if (gen !== generation) return;
      render(data);
      $("banner").hidden = true;
      $("updated").textContent = "Updated " + new Date().toLocaleTimeString();
      document.body.dataset.loaded = "true";
    } catch (err) {
      if (gen !== generation) return;
      if (err instanceof Unauthorized) {
        showLogin("The node refused the token (401). Sign in again.");
        return;
      }
      $("banner").textContent = "Cannot refresh: " + err.message + " (retrying)";
      $("banner").hidden = false;
    } finally {
      running = false;
    }
    if (gen !== generation) return;
    if (again) { again = false; tick(); return; }
    timer = setTimeout(tick, ms);
  };
  stopFns.push(() => clearTimeout(timer));
  tick();
  return tick;
}

// setView replaces the page's content; the new heading takes the focus so
// that keyboard and screen-reader users land on it.
export function setView(title, ...children) {
  document.title = title + " · appliance";
  const view = $("view");
  fill(view, ...children);
  const h1 = view.querySelector("h1");
  if (h1) {
    h1.tabIndex = -1;
    h1.focus({ preventScroll: true });
  }
}

let noticeSurvives = false;

// notice shows a message above the view; with survive, it stays through
// the next navigation (e.g. "deleted" on the list a delete goes back to).
export function notice(text, survive) {
  const el = $("notice");
  el.textContent = text;
  el.hidden = !text;
  noticeSurvives = !!survive;
}

// navigated clears the notice, unless it was meant for this navigation.
export function navigated() {
  if (noticeSurvives) noticeSurvives = false;
  else notice("");
}

// fail handles an error of a user action: a 401 signs out, anything else
// is returned as text for the form to show where it belongs.
export function failText(err) {
  if (err instanceof Unauthorized) {
    showLogin("The node refused the token (401). Sign in again.");
    return "";
  }
  return err.message + (err.field && !err.message.includes(err.field) ? ` (field ${err.field})` : "");
}

export function showLogin(message) {
  newView();
  forgetToken();
  for (const id of ["view", "nav", "logout", "banner", "notice"]) $(id).hidden = true;
  $("updated").textContent = "";
  $("login").hidden = false;
  $("login-message").textContent = message || "";
  $("login-token").value = "";
  $("login-token").focus();
}

export function showApp(route) {
  $("login").hidden = true;
  $("view").hidden = false;
  $("nav").hidden = false;
  $("logout").hidden = false;
  route();
}

// section is a titled part of a view.
export function section(title, attrs, ...children) {
  return h("section", Object.assign({ class: "panel" }, attrs), h("h2", {}, title), ...children);
}
