"""What the daemon reads of an installed manifest (agent.installed) against shared.manifest.

Whatever parse_installed_manifest accepts, parse_manifest accepts with the same values; it refuses
what it reads that is damaged, naming the field. And the daemon, so reading, imports no pydantic.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from agent.installed import parse_installed_manifest
from shared.errors import ManifestError
from shared.manifest import parse_manifest

SHA = "a" * 64


def document(**changes) -> dict:
    doc = {
        "format": "edgefleet-bundle",
        "format_version": "1.1",
        "name": "cnn",
        "version": "1.0.0",
        "inputs": [{"name": "input", "dtype": "float32", "shape": [-1, 32, 32, 3]}],
        "outputs": [{"name": "output", "dtype": "float32", "shape": [-1, 10]}],
        "artifacts": [
            {"format": "onnx", "precision": "fp32", "files": ["onnx/model.onnx"]},
            {"format": "tflite", "files": ["tflite/model.tflite"]},
        ],
        "files": [
            {"path": "onnx/model.onnx", "size": 10, "sha256": SHA},
            {"path": "tflite/model.tflite", "size": 0, "sha256": "b" * 64},
            {"path": "vectors/input.npy", "size": 20, "sha256": "c" * 64},
            {"path": "vectors/output.npy", "size": 20, "sha256": "d" * 64},
        ],
        "test_vectors": {
            "inputs": {"input": "vectors/input.npy"},
            "outputs": {"output": "vectors/output.npy"},
        },
        "accuracy_budget": {"max_abs_err": 0.01},
        "chunk_size": None,
        "labels": None,
    }
    doc.update(changes)
    return doc


def encode(doc: dict) -> bytes:
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    "doc",
    [
        document(),
        document(format_version="1.7", future={"x": 1}),  # a newer minor version, unknown fields
        document(inputs=[{"name": "a", "dtype": "uint8", "shape": [1], "layout": "NHWC"}]),
    ],
)
def test_what_it_reads_agrees_with_the_full_manifest(doc):
    light = parse_installed_manifest(encode(doc), name="cnn", version="1.0.0")
    full = parse_manifest(encode(doc))
    assert (light.name, light.version) == (full.name, full.version)
    for ours, theirs in ((light.inputs, full.inputs), (light.outputs, full.outputs)):
        assert [(t.name, t.dtype, list(t.shape)) for t in ours] == [
            (t.name, t.dtype, t.shape) for t in theirs
        ]
    assert [(a.format, a.precision, list(a.files)) for a in light.artifacts] == [
        (a.format, a.precision, a.files) for a in full.artifacts
    ]
    assert [(f.path, f.size, f.sha256) for f in light.files] == [
        (f.path, f.size, f.sha256) for f in full.files
    ]


def with_first(key, **changes):
    doc = document()
    doc[key] = [{**doc[key][0], **changes}, *doc[key][1:]]
    return doc


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"{", r"not valid JSON|invalid JSON"),
        (b"[]", r"expected an object, got list"),
        (encode(document(format="zip")), r"format must be 'edgefleet-bundle'"),
        (encode(document(format_version="2.0")), r"format version '2.0' is not supported"),
        (encode(document(name=None)), r": name: required$"),
        (encode(document(version=7)), r": version: expected str, got int$"),
        (encode(document(inputs=[])), r": inputs: at least 1 expected$"),
        (encode(document(artifacts="onnx")), r": artifacts: expected list, got str$"),
        (encode(with_first("inputs", dtype="complex64")), r"inputs\[0\]\.dtype: expected one of"),
        (encode(with_first("inputs", shape=[1, 0])), r"inputs\[0\]\.shape: dimensions must be"),
        (encode(with_first("outputs", shape=[True])), r"outputs\[0\]\.shape: dimensions must"),
        (encode(with_first("artifacts", files=[])), r"artifacts\[0\]\.files: at least 1"),
        (encode(with_first("artifacts", precision="fp8")), r"artifacts\[0\]\.precision"),
        (encode(with_first("artifacts", files=["../x"])), r"artifacts\[0\]\.files\[0\]: file"),
        (encode(with_first("files", path="/etc/passwd")), r"files\[0\]\.path: .*absolute"),
        (encode(with_first("files", sha256="A" * 64)), r"files\[0\]\.sha256: expected 64 lower"),
        (encode(with_first("files", size=-1)), r"files\[0\]\.size: must be >= 0, got -1$"),
        (encode(with_first("files", size=1.5)), r"files\[0\]\.size: expected int, got float$"),
        (encode(document(name="other")), r"name: expected 'cnn' \(the installed one\), got 'o"),
        (encode(document(version="2.0.0")), r"version: expected '1.0.0' \(the installed one\)"),
    ],
)
def test_damage_is_refused_naming_the_field(data, message):
    with pytest.raises(ManifestError, match=message):
        parse_installed_manifest(data, name="cnn", version="1.0.0")


def test_anything_it_refuses_the_full_parser_refuses_too():
    """Name and version aside (they are checked against the directory), the light reader is
    never more lenient than the full one on the fields it reads."""
    for doc in (
        with_first("inputs", dtype="complex64"),
        with_first("artifacts", files=["../x"]),
        with_first("files", sha256="A" * 64),
        document(inputs=[]),
    ):
        with pytest.raises(ManifestError):
            parse_manifest(encode(doc))


def test_the_daemon_imports_no_pydantic():
    """What ``python -m agent run`` imports, with a runtime backend, stays free of pydantic, the
    trust stack and the CLI (each would stay resident for as long as the daemon runs)."""
    code = (
        "import json, sys, agent.service, agent.daemon, agent.runtimes.onnx; "
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(json.loads(out.stdout))
    assert not loaded & {"pydantic", "pydantic_core", "tuf", "securesystemslib", "cryptography"}
    assert not loaded & {"typer", "rich", "fleet"}
