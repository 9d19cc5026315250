"""``edgefleet demo --json``: the README's main job, run as a user runs it."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_demo_tells_the_whole_story(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "shared.cli.main",
            "demo",
            "--json",
            "--devices",
            "12",
            "--work-dir",
            str(tmp_path / "demo"),
            "--port",
            str(free_port()),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["devices"] == 12
    by_version = {r["version"]: r for r in summary["rollouts"]}
    assert by_version["1.0.0"]["state"] == "completed"
    assert by_version["1.0.0"]["devices_updated"] == 12
    assert by_version["2.0.0"]["state"] == "completed"
    assert by_version["2.0.0"]["stages_reached"] == 2
    bad = by_version["3.0.0"]
    assert bad["state"] == "halted"
    assert bad["stages_reached"] == 1
    # v3 breaks on the arm-npu class (its self-test refuses it there); the first stage covers
    # every class, so the gate halts it there, and only first-stage devices ever ran it.
    assert bad["devices_failed"].get("self_test", 0) >= 1
    # (The slower devices of the first stage may or may not have activated it before the NPU
    # failures made the gate's verdict certain.)
    assert bad["ever_ran"] <= 12 * 0.34 + 3
    # ...and every one of them was reverted: all devices, by their own data, run v2.
    assert summary["device_versions"] == {"2.0.0": 12}
