"""The daemon's pydantic-free messages (agent.messages) against the protocol's models.

Every payload below is accepted by both agent.messages and shared.protocol.parse_payload with the
same values, or refused by both; what the agent writes parses into the fleet's models. Inference
requests and answers are held to this in both encodings, JSON and binary (shared.tensors).
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from typing import get_args

import numpy as np
import pytest

from agent import messages
from shared import protocol
from shared.frames import TENSOR_MAGIC, pack_frame
from shared.protocol import ProtocolError, parse_payload
from shared.tensors import encode_tensor_message

NOW = "2026-11-21T10:00:00Z"
COMMAND = {"id": "c1", "type": "deploy", "issued_at": NOW, "order": "{}", "model": "cnn"}


def nested(depth):
    value = [1.0]
    for _ in range(depth):
        value = [value]
    return value


REQUEST = {"correlation_id": "r1", "model": "cnn", "inputs": {"x": [[1.0, 2.0]]}, "reply_to": "app"}


def both(agent_parse, model, payload, *, what, tensors=False):
    """(agent result, protocol result), each a value or the ProtocolError raised."""
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    results = []
    for parse in (
        lambda: agent_parse(data),
        lambda: parse_payload(model, data, what=what, tensors=tensors),
    ):
        try:
            results.append(parse())
        except ProtocolError as e:
            results.append(e)
    return results


COMMANDS_ACCEPTED = [
    COMMAND,
    {"id": "c1", "type": "check", "issued_at": NOW},
    {"id": "c1", "type": "report", "issued_at": "2026-11-21T10:00:00+02:00", "order": None},
    {"id": "c1", "type": "revert", "issued_at": "2026-11-21T10:00:00.123456", "model": "m"},
    {"id": "x" * 64, "type": "check", "issued_at": NOW, "order": "o" * 65536},
    {**COMMAND, "unknown": [1, 2, 3]},  # unknown fields are ignored
]
COMMANDS_REFUSED = [
    b"",
    b"not json",
    b"[]",
    b'{"id": "c1", "id": "c2", "type": "check", "issued_at": "2026-11-21T10:00:00Z"}',
    b'{"id": "c1", "type": "check", "issued_at": "2026-11-21T10:00:00Z", "x": NaN}',
    {"type": "check", "issued_at": NOW},
    {**COMMAND, "id": ""},
    {**COMMAND, "id": "x" * 65},
    {**COMMAND, "id": 7},
    {**COMMAND, "id": None},
    {**COMMAND, "type": "reboot"},
    {**COMMAND, "type": None},
    {**COMMAND, "type": ["check"]},
    {**COMMAND, "issued_at": "yesterday"},
    {**COMMAND, "issued_at": None},
    {**COMMAND, "order": "o" * 65537},
    {**COMMAND, "order": {"signed": {}}},
    {**COMMAND, "model": 3},
    {**COMMAND, "model": True},
    {**COMMAND, "padding": "p" * (256 * 1024)},  # over the payload limit
    {**COMMAND, "deep": nested(40)},  # deeper than MAX_DEPTH
]


def test_command_refusals_name_the_field_and_what_arrived():
    with pytest.raises(ProtocolError, match=r"^command: id: expected a string, got a number$"):
        messages.parse_command(json.dumps({**COMMAND, "id": 7}).encode())
    with pytest.raises(ProtocolError, match=r"type: expected one of check, deploy, .*'reboot'"):
        messages.parse_command(json.dumps({**COMMAND, "type": "reboot"}).encode())
    with pytest.raises(ProtocolError, match=r"order: expected at most 65536 characters, got 65537"):
        messages.parse_command(json.dumps({**COMMAND, "order": "o" * 65537}).encode())
    with pytest.raises(ProtocolError, match=r"^command: issued_at: required$"):
        messages.parse_command(b'{"id": "c1", "type": "check"}')


def test_command_time_must_be_text():
    """Stricter than pydantic on purpose: the fleet writes times as ISO 8601 text, never as
    seconds since the epoch, which pydantic's lax mode would also take."""
    with pytest.raises(ProtocolError, match="issued_at: expected a string, got a number"):
        messages.parse_command(json.dumps({**COMMAND, "issued_at": 1_790_000_000}).encode())


def binary(fields, inputs=None, **options):
    """A binary inference request: ``fields`` in the header, ``inputs`` as raw tensors."""
    return encode_tensor_message(fields, "inputs", inputs, **options)


def binary_header(header):
    """A binary inference request of this header alone, written by hand."""
    return pack_frame(TENSOR_MAGIC, json.dumps(header).encode())


