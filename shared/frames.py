"""The protocol's binary frame: a magic, a length-prefixed JSON header, then raw bytes.

Two kinds of message carry bulk bytes that JSON would bloat and slow down, and both use this
one layout, told apart by their magic:

- ``down/fetch`` answers (:data:`FETCH_MAGIC`, ``EFR1``): a header, then part of a document or
  chunk (:func:`shared.protocol.encode_frame`);
- inference requests and answers in the binary encoding (:data:`TENSOR_MAGIC`, ``EFT1``): a
  header, then the raw tensors (:mod:`shared.tensors`).

::

    offset  size  field
    0       4     magic, ASCII
    4       4     header length H, unsigned 32-bit big-endian
    8       H     header: UTF-8 JSON (an object)
    8 + H   rest  the bytes the header describes

This module only packs and splits frames; it reads neither the header's JSON nor the bytes, and
imports nothing heavy (the agent daemon uses it).

>>> frame = pack_frame(b"EFR1", b"{}", b"xy")
>>> header, data = split_frame(frame, b"EFR1", max_header=16, what="frame")
>>> header, bytes(data)
(b'{}', b'xy')
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from shared.topics import ProtocolError

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = ["FETCH_MAGIC", "PREFIX_SIZE", "TENSOR_MAGIC", "Bytes", "pack_frame", "split_frame"]

FETCH_MAGIC = b"EFR1"
TENSOR_MAGIC = b"EFT1"
_LENGTH = struct.Struct(">I")
PREFIX_SIZE = 4 + _LENGTH.size  # magic and header length: the header starts here

Bytes = bytes | bytearray | memoryview


def pack_frame(magic: bytes, header: bytes, *data: Buffer) -> bytes:
    """``magic`` + header length + ``header`` + each of ``data``, in one copy.

    ``data`` may be any C-contiguous buffers (numpy arrays too): they are copied once, into the
    frame.
    """
    if len(magic) != 4:
        raise ValueError(f"a frame's magic is 4 bytes, got {magic!r}")
    return b"".join((magic, _LENGTH.pack(len(header)), header, *data))


def split_frame(
    frame: Bytes, magic: bytes, *, max_header: int, what: str
) -> tuple[bytes, memoryview]:
    """Check ``frame``'s magic and header length; return (header bytes, the bytes after it).

    The bytes after the header are a view into ``frame``, not a copy.

    Raises:
        ProtocolError: another magic, a frame shorter than its prefix, or a header longer than
            ``max_header`` or than the frame.
    """
    view = memoryview(frame)
    if view[:4] != magic:
        raise ProtocolError(f"{what} must start with {magic!r}, got {bytes(view[:4])!r}")
    if len(view) < PREFIX_SIZE:
        raise ProtocolError(
            f"{what} of {len(view)} bytes is truncated: {magic!r} is followed by a 4-byte "
            "header length"
        )
    (length,) = _LENGTH.unpack(view[4:PREFIX_SIZE])
    if length > max_header or PREFIX_SIZE + length > len(view):
        raise ProtocolError(
            f"{what} header of {length} bytes does not fit (frame is {len(view)} bytes, "
            f"header limit {max_header})"
        )
    end = PREFIX_SIZE + length
    return bytes(view[PREFIX_SIZE:end]), view[end:]
