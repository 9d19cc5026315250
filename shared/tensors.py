"""Tensors as raw bytes: the binary encoding of inference requests and answers.

JSON carries a tensor as nested lists of decimal numbers: the small example model's 32x32x3
float32 input becomes about 63 KB of text, which takes a millisecond to parse and as long to
build. The binary encoding sends the same tensor as its 12 KB of machine bytes, described by a
small JSON header, in the protocol's frame (:mod:`shared.frames`, magic ``EFT1``)::

    "EFT1" | u32 big-endian header length | header JSON | tensor 0 | tensor 1 | ...

The header is the JSON message itself, with its tensor field (``inputs`` of a request,
``outputs`` of an answer) replaced by a list that describes each tensor, in the order of the
bytes that follow::

    {"correlation_id": "a1b2", "model": "cnn", "reply_to": "app-viewer",
     "inputs": [{"name": "input", "dtype": "float32", "shape": [1, 32, 32, 3], "nbytes": 12288}]}

Each tensor's bytes are its elements in C order (row-major), little-endian, with nothing between
tensors: ``nbytes`` must be the product of ``shape`` times the size of ``dtype``, and the tensors
must fill the rest of the payload exactly. The writer pads the header with spaces (JSON
whitespace) so that the first tensor starts at a multiple of 8 bytes; a reader does not rely on
it. The limits are the constants below; ``docs/protocol.md`` describes the layout byte by byte.

Reading is strict: every refusal is a :class:`~shared.topics.ProtocolError` that names the
tensor, what was expected and what arrived. It happens in two steps, so that a reader can answer
a request whose header it could read even when its tensors are refused: :func:`read_tensor_message`
checks the frame and parses the header, :meth:`TensorMessage.tensors` checks the descriptions
against the bytes and returns the tensors. Decoded tensors are read-only numpy views into the
payload (:func:`numpy.frombuffer`, no copy), except on a big-endian machine, where they are
converted to its byte order.

The module is pure (no I/O) and imports no pydantic: the agent daemon (:mod:`agent.messages`),
the Python client (:mod:`agent.client`) and the protocol's models (:mod:`shared.protocol`) all
use it.

>>> import numpy as np
>>> payload = encode_tensor_message(
...     {"correlation_id": "r1", "model": "cnn"}, "inputs", {"x": np.arange(3, dtype=np.float32)}
... )
>>> payload[:4], len(payload)
(b'EFT1', 124)
>>> decode_tensor_message(payload, "inputs", what="request")["inputs"]["x"]
array([0., 1., 2.], dtype=float32)
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from shared.errors import ManifestError
from shared.frames import PREFIX_SIZE, TENSOR_MAGIC, Bytes, pack_frame, split_frame
from shared.jsonsafe import json_kind, load_json
from shared.topics import MAX_JSON_PAYLOAD, ProtocolError

__all__ = [
    "ALIGNMENT",
    "DTYPES",
    "MAGIC",
    "MAX_HEADER",
    "MAX_NAME",
    "MAX_PAYLOAD",
    "MAX_RANK",
    "MAX_TENSORS",
    "TensorMessage",
    "decode_tensor_message",
    "encode_tensor_message",
    "is_tensor_message",
    "read_tensor_message",
]

MAGIC = TENSOR_MAGIC
MAX_PAYLOAD = MAX_JSON_PAYLOAD  # the whole message, as for a JSON one
MAX_HEADER = 16 * 1024  # as a fetch frame's header
MAX_TENSORS = 64
MAX_RANK = 32  # numpy's historical limit, which every numpy version can hold
MAX_NAME = 256  # characters of a tensor's name
ALIGNMENT = 8  # the writer starts the first tensor at a multiple of this many bytes
# What can travel: fixed-size numbers numpy knows (bfloat16, strings and objects cannot).
DTYPES = (
    "bool",
    "int8",
    "uint8",
    "int16",
    "uint16",
    "int32",
    "uint32",
    "int64",
    "uint64",
    "float16",
    "float32",
    "float64",
)
_WIRE = {name: np.dtype(name).newbyteorder("<") for name in DTYPES}  # little-endian


def is_tensor_message(payload: Bytes) -> bool:
    """Whether ``payload`` is in the binary encoding (it starts with :data:`MAGIC`)."""
    return bytes(payload[:4]) == MAGIC


# -- writing -------------------------------------------------------------------------------------


def encode_tensor_message(
    fields: Mapping[str, Any],
    field: str,
    tensors: Mapping[str, Any] | None,
    *,
    max_bytes: int = MAX_PAYLOAD,
) -> bytes:
    """The binary message of ``fields`` plus ``tensors`` described under ``field``.

    Args:
        fields: the message's other fields (JSON values), e.g. ``correlation_id`` and ``model``.
        field: the name of the tensor field, ``inputs`` or ``outputs``.
        tensors: name -> array (anything :func:`numpy.asarray` takes, of one of :data:`DTYPES`);
            ``None`` leaves ``field`` out of the header (an error answer).
        max_bytes: the largest message allowed.

    Raises:
        ValueError: a dtype that cannot travel, a bad name, or a message over the limits.
    """
    if field in fields:
        raise ValueError(f"{field!r} is the tensor field; it cannot also be one of the fields")
    descriptions: list[dict[str, Any]] = []
    buffers: list[memoryview] = []
    for name, value in (tensors or {}).items():
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME:
            raise ValueError(f"a tensor name must be 1 to {MAX_NAME} characters, got {name!r:.60}")
        array = np.asarray(value)
        if array.dtype.name not in _WIRE:
            raise ValueError(
                f"tensor {name!r}: dtype {array.dtype} cannot be sent as bytes; "
                f"expected one of {', '.join(DTYPES)}"
            )
        # C order and little-endian: no copy when the array already is (the usual case)
        array = np.require(array, dtype=_WIRE[array.dtype.name], requirements="C")
        descriptions.append(
            {
                "name": name,
                "dtype": array.dtype.name,
                "shape": list(array.shape),
                "nbytes": array.nbytes,
            }
        )
        buffers.append(array.data)  # a view, not a copy
    header = dict(fields) if tensors is None else {**fields, field: descriptions}
    head = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    head += b" " * (-(PREFIX_SIZE + len(head)) % ALIGNMENT)
    if len(head) > MAX_HEADER:
        raise ValueError(f"the header of {len(head)} bytes exceeds the limit of {MAX_HEADER}")
    size = PREFIX_SIZE + len(head) + sum(b.nbytes for b in buffers)
    if size > max_bytes:
        raise ValueError(f"the message of {size} bytes exceeds the limit of {max_bytes} bytes")
    return pack_frame(MAGIC, head, *buffers)


# -- reading -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorMessage:
    """A binary message split into its parsed header and the bytes of its tensors (unread)."""

    header: dict[str, Any]
    data: memoryview  # everything after the header: the tensors' bytes, back to back
    size: int  # of the whole message
    what: str  # the message's name in error messages, e.g. "inference request"

    def refuse(self, problem: str) -> ProtocolError:
        return ProtocolError(f"{self.what}: {problem}")

    def tensors(self, field: str, *, max_bytes: int = MAX_PAYLOAD) -> dict[str, np.ndarray] | None:
        """The tensors that ``header[field]`` describes, by name, as read-only arrays.

        ``None`` if the header has no ``field`` (or null) and no bytes follow it.

        Raises:
            ProtocolError: a message over ``max_bytes``; descriptions that are malformed, do not
                agree with their byte lengths, or do not account for the bytes exactly.
        """
        if self.size > max_bytes:
            raise self.refuse(f"{self.size} bytes exceeds the limit of {max_bytes} bytes")
        described = self.header.get(field)
        if described is None:
            if len(self.data):
                raise self.refuse(f"{len(self.data)} bytes follow the header, which has no {field}")
            return None
        if not isinstance(described, list):
            raise self.refuse(
                f"{field}: expected an array of tensor descriptions, got {json_kind(described)}"
            )
        if len(described) > MAX_TENSORS:
            raise self.refuse(
                f"{field}: expected at most {MAX_TENSORS} tensors, got {len(described)}"
            )
        tensors: dict[str, np.ndarray] = {}
        offset = 0
        for i, description in enumerate(described):
            where = f"{field}[{i}]"
            name, dtype, shape, nbytes = self._description(description, where, max_bytes)
            if name in tensors:
                raise self.refuse(f"{where}.name: {name!r} is described twice")
            where = f"{where} {name!r}"
            expected = math.prod(shape) * dtype.itemsize
            if nbytes != expected:
                raise self.refuse(
                    f"{where}: shape {list(shape)} of {dtype.name} is {expected} bytes, "
                    f"but nbytes is {nbytes}"
                )
            if offset + nbytes > len(self.data):
                raise self.refuse(
                    f"{where}: truncated: expected {nbytes} bytes at offset {offset} of the "
                    f"tensor data, which has {len(self.data)} bytes"
                )
            tensors[name] = self._array(where, dtype, shape, offset)
            offset += nbytes
        if offset != len(self.data):
            raise self.refuse(
                f"{len(self.data) - offset} bytes after the last tensor: expected "
                f"{offset} bytes of tensor data, got {len(self.data)}"
            )
        return tensors

    def _description(
        self, description: Any, where: str, max_bytes: int
    ) -> tuple[str, np.dtype[Any], tuple[int, ...], int]:
        """(name, little-endian dtype, shape, nbytes) of one description, each checked."""
        if not isinstance(description, dict):
            raise self.refuse(f"{where}: expected an object, got {json_kind(description)}")

        def get(key: str, kind: type, expected: str) -> Any:
            value = description.get(key)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise self.refuse(f"{where}.{key}: expected {expected}, got {json_kind(value)}")
            return value

        name: str = get("name", str, "a string")
        if not 0 < len(name) <= MAX_NAME:
            raise self.refuse(f"{where}.name: expected 1 to {MAX_NAME} characters, got {len(name)}")
        dtype: str = get("dtype", str, "a string")
        if dtype not in _WIRE:
            raise self.refuse(
                f"{where}.dtype: expected one of {', '.join(DTYPES)}, got {dtype[:40]!r}"
            )
        shape: list[Any] = get("shape", list, "an array of dimensions")
        if len(shape) > MAX_RANK:
            raise self.refuse(
                f"{where}.shape: expected at most {MAX_RANK} dimensions, got {len(shape)}"
            )
        for axis, size in enumerate(shape):
            if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= max_bytes:
                raise self.refuse(
                    f"{where}.shape[{axis}]: expected an integer from 0 to {max_bytes}, "
                    f"got {json.dumps(size)[:40]}"
                )
        extent = math.prod(size for size in shape if size)  # numpy refuses more, even if empty
        if extent > max_bytes:
            raise self.refuse(
                f"{where}.shape: the product of the non-zero dimensions must be at most "
                f"{max_bytes}, got {extent}"
            )
        nbytes: int = get("nbytes", int, "an integer")
        if nbytes < 0:
            raise self.refuse(f"{where}.nbytes: expected an integer >= 0, got {nbytes}")
        return name, _WIRE[dtype], tuple(shape), nbytes

    def _array(
        self, where: str, dtype: np.dtype[Any], shape: tuple[int, ...], offset: int
    ) -> np.ndarray:
        """A read-only view of one tensor's bytes (converted only on a big-endian machine)."""
        count = math.prod(shape)
        array = np.frombuffer(self.data, dtype=dtype, count=count, offset=offset).reshape(shape)
        if dtype.kind == "b" and count and array.view(np.uint8).max() > 1:
            raise self.refuse(
                f"{where}: expected bool bytes 0 or 1, got {array.view(np.uint8).max()}"
            )
        if not dtype.isnative:
            array = array.astype(dtype.newbyteorder("="))
        return array


