"""The protocol messages the agent daemon reads and writes, without pydantic.

:mod:`shared.protocol` defines every payload as a pydantic model, and the fleet parses with
those. The daemon handles only a few of them, and pydantic with the models would cost it about
10 MB of resident memory for as long as it runs (ADR 0008). So this module reads and writes them
as plain values, under the same rules:

- **Reading** (``down/cmd``, ``infer/request``): the same bounded JSON parser
  (:mod:`shared.jsonsafe`, same size limit), then each field is checked for its type, length and
  allowed values as the model in :mod:`shared.protocol` declares it. Unknown fields are ignored
  (forward compatibility); anything else is refused with a :class:`ProtocolError` that names the
  field, what was expected and what arrived. An inference request may also be binary: its
  header is checked field by field the same way, and its tensors are read by the codec that
  the client and the protocol's models use too (:mod:`shared.tensors`).
- **Writing** (presence, state, events, telemetry, inference answers): compact JSON that the
  fleet's models accept; non-finite floats are written as ``null``, as pydantic does. An
  inference answer is written in the encoding of its request.

``tests/unit/test_agent_messages.py`` holds both sides to the models: every payload there is
accepted or refused alike by this module and by :func:`shared.protocol.parse_payload`, and what
this module writes parses into the fleet's models.

>>> parse_command(b'{"id": "c1", "type": "check", "issued_at": "2026-01-01T00:00:00Z"}').type
'check'
>>> encode_presence(online=False)
b'{"online":false,"agent_version":null}'
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Literal, TypeVar, cast, get_args

import numpy as np

from shared.errors import ManifestError
from shared.jsonsafe import MAX_DEPTH, json_kind, load_json
from shared.tensors import encode_tensor_message, is_tensor_message, read_tensor_message
from shared.topics import DEVICE_ID_PATTERN, MAX_JSON_PAYLOAD, CommandType, Phase, ProtocolError

__all__ = [
    "PHASES",
    "Command",
    "InferRequest",
    "InferRequestError",
    "ModelState",
    "Phase",
    "encode_event",
    "encode_infer_response",
    "encode_presence",
    "encode_state",
    "encode_telemetry",
    "parse_command",
    "parse_infer_request",
]

PHASES: tuple[str, ...] = get_args(Phase)
COMMAND_TYPES: tuple[str, ...] = get_args(CommandType)
MAX_DETAIL = 4096  # DeploymentEvent.detail
_DEVICE_ID = re.compile(DEVICE_ID_PATTERN)
_T = TypeVar("_T")


# -- reading -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    """``down/cmd``: a hint from the fleet. ``deploy`` carries a signed order (JSON text)."""

    id: str
    type: CommandType
    issued_at: datetime
    order: str | None = None
    model: str | None = None


@dataclass(frozen=True)
class InferRequest:
    """``infer/request``: ``inputs`` maps input names to tensors (one input, or a batch on axis 0).

    A JSON request's tensors are nested lists, to be converted to the model's dtypes; a binary
    request's are read-only numpy arrays, as sent, and its answer is binary too.
    """

    correlation_id: str
    model: str
    inputs: dict[str, Any]
    reply_to: str | None = None  # an app id, not a topic
    binary: bool = False


class InferRequestError(ProtocolError):
    """A binary request that names who to answer, but whose tensors are refused.

    ``request`` (with no inputs) identifies it, so that the daemon can answer with the error,
    in the request's encoding.
    """

    def __init__(self, message: str, request: InferRequest) -> None:
        super().__init__(message)
        self.request = request


class _Fields:
    """Typed reads of one parsed JSON object, each refusal naming the field."""

    def __init__(self, raw: Any, what: str) -> None:
        if not isinstance(raw, dict):
            raise ProtocolError(f"{what}: expected a JSON object, got {json_kind(raw)}")
        self.raw: dict[str, Any] = raw
        self.what = what

    def refuse(self, name: str, problem: str) -> ProtocolError:
        return ProtocolError(f"{self.what}: {name}: {problem}")

    def get(self, name: str, kind: type[_T], *, optional: bool = False) -> _T | None:
        value = self.raw.get(name)
        if value is None:
            if optional:
                return None
            raise self.refuse(name, "required" if name not in self.raw else "must not be null")
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise self.refuse(name, f"expected {_KINDS[kind]}, got {json_kind(value)}")
        return value

    def text(self, name: str, *, min_len: int = 0, max_len: int | None = None) -> str:
        value = self.get(name, str)
        assert value is not None
        return self._length(name, value, min_len, max_len)

    def optional_text(self, name: str, *, max_len: int | None = None) -> str | None:
        value = self.get(name, str, optional=True)
        return None if value is None else self._length(name, value, 0, max_len)

    def choice(self, name: str, choices: tuple[str, ...]) -> str:
        value = self.text(name)
        if value not in choices:
            raise self.refuse(name, f"expected one of {', '.join(choices)}, got {value[:40]!r}")
        return value

    def timestamp(self, name: str) -> datetime:
        value = self.text(name, max_len=64)
        try:
            return datetime.fromisoformat(value)
        except ValueError:
            raise self.refuse(name, f"expected an ISO 8601 date and time, got {value!r}") from None

    def _length(self, name: str, value: str, min_len: int, max_len: int | None) -> str:
        if len(value) < min_len:
            raise self.refuse(name, f"expected at least {min_len} characters, got {len(value)}")
        if max_len is not None and len(value) > max_len:
            raise self.refuse(name, f"expected at most {max_len} characters, got {len(value)}")
        return value


_KINDS = {
    str: "a string",
    dict: "an object",
    list: "an array",
    bool: "true or false",
    int: "an integer",
}
INFER_REQUEST = "inference request"  # what the refusals of an inference request start with


def _load(data: bytes, *, what: str, max_depth: int | None) -> _Fields:
    try:
        raw = load_json(data, what=what, max_bytes=MAX_JSON_PAYLOAD, max_depth=max_depth)
    except ManifestError as e:
        raise ProtocolError(str(e), check="protocol") from e
    return _Fields(raw, what)


def parse_command(data: bytes) -> Command:
    """Parse a ``down/cmd`` payload.

    Raises:
        ProtocolError: oversized, invalid JSON, or a field of the wrong type, length or value.
    """
    fields = _load(data, what="command", max_depth=MAX_DEPTH)
    return Command(
        id=fields.text("id", min_len=1, max_len=64),
        type=cast(CommandType, fields.choice("type", COMMAND_TYPES)),
        issued_at=fields.timestamp("issued_at"),
        order=fields.optional_text("order", max_len=64 * 1024),
        model=fields.optional_text("model"),
    )


def parse_infer_request(data: bytes) -> InferRequest:
    """Parse an ``infer/request`` payload, JSON or binary (:mod:`shared.tensors`).

    The tensors' nesting is bounded by the parser's recursion limit and by numpy's maximum rank
    (as :func:`shared.protocol.parse_payload` with ``tensors=True``), not by a walk over every
    element.

    Raises:
        InferRequestError: a binary request whose header is valid but whose tensors are not
            (or which is over the payload limit): it can still be answered.
        ProtocolError: oversized, invalid JSON, or a field of the wrong type, length or value.
    """
    if is_tensor_message(data):
        return _parse_binary_infer_request(data)
    fields = _load(data, what=INFER_REQUEST, max_depth=None)
    inputs = fields.get("inputs", dict)
    assert inputs is not None
    return _infer_request(fields, inputs)


def _infer_request(
    fields: _Fields, inputs: dict[str, Any], *, binary: bool = False
) -> InferRequest:
    return InferRequest(
        correlation_id=fields.text("correlation_id", min_len=1, max_len=128),
        model=fields.text("model"),
        inputs=inputs,
        reply_to=fields.optional_text("reply_to", max_len=256),
        binary=binary,
    )


def _parse_binary_infer_request(data: bytes) -> InferRequest:
    """The header's fields as a JSON request's, then the tensors it describes."""
    message = read_tensor_message(data, what=INFER_REQUEST)
    fields = _Fields(message.header, INFER_REQUEST)
    request = _infer_request(fields, {}, binary=True)
    try:  # from here on, every refusal can be answered
        fields.get("inputs", list)
        inputs = message.tensors("inputs")
    except ProtocolError as e:
        raise InferRequestError(str(e), request) from e
    assert inputs is not None
    return replace(request, inputs=inputs)


# -- writing -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelState:
    """One model as the device runs it, in a state report (``shared.protocol.ModelState``)."""

    version: str | None = None
    runtime: str | None = None  # the selected candidate's key
    previous_version: str | None = None
    state: Literal["active", "probation", "failed", "none"] = "none"
    counter: int | None = None
    rollback_floor: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def _finite(value: Any) -> Any:
    """``value`` with every NaN or infinity replaced by None (pydantic writes them as null)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _dumps(payload: dict[str, Any]) -> bytes:
    try:
        return json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()
    except ValueError:  # a NaN or an infinity somewhere: rare, so only then walk the value
        return json.dumps(_finite(payload), separators=(",", ":"), allow_nan=False).encode()


