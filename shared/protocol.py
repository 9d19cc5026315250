"""The agent <-> fleet protocol over MQTT: topics, payloads and the binary frame for data.

Every device topic lives under ``edgefleet/v1/devices/<device_id>/`` so one broker ACL pattern
(``%u``) confines each device to its own topics:

==========================  =========  ======================================================
topic (under the prefix)     direction  payload
==========================  =========  ======================================================
``up/presence``              device →   :class:`Presence` (also the last will, ``online: false``)
``up/state``                 device →   :class:`ReportedState`
``up/events``                device →   :class:`DeploymentEvent`
``up/telemetry``             device →   :class:`Telemetry`
``up/fetch``                 device →   :class:`FetchRequest`
``down/cmd``                 → device   :class:`Command` (a hint; only signed data is obeyed)
``down/fetch``               → device   frame (:func:`encode_frame`): :class:`FetchResponse`+bytes
``infer/request``            app →      :class:`InferRequest` (JSON, or binary: tensors as bytes)
``infer/response/<app>``     → app      :class:`InferResponse` (in the request's encoding)
==========================  =========  ======================================================

No message is retained and nothing depends on messages queued while a device was offline: after
any (re)connect the agent reports its state and asks for fresh signed metadata.

JSON payloads are parsed with the same bounds as every other input (:mod:`shared.jsonsafe`) and
validated by pydantic models that ignore unknown fields (forward compatibility). Inference
requests and answers may also be binary (:mod:`shared.tensors`: a JSON header, then the raw
tensors); :func:`parse_payload` reads both encodings into the same models. The topics, the device
id pattern and :class:`ProtocolError` live in :mod:`shared.topics` (no pydantic) and are
re-exported here.

>>> device_topic("dev-001", UP_STATE)
'edgefleet/v1/devices/dev-001/up/state'
>>> header, data = decode_frame(encode_frame(FetchResponse(request_id="r1", kind="chunk"), b"xy"))
>>> (header.request_id, data)
('r1', b'xy')
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.errors import ManifestError
from shared.frames import FETCH_MAGIC, TENSOR_MAGIC, pack_frame, split_frame
from shared.jsonsafe import MAX_DEPTH, load_json
from shared.manifest import describe_validation_error
from shared.topics import (
    DEVICE_ID_PATTERN,
    DOWN_CMD,
    DOWN_FETCH,
    INFER_REQUEST,
    INFER_RESPONSE,
    MAX_JSON_PAYLOAD,
    PREFIX,
    UP_EVENTS,
    UP_FETCH,
    UP_PRESENCE,
    UP_STATE,
    UP_TELEMETRY,
    CommandType,
    Phase,
    ProtocolError,
    device_topic,
    parse_device_topic,
)

__all__ = [
    "DEVICE_ID_PATTERN",
    "DOWN_CMD",
    "DOWN_FETCH",
    "INFER_REQUEST",
    "INFER_RESPONSE",
    "PREFIX",
    "UP_EVENTS",
    "UP_FETCH",
    "UP_PRESENCE",
    "UP_STATE",
    "UP_TELEMETRY",
    "ChunkRef",
    "Command",
    "DeploymentEvent",
    "FetchRequest",
    "FetchResponse",
    "InferRequest",
    "InferResponse",
    "ModelState",
    "Phase",
    "Presence",
    "ProtocolError",
    "ReportedState",
    "Telemetry",
    "decode_frame",
    "device_topic",
    "encode_frame",
    "parse_device_topic",
    "parse_payload",
]

FRAME_MAGIC = FETCH_MAGIC
MAX_FRAME_HEADER = 16 * 1024


_M = TypeVar("_M", bound=BaseModel)


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class Presence(_Message):
    online: bool
    agent_version: str | None = None


class ModelState(_Message):
    """One model as the device runs it (what ``edgefleet agent status`` shows)."""

    version: str | None = None
    runtime: str | None = None  # the selected candidate's key
    previous_version: str | None = None
    state: Literal["active", "probation", "failed", "none"] = "none"
    counter: int | None = None
    rollback_floor: int | None = None


class ReportedState(_Message):
    device_id: str = Field(pattern=DEVICE_ID_PATTERN)
    seq: int = Field(ge=0)
    time: datetime
    hardware_class: str | None = None
    models: dict[str, ModelState] = Field(default_factory=dict)
    deployment: dict[str, Any] | None = None  # the deployment in progress, if any
    inventory: dict[str, Any] | None = None
    health: dict[str, Any] | None = None


class DeploymentEvent(_Message):
    device_id: str = Field(pattern=DEVICE_ID_PATTERN)
    seq: int = Field(ge=0)  # per device, monotonic: the fleet drops duplicates by (device, seq)
    time: datetime
    model: str
    version: str
    phase: Phase
    deployment_id: str | None = None
    failure_class: str | None = None  # download, verification, self_test, crash_loop, ...
    detail: str | None = Field(default=None, max_length=4096)
    metrics: dict[str, float] = Field(default_factory=dict)


class Telemetry(_Message):
    device_id: str = Field(pattern=DEVICE_ID_PATTERN)
    seq: int = Field(ge=0)
    time: datetime
    models: dict[str, dict[str, Any]] = Field(default_factory=dict)
    health: dict[str, float] = Field(default_factory=dict)
    dropped: int = 0  # records dropped from the offline journal because it was full


class ChunkRef(_Message):
    file: str
    index: int = Field(ge=0)


class FetchRequest(_Message):
    """Ask the fleet for signed metadata, a release's manifest, or payload chunks."""

    request_id: str = Field(min_length=1, max_length=64)
    kind: Literal["metadata", "manifest", "chunks"]
    name: str | None = Field(default=None, max_length=128)  # metadata file, e.g. timestamp.json
    target: str | None = Field(default=None, max_length=256)  # NAME/VERSION/manifest.json
    chunks: list[ChunkRef] = Field(default_factory=list, max_length=256)


