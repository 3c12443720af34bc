// Small DOM helpers: elements, tables, formats and the charts (inline SVG).

/** An element: h("a", {href: "#/jobs", class: "x", onclick: fn}, "text", child...). */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else if (name === "dataset") Object.assign(el.dataset, value);
    else if (value === true) el.setAttribute(name, "");
    else el.setAttribute(name, String(value));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

/** A table: columns [{title, cell(row) -> node|text, class}], one row per item. */
export function table(columns, rows, { empty = "Nothing here.", rowAttrs } = {}) {
  if (!rows.length) return h("p", { class: "empty" }, empty);
  return h(
    "table",
    {},
    h("thead", {}, h("tr", {}, columns.map((c) => h("th", { class: c.class }, c.title)))),
    h(
      "tbody",
      {},
      rows.map((row) =>
        h(
          "tr",
          rowAttrs ? rowAttrs(row) : {},
          columns.map((c) => h("td", { class: c.class }, c.cell(row))),
        ),
      ),
    ),
  );
}

/** A section with a heading. */
export function section(title, ...children) {
  return h("section", {}, h("h2", {}, title), ...children);
}

/** A figure: a big number and its label. */
export function stat(label, value, name) {
  return h("div", { class: "stat", dataset: { stat: name || label } }, h("b", {}, value), label);
}

export function when(ts) {
  if (ts === null || ts === undefined) return "";
  return new Date(ts * 1000).toLocaleString();
}

export function ago(ts, now = Date.now() / 1000) {
  if (ts === null || ts === undefined) return "";
  return `${duration(Math.max(0, now - ts))} ago`;
}

export function duration(s) {
  if (s === null || s === undefined) return "";
  if (s < 1) return `${Math.round(s * 1000)} ms`;
  if (s < 120) return `${s.toFixed(s < 10 ? 1 : 0)} s`;
  if (s < 7200) return `${Math.round(s / 60)} min`;
  if (s < 172800) return `${(s / 3600).toFixed(1)} h`;
  return `${(s / 86400).toFixed(1)} d`;
}

export function status(value) {
  return h("span", { class: `status status-${value}` }, value);
}

export function progress(value) {
  const pct = Math.max(0, Math.min(100, Number(value) || 0));
  return h(
    "span",
    { class: "progress", title: `${pct.toFixed(0)}%` },
    h("span", { style: `width:${pct}%` }),
  );
}

/** A value as JSON, folded when large. */
export function folded(title, value, openUnder = 2000) {
  const text = JSON.stringify(value, null, 2) ?? "null";
  const size = new Blob([text]).size;
  return h(
    "details",
    { open: size < openUnder, class: "json" },
    h("summary", {}, `${title} (${size.toLocaleString()} bytes)`),
    h("pre", {}, text),
  );
}

const SVG = "http://www.w3.org/2000/svg";

function s(tag, attrs = {}, text) {
  const el = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) el.setAttribute(name, String(value));
  if (text !== undefined) el.textContent = text;
  return el;
}

/** A line chart of series [{name, color, values: [number|null]}] over the times `ts`
 * (Unix seconds), as inline SVG with a legend. */
export function chart(ts, series, { unit = "", height = 160 } = {}) {
  const width = 600;
  const pad = { left: 48, right: 8, top: 8, bottom: 20 };
  const inner = { w: width - pad.left - pad.right, h: height - pad.top - pad.bottom };
  const all = series.flatMap((x) => x.values).filter((v) => v !== null && v !== undefined);
  const top = Math.max(...all, 0) || 1;
  const x = (i) => pad.left + (ts.length > 1 ? (i * inner.w) / (ts.length - 1) : 0);
  const y = (v) => pad.top + inner.h - (v / top) * inner.h;
  const svg = s("svg", { viewBox: `0 0 ${width} ${height}`, class: "chart", role: "img" });
  svg.append(
    s("line", { x1: pad.left, y1: y(0), x2: width - pad.right, y2: y(0), class: "axis" }),
    s("text", { x: pad.left - 4, y: pad.top + 8, "text-anchor": "end" }, fmtAxis(top, unit)),
    s("text", { x: pad.left - 4, y: y(0), "text-anchor": "end" }, "0"),
  );
  if (ts.length) {
    const label = (t) => new Date(t * 1000).toLocaleTimeString([], { timeStyle: "short" });
    svg.append(
      s("text", { x: pad.left, y: height - 4 }, label(ts[0])),
      s("text", { x: width - pad.right, y: height - 4, "text-anchor": "end" }, label(ts.at(-1))),
    );
  }
  for (const line of series) {
    let d = "";
    line.values.forEach((v, i) => {
      if (v === null || v === undefined) return;
      d += `${d && line.values[i - 1] != null ? "L" : "M"}${x(i).toFixed(1)},${y(v).toFixed(1)}`;
    });
    if (d) svg.append(s("path", { d, stroke: line.color, class: "series" }));
    line.values.forEach((v, i) => {
      const alone = line.values[i - 1] == null && line.values[i + 1] == null;
      if (v !== null && v !== undefined && alone) {
        svg.append(s("circle", { cx: x(i), cy: y(v), r: 2.5, fill: line.color }));
      }
    });
  }
  const legend = h(
    "div",
    { class: "legend" },
    series.map((line) => h("span", {}, h("i", { style: `background:${line.color}` }), line.name)),
  );
  return h("figure", {}, svg, legend);
}

function fmtAxis(value, unit) {
  if (unit === "s") return duration(value);
  return `${Number.isInteger(value) ? value : value.toFixed(2)}${unit}`;
}
