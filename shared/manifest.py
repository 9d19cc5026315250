"""What a bundle says about itself: the model description and the manifest of its files.

Two documents share one vocabulary:

- ``model.json`` in a model directory (:class:`ModelSpec`): written by the ML team or by
  ``edgefleet models example``; it names the artifacts (one model in several formats and
  precisions), the input/output signature, labels, test vectors, accuracy budget and free metadata.
- ``manifest.json`` in a bundle (:class:`Manifest`): the same description plus the bundle's name
  and version and the list of every payload file with its size and SHA-256. Its hash is what the
  release key signs, so every byte of the bundle is covered by one signature.

Forward compatibility: unknown fields are ignored (``extra="ignore"``), so an older agent reads a
newer bundle of the same major format version; a newer *major* version is refused. Artifacts of a
format the reader does not know are kept but can simply not be run.

>>> spec = ModelSpec.model_validate({"inputs": [{"name": "x", "dtype": "float32", "shape": [1, 4]}],
...     "outputs": [{"name": "y", "dtype": "float32", "shape": [1, 2]}],
...     "artifacts": [{"format": "onnx", "precision": "fp32", "files": ["m.onnx"]}]})
>>> spec.artifacts[0].format
'onnx'
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from shared.bundle_format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_MAX_BYTES,
    Dtype,
    Precision,
)
from shared.container import check_relative_path
from shared.errors import ContainerError, ManifestError
from shared.jsonsafe import load_json

__all__ = [
    "KNOWN_FORMATS",
    "AccuracyBudget",
    "Artifact",
    "FileEntry",
    "Manifest",
    "ModelSpec",
    "TensorSpec",
    "TestVectors",
    "describe_validation_error",
    "parse_manifest",
    "parse_model_spec",
]

KNOWN_FORMATS = ("onnx", "openvino", "tflite")
NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
VERSION_PATTERN = r"^[0-9A-Za-z][0-9A-Za-z.+_-]{0,63}$"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class _Value(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, str_strip_whitespace=False)


def _safe_path(value: str) -> str:
    try:
        return check_relative_path(value, what="file")
    except ContainerError as e:
        raise ValueError(str(e)) from e


class TensorSpec(_Value):
    """One input or output tensor. ``-1`` in ``shape`` is a dynamic dimension (e.g. batch)."""

    name: str = Field(min_length=1, max_length=128)
    dtype: Dtype
    shape: list[int] = Field(max_length=8)
    layout: str | None = Field(default=None, max_length=16)

    @field_validator("shape")
    @classmethod
    def _dims(cls, shape: list[int]) -> list[int]:
        if any(d < -1 or d == 0 for d in shape):
            raise ValueError(f"dimensions must be positive or -1 (dynamic), got {shape}")
        return shape


class Artifact(_Value):
    """The model in one format and precision; ``files[0]`` is the file a runtime loads."""

    format: str = Field(min_length=1, max_length=32)
    precision: Precision = "fp32"
    files: list[str] = Field(min_length=1, max_length=64)

    _paths = field_validator("files")(lambda cls, v: [_safe_path(p) for p in v])


class TestVectors(_Value):
    """Inputs and golden outputs, each a ``.npy`` file whose first axis indexes the cases."""

    inputs: dict[str, str] = Field(min_length=1, max_length=64)
    outputs: dict[str, str] = Field(min_length=1, max_length=64)

    @field_validator("inputs", "outputs")
    @classmethod
    def _paths(cls, value: dict[str, str]) -> dict[str, str]:
        return {k: _safe_path(v) for k, v in value.items()}


class AccuracyBudget(_Value):
    """The output tolerance the model owner accepts from any runtime, precision or device."""

    max_abs_err: float | None = Field(default=None, gt=0, le=1e6)
    max_rel_err: float | None = Field(default=None, gt=0, le=1e6)


class ModelSpec(_Value):
    """``model.json``: everything about a model except the bundle's name, version and files."""

    name: str | None = Field(default=None, pattern=NAME_PATTERN)
    description: str = Field(default="", max_length=4096)
    inputs: list[TensorSpec] = Field(min_length=1, max_length=64)
    outputs: list[TensorSpec] = Field(min_length=1, max_length=64)
    artifacts: list[Artifact] = Field(min_length=1, max_length=64)
    labels: str | None = None
    test_vectors: TestVectors | None = None
    accuracy_budget: AccuracyBudget | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)

    _labels = field_validator("labels")(lambda cls, v: None if v is None else _safe_path(v))

    def referenced_files(self) -> list[str]:
        """Every payload path this description points at (artifacts, labels, test vectors)."""
        paths = [p for a in self.artifacts for p in a.files]
        if self.labels:
            paths.append(self.labels)
        if self.test_vectors:
            paths += [*self.test_vectors.inputs.values(), *self.test_vectors.outputs.values()]
        return paths


def _check_sha256(value: str) -> str:
    if not _SHA256.fullmatch(value):
        raise ValueError(f"sha256 must be 64 lowercase hex digits, got {value[:80]!r}")
    return value


