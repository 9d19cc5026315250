// Releases: every published bundle with its formats, size, signature status (verified now
// against the fleet's trust root) and expiry. Operators get a form to upload a signed bundle
// (POST /api/v1/releases, the file's bytes as the body) and a link to roll a release out.

import { badge, fmtBytes, fmtDuration, fmtTime, h, heading, problem, replace, tableWrap } from "../dom.js";

function expiry(r) {
  const when = fmtTime(r.expires);
  return r.expires_in_s <= 0
    ? h("span", {}, badge("expired"), ` ${when}`)
    : h("span", {}, `${when} (in ${fmtDuration(r.expires_in_s)})`);
}

function releaseTable(ctx, releases, justPublished) {
  if (!releases.length) {
    return h("p", { class: "muted" }, "No release yet: upload a signed bundle, or publish one with 'edgefleet release publish BUNDLE'.");
  }
  const head = ["Model", "Version", "Counter", "Formats", "Size", "Hardware", "Signature", "Expires", "Published"];
  if (ctx.user.canOperate) head.push("Action");
  const rows = [...releases].reverse().map((r) => {
    const id = `${r.name}@${r.version}`;
    return h(
      "tr",
      { dataset: { release: id }, class: id === justPublished ? "just-published" : null },
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
    );
  });
  return tableWrap("Published releases, newest first", head, rows, { id: "release-table" });
}

/** The upload form; `onPublished(release)` runs after the service accepted a bundle. */
function uploadForm(ctx, onPublished) {
  const input = h("input", { id: "bundle-file", name: "bundle", type: "file", accept: ".bundle", required: true, "aria-describedby": "bundle-help" });
  const button = h("button", { type: "submit", class: "primary" }, "Upload and publish");
  const outcome = h("div", { id: "upload-outcome" });
  const form = h(
    "form",
    { class: "card upload", id: "upload-form", "aria-labelledby": "upload-title" },
    h("h2", { id: "upload-title" }, "Upload a signed bundle"),
    h(
      "div",
      { class: "field" },
      h("label", { for: "bundle-file" }, "Signed bundle file"),
      input,
      h(
        "p",
        { class: "help muted", id: "bundle-help" },
        "A bundle made with 'edgefleet bundle build' and signed with 'edgefleet bundle sign'. The service checks its signatures against the fleet's trust root and refuses anything unsigned, tampered with or expired.",
      ),
    ),
    h("div", { class: "field buttons" }, button),
    outcome,
  );
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const file = input.files[0];
    if (!file) return;
    button.disabled = true;
    replace(outcome, h("p", { role: "status" }, `Uploading ${file.name} (${fmtBytes(file.size)})…`));
    try {
      const release = await ctx.api.upload("/api/v1/releases", file);
      form.reset();
      replace(outcome, h("p", { class: "ok", role: "status" }, `Published ${release.name} ${release.version} from ${file.name}.`));
      await onPublished(release);
    } catch (err) {
      replace(outcome, problem(`${file.name} was not published: ${err.message}`));
      input.focus();
    } finally {
      button.disabled = false;
    }
  });
  return form;
}

export async function render(ctx) {
  ctx.view.append(heading("Releases"));
  const list = h("div", { id: "release-list" });
  async function load(justPublished) {
    const { releases } = await ctx.api.get("/api/v1/console/releases");
    replace(list, releaseTable(ctx, releases, justPublished));
  }
  if (ctx.user.canOperate) {
    ctx.view.append(uploadForm(ctx, (release) => load(`${release.name}@${release.version}`)));
  }
  ctx.view.append(list);
  await load(null);
}
