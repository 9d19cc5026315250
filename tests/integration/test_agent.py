"""The agent daemon end to end: a real agent process, a real Mosquitto (mutual TLS, ACLs), the
fleet's side played by :class:`FleetHarness`, the example model on the real runtimes.

Assertions look at the agent's data directory (``edgefleet agent status``) and at what it
reports, never at its logs.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from shared.bundle import build_bundle, inspect_bundle, write_signed_copy
from shared.example_models import write_example
from shared.keystore import KeyStore
from shared.protocol import INFER_REQUEST, InferRequest, InferResponse, device_topic, parse_payload
from shared.tensors import encode_tensor_message
from shared.trust import sign_release
from tests.integration.fleet_harness import FleetHarness

pytestmark = pytest.mark.integration

CLI = [sys.executable, "-m", "shared.cli.main"]
DEVICE = "dev-001"


@pytest.fixture(scope="module")
def releases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Keys and signed bundles of the small example model: 1.0.0, and 2.0.0 whose weights
    differ only in the last layer (so most chunks can be reused)."""
    root = tmp_path_factory.mktemp("releases")
    keys = KeyStore.create(root / "keys", now=datetime.now(UTC))
    model = root / "model"
    write_example(model, size="small")
    out: dict[str, Path] = {"keys": root / "keys"}
    for version in ("1.0.0", "2.0.0"):
        if version == "2.0.0":
            padding = model / "extra" / "calibration.bin"
            padding.parent.mkdir()
            padding.write_bytes(np.random.default_rng(5).bytes(600_000))
            spec = json.loads((model / "model.json").read_text())
            spec["metadata"]["note"] = "v2"
            (model / "model.json").write_text(json.dumps(spec))
        bundle = root / f"cnn-{version}.bundle"
        build_bundle(model, name="cnn", version=version, out=bundle, chunk_size=64 * 1024)
        _, files = sign_release(
            keys, inspect_bundle(bundle), expires_in=timedelta(days=1), now=datetime.now(UTC)
        )
        write_signed_copy(bundle, files)
        out[version] = bundle
    return out


@pytest.fixture
def fleet(broker, releases) -> Iterator[FleetHarness]:
    harness = FleetHarness(broker, KeyStore.open(releases["keys"]))
    for version in ("1.0.0", "2.0.0"):
        harness.publish(releases[version])
    yield harness
    harness.close()


