// The console's entry point: log-in with an API token, the router (#/... addresses, one module
// per page in pages/), and what every page gets in its context.
//
// The token stays in this tab's sessionStorage (gone when the tab closes). The role from
// /api/v1/whoami decides which action buttons pages show; the API checks the role again on
// every action, so hiding a button is a convenience, not the protection.

import { ApiError, makeApi } from "./api.js";
import { h, heading, problem, replace } from "./dom.js";
import { watch } from "./live.js";
import * as audit from "./pages/audit.js";
import * as device from "./pages/device.js";
import * as devices from "./pages/devices.js";
import * as newRollout from "./pages/new-rollout.js";
import * as overview from "./pages/overview.js";
import * as releases from "./pages/releases.js";
import * as rollout from "./pages/rollout.js";
import * as rollouts from "./pages/rollouts.js";

const TOKEN_KEY = "edgefleet.console.token";
const ROUTES = [
  { path: /^\/?$/, nav: "overview", page: overview },
  { path: /^\/devices$/, nav: "devices", page: devices },
  { path: /^\/devices\/([^/]+)$/, nav: "devices", page: device },
  { path: /^\/releases$/, nav: "releases", page: releases },
  { path: /^\/rollouts$/, nav: "rollouts", page: rollouts },
  { path: /^\/rollouts\/new$/, nav: "rollouts", page: newRollout },
  { path: /^\/rollouts\/([^/]+)$/, nav: "rollouts", page: rollout },
  { path: /^\/audit$/, nav: "audit", page: audit },
];

const main = document.getElementById("main");
const liveState = document.getElementById("live-state");
let user = null;
let cleanups = [];

const api = makeApi(
  () => sessionStorage.getItem(TOKEN_KEY) || "",
  (detail) => {
    if (user) logOut(`Logged out: ${detail}.`);
  },
);

function logOut(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  user = null;
  runCleanups();
  document.getElementById("nav").hidden = true;
  document.getElementById("who").hidden = true;
  showLogin(message);
}

function runCleanups() {
  for (const fn of cleanups) fn();
  cleanups = [];
}

// -- log-in ----------------------------------------------------------------------------------

function showLogin(message = "") {
  const input = h("input", {
    id: "token",
    name: "token",
    type: "password",
    autocomplete: "off",
    required: true,
    "aria-describedby": "token-help",
  });
  const error = h("p", { class: "error", role: "alert", id: "login-error" }, message);
  const form = h(
    "form",
    { class: "login", id: "login-form" },
    h("label", { for: "token" }, "API token"),
    input,
    h(
      "p",
      { id: "token-help", class: "muted" },
      "A token of the fleet service (role viewer, operator or admin). The first admin token is in ",
      h("code", {}, "<data dir>/admin-token"),
      "; an admin creates more with ",
      h("code", {}, "POST /api/v1/tokens"),
      ".",
    ),
    h("button", { type: "submit", class: "primary" }, "Log in"),
    error,
  );
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, input.value.trim());
    try {
      await start();
    } catch (err) {
      sessionStorage.removeItem(TOKEN_KEY);
      replace(error, err instanceof ApiError && err.status === 401 ? `Log-in refused: ${err.message}.` : err.message);
      input.focus();
    }
  });
  replace(main, h("section", { class: "login-page" }, heading("Log in to the edgefleet console"), form));
  input.focus();
}

async function start() {
  const who = await api.get("/api/v1/whoami");
  user = { ...who, canOperate: who.role === "operator" || who.role === "admin" };
  replace(document.getElementById("who-name"), `${user.name} (${user.role})`);
  document.getElementById("nav").hidden = false;
  document.getElementById("who").hidden = false;
  document.body.dataset.role = user.role;
  await route();
}

// -- routing ---------------------------------------------------------------------------------

function parseHash() {
  const raw = decodeURI(location.hash.replace(/^#/, "")) || "/";
  const [path, queryText = ""] = raw.split("?");
  return { path, query: new URLSearchParams(queryText) };
}

function markNav(nav) {
  for (const link of document.querySelectorAll("#nav a")) {
    if (link.dataset.nav === nav) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
}

function setLive(state) {
  replace(liveState, state === "live" ? "● live" : state === "reconnecting" ? "reconnecting…" : "");
  liveState.dataset.state = state;
}

async function route() {
  if (!user) return;
  runCleanups();
  setLive("");
  const { path, query } = parseHash();
  const match = ROUTES.map((r) => ({ r, m: path.match(r.path) })).find((x) => x.m);
  const view = h("div", { class: "view" });
  replace(main, view);
  if (!match) {
    markNav(null);
    replace(view, heading("Not found"), problem(`There is no page #${path}.`));
    return;
  }
  markNav(match.r.nav);
  const ctx = {
    view,
    api,
    user,
    query,
    params: match.m.slice(1).map(decodeURIComponent),
    navigate: (hash) => {
      location.hash = hash;
    },
    onCleanup: (fn) => cleanups.push(fn),
    watch: (topic, handlers) => {
      const stop = watch(api, topic, { ...handlers, onState: setLive });
      cleanups.push(stop);
      return stop;
    },
  };
  view.setAttribute("aria-busy", "true");
  try {
    await match.r.page.render(ctx);
  } catch (err) {
    if (!(err instanceof ApiError)) console.error(err);
    if (user) view.append(problem(err.message));
  } finally {
    view.removeAttribute("aria-busy");
  }
  const title = view.querySelector("h1");
  document.title = title ? `${title.textContent} · edgefleet` : "edgefleet console";
  if (title && document.activeElement === document.body) title.focus({ preventScroll: true });
}

// -- start -----------------------------------------------------------------------------------

window.addEventListener("hashchange", () => {
  route().then(() => {
    const title = main.querySelector("h1");
    if (title) title.focus({ preventScroll: true });
  });
});
document.getElementById("logout").addEventListener("click", () => logOut("Logged out."));
document.getElementById("skip-link").addEventListener("click", (e) => {
  e.preventDefault();
  (main.querySelector("h1") || main).focus();
});

if (sessionStorage.getItem(TOKEN_KEY)) {
  start().catch((err) => logOut(err.message));
} else {
  showLogin();
}
