// The audit log: hash-chained entries, newest first, with filters and older pages. Live while
// it shows the newest entries: topic "audit?<the filters>".

import { query } from "../api.js";
import { fmtTime, h, heading, replace, tableWrap } from "../dom.js";

const PAGE = 100;
const ACTIONS = ["", "rollout.", "gate.", "release.", "device.", "token."];

function details(d) {
  const entries = Object.entries(d || {});
  if (!entries.length) return "—";
  return h(
    "dl",
    { class: "figures" },
    entries.map(([k, v]) => [h("dt", {}, k), h("dd", {}, typeof v === "object" && v !== null ? JSON.stringify(v) : String(v))]),
  );
}

function rows(entries) {
  return entries.map((e) =>
    h(
      "tr",
      { dataset: { action: e.action } },
      h("td", {}, h("time", { datetime: e.time }, fmtTime(e.time))),
      h("td", {}, e.actor),
      h("td", {}, h("code", {}, e.action)),
      h("td", {}, e.target.startsWith("r-") ? h("a", { href: `#/rollouts/${encodeURIComponent(e.target)}` }, e.target) : e.target),
      h("td", {}, details(e.details)),
    ),
  );
}

function filterForm(ctx) {
  const q = ctx.query;
  const form = h(
    "form",
    { class: "filters", role: "search", "aria-label": "Filter the audit log" },
    h(
      "div",
      { class: "field" },
      h("label", { for: "action" }, "Action"),
      h("select", { id: "action", name: "action" }, ACTIONS.map((a) => h("option", { value: a, selected: a === (q.get("action") || "") }, a ? `${a}*` : "any"))),
    ),
    h("div", { class: "field" }, h("label", { for: "actor" }, "Actor"), h("input", { id: "actor", name: "actor", type: "text", value: q.get("actor") || "" })),
    h("div", { class: "field" }, h("label", { for: "target" }, "Target contains"), h("input", { id: "target", name: "target", type: "search", value: q.get("target") || "" })),
    h("div", { class: "field buttons" }, h("button", { type: "submit", class: "primary" }, "Apply"), h("a", { href: "#/audit", class: "button secondary" }, "Clear")),
  );
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    const next = new URLSearchParams();
    for (const [k, v] of new FormData(form)) if (v) next.set(k, v);
    ctx.navigate(`#/audit?${next}`);
  });
  return form;
}

export async function render(ctx) {
  ctx.view.append(heading("Audit log"));
  const filters = { action: ctx.query.get("action"), actor: ctx.query.get("actor"), target: ctx.query.get("target") };
  const chain = h("p", { id: "chain", role: "status" });
  const body = h("tbody", {});
  const more = h("button", { type: "button", class: "secondary", id: "older" }, "Older entries");
  ctx.view.append(
    filterForm(ctx),
    chain,
    h(
      "div",
      { class: "table-wrap" },
      h(
        "table",
        { id: "audit-table" },
        h("caption", {}, "Audit entries, newest first"),
        h("thead", {}, h("tr", {}, ["Time", "Actor", "Action", "Target", "Details"].map((c) => h("th", { scope: "col" }, c)))),
        body,
      ),
    ),
    more,
  );

  let oldest = null;
  async function load(before) {
    const page = await ctx.api.get("/api/v1/console/audit", { ...filters, before, limit: PAGE });
    body.append(...rows(page.entries));
    if (page.entries.length) oldest = page.entries[page.entries.length - 1].id;
    more.hidden = page.entries.length < PAGE;
    return page;
  }

  more.addEventListener("click", () => load(oldest));
  const [, check] = await Promise.all([load(undefined), ctx.api.get("/api/v1/audit", { limit: 1 })]);
  replace(chain, check.chain_ok ? "Hash chain verified: no entry was changed, removed or reordered." : "The hash chain is broken: an entry was changed, removed or reordered.");
  chain.className = check.chain_ok ? "ok" : "error";
  ctx.watch(`audit${query({ ...filters, limit: PAGE })}`, {
    onUpdate: (page) => {
      if (body.querySelectorAll("tr").length > PAGE) return; // the reader paged back: leave it be
      replace(body, rows(page.entries));
      if (page.entries.length) oldest = page.entries[page.entries.length - 1].id;
      more.hidden = page.entries.length < PAGE;
    },
  });
}
