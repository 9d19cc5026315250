// A rollout: state, actions (operators only, each confirmed in a dialog), stages with progress
// bars, every gate decision with its figures, failures grouped by class x hardware x runtime,
// and the failed devices with what they reported. Live: topic "rollout/<id>".

import { progressBar } from "../charts.js";
import { confirmAction } from "../dialog.js";
import { badge, fmtDuration, fmtFigure, fmtTime, h, heading, problem, replace, tableWrap } from "../dom.js";

const ACTION_TEXT = {
  pause: { label: "Pause", title: "Pause this rollout?", message: "No new device is dispatched and no gate is decided until it is resumed. Devices already installing carry on." },
  resume: { label: "Resume", title: "Resume this rollout?", message: "Dispatching continues; a paused or halted gate is evaluated again at the next step." },
  promote: { label: "Promote", title: "Promote to the next stage?", message: "This records an operator pass for the current gate with the figures so far and starts the next stage now (or completes the rollout)." },
  "retry-failed": { label: "Retry failed", title: "Retry the failed devices?", message: "Every failed device that may be retried is dispatched again." },
  abort: { label: "Abort", title: "Abort this rollout?", message: "The rollout stops for good." },
};

function summary(r) {
  return h(
    "div",
    { class: "summary" },
    h("p", {}, "State: ", h("span", { id: "rollout-state", "aria-live": "polite" }, badge(r.state)), r.reverting ? h("span", { class: "notice" }, " reverting devices") : null),
    h(
      "dl",
      { class: "facts" },
      h("dt", {}, "Release"),
      h("dd", {}, `${r.model} ${r.version}`, r.previous_version ? ` (replaces ${r.previous_version})` : ""),
      h("dt", {}, "Target"),
      h("dd", {}, r.target || "every device"),
      h("dt", {}, "Created"),
      h("dd", {}, `${fmtTime(r.created_at)} by ${r.created_by}`),
      h("dt", {}, "Gates"),
      h("dd", {}, gatesText(r.plan, r.previous_version)),
    ),
    h("h2", {}, "All target devices"),
    h("div", { id: "overall-progress" }, progressBar(r.devices, { label: "All devices" })),
  );
}

function gatesText(plan, previousVersion) {
  const g = plan.gates;
  const pct = (v) => (v === null ? "off" : `${+(v * 100).toFixed(2)}%`);
  // The engine turns the latency check off when there is no earlier version to compare with.
  let p95 = `≤ ${g.max_p95_ratio}`;
  if (g.max_p95_ratio === null) p95 = "off";
  else if (!previousVersion) p95 = "off (no earlier version to compare with)";
  return [
    `install success ≥ ${pct(g.min_install_success)}`,
    `crash rate ≤ ${pct(g.max_crash_rate)}`,
    `error rate ≤ ${pct(g.max_error_rate)}`,
    `p95 ratio ${p95}`,
    `min sample ${g.min_sample}`,
    `at most ${plan.max_in_flight} in flight`,
    plan.revert_on_fail ? "revert on a failed gate" : "no automatic revert",
  ].join(" · ");
}

function stages(r) {
  return h(
    "ol",
    { class: "stages", id: "stages" },
    r.stages.map((s) =>
      h(
        "li",
        { dataset: { stage: s.index, state: s.state } },
        h("h3", {}, `Stage ${s.index + 1}: ${s.percent !== null ? `${s.percent}%` : `${s.count} devices`} `, badge(s.state), h("span", { class: "muted" }, ` · soak ${fmtDuration(s.soak_s)} · ${s.devices} devices`)),
        progressBar(s.counts, { label: `Stage ${s.index + 1}` }),
      ),
    ),
  );
}

// Figures nest (install -> by_hardware_class -> rpi5 -> rate): nested lists two levels deep,
// JSON text below that.
function figures(f, depth = 0) {
  const entries = Object.entries(f);
  if (!entries.length) return null;
  const value = (v) => (v && typeof v === "object" && !Array.isArray(v) && depth < 2 ? figures(v, depth + 1) || "—" : fmtFigure(v));
  return h("dl", { class: "figures" }, entries.map(([k, v]) => [h("dt", {}, k.replaceAll("_", " ")), h("dd", {}, value(v))]));
}

function decisions(r) {
  if (!r.decisions.length) return h("p", { class: "muted" }, "No gate decided yet.");
  return h(
    "ol",
    { class: "decisions", id: "decisions" },
    r.decisions.map((d) =>
      h(
        "li",
        {},
        h("p", {}, h("strong", {}, `Stage ${d.stage + 1} gate: `), badge(d.verdict), ` by ${d.by}`, d.at ? `, ${fmtTime(d.at)}` : ""),
        h("p", {}, d.reason),
        figures(d.figures),
      ),
    ),
  );
}

