"""The manifest and model.json: validation, limits before parsing, and forward compatibility."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.bundle_format import MANIFEST_MAX_BYTES
from shared.errors import ManifestError
from shared.jsonsafe import load_json, nesting_depth
from shared.manifest import parse_manifest, parse_model_spec

SHA = "a" * 64


def manifest(**changes) -> dict:
    doc = {
        "format": "edgefleet-bundle",
        "format_version": "1.0",
        "name": "cnn",
        "version": "1.0.0",
        "inputs": [{"name": "input", "dtype": "float32", "shape": [-1, 32, 32, 3]}],
        "outputs": [{"name": "output", "dtype": "float32", "shape": [-1, 10]}],
        "artifacts": [{"format": "onnx", "precision": "fp32", "files": ["m.onnx"]}],
        "files": [{"path": "m.onnx", "size": 10, "sha256": SHA}],
    }
    doc.update(changes)
    return doc


def encode(doc: dict) -> bytes:
    return json.dumps(doc).encode()


def test_valid_manifest_parses_with_defaults():
    parsed = parse_manifest(encode(manifest()))
    assert parsed.name == "cnn"
    assert parsed.total_size == 10
    assert parsed.accuracy_budget is None
    assert parsed.file("m.onnx").sha256 == SHA


def test_unknown_fields_and_newer_minor_version_are_ignored():
    # An older agent must read a newer bundle of the same major version.
    doc = manifest(format_version="1.7", delta_chunks={"m.onnx": []})
    doc["artifacts"][0]["npu_hint"] = "fast"
    doc["files"][0]["xor_delta"] = [{"size": 10, "sha256": SHA}]
    doc["artifacts"].append({"format": "coreml", "precision": "fp16", "files": ["m.onnx"]})
    parsed = parse_manifest(encode(doc))
    assert [a.format for a in parsed.artifacts] == ["onnx", "coreml"]


def test_newer_major_version_is_refused():
    with pytest.raises(
        ManifestError,
        match=r"format version '2.0' is not supported \(this reader "
        r"handles 1.x\)",
    ):
        parse_manifest(encode(manifest(format_version="2.0")))


def test_not_a_manifest_is_refused():
    with pytest.raises(ManifestError, match="format must be 'edgefleet-bundle', got 'zip'"):
        parse_manifest(encode(manifest(format="zip")))
    with pytest.raises(ManifestError, match="expected a JSON object, got list"):
        parse_manifest(b"[]")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"name": "Bad Name"}, "name"),
        ({"version": "../1"}, "version"),
        ({"files": [{"path": "../m.onnx", "size": 10, "sha256": SHA}]}, "'..'"),
        ({"files": [{"path": "m.onnx", "size": -1, "sha256": SHA}]}, "size"),
        ({"files": [{"path": "m.onnx", "size": 10, "sha256": "XYZ"}]}, "64 lowercase hex"),
        ({"files": [{"path": "m.onnx", "size": 10, "sha256": SHA + "\n"}]}, "64 lowercase hex"),
        ({"files": [{"path": "m.onnx", "size": 10, "sha256": SHA}] * 2}, "listed twice"),
        ({"files": []}, "not in the file list: ['m.onnx']"),
        ({"inputs": [{"name": "i", "dtype": "complex", "shape": [1]}]}, "dtype"),
        ({"inputs": [{"name": "i", "dtype": "float32", "shape": [0]}]}, "positive or -1"),
        ({"accuracy_budget": {"max_abs_err": -1}}, "max_abs_err"),
    ],
)
def test_invalid_manifests_are_refused_with_the_field_named(change, message):
    with pytest.raises(ManifestError) as info:
        parse_manifest(encode(manifest(**change)))
    assert message in str(info.value)
    assert str(info.value).startswith("manifest.json: ")


def test_chunk_hashes_must_cover_the_file_exactly():
    ok = manifest(
        chunk_size=4096,
        files=[{"path": "m.onnx", "size": 8193, "sha256": SHA, "chunks": [SHA, SHA, SHA]}],
    )
    assert parse_manifest(encode(ok)).files[0].chunks == [SHA] * 3
    short = manifest(
        chunk_size=4096,
        files=[{"path": "m.onnx", "size": 8193, "sha256": SHA, "chunks": [SHA, SHA]}],
    )
    with pytest.raises(
        ManifestError, match="8193 bytes in chunks of 4096 needs 3 chunk hashes, got 2"
    ):
        parse_manifest(encode(short))
    unsized = manifest(files=[{"path": "m.onnx", "size": 10, "sha256": SHA, "chunks": [SHA]}])
    with pytest.raises(ManifestError, match="chunk_size is not set"):
        parse_manifest(encode(unsized))


def test_size_cap_applies_before_parsing():
    data = b'{"x": "' + b"a" * MANIFEST_MAX_BYTES + b'"}'
    with pytest.raises(ManifestError, match=f"exceeds the limit of {MANIFEST_MAX_BYTES} bytes"):
        parse_manifest(data)


def test_deep_nesting_is_refused_cleanly():
    data = b"[" * 100_000 + b"]" * 100_000  # far past the parser's own recursion limit
    with pytest.raises(ManifestError, match="nesting depth exceeds the limit of 32"):
        load_json(data, what="x", max_bytes=1 << 20)
    moderate = b"[" * 40 + b"]" * 40  # parsable, but deeper than the document may be
    with pytest.raises(ManifestError, match="nesting depth 40 exceeds the limit of 32"):
        load_json(moderate, what="x", max_bytes=1 << 20)


def test_duplicate_keys_nan_and_bad_utf8_are_refused():
    with pytest.raises(ManifestError, match="duplicate key 'name'"):
        parse_manifest(b'{"name": "a", "name": "b"}')
    with pytest.raises(ManifestError, match="NaN is not valid JSON"):
        load_json(b'{"a": NaN}', what="x", max_bytes=100)
    with pytest.raises(ManifestError, match="not UTF-8"):
        load_json(b'{"a": "\xff"}', what="x", max_bytes=100)
    with pytest.raises(ManifestError, match="invalid JSON"):
        load_json(b'{"a": ', what="x", max_bytes=100)


def test_nesting_depth_counts_lists_and_objects_not_strings():
    assert nesting_depth({"a": "[[[[[[["}) == 1
    assert nesting_depth([[1], {"b": [2]}]) == 3
    assert nesting_depth(5) == 0


def test_model_spec_accepts_what_models_example_writes():
    spec = parse_model_spec(
        encode(
            {
                "name": "example-cnn-small",
                "inputs": [
                    {
                        "name": "input",
                        "dtype": "float32",
                        "shape": [-1, 32, 32, 3],
                        "layout": "NHWC",
                    }
                ],
                "outputs": [{"name": "output", "dtype": "float32", "shape": [-1, 10]}],
                "labels": "labels.txt",
                "artifacts": [
                    {
                        "format": "openvino",
                        "precision": "fp32",
                        "files": ["openvino/model.xml", "openvino/model.bin"],
                    }
                ],
                "test_vectors": {
                    "inputs": {"input": "vectors/input.npy"},
                    "outputs": {"output": "vectors/output.npy"},
                },
                "accuracy_budget": {"max_abs_err": 0.0001},
                "metadata": {"size": "small"},
            }
        )
    )
    assert spec.referenced_files() == [
        "openvino/model.xml",
        "openvino/model.bin",
        "labels.txt",
        "vectors/input.npy",
        "vectors/output.npy",
    ]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_any_json_document_is_parsed_or_refused_cleanly(value):
    try:
        parse_manifest(json.dumps(value).encode())
    except ManifestError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutations_of_a_valid_manifest_are_parsed_or_refused_cleanly(data):
    doc = bytearray(encode(manifest()))
    for _ in range(data.draw(st.integers(1, 3))):
        doc[data.draw(st.integers(0, len(doc) - 1))] = data.draw(st.integers(0, 255))
    try:
        parse_manifest(bytes(doc))
    except ManifestError:
        pass


def test_tensor_payloads_skip_the_walk_but_not_the_parsers_limit():
    moderate = b"[" * 40 + b"]" * 40
    assert load_json(moderate, what="t", max_bytes=1 << 20, max_depth=None) is not None
    runaway = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(ManifestError, match="nesting depth exceeds"):
        load_json(runaway, what="t", max_bytes=1 << 20, max_depth=None)