class FileEntry(_Value):
    """One payload file: path inside the bundle, exact size, SHA-256 (lowercase hex) and,
    from format 1.1, the SHA-256 of each ``chunk_size`` piece (for resumable, deduplicated
    transfer; the last piece may be shorter)."""

    path: str
    size: int = Field(ge=0, lt=1 << 40)
    sha256: str
    chunks: list[str] | None = Field(default=None, max_length=1 << 16)

    _path = field_validator("path")(lambda cls, v: _safe_path(v))
    _hex = field_validator("sha256")(lambda cls, v: _check_sha256(v))

    @field_validator("chunks")
    @classmethod
    def _chunk_hex(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else [_check_sha256(c) for c in value]


class Manifest(ModelSpec):
    """``manifest.json``: the model description, the release identity and every payload file."""

    format: Literal["edgefleet-bundle"]
    format_version: str = Field(pattern=r"^\d{1,4}\.\d{1,4}$")
    name: str = Field(pattern=NAME_PATTERN)
    version: str = Field(pattern=VERSION_PATTERN)
    files: list[FileEntry] = Field(max_length=10_000)
    chunk_size: int | None = Field(default=None, ge=4096, le=64 << 20)

    @field_validator("format_version")
    @classmethod
    def _supported(cls, value: str) -> str:
        major = int(value.split(".", maxsplit=1)[0])
        supported = int(FORMAT_VERSION.split(".", maxsplit=1)[0])
        if major != supported:
            raise ValueError(
                f"format version {value} is not supported (this reader handles {supported}.x)"
            )
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        seen: set[str] = set()
        for entry in self.files:
            if entry.path.casefold() in seen:
                raise ValueError(f"file {entry.path!r} is listed twice")
            seen.add(entry.path.casefold())
        listed = {e.path for e in self.files}
        missing = [p for p in self.referenced_files() if p not in listed]
        if missing:
            raise ValueError(f"referenced files are not in the file list: {missing}")
        for entry in self.files:
            if entry.chunks is None:
                continue
            if self.chunk_size is None:
                raise ValueError(f"file {entry.path!r} lists chunks but chunk_size is not set")
            expected = -(-entry.size // self.chunk_size)
            if len(entry.chunks) != expected:
                raise ValueError(
                    f"file {entry.path!r}: {entry.size} bytes in chunks of {self.chunk_size} "
                    f"needs {expected} chunk hashes, got {len(entry.chunks)}"
                )
        return self

    @property
    def total_size(self) -> int:
        """Sum of the payload file sizes."""
        return sum(e.size for e in self.files)

    def file(self, path: str) -> FileEntry:
        """The entry for ``path``; ``KeyError`` if absent."""
        for entry in self.files:
            if entry.path == path:
                return entry
        raise KeyError(path)


def describe_validation_error(err: ValidationError) -> str:
    """The first three problems, each as ``field.path: message``."""
    parts = []
    for problem in err.errors()[:3]:
        where = ".".join(str(p) for p in problem["loc"]) or "document"
        parts.append(f"{where}: {problem['msg']}")
    more = err.error_count() - len(parts)
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def parse_model_spec(data: bytes, *, what: str = "model.json") -> ModelSpec:
    """Parse and validate ``model.json`` bytes.

    Raises:
        ManifestError: invalid JSON, too large or deep, or not a valid model description.
    """
    raw = load_json(data, what=what, max_bytes=MANIFEST_MAX_BYTES)
    try:
        return ModelSpec.model_validate(raw)
    except ValidationError as e:
        raise ManifestError(f"{what}: {describe_validation_error(e)}", check="schema") from e


def parse_manifest(data: bytes, *, what: str = "manifest.json") -> Manifest:
    """Parse and validate ``manifest.json`` bytes, size-capped before parsing.

    Raises:
        ManifestError: invalid JSON, too large or deep, or not a valid manifest.
    """
    raw = load_json(data, what=what, max_bytes=MANIFEST_MAX_BYTES)
    if not isinstance(raw, dict):
        raise ManifestError(
            f"{what}: expected a JSON object, got {type(raw).__name__}", check="schema"
        )
    if raw.get("format") != FORMAT_NAME:
        raise ManifestError(
            f"{what}: format must be {FORMAT_NAME!r}, got {str(raw.get('format'))[:40]!r}",
            check="format",
        )
    version = str(raw.get("format_version", ""))[:20]
    if version.split(".")[0] != FORMAT_VERSION.split(".", maxsplit=1)[0]:
        raise ManifestError(
            f"{what}: format version {version!r} is not supported (this reader handles "
            f"{FORMAT_VERSION.split('.', maxsplit=1)[0]}.x)",
            check="format",
        )
    try:
        return Manifest.model_validate(raw)
    except ValidationError as e:
        raise ManifestError(f"{what}: {describe_validation_error(e)}", check="schema") from e
