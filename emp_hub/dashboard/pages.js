// The pages. Each is a function (ctx) -> {mount(main), refresh(), wants(changes), minMs}:
// mount builds the page and loads its data; refresh reloads the data (the app calls it
// when live changes concern the page, at most once per minMs); ctx.ready() marks the
// page as rendered with its data (data-ready on <main>, for tests and benchmarks).

import { api, blobURL, follow, optional, parseEvents } from "./api.js";
import {
  ago,
  chart,
  duration,
  folded,
  h,
  progress,
  section,
  stat,
  status,
  table,
  when,
} from "./dom.js";

const STATES = ["pending", "active", "delayed", "completed", "failed", "cancelled"];
const PAGE_SIZE = 50;
const WORKER_SLICE = 100;

function link(href, text) {
  return h("a", { href }, text);
}

function jobLink(id) {
  return link(`#/jobs/${encodeURIComponent(id)}`, id);
}

/** A button that runs `action` and reports its failure in the message area. */
function button(ctx, label, name, action, attrs = {}) {
  const el = h("button", { type: "button", dataset: { action: name }, ...attrs }, label);
  el.addEventListener("click", async () => {
    el.disabled = true;
    try {
      await action();
    } catch (error) {
      ctx.error(error);
    } finally {
      el.disabled = false;
    }
  });
  return el;
}

// -- overview ----------------------------------------------------------------------------

export function overview(ctx) {
  const body = h("div");
  return {
    minMs: 1000,
    wants: (c) => c.any,
    async mount(main) {
      main.append(h("h1", {}, "Overview"), body);
      await this.refresh();
    },
    async refresh() {
      const data = await api("/api/overview");
      const buckets = data.series.buckets;
      const ts = buckets.map((b) => b.t);
      body.replaceChildren(
        h(
          "div",
          { class: "stats" },
          STATES.map((s) => stat(s, (data.jobs[s] ?? 0).toLocaleString(), s)),
          stat("live workers", data.workers.live, "live-workers"),
          stat("busy workers", data.workers.busy, "busy-workers"),
        ),
        h(
          "div",
          { class: "charts" },
          section(
            `Throughput (jobs per ${data.series.bucket_s / 60} min)`,
            chart(ts, [
              { name: "completed", color: "#2a9d48", values: buckets.map((b) => b.completed) },
              { name: "failed", color: "#d1453b", values: buckets.map((b) => b.failed) },
            ]),
          ),
          section(
            "Submit to start (mean)",
            chart(ts, [{ name: "mean", color: "#3a6ee8", values: buckets.map((b) => b.start_mean_s) }], {
              unit: "s",
            }),
          ),
        ),
        section(
          "Unschedulable",
          table(
            [
              { title: "Service", cell: (u) => u.service },
              { title: "Pending", cell: (u) => u.pending, class: "num" },
              { title: "Why", cell: (u) => u.reason || "" },
              { title: "Class", cell: (u) => h("code", {}, u.requirement_class) },
            ],
            data.unschedulable,
            { empty: "Every pending job has a live worker that can run it." },
          ),
        ),
      );
      ctx.ready();
    },
  };
}

// -- queues ------------------------------------------------------------------------------

/** A job's requirements beyond its service, leaving out the unset ones. */
function requirementsText(req) {
  const parts = [];
  for (const [key, value] of Object.entries(req || {})) {
    if (key === "service" || value === null || value === 0 || value === "none") continue;
    if (Array.isArray(value) && !value.length) continue;
    if (typeof value === "object" && !Array.isArray(value) && !Object.keys(value).length) continue;
    parts.push(`${key}=${Array.isArray(value) ? value.join(",") : typeof value === "object" ? JSON.stringify(value) : value}`);
  }
  return parts.join(" ") || "none";
}

