"""Runtime selection: judging, ranking, isolation of crashing runtimes, caching and fallback.

The faulty backend (tests/unit/fault_backends.py) runs in real trial worker processes: a crash
kills a real child process and a hang hits the real time limit.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from agent.runtimes.base import Candidate
from agent.runtimes.cache import DecisionCache, cache_key
from agent.runtimes.inventory import CpuInfo, Inventory
from agent.runtimes.probe import probe_model
from agent.runtimes.runner import InputRefusedError, ModelRunner, probe_feeds
from agent.runtimes.selection import NoRuntimeError, TrialResult, decide, judge
from agent.runtimes.trial import Measurement, TrialSettings
from shared.bundle import build_bundle, check_payload, open_bundle
from shared.manifest import AccuracyBudget, Artifact, Manifest
from tests.unit import fault_backends

BACKENDS = {
    "faulty": "tests.unit.fault_backends:FaultyBackend",
    "missing": "tests.unit.fault_backends:MissingBackend",
}
FAST = TrialSettings(timeout_s=3.0, warmup_runs=1, min_runs=5, max_runs=10, target_s=0.05)
INVENTORY = Inventory(cpu=CpuInfo(arch="x86_64", model="test", cores=2))


def doubling_model(tmp_path: Path, *, vectors: bool = True) -> tuple[Path, Manifest]:
    """A bundle whose 'fake' model doubles its input, extracted as the agent would."""
    src = tmp_path / "src"
    src.mkdir()
    spec = {
        "name": "doubler",
        "inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 3]}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": [-1, 3]}],
        "artifacts": [{"format": "fake", "precision": "fp32", "files": ["model.fake"]}],
    }
    (src / "model.fake").write_bytes(b"doubler")
    if vectors:
        x = np.arange(12, dtype=np.float32).reshape(4, 3)
        np.save(src / "x.npy", x)
        np.save(src / "y.npy", x * 2)
        spec["test_vectors"] = {"inputs": {"x": "x.npy"}, "outputs": {"y": "y.npy"}}
    (src / "model.json").write_text(json.dumps(spec))
    build_bundle(src, name=None, version="1", out=tmp_path / "d.bundle")
    stream, reader, header, first = open_bundle(tmp_path / "d.bundle")
    with stream:
        check_payload(reader, header.manifest, first, dest=tmp_path / "model")
    return tmp_path / "model", header.manifest


def candidate(fault: str = "none", precision: str = "f32") -> Candidate:
    artifact = Artifact(format="fake", precision="fp32", files=["model.fake"])
    return Candidate.make(
        runtime="faulty",
        device="CPU",
        artifact_index=0,
        artifact=artifact,
        settings={"fault": fault},
        precision=precision,
    )


def measured(p50: float, err: float | None = 0.0, **kw) -> Measurement:
    return Measurement(
        load_ms=1.0,
        p50_ms=p50,
        p99_ms=p50 * 2,
        max_abs_err=err,
        max_rel_err=err,
        cases=4 if err is not None else 0,
        **kw,
    )


# -- pure judging and ranking --------------------------------------------------------------------


def test_budget_from_bundle_wins_over_precision_default():
    budget = AccuracyBudget(max_abs_err=1e-3)
    assert judge(candidate(precision="bf16"), measured(1, 5e-3), budget).reason == (
        "max abs error 0.005 exceeds 0.001 (bundle budget)"
    )
    assert judge(candidate(precision="bf16"), measured(1, 5e-3), None).accepted  # default 5e-2
    rejected = judge(candidate(), measured(1, 5e-3), None)
    assert rejected.reason == "max abs error 0.005 exceeds 0.0001 (default for f32)"


def test_relative_budget_is_applied():
    budget = AccuracyBudget(max_rel_err=0.01)
    result = judge(candidate(), Measurement(p50_ms=1, max_abs_err=0.5, max_rel_err=0.02), budget)
    assert not result.accepted
    assert "max relative error 0.02 exceeds 0.01" in result.reason


def test_failed_trial_keeps_its_reason():
    result = judge(candidate(), Measurement(error="runtime crashed (killed by SIGSEGV)"), None)
    assert (result.accepted, result.reason) == (False, "runtime crashed (killed by SIGSEGV)")


def test_ranking_follows_the_objective():
    fast_median = TrialResult(
        candidate("a"), Measurement(p50_ms=1.0, p99_ms=9.0, max_abs_err=0), True, "ok"
    )
    steady = TrialResult(
        candidate("b"), Measurement(p50_ms=1.5, p99_ms=2.0, max_abs_err=0), True, "ok"
    )
    wrong = TrialResult(candidate("c"), Measurement(p50_ms=0.1, max_abs_err=1), False, "wrong")
    by_latency = decide("m", [wrong, steady, fast_median], "latency")
    assert [r.candidate.options["fault"] for r in by_latency.ranking] == ["a", "b"]
    by_p99 = decide("m", [wrong, steady, fast_median], "p99")
    assert by_p99.selected.candidate.options["fault"] == "b"
    by_throughput = decide("m", [steady, fast_median], "throughput")
    assert by_throughput.selected.candidate.options["fault"] == "a"
    assert len(by_latency.results) == 3  # rejected candidates stay in the report


def test_nothing_accepted_lists_every_candidate_and_why():
    results = [
        judge(candidate("crash"), Measurement(error="runtime crashed (killed by SIGSEGV)"), None),
        judge(candidate("wrong"), measured(1, 0.5), None),
    ]
    with pytest.raises(NoRuntimeError) as info:
        decide("cnn", results, "latency")
    message = str(info.value)
    assert message.startswith("no runtime on this device can run cnn: ")
    assert "faulty/CPU/fake:fp32/fault=crash: runtime crashed (killed by SIGSEGV)" in message
    assert "fault=wrong: max abs error 0.5 exceeds 0.0001" in message


def test_decision_round_trips_through_json():
    decision = decide(
        "m",
        [judge(candidate(), measured(1.0), None), judge(candidate("slow"), measured(2.0), None)],
        "latency",
    )
    again = type(decision).from_dict(json.loads(json.dumps(decision.to_dict())))
    assert again == decision


# -- real trials in worker processes -------------------------------------------------------------


def test_crash_and_hang_reject_only_their_candidate(tmp_path):
    model_root, manifest = doubling_model(tmp_path)
    report = probe_model(
        model_root,
        manifest,
        bundle_digest="d",
        inventory=INVENTORY,
        backends=BACKENDS,
        settings=FAST,
    )
    verdicts = {
        r.candidate.options.get("fault", r.candidate.runtime): r.reason
        for r in report.decision.results
    }
    assert verdicts["crash"] == "runtime crashed (killed by SIGSEGV)"
    assert verdicts["hang"] == "timed out after 3 s (hung in load or inference)"
    assert verdicts["fail-load"] == "load failed: delegate library not found"
    assert verdicts["wrong"].startswith("max abs error 0.5 exceeds 0.0001")
    assert verdicts["missing"] == "missing not installed (No module named 'missing')"
    assert verdicts["none"] == verdicts["slow"] == "accepted (within default for f32)"
    # the candidates after the crash and the hang still ran, in fresh workers
    ranking = [r.candidate.options["fault"] for r in report.decision.ranking]
    assert ranking == ["none", "slow"]
    assert report.decision.selected.measurement.max_abs_err == 0.0
    assert report.to_dict()["selected"]["key"] == "faulty/CPU/fake:fp32/fault=none"


def test_a_bundle_that_loads_nowhere_says_why_for_each_candidate(tmp_path, monkeypatch):
    monkeypatch.setenv("FAULTY_CANDIDATES", "crash,fail-load,wrong")
    model_root, manifest = doubling_model(tmp_path)
    with pytest.raises(NoRuntimeError) as info:
        probe_model(
            model_root,
            manifest,
            bundle_digest="d",
            inventory=INVENTORY,
            backends=BACKENDS,
            settings=FAST,
        )
    message = str(info.value)
    assert message.startswith("no runtime on this device can run doubler: ")
    for reason in (
        "killed by SIGSEGV",
        "delegate library not found",
        "max abs error 0.5",
        "missing not installed",
    ):
        assert reason in message


def test_without_test_vectors_selection_is_by_speed_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("FAULTY_CANDIDATES", "slow,wrong")
    model_root, manifest = doubling_model(tmp_path, vectors=False)
    report = probe_model(
        model_root,
        manifest,
        bundle_digest="d",
        inventory=INVENTORY,
        backends=BACKENDS,
        settings=FAST,
    )
    assert report.decision.correctness_checked is False
    assert report.decision.selected.candidate.options["fault"] == "wrong"  # faster; unchecked
    assert "correctness not checked" in report.decision.selected.reason


def test_decision_is_cached_and_a_corrupted_cache_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("FAULTY_CANDIDATES", "none,slow")
    model_root, manifest = doubling_model(tmp_path)
    cache = DecisionCache(tmp_path / "cache")
    kwargs = {
        "bundle_digest": "d",
        "inventory": INVENTORY,
        "backends": BACKENDS,
        "settings": FAST,
        "cache": cache,
    }
    first = probe_model(model_root, manifest, **kwargs)
    second = probe_model(model_root, manifest, **kwargs)
    assert (first.from_cache, second.from_cache) == (False, True)
    assert second.decision == first.decision
    cache_file = tmp_path / "cache" / f"{first.cache_key}.json"
    cache_file.write_text('{"format": 1, "key": "' + first.cache_key + '", "decision": {')
    third = probe_model(model_root, manifest, **kwargs)
    assert third.from_cache is False
    assert json.loads(cache_file.read_text())["key"] == first.cache_key  # rewritten whole


def test_cache_key_changes_with_each_input():
    base = {
        "bundle_digest": "a",
        "runtime_versions": {"onnxruntime": "onnxruntime==1.31.1"},
        "hardware_fingerprint": "f",
        "objective": "latency",
    }
    keys = {cache_key(**base)}
    for field, value in [
        ("bundle_digest", "b"),
        ("hardware_fingerprint", "g"),
        ("objective", "p99"),
        ("runtime_versions", {"onnxruntime": "onnxruntime==1.32.0"}),
    ]:
        keys.add(cache_key(**{**base, field: value}))
    assert len(keys) == 5


# -- run-time fallback ---------------------------------------------------------------------------


def ranked(*faults: str) -> object:
    return decide(
        "doubler",
        [judge(candidate(f), measured(i + 1.0), None) for i, f in enumerate(faults)],
        "latency",
    )


def test_runner_falls_back_when_the_chosen_runtime_fails_to_load(tmp_path):
    model_root, manifest = doubling_model(tmp_path)
    runner = ModelRunner(model_root, manifest, ranked("fail-load", "none"), BACKENDS)
    out = runner.infer({"x": np.ones((1, 3), np.float32)})
    np.testing.assert_array_equal(out["y"], np.full((1, 3), 2, np.float32))
    assert runner.active.options["fault"] == "none"
    assert "delegate library not found" in runner.failures[0]


def test_runner_falls_back_when_inference_fails_at_run_time(tmp_path, monkeypatch):
    model_root, manifest = doubling_model(tmp_path)
    runner = ModelRunner(model_root, manifest, ranked("none", "slow"), BACKENDS)
    runner.load()
    first_key = runner.active.key
    monkeypatch.setattr(fault_backends, "BROKEN_AT_RUNTIME", {first_key})
    out = runner.infer({"x": np.ones((2, 3), np.float32)})  # this call must still succeed
    assert out["y"].shape == (2, 3)
    assert runner.active.options["fault"] == "slow"
    assert first_key not in [r.candidate.key for r in runner.decision.ranking]


def test_a_broken_runtime_is_dropped_even_with_a_probe(tmp_path, monkeypatch):
    model_root, manifest = doubling_model(tmp_path)
    probe = probe_feeds(manifest.inputs)
    runner = ModelRunner(model_root, manifest, ranked("none", "slow"), BACKENDS, probe=probe)
    runner.load()
    first_key = runner.active.key
    monkeypatch.setattr(fault_backends, "BROKEN_AT_RUNTIME", {first_key})
    out = runner.infer({"x": np.ones((2, 3), np.float32)})  # the probe fails too: fall back
    assert out["y"].shape == (2, 3)
    assert runner.active.options["fault"] == "slow"


def test_an_input_only_the_runtime_refuses_is_refused_and_the_runtime_kept(tmp_path):
    """A request that fails where a known-good input still runs was the request's fault."""
    model_root, manifest = doubling_model(tmp_path)
    probe = probe_feeds(manifest.inputs)
    assert probe is not None
    assert probe["x"].shape == (1, 3)  # the free dimension as 1
    runner = ModelRunner(model_root, manifest, ranked("none", "slow"), BACKENDS, probe=probe)
    runner.load()
    kept = runner.active.key
    with pytest.raises(InputRefusedError, match="doubler: the runtime refused this input: 'x'"):
        runner.infer({"z": np.ones((1, 3), np.float32)})  # the fake model fails on KeyError
    assert runner.active.key == kept
    assert kept in [r.candidate.key for r in runner.decision.ranking]
    assert runner.failures == []
    np.testing.assert_array_equal(runner.infer({"x": np.ones((1, 3), np.float32)})["y"], 2)


def test_runner_with_every_candidate_failing_raises_no_runtime(tmp_path):
    model_root, manifest = doubling_model(tmp_path)
    runner = ModelRunner(model_root, manifest, ranked("fail-load"), BACKENDS)
    with pytest.raises(NoRuntimeError, match="no runtime on this device can run doubler"):
        runner.load()
