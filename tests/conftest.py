"""Fixtures shared by the whole suite: a tiny model directory and a signed bundle of it.

The tiny model needs no ML library (its "model" file is opaque bytes), so the bundle and trust
tests run on any install; tests that run real runtimes live in tests/integration.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from shared.bundle import build_bundle, inspect_bundle, write_signed_copy
from shared.keystore import KeyStore
from shared.trust import sign_release

TINY_SPEC = {
    "name": "tiny",
    "inputs": [{"name": "x", "dtype": "float32", "shape": [1, 4]}],
    "outputs": [{"name": "y", "dtype": "float32", "shape": [1, 2]}],
    "artifacts": [{"format": "onnx", "precision": "fp32", "files": ["onnx/model.onnx"]}],
    "labels": "labels.txt",
    "test_vectors": {"inputs": {"x": "vectors/x.npy"}, "outputs": {"y": "vectors/y.npy"}},
}


def make_model_dir(root: Path, *, payload: bytes = b"onnx-bytes" * 100) -> Path:
    """A model directory with model.json, one model file, labels and test-vector files."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "model.json").write_text(json.dumps(TINY_SPEC))
    (root / "onnx").mkdir(exist_ok=True)
    (root / "onnx" / "model.onnx").write_bytes(payload)
    (root / "labels.txt").write_text("cat\ndog\n")
    (root / "vectors").mkdir(exist_ok=True)
    (root / "vectors" / "x.npy").write_bytes(b"x" * 64)
    (root / "vectors" / "y.npy").write_bytes(b"y" * 32)
    return root


@pytest.fixture
def now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return make_model_dir(tmp_path / "model")


@pytest.fixture
def bundle_path(tmp_path: Path, model_dir: Path) -> Path:
    """An unsigned bundle of the tiny model."""
    out = tmp_path / "tiny-1.0.0.bundle"
    build_bundle(model_dir, name=None, version="1.0.0", out=out)
    return out


@pytest.fixture
def keystore(tmp_path: Path, now: datetime) -> KeyStore:
    return KeyStore.create(tmp_path / "keys", now=now)


@pytest.fixture
def signed_bundle(bundle_path: Path, keystore: KeyStore, now: datetime) -> Path:
    """The tiny bundle, signed as a 30-day release with every key of ``keystore``."""
    _, files = sign_release(
        keystore, inspect_bundle(bundle_path), expires_in=timedelta(days=30), now=now
    )
    write_signed_copy(bundle_path, files)
    return bundle_path
