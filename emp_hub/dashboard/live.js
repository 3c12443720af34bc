// Live updates: the monitor WebSocket (admin and monitor tokens) or polling (client
// tokens), coalesced so that a burst of messages means one repaint per interval.

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
    this.counts = { messages: 0, flushes: 0 };
  }

  /** One message from the hub (or a poll tick). */
  note(message) {
    const c = this.changes;
    this.counts.messages += 1;
    c.any = true;
    const type = message.type;
    if (message.job_id) c.jobs.add(message.job_id);
    if (type === "stats_broadcast") c.stats = message;
    if (type === "worker_status" || type === "worker_state") c.workers = true;
    if (type === "alert") c.alerts = true;
    if (type === "poll") c.poll = true;
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

/** The monitor WebSocket, reconnected after a drop until stop(); reports its state. */
export class MonitorSocket {
  constructor(coalescer, onState) {
    this.coalescer = coalescer;
    this.onState = onState;
    this.stopped = false;
    this.id = `dashboard-${Math.random().toString(36).slice(2, 10)}`;
    this.open();
  }

  open() {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const url = `${scheme}//${location.host}${ROOT}/ws/monitor/${this.id}?token=${encodeURIComponent(token() || "")}`;
    this.ws = new WebSocket(url);
    this.ws.onopen = () => this.onState("live");
    this.ws.onmessage = (e) => {
      try {
        this.coalescer.note(JSON.parse(e.data));
      } catch {
        // not JSON: ignore
      }
    };
    this.ws.onclose = () => {
      if (this.stopped) return;
      this.onState("reconnecting");
      setTimeout(() => this.stopped || this.open(), 2000);
    };
  }

  stop() {
    this.stopped = true;
    this.ws.close();
  }
}

/** For tokens the monitor socket refuses: a tick every `ms`, as if something changed. */
export class Poller {
  constructor(coalescer, onState, ms = 3000) {
    this.timer = setInterval(() => coalescer.note({ type: "poll" }), ms);
    onState("polling");
  }

  stop() {
    clearInterval(this.timer);
  }
}