def _time(value: datetime) -> str:
    return value.isoformat().replace("+00:00", "Z")


def _check_device(device_id: str, seq: int) -> None:
    if not _DEVICE_ID.fullmatch(device_id):
        raise ValueError(f"device id {device_id[:80]!r} must match {DEVICE_ID_PATTERN}")
    if seq < 0:
        raise ValueError(f"seq must be >= 0, got {seq}")


def encode_presence(*, online: bool, agent_version: str | None = None) -> bytes:
    """``up/presence`` (also the last will, with ``online=False``)."""
    return _dumps({"online": online, "agent_version": agent_version})


def encode_event(
    *,
    device_id: str,
    seq: int,
    time: datetime,
    model: str,
    version: str,
    phase: str,
    deployment_id: str | None = None,
    failure_class: str | None = None,
    detail: str | None = None,
    metrics: dict[str, float] | None = None,
) -> bytes:
    """``up/events``: one deployment step.

    Raises:
        ValueError: a phase, device id, sequence or detail that the fleet would refuse.
    """
    _check_device(device_id, seq)
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {', '.join(PHASES)}, got {phase!r}")
    if detail is not None and len(detail) > MAX_DETAIL:
        raise ValueError(f"detail must be at most {MAX_DETAIL} characters, got {len(detail)}")
    payload: dict[str, Any] = {
        "device_id": device_id,
        "seq": seq,
        "time": _time(time),
        "model": model,
        "version": version,
        "phase": phase,
        "deployment_id": deployment_id,
        "failure_class": failure_class,
        "detail": detail,
        "metrics": {k: float(v) for k, v in (metrics or {}).items()},
    }
    return _dumps({k: v for k, v in payload.items() if v is not None})