function failures(r) {
  if (!r.failures.length) return h("p", { class: "muted" }, "No failure.");
  return h(
    "div",
    {},
    tableWrap(
      "Failed devices by failure class, hardware class and runtime",
      ["Failure class", "Hardware class", "Runtime", "Devices"],
      r.failures.map((f) => h("tr", {}, h("td", {}, f.failure_class), h("td", {}, f.hardware_class), h("td", {}, f.runtime), h("td", { class: "num" }, f.devices))),
      { id: "failure-groups" },
    ),
    tableWrap(
      `Failed devices (${r.failed_devices.length} of ${r.failed_devices_total}, latest first)`,
      ["Device", "Class", "Hardware", "Runtime", "Attempts", "What it reported"],
      r.failed_devices.map((d) =>
        h(
          "tr",
          {},
          h("td", {}, h("a", { href: `#/devices/${encodeURIComponent(d.device_id)}` }, d.device_id)),
          h("td", {}, d.failure_class || "—"),
          h("td", {}, d.hardware_class || "unknown"),
          h("td", {}, d.runtime || "unknown"),
          h("td", { class: "num" }, d.attempts),
          h("td", {}, d.detail ? h("details", {}, h("summary", {}, d.detail.slice(0, 60)), h("pre", { class: "log" }, d.detail)) : "—"),
        ),
      ),
    ),
  );
}

async function act(ctx, r, action, status) {
  const text = ACTION_TEXT[action];
  const choices =
    action === "abort"
      ? [
          { value: "keep", label: "Keep devices on the version they run now" },
          { value: "revert", label: `Revert devices to ${r.previous_version || "their previous version"}` },
        ]
      : [];
  const answer = await confirmAction({
    title: text.title,
    message: `${r.model} ${r.version} (${r.id}). ${text.message}`,
    confirmLabel: text.label,
    choices,
    danger: action === "abort",
  });
  if (!answer.confirmed) {
    replace(status, `${text.label} cancelled.`);
    return;
  }
  try {
    const params = action === "abort" ? { revert: answer.choice === "revert" } : undefined;
    const after = await ctx.api.post(`/api/v1/rollouts/${encodeURIComponent(r.id)}/${action}`, undefined, params);
    replace(status, `${text.label}: done; the rollout is ${after.state}.`);
  } catch (err) {
    replace(status, `${text.label} refused: ${err.message}`);
  }
}

function actions(ctx, r, status) {
  if (!ctx.user.canOperate || !r.actions.length) return null;
  return h(
    "div",
    { class: "actions", role: "group", "aria-label": "Rollout actions" },
    r.actions.map((a) =>
      h("button", { type: "button", class: a === "abort" ? "danger" : "secondary", dataset: { action: a }, onclick: () => act(ctx, r, a, status) }, ACTION_TEXT[a].label),
    ),
  );
}

export async function render(ctx) {
  const id = ctx.params[0];
  ctx.view.append(heading(`Rollout ${id}`));
  const r0 = await ctx.api.get(`/api/v1/console/rollouts/${encodeURIComponent(id)}`);
  const status = h("p", { class: "action-status", role: "status", id: "action-status" });
  const bar = h("div", { id: "action-bar" });
  const content = h("div", { id: "rollout" });
  ctx.view.append(bar, status, content);
  let shownActions = null;

  function draw(r) {
    const key = ctx.user.canOperate ? r.actions.join(",") : "";
    if (key !== shownActions) {
      // Only redrawn when the allowed actions change, so keyboard focus on a button survives
      // live updates.
      const focused = document.activeElement?.dataset?.action;
      replace(bar, actions(ctx, r, status));
      shownActions = key;
      if (focused) bar.querySelector(`[data-action="${focused}"]`)?.focus();
    }
    replace(
      content,
      summary(r),
      h("section", { class: "card" }, h("h2", {}, "Stages"), stages(r)),
      h("section", { class: "card" }, h("h2", {}, "Gate decisions"), decisions(r)),
      h("section", { class: "card" }, h("h2", {}, "Failures"), failures(r)),
    );
    content.dataset.state = r.state;
  }

  draw(r0);
  ctx.watch(`rollout/${id}`, {
    onUpdate: draw,
    onProblem: (p) => {
      replace(bar);
      replace(content, problem(p.detail));
    },
  });
}
