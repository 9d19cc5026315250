// Small hand-written SVG charts. Each chart carries a text summary (aria-label) for screen
// readers; colours come from CSS classes, so the page needs no inline styles.

import { h, s, fmtCount, fmtTime } from "./dom.js";

export const PROGRESS_PARTS = ["succeeded", "failed", "in_progress", "reverted", "pending"];
const PART_LABEL = {
  succeeded: "succeeded",
  failed: "failed",
  in_progress: "in progress",
  reverted: "reverted",
  pending: "pending",
};

/** A stacked bar of a rollout's device counts, with a legend that says the numbers. */
export function progressBar(counts, { label = "Progress" } = {}) {
  const total = PROGRESS_PARTS.reduce((sum, k) => sum + (counts[k] || 0), 0);
  const summary = PROGRESS_PARTS.map((k) => `${fmtCount(counts[k] || 0)} ${PART_LABEL[k]}`).join(", ");
  const svg = s("svg", {
    class: "progress-bar",
    viewBox: "0 0 100 6",
    preserveAspectRatio: "none",
    role: "img",
    "aria-label": `${label}: ${summary} of ${fmtCount(total)} devices`,
  });
  let x = 0;
  for (const part of PROGRESS_PARTS) {
    const n = counts[part] || 0;
    if (!n || !total) continue;
    const width = (100 * n) / total;
    svg.append(s("rect", { class: `part-${part}`, x, y: 0, width, height: 6 }));
    x += width;
  }
  if (!total) svg.append(s("rect", { class: "part-empty", x: 0, y: 0, width: 100, height: 6 }));
  const legend = h(
    "ul",
    { class: "legend" },
    PROGRESS_PARTS.filter((k) => counts[k]).map((k) =>
      h("li", { dataset: { part: k } }, h("span", { class: `swatch part-${k}`, "aria-hidden": "true" }), `${fmtCount(counts[k])} ${PART_LABEL[k]}`),
    ),
  );
  return h("div", { class: "progress" }, svg, legend);
}

/** Horizontal bars: items [{name, value, note, href}], scaled to the largest value. */
export function barList(items, { label, unit = "devices" } = {}) {
  const max = Math.max(1, ...items.map((i) => i.value));
  return h(
    "ul",
    { class: "bar-list", "aria-label": label },
    items.map((item) => {
      const bar = h("span", { class: "bar", "aria-hidden": "true" });
      bar.style.width = `${(100 * item.value) / max}%`;
      const name = item.href ? h("a", { href: item.href }, item.name) : item.name;
      return h(
        "li",
        {},
        h("span", { class: "bar-name" }, name),
        h("span", { class: "bar-track" }, bar),
        h("span", { class: "bar-value" }, `${fmtCount(item.value)} ${unit}`, item.note ? ` · ${item.note}` : ""),
      );
    }),
  );
}

function niceMax(value) {
  if (value <= 0) return 1;
  const power = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 2.5, 5, 10]) {
    if (value <= step * power) return step * power;
  }
  return 10 * power;
}

/**
 * A line chart over time: series [{name, values}] aligned with `times` (ISO strings); null
 * values leave gaps. `max` fixes the y range (e.g. 100 for percentages).
 */
export function lineChart({ title, times, series, unit, max }) {
  const width = 480;
  const height = 160;
  const pad = { left: 44, right: 8, top: 10, bottom: 22 };
  const values = series.flatMap((x) => x.values).filter((v) => v !== null && v !== undefined);
  const figure = h("figure", { class: "chart" }, h("figcaption", {}, title));
  if (!values.length) {
    figure.append(h("p", { class: "muted" }, "No telemetry yet."));
    return figure;
  }
  const top = max ?? niceMax(Math.max(...values));
  const n = Math.max(1, times.length - 1);
  const x = (i) => pad.left + ((width - pad.left - pad.right) * i) / n;
  const y = (v) => pad.top + (height - pad.top - pad.bottom) * (1 - Math.min(v, top) / top);
  const latest = series
    .map((sr) => {
      const last = [...sr.values].reverse().find((v) => v !== null && v !== undefined);
      return last === undefined ? null : `${sr.name} ${last.toFixed(1)} ${unit}`;
    })
    .filter(Boolean)
    .join(", ");
  const svg = s("svg", {
    viewBox: `0 0 ${width} ${height}`,
    role: "img",
    "aria-label": `${title}: latest ${latest}; highest ${Math.max(...values).toFixed(1)} ${unit} over ${times.length} reports`,
  });
  for (const fraction of [0, 0.5, 1]) {
    const gy = y(top * fraction);
    svg.append(
      s("line", { class: "gridline", x1: pad.left, x2: width - pad.right, y1: gy, y2: gy }),
      s("text", { class: "axis", x: pad.left - 4, y: gy + 4, "text-anchor": "end" }, `${+(top * fraction).toFixed(1)}`),
    );
  }
  svg.append(
    s("text", { class: "axis", x: pad.left, y: height - 4 }, fmtTime(times[0])),
    s("text", { class: "axis", x: width - pad.right, y: height - 4, "text-anchor": "end" }, fmtTime(times[times.length - 1])),
  );
  series.forEach((sr, index) => {
    let path = "";
    let pen = "M";
    sr.values.forEach((v, i) => {
      if (v === null || v === undefined) {
        pen = "M";
        return;
      }
      path += `${pen}${x(i).toFixed(1)},${y(v).toFixed(1)} `;
      pen = "L";
    });
    svg.append(s("path", { class: `line series-${index % 6}`, d: path.trim() }));
  });
  figure.append(svg);
  if (series.length > 1 || series[0].name) {
    figure.append(
      h(
        "ul",
        { class: "legend" },
        series.map((sr, index) => h("li", {}, h("span", { class: `swatch series-${index % 6}`, "aria-hidden": "true" }), sr.name)),
      ),
    );
  }
  figure.append(h("p", { class: "chart-unit muted" }, `unit: ${unit}`));
  return figure;
}