X = np.array([[1.0, 2.0]], dtype=np.float32)
IDENTITY = {"correlation_id": "r1", "model": "cnn", "reply_to": "app"}

REQUESTS_ACCEPTED = [
    REQUEST,
    {"correlation_id": "r", "model": "", "inputs": {}},
    {"correlation_id": "r" * 128, "model": "cnn", "inputs": {"x": 1}, "reply_to": "a" * 256},
    {**REQUEST, "inputs": {"x": nested(40)}},  # tensors: no walk over the nesting
    {**REQUEST, "reply_to": None, "extra": {"ignored": True}},
    binary(IDENTITY, {"x": X}),
    binary({"correlation_id": "r", "model": ""}, {}),
    binary({**IDENTITY, "correlation_id": "r" * 128, "reply_to": "a" * 256}, {"x": X, "y": X}),
    binary({**IDENTITY, "reply_to": None, "extra": {"ignored": [1]}}, {"x": np.int8(3)}),
]
REQUESTS_REFUSED = [
    b"[1, 2]",
    b"{",
    {"model": "cnn", "inputs": {}},
    {**REQUEST, "correlation_id": ""},
    {**REQUEST, "correlation_id": "r" * 129},
    {**REQUEST, "correlation_id": 1},
    {**REQUEST, "model": None},
    {**REQUEST, "model": ["cnn"]},
    {**REQUEST, "inputs": [[1.0]]},
    {**REQUEST, "inputs": None},
    {**REQUEST, "reply_to": "a" * 257},
    {**REQUEST, "reply_to": 5},
    {**REQUEST, "inputs": {"x": [0.0] * 60_000}},  # over the payload limit
    b"EFT1",
    b"EFT1\x00\x00\x00\x02[]",
    binary({"model": "cnn"}, {"x": X}),
    binary({**IDENTITY, "correlation_id": ""}, {"x": X}),
    binary({**IDENTITY, "correlation_id": "r" * 129}, {"x": X}),
    binary({**IDENTITY, "model": 3}, {"x": X}),
    binary({**IDENTITY, "reply_to": "a" * 257}, {"x": X}),
    binary(IDENTITY),  # no inputs
    binary_header({**IDENTITY, "inputs": None}),
    binary_header({**IDENTITY, "inputs": {}}),
    binary(IDENTITY, {"x": X})[:-1],  # truncated
    binary(IDENTITY, {"x": X}) + b"\0",  # trailing bytes
    binary(IDENTITY, {"x": X}).replace(b'"float32"', b'"float99"'),
    binary(IDENTITY, {"x": np.zeros(65_536, np.float32)}, max_bytes=1 << 20),  # over the limit
]


KINDS = {
    "command": (messages.parse_command, messages.Command, protocol.Command, False),
    "inference request": (
        messages.parse_infer_request,
        messages.InferRequest,
        protocol.InferRequest,
        True,
    ),
}


@pytest.mark.parametrize(
    ("what", "payload"),
    [("command", p) for p in COMMANDS_ACCEPTED]
    + [("inference request", p) for p in REQUESTS_ACCEPTED],
)
def test_accepted_alike(what, payload):
    parse, ours_type, model, tensors = KINDS[what]
    ours, theirs = both(parse, model, payload, what=what, tensors=tensors)
    assert isinstance(ours, ours_type), ours
    assert isinstance(theirs, model), theirs
    values = {k: v for k, v in ours.__dict__.items() if k != "binary"}
    expected = theirs.model_dump()
    if getattr(ours, "binary", False):  # arrays: compared one by one, as arrays
        assert values.pop("inputs").keys() == expected["inputs"].keys()
        for name, array in ours.inputs.items():
            assert array.dtype == expected["inputs"][name].dtype
            np.testing.assert_array_equal(array, expected["inputs"][name])
        del expected["inputs"]
    assert values == expected


@pytest.mark.parametrize(
    ("what", "payload"),
    [("command", p) for p in COMMANDS_REFUSED]
    + [("inference request", p) for p in REQUESTS_REFUSED],
)
def test_refused_alike(what, payload):
    parse, _, model, tensors = KINDS[what]
    ours, theirs = both(parse, model, payload, what=what, tensors=tensors)
    assert isinstance(theirs, ProtocolError), theirs
    assert isinstance(ours, ProtocolError), ours
    assert str(ours).startswith(what)


