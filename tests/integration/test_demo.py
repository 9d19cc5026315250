"""``edgefleet demo --json``: the README's main job, run as a user runs it, with each broker."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

import simulators.demo
from shared.errors import UsageError
from simulators.demo import start_broker

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# mosquitto: MQTT 5, shared subscriptions. embedded: amqtt, MQTT 3.1.1 (about 30 s).
@pytest.mark.parametrize(("broker", "mqtt_protocol"), [("mosquitto", 5), ("embedded", 311)])
def test_demo_tells_the_whole_story(tmp_path, broker, mqtt_protocol):
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
            "--broker",
            broker,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["broker"]["kind"] == broker
    assert summary["broker"]["mqtt_protocol"] == mqtt_protocol
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


def test_without_mosquitto_the_demo_runs_the_embedded_broker(tmp_path, monkeypatch):
    monkeypatch.setattr(simulators.demo, "find_mosquitto", lambda: None)
    with start_broker(tmp_path, "auto") as broker:
        assert broker.kind == "embedded"
        assert broker.mqtt_protocol == 311
        assert broker.description.startswith("mosquitto not found, so the embedded Python broker")
        with socket.create_connection(("127.0.0.1", broker.port), timeout=5):
            pass


def test_an_unknown_broker_is_refused(tmp_path):
    with (
        pytest.raises(UsageError, match="--broker must be one of auto, mosquitto, embedded"),
        start_broker(tmp_path, "rabbitmq"),
    ):
        pass
