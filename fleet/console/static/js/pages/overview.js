// Overview: devices by online state, hardware class, runtime, model version and install state,
// and the active rollouts with their progress. Live: topic "overview".

import { barList, progressBar } from "../charts.js";
import { badge, fmtCount, h, heading, replace, tableWrap } from "../dom.js";

function stat(label, value, href) {
  const number = h("span", { class: "stat-value" }, fmtCount(value));
  return h("div", { class: "stat" }, h("span", { class: "stat-label" }, label), href ? h("a", { href }, number) : number);
}

function section(title, ...content) {
  return h("section", { class: "card" }, h("h2", {}, title), ...content);
}

function activeRollouts(rollouts) {
  if (!rollouts.length) return h("p", { class: "muted" }, "No rollout is active.");
  return h(
    "ul",
    { class: "rollout-cards" },
    rollouts.map((r) =>
      h(
        "li",
        { dataset: { rollout: r.id } },
        h("p", {}, h("a", { href: `#/rollouts/${r.id}` }, `${r.model} ${r.version}`), " ", badge(r.state), ` stage ${r.stage + 1} of ${r.stages.length}`),
        progressBar(r.devices, { label: `Rollout ${r.id}` }),
      ),
    ),
  );
}

function versionsTable(models) {
  const rows = models.map((m) =>
    h(
      "tr",
      {},
      h("td", {}, m.model),
      h("td", {}, h("a", { href: `#/devices?model=${encodeURIComponent(m.model)}&version=${encodeURIComponent(m.version)}` }, m.version)),
      h("td", { class: "num" }, fmtCount(m.devices)),
      h("td", {}, Object.entries(m.states).map(([state, n]) => h("span", { class: "state-count" }, badge(state), ` ${fmtCount(n)}`))),
    ),
  );
  return tableWrap(null, ["Model", "Version", "Devices", "Install states"], rows, { id: "model-versions" });
}

function draw(content, data) {
  const d = data.devices;
  replace(
    content,
    h(
      "div",
      { class: "stats" },
      stat("Devices", d.total, "#/devices"),
      stat("Online", d.online, "#/devices?online=true"),
      stat("Offline", d.offline, "#/devices?online=false"),
      stat("Active rollouts", data.rollouts.length, "#/rollouts"),
    ),
    h(
      "div",
      { class: "grid" },
      section("Active rollouts", activeRollouts(data.rollouts)),
      section(
        "Hardware classes",
        barList(
          data.hardware_classes.map((c) => ({
            name: c.name,
            value: c.devices,
            note: `${fmtCount(c.online)} online`,
            href: `#/devices?hardware_class=${encodeURIComponent(c.name)}`,
          })),
          { label: "Devices by hardware class" },
        ),
      ),
      section("Runtimes", barList(data.runtimes.map((r) => ({ name: r.name, value: r.devices })), { label: "Model installs by runtime", unit: "installs" })),
      section(
        "Install states",
        barList(
          Object.entries(data.states).map(([state, n]) => ({ name: state, value: n, href: `#/devices?state=${state}` })),
          { label: "Model installs by state", unit: "installs" },
        ),
      ),
      section("Model versions", versionsTable(data.models)),
    ),
  );
  content.dataset.loaded = "true";
}

export async function render(ctx) {
  const content = h("div", { id: "overview", "aria-live": "off" });
  ctx.view.append(heading("Fleet overview"), content);
  draw(content, await ctx.api.get("/api/v1/console/overview"));
  performance.mark("overview-drawn"); // bench/console.py times the rendering from here
  ctx.watch("overview", { onUpdate: (data) => draw(content, data) });
}