def test_a_binary_request_records_its_encoding_and_keeps_its_arrays():
    request = messages.parse_infer_request(binary(IDENTITY, {"x": X}))
    assert request.binary
    assert not request.inputs["x"].flags.writeable  # a view of the payload
    np.testing.assert_array_equal(request.inputs["x"], X)
    assert not messages.parse_infer_request(json.dumps(REQUEST).encode()).binary


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (binary(IDENTITY), r"^inference request: inputs: required$"),
        (
            binary_header({**IDENTITY, "inputs": {}}),
            r"^inference request: inputs: expected an array",
        ),
        (
            binary_header({**IDENTITY, "inputs": None}),
            r"^inference request: inputs: must not be null",
        ),
        (binary(IDENTITY, {"x": X})[:-2], r"'x': truncated: expected 8 bytes at offset 0"),
        (binary(IDENTITY, {"x": X}) + b"!", r"1 bytes after the last tensor"),
        (
            binary(IDENTITY, {"x": np.zeros(65_536, np.float32)}, max_bytes=1 << 20),
            r"^inference request: 262\d+ bytes exceeds the limit of 262144 bytes$",
        ),
    ],
)
def test_a_binary_request_with_bad_tensors_can_still_be_answered(payload, message):
    """The header names who to answer: the refusal carries it, for the error response."""
    with pytest.raises(messages.InferRequestError, match=message) as refused:
        messages.parse_infer_request(payload)
    assert refused.value.request == messages.InferRequest(
        correlation_id="r1", model="cnn", inputs={}, reply_to="app", binary=True
    )


@pytest.mark.parametrize(
    "payload",
    [
        binary({"model": "cnn"}, {"x": X}),  # no correlation id: nobody to answer
        binary({**IDENTITY, "reply_to": 5}, {"x": X}),
        b"EFT1\x00\x00\x00\x05{oops",
    ],
)
def test_a_binary_request_without_a_valid_identity_cannot_be_answered(payload):
    with pytest.raises(ProtocolError) as refused:
        messages.parse_infer_request(payload)
    assert not isinstance(refused.value, messages.InferRequestError)


def test_vocabularies_match_the_protocol():
    assert get_args(protocol.Phase) == messages.PHASES
    assert get_args(protocol.Command.model_fields["type"].annotation) == messages.COMMAND_TYPES
    detail = protocol.DeploymentEvent.model_fields["detail"].metadata
    assert [m.max_length for m in detail] == [messages.MAX_DETAIL]


def test_model_state_values_match_the_protocol():
    allowed = get_args(protocol.ModelState.model_fields["state"].annotation)
    for state in allowed:
        encoded = messages.ModelState(version="1", state=state).to_dict()
        assert protocol.ModelState.model_validate(encoded).state == state


# -- writing --------------------------------------------------------------------------------------

TIME = datetime(2026, 11, 21, 10, 0, 0, 123456, tzinfo=UTC)


def parsed(model, data):
    return parse_payload(model, data, what=model.__name__)


def test_presence_parses_as_the_fleet_reads_it():
    assert parsed(protocol.Presence, messages.encode_presence(online=False)) == protocol.Presence(
        online=False
    )
    data = messages.encode_presence(online=True, agent_version="0.1.0")
    assert parsed(protocol.Presence, data) == protocol.Presence(online=True, agent_version="0.1.0")
    assert data == protocol.Presence(online=True, agent_version="0.1.0").model_dump_json().encode()


def test_event_parses_as_the_fleet_reads_it():
    fields = {
        "device_id": "dev-001",
        "seq": 5,
        "time": TIME,
        "model": "cnn",
        "version": "1.0.0",
        "phase": "failed",
        "failure_class": "self_test",
        "detail": "too slow",
        "metrics": {"p50_ms": 2, "p99_ms": 3.5},
    }
    data = messages.encode_event(**fields)
    expected = protocol.DeploymentEvent(**fields)
    assert parsed(protocol.DeploymentEvent, data) == expected
    assert json.loads(data) == json.loads(expected.model_dump_json(exclude_none=True))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"phase": "exploded"}, "phase must be one of"),
        ({"detail": "d" * 4097}, "detail must be at most 4096 characters, got 4097"),
        ({"device_id": "../etc"}, "device id '../etc' must match"),
        ({"seq": -1}, "seq must be >= 0, got -1"),
    ],
)
def test_event_the_fleet_would_refuse_is_not_written(fields, message):
    event = {
        "device_id": "dev-001",
        "seq": 1,
        "time": TIME,
        "model": "cnn",
        "version": "1",
        "phase": "received",
    }
    with pytest.raises(ValueError, match=message):
        messages.encode_event(**{**event, **fields})


