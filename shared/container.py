"""The one-file transport for a bundle: a strict subset of POSIX USTAR.

A bundle travels as one file so it can be copied, uploaded and cached like any artifact, and
anyone can list it with ``tar tvf``. But general tar readers are a well-known attack surface
(path traversal, links, device nodes, PAX headers of any size, decompression bombs), so edgefleet
reads bundles with this small parser that accepts only what its own writer produces:

- only regular files (type ``0``); links, directories, devices, FIFOs and every extension header
  (PAX ``x``/``g``, GNU ``L``/``K``, sparse files) are refused;
- names are relative, made of safe characters, with no ``.``/``..``/empty components, unique even
  when compared case-insensitively (see :func:`check_relative_path`);
- no setuid, setgid or sticky bits; sizes in octal only; header checksums must match;
- no compression (nothing to bomb), no data after the end-of-archive marker, and no truncation.

The reader streams: a member's data is handed out in fixed-size chunks, so memory stays bounded
whatever the file size. It never writes anything; callers decide where verified bytes go.

>>> import io
>>> buf = io.BytesIO()
>>> w = ContainerWriter(buf); w.add_bytes("a.txt", b"hi"); w.close()
>>> _ = buf.seek(0); r = ContainerReader(buf)
>>> [(m.name, r.read_member(m, max_bytes=10)) for m in r]
[('a.txt', b'hi')]
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from shared.errors import ContainerError

__all__ = [
    "BLOCK",
    "CHUNK",
    "ContainerReader",
    "ContainerWriter",
    "Member",
    "check_relative_path",
]

BLOCK = 512
CHUNK = 1 << 20  # bytes handed to a sink at a time while streaming a member
MAX_PATH_BYTES = 255  # what a USTAR name + prefix can hold
MAX_COMPONENT = 128
MAX_TRAILING_ZEROS = 20 * BLOCK  # tar writers pad the archive to a 10 KiB record
_SAFE_COMPONENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._+@=,-]*$")
_TYPE_NAMES = {
    b"1": "hard link",
    b"2": "symbolic link",
    b"3": "character device",
    b"4": "block device",
    b"5": "directory",
    b"6": "FIFO",
    b"7": "contiguous file",
    b"x": "PAX extended header",
    b"g": "PAX global header",
    b"L": "GNU long name",
    b"K": "GNU long link name",
    b"S": "GNU sparse file",
}


def check_relative_path(path: str, *, what: str = "path") -> str:
    """Return ``path`` if it is a safe relative POSIX path, else raise ``ContainerError``.

    Safe means: not empty, at most 255 UTF-8 bytes, no leading ``/``, no backslash, NUL or
    control character, and every ``/``-separated component non-empty, not ``.`` or ``..``, at most
    128 characters, starting with a letter, digit or ``_`` and made of letters, digits and
    ``._+@=,-``.
    """
    if not path:
        raise ContainerError(f"{what}: empty name", check="path")
    if len(path.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
        raise ContainerError(
            f"{what} {path[:60]!r}...: longer than {MAX_PATH_BYTES} bytes", check="path"
        )
    if path.startswith("/"):
        raise ContainerError(f"{what} {path!r}: absolute paths are not allowed", check="path")
    for part in path.split("/"):
        if part in ("", ".", ".."):
            raise ContainerError(
                f"{what} {path!r}: component {part!r} is not allowed (no empty, '.' or '..')",
                check="path",
            )
        if len(part) > MAX_COMPONENT or not _SAFE_COMPONENT.fullmatch(part):
            raise ContainerError(
                f"{what} {path!r}: component {part!r} must be at most {MAX_COMPONENT} characters "
                "of letters, digits and ._+@=,- (not starting with . or -)",
                check="path",
            )
    return path


@dataclass(frozen=True)
class Member:
    """One regular file in the container: its validated name, size and data offset."""

    name: str
    size: int
    offset: int


def _octal(field: bytes, *, what: str) -> int:
    if field[:1] and field[0] & 0x80:
        raise ContainerError(f"{what}: base-256 numbers are not supported", check="header")
    text = field.rstrip(b"\0 ").lstrip(b" ")
    if not text:
        return 0
    if not all(0x30 <= c <= 0x37 for c in text):
        raise ContainerError(f"{what}: {field!r} is not an octal number", check="header")
    return int(text, 8)


def _cstring(field: bytes, *, what: str) -> str:
    raw = field.split(b"\0", 1)[0]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ContainerError(f"{what}: name is not UTF-8", check="path") from e


class ContainerReader:
    """Iterate over the members of a strict-USTAR stream, one at a time, in order.

    Each member yielded must be consumed with :meth:`read_member` or :meth:`stream_member`
    before the next one is read; unread data is skipped. Iteration ends at the end-of-archive
    marker; a missing marker, trailing data, or any rule broken raises ``ContainerError``.

    Args:
        stream: a binary file object positioned at the start of the container.
        max_members: refuse containers with more members than this.
        what: the container's name for error messages.
    """

    def __init__(self, stream: BinaryIO, *, max_members: int = 100_000, what: str = "bundle"):
        self._stream = stream
        self._max_members = max_members
        self._what = what
        self._pos = 0
        self._pending: Member | None = None  # yielded but not fully consumed
        self._consumed = 0
        self._seen: set[str] = set()
        self._count = 0
        self._buffer = bytearray(CHUNK)

    # -- low-level reads ---------------------------------------------------------------------

    def _read_exact(self, n: int, *, context: str) -> bytes:
        data = self._stream.read(n)
        if len(data) != n:
            raise ContainerError(
                f"{self._what}: truncated {context} (needed {n} bytes at offset {self._pos}, "
                f"got {len(data)})",
                check="truncated",
            )
        self._pos += n
        return data

    def _skip(self, n: int, *, context: str) -> None:
        while n > 0:
            got = self._read_exact(min(n, CHUNK), context=context)
            n -= len(got)

    def _finish_pending(self) -> None:
        member = self._pending
        if member is None:
            return
        self._skip(member.size - self._consumed, context=f"data of {member.name}")
        self._skip(-member.size % BLOCK, context=f"padding of {member.name}")
        self._pending = None

    # -- iteration ---------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Member]:
        while True:
            self._finish_pending()
            header = self._read_exact(BLOCK, context="header")
            if header == bytes(BLOCK):
                self._check_end()
                return
            member = self._parse_header(header)
            self._pending = member
            self._consumed = 0
            yield member

    def _check_end(self) -> None:
        second = self._read_exact(BLOCK, context="end-of-archive marker")
        if second != bytes(BLOCK):
            raise ContainerError(
                f"{self._what}: a zero block at offset {self._pos - 2 * BLOCK} must be followed "
                "by a second one (end of archive)",
                check="trailing",
            )
        rest = self._stream.read(MAX_TRAILING_ZEROS + 1)
        if len(rest) > MAX_TRAILING_ZEROS or rest.count(0) != len(rest):
            raise ContainerError(
                f"{self._what}: data after the end-of-archive marker at offset {self._pos}",
                check="trailing",
            )

    def _parse_header(self, header: bytes) -> Member:
        where = f"{self._what}: header at offset {self._pos - BLOCK}"
        expected_sum = _octal(header[148:156], what=f"{where} checksum")
        actual_sum = sum(header[:148]) + 8 * 0x20 + sum(header[156:])
        if expected_sum != actual_sum:
            raise ContainerError(
                f"{where}: checksum mismatch (header says {expected_sum}, bytes sum to "
                f"{actual_sum})",
                check="header",
            )
        if header[257:265] == b"ustar  \0":
            raise ContainerError(
                f"{where}: GNU tar format is not supported (bundles are POSIX ustar)",
                check="header",
            )
        if header[257:263] != b"ustar\0" or header[263:265] != b"00":
            raise ContainerError(
                f"{where}: not a POSIX ustar header (magic {header[257:265]!r})", check="header"
            )
        name = _cstring(header[0:100], what=where)
        prefix = _cstring(header[345:500], what=where)
        if prefix:
            name = f"{prefix}/{name}"
        typeflag = header[156:157]
        if typeflag not in (b"0", b"\0"):
            kind = _TYPE_NAMES.get(typeflag, f"type {typeflag!r}")
            target = _cstring(header[157:257], what=where)
            detail = f" -> {target!r}" if target else ""
            raise ContainerError(
                f"{name!r}: {kind}{detail} is not allowed; a bundle holds regular files only",
                check="member-type",
            )
        check_relative_path(name, what="member")
        mode = _octal(header[100:108], what=f"{where} mode")
        if mode & 0o7000:
            raise ContainerError(
                f"{name!r}: mode {mode:04o} has setuid, setgid or sticky bits", check="mode"
            )
        folded = name.casefold()
        if folded in self._seen:
            raise ContainerError(
                f"{name!r}: duplicate name (names must be unique, ignoring case)",
                check="duplicate",
            )
        self._count += 1
        if self._count > self._max_members:
            raise ContainerError(
                f"{self._what}: more than {self._max_members} members", check="member-count"
            )
        self._seen.add(folded)
        size = _octal(header[124:136], what=f"{where} size")
        return Member(name=name, size=size, offset=self._pos)

    # -- member data -------------------------------------------------------------------------

    def _check_current(self, member: Member) -> None:
        if self._pending is not member:
            raise RuntimeError(f"{member.name} is not the member being read")

    def stream_member(self, member: Member, sink: Callable[[memoryview], object]) -> None:
        """Hand the member's data to ``sink`` in chunks of at most ``CHUNK`` bytes.

        The memoryview passed to ``sink`` is only valid during the call.
        """
        self._check_current(member)
        view = memoryview(self._buffer)
        remaining = member.size - self._consumed
        while remaining > 0:
            want = min(remaining, CHUNK)
            got = self._stream.readinto(view[:want])  # type: ignore[attr-defined]
            if not got:
                raise ContainerError(
                    f"{member.name!r}: truncated (declares {member.size} bytes, "
                    f"only {member.size - remaining} present)",
                    check="truncated",
                )
            self._pos += got
            self._consumed += got
            remaining -= got
            sink(view[:got])

    def read_member(self, member: Member, *, max_bytes: int) -> bytes:
        """Return the whole member, refusing it before reading if it exceeds ``max_bytes``."""
        self._check_current(member)
        if member.size > max_bytes:
            raise ContainerError(
                f"{member.name!r}: {member.size} bytes exceeds the limit of {max_bytes}",
                check="size",
            )
        data = self._read_exact(member.size, context=f"data of {member.name}")
        self._consumed = member.size
        return data


@dataclass
class _OpenMember:
    name: str
    size: int
    written: int = 0


class ContainerWriter:
    """Write a strict-USTAR container: regular files only, fixed owner, mode and time.

    Identical inputs give byte-identical containers (reproducible builds).
    """

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._names: set[str] = set()
        self._open = _OpenMember("", 0)

    def _header(self, name: str, size: int) -> None:
        check_relative_path(name, what="member")
        if name.casefold() in self._names:
            raise ContainerError(f"{name!r}: duplicate name", check="duplicate")
        self._names.add(name.casefold())
        info = tarfile.TarInfo(name)
        info.size = size
        info.mode = 0o644
        info.mtime = 0
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.type = tarfile.REGTYPE
        try:
            self._stream.write(info.tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8"))
        except ValueError as e:  # name too long to split into ustar name + prefix
            raise ContainerError(f"{name!r}: cannot be stored in a ustar header ({e})") from e

    def _pad(self, size: int) -> None:
        self._stream.write(bytes(-size % BLOCK))

    def add_bytes(self, name: str, data: bytes) -> None:
        """Add a member whose content is ``data``."""
        self._header(name, len(data))
        self._stream.write(data)
        self._pad(len(data))

    def add_stream(
        self,
        name: str,
        size: int,
        source: BinaryIO,
        on_chunk: Callable[[memoryview], object] | None = None,
    ) -> None:
        """Add a member by copying exactly ``size`` bytes from ``source``.

        ``on_chunk`` sees every chunk copied (to hash while writing).

        Raises:
            ContainerError: ``source`` ended before ``size`` bytes.
        """
        write = self.begin_member(name, size)
        buffer = bytearray(CHUNK)
        view = memoryview(buffer)
        remaining = size
        while remaining > 0:
            got = source.readinto(view[: min(remaining, CHUNK)])  # type: ignore[attr-defined]
            if not got:
                raise ContainerError(
                    f"{name!r}: source ended after {size - remaining} of {size} bytes",
                    check="truncated",
                )
            if on_chunk is not None:
                on_chunk(view[:got])
            write(view[:got])
            remaining -= got
        self.end_member()

    def begin_member(self, name: str, size: int) -> Callable[[memoryview | bytes], None]:
        """Start a member of ``size`` bytes; return the function that writes its data.

        Call :meth:`end_member` once exactly ``size`` bytes have been written.
        """
        self._header(name, size)
        self._open = current = _OpenMember(name, size)

        def write(data: memoryview | bytes) -> None:
            current.written += len(data)
            self._stream.write(data)

        return write

    def end_member(self) -> None:
        """Finish the member started by :meth:`begin_member` (checks its size, pads the block)."""
        current = self._open
        if current.written != current.size:
            raise ContainerError(
                f"{current.name!r}: wrote {current.written} bytes, declared {current.size}"
            )
        self._pad(current.size)

    def close(self) -> None:
        """Write the end-of-archive marker (two zero blocks). Does not close the stream."""
        self._stream.write(bytes(2 * BLOCK))
