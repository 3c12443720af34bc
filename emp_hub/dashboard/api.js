// The hub's HTTP API, with the token the user signed in with (kept in sessionStorage).

const KEY = "emp.dashboard.token";

/** The hub's root, in front of /dashboard/ (empty unless behind a path prefix). */
export const ROOT = location.pathname.replace(/\/dashboard(\/.*)?$/, "");

export function token() {
  return sessionStorage.getItem(KEY);
}

export function setToken(value) {
  if (value) sessionStorage.setItem(KEY, value);
  else sessionStorage.removeItem(KEY);
}

function headers(extra = {}) {
  const t = token();
  return t ? { Authorization: `Bearer ${t}`, ...extra } : extra;
}

/** An answer other than 2xx: `status` and the hub's `detail`. */
export class ApiError extends Error {
  constructor(status, detail) {
    super(`${status}: ${detail}`);
    this.status = status;
    this.detail = detail;
  }
}

async function failure(response) {
  let detail = response.statusText || "request failed";
  try {
    const body = await response.json();
    if (body && body.detail !== undefined) {
      detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
    }
  } catch {
    // not JSON: keep the status text
  }
  return new ApiError(response.status, detail);
}

/** Call the API: the parsed JSON (or text) of a 2xx answer; throws ApiError otherwise. */
export async function api(path, { method = "GET", body, signal } = {}) {
  const init = { method, signal, headers: headers() };
  if (body !== undefined) {
    init.headers = headers({ "Content-Type": "application/json" });
    init.body = JSON.stringify(body);
  }
  const response = await fetch(ROOT + path, init);
  if (!response.ok) throw await failure(response);
  const type = response.headers.get("content-type") || "";
  return type.includes("json") ? response.json() : response.text();
}

/** Like api(), but null when the endpoint does not exist on this hub (404). */
export async function optional(path) {
  try {
    return await api(path);
  } catch (error) {
    if (error instanceof ApiError && error.status === 404) return null;
    throw error;
  }
}

/** Server-sent events in a text: [{id, event, data}], data parsed as JSON. */
export function parseEvents(text) {
  const events = [];
  for (const block of text.split("\n\n")) {
    const event = { id: null, event: "message", data: "" };
    let any = false;
    for (const line of block.split("\n")) {
      const at = line.indexOf(":");
      if (at <= 0) continue; // blank or a comment (keep-alive)
      const field = line.slice(0, at);
      const value = line.slice(at + 1).replace(/^ /, "");
      if (field === "data") event.data += value;
      else if (field === "id" || field === "event") event[field] = value;
      any = true;
    }
    if (any && event.data) {
      event.data = JSON.parse(event.data);
      events.push(event);
    }
  }
  return events;
}

/** Follow a server-sent event stream (fetch, so that the token goes in the header, which
 * EventSource cannot send); calls onEvent for each event until the stream ends or `signal`
 * aborts it. */
export async function follow(path, onEvent, signal) {
  const response = await fetch(ROOT + path, { headers: headers(), signal });
  if (!response.ok) throw await failure(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    const end = buffer.lastIndexOf("\n\n");
    if (end < 0) continue;
    parseEvents(buffer.slice(0, end + 2)).forEach(onEvent);
    buffer = buffer.slice(end + 2);
  }
}

/** A file that needs the token (an output), as a blob: URL for <img src> or a link. */
export async function blobURL(path) {
  const response = await fetch(ROOT + path, { headers: headers() });
  if (!response.ok) throw await failure(response);
  return URL.createObjectURL(await response.blob());
}