def test_state_parses_as_the_fleet_reads_it():
    models = {
        "cnn": messages.ModelState(
            version="2.0.0",
            runtime="onnxruntime/CPUExecutionProvider/onnx:fp32/threads=1",
            previous_version="1.0.0",
            state="probation",
            counter=3,
            rollback_floor=2,
        ),
        "empty": messages.ModelState(),
    }
    fields = {
        "device_id": "dev-001",
        "seq": 9,
        "time": TIME,
        "hardware_class": "x86-avx2",
        "inventory": {"cpu": {"cores": 2, "flags": ["avx2"]}, "accelerators": []},
    }
    data = messages.encode_state(**fields, models=models)
    expected = protocol.ReportedState(
        **fields, models={n: protocol.ModelState(**m.to_dict()) for n, m in models.items()}
    )
    assert parsed(protocol.ReportedState, data) == expected
    assert json.loads(data) == json.loads(expected.model_dump_json(exclude_none=True))


def test_telemetry_parses_as_the_fleet_reads_it():
    summary = {"version": "1", "requests": 3, "errors": 0, "latency_ms": {"p50": 0.25}}
    fields = {
        "device_id": "dev-001",
        "seq": 10,
        "time": TIME,
        "models": {"cnn": summary},
        "health": {"cpu_temp_c": 51, "mem_available_mb": 900.5},
        "dropped": 2,
    }
    data = messages.encode_telemetry(**fields)
    expected = protocol.Telemetry(**fields)
    assert parsed(protocol.Telemetry, data) == expected
    assert json.loads(data) == json.loads(expected.model_dump_json())


def test_non_finite_floats_are_written_as_null_like_pydantic():
    data = messages.encode_telemetry(
        device_id="dev-001",
        seq=1,
        time=TIME,
        models={"cnn": {"latency_ms": {"p50": math.nan}}},
        health={"load": math.inf},
        dropped=0,
    )
    assert json.loads(data)["models"] == {"cnn": {"latency_ms": {"p50": None}}}
    assert json.loads(data)["health"] == {"load": None}
    answer = messages.encode_infer_response(
        correlation_id="r1", model="cnn", ok=True, outputs={"y": [[1.0, math.nan]]}
    )
    expected = protocol.InferResponse(
        correlation_id="r1", model="cnn", ok=True, outputs={"y": [[1.0, math.nan]]}
    )
    assert json.loads(answer) == json.loads(expected.model_dump_json(exclude_none=True))


def test_inference_answers_parse_as_the_client_reads_them():
    for fields in (
        {"ok": True, "outputs": {"y": [[0.5, 0.25]]}, "version": "1", "latency_ms": 0.031},
        {"ok": False, "error": "no model 'cnn' is active on this device"},
    ):
        data = messages.encode_infer_response(correlation_id="r1", model="cnn", **fields)
        expected = protocol.InferResponse(correlation_id="r1", model="cnn", **fields)
        assert parsed(protocol.InferResponse, data) == expected
        assert data == expected.model_dump_json(exclude_none=True).encode()


def test_binary_answers_parse_as_the_client_reads_them():
    outputs = {"y": np.array([[0.5, np.nan]], np.float32), "k": np.array([3], np.int64)}
    data = messages.encode_infer_response(
        correlation_id="r1",
        model="cnn",
        ok=True,
        outputs=outputs,
        version="1",
        latency_ms=0.031,
        binary=True,
    )
    answer = parsed(protocol.InferResponse, data)
    assert (answer.correlation_id, answer.ok, answer.version) == ("r1", True, "1")
    for name, array in outputs.items():
        assert answer.outputs[name].dtype == array.dtype
        np.testing.assert_array_equal(answer.outputs[name], array)
    error = messages.encode_infer_response(
        correlation_id="r1", model="cnn", ok=False, error="unknown inputs ['z']", binary=True
    )
    assert error.startswith(b"EFT1")
    assert parsed(protocol.InferResponse, error) == protocol.InferResponse(
        correlation_id="r1", model="cnn", ok=False, error="unknown inputs ['z']"
    )


def test_json_answers_take_arrays_and_write_them_as_lists():
    array = np.array([[0.5, 0.25]], np.float32)
    assert messages.encode_infer_response(
        correlation_id="r1", model="cnn", ok=True, outputs={"y": array}
    ) == messages.encode_infer_response(
        correlation_id="r1", model="cnn", ok=True, outputs={"y": array.tolist()}
    )