class FetchResponse(_Message):
    """The header of a ``down/fetch`` frame; the frame's bytes follow it."""

    request_id: str
    kind: Literal["metadata", "manifest", "chunk", "error"]
    name: str | None = None
    target: str | None = None
    file: str | None = None
    index: int | None = None
    offset: int = 0  # where these bytes go inside the chunk (or the document)
    total: int | None = None  # the chunk's (or document's) full size
    error: str | None = None
    status: int = 200  # 404: no such metadata or target


class Command(_Message):
    """A hint from the fleet. ``deploy`` carries a director-signed order, verified on the device."""

    id: str = Field(min_length=1, max_length=64)
    type: CommandType
    issued_at: datetime
    order: str | None = Field(default=None, max_length=64 * 1024)  # signed order (JSON text)
    model: str | None = None


class InferRequest(_Message):
    correlation_id: str = Field(min_length=1, max_length=128)
    model: str
    # name -> nested lists (JSON) or a numpy array (binary); one input, or a batch on axis 0
    inputs: dict[str, Any]
    reply_to: str | None = Field(default=None, max_length=256)  # an app id, not a topic


class InferResponse(_Message):
    correlation_id: str
    model: str
    ok: bool
    outputs: dict[str, Any] | None = None  # name -> nested lists (JSON) or a numpy array (binary)
    error: str | None = None
    version: str | None = None
    latency_ms: float | None = None


# The messages that may come in the binary encoding, and the field that holds their tensors.
TENSOR_FIELDS: dict[type[BaseModel], str] = {InferRequest: "inputs", InferResponse: "outputs"}


def parse_payload(model: type[_M], data: bytes, *, what: str, tensors: bool = False) -> _M:
    """Parse a JSON control payload into ``model``, bounded in size and depth.

    Raises:
        ProtocolError: oversized, invalid JSON, or not the expected shape.

    With ``tensors`` (inference requests), nesting is bounded by the parser's recursion limit
    and by numpy's maximum rank instead of a walk over every element.

    An :class:`InferRequest` or :class:`InferResponse` in the binary encoding
    (:mod:`shared.tensors`) is read from its header and raw tensors instead, with the tensors as
    read-only numpy arrays; its fields are validated as the JSON form's.
    """
    try:
        if model in TENSOR_FIELDS and data[:4] == TENSOR_MAGIC:
            # numpy only when a binary payload arrives: the fleet service never parses one
            from shared.tensors import decode_tensor_message

            raw = decode_tensor_message(data, TENSOR_FIELDS[model], what=what)
        else:
            raw = load_json(
                data,
                what=what,
                max_bytes=MAX_JSON_PAYLOAD,
                max_depth=None if tensors else MAX_DEPTH,
            )
        return model.model_validate(raw)
    except ManifestError as e:
        raise ProtocolError(str(e), check="protocol") from e
    except ValidationError as e:
        raise ProtocolError(f"{what}: {describe_validation_error(e)}") from e


def encode_frame(header: FetchResponse, data: bytes = b"") -> bytes:
    """``EFR1`` + 4-byte big-endian header length + header JSON + raw bytes."""
    head = json.dumps(
        header.model_dump(mode="json", exclude_none=True), separators=(",", ":")
    ).encode()
    return pack_frame(FRAME_MAGIC, head, data)


def decode_frame(frame: bytes) -> tuple[FetchResponse, bytes]:
    """Split a ``down/fetch`` frame. Raises :class:`ProtocolError` on any malformation."""
    head, data = split_frame(frame, FRAME_MAGIC, max_header=MAX_FRAME_HEADER, what="fetch frame")
    header = parse_payload(FetchResponse, head, what="fetch frame header")
    return header, bytes(data)