def read_tensor_message(payload: Bytes, *, what: str) -> TensorMessage:
    """Check a binary message's frame and parse its header (the tensors are not read yet).

    Raises:
        ProtocolError: not a binary message, a truncated prefix, a header over
            :data:`MAX_HEADER` or longer than the message, or a header that is not a JSON object.
    """
    head, data = split_frame(payload, MAGIC, max_header=MAX_HEADER, what=what)
    try:
        header = load_json(head, what=f"{what} header", max_bytes=MAX_HEADER)
    except ManifestError as e:
        raise ProtocolError(str(e), check="protocol") from e
    if not isinstance(header, dict):
        raise ProtocolError(f"{what} header: expected a JSON object, got {json_kind(header)}")
    return TensorMessage(header=header, data=data, size=len(payload), what=what)


def decode_tensor_message(
    payload: Bytes, field: str, *, what: str, max_bytes: int = MAX_PAYLOAD
) -> dict[str, Any]:
    """A binary message as its JSON form would parse, with arrays under ``field``.

    The header's fields, and ``field`` (if the header has it) mapping each tensor's name to a
    read-only array: ready for the same field checks as the JSON form.

    Raises:
        ProtocolError: anything :func:`read_tensor_message` or :meth:`TensorMessage.tensors`
            refuses.
    """
    message = read_tensor_message(payload, what=what)
    tensors = message.tensors(field, max_bytes=max_bytes)
    return message.header if tensors is None else {**message.header, field: tensors}
