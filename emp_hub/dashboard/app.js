// The dashboard: sign-in, the hash router, live updates and the alert banner.

import { ApiError, api, optional, setToken, token } from "./api.js";
import { h } from "./dom.js";
import { Coalescer, Feed, Poller } from "./live.js";
import * as pages from "./pages.js";

const OPS = ["admin", "monitor"];
const ALL = ["admin", "monitor", "client"];

/** Route name -> [page, nav label or null, roles that see it]. */
const ROUTES = {
  overview: [pages.overview, "Overview", OPS],
  queues: [pages.queues, "Queues", OPS],
  workers: [pages.workers, "Workers", OPS],
  jobs: [pages.jobs, "Jobs", ALL],
  job: [pages.job, null, ALL],
  dead: [pages.dead, "Dead letter", ALL],
  alerts: [pages.alerts, "Alerts", OPS],
};

const main = document.getElementById("main");
const messageBox = document.getElementById("message");
const state = { me: null, page: null, feed: null, coalescer: null, lastRefresh: 0, busy: false, again: null };

/** For tests and benchmarks: how many live messages came and how many repaints they made. */
window.empDashboard = { counts: () => state.coalescer?.counts, repaints: 0 };

function say(text, kind) {
  messageBox.textContent = text;
  messageBox.className = `message ${kind}`;
  messageBox.hidden = !text;
}

function showError(error) {
  if (error instanceof ApiError && error.status === 401 && token()) {
    signOut(`Signed out: ${error.detail}`);
    return;
  }
  say(error instanceof ApiError ? `Error ${error.status}: ${error.detail}` : String(error.message || error), "error");
}

function parseHash() {
  const [path, query = ""] = location.hash.replace(/^#\/?/, "").split("?");
  const [name, ...rest] = path.split("/");
  if (name === "jobs" && rest.length) return { name: "job", id: decodeURIComponent(rest.join("/")), params: new URLSearchParams(query) };
  return { name: name || "", id: null, params: new URLSearchParams(query) };
}

function home() {
  return OPS.includes(state.me.role) ? "overview" : "jobs";
}

// -- sign-in -------------------------------------------------------------------------------

function signInForm(reason) {
  const input = h("input", { type: "password", name: "token", placeholder: "emp_...", autocomplete: "off", required: true });
  const form = h(
    "form",
    { class: "sign-in", id: "sign-in" },
    h("h1", {}, "Sign in"),
    h("p", {}, "A token of this hub: an admin acts, a monitor sees everything read-only, a client sees its jobs."),
    input,
    h("button", { type: "submit" }, "Sign in"),
  );
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    setToken(input.value.trim());
    await start();
  });
  stopFeed();
  document.getElementById("nav").replaceChildren();
  document.getElementById("who").textContent = "";
  document.getElementById("sign-out").hidden = true;
  document.getElementById("alert-banner").hidden = true;
  main.replaceChildren(form);
  say(reason || "", "error");
  input.focus();
}

function signOut(reason) {
  setToken(null);
  state.me = null;
  signInForm(reason);
}

async function start() {
  try {
    state.me = await api("/api/me");
  } catch (error) {
    const given = token();
    setToken(null);
    if (!(error instanceof ApiError)) signInForm(String(error));
    else signInForm(given ? `Refused: ${error.detail}` : "");
    return;
  }
  if (!ALL.includes(state.me.role)) {
    signOut(`A ${state.me.role} token cannot use the dashboard.`);
    return;
  }
  say("", "");
  const me = state.me;
  document.getElementById("who").textContent = `${me.name} (${me.role}${me.customer ? `, ${me.customer}` : ""})`;
  document.getElementById("sign-out").hidden = false;
  document.getElementById("nav").replaceChildren(
    ...Object.entries(ROUTES)
      .filter(([, [, label, roles]]) => label && roles.includes(me.role))
      .map(([name, [, label]]) => h("a", { href: `#/${name}`, dataset: { route: name } }, label)),
  );
  startFeed();
  await show();
}

