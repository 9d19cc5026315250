"""Craft hostile containers with the standard library's tarfile, for the strict reader to refuse."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable
from pathlib import Path

Entry = tuple[tarfile.TarInfo, bytes | None]


def read_entries(path: Path) -> list[Entry]:
    """Every member of a (valid) bundle, as TarInfo and content."""
    with tarfile.open(path, "r:") as tar:
        return [(m, tar.extractfile(m).read() if m.isfile() else None) for m in tar.getmembers()]


def regular(name: str, data: bytes, *, mode: int = 0o644) -> Entry:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    return info, data


def special(name: str, kind: bytes, *, linkname: str = "") -> Entry:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info, None


def write_entries(entries: list[Entry], *, fmt: int = tarfile.USTAR_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def rewrite(path: Path, change: Callable[[list[Entry]], list[Entry]], **kw: int) -> None:
    """Rewrite the bundle at ``path`` with ``change`` applied to its member list."""
    path.write_bytes(write_entries(change(read_entries(path)), **kw))
