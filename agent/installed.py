"""An installed version's manifest as the daemon reads it back: what serving needs, no pydantic.

A version directory holds the ``manifest.json`` that a deployment verified before installing it:
its signature and digest (:mod:`shared.trust`) and its full schema
(:func:`shared.manifest.parse_manifest`). The daemon reads it again at every start and after
every deployment, to load the model and to re-hash its files. Parsing it with pydantic would keep
pydantic and the manifest models resident in the daemon for good (about 10 MB, ADR 0008), so this
module reads only what the daemon uses:

- the release's ``name`` and ``version``, which must be the directory's;
- ``inputs`` and ``outputs`` (name, dtype, shape), to build the feeds of a request;
- ``artifacts`` (format, precision, files), to load the decided one;
- ``files`` (path, size, SHA-256), for :meth:`agent.store.ModelStore.check_integrity`.

Each is checked for its type and values as :mod:`shared.manifest` declares it, and every path
must be a safe relative path (:func:`shared.container.check_relative_path`); anything else (a
damaged disk, a hand-edited file) is refused with a :class:`ManifestError` that names the field.
Fields it does not read (test vectors, accuracy budget, chunk hashes) are left to
:func:`shared.manifest.parse_manifest`, which deployments, probes and the CLI use.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from shared.bundle_format import (
    DTYPES,
    FORMAT_MAJOR,
    FORMAT_NAME,
    MANIFEST_MAX_BYTES,
    MANIFEST_NAME,
    PRECISIONS,
)
from shared.container import check_relative_path
from shared.errors import ContainerError, ManifestError
from shared.jsonsafe import load_json

__all__ = [
    "InstalledArtifact",
    "InstalledFile",
    "InstalledManifest",
    "InstalledTensor",
    "parse_installed_manifest",
]

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class InstalledTensor:
    """One input or output tensor; ``-1`` in ``shape`` is a dynamic dimension."""

    name: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class InstalledArtifact:
    """The model in one format and precision; ``files[0]`` is the file a runtime loads."""

    format: str
    precision: str
    files: tuple[str, ...]


@dataclass(frozen=True)
class InstalledFile:
    """One payload file of the version: its path, size and SHA-256."""

    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class InstalledManifest:
    """What the daemon reads of an installed version's ``manifest.json``."""

    name: str
    version: str
    inputs: tuple[InstalledTensor, ...]
    outputs: tuple[InstalledTensor, ...]
    artifacts: tuple[InstalledArtifact, ...]
    files: tuple[InstalledFile, ...]


class _Reader:
    """Typed reads from the parsed document; each refusal names the field."""

    def __init__(self, what: str) -> None:
        self.what = what

    def refuse(self, where: str, problem: str) -> ManifestError:
        return ManifestError(f"{self.what}: {where}: {problem}", check="schema")

    def get(self, data: Any, key: str, kind: type, where: str, *, default: Any = None) -> Any:
        if not isinstance(data, dict):
            raise self.refuse(where, f"expected an object, got {type(data).__name__}")
        value = data.get(key, default)
        path = f"{where}.{key}" if where else key
        if value is None:
            raise self.refuse(path, "required")
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise self.refuse(path, f"expected {kind.__name__}, got {type(value).__name__}")
        return value

    def items(self, data: Any, key: str, where: str, *, at_least: int = 0) -> list[Any]:
        value: list[Any] = self.get(data, key, list, where)
        if len(value) < at_least:
            raise self.refuse(f"{where}.{key}" if where else key, f"at least {at_least} expected")
        return value

    def path(self, value: Any, where: str) -> str:
        if not isinstance(value, str):
            raise self.refuse(where, f"expected str, got {type(value).__name__}")
        try:
            return check_relative_path(value, what="file")
        except ContainerError as e:
            raise self.refuse(where, str(e)) from e

    def tensor(self, data: Any, where: str) -> InstalledTensor:
        dtype = self.get(data, "dtype", str, where)
        if dtype not in DTYPES:
            raise self.refuse(f"{where}.dtype", f"expected one of {', '.join(DTYPES)}")
        shape = self.items(data, "shape", where)
        if any(not isinstance(d, int) or isinstance(d, bool) or d < -1 or d == 0 for d in shape):
            raise self.refuse(f"{where}.shape", f"dimensions must be positive or -1, got {shape}")
        return InstalledTensor(
            name=self.get(data, "name", str, where), dtype=dtype, shape=(*shape,)
        )

    def artifact(self, data: Any, where: str) -> InstalledArtifact:
        precision = self.get(data, "precision", str, where, default="fp32")
        if precision not in PRECISIONS:
            raise self.refuse(f"{where}.precision", f"expected one of {', '.join(PRECISIONS)}")
        files = self.items(data, "files", where, at_least=1)
        return InstalledArtifact(
            format=self.get(data, "format", str, where),
            precision=precision,
            files=tuple(self.path(p, f"{where}.files[{i}]") for i, p in enumerate(files)),
        )

    def file(self, data: Any, where: str) -> InstalledFile:
        sha256 = self.get(data, "sha256", str, where)
        if not _SHA256.fullmatch(sha256):
            raise self.refuse(f"{where}.sha256", "expected 64 lowercase hex digits")
        size = self.get(data, "size", int, where)
        if size < 0:
            raise self.refuse(f"{where}.size", f"must be >= 0, got {size}")
        return InstalledFile(
            path=self.path(self.get(data, "path", str, where), f"{where}.path"),
            size=size,
            sha256=sha256,
        )


def parse_installed_manifest(
    data: bytes,
    *,
    what: str = MANIFEST_NAME,
    name: str | None = None,
    version: str | None = None,
) -> InstalledManifest:
    """Read an installed ``manifest.json``; ``name`` and ``version``, if given, must match.

    Raises:
        ManifestError: not JSON, too large or deep, another format, or a field read here that
            has the wrong type or value.
    """
    raw = load_json(data, what=what, max_bytes=MANIFEST_MAX_BYTES)
    read = _Reader(what)
    if read.get(raw, "format", str, "") != FORMAT_NAME:
        raise ManifestError(f"{what}: format must be {FORMAT_NAME!r}", check="format")
    format_version = read.get(raw, "format_version", str, "")
    if format_version.split(".")[0] != FORMAT_MAJOR:
        raise ManifestError(
            f"{what}: format version {format_version[:20]!r} is not supported (this reader "
            f"handles {FORMAT_MAJOR}.x)",
            check="format",
        )
    manifest = InstalledManifest(
        name=read.get(raw, "name", str, ""),
        version=read.get(raw, "version", str, ""),
        inputs=tuple(
            read.tensor(t, f"inputs[{i}]")
            for i, t in enumerate(read.items(raw, "inputs", "", at_least=1))
        ),
        outputs=tuple(
            read.tensor(t, f"outputs[{i}]")
            for i, t in enumerate(read.items(raw, "outputs", "", at_least=1))
        ),
        artifacts=tuple(
            read.artifact(a, f"artifacts[{i}]")
            for i, a in enumerate(read.items(raw, "artifacts", "", at_least=1))
        ),
        files=tuple(
            read.file(f, f"files[{i}]") for i, f in enumerate(read.items(raw, "files", ""))
        ),
    )
    for field, expected in (("name", name), ("version", version)):
        found = getattr(manifest, field)
        if expected is not None and found != expected:
            raise read.refuse(field, f"expected {expected!r} (the installed one), got {found!r}")
    return manifest
