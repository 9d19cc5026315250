"""Build a bundle from a model directory; read, check and extract one.

A bundle is a strict-USTAR container (see :mod:`shared.container`) whose members come in this
order::

    manifest.json          the Manifest: model description + every payload file's size and sha256
    metadata/*.json        signed TUF metadata, once the release is signed (``bundle sign``)
    payload/<path>         the model directory's files, exactly those the manifest lists

The manifest comes first so a reader learns every size and digest (and, via the metadata, whether
they are signed) before it reads a byte of payload. Payload checking is a single streaming pass:
each file is hashed as it is read (and, when extracting, as it is written to a private staging
directory from the same read), so a file cannot be swapped between check and use.

>>> # build_bundle(Path("model"), name="cnn", version="1.0.0", out=Path("cnn.bundle"))
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from pydantic import ValidationError

from shared.bundle_format import FORMAT_NAME, FORMAT_VERSION, MANIFEST_MAX_BYTES, MANIFEST_NAME
from shared.container import ContainerReader, ContainerWriter, Member, check_relative_path
from shared.errors import BundleError, ContainerError, IntegrityError, ManifestError, UsageError
from shared.manifest import (
    Manifest,
    ModelSpec,
    describe_validation_error,
    parse_manifest,
    parse_model_spec,
)

__all__ = [
    "MANIFEST_NAME",
    "METADATA_MAX_BYTES",
    "METADATA_PREFIX",
    "MODEL_SPEC_NAME",
    "PAYLOAD_PREFIX",
    "BundleHeader",
    "build_bundle",
    "check_payload",
    "read_header",
    "write_signed_copy",
]

MODEL_SPEC_NAME = "model.json"
METADATA_PREFIX = "metadata/"
PAYLOAD_PREFIX = "payload/"
METADATA_MAX_BYTES = 5_000_000  # one TUF metadata file (python-tuf's targets default)
METADATA_MAX_TOTAL = 16_000_000
METADATA_MAX_FILES = 64


def _short(digest: str) -> str:
    return f"{digest[:12]}..."


@dataclass
class BundleHeader:
    """Everything before the payload: the manifest (raw and parsed) and any signed metadata."""

    manifest: Manifest
    manifest_bytes: bytes
    metadata: dict[str, bytes] = field(default_factory=dict)

    @property
    def signed(self) -> bool:
        """Whether the bundle carries release metadata (not whether it verifies)."""
        return bool(self.metadata)


# -- building ------------------------------------------------------------------------------------


DEFAULT_CHUNK_SIZE = 256 * 1024  # transfer/dedup unit recorded in the manifest


def _hash_file(path: Path, chunk_size: int) -> tuple[int, str, list[str]]:
    """Size, SHA-256 and per-chunk SHA-256s of a file, in one read pass."""
    whole = hashlib.sha256()
    chunks: list[str] = []
    size = 0
    with path.open("rb") as f:
        while piece := f.read(chunk_size):
            whole.update(piece)
            chunks.append(hashlib.sha256(piece).hexdigest())
            size += len(piece)
    return size, whole.hexdigest(), chunks


def _model_files(model_dir: Path) -> list[str]:
    """Every regular file under ``model_dir`` except model.json, as sorted POSIX paths."""
    files: list[str] = []
    for root, dirs, names in os.walk(model_dir):
        dirs.sort()
        for name in [*dirs, *names]:
            full = Path(root, name)
            rel = full.relative_to(model_dir).as_posix()
            mode = full.lstat().st_mode
            if stat.S_ISLNK(mode):
                raise BundleError(
                    f"{rel}: symbolic links are not allowed in a model directory", check="model-dir"
                )
            if name in names and not stat.S_ISREG(mode):
                raise BundleError(f"{rel}: not a regular file", check="model-dir")
            if name in names and rel != MODEL_SPEC_NAME:
                files.append(check_relative_path(rel, what="file"))
    return sorted(files)


def encode_manifest(manifest: Manifest) -> bytes:
    """The canonical bytes of a manifest (sorted keys, two-space indent, trailing newline)."""
    data = manifest.model_dump(mode="json", exclude_none=True)
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


def build_bundle(
    model_dir: Path,
    *,
    name: str | None,
    version: str,
    out: Path,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Manifest:
    """Package ``model_dir`` (a ``model.json`` plus the files it names) into one bundle file.

    Every regular file in the directory goes into the bundle and the manifest; symlinks and
    special files are refused. ``out`` is written atomically.

    Raises:
        UsageError: ``model_dir`` has no model.json.
        ManifestError: model.json is invalid, or names a file that is not in the directory.
        BundleError: the directory holds a link or special file, or changes while being read.
    """
    spec_path = model_dir / MODEL_SPEC_NAME
    if not spec_path.is_file():
        raise UsageError(f"{model_dir}: no {MODEL_SPEC_NAME} (is this a model directory?)")
    spec: ModelSpec = parse_model_spec(spec_path.read_bytes(), what=str(spec_path))
    bundle_name = name or spec.name
    if not bundle_name:
        raise UsageError("the bundle needs a name: pass --name or set 'name' in model.json")

    paths = _model_files(model_dir)
    entries = []
    for rel in paths:
        size, digest, chunks = _hash_file(model_dir / rel, chunk_size)
        entries.append({"path": rel, "size": size, "sha256": digest, "chunks": chunks})
    fields = spec.model_dump(mode="json", exclude_none=True)
    fields.update(
        format=FORMAT_NAME,
        format_version=FORMAT_VERSION,
        name=bundle_name,
        version=version,
        files=entries,
        chunk_size=chunk_size,
    )
    try:
        manifest = Manifest.model_validate(fields)
    except ValidationError as e:
        raise ManifestError(f"{spec_path}: {describe_validation_error(e)}", check="schema") from e

    _write_atomically(out, lambda f: _write_bundle(f, manifest, model_dir, {}))
    return manifest


def _write_bundle(
    stream: BinaryIO, manifest: Manifest, model_dir: Path, metadata: dict[str, bytes]
) -> None:
    writer = ContainerWriter(stream)
    writer.add_bytes(MANIFEST_NAME, encode_manifest(manifest))
    for name, data in metadata.items():
        writer.add_bytes(METADATA_PREFIX + name, data)
    for entry in manifest.files:
        digest = hashlib.sha256()
        with (model_dir / entry.path).open("rb") as source:
            writer.add_stream(PAYLOAD_PREFIX + entry.path, entry.size, source, digest.update)
        if digest.hexdigest() != entry.sha256:
            raise BundleError(f"{entry.path}: changed while the bundle was being built")
    writer.close()


def _write_atomically(out: Path, fill: Callable[[BinaryIO], None]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


# -- reading -------------------------------------------------------------------------------------


def read_header(reader: ContainerReader) -> tuple[BundleHeader, Member | None]:
    """Read the manifest and metadata members; return them and the first payload member.

    Raises:
        ContainerError: the members are not in the bundle's order, or break container rules.
        ManifestError: manifest.json or a metadata file is oversized or invalid.
    """
    members = iter(reader)
    first = next(members, None)
    if first is None or first.name != MANIFEST_NAME:
        got = "nothing" if first is None else repr(first.name)
        raise ContainerError(
            f"the first member must be {MANIFEST_NAME!r}, got {got}", check="layout"
        )
    manifest_bytes = reader.read_member(first, max_bytes=MANIFEST_MAX_BYTES)
    manifest = parse_manifest(manifest_bytes)
    header = BundleHeader(manifest=manifest, manifest_bytes=manifest_bytes)
    total = 0
    for member in members:
        if not member.name.startswith(METADATA_PREFIX):
            return header, member
        name = member.name.removeprefix(METADATA_PREFIX)
        if "/" in name or not name.endswith(".json"):
            raise ContainerError(
                f"{member.name!r}: metadata must be metadata/<role>.json", check="layout"
            )
        if len(header.metadata) >= METADATA_MAX_FILES or total + member.size > METADATA_MAX_TOTAL:
            raise ContainerError(
                f"more than {METADATA_MAX_FILES} metadata files or {METADATA_MAX_TOTAL} bytes of "
                "metadata",
                check="size",
            )
        header.metadata[name] = reader.read_member(member, max_bytes=METADATA_MAX_BYTES)
        total += member.size
    return header, None


def open_bundle(path: Path) -> tuple[BinaryIO, ContainerReader, BundleHeader, Member | None]:
    """Open ``path`` and read its header. The caller closes the returned file."""
    try:
        stream = path.open("rb")
    except OSError as e:
        raise UsageError(f"{path}: cannot open ({e.strerror})") from e
    try:
        reader = ContainerReader(stream, what=path.name)
        header, first_payload = read_header(reader)
    except BaseException:
        stream.close()
        raise
    return stream, reader, header, first_payload


def inspect_bundle(path: Path) -> BundleHeader:
    """Read and validate only the header of ``path`` (no payload hashing, no trust)."""
    stream, _, header, _ = open_bundle(path)
    stream.close()
    return header


class _StagedFile:
    """Write one payload file into the staging directory: exclusive create, no symlink follow."""

    def __init__(self, root: Path, rel: str) -> None:
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        self.fd = os.open(target, flags, 0o644)

    def write(self, chunk: memoryview) -> None:
        view = chunk
        while view:
            view = view[os.write(self.fd, view) :]

    def close(self) -> None:
        os.fsync(self.fd)
        os.close(self.fd)


Sink = tuple[Callable[[memoryview], object], Callable[[], object]]
"""A payload file's destination: (write one chunk, finish the file)."""


