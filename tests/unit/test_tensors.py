"""The binary encoding of inference messages (shared.tensors) and the frame it shares with
``down/fetch`` (shared.frames): round trips, and every malformed or hostile payload refused
with a message that says what was expected and what arrived."""

from __future__ import annotations

import json
import struct
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from shared import tensors
from shared.frames import FETCH_MAGIC, pack_frame, split_frame
from shared.protocol import FetchResponse, decode_frame, encode_frame
from shared.tensors import (
    DTYPES,
    MAGIC,
    MAX_HEADER,
    MAX_PAYLOAD,
    decode_tensor_message,
    encode_tensor_message,
    is_tensor_message,
    read_tensor_message,
)
from shared.topics import ProtocolError

FIELDS = {"correlation_id": "r1", "model": "cnn", "reply_to": "app"}
X = np.arange(6, dtype=np.float32).reshape(2, 3)


def raw(header: object, data: bytes = b"", *, length: int | None = None) -> bytes:
    """A binary message written by hand: any header, any bytes, any declared header length."""
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    size = len(head) if length is None else length
    return MAGIC + struct.pack(">I", size) + head + data


def described(*descriptions: dict, data: bytes = b"", **fields: object) -> bytes:
    return raw({**FIELDS, **fields, "inputs": list(descriptions)}, data)


def desc(name="x", dtype="float32", shape=(2, 3), nbytes=None) -> dict:
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize if nbytes is None else nbytes
    return {"name": name, "dtype": dtype, "shape": list(shape), "nbytes": size}


def decode(payload: bytes) -> dict:
    return decode_tensor_message(payload, "inputs", what="inference request")


# -- round trips ---------------------------------------------------------------------------------

arrays = st.sampled_from(DTYPES).flatmap(
    lambda dtype: hnp.arrays(
        np.dtype(dtype),
        hnp.array_shapes(min_dims=0, max_dims=5, min_side=0, max_side=6),
    )
)


@settings(max_examples=300, deadline=None)
@given(
    named=st.dictionaries(st.text(min_size=1, max_size=12), arrays, max_size=5),
    correlation=st.text(min_size=1, max_size=40),
)
def test_every_dtype_and_shape_round_trips_bit_for_bit(named, correlation):
    fields = {"correlation_id": correlation, "model": "m"}
    payload = encode_tensor_message(fields, "inputs", named)
    assert is_tensor_message(payload)
    message = decode(payload)
    assert message["correlation_id"] == correlation
    assert list(message["inputs"]) == list(named)  # the order of the bytes is kept
    for name, sent in named.items():
        got = message["inputs"][name]
        assert got.dtype == sent.dtype
        assert got.shape == sent.shape
        assert got.tobytes() == sent.tobytes()  # NaN payloads, -0.0 and all


@settings(max_examples=50, deadline=None)
@given(hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=3, min_side=1)))
def test_non_contiguous_and_big_endian_arrays_round_trip(array):
    views = {"t": array.T, "s": array[..., ::2], "be": array.astype(">f4")}
    message = decode(encode_tensor_message(FIELDS, "inputs", views))
    for name, sent in views.items():
        np.testing.assert_array_equal(message["inputs"][name], sent)
        assert message["inputs"][name].dtype == np.float32


def test_decoded_tensors_are_read_only_views_of_the_payload():
    payload = encode_tensor_message(FIELDS, "inputs", {"x": X, "y": np.ones(3, np.uint8)})
    message = read_tensor_message(payload, what="inference request")
    x = message.tensors("inputs")["x"]
    assert not x.flags.writeable
    assert x.flags.c_contiguous
    assert np.shares_memory(x, np.frombuffer(payload, np.uint8))  # no copy
    with pytest.raises(ValueError, match="read-only"):
        x[0, 0] = 1