export function queues(ctx) {
  const body = h("div");
  return {
    minMs: 2000,
    wants: (c) => c.any,
    async mount(main) {
      main.append(h("h1", {}, "Queues"), body);
      await this.refresh();
    },
    async refresh() {
      const q = await api("/api/queues");
      const rows = q.classes.flatMap((c) =>
        Object.entries(c.by_priority)
          .sort((a, b) => Number(b[0]) - Number(a[0]))
          .map(([priority, count]) => ({ c, priority, count })),
      );
      body.replaceChildren(
        h(
          "div",
          { class: "stats" },
          stat("pending", q.pending),
          stat("active", q.active),
          stat("delayed", q.delayed),
          stat("dead", q.dead),
          stat("unschedulable", q.unschedulable_jobs),
          stat("live workers", q.live_workers),
        ),
        table(
          [
            { title: "Service", cell: (r) => r.c.requirements.service },
            { title: "Requirements", cell: (r) => requirementsText(r.c.requirements) },
            { title: "Priority", cell: (r) => r.priority, class: "num" },
            { title: "Pending", cell: (r) => r.count, class: "num" },
            {
              title: "Oldest waits",
              cell: (r) => duration((r.c.oldest_age_s_by_priority || {})[r.priority]),
              class: "num",
            },
            { title: "Workers", cell: (r) => r.c.matching_workers, class: "num" },
            { title: "", cell: (r) => (r.c.unschedulable ? status("unschedulable") : "") },
            { title: "Class", cell: (r) => h("code", {}, r.c.requirement_class.slice(0, 12)) },
          ],
          rows,
          { empty: "No pending jobs." },
        ),
      );
      ctx.ready();
    },
  };
}

// -- workers -----------------------------------------------------------------------------

function gpus(caps) {
  return (caps.gpus || []).map((g) => (g.memory_gb ? `${g.name} ${g.memory_gb} GB` : g.name)).join(", ");
}

function models(caps) {
  return Object.entries(caps.models || {})
    .map(([service, names]) => `${service}: ${[...names].join(", ")}`)
    .join("; ");
}

export function workers(ctx) {
  let all = [];
  let start = 0;
  const filter = h("input", { type: "search", placeholder: "Filter: id, service, model, state", class: "filter" });
  const body = h("div");
  const columns = [
    { title: "Worker", cell: (w) => h("code", {}, w.worker_id) },
    { title: "State", cell: (w) => (w.state ? status(w.state) : "") },
    { title: "Services", cell: (w) => (w.capabilities.services || []).join(", ") },
    { title: "Models", cell: (w) => models(w.capabilities) },
    { title: "GPUs", cell: (w) => gpus(w.capabilities) },
    { title: "Jobs", cell: (w) => (w.jobs || []).map((j) => [jobLink(j), " "]) },
    { title: "Last heartbeat", cell: (w) => ago(w.last_heartbeat) },
  ];
  const page = {
    minMs: 3000,
    wants: (c) => c.workers || c.stats !== null,
    async mount(main) {
      main.append(h("h1", {}, "Workers"), filter, body);
      await this.refresh();
    },
    async refresh() {
      const list = await api("/api/workers");
      all = list.map((w) => ({
        ...w,
        text: [w.worker_id, w.state || "", ...(w.capabilities.services || []), models(w.capabilities)]
          .join(" ")
          .toLowerCase(),
      }));
      paint();
      ctx.ready();
    },
  };
  if (ctx.canActWorkers) columns.push({ title: "", cell: (w) => workerActions(ctx, w, () => page.refresh()) });
  // Only a slice of the (filtered) workers is in the DOM: 5,000 workers stay fast.
  const paint = () => {
    const words = filter.value.toLowerCase().split(/\s+/).filter(Boolean);
    const shown = all.filter((w) => words.every((word) => w.text.includes(word)));
    start = Math.max(0, Math.min(start, shown.length - 1));
    start -= start % WORKER_SLICE;
    const slice = shown.slice(start, start + WORKER_SLICE);
    const move = (by) => () => {
      start += by;
      paint();
    };
    const pager = h(
      "div",
      { class: "pager" },
      h("button", { type: "button", disabled: start === 0, onclick: move(-WORKER_SLICE) }, "Previous"),
      ` ${shown.length ? start + 1 : 0}-${start + slice.length} of ${shown.length} (${all.length} live) `,
      h("button", { type: "button", disabled: start + WORKER_SLICE >= shown.length, onclick: move(WORKER_SLICE) }, "Next"),
    );
    const rows = table(columns, slice, { empty: "No live worker matches.", rowAttrs: (w) => ({ dataset: { worker: w.worker_id } }) });
    body.replaceChildren(pager, rows);
  };
  filter.addEventListener("input", () => {
    start = 0;
    paint();
  });
  return page;
}

