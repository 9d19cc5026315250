"""The daemon's inference thread (Agent._answer), in both encodings, with a recording link and a
fake runner: every request gets its answer in the encoding it came in, every refusal says what
was expected and what arrived, and no bad request reaches the runtime or stops the thread.

The real agent, broker and runtimes are in tests/integration/test_agent_binary.py.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest

from agent.config import AgentSettings
from agent.daemon import Agent
from agent.installed import InstalledManifest, InstalledTensor
from agent.platform import DevicePlatform
from agent.runtimes.inventory import scan
from agent.serving import ActiveModel
from shared.frames import TENSOR_MAGIC, pack_frame
from shared.mqtt import Message
from shared.protocol import InferResponse, device_topic, parse_payload
from shared.tensors import MAX_PAYLOAD, encode_tensor_message

DEVICE = "dev-001"
REQUESTS = device_topic(DEVICE, "infer/request")
IDENTITY = {"correlation_id": "r1", "model": "cnn", "reply_to": "app"}
X = np.linspace(-1, 1, 2 * 4 * 4 * 3, dtype=np.float32).reshape(2, 4, 4, 3)


class RecordingLink:
    """What the agent publishes, instead of a broker."""

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []
        self.fail_next = False

    def publish(self, topic: str, payload: bytes, **_: object) -> bool:
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("the link broke")
        self.published.append((topic, payload))
        return True


class FakeRunner:
    """Sums each sample's pixels per channel; records the feeds it was given."""

    def __init__(self, outputs: Mapping[str, np.ndarray] | None = None) -> None:
        self.feeds: list[dict[str, np.ndarray]] = []
        self.outputs = outputs

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.feeds.append(dict(feeds))
        if self.outputs is not None:
            return dict(self.outputs)
        return {"output": feeds["input"].sum(axis=(1, 2), dtype=np.float32)}


def expected(x: np.ndarray) -> np.ndarray:
    return x.sum(axis=(1, 2), dtype=np.float32)


@pytest.fixture
def agent(tmp_path: Path) -> Agent:
    settings = AgentSettings(
        device_id=DEVICE, broker="mqtt://127.0.0.1:1", data_dir=tmp_path, trust=tmp_path / "r"
    )
    agent = Agent(settings, platform=DevicePlatform(inventory=scan(), isolate_deployments=True))
    agent.link = RecordingLink()  # type: ignore[assignment]
    manifest = InstalledManifest(
        name="cnn",
        version="1.0.0",
        inputs=(InstalledTensor("input", "float32", (-1, 4, 4, 3)),),
        outputs=(InstalledTensor("output", "float32", (-1, 3)),),
        artifacts=(),
        files=(),
    )
    agent.models = {"cnn": ActiveModel("cnn", "1.0.0", manifest, FakeRunner())}  # type: ignore[arg-type]
    return agent


def runner(agent: Agent) -> FakeRunner:
    return agent.models["cnn"].runner  # type: ignore[return-value]


def ask(agent: Agent, payload: bytes) -> list[tuple[str, bytes]]:
    """Hand ``payload`` to the inference thread's handler; return what it published."""
    link: RecordingLink = agent.link  # type: ignore[assignment]
    before = len(link.published)
    agent._answer(Message(REQUESTS, payload))
    return link.published[before:]


def answer(agent: Agent, payload: bytes) -> tuple[bytes, InferResponse]:
    (published,) = ask(agent, payload)
    topic, data = published
    assert topic == device_topic(DEVICE, "infer/response/app")
    return data, parse_payload(InferResponse, data, what="inference response")


def binary(inputs: Mapping[str, np.ndarray] | None, max_bytes=MAX_PAYLOAD, **fields) -> bytes:
    return encode_tensor_message({**IDENTITY, **fields}, "inputs", inputs, max_bytes=max_bytes)


def test_a_binary_request_is_answered_in_binary_with_the_arrays_as_sent(agent):
    data, response = answer(agent, binary({"input": X}))
    assert data.startswith(b"EFT1")
    assert (response.ok, response.version, response.correlation_id) == (True, "1.0.0", "r1")
    assert response.outputs["output"].dtype == np.float32
    np.testing.assert_array_equal(response.outputs["output"], expected(X))
    (feeds,) = runner(agent).feeds
    assert not feeds["input"].flags.writeable  # the payload's bytes, not a copy