def start_agent(
    broker,
    releases,
    data_dir: Path,
    *,
    device: str = DEVICE,
    extra_env: dict[str, str] | None = None,
    command: list[str] | None = None,
) -> subprocess.Popen[bytes]:
    """``edgefleet agent run``, or ``command`` instead (e.g. ``python -m agent run``)."""
    cert, key = broker.pki.client(device)
    config = data_dir.parent / f"{device}.toml"
    config.write_text(
        "[agent]\nprobation_s = 1.0\nrequest_timeout_s = 2.0\ntelemetry_interval_s = 1.0\n"
    )
    import os

    env = {**os.environ, **(extra_env or {})}
    return subprocess.Popen(
        [
            *(command or [*CLI, "agent", "run"]),
            "--broker",
            f"mqtts://127.0.0.1:{broker.port}",
            "--device-id",
            device,
            "--data-dir",
            str(data_dir),
            "--trust",
            str(releases["keys"] / "root.json"),
            "--config",
            str(config),
            "--ca-file",
            str(broker.pki.ca_cert),
            "--cert-file",
            str(cert),
            "--key-file",
            str(key),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
    )


@pytest.fixture
def agent(broker, releases, fleet, tmp_path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    data_dir = tmp_path / "agent-data"
    proc = start_agent(broker, releases, data_dir)
    fleet.wait_for(DEVICE, lambda s, b: s == "up/state", timeout=60, what="first state report")
    yield proc, data_dir
    proc.terminate()
    try:
        output, _ = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
    if proc.returncode not in (0, -15):
        print(output.decode(errors="replace")[-5000:])


def status(data_dir: Path) -> dict:
    proc = subprocess.run(
        [*CLI, "agent", "status", "--data-dir", str(data_dir), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def infer(broker, app_client, x: np.ndarray, *, model: str = "cnn") -> dict:
    correlation = uuid.uuid4().hex
    request = InferRequest(
        correlation_id=correlation, model=model, inputs={"input": x.tolist()}, reply_to="app-viewer"
    )
    app_client.publish(
        device_topic(DEVICE, INFER_REQUEST), request.model_dump_json().encode(), qos=1
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        message = app_client.expect_message(timeout=30)
        body = json.loads(message.payload)
        if body.get("correlation_id") == correlation:
            return body
    raise AssertionError("no inference response")


def exchange(app_client, payload: bytes, correlation: str, *, timeout: float = 30) -> InferResponse:
    """Publish an inference request as it is; return the answer with ``correlation``, parsed as
    the Python client parses it (either encoding)."""
    app_client.publish(device_topic(DEVICE, INFER_REQUEST), payload, qos=1)
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        message = app_client.expect_message(timeout=left)
        answer = parse_payload(InferResponse, message.payload, what="inference response")
        if answer.correlation_id == correlation:
            return answer
    raise AssertionError(f"no inference response to {correlation}")


def infer_binary(app_client, inputs: dict[str, np.ndarray], *, model: str = "cnn") -> InferResponse:
    """As :func:`infer`, in the binary encoding (raw tensors behind a JSON header)."""
    correlation = uuid.uuid4().hex
    fields = {"correlation_id": correlation, "model": model, "reply_to": "app-viewer"}
    return exchange(app_client, encode_tensor_message(fields, "inputs", inputs), correlation)


def test_deploy_update_and_serve_over_mqtt(broker, fleet, agent, releases):
    _, data_dir = agent
    fleet.deploy(DEVICE, "1.0.0")
    fleet.wait_phase(DEVICE, "activated", "1.0.0", timeout=120)
    fleet.wait_phase(DEVICE, "committed", "1.0.0", timeout=30)
    state = status(data_dir)
    assert state["device_id"] == DEVICE
    assert state["models"]["cnn"]["version"] == "1.0.0"
    assert state["models"]["cnn"]["runtime"]  # the runtime layer's choice, e.g. litert/CPU/...
    assert state["models"]["cnn"]["previous_version"] is None

    app = broker.client("app-viewer")
    app.subscribe_and_wait(device_topic(DEVICE, "infer/response/app-viewer"))
    model_dir = data_dir / "models" / "cnn" / "current"
    x = np.load(model_dir / "vectors" / "input.npy")
    golden = np.load(model_dir / "vectors" / "output.npy")
    answer = infer(broker, app, x[:1])
    assert answer["ok"] is True
    assert answer["version"] == "1.0.0"
    assert np.abs(np.array(answer["outputs"]["output"]) - golden[:1]).max() <= 1e-4
    batch = infer(broker, app, x)  # a batch, through the same request/response
    assert np.array(batch["outputs"]["output"]).shape == golden.shape
    bad = infer(broker, app, x[:1], model="nope")
    assert bad["ok"] is False
    assert "no model 'nope' is active" in bad["error"]

    sent_before = fleet.chunk_bytes_sent
    fleet.deploy(DEVICE, "2.0.0")
    fleet.wait_phase(DEVICE, "activated", "2.0.0", timeout=120)
    state = status(data_dir)
    assert state["models"]["cnn"]["version"] == "2.0.0"
    assert state["models"]["cnn"]["previous_version"] == "1.0.0"
    downloaded = fleet.wait_phase(DEVICE, "downloaded", "2.0.0")
    assert downloaded["metrics"]["reused_bytes"] > 0  # unchanged chunks came from v1 on disk
    assert fleet.chunk_bytes_sent - sent_before < releases["2.0.0"].stat().st_size
    assert infer(broker, app, x[:1])["version"] == "2.0.0"


def test_python_client_gets_answers_and_errors(broker, fleet, agent):
    from agent.client import InferenceClient, InferenceError
    from shared.mqtt import MqttSettings

    _, data_dir = agent
    fleet.deploy(DEVICE, "1.0.0")
    fleet.wait_phase(DEVICE, "activated", "1.0.0", timeout=120)
    cert, key = broker.pki.client("app-viewer")
    client = InferenceClient(
        MqttSettings(
            url=f"mqtts://127.0.0.1:{broker.port}",
            client_id="app-viewer",
            ca_file=str(broker.pki.ca_cert),
            cert_file=str(cert),
            key_file=str(key),
        ),
        device_id=DEVICE,
        app_id="app-viewer",
    )
    try:
        model_dir = data_dir / "models" / "cnn" / "current"
        x = np.load(model_dir / "vectors" / "input.npy")
        golden = np.load(model_dir / "vectors" / "output.npy")
        version, outputs = client.infer("cnn", {"input": x})
        assert version == "1.0.0"
        assert np.abs(outputs["output"] - golden).max() <= 1e-4
        with pytest.raises(InferenceError, match="unknown inputs \\['wrong'\\]"):
            client.infer("cnn", {"wrong": x})
    finally:
        client.close()
