"""The model store: install, switch, commit, rollback, and recovery after a kill at any step.

Crash tests run the real store code in a child process that SIGKILLs itself at a fault point
(``EDGEFLEET_FAULT``), then check the invariants on disk, never the logs (matrix rows 28, 34).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from agent.store import FAULT_POINTS, ModelStore
from shared.errors import RollbackError

MANIFEST = {
    "format": "edgefleet-bundle",
    "format_version": "1.1",
    "name": "cnn",
    "version": "{v}",
    "inputs": [{"name": "x", "dtype": "float32", "shape": [1]}],
    "outputs": [{"name": "y", "dtype": "float32", "shape": [1]}],
    "artifacts": [{"format": "onnx", "files": ["model.onnx"]}],
    "files": [{"path": "model.onnx", "size": 2, "sha256": "{sha}"}],
}


def manifest_bytes(version: str, content: bytes) -> bytes:
    import hashlib

    doc = json.loads(
        json.dumps(MANIFEST)
        .replace("{v}", version)
        .replace("{sha}", hashlib.sha256(content).hexdigest())
    )
    doc["files"][0]["size"] = len(content)
    return json.dumps(doc).encode()


def stage(store: ModelStore, version: str, content: bytes) -> Path:
    staged = store.staging("cnn", version)
    (staged / "model.onnx").write_bytes(content)
    return staged


def install(store: ModelStore, version: str, *, counter: int, floor: int) -> None:
    content = f"v{version}".encode()
    store.install(
        "cnn",
        version,
        stage(store, version, content),
        manifest_bytes(version, content),
        counter=counter,
    )
    store.activate("cnn", version)
    store.commit("cnn", version, rollback_floor=floor)


def check_invariants(data_dir: Path, *, allowed: set[str], min_floor: int) -> str:
    store = ModelStore(data_dir)
    store.recover()
    current = store.current("cnn")
    assert current in allowed
    assert store.is_complete("cnn", current)
    assert store.check_integrity("cnn", current) is None
    assert not list(data_dir.rglob(".tmp-*"))
    assert not (data_dir / "models" / "cnn" / "journal.json").exists()
    assert store.floor("cnn") >= min_floor
    return current


def test_install_activate_commit_and_keep_previous(tmp_path):
    store = ModelStore(tmp_path)
    install(store, "1", counter=1, floor=1)
    install(store, "2", counter=2, floor=1)
    assert (store.current("cnn"), store.previous("cnn")) == ("2", "1")
    assert (tmp_path / "models/cnn/current/model.onnx").read_bytes() == b"v2"
    install(store, "3", counter=3, floor=2)
    assert sorted(p.name for p in (tmp_path / "models/cnn/versions").iterdir()) == ["2", "3"]
    assert store.floor("cnn") == 2
    assert not list((tmp_path / "staging").rglob("*.onnx"))


def test_floor_never_decreases_and_lower_counters_are_refused(tmp_path):
    store = ModelStore(tmp_path)
    install(store, "1", counter=5, floor=4)
    store.commit("cnn", "1", rollback_floor=2)
    assert ModelStore(tmp_path).floor("cnn") == 4  # persisted, not lowered
    with pytest.raises(RollbackError, match="release counter 3 is below the rollback floor 4"):
        store.check_counter("cnn", 3)
    store.check_counter("cnn", 4)


def test_rollback_returns_to_previous_and_records_the_failure(tmp_path):
    store = ModelStore(tmp_path)
    install(store, "1", counter=1, floor=1)
    content = b"v2"
    store.install("cnn", "2", stage(store, "2", content), manifest_bytes("2", content), counter=2)
    store.activate("cnn", "2")
    assert store.rollback("cnn", reason="self-test failed") == "1"
    assert store.current("cnn") == "1"
    assert ModelStore(tmp_path).state.failed == {"cnn": ["2"]}


def test_corrupted_installed_model_is_detected(tmp_path):
    store = ModelStore(tmp_path)
    install(store, "1", counter=1, floor=1)
    path = tmp_path / "models/cnn/versions/1/model.onnx"
    path.write_bytes(b"X" + path.read_bytes()[1:])
    assert store.check_integrity("cnn", "1").startswith("model.onnx: sha256 mismatch")


def test_interrupted_install_leaves_no_half_version(tmp_path):
    store = ModelStore(tmp_path)
    install(store, "1", counter=1, floor=1)
    stage(store, "2", b"v2")  # downloaded, never installed
    assert not store.is_complete("cnn", "2")
    assert check_invariants(tmp_path, allowed={"1"}, min_floor=1) == "1"


CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    sys.path.insert(0, {root!r})
    from agent.store import ModelStore
    from tests.unit.test_store import install
    install(ModelStore(Path({data!r})), "2", counter=2, floor=2)
    """
)
STORE_POINTS = [p for p in FAULT_POINTS if p not in ("after_download", "after_verify")]


@pytest.mark.parametrize("point", STORE_POINTS)
def test_kill_at_every_step_keeps_the_invariants(tmp_path, point):
    store = ModelStore(tmp_path)
    install(store, "1", counter=1, floor=1)
    root = str(Path(__file__).resolve().parents[2])
    code = CHILD.format(root=root, data=str(tmp_path))
    env = {**os.environ, "EDGEFLEET_FAULT": point}
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, timeout=60, check=False
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    current = check_invariants(tmp_path, allowed={"1", "2"}, min_floor=1)
    if point in ("before_commit", "after_commit"):
        assert current == "2"  # the switch had happened
    # the update can simply run again to completion
    install(ModelStore(tmp_path), "2", counter=2, floor=2)
    assert check_invariants(tmp_path, allowed={"2"}, min_floor=2) == "2"