function workerActions(ctx, w, after) {
  const act = (verb) => async () => {
    await api(`/api/workers/${encodeURIComponent(w.worker_id)}/${verb}`, { method: "POST" });
    ctx.info(`${verb}: ${w.worker_id}`);
    await after();
  };
  const state = w.state || "active";
  return h(
    "span",
    { class: "actions" },
    state === "active" ? button(ctx, "Drain", "drain", act("drain")) : button(ctx, "Resume", "resume", act("resume")),
    button(ctx, "Stop", "shutdown", act("shutdown"), { class: "danger" }),
  );
}

// -- jobs --------------------------------------------------------------------------------

function jobColumns(extra = []) {
  return [
    ...extra,
    { title: "Job", cell: (j) => jobLink(j.job_id) },
    { title: "Service", cell: (j) => j.job_type },
    { title: "Customer", cell: (j) => j.customer || "" },
    { title: "Status", cell: (j) => status(j.status) },
    { title: "Progress", cell: (j) => progress(j.progress) },
    { title: "Priority", cell: (j) => j.priority, class: "num" },
    { title: "Submitted", cell: (j) => when(j.created_at) },
    { title: "Worker", cell: (j) => j.worker_id || "" },
    { title: "Error", cell: (j) => j.error || "" },
  ];
}

/** A paginated job list: cursor pages, newest first. */
function pagedJobs(ctx, query, { columns, empty, onPage }) {
  const cursors = [null];
  const body = h("div");
  const load = async () => {
    const params = new URLSearchParams(query);
    params.set("limit", PAGE_SIZE);
    const cursor = cursors.at(-1);
    if (cursor !== null) params.set("cursor", cursor);
    const page = await api(`/api/jobs?${params}`);
    onPage?.(page.jobs);
    const pager = h(
      "div",
      { class: "pager" },
      h("button", { type: "button", disabled: cursors.length === 1, onclick: () => (cursors.pop(), load().catch(ctx.error)) }, "Newer"),
      ` page ${cursors.length} `,
      h(
        "button",
        { type: "button", disabled: page.next_cursor === null, onclick: () => (cursors.push(page.next_cursor), load().catch(ctx.error)) },
        "Older",
      ),
    );
    body.replaceChildren(table(columns, page.jobs, { empty, rowAttrs: (j) => ({ dataset: { job: j.job_id } }) }), pager);
    ctx.ready();
  };
  return { body, load };
}

export function jobs(ctx) {
  const q = ctx.params;
  const field = (name, attrs) => h("input", { name, value: q.get(name) || "", ...attrs });
  const form = h(
    "form",
    { class: "search" },
    field("id", { placeholder: "Job id" }),
    field("service", { placeholder: "Service" }),
    ctx.me.customer ? null : field("customer", { placeholder: "Customer" }),
    h(
      "select",
      { name: "status" },
      h("option", { value: "" }, "any status"),
      STATES.map((s) => h("option", { value: s, selected: q.get("status") === s }, s)),
    ),
    h("button", { type: "submit" }, "Search"),
  );
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    const data = new FormData(form);
    const id = (data.get("id") || "").trim();
    if (id) return ctx.navigate(`#/jobs/${encodeURIComponent(id)}`);
    const params = new URLSearchParams();
    for (const [k, v] of data) if (v && k !== "id") params.set(k, v);
    ctx.navigate(`#/jobs?${params}`);
  });
  const query = {};
  for (const name of ["status", "service", "customer"]) if (q.get(name)) query[name] = q.get(name);
  const list = pagedJobs(ctx, query, { columns: jobColumns(), empty: "No job matches." });
  return {
    minMs: 2000,
    wants: (c) => c.jobs.size > 0 || c.stats !== null || c.poll,
    async mount(main) {
      main.append(h("h1", {}, "Jobs"), form, list.body);
      await list.load();
    },
    refresh: list.load,
  };
}

