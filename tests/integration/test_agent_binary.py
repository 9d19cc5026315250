"""Binary inference end to end: a real agent process, a real Mosquitto (mutual TLS, ACLs), the
example model on the runtime the agent's self-test chose, and the Python client in both
encodings. Hostile binary requests get an error answer that says what was expected and what
arrived, never reach the runtime (which would make the agent drop it), and the agent keeps
serving. And every installed runtime takes the decoded tensors as they are: read-only views of
the payload, aligned or not, with no copy.
"""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from agent.runtimes.inventory import scan
from agent.runtimes.registry import BACKENDS, load_backend
from shared.bundle import build_bundle, inspect_bundle
from shared.example_models import write_example
from shared.protocol import device_topic
from shared.tensors import decode_tensor_message, encode_tensor_message
from tests.integration.test_agent import (  # noqa: F401 - fixtures
    DEVICE,
    agent,
    exchange,
    fleet,
    infer_binary,
    releases,
    status,
)

pytestmark = pytest.mark.integration


def deploy(harness, data_dir):
    """Deploy 1.0.0 of the example model; return its test vectors (inputs, golden outputs)."""
    harness.deploy(DEVICE, "1.0.0")
    harness.wait_phase(DEVICE, "activated", "1.0.0", timeout=120)
    vectors = data_dir / "models" / "cnn" / "current" / "vectors"
    return np.load(vectors / "input.npy"), np.load(vectors / "output.npy")