def test_the_first_tensor_starts_aligned_and_the_header_is_the_json_message():
    for model in ("c", "cn", "cnn", "cnn-1234"):
        payload = encode_tensor_message({**FIELDS, "model": model}, "inputs", {"x": X})
        (length,) = struct.unpack(">I", payload[4:8])
        assert (8 + length) % tensors.ALIGNMENT == 0
        header = json.loads(payload[8 : 8 + length])  # padded with JSON whitespace only
        assert header == {**FIELDS, "model": model, "inputs": [desc()]}
        assert payload[8 + length :] == X.tobytes()
    x = decode(encode_tensor_message(FIELDS, "inputs", {"x": X}))["inputs"]["x"]
    assert x.flags.aligned


def test_a_message_without_tensors_has_no_tensor_field():
    payload = encode_tensor_message({"correlation_id": "r1", "ok": False}, "outputs", None)
    assert decode_tensor_message(payload, "outputs", what="answer") == {
        "correlation_id": "r1",
        "ok": False,
    }
    empty = encode_tensor_message(FIELDS, "inputs", {})
    assert decode(empty)["inputs"] == {}


def test_unaligned_tensors_decode_too():
    payload = encode_tensor_message(
        FIELDS, "inputs", {"a": np.ones(3, np.uint8), "b": np.arange(4, dtype=np.float64)}
    )
    b = decode(payload)["inputs"]["b"]
    assert not b.flags.aligned  # 3 bytes after an aligned start: used as it is, not copied
    np.testing.assert_array_equal(b, np.arange(4))


def test_big_endian_machines_get_native_arrays(monkeypatch):
    """On a big-endian machine, the little-endian bytes are converted (simulated here by
    decoding with the other byte order as "native")."""
    payload = encode_tensor_message(FIELDS, "inputs", {"x": X})
    wire = {name: dtype.newbyteorder(">") for name, dtype in tensors._WIRE.items()}
    monkeypatch.setattr(tensors, "_WIRE", wire)
    x = decode(payload)["inputs"]["x"]
    assert x.dtype.isnative
    np.testing.assert_array_equal(x, X.byteswap())  # the bytes read the other way round
    assert sys.byteorder == "little"  # the wire order is this machine's: no conversion here


