// Releases: every published bundle with its formats, size, signature status (verified now
// against the fleet's trust root) and expiry. Operators get a link to roll one out.

import { badge, fmtBytes, fmtDuration, fmtTime, h, heading, tableWrap } from "../dom.js";

function expiry(r) {
  const when = fmtTime(r.expires);
  return r.expires_in_s <= 0
    ? h("span", {}, badge("expired"), ` ${when}`)
    : h("span", {}, `${when} (in ${fmtDuration(r.expires_in_s)})`);
}

export async function render(ctx) {
  ctx.view.append(heading("Releases"));
  const { releases } = await ctx.api.get("/api/v1/console/releases");
  if (!releases.length) {
    ctx.view.append(h("p", { class: "muted" }, "No release yet: publish one with 'edgefleet release publish BUNDLE'."));
    return;
  }
  const head = ["Model", "Version", "Counter", "Formats", "Size", "Hardware", "Signature", "Expires", "Published"];
  if (ctx.user.canOperate) head.push("Action");
  const rows = [...releases].reverse().map((r) =>
    h(
      "tr",
      { dataset: { release: `${r.name}@${r.version}` } },
      h("td", {}, r.name),
      h("td", {}, r.version),
      h("td", { class: "num" }, `${r.counter} (floor ${r.rollback_floor})`),
      h("td", {}, r.formats.join(", ")),
      h("td", { class: "num" }, fmtBytes(r.size)),
      h("td", {}, r.hardware_ids.length ? r.hardware_ids.join(", ") : "any"),
      h("td", {}, badge(r.signature.status), h("span", { class: "muted small" }, ` ${r.signature.detail}`)),
      h("td", {}, expiry(r)),
      h("td", {}, `${fmtTime(r.published_at)} by ${r.published_by}`),
      ctx.user.canOperate
        ? h("td", {}, h("a", { href: `#/rollouts/new?model=${encodeURIComponent(r.name)}&version=${encodeURIComponent(r.version)}` }, `Roll out ${r.version}`))
        : null,
    ),
  );
  ctx.view.append(tableWrap("Published releases, newest first", head, rows, { id: "release-table" }));
}
