"""The discrete-event fleet simulation (simulators.scale) on a fleet of 2,000 devices."""

from __future__ import annotations

import json
from typing import Any

import pytest

from simulators.scale import main, run_scale
from simulators.scale_fleet import ScaleConfig

DEVICES = 2000
SEED = 1
ENGINE_FAILURE_CLASSES = {"download", "verify", "install", "self_test", "probation", "timed_out"}


@pytest.fixture(scope="module")
def both() -> dict[str, Any]:
    return run_scale(DEVICES, SEED, "both")


@pytest.fixture(scope="module")
def good(both: dict[str, Any]) -> dict[str, Any]:
    return both["scenarios"]["good"]


@pytest.fixture(scope="module")
def bad(both: dict[str, Any]) -> dict[str, Any]:
    return both["scenarios"]["bad"]


def _without_timings(report: dict[str, Any]) -> dict[str, Any]:
    out = json.loads(json.dumps(report))
    out.pop("real_seconds")
    out.pop("cpu_seconds")
    for r in out["scenarios"].values():
        for key in ("real_seconds", "real_seconds_outside_engine", "cpu_seconds"):
            r.pop(key)
        for key in ("step_ms", "first_step_ms", "gate_step_ms", "seconds"):
            r["engine"].pop(key)
    return out


def test_good_rollout_completes_on_every_reachable_device(good: dict[str, Any]) -> None:
    assert good["outcome"] == "completed"
    assert [s["verdict"] for s in good["simulated"]["stages"]] == ["pass"] * 4
    devices = good["devices"]
    assert devices["never_online"] > 0  # some devices never came back: they are not counted
    # every reachable device runs the new version, except those whose injected fault the
    # engine recorded as a failure
    assert set(devices["not_on_new_version"]) <= ENGINE_FAILURE_CLASSES
    left = sum(devices["not_on_new_version"].values())
    assert devices["on_new_version"] + left == devices["reachable"]
    assert left <= 0.01 * devices["reachable"]


def test_offline_and_late_devices_catch_up(good: dict[str, Any]) -> None:
    devices = good["devices"]
    for group in ("offline_at_start", "enrolled_mid_rollout", "with_an_outage"):
        g = devices[group]
        assert g["came_online"] > 0, group
        assert g["on_new_version"] == g["came_online"], group
    assert devices["updated_after_completion"] > 0  # returned after the last gate, then updated


def test_bad_rollout_halts_at_the_first_stage_and_reverts(bad: dict[str, Any]) -> None:
    assert bad["outcome"] == "halted"
    assert bad["stages_reached"] == 1
    first = bad["gates"][0]
    assert (first["stage"], first["verdict"]) == (0, "fail")
    assert "install success" in first["reason"]  # its self-test fails on coral
    assert "p95 latency ratio" in first["reason"]  # and it is slower elsewhere
    blast = bad["blast_radius"]
    assert blast["ever_ran"] > 0
    assert blast["ever_ran"] <= blast["preview_blast_radius"]
    assert blast["outside_first_stage"] == 0
    assert blast["still_running"] == 0  # every device that ran it was reverted
    assert blast["ever_ran_by_engine"] == blast["ever_ran"]
    assert set(blast["by_engine_state"]) <= {"reverted", "failed"}


def test_same_seed_same_result_other_seed_other_result(both: dict[str, Any]) -> None:
    again = run_scale(DEVICES, SEED, "both")
    assert _without_timings(again) == _without_timings(both)
    other = run_scale(DEVICES, SEED + 1, "bad")["scenarios"]["bad"]
    assert other["faults"] != both["scenarios"]["bad"]["faults"]


def test_skipping_idle_ticks_changes_nothing(both: dict[str, Any]) -> None:
    every_tick = run_scale(DEVICES, SEED, "both", config=ScaleConfig(skip_idle_ticks=False))
    for name, r in every_tick["scenarios"].items():
        skipped = both["scenarios"][name]
        assert r["engine"]["ticks_skipped"] == 0
        assert (
            r["engine"]["steps"] == skipped["engine"]["steps"] + skipped["engine"]["ticks_skipped"]
        )
        for key in ("outcome", "simulated", "devices", "blast_radius", "gates", "faults"):
            assert r[key] == skipped[key], (name, key)
    assert both["scenarios"]["good"]["engine"]["ticks_skipped"] > 0


def test_command_prints_a_json_report(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--devices", "300", "--seed", "2", "--scenario", "bad", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert list(report["scenarios"]) == ["bad"]
    assert report["settings"]["devices"] == 300
    assert report["scenarios"]["bad"]["engine"]["steps"] > 0
