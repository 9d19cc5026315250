"""Serve devices' fetch requests from signed bundle files: metadata, manifests and chunks.

A device asks on ``up/fetch`` (:class:`shared.protocol.FetchRequest`); the answer goes back on
``down/fetch`` as frames (:func:`shared.protocol.encode_frame`), each below the broker's packet
limit, so a 256 KiB chunk may travel as several parts. The device verifies everything itself
(TUF metadata, manifest hash, chunk hashes): this side only reads bytes, it never vouches for
them, and a device that asks for something absent gets a ``404`` frame, not silence.

:class:`BundleRepository` indexes a directory of signed bundles without unpacking them: each
payload file's data offset inside its bundle is recorded, so a chunk is one ``pread``.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from shared.bundle import PAYLOAD_PREFIX, BundleHeader, read_header
from shared.container import ContainerReader
from shared.protocol import FetchRequest, FetchResponse, encode_frame
from shared.trust import target_path

__all__ = ["BundleRepository", "FetchQueue", "answer_fetch"]

logger = logging.getLogger(__name__)
FRAME_OVERHEAD = 512  # bytes reserved in each MQTT message for the frame header and topic


@dataclass
class _Indexed:
    path: Path
    header: BundleHeader
    offsets: dict[str, int] = field(default_factory=dict)  # payload path -> offset in the file


class BundleRepository:
    """Signed bundles available to devices, with the newest signed metadata among them."""

    def __init__(self) -> None:
        self._bundles: dict[str, _Indexed] = {}  # target path -> bundle
        self._metadata: dict[str, bytes] = {}

    def add(self, path: Path) -> str:
        """Index a signed bundle file; return its target path (``NAME/VERSION/manifest.json``)."""
        with path.open("rb") as f:
            reader = ContainerReader(f, what=path.name)
            header, first = read_header(reader)
            offsets = {}
            member = first
            members = iter(reader)
            while member is not None:
                offsets[member.name.removeprefix(PAYLOAD_PREFIX)] = member.offset
                member = next(members, None)
        target = target_path(header.manifest.name, header.manifest.version)
        self._bundles[target] = _Indexed(path, header, offsets)
        self._merge_metadata(header.metadata)
        return target

    def _merge_metadata(self, files: dict[str, bytes]) -> None:
        """Keep every root version and the newest (by TUF version) of the other roles."""
        for name, data in files.items():
            old = self._metadata.get(name)
            if old is None or name[0].isdigit():
                self._metadata[name] = data
                continue
            try:
                new_version = json.loads(data)["signed"]["version"]
                old_version = json.loads(old)["signed"]["version"]
            except (ValueError, KeyError, TypeError):
                continue
            if new_version > old_version:
                self._metadata[name] = data

    def metadata(self, name: str) -> bytes | None:
        return self._metadata.get(name)

    def manifest(self, target: str) -> bytes | None:
        indexed = self._bundles.get(target)
        return indexed.header.manifest_bytes if indexed else None

    def chunk(self, target: str, file: str, index: int) -> bytes | None:
        """The bytes of one chunk of one payload file, or None if there is no such chunk."""
        indexed = self._bundles.get(target)
        if indexed is None or file not in indexed.offsets:
            return None
        manifest = indexed.header.manifest
        size = manifest.chunk_size
        entry = next((e for e in manifest.files if e.path == file), None)
        if size is None or entry is None or not 0 <= index * size < max(entry.size, 1):
            return None
        length = min(size, entry.size - index * size)
        fd = os.open(indexed.path, os.O_RDONLY)
        try:
            return os.pread(fd, length, indexed.offsets[file] + index * size)
        finally:
            os.close(fd)


class FetchQueue:
    """Fetch requests waiting to be answered, in the order they will be.

    TUF metadata and manifest requests (a few kB each, and each a round trip a device must finish
    before it can ask for anything else) go before chunk requests, but at most ``small_run`` in
    a row while chunk requests wait: a device that floods metadata requests slows the downloads
    down, it cannot stop them. Each kind is answered in arrival order. Any thread may put; one
    thread gets.

    >>> q = FetchQueue(small_run=1)
    >>> for i, kind in enumerate(["chunks", "metadata", "manifest"]):
    ...     q.put(f"d{i}", FetchRequest(request_id=str(i), kind=kind, name="x", target="x"))
    >>> [q.get(0)[1].kind for _ in range(3)]
    ['metadata', 'chunks', 'manifest']
    """

    def __init__(self, small_run: int = 8) -> None:
        self.small_run = small_run
        self._small: deque[tuple[str, FetchRequest]] = deque()
        self._chunks: deque[tuple[str, FetchRequest]] = deque()
        self._run = 0  # small answers given in a row while chunks waited
        self._ready = threading.Condition()

    def put(self, device_id: str, request: FetchRequest) -> None:
        with self._ready:
            kind = self._chunks if request.kind == "chunks" else self._small
            kind.append((device_id, request))
            self._ready.notify()

    def get(self, timeout_s: float) -> tuple[str, FetchRequest] | None:
        """The next request and its device, or None if none arrived within ``timeout_s``."""
        with self._ready:
            if not self._ready.wait_for(lambda: self._small or self._chunks, timeout_s):
                return None
            if self._small and (not self._chunks or self._run < self.small_run):
                self._run = self._run + 1 if self._chunks else 0
                return self._small.popleft()
            self._run = 0
            return self._chunks.popleft()

    def __len__(self) -> int:
        with self._ready:
            return len(self._small) + len(self._chunks)


def _parts(header: FetchResponse, data: bytes, max_message: int) -> Iterator[bytes]:
    step = max(1024, max_message - FRAME_OVERHEAD)
    for offset in range(0, max(len(data), 1), step):
        part = header.model_copy(update={"offset": offset, "total": len(data)})
        yield encode_frame(part, data[offset : offset + step])


def _answer(
    header: FetchResponse, data: bytes | None, missing: str, max_message: int
) -> Iterator[bytes]:
    """``data`` split into frames under ``header``, or one 404 frame saying what is missing."""
    if data is None:
        yield encode_frame(
            header.model_copy(update={"kind": "error", "status": 404, "error": missing})
        )
    else:
        yield from _parts(header, data, max_message)


def answer_fetch(
    request: FetchRequest, repo: BundleRepository, *, max_message: int = 1 << 20
) -> Iterator[bytes]:
    """The frames that answer ``request``, each at most ``max_message`` bytes."""
    rid, target = request.request_id, request.target or ""
    if request.kind == "metadata":
        header = FetchResponse(request_id=rid, kind="metadata", name=request.name)
        yield from _answer(
            header, repo.metadata(request.name or ""), f"no metadata {request.name!r}", max_message
        )
    elif request.kind == "manifest":
        header = FetchResponse(request_id=rid, kind="manifest", target=request.target)
        yield from _answer(header, repo.manifest(target), f"no release {target!r}", max_message)
    else:
        for ref in request.chunks:
            header = FetchResponse(
                request_id=rid, kind="chunk", target=request.target, file=ref.file, index=ref.index
            )
            yield from _answer(
                header,
                repo.chunk(target, ref.file, ref.index),
                f"no chunk {ref.index} of {ref.file!r} in {target!r}",
                max_message,
            )