def test_a_json_request_is_answered_in_json_as_before(agent):
    request = {**IDENTITY, "inputs": {"input": X.tolist()}}
    data, response = answer(agent, json.dumps(request).encode())
    body = json.loads(data)
    assert list(body) == ["correlation_id", "model", "ok", "outputs", "version", "latency_ms"]
    assert response.ok
    np.testing.assert_allclose(np.array(body["outputs"]["output"]), expected(X), rtol=1e-6)
    (feeds,) = runner(agent).feeds
    assert feeds["input"].dtype == np.float32  # converted to the model's dtype


def test_json_requests_are_still_converted_to_the_models_dtype(agent):
    """JSON is lenient as before: integers for a float32 input are converted, not refused."""
    request = {**IDENTITY, "inputs": {"input": np.ones((1, 4, 4, 3), int).tolist()}}
    _, response = answer(agent, json.dumps(request).encode())
    assert response.ok, response.error


# A binary request the model does not take is refused before the runtime, naming the problem.
MISMATCHES = {
    "a name the model does not have": (
        {"input": X, "mask": np.ones(2, bool)},
        "unknown inputs ['mask']; the model takes ['input']",
    ),
    "another name instead of the model's": (
        {"image": X},
        "unknown inputs ['image']; the model takes ['input']",
    ),
    "no inputs": ({}, "missing inputs ['input']; the model takes ['input']"),
    "another dtype": (
        {"input": X.astype(np.float64)},
        "input 'input': expected dtype float32 (the model's), got float64",
    ),
    "another rank": (
        {"input": X[0]},
        "input 'input': expected shape [-1, 4, 4, 3] (-1: any size), got [4, 4, 3]",
    ),
    "another size": (
        {"input": np.zeros((1, 4, 5, 3), np.float32)},
        "input 'input': expected shape [-1, 4, 4, 3] (-1: any size), got [1, 4, 5, 3]",
    ),
}


@pytest.mark.parametrize("case", list(MISMATCHES))
def test_binary_inputs_must_be_what_the_model_declares(agent, case):
    inputs, error = MISMATCHES[case]
    data, response = answer(agent, binary(inputs))
    assert data.startswith(b"EFT1")
    assert not response.ok
    assert response.error == error
    assert runner(agent).feeds == []  # the runtime never saw it (it would drop the runtime)


# A JSON request the model does not take is refused before the runtime too.
JSON_MISMATCHES = {
    "a name the model does not have": (
        {"image": X.tolist()},
        "unknown inputs ['image']; the model takes ['input']",
    ),
    "no inputs": ({}, "missing inputs ['input']; the model takes ['input']"),
    "one sample without its batch axis": (
        {"input": X[0].tolist()},
        "input 'input': expected shape [-1, 4, 4, 3] (-1: any size), got [4, 4, 3]",
    ),
    "ragged lists": (
        {"input": [[1.0, 2.0], [3.0]]},
        "input 'input': expected a rectangular array of numbers, got nested lists of uneven "
        "lengths",
    ),
    "text instead of numbers": (
        {"input": [["a", "b"]]},
        "input 'input': expected a rectangular array of numbers, got text",
    ),
}


@pytest.mark.parametrize("case", list(JSON_MISMATCHES))
def test_json_inputs_the_model_does_not_take_never_reach_the_runtime(agent, case):
    inputs, error = JSON_MISMATCHES[case]
    data, response = answer(agent, json.dumps({**IDENTITY, "inputs": inputs}).encode())
    assert data.startswith(b"{")
    assert not response.ok
    assert response.error is not None
    assert response.error.startswith(error)
    assert runner(agent).feeds == []  # the runtime never saw it (it would drop the runtime)


def test_any_batch_size_is_taken_where_the_model_declares_minus_one(agent):
    for batch in (1, 5):
        x = np.ones((batch, 4, 4, 3), np.float32)
        _, response = answer(agent, binary({"input": x}))
        assert response.outputs["output"].shape == (batch, 3)


