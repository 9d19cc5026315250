"""Benchmark: the pure rollout engine (``fleet/rollouts.py``) over a fleet of 100,000 devices.

One command::

    .venv/bin/python bench/rollout_engine.py [--devices 100000] [--repeat 5] [--json]

The fleet is synthetic and seeded: ``--devices`` devices over 6 hardware classes x 3 runtimes
(18 strata), 90% online, 2% pinned to the old version, 50 groups. The plan has four stages (1%,
10%, 50%, 100%), ``max_in_flight`` 1,000 and every gate check on (install, crash, error rate,
p95 latency against the control group). Inputs are built before timing; each operation runs
``--repeat`` times on the same inputs (every call is pure) and the median is reported.

- ``preview``: :func:`fleet.rollouts.preview` (stratified assignment of every device, stage sizes
  per class and stratum, blast radius).
- ``step, first``: the first :func:`~fleet.rollouts.step` of a rollout: the stratified assignment
  of every device, a progress record per device, and the dispatch of stage 0 (its online,
  unpinned devices: about 870 of its 1,013).
- ``step, busy``: the heaviest step of a rollout: at stage 2 (50%), 1,000 reports arrive (the
  last of the stage's cohort: 990 committed, 10 failed), which settles the stage, so the gate is
  evaluated over the telemetry of every device on both versions (about 150,000 entries) and
  passes, and 1,000 devices of stage 3 are dispatched.
- ``step, idle``: the step after it: nothing arrives, 1,000 devices in flight, nothing to do but
  the per-device checks (time-outs, pins, newcomers, the reported versions).

Limits, in the same run on the same devices (the least any implementation in pure Python pays):

- ``limit: one pass``: one loop over the device list with one dict lookup per device, the floor
  of any step that looks at every device (a step makes two such passes);
- ``limit: hash + sort``: SHA-256 of every ``salt + device id`` plus one sort of the results, the
  floor of any reproducible hash-ordered cohort assignment.

Goals (from the issue): one ``step`` over 100,000 devices in <= 1 s (the slowest of the three
steps counts), one ``preview`` in <= 2 s, on this 2-core machine. The exit status is 0 whether or
not the goals are met: this is a measurement.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import random
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from fleet.rollouts import (  # noqa: E402
    DeviceEvent,
    DeviceMetrics,
    DeviceProgress,
    DeviceState,
    DeviceView,
    Dispatch,
    GateDecision,
    Gates,
    Plan,
    Rollout,
    RolloutState,
    Stage,
    StepResult,
    assign_stages,
    hash_position,
    preview,
    step,
)

STEP_GOAL_S = 1.0
PREVIEW_GOAL_S = 2.0
V1, V2 = "1.0.0", "2.0.0"
HARDWARE = ("rpi5", "jetson-orin", "x86-avx2", "x86-avx512", "nuc-npu", "coral")
RUNTIMES = ("onnxruntime", "openvino", "litert")
BUSY_REPORTS = 1000
BUSY_FAILED = 10


def make_fleet(n: int, seed: int = 7) -> list[DeviceView]:
    rng = random.Random(seed)
    return [
        DeviceView(
            f"dev-{i:07d}",
            hardware_class=rng.choice(HARDWARE),
            runtime=rng.choice(RUNTIMES),
            online=rng.random() < 0.9,
            running_version=V1,
            pinned_version=V1 if rng.random() < 0.02 else None,
            group=f"site-{i % 50}",
            reported_at=0.0,
        )
        for i in range(n)
    ]


def make_plan() -> Plan:
    return Plan(
        rollout_id="bench",
        model="cnn",
        version=V2,
        previous_version=V1,
        salt="bench-salt",
        stages=(
            Stage(percent=1, soak_s=0),
            Stage(percent=10, soak_s=0),
            Stage(percent=50, soak_s=0),
            Stage(percent=100, soak_s=0),
        ),
        max_in_flight=1000,
        gates=Gates(min_sample=5),
        device_timeout_s=3600.0,
    )


def busy_inputs(
    plan: Plan, devices: list[DeviceView]
) -> tuple[Rollout, list[DeviceView], list[DeviceEvent], dict[tuple[str, str], DeviceMetrics]]:
    """A rollout at stage 2 whose last 1,000 in-flight devices report now (t = 10,000 s)."""
    stages = assign_stages(plan, devices)
    progress: dict[str, DeviceProgress] = {}
    views: list[DeviceView] = []
    metrics: dict[tuple[str, str], DeviceMetrics] = {}
    events: list[DeviceEvent] = []
    for view in devices:
        v = view
        did, k = v.device_id, stages[v.device_id]
        pos = hash_position(plan.salt, did)
        pinned = v.pinned_version is not None
        p95 = 10.0 + HARDWARE.index(v.hardware_class or "rpi5") * 5.0
        metrics[(did, V1)] = DeviceMetrics(1000, 1, p95)
        if pinned:
            state = DeviceState.SKIPPED
        elif k <= 2 and v.online:
            state = DeviceState.IN_PROGRESS if len(events) < BUSY_REPORTS else DeviceState.SUCCEEDED
        else:
            state = DeviceState.PENDING
        attempts = 1 if state in (DeviceState.IN_PROGRESS, DeviceState.SUCCEEDED) else 0
        if state is DeviceState.IN_PROGRESS and k == 2:
            failed = len(events) < BUSY_FAILED
            events.append(
                DeviceEvent(did, V2, "failed", "self_test", "no runtime can run cnn")
                if failed
                else DeviceEvent(did, V2, "committed")
            )
            if not failed:
                v = replace(v, running_version=V2, reported_at=9999.0)
        elif state is DeviceState.IN_PROGRESS:
            state = DeviceState.SUCCEEDED
        if state is DeviceState.SUCCEEDED:
            v = replace(v, running_version=V2, reported_at=100.0)
        if v.running_version == V2:
            metrics[(did, V2)] = DeviceMetrics(1000, 2, p95 * 1.05)
        progress[did] = DeviceProgress(
            state=state,
            stage=k,
            position=pos,
            hardware_class=v.hardware_class,
            runtime=v.runtime,
            attempts=attempts,
            updated_at=9000.0 if state is DeviceState.IN_PROGRESS else 100.0,
            from_version=V1 if attempts else None,
            ran_new=state is DeviceState.SUCCEEDED,
        )
        views.append(v)
    rollout = Rollout(
        state=RolloutState.RUNNING,
        stage=2,
        stage_started_at=5000.0,
        progress=progress,
        thresholds=(0.01, 0.1, 0.5, 1.0),
        started_at=0.0,
    )
    return rollout, views, events, metrics


def timed(fn: Callable[[], Any], repeat: int) -> tuple[list[float], Any]:
    seconds, result = [], None
    for _ in range(repeat):
        gc.collect()
        start = time.perf_counter()
        result = fn()
        seconds.append(time.perf_counter() - start)
    return seconds, result


def one_pass(devices: list[DeviceView], table: dict[str, int]) -> int:
    hits = 0
    for v in devices:
        if table.get(v.device_id) is not None:
            hits += 1
    return hits


def hash_sort(salt: str, devices: list[DeviceView]) -> int:
    keyed = [
        (hashlib.sha256(f"{salt}\x00{v.device_id}".encode()).digest(), v.device_id) for v in devices
    ]
    keyed.sort()
    return len(keyed)


def summarize(
    seconds: list[float], *, devices: int, actions: int | None = None, goal: float | None = None
) -> dict[str, Any]:
    median = statistics.median(seconds)
    return {
        "runs": len(seconds),
        "devices": devices,
        "seconds_median": median,
        "seconds_min": min(seconds),
        "seconds_max": max(seconds),
        "actions": actions,
        "goal_s": goal,
        "goal_met": None if goal is None else median <= goal,
    }


def _count(result: StepResult, kind: type) -> int:
    return sum(isinstance(a, kind) for a in result.actions)


def run_benchmark(n: int, repeat: int, log: Callable[[str], None]) -> dict[str, Any]:
    from bench.bundle import machine_info

    load_before = os.getloadavg()[0]
    log(f"building a fleet of {n} devices...")
    plan = make_plan()
    devices = make_fleet(n)
    results: dict[str, Any] = {}

    log("preview...")
    seconds, pv = timed(lambda: preview(plan, devices), repeat)
    results["preview"] = summarize(seconds, devices=n, goal=PREVIEW_GOAL_S)
    results["preview"]["stage_sizes"] = list(pv.stage_sizes)
    results["preview"]["blast_radius"] = pv.blast_radius

    log("first step...")
    seconds, first = timed(lambda: step(plan, Rollout(), devices=devices, now=0.0), repeat)
    results["step_first"] = summarize(
        seconds, devices=n, actions=len(first.actions), goal=STEP_GOAL_S
    )
    results["step_first"]["dispatches"] = _count(first, Dispatch)

    log("building the busy step's inputs...")
    rollout, views, events, metrics = busy_inputs(plan, devices)
    log("busy step...")
    seconds, busy = timed(
        lambda: step(plan, rollout, devices=views, events=events, metrics=metrics, now=10_000.0),
        repeat,
    )
    gate = [a for a in busy.actions if isinstance(a, GateDecision)]
    results["step_busy"] = summarize(
        seconds, devices=n, actions=len(busy.actions), goal=STEP_GOAL_S
    )
    results["step_busy"].update(
        reports=len(events),
        metrics_entries=len(metrics),
        gate=[(d.stage, d.verdict) for d in gate],
        dispatches=_count(busy, Dispatch),
    )

    log("idle step...")
    seconds, idle = timed(
        lambda: step(plan, busy.rollout, devices=views, metrics=metrics, now=10_060.0), repeat
    )
    results["step_idle"] = summarize(
        seconds, devices=n, actions=len(idle.actions), goal=STEP_GOAL_S
    )

    log("limits...")
    table = {v.device_id: i for i, v in enumerate(devices)}
    seconds, _ = timed(lambda: one_pass(devices, table), repeat)
    results["limit_one_pass"] = summarize(seconds, devices=n)
    seconds, _ = timed(lambda: hash_sort(plan.salt, devices), repeat)
    results["limit_hash_sort"] = summarize(seconds, devices=n)

    worst_step = max(results[k]["seconds_median"] for k in ("step_first", "step_busy", "step_idle"))
    return {
        "benchmark": "rollout_engine",
        "command": shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv])),
        "machine": machine_info(),
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
        "settings": {
            "devices": n,
            "strata": len(HARDWARE) * len(RUNTIMES),
            "stages_percent": [s.percent for s in plan.stages],
            "max_in_flight": plan.max_in_flight,
            "repeat": repeat,
        },
        "units": {"time": "seconds (wall, perf_counter)"},
        "results": results,
        "worst_step_s": worst_step,
        "goals": {"step_max_s": STEP_GOAL_S, "preview_max_s": PREVIEW_GOAL_S},
        "goal_met": {
            "step": worst_step <= STEP_GOAL_S,
            "preview": results["preview"]["seconds_median"] <= PREVIEW_GOAL_S,
        },
    }


def print_report(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console.width = max(console.width, 130)
    m = report["machine"]
    load = report["load_average_1min"]
    console.print(f"[bold]command:[/] {report['command']}")
    console.print(
        f"[bold]machine:[/] {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), "
        f"Python {m['python']}, {m['os']}; load average {load['before']:.2f} before, "
        f"{load['after']:.2f} after"
    )
    s = report["settings"]
    console.print(
        f"[bold]settings:[/] {s['devices']} devices in {s['strata']} strata, stages "
        f"{s['stages_percent']} %, max_in_flight {s['max_in_flight']}, {s['repeat']} runs each"
    )
    table = Table(title="rollout engine (seconds per call, median)")
    for col in ("operation", "devices", "runs", "seconds", "min-max", "actions", "goal", "met"):
        table.add_column(col, justify="left" if col == "operation" else "right")
    rows = (
        ("preview", "preview"),
        ("step, first (assign + dispatch stage 0)", "step_first"),
        ("step, busy (1,000 reports + gate + 1,000 dispatches)", "step_busy"),
        ("step, idle", "step_idle"),
        ("limit: one pass over the devices", "limit_one_pass"),
        ("limit: hash + sort", "limit_hash_sort"),
    )
    r = report["results"]
    for label, key in rows:
        x = r[key]
        met = x["goal_met"]
        table.add_row(
            label,
            f"{x['devices']:,}",
            str(x["runs"]),
            f"{x['seconds_median']:.3f}",
            f"{x['seconds_min']:.3f}-{x['seconds_max']:.3f}",
            "" if x["actions"] is None else f"{x['actions']:,}",
            "" if x["goal_s"] is None else f"<= {x['goal_s']:g} s",
            "" if met is None else ("[green]yes[/]" if met else "[red]NO[/]"),
        )
    console.print(table)
    busy = r["step_busy"]
    console.print(
        f"first step: {r['step_first']['dispatches']} dispatches; busy step: {busy['reports']} "
        f"reports, {busy['metrics_entries']:,} telemetry entries, gate {busy['gate']}, "
        f"{busy['dispatches']} dispatches; preview stage sizes "
        f"{r['preview']['stage_sizes']}, blast radius {r['preview']['blast_radius']}"
    )
    met = report["goal_met"]
    console.print(
        f"slowest step {report['worst_step_s']:.3f} s (goal <= {STEP_GOAL_S:g} s): "
        f"{'[green]MET[/]' if met['step'] else '[red]NOT MET[/]'}; preview "
        f"{r['preview']['seconds_median']:.3f} s (goal <= {PREVIEW_GOAL_S:g} s): "
        f"{'[green]MET[/]' if met['preview'] else '[red]NOT MET[/]'}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=100_000, help="fleet size (100000)")
    parser.add_argument("--repeat", type=int, default=5, help="runs of each operation (5)")
    parser.add_argument("--json", action="store_true", help="print a JSON object instead")
    opts = parser.parse_args()
    if opts.devices < 100 or opts.repeat < 1:
        parser.error("--devices must be >= 100 and --repeat >= 1")

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    report = run_benchmark(opts.devices, opts.repeat, log)
    if opts.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)


if __name__ == "__main__":
    main()
