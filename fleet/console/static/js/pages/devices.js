// Devices: filters (search, online, hardware class, model version, install state) and one page
// of 50 devices at a time. The filters live in the address (#/devices?online=false&...).
// Live: topic "devices?<the same filters and page>".

import { query } from "../api.js";
import { badge, fmtAgo, fmtCount, h, heading, replace, tableWrap } from "../dom.js";

const PAGE = 50;
const FILTERS = ["search", "online", "hardware_class", "model", "version", "state"];

function select(id, label, options, value) {
  return h(
    "div",
    { class: "field" },
    h("label", { for: id }, label),
    h(
      "select",
      { id, name: id },
      options.map(([v, text]) => h("option", { value: v, selected: v === value }, text)),
    ),
  );
}

function filterForm(ctx, facets) {
  const q = ctx.query;
  const versionValue = q.get("model") && q.get("version") ? `${q.get("model")}@${q.get("version")}` : "";
  const form = h(
    "form",
    { class: "filters", role: "search", "aria-label": "Filter devices" },
    h(
      "div",
      { class: "field" },
      h("label", { for: "search" }, "Search id or group"),
      h("input", { id: "search", name: "search", type: "search", value: q.get("search") || "" }),
    ),
    select("online", "Connection", [["", "any"], ["true", "online"], ["false", "offline"]], q.get("online") || ""),
    select(
      "hardware_class",
      "Hardware class",
      [["", "any"], ...facets.hardware_classes.map((c) => [c.name, c.name])],
      q.get("hardware_class") || "",
    ),
    select(
      "model_version",
      "Model version",
      [["", "any"], ...facets.models.map((m) => [`${m.model}@${m.version}`, `${m.model} ${m.version}`])],
      versionValue,
    ),
    select(
      "state",
      "Install state",
      [["", "any"], ["active", "active"], ["probation", "probation"], ["failed", "failed"], ["none", "none"]],
      q.get("state") || "",
    ),
    h("div", { class: "field buttons" }, h("button", { type: "submit", class: "primary" }, "Apply"), h("a", { href: "#/devices", class: "button secondary" }, "Clear")),
  );
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    const data = new FormData(form);
    const next = new URLSearchParams();
    for (const name of ["search", "online", "hardware_class", "state"]) {
      if (data.get(name)) next.set(name, data.get(name));
    }
    const mv = data.get("model_version");
    if (mv) {
      const at = mv.indexOf("@");
      next.set("model", mv.slice(0, at));
      next.set("version", mv.slice(at + 1));
    }
    ctx.navigate(`#/devices?${next}`);
  });
  return form;
}

function deviceRow(d) {
  return h(
    "tr",
    {},
    h("td", {}, h("a", { href: `#/devices/${encodeURIComponent(d.id)}` }, d.id)),
    h("td", {}, badge(d.online ? "online" : "offline")),
    h("td", {}, d.hardware_class || "unknown"),
    h("td", {}, d.group || "—"),
    h("td", {}, d.models.length ? d.models.map((m) => h("span", { class: "model" }, `${m.model} ${m.version || "none"} `, badge(m.state))) : "—"),
    h("td", {}, fmtAgo(d.last_seen)),
  );
}

function pager(ctx, page) {
  const from = page.total ? page.offset + 1 : 0;
  const to = page.offset + page.devices.length;
  const link = (offset, text, rel) => {
    const q = new URLSearchParams(ctx.query);
    q.set("offset", offset);
    return h("a", { href: `#/devices?${q}`, class: "button secondary", rel }, text);
  };
  return h(
    "nav",
    { class: "pager", "aria-label": "Pages" },
    h("p", { id: "device-count" }, `Devices ${fmtCount(from)}–${fmtCount(to)} of ${fmtCount(page.total)}`),
    page.offset > 0 ? link(Math.max(0, page.offset - PAGE), "Previous page", "prev") : null,
    to < page.total ? link(page.offset + PAGE, "Next page", "next") : null,
  );
}

export async function render(ctx) {
  ctx.view.append(heading("Devices"));
  const params = { limit: PAGE, offset: ctx.query.get("offset") || 0 };
  for (const name of FILTERS) params[name] = ctx.query.get(name);
  const [facets, page] = await Promise.all([
    ctx.api.get("/api/v1/console/overview"),
    ctx.api.get("/api/v1/console/devices", params),
  ]);
  const list = h("div", { id: "device-list" }, listing(ctx, page));
  ctx.view.append(filterForm(ctx, facets), list);
  ctx.watch(`devices${query(params)}`, { onUpdate: (next) => replace(list, listing(ctx, next)) });
}

function listing(ctx, page) {
  return [
    pager(ctx, page),
    page.devices.length
      ? tableWrap("Devices matching the filters", ["Device", "Connection", "Hardware class", "Group", "Models", "Last seen"], page.devices.map(deviceRow), { id: "device-table" })
      : h("p", { class: "muted" }, "No device matches these filters."),
  ];
}
