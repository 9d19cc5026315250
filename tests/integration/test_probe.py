"""``edgefleet agent probe`` on this machine, with the real runtimes and the example model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from agent.runtimes.cache import DecisionCache
from agent.runtimes.inventory import scan
from agent.runtimes.probe import probe_model
from agent.runtimes.runner import ModelRunner
from shared.bundle import build_bundle
from shared.example_models import write_example

pytestmark = pytest.mark.integration

CLI = [sys.executable, "-m", "shared.cli.main"]
CANDIDATE_KEYS = {
    "runtime",
    "device",
    "settings",
    "p50_ms",
    "p99_ms",
    "max_abs_err",
    "accepted",
    "reason",
}


def probe_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, "agent", "probe", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("small")
    write_example(out / "model", size="small")
    return out / "model"


@pytest.fixture(scope="module")
def small_bundle(small_model: Path) -> Path:
    out = small_model.parent / "small.bundle"
    build_bundle(small_model, name=None, version="1.0.0", out=out)
    return out


def test_probe_tries_every_installed_runtime_and_picks_a_correct_one(small_bundle, tmp_path):
    proc = probe_cli("--bundle", small_bundle, "--json", "--cache-dir", tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert {"inventory", "candidates", "selected"} <= report.keys()
    runtimes = {r["name"]: r for r in report["inventory"]["runtimes"]}
    installed = {name for name, r in runtimes.items() if r["installed"]}
    assert installed == {"onnxruntime", "openvino", "litert"}  # the dev install has all three
    for candidate in report["candidates"]:
        assert candidate.keys() >= CANDIDATE_KEYS
        if candidate["max_abs_err"] is not None and candidate["max_abs_err"] > 1e-4:
            assert not candidate["accepted"]
            assert "exceeds 0.0001 (bundle budget)" in candidate["reason"]
    accepted_runtimes = {c["runtime"] for c in report["candidates"] if c["accepted"]}
    assert accepted_runtimes == installed
    several = [c for c in report["candidates"] if c["runtime"] == "openvino"]
    assert len({json.dumps(c["settings"], sort_keys=True) for c in several}) >= 2
    selected = report["selected"]
    assert selected in report["candidates"]
    assert selected["accepted"]
    assert selected["max_abs_err"] <= 1e-4
    fastest = min(c["p50_ms"] for c in report["candidates"] if c["accepted"])
    assert selected["p50_ms"] == fastest

    again = json.loads(
        probe_cli("--bundle", small_bundle, "--json", "--cache-dir", tmp_path).stdout
    )
    assert again["from_cache"] is True
    assert again["selected"] == selected


def test_corrupted_cache_is_ignored_and_rebuilt(small_bundle, tmp_path):
    first = json.loads(
        probe_cli("--bundle", small_bundle, "--json", "--cache-dir", tmp_path).stdout
    )
    (tmp_path / f"{first['cache_key']}.json").write_bytes(b"\x00garbage")
    proc = probe_cli("--bundle", small_bundle, "--json", "--cache-dir", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["from_cache"] is False


def test_probe_without_bundle_reports_inventory_and_runtimes():
    proc = probe_cli("--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["inventory"]["cpu"]["cores"] >= 1
    assert report["inventory"]["hardware_class"].startswith(("x86_64", "aarch64"))
    assert {r["name"] for r in report["inventory"]["runtimes"]} == {
        "onnxruntime",
        "openvino",
        "litert",
    }
    assert report["selected"] is None


def test_bundle_without_test_vectors_is_selected_by_speed_and_says_so(small_model, tmp_path):
    spec = json.loads((small_model / "model.json").read_text())
    del spec["test_vectors"]
    model = tmp_path / "model"
    model.mkdir()
    for rel in ("onnx/model.onnx", "labels.txt"):
        (model / rel).parent.mkdir(parents=True, exist_ok=True)
        (model / rel).write_bytes((small_model / rel).read_bytes())
    spec["artifacts"] = [a for a in spec["artifacts"] if a["format"] == "onnx"]
    (model / "model.json").write_text(json.dumps(spec))
    build_bundle(model, name=None, version="1", out=tmp_path / "nv.bundle")
    proc = probe_cli("--bundle", tmp_path / "nv.bundle", "--no-cache")
    assert proc.returncode == 0, proc.stderr
    assert "correctness was not checked: the bundle has no test vectors" in proc.stdout


def test_bad_objective_is_a_one_line_error():
    proc = probe_cli("--objective", "fastest")
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "error: --objective must be one of latency, p99, throughput, got 'fastest'"
    )


def test_agent_inference_path_matches_golden_outputs(small_model, tmp_path):
    from shared.bundle import inspect_bundle

    bundle = tmp_path / "b.bundle"
    build_bundle(small_model, name=None, version="1", out=bundle)
    manifest = inspect_bundle(bundle).manifest
    report = probe_model(
        small_model,
        manifest,
        bundle_digest="x",
        inventory=scan(),
        objective="p99",
        cache=DecisionCache(tmp_path / "c"),
    )
    runner = ModelRunner(small_model, manifest, report.decision)
    inputs = np.load(small_model / "vectors" / "input.npy")
    golden = np.load(small_model / "vectors" / "output.npy")
    out = runner.infer({"input": inputs[:1]})["output"]
    assert np.abs(out - golden[:1]).max() <= 1e-4
    batch = runner.infer({"input": inputs})["output"]  # a batch through the same path
    assert np.abs(batch - golden).max() <= 1e-4
    runner.close()