def encode_state(
    *,
    device_id: str,
    seq: int,
    time: datetime,
    hardware_class: str | None,
    models: dict[str, ModelState],
    inventory: dict[str, Any] | None,
) -> bytes:
    """``up/state``: what the device runs (fields that are None are left out)."""
    _check_device(device_id, seq)
    payload: dict[str, Any] = {
        "device_id": device_id,
        "seq": seq,
        "time": _time(time),
        "hardware_class": hardware_class,
        "models": {name: state.to_dict() for name, state in models.items()},
        "inventory": inventory,
    }
    return _dumps({k: v for k, v in payload.items() if v is not None})


def encode_telemetry(
    *,
    device_id: str,
    seq: int,
    time: datetime,
    models: dict[str, dict[str, Any]],
    health: dict[str, float],
    dropped: int,
) -> bytes:
    """``up/telemetry``: request counters and latencies per model, health, journal drops."""
    _check_device(device_id, seq)
    return _dumps(
        {
            "device_id": device_id,
            "seq": seq,
            "time": _time(time),
            "models": models,
            "health": {k: float(v) for k, v in health.items()},
            "dropped": dropped,
        }
    )


def encode_infer_response(
    *,
    correlation_id: str,
    model: str,
    ok: bool,
    outputs: dict[str, Any] | None = None,
    error: str | None = None,
    version: str | None = None,
    latency_ms: float | None = None,
    binary: bool = False,
) -> bytes:
    """``infer/response/<app>``: the outputs, or the error (None left out).

    JSON writes the outputs (numpy arrays or nested lists) as nested lists; ``binary`` writes
    them as raw tensors (:mod:`shared.tensors`) behind a JSON header of the other fields.

    Raises:
        ValueError: (binary) an output of a dtype that cannot travel as bytes, or an answer over
            the payload limit.
    """
    if not binary and outputs is not None:
        outputs = {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in outputs.items()}
    fields: dict[str, Any] = {
        "correlation_id": correlation_id,
        "model": model,
        "ok": ok,
        "outputs": None if binary else outputs,
        "error": error,
        "version": version,
        "latency_ms": latency_ms,
    }
    fields = {k: v for k, v in fields.items() if v is not None}
    if binary:
        return encode_tensor_message(fields, "outputs", outputs)
    return _dumps(fields)
