// New rollout: a form over a release, its fields filled from the fleet's rollout defaults
// (GET /api/v1/rollout-defaults). Every change asks the server for a dry-run preview
// (POST /api/v1/console/rollouts/preview): stage membership per hardware class and the
// worst-case blast radius. "Start" sends the previewed plan itself, so the rollout gets exactly
// the previewed cohorts; it is enabled only while the preview matches the form.

import { confirmAction } from "../dialog.js";
import { fmtCount, h, heading, problem, replace, tableWrap } from "../dom.js";

const DEBOUNCE_MS = 300;

function field(id, label, input, help) {
  input.id = id;
  input.name = id;
  if (help) input.setAttribute("aria-describedby", `${id}-help`);
  return h("div", { class: "field" }, h("label", { for: id }, label), input, help ? h("p", { class: "help muted", id: `${id}-help` }, help) : null);
}

function numberInput(value, { min, max, step = "any", required = true } = {}) {
  return h("input", { type: "number", value, min, max, step, required, inputmode: "decimal" });
}

function optionalNumber(value) {
  return value === "" ? null : Number(value);
}

/** A share (0..1) as the form's percent; "" for null (the check is off). */
function percent(share) {
  return share === null ? "" : +(share * 100).toFixed(4);
}

/** The body of POST /api/v1/rollouts (and of the preview) from the form's fields. */
function planFrom(form) {
  const v = (name) => form.elements[name].value.trim();
  const [model, version] = JSON.parse(v("release") || "[null,null]");
  return {
    model,
    version,
    target: v("target"),
    stages: v("stages").split(/[\s,]+/).filter(Boolean).map(Number),
    soak_s: Number(v("soak_s")),
    max_failure_rate: Number(v("max_failure_pct")) / 100,
    max_in_flight: Number(v("max_in_flight")),
    revert_on_fail: form.elements.revert_on_fail.checked,
    device_timeout_s: Number(v("device_timeout_s")),
    gates: {
      min_sample: Number(v("min_sample")),
      max_crash_rate: optionalNumber(v("max_crash_pct")) === null ? null : Number(v("max_crash_pct")) / 100,
      max_error_rate: optionalNumber(v("max_error_pct")) === null ? null : Number(v("max_error_pct")) / 100,
      max_p95_ratio: optionalNumber(v("max_p95_ratio")),
    },
  };
}

function previewView(p) {
  const stageHeads = p.stages.map((pct, i) => `Stage ${i + 1} (${pct}%)`);
  const rows = Object.entries(p.by_hardware_class).map(([cls, counts]) =>
    h("tr", {}, h("th", { scope: "row" }, cls), counts.map((n) => h("td", { class: "num" }, fmtCount(n)))),
  );
  rows.push(h("tr", { class: "total" }, h("th", { scope: "row" }, "All classes"), p.stage_sizes.map((n) => h("td", { class: "num" }, fmtCount(n)))));
  return h(
    "div",
    { id: "preview-result" },
    p.conflict ? problem(p.conflict) : null,
    h(
      "div",
      { class: "stats" },
      h("div", { class: "stat" }, h("span", { class: "stat-label" }, "Target devices"), h("span", { class: "stat-value" }, fmtCount(p.target_devices))),
      h("div", { class: "stat blast" }, h("span", { class: "stat-label" }, "Worst-case blast radius"), h("span", { class: "stat-value", id: "blast-radius" }, fmtCount(p.blast_radius)), h("span", { class: "muted small" }, "devices that may run it before the first gate")),
      h("div", { class: "stat" }, h("span", { class: "stat-label" }, "Replaces"), h("span", { class: "stat-value small-value" }, p.previous_version || "nothing")),
    ),
    tableWrap("Devices per stage and hardware class", ["Hardware class", ...stageHeads], rows, { id: "preview-table" }),
    h("p", { class: "muted" }, `${fmtCount(p.already_running)} already run it · ${fmtCount(p.skipped)} skipped (pinned or held) · ${fmtCount(p.offline)} offline now`),
    p.warnings.length ? h("ul", { class: "warnings", "aria-label": "Warnings" }, p.warnings.map((w) => h("li", {}, w))) : null,
  );
}