def check_payload(
    reader: ContainerReader,
    manifest: Manifest,
    first: Member | None,
    *,
    dest: Path | None = None,
) -> None:
    """Stream every payload member, checking it against the manifest; optionally extract it.

    Checks the exact set of files (no extra, no missing), every size before reading and every
    SHA-256 while reading. With ``dest`` (which must not exist), each file is written there from
    the same read that hashes it, fsynced; on any failure ``dest`` is removed entirely.

    Raises:
        IntegrityError: a file is extra, missing, or differs in size or sha256.
        ContainerError: the container breaks a rule (truncation, links, trailing data...).
    """
    if dest is None:
        _walk_payload(reader, manifest, first, None)
        return
    dest.mkdir(parents=True, exist_ok=False)

    def stage(rel: str, _member: Member) -> Sink:
        staged = _StagedFile(dest, rel)
        return staged.write, staged.close

    try:
        _walk_payload(reader, manifest, first, stage)
        _fsync_tree(dest)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise


def _walk_payload(
    reader: ContainerReader,
    manifest: Manifest,
    first: Member | None,
    open_sink: Callable[[str, Member], Sink] | None,
) -> None:
    """The one payload check: exact file set, sizes before reading, sha256 while reading.

    ``open_sink`` (optional) gives each file a destination fed from the same read that hashes it.
    """
    expected = {entry.path: entry for entry in manifest.files}
    members = iter(reader)
    member = first
    while member is not None:
        if not member.name.startswith(PAYLOAD_PREFIX):
            raise ContainerError(
                f"{member.name!r}: only payload/ members may follow the metadata", check="layout"
            )
        rel = member.name.removeprefix(PAYLOAD_PREFIX)
        entry = expected.pop(rel, None)
        if entry is None:
            raise IntegrityError(f"{rel}: not listed in the manifest (extra file)", check="extra")
        if member.size != entry.size:
            raise IntegrityError(
                f"{rel}: size mismatch (expected {entry.size} bytes, got {member.size})",
                check="size",
            )
        digest = hashlib.sha256()
        if open_sink is None:
            reader.stream_member(member, digest.update)
        else:
            write, finish = open_sink(rel, member)
            try:
                reader.stream_member(member, _tee(digest.update, write))
            finally:
                finish()
        actual = digest.hexdigest()
        if actual != entry.sha256:
            raise IntegrityError(
                f"{rel}: sha256 mismatch (expected {_short(entry.sha256)}, got {_short(actual)})",
                check="sha256",
            )
        member = next(members, None)
    if expected:
        missing = ", ".join(sorted(expected)[:5])
        raise IntegrityError(
            f"{missing}: listed in the manifest but missing from the bundle "
            f"({len(expected)} file(s))",
            check="missing",
        )


def _tee(*sinks: Callable[[memoryview], object]) -> Callable[[memoryview], None]:
    def feed(chunk: memoryview) -> None:
        for sink in sinks:
            sink(chunk)

    return feed


def _fsync_tree(root: Path) -> None:
    for directory, _, _ in os.walk(root):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_signed_copy(path: Path, metadata: dict[str, bytes]) -> None:
    """Rewrite ``path`` atomically with ``metadata`` replacing its metadata members.

    The payload is re-checked against the manifest while it is copied, so signing never blesses
    a bundle whose files do not match their manifest.
    """
    stream, reader, header, first = open_bundle(path)
    with stream:

        def fill(out: BinaryIO) -> None:
            writer = ContainerWriter(out)
            writer.add_bytes(MANIFEST_NAME, header.manifest_bytes)
            for name, data in sorted(metadata.items()):
                writer.add_bytes(METADATA_PREFIX + name, data)

            def copy(rel: str, member: Member) -> Sink:
                return writer.begin_member(member.name, member.size), writer.end_member

            _walk_payload(reader, header.manifest, first, copy)
            writer.close()

        _write_atomically(path, fill)