# Hostile payloads whose header names who to answer get a binary error response each.
GOOD = binary({"input": X})
NEGATIVE = {"name": "input", "dtype": "float32", "shape": [-2, 4, 4, 3], "nbytes": 384}
HOSTILE = {
    "truncated": (GOOD[:-5], "'input': truncated: expected 384 bytes at offset 0"),
    "trailing bytes": (GOOD + b"\0" * 8, "8 bytes after the last tensor"),
    "unknown dtype": (
        GOOD.replace(b'"float32"', b'"float99"'),
        "inputs[0].dtype: expected one of bool, int8",
    ),
    "shape and nbytes disagree": (
        GOOD.replace(b'"shape":[2,4,4,3]', b'"shape":[2,4,4,4]'),
        "shape [2, 4, 4, 4] of float32 is 512 bytes, but nbytes is 384",
    ),
    "negative dimension": (
        pack_frame(
            TENSOR_MAGIC, json.dumps(IDENTITY | {"inputs": [NEGATIVE]}).encode(), X.tobytes()
        ),
        "inputs[0].shape[0]: expected an integer from 0 to 262144, got -2",
    ),
    "over the payload limit": (
        binary({"input": np.zeros((1366, 4, 4, 3), np.float32)}, max_bytes=1 << 20),
        "bytes exceeds the limit of 262144 bytes",
    ),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_binary_requests_get_an_error_answer_and_the_thread_serves_on(agent, case):
    payload, error = HOSTILE[case]
    data, response = answer(agent, payload)
    assert data.startswith(b"EFT1")
    assert not response.ok
    assert response.correlation_id == "r1"
    assert error in response.error
    assert response.error.startswith("inference request: ")
    assert runner(agent).feeds == []
    _, good = answer(agent, GOOD)  # and the next request is served
    assert good.ok


def test_requests_that_name_nobody_to_answer_are_dropped_and_logged(agent, caplog):
    caplog.set_level(logging.WARNING, logger="agent.daemon")
    for payload in (
        encode_tensor_message({"model": "cnn"}, "inputs", {"input": X}),  # no correlation id
        b"EFT1\x00\x00\x00\x10{not json at all",
        b"EFT1\xff\xff\xff\xff",  # a header length beyond any limit
    ):
        assert ask(agent, payload) == []
    assert caplog.text.count("ignoring a malformed inference request") == 3


def test_outputs_too_large_to_send_become_an_error_answer(agent):
    big = np.zeros(MAX_PAYLOAD // 4, np.float32)
    agent.models["cnn"].runner = FakeRunner(outputs={"output": big})  # type: ignore[assignment]
    _, response = answer(agent, GOOD)
    assert not response.ok
    assert "exceeds the limit of 262144 bytes" in response.error


def test_an_answer_that_cannot_be_written_is_logged_not_fatal(agent, caplog):
    """A model name too long for an answer's header: nothing sensible can be sent back."""
    caplog.set_level(logging.WARNING, logger="agent.daemon")
    assert ask(agent, binary({"input": X}, model="m" * 16_100)) == []
    assert "cannot answer inference request r1" in caplog.text


def test_the_inference_thread_outlives_a_failure(agent, caplog):
    agent.link.fail_next = True  # type: ignore[attr-defined]
    for payload in (GOOD, GOOD, None):
        agent.inference.put(None if payload is None else Message(REQUESTS, payload))
    agent._serve_inference()  # returns at the None, after both requests
    assert "inference request on" in caplog.text
    assert len(agent.link.published) == 1  # type: ignore[attr-defined]


# JSON values numpy would coerce silently are refused, with what arrived.
JSON_VALUES = {
    "null": (None, "got null, objects, mixed values or integers beyond 64 bits"),
    "text": ("1.5", "got text"),
}


@pytest.mark.parametrize("case", list(JSON_VALUES))
def test_json_values_that_are_not_numbers_are_refused(agent, case):
    value, got = JSON_VALUES[case]
    inputs = {"input": np.full((1, 4, 4, 3), 0.5).tolist()}
    inputs["input"][0][0][0][0] = value  # one bad value in an otherwise good tensor
    _, response = answer(agent, json.dumps({**IDENTITY, "inputs": inputs}).encode())
    assert not response.ok
    assert response.error == f"input 'input': expected a rectangular array of numbers, {got}"
    assert runner(agent).feeds == []