export async function render(ctx) {
  ctx.view.append(heading("New rollout"));
  if (!ctx.user.canOperate) {
    ctx.view.append(problem(`Starting a rollout needs the operator role; this token has ${ctx.user.role}.`));
    return;
  }
  const [{ releases }, facets, defaults] = await Promise.all([
    ctx.api.get("/api/v1/console/releases"),
    ctx.api.get("/api/v1/console/overview"),
    ctx.api.get("/api/v1/rollout-defaults"),
  ]);
  const gates = defaults.gates;
  if (!releases.length) {
    ctx.view.append(problem("No release is published yet: publish one first."));
    return;
  }
  const wanted = JSON.stringify([ctx.query.get("model"), ctx.query.get("version")]);
  const releaseSelect = h(
    "select",
    { required: true },
    [...releases].reverse().map((r) => {
      const value = JSON.stringify([r.name, r.version]);
      return h("option", { value, selected: value === wanted }, `${r.name} ${r.version}${r.signature.status === "verified" ? "" : ` (${r.signature.status})`}`);
    }),
  );
  const targets = h("datalist", { id: "target-options" }, facets.hardware_classes.map((c) => h("option", { value: `hardware_class=${c.name}` })));
  const targetInput = h("input", { type: "text", list: "target-options", placeholder: "every device", autocomplete: "off" });
  const revert = h("input", { type: "checkbox", id: "revert_on_fail", name: "revert_on_fail", checked: defaults.revert_on_fail });
  const start = h("button", { type: "submit", class: "primary", id: "start-rollout", disabled: true }, "Start rollout");
  const previewBox = h("section", { class: "card", id: "preview", "aria-live": "polite", "aria-labelledby": "preview-title" }, h("h2", { id: "preview-title" }, "Preview"), h("p", { class: "muted" }, "Computing…"));
  const message = h("p", { class: "error", role: "alert", id: "form-error" });
  const form = h(
    "form",
    { class: "rollout-form", novalidate: true },
    h(
      "fieldset",
      {},
      h("legend", {}, "What and where"),
      field("release", "Release", releaseSelect),
      field("target", "Target", targetInput, "Empty for every device, or hardware_class=…, group=…, device=… joined by commas."),
      field("stages", "Stages (cumulative %)", h("input", { type: "text", value: defaults.stages.join(", "), required: true }), "The share of the target reached by the end of each stage; the last is 100."),
    ),
    h(
      "fieldset",
      {},
      h("legend", {}, "Pace"),
      field("soak_s", "Soak per stage (s)", numberInput(defaults.soak_s, { min: 0 })),
      field("max_in_flight", "Devices in flight at most", numberInput(defaults.max_in_flight, { min: 1, step: 1 })),
      field("device_timeout_s", "Device time-out (s)", numberInput(defaults.device_timeout_s, { min: 1 })),
    ),
    h(
      "fieldset",
      {},
      h("legend", {}, "Gates"),
      field("max_failure_pct", "Install failures at most (%)", numberInput(percent(defaults.max_failure_rate), { min: 0, max: 100 })),
      field("max_crash_pct", "Crash rate at most (%)", numberInput(percent(gates.max_crash_rate), { min: 0, max: 100, required: false }), "Empty turns the check off."),
      field("max_error_pct", "Inference error rate at most (%)", numberInput(percent(gates.max_error_rate), { min: 0, max: 100, required: false }), "Empty turns the check off."),
      field("max_p95_ratio", "p95 latency ratio at most", numberInput(gates.max_p95_ratio ?? "", { min: 0, required: false }), "New version over the one it replaces (off for a model's first release); empty turns the check off."),
      field("min_sample", "Devices a check needs", numberInput(gates.min_sample, { min: 1, step: 1 })),
      h("div", { class: "field checkbox" }, revert, h("label", { for: "revert_on_fail" }, "Revert the devices when a gate fails")),
    ),
    targets,
    h("div", { class: "form-buttons" }, start),
    message,
  );
  ctx.view.append(h("div", { class: "form-layout" }, form, previewBox));

  let previewed = null; // {key, preview}
  let timer = null;
  let asked = 0;

  async function refresh() {
    const plan = planFrom(form);
    const key = JSON.stringify(plan);
    const mine = ++asked;
    start.disabled = true;
    try {
      const p = await ctx.api.post("/api/v1/console/rollouts/preview", plan);
      if (mine !== asked) return;
      previewed = { key, preview: p };
      replace(previewBox, h("h2", { id: "preview-title" }, `Preview: ${p.model} ${p.version}`), previewView(p));
      replace(message);
      start.disabled = Boolean(p.conflict);
    } catch (err) {
      if (mine !== asked) return;
      previewed = null;
      replace(previewBox, h("h2", { id: "preview-title" }, "Preview"), problem(err.message));
    }
  }

  function later() {
    clearTimeout(timer);
    if (previewed && previewed.key === JSON.stringify(planFrom(form))) return; // nothing changed
    start.disabled = true;
    timer = setTimeout(refresh, DEBOUNCE_MS);
  }

  form.addEventListener("input", later);
  ctx.onCleanup(() => clearTimeout(timer));
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const plan = planFrom(form);
    if (!previewed || previewed.key !== JSON.stringify(plan)) {
      replace(message, "The preview is not up to date yet; wait for it, then start.");
      return;
    }
    const p = previewed.preview;
    const answer = await confirmAction({
      title: `Start ${p.model} ${p.version}?`,
      message: `${fmtCount(p.target_devices)} target devices in ${p.stages.length} stages; up to ${fmtCount(p.blast_radius)} devices may run it before the first gate decides.`,
      confirmLabel: "Start rollout",
    });
    if (!answer.confirmed) return;
    try {
      const created = await ctx.api.post("/api/v1/rollouts", { model: p.model, version: p.version, target: p.target, plan: p.plan });
      ctx.navigate(`#/rollouts/${created.id}`);
    } catch (err) {
      replace(message, `The rollout was not started: ${err.message}`);
    }
  });
  await refresh();
}
