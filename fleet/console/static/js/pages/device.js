// A device: what it runs, the detail of its latest failure (the log tail the agent sent),
// telemetry charts (latency, errors, CPU, memory) and its deployment timeline. Live: topic
// "device/<id>".

import { lineChart } from "../charts.js";
import { badge, fmtAgo, fmtTime, h, heading, problem, replace, tableWrap } from "../dom.js";

function facts(d) {
  const row = (term, value) => [h("dt", {}, term), h("dd", {}, value)];
  return h(
    "dl",
    { class: "facts" },
    row("Connection", badge(d.online ? "online" : "offline")),
    row("Hardware class", d.hardware_class || "unknown"),
    row("Group", d.group || "—"),
    row("Last seen", `${fmtAgo(d.last_seen)} (${fmtTime(d.last_seen)})`),
    row("Enrolled", fmtTime(d.enrolled_at)),
  );
}

function models(d) {
  if (!d.models.length) return h("p", { class: "muted" }, "The device has reported no model.");
  return tableWrap(
    "Models the device reports running",
    ["Model", "Version", "Previous", "Runtime", "State", "Reported"],
    d.models.map((m) =>
      h("tr", {}, h("td", {}, m.model), h("td", {}, m.version || "none"), h("td", {}, m.previous_version || "—"), h("td", {}, m.runtime || "—"), h("td", {}, badge(m.state)), h("td", {}, fmtTime(m.updated_at))),
    ),
  );
}

function lastFailure(d) {
  const f = d.last_failure;
  if (!f) return h("p", { class: "muted" }, "No failure reported.");
  return h(
    "div",
    { id: "last-failure" },
    h("p", {}, badge("failed", f.phase), ` ${f.model} ${f.version}, ${f.failure_class || "unclassified"}, ${fmtTime(f.time)}`),
    h("pre", { class: "log", tabindex: "0", "aria-label": "Failure detail" }, f.detail),
  );
}

function charts(t) {
  const perModel = (data) => Object.entries(data).map(([name, values]) => ({ name, values }));
  return h(
    "div",
    { class: "charts" },
    lineChart({ title: "Inference latency p95", times: t.times, series: perModel(t.latency_p95_ms), unit: "ms" }),
    lineChart({ title: "Inference errors per report", times: t.times, series: perModel(t.errors), unit: "errors" }),
    lineChart({ title: "CPU", times: t.times, series: [{ name: "", values: t.cpu_percent }], unit: "%", max: 100 }),
    lineChart({ title: "Memory in use", times: t.times, series: [{ name: "", values: t.memory_percent }], unit: "%", max: 100 }),
  );
}

function timeline(d) {
  if (!d.events.length) return h("p", { class: "muted" }, "No deployment event yet.");
  return h(
    "ol",
    { class: "timeline", "aria-label": "Deployment events, newest first" },
    d.events.map((e) =>
      h(
        "li",
        { dataset: { phase: e.phase } },
        h("time", { datetime: e.time }, fmtTime(e.time)),
        " ",
        badge(e.phase),
        ` ${e.model} ${e.version}`,
        e.failure_class ? ` — ${e.failure_class}` : "",
        e.detail ? h("details", {}, h("summary", {}, "Detail"), h("pre", { class: "log" }, e.detail)) : null,
      ),
    ),
  );
}

function draw(content, d) {
  replace(
    content,
    facts(d),
    h("section", { class: "card" }, h("h2", {}, "Models"), models(d)),
    h("section", { class: "card" }, h("h2", {}, "Latest failure"), lastFailure(d)),
    h("section", { class: "card" }, h("h2", {}, "Telemetry"), charts(d.telemetry)),
    h("section", { class: "card" }, h("h2", {}, "Deployment timeline"), timeline(d)),
  );
  content.dataset.loaded = "true";
}

export async function render(ctx) {
  const id = ctx.params[0];
  const content = h("div", { id: "device" });
  ctx.view.append(heading(`Device ${id}`), content);
  draw(content, await ctx.api.get(`/api/v1/console/devices/${encodeURIComponent(id)}`));
  ctx.watch(`device/${id}`, {
    onUpdate: (d) => draw(content, d),
    onProblem: (p) => replace(content, problem(p.detail)),
  });
}