export function dead(ctx) {
  const selected = new Set();
  const check = (j) =>
    h("input", {
      type: "checkbox",
      checked: selected.has(j.job_id),
      dataset: { select: j.job_id },
      onchange: (e) => (e.target.checked ? selected.add(j.job_id) : selected.delete(j.job_id)),
    });
  const extra = ctx.canActJobs ? [{ title: "", cell: check }] : [];
  const list = pagedJobs(ctx, { status: "failed" }, {
    columns: jobColumns(extra),
    empty: "No failed job.",
    onPage: (page) => {
      const ids = new Set(page.map((j) => j.job_id));
      for (const id of [...selected]) if (!ids.has(id)) selected.delete(id);
    },
  });
  const retry = async () => {
    if (!selected.size) return ctx.info("Select the jobs to retry first.");
    const { results } = await api("/api/jobs/retry", { method: "POST", body: { job_ids: [...selected] } });
    const failed = results.filter((r) => !r.ok);
    selected.clear();
    if (failed.length) ctx.error(new Error(failed.map((r) => `${r.job_id}: ${r.detail}`).join("; ")));
    else ctx.info(`Retried ${results.length} job(s).`);
    await list.load();
  };
  const selectAll = () => {
    document.querySelectorAll("input[data-select]").forEach((box) => {
      box.checked = true;
      selected.add(box.dataset.select);
    });
  };
  return {
    minMs: 2000,
    wants: (c) => c.jobs.size > 0 || c.poll,
    async mount(main) {
      main.append(
        h("h1", {}, "Dead letter"),
        h("p", {}, "Jobs that failed with no attempt left."),
        ctx.canActJobs
          ? h(
              "div",
              { class: "actions" },
              h("button", { type: "button", onclick: selectAll }, "Select all"),
              button(ctx, "Retry selected", "retry-selected", retry),
            )
          : null,
        list.body,
      );
      await list.load();
    },
    refresh: list.load,
  };
}

// -- one job -----------------------------------------------------------------------------

function timeline(events) {
  return table(
    [
      { title: "When", cell: (e) => when(e.data.ts) },
      { title: "Event", cell: (e) => e.data.type },
      {
        title: "What",
        cell: (e) =>
          e.data.type === "progress"
            ? [progress(e.data.progress), ` ${Number(e.data.progress).toFixed(0)}% `, e.data.message || ""]
            : [e.data.status ? status(e.data.status) : "", " ", e.data.worker ? `on ${e.data.worker} ` : "", e.data.reason || e.data.error || e.data.message || ""],
      },
    ],
    events,
    { empty: "No event stored (they expire with the job's retention)." },
  );
}

async function outputPreview(ctx, ref) {
  if ((ref.content_type || "").startsWith("image/")) {
    const img = h("img", { class: "output", alt: ref.name, "data-output": ref.name });
    blobURL(ref.url).then((url) => (img.src = url)).catch(ctx.error);
    return h("figure", { class: "output" }, img, h("figcaption", {}, `${ref.name} (${ref.size} bytes)`));
  }
  const a = h("a", { href: "#", download: ref.name }, `${ref.name} (${ref.size} bytes, ${ref.content_type})`);
  a.addEventListener("click", async (e) => {
    if (a.href.startsWith("blob:")) return;
    e.preventDefault();
    try {
      a.href = await blobURL(ref.url);
      a.click();
    } catch (error) {
      ctx.error(error);
    }
  });
  return h("div", { class: "output" }, a);
}