def python_client(broker):
    from agent.client import InferenceClient
    from shared.mqtt import MqttSettings

    cert, key = broker.pki.client("app-viewer")
    return InferenceClient(
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


def test_the_python_client_gets_the_same_answers_in_both_encodings(broker, fleet, agent):  # noqa: F811
    from agent.client import InferenceError

    _, data_dir = agent
    x, golden = deploy(fleet, data_dir)
    client = python_client(broker)
    try:
        assert client.encoding == "binary"  # the default
        version, binary = client.infer("cnn", {"input": x})
        assert version == "1.0.0"
        assert binary["output"].dtype == np.float32
        assert np.abs(binary["output"] - golden).max() <= 1e-4
        _, one = client.infer("cnn", {"input": x[:1]})
        assert np.abs(one["output"] - golden[:1]).max() <= 1e-4

        client.encoding = "json"
        version, json_outputs = client.infer("cnn", {"input": x})
        assert version == "1.0.0"
        np.testing.assert_array_equal(json_outputs["output"], binary["output"])

        client.encoding = "binary"
        for inputs, error in (
            ({"wrong": x}, r"unknown inputs \['wrong'\]; the model takes \['input'\]"),
            (
                {"input": x.astype(np.float64)},
                r"input 'input': expected dtype float32 \(the model's\), got float64",
            ),
            (
                {"input": x[:, :16]},
                r"input 'input': expected shape \[-1, 32, 32, 3\] \(-1: any size\), "
                r"got \[\d+, 16, 32, 3\]",
            ),
        ):
            with pytest.raises(InferenceError, match=error):
                client.infer("cnn", inputs)
        runtime = status(data_dir)["models"]["cnn"]["runtime"]
        assert client.infer("cnn", {"input": x[:1]})[0] == "1.0.0"
        assert status(data_dir)["models"]["cnn"]["runtime"] == runtime  # no runtime dropped
    finally:
        client.close()


def test_hostile_binary_requests_are_answered_and_the_agent_keeps_serving(broker, fleet, agent):  # noqa: F811
    proc, data_dir = agent
    x, golden = deploy(fleet, data_dir)
    runtime = status(data_dir)["models"]["cnn"]["runtime"]
    app = broker.client("app-viewer")
    app.subscribe_and_wait(device_topic(DEVICE, "infer/response/app-viewer"))

    def request(correlation, inputs=None, **fields):
        header = {"correlation_id": correlation, "model": "cnn", "reply_to": "app-viewer"}
        return encode_tensor_message(
            {**header, **fields}, "inputs", inputs or {"input": x[:1]}, max_bytes=1 << 20
        )

    shape = b'"shape":[1,32,32,3]'
    hostile = {
        "truncated": (
            lambda c: request(c)[:-100],
            "'input': truncated: expected 12288 bytes at offset 0 of the tensor data, "
            "which has 12188 bytes",
        ),
        "trailing bytes": (
            lambda c: request(c) + b"\0" * 4,
            "4 bytes after the last tensor: expected 12288 bytes of tensor data, got 12292",
        ),
        "unknown dtype": (
            lambda c: request(c).replace(b'"float32"', b'"cmplx64"'),
            "inputs[0].dtype: expected one of bool, int8, uint8",
        ),
        "shape and byte length disagree": (
            lambda c: request(c).replace(shape, b'"shape":[2,32,32,3]'),
            "shape [2, 32, 32, 3] of float32 is 24576 bytes, but nbytes is 12288",
        ),
        "negative dimension": (
            lambda c: request(c).replace(shape, b'"shape":[1,32,-2,3]'),  # the same length
            "inputs[0].shape[2]: expected an integer from 0 to 262144, got -2",
        ),
        "over the payload limit": (
            lambda c: request(c, {"input": np.zeros((22, 32, 32, 3), np.float32)}),
            "bytes exceeds the limit of 262144 bytes",
        ),
        "an input the model does not have": (
            lambda c: request(c, {"input": x[:1], "extra": x[:1]}),
            "unknown inputs ['extra']; the model takes ['input']",
        ),
        "the wrong dtype": (
            lambda c: request(c, {"input": x[:1].astype(np.float16)}),
            "input 'input': expected dtype float32 (the model's), got float16",
        ),
    }
    for case, (make, error) in hostile.items():
        correlation = uuid.uuid4().hex
        answer = exchange(app, make(correlation), correlation)
        assert not answer.ok, case
        assert error in answer.error, (case, answer.error)

    # a request that names nobody to answer is dropped (and logged); the agent serves on
    app.publish(device_topic(DEVICE, "infer/request"), b"EFT1\x00\x00\x00\x04oops", qos=1)
    app.assert_no_message(window=1.0)
    good = infer_binary(app, {"input": x[:1]})
    assert good.ok, good.error
    assert np.abs(good.outputs["output"] - golden[:1]).max() <= 1e-4
    assert proc.poll() is None
    assert status(data_dir)["models"]["cnn"]["runtime"] == runtime  # no runtime was dropped


@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("binary-model")
    write_example(root / "model", size="small")
    build_bundle(root / "model", name="cnn", version="1.0.0", out=root / "b.bundle")
    return root / "model", inspect_bundle(root / "b.bundle").manifest


@pytest.mark.parametrize("runtime", list(BACKENDS))
def test_every_runtime_takes_the_decoded_views_as_they_are(small_model, runtime):
    """The agent passes a binary request's arrays to the runtime as decoded: read-only views into
    the payload, aligned when the writer aligned them, unaligned when a tensor follows one of
    odd size. Each runtime's CPU candidate must give the golden outputs for both."""
    model_dir, manifest = small_model
    backend = load_backend(BACKENDS[runtime])
    state = backend.status()
    if not state.installed:
        pytest.skip(f"{runtime} is not installed: {state.reason}")
    inventory = scan()
    artifact_index, artifact = next(
        (i, a) for i, a in enumerate(manifest.artifacts) if a.format in backend.formats
    )
    candidate = next(
        c
        for c in backend.candidates(
            artifact_index,
            artifact,
            state,
            cores=inventory.cpu.cores,
            cpu_flags=inventory.cpu.flags,
        )
        if c.device in ("CPU", "CPUExecutionProvider") and c.precision == "f32"
    )
    loaded = backend.load(model_dir, artifact, candidate)
    x = np.load(model_dir / "vectors" / "input.npy")
    golden = np.load(model_dir / "vectors" / "output.npy")
    aligned = {"input": x}
    unaligned = {"pad": np.zeros(3, np.uint8), "input": x}  # "input" starts 3 bytes in
    try:
        for inputs, is_aligned in ((aligned, True), (unaligned, False)):
            payload = encode_tensor_message({"correlation_id": "r"}, "inputs", inputs)
            view = decode_tensor_message(payload, "inputs", what="request")["inputs"]["input"]
            assert not view.flags.writeable
            assert view.flags.aligned is is_aligned
            assert np.shares_memory(view, np.frombuffer(payload, np.uint8))
            outputs = loaded.infer({"input": view})
            assert np.abs(outputs["output"] - golden).max() <= 1e-4, (runtime, is_aligned)
    finally:
        loaded.close()