// -- live ----------------------------------------------------------------------------------

function liveState(text) {
  const el = document.getElementById("live-state");
  el.textContent = text;
  el.dataset.state = text;
}

function startFeed() {
  stopFeed();
  state.coalescer = new Coalescer(onChanges);
  state.feed = OPS.includes(state.me.role) ? new Feed(state.coalescer, liveState) : new Poller(state.coalescer, liveState);
  if (OPS.includes(state.me.role)) refreshAlerts();
}

function stopFeed() {
  state.feed?.stop();
  state.coalescer?.stop();
  state.feed = state.coalescer = null;
}

function onChanges(changes) {
  if (changes.alerts || changes.stats) refreshAlerts(changes.alerts);
  const page = state.page;
  if (!page || !page.wants(changes)) return;
  const wait = state.lastRefresh + page.minMs - performance.now();
  if (state.busy || wait > 0) {
    // Once the refresh under way (or the page's minimum interval) is over.
    clearTimeout(state.again);
    state.again = setTimeout(() => onChanges({ ...changes, any: true, jobs: new Set(["*"]), workers: true, poll: true, alerts: false }), Math.max(wait, 100));
    return;
  }
  refresh(page);
}

async function refresh(page) {
  state.busy = true;
  state.lastRefresh = performance.now();
  try {
    await page.refresh();
    window.empDashboard.repaints += 1;
  } catch (error) {
    if (state.page === page) showError(error);
  } finally {
    state.busy = false;
  }
}

// Alerts: a banner of the firing ones, read every 15 s at most (and at once when an
// `alert` message comes); nothing at all on a hub without the endpoint.
let alertsAt = 0;
let alertsMissing = false;

async function refreshAlerts(now = false) {
  if (alertsMissing || (!now && performance.now() - alertsAt < 15000)) return;
  alertsAt = performance.now();
  const banner = document.getElementById("alert-banner");
  try {
    const data = await optional("/api/alerts");
    if (data === null) {
      alertsMissing = true;
      return;
    }
    const firing = data.firing || [];
    banner.hidden = !firing.length;
    banner.replaceChildren(
      h("a", { href: "#/alerts" }, `${firing.length} alert(s) firing: `),
      firing.map((a) => `${a.rule} (${a.subject}): ${a.message}`).join("; "),
    );
  } catch {
    // a banner is no reason for an error message
  }
}

// -- router --------------------------------------------------------------------------------

async function show() {
  if (!state.me) return;
  const { name, id, params } = parseHash();
  const route = ROUTES[name];
  if (!route || !route[2].includes(state.me.role)) {
    location.hash = `#/${home()}`;
    return;
  }
  state.page?.stop?.();
  clearTimeout(state.again);
  say("", "");
  document.querySelectorAll("#nav a").forEach((a) => a.classList.toggle("current", a.dataset.route === (name === "job" ? "jobs" : name)));
  main.replaceChildren();
  delete main.dataset.ready;
  const me = state.me;
  const ctx = {
    me,
    id,
    params,
    canActJobs: me.role === "admin" || me.role === "client",
    canActWorkers: me.role === "admin",
    ready: () => {
      if (state.page === page) main.dataset.ready = name;
    },
    error: showError,
    info: (text) => say(text, "info"),
    navigate: (hash) => (location.hash = hash),
    note: (message) => state.coalescer?.note(message),
  };
  const page = route[0](ctx);
  state.page = page;
  state.lastRefresh = performance.now();
  state.busy = true; // live changes wait for the first load
  try {
    await page.mount(main);
  } catch (error) {
    if (state.page === page) showError(error);
  } finally {
    if (state.page === page) state.busy = false;
  }
}

document.getElementById("sign-out").addEventListener("click", () => signOut(""));
window.addEventListener("hashchange", show);
start();
