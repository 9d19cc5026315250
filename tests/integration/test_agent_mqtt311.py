"""The agent over MQTT 3.1.1 (``mqtt_protocol = 311``), end to end: a real agent process started
as the systemd unit starts it (``python -m agent run``), a real Mosquitto (mutual TLS, ACLs), a
signed deployment and inferences over MQTT in both encodings (binary messages describe
themselves: MQTT 3.1.1 has no content type or user properties). The other agent tests use MQTT
5, the default.
"""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from shared.protocol import device_topic
from tests.integration.test_agent import (  # noqa: F401 - fixtures
    DEVICE,
    fleet,
    infer,
    infer_binary,
    releases,
    start_agent,
    status,
)

pytestmark = pytest.mark.integration


def test_deploy_and_serve_over_mqtt_311(broker, fleet, releases, tmp_path):  # noqa: F811
    data_dir = tmp_path / "agent-data"
    proc = start_agent(
        broker,
        releases,
        data_dir,
        extra_env={"EDGEFLEET_AGENT_MQTT_PROTOCOL": "311"},
        command=[sys.executable, "-m", "agent", "run"],
    )
    try:
        fleet.wait_for(DEVICE, lambda s, b: s == "up/state", timeout=60, what="first state report")
        # Mosquitto logs each client's protocol: p2 is MQTT 3.1.1, p5 is MQTT 5.
        connects = re.findall(rf"as {DEVICE} \(p(\d)", broker.log())
        assert connects, broker.log()[-2000:]
        assert set(connects) == {"2"}

        fleet.deploy(DEVICE, "1.0.0")
        fleet.wait_phase(DEVICE, "activated", "1.0.0", timeout=120)
        fleet.wait_phase(DEVICE, "committed", "1.0.0", timeout=30)
        assert status(data_dir)["models"]["cnn"]["version"] == "1.0.0"

        app = broker.client("app-viewer")
        app.subscribe_and_wait(device_topic(DEVICE, "infer/response/app-viewer"))
        vectors = data_dir / "models" / "cnn" / "current" / "vectors"
        x, golden = np.load(vectors / "input.npy"), np.load(vectors / "output.npy")
        answer = infer(broker, app, x[:1])
        assert answer["ok"], answer
        assert answer["version"] == "1.0.0"
        assert np.abs(np.array(answer["outputs"]["output"]) - golden[:1]).max() <= 1e-4

        app.close()  # the same identity again, over MQTT 3.1.1 this time
        app311 = broker.client("app-viewer", protocol=mqtt.MQTTv311)
        app311.subscribe_and_wait(device_topic(DEVICE, "infer/response/app-viewer"))
        binary = infer_binary(app311, {"input": x[:1]})
        assert binary.ok, binary.error
        assert binary.outputs["output"].dtype == np.float32
        assert np.abs(binary.outputs["output"] - golden[:1]).max() <= 1e-4
    finally:
        proc.terminate()
        try:
            proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
    assert proc.returncode in (0, -15)