export function job(ctx) {
  const id = ctx.id;
  const head = h("div");
  const body = h("div");
  const outputs = h("div", { class: "outputs" });
  let outputNames = "";
  let stream = null;
  const actions = (j) => {
    if (!ctx.canActJobs) return null;
    const out = [];
    if (!["completed", "failed", "cancelled"].includes(j.status)) {
      out.push(
        button(ctx, "Cancel", "cancel", async () => {
          await api(`/api/jobs/${encodeURIComponent(id)}/cancel`, { method: "POST", body: { reason: "cancelled from the dashboard" } });
          ctx.info(`Cancelled ${id}.`);
          await page.refresh();
        }, { class: "danger" }),
      );
    }
    if (["failed", "delayed"].includes(j.status)) {
      out.push(
        button(ctx, "Retry", "retry", async () => {
          await api(`/api/jobs/${encodeURIComponent(id)}/retry`, { method: "POST" });
          ctx.info(`Retried ${id}.`);
          await page.refresh();
        }),
      );
    }
    return h("div", { class: "actions" }, out);
  };
  const fields = (j) =>
    h(
      "dl",
      { class: "fields" },
      [
        ["Status", status(j.status)],
        ["Progress", [progress(j.progress), ` ${Number(j.progress).toFixed(0)}% `, j.message || ""]],
        ["Service", j.job_type],
        ["Customer", j.customer || ""],
        ["Priority", j.priority],
        ["Worker", j.worker_id || ""],
        ["Attempt", `${j.attempt} of ${j.max_attempts} (failures ${j.failures})`],
        ["Submitted", when(j.created_at)],
        ["Started", when(j.started_at)],
        ["Finished", when(j.finished_at)],
        ["Queue position", j.display_position ?? ""],
        ["Waiting because", j.unschedulable || ""],
        ["Error", j.error || ""],
        ["Requirements", requirementsText(j.requirements)],
      ].flatMap(([k, v]) => (v === "" ? [] : [h("dt", {}, k), h("dd", {}, v)])),
    );
  const page = {
    minMs: 500,
    wants: (c) => c.jobs.has(id) || c.jobs.has("*"),
    async mount(main) {
      main.append(h("h1", {}, "Job ", h("code", {}, id)), head, body, outputs);
      await this.refresh();
      if (ctx.me.role === "client" && !["completed", "failed", "cancelled"].includes(this.status)) {
        const abort = new AbortController();
        stream = abort;
        follow(`/api/jobs/${encodeURIComponent(id)}/events`, () => ctx.note({ type: "job_event", job_id: id }), abort.signal).catch(() => {});
      }
    },
    async refresh() {
      const path = `/api/jobs/${encodeURIComponent(id)}`;
      const [j, text] = await Promise.all([api(path), api(`${path}/events?follow=false`)]);
      this.status = j.status;
      head.replaceChildren(fields(j), actions(j));
      body.replaceChildren(
        section("Timeline", timeline(parseEvents(text))),
        section("Payload and result", folded("payload", j.payload), folded("result", j.result)),
      );
      const refs = (await optional(`${path}/outputs`)) || [];
      const names = refs.map((r) => r.name).join("/");
      if (names !== outputNames) {
        outputNames = names;
        outputs.replaceChildren(
          refs.length ? section("Outputs", ...(await Promise.all(refs.map((r) => outputPreview(ctx, r))))) : "",
        );
      }
      ctx.ready();
    },
    stop() {
      stream?.abort();
    },
  };
  return page;
}

// -- alerts ------------------------------------------------------------------------------

function alertTable(alerts, empty) {
  return table(
    [
      { title: "Rule", cell: (a) => a.rule },
      { title: "Subject", cell: (a) => a.subject },
      { title: "Message", cell: (a) => a.message },
      { title: "Since", cell: (a) => when(a.started_at) },
      { title: "Cleared", cell: (a) => when(a.cleared_at) },
      { title: "Details", cell: (a) => (a.details ? folded("details", a.details, 200) : "") },
    ],
    alerts,
    { empty },
  );
}

export function alerts(ctx) {
  const body = h("div");
  return {
    minMs: 2000,
    wants: (c) => c.alerts,
    async mount(main) {
      main.append(h("h1", {}, "Alerts"), body);
      await this.refresh();
    },
    async refresh() {
      const data = await optional("/api/alerts");
      if (data === null) {
        body.replaceChildren(h("p", { class: "empty" }, "This hub has no alerts endpoint."));
      } else {
        body.replaceChildren(
          section("Firing", alertTable(data.firing || [], "No alert is firing.")),
          section("Recent", alertTable(data.recent || [], "No recent alert.")),
          data.rules ? section("Rules (read-only)", folded("rules", data.rules, 5000)) : "",
        );
      }
      ctx.ready();
    },
  };
}