# -- what the writer refuses ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tensors_", "message"),
    [
        ({"x": np.array(["a"])}, r"tensor 'x': dtype <U1 cannot be sent as bytes; expected one"),
        ({"x": np.array([1 + 2j])}, r"dtype complex128 cannot be sent"),
        ({"x": np.array([None])}, r"dtype object cannot be sent"),
        ({"": X}, r"a tensor name must be 1 to 256 characters, got ''"),
        ({"x": np.zeros(MAX_PAYLOAD // 4, np.float32)}, r"exceeds the limit of 262144 bytes"),
    ],
)
def test_the_writer_refuses_what_cannot_travel(tensors_, message):
    with pytest.raises(ValueError, match=message):
        encode_tensor_message(FIELDS, "inputs", tensors_)


def test_the_writer_refuses_a_header_over_the_limit():
    with pytest.raises(ValueError, match=rf"header of \d+ bytes exceeds the limit of {MAX_HEADER}"):
        encode_tensor_message({**FIELDS, "model": "m" * MAX_HEADER}, "inputs", {"x": X})


# -- what the reader refuses ---------------------------------------------------------------------

HOSTILE = {
    "unknown dtype": (
        described(desc(dtype="float32") | {"dtype": "complex64"}, data=X.tobytes()),
        r"inputs\[0\]\.dtype: expected one of bool, int8, .*, float64, got 'complex64'$",
    ),
    "bfloat16 (not a numpy dtype)": (
        described(desc() | {"dtype": "bfloat16"}, data=X.tobytes()),
        r"inputs\[0\]\.dtype: expected one of .*, got 'bfloat16'$",
    ),
    "nbytes disagrees with shape and dtype": (
        described(desc(nbytes=20), data=X.tobytes()[:20]),
        r"inputs\[0\] 'x': shape \[2, 3\] of float32 is 24 bytes, but nbytes is 20$",
    ),
    "negative dimension": (
        described(desc(shape=(-2, 3), nbytes=24), data=X.tobytes()),
        r"inputs\[0\]\.shape\[0\]: expected an integer from 0 to 262144, got -2$",
    ),
    "huge dimension": (
        described(desc(shape=(10**12, 3), nbytes=24), data=X.tobytes()),
        r"inputs\[0\]\.shape\[0\]: expected an integer from 0 to 262144, got 1000000000000$",
    ),
    "huge dimensions around a zero (an empty tensor numpy cannot shape)": (
        described(desc(shape=(0, 262144, 262144), nbytes=0)),
        r"shape: the product of the non-zero dimensions must be at most 262144, "
        r"got 68719476736$",
    ),
    "too many dimensions": (
        described(desc(shape=(1,) * 33, nbytes=4), data=b"\0" * 4),
        r"inputs\[0\]\.shape: expected at most 32 dimensions, got 33$",
    ),
    "fractional dimension": (
        described(desc() | {"shape": [1.5, 4]}),
        r"inputs\[0\]\.shape\[0\]: expected an integer from 0 to 262144, got 1\.5$",
    ),
    "boolean dimension": (
        described(desc() | {"shape": [True, 6]}),
        r"inputs\[0\]\.shape\[0\]: expected an integer .*, got true$",
    ),
    "shape not an array": (
        described(desc() | {"shape": "2x3"}),
        r"inputs\[0\]\.shape: expected an array of dimensions, got a string$",
    ),
    "nbytes missing": (
        described({"name": "x", "dtype": "float32", "shape": [2, 3]}),
        r"inputs\[0\]\.nbytes: expected an integer, got null$",
    ),
    "nbytes negative": (
        described(desc(shape=(0,), nbytes=-4)),
        r"inputs\[0\]\.nbytes: expected an integer >= 0, got -4$",
    ),
    "name missing": (
        described({"dtype": "float32", "shape": [2, 3], "nbytes": 24}, data=X.tobytes()),
        r"inputs\[0\]\.name: expected a string, got null$",
    ),
    "name empty": (
        described(desc(name=""), data=X.tobytes()),
        r"inputs\[0\]\.name: expected 1 to 256 characters, got 0$",
    ),
    "name too long": (
        described(desc(name="n" * 257), data=X.tobytes()),
        r"inputs\[0\]\.name: expected 1 to 256 characters, got 257$",
    ),
    "the same name twice": (
        described(desc(), desc(), data=X.tobytes() * 2),
        r"inputs\[1\]\.name: 'x' is described twice$",
    ),
    "description not an object": (
        described(7),
        r"inputs\[0\]: expected an object, got a number$",
    ),
    "inputs not an array": (
        raw({**FIELDS, "inputs": {"x": desc()}}, X.tobytes()),
        r"inputs: expected an array of tensor descriptions, got an object$",
    ),
    "too many tensors": (
        described(*(desc(name=f"t{i}", shape=(0,)) for i in range(65))),
        r"inputs: expected at most 64 tensors, got 65$",
    ),
    "truncated tensor data": (
        described(desc(), desc(name="y"), data=X.tobytes() + b"\0" * 10),
        r"inputs\[1\] 'y': truncated: expected 24 bytes at offset 24 of the tensor data, "
        r"which has 34 bytes$",
    ),
    "trailing bytes": (
        described(desc(), data=X.tobytes() + b"tail"),
        r"4 bytes after the last tensor: expected 24 bytes of tensor data, got 28$",
    ),
    "bytes but no tensor field": (
        raw(FIELDS, b"\0" * 8),
        r"8 bytes follow the header, which has no inputs$",
    ),
    "bool bytes other than 0 and 1": (
        described(desc(dtype="bool", shape=(3,)), data=b"\x00\x01\x07"),
        r"inputs\[0\] 'x': expected bool bytes 0 or 1, got 7$",
    ),
    "over the payload limit": (
        described(
            desc(shape=(65536,)), data=np.zeros(65536, np.float32).tobytes()
        ),  # 262,144 bytes of tensors plus the header
        r"^inference request: 262\d{3} bytes exceeds the limit of 262144 bytes$",
    ),
    "header longer than the limit": (
        raw({**FIELDS, "pad": "p" * MAX_HEADER, "inputs": []}),
        r"header of 16\d{3} bytes does not fit \(frame is \d+ bytes, header limit 16384\)$",
    ),
    "header length beyond the message": (
        raw(FIELDS, length=4096),
        r"header of 4096 bytes does not fit \(frame is 67 bytes, header limit 16384\)$",
    ),
    "truncated prefix": (
        MAGIC + b"\0\0",
        r"^inference request of 6 bytes is truncated: b'EFT1' is followed by a 4-byte header",
    ),
    "header not JSON": (
        raw(b'{"correlation_id": "r1", '),
        r"^inference request header: invalid JSON",
    ),
    "header not UTF-8": (
        raw(b'{"model": "\xff"}'),
        r"^inference request header: not UTF-8",
    ),
    "header not an object": (
        raw([FIELDS]),
        r"^inference request header: expected a JSON object, got an array$",
    ),
    "header with a duplicate key": (
        raw(b'{"inputs": [], "inputs": []}'),
        r"duplicate key 'inputs'",
    ),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_payloads_are_refused_saying_what_was_expected(case):
    payload, message = HOSTILE[case]
    with pytest.raises(ProtocolError, match=message) as refused:
        decode(payload)
    assert str(refused.value).startswith("inference request")


@settings(max_examples=500, deadline=None)
@given(
    cut=st.integers(min_value=0, max_value=200),
    flips=st.lists(st.tuples(st.integers(0, 300), st.integers(0, 255)), max_size=4),
)
def test_damaged_payloads_decode_or_are_refused_never_anything_else(cut, flips):
    payload = bytearray(
        encode_tensor_message(FIELDS, "inputs", {"x": X, "m": np.array([True, False])})
    )
    for at, value in flips:
        payload[at % len(payload)] = value
    payload = bytes(payload[: len(payload) - cut])
    try:
        decode(payload)
    except ProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_after_the_magic_are_refused_cleanly(data):
    try:
        decode(MAGIC + data)
    except ProtocolError:
        pass


# -- the frame, shared with down/fetch -----------------------------------------------------------


def test_fetch_frames_keep_their_layout_and_messages():
    frame = encode_frame(FetchResponse(request_id="r1", kind="chunk", index=2), b"\x00\x01")
    assert frame[:4] == FETCH_MAGIC
    (length,) = struct.unpack(">I", frame[4:8])
    assert json.loads(frame[8 : 8 + length])["index"] == 2
    header, data = decode_frame(frame)
    assert (header.request_id, header.index, data) == ("r1", 2, b"\x00\x01")
    with pytest.raises(ProtocolError, match=r"^fetch frame must start with b'EFR1', got b'EFT1'"):
        decode_frame(encode_tensor_message(FIELDS, "inputs", {"x": X}))
    with pytest.raises(ProtocolError, match=r"^fetch frame header of 99999 bytes does not fit"):
        decode_frame(FETCH_MAGIC + struct.pack(">I", 99999) + b"{}")


def test_split_frame_returns_a_view_of_the_bytes():
    frame = pack_frame(b"TEST", b"{}", b"abc", np.arange(2, dtype=np.uint8))
    header, data = split_frame(frame, b"TEST", max_header=8, what="test frame")
    assert header == b"{}"
    assert isinstance(data, memoryview)
    assert bytes(data) == b"abc\x00\x01"
    with pytest.raises(ValueError, match="magic is 4 bytes"):
        pack_frame(b"LONGER", b"{}")
