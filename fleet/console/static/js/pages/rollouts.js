// Rollouts: newest first, with state, stage and progress. Live: topic "rollouts".

import { progressBar } from "../charts.js";
import { badge, fmtTime, h, heading, replace, tableWrap } from "../dom.js";

function draw(content, data) {
  if (!data.rollouts.length) {
    replace(content, h("p", { class: "muted" }, "No rollout yet."));
    return;
  }
  const rows = data.rollouts.map((r) =>
    h(
      "tr",
      { dataset: { rollout: r.id } },
      h("td", {}, h("a", { href: `#/rollouts/${r.id}` }, r.id)),
      h("td", {}, `${r.model} ${r.version}`),
      h("td", {}, badge(r.state)),
      h("td", {}, `${r.stage + 1} of ${r.stages.length}`),
      h("td", { class: "wide" }, progressBar(r.devices, { label: `Rollout ${r.id}` })),
      h("td", {}, `${fmtTime(r.created_at)} by ${r.created_by}`),
    ),
  );
  replace(content, tableWrap("Rollouts, newest first", ["Rollout", "Release", "State", "Stage", "Progress", "Created"], rows, { id: "rollout-table" }));
}

export async function render(ctx) {
  ctx.view.append(
    heading("Rollouts"),
    ctx.user.canOperate ? h("p", {}, h("a", { href: "#/rollouts/new", class: "button primary", id: "new-rollout" }, "New rollout")) : null,
  );
  const content = h("div", {});
  ctx.view.append(content);
  draw(content, await ctx.api.get("/api/v1/console/rollouts"));
  ctx.watch("rollouts", { onUpdate: (data) => draw(content, data) });
}
