// Live updates: the hub's live feed (admin and monitor tokens; it says what changed, at
// most twice a second) or polling (client tokens), coalesced so that a burst means one
// repaint per interval.

import { ROOT, token } from "./api.js";

/** Milliseconds between two repaints, at most one per interval whatever comes. */
export const REPAINT_MS = 500;

function fresh() {
  return { jobs: new Set(), workers: false, stats: null, alerts: false, poll: false, any: false };
}

/** Collects what changed; calls onFlush(changes) at most once per REPAINT_MS. */
export class Coalescer {
  constructor(onFlush, interval = REPAINT_MS) {
    this.onFlush = onFlush;
    this.interval = interval;
    this.changes = fresh();
    this.timer = null;
    this.last = 0;
    // messages: all notes (ticks, polls, changes); changes: the feed's `changes` events;
    // events: the job events they counted.
    this.counts = { messages: 0, changes: 0, events: 0, flushes: 0 };
  }

  /** One message from the hub (or a poll tick). */
  note(message) {
    const c = this.changes;
    this.counts.messages += 1;
    c.any = true;
    const type = message.type;
    if (message.job_id) c.jobs.add(message.job_id);
    if (type === "stats_broadcast" || type === "tick") c.stats = message;
    if (type === "worker_status" || type === "worker_state") c.workers = true;
    if (type === "alert") c.alerts = true;
    if (type === "poll") c.poll = true;
    this.schedule();
  }

  /** One `changes` event of the feed: what changed since the one before. */
  noteChanges(data) {
    const c = this.changes;
    this.counts.messages += 1;
    this.counts.changes += 1;
    this.counts.events += data.jobs || 0;
    c.any = true;
    for (const id of data.job_ids || []) c.jobs.add(id);
    if (data.more_job_ids) c.jobs.add("*");
    if (data.workers || (data.worker_states || []).length) c.workers = true;
    if ((data.alerts || []).length) c.alerts = true;
    this.schedule();
  }

  schedule() {
    if (this.timer !== null) return;
    const wait = Math.max(0, this.last + this.interval - performance.now());
    this.timer = setTimeout(() => this.flush(), wait);
  }

  flush() {
    this.timer = null;
    this.last = performance.now();
    const changes = this.changes;
    this.changes = fresh();
    this.counts.flushes += 1;
    this.onFlush(changes);
  }

  stop() {
    clearTimeout(this.timer);
    this.timer = null;
  }
}

/** Milliseconds between two ticks of the feed: pages re-read then even if nothing said
 * so (a worker's last heartbeat), as the monitor socket's stats used to make them. */
export const TICK_MS = 5000;

/** The hub's live feed (GET /api/dashboard/feed: server-sent events, read with fetch so
 * that the token goes in the Authorization header), reconnected after a drop with a
 * growing wait until stop(); reports its state. */
export class Feed {
  constructor(coalescer, onState) {
    this.coalescer = coalescer;
    this.onState = onState;
    this.stopped = false;
    this.backoff = 1000; // ms before the next try: doubles per failed try, up to 30 s
    this.controller = null;
    this.ticker = setInterval(() => coalescer.note({ type: "tick" }), TICK_MS);
    this.open();
  }

  async open() {
    this.controller = new AbortController();
    try {
      const t = token();
      const response = await fetch(`${ROOT}/api/dashboard/feed`, {
        headers: t ? { Authorization: `Bearer ${t}` } : {},
        signal: this.controller.signal,
        cache: "no-store",
      });
      if (!response.ok || !response.body) throw new Error(`feed: ${response.status}`);
      await this.read(response.body.getReader());
    } catch {
      // dropped, refused or stopped: below
    }
    if (this.stopped) return;
    this.onState("reconnecting");
    setTimeout(() => this.stopped || this.open(), this.backoff);
    this.backoff = Math.min(this.backoff * 2, 30000);
  }

  async read(reader) {
    const decoder = new TextDecoder();
    let buffer = "";
    let live = false;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      if (!live) {
        // The hub's first words (a comment) come once it follows the changes.
        live = true;
        this.onState("live");
        this.backoff = 1000;
      }
      buffer += decoder.decode(value, { stream: true }).replaceAll("\r\n", "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        this.dispatch(buffer.slice(0, end));
        buffer = buffer.slice(end + 2);
      }
    }
  }

  /** One event of the stream (comments, the keep-alives, are skipped). */
  dispatch(block) {
    let name = "message";
    const data = [];
    for (const line of block.split("\n")) {
      if (line.startsWith("event:")) name = line.slice(6).trim();
      else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
    }
    if (name !== "changes" || data.length === 0) return;
    try {
      this.coalescer.noteChanges(JSON.parse(data.join("\n")));
    } catch {
      // not JSON: ignore
    }
  }

  stop() {
    this.stopped = true;
    clearInterval(this.ticker);
    this.controller?.abort();
  }
}

/** For tokens the feed refuses (clients): a tick every `ms`, as if something changed. */
export class Poller {
  constructor(coalescer, onState, ms = 3000) {
    this.timer = setInterval(() => coalescer.note({ type: "poll" }), ms);
    onState("polling");
  }

  stop() {
    clearInterval(this.timer);
  }
}
