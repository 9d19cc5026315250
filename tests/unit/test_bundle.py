"""Building bundles, and checking and extracting their payload against the manifest.

Trust (signatures, expiry, rollback) is tested in test_trust.py; this file covers integrity: every
byte of every file must match the manifest, and the file set must match exactly.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from shared.bundle import build_bundle, check_payload, inspect_bundle, open_bundle
from shared.container import ContainerReader
from shared.errors import BundleError, ContainerError, IntegrityError, ManifestError, UsageError
from tests.conftest import make_model_dir
from tests.unit.tarcraft import read_entries, regular, rewrite

PAYLOAD_FILES = ["labels.txt", "onnx/model.onnx", "vectors/x.npy", "vectors/y.npy"]


def check(path: Path, dest: Path | None = None) -> None:
    stream, reader, header, first = open_bundle(path)
    with stream:
        check_payload(reader, header.manifest, first, dest=dest)


def test_build_lists_every_file_with_size_and_sha256(bundle_path, model_dir):
    manifest = inspect_bundle(bundle_path).manifest
    assert [f.path for f in manifest.files] == PAYLOAD_FILES
    for entry in manifest.files:
        content = (model_dir / entry.path).read_bytes()
        assert entry.size == len(content)
        assert entry.sha256 == hashlib.sha256(content).hexdigest()
    assert (manifest.name, manifest.version) == ("tiny", "1.0.0")
    check(bundle_path)


def test_build_records_chunk_hashes_for_transfer(tmp_path):
    payload = os.urandom(10_000)
    root = make_model_dir(tmp_path / "m", payload=payload)
    manifest = build_bundle(root, name="c", version="1", out=tmp_path / "c.bundle", chunk_size=4096)
    entry = manifest.file("onnx/model.onnx")
    assert manifest.chunk_size == 4096
    assert entry.chunks == [
        hashlib.sha256(payload[i : i + 4096]).hexdigest() for i in range(0, 10_000, 4096)
    ]


def test_member_order_is_manifest_then_payload(bundle_path):
    names = [info.name for info, _ in read_entries(bundle_path)]
    assert names == ["manifest.json"] + [f"payload/{p}" for p in PAYLOAD_FILES]


def test_build_is_reproducible(tmp_path, model_dir):
    a, b = tmp_path / "a.bundle", tmp_path / "b.bundle"
    build_bundle(model_dir, name="tiny", version="2", out=a)
    build_bundle(model_dir, name="tiny", version="2", out=b)
    assert a.read_bytes() == b.read_bytes()


def test_name_option_overrides_model_json(tmp_path, model_dir):
    manifest = build_bundle(model_dir, name="other", version="1", out=tmp_path / "o.bundle")
    assert manifest.name == "other"


def test_extract_writes_exactly_the_verified_files(bundle_path, model_dir, tmp_path):
    dest = tmp_path / "staging"
    check(bundle_path, dest)
    extracted = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    assert extracted == PAYLOAD_FILES
    for rel in PAYLOAD_FILES:
        assert (dest / rel).read_bytes() == (model_dir / rel).read_bytes()


@pytest.mark.parametrize("target", PAYLOAD_FILES)
def test_a_flipped_byte_in_any_file_is_refused_by_name(bundle_path, tmp_path, target):
    def flip(entries):
        out = []
        for info, data in entries:
            if info.name == f"payload/{target}":
                out.append((info, bytes([data[0] ^ 1]) + data[1:]))
            else:
                out.append((info, data))
        return out

    expected = inspect_bundle(bundle_path).manifest.file(target).sha256
    rewrite(bundle_path, flip)
    dest = tmp_path / "staging"
    with pytest.raises(IntegrityError) as info:
        check(bundle_path, dest)
    message = str(info.value)
    assert message.startswith(f"{target}: sha256 mismatch (expected {expected[:12]}..., got ")
    assert info.value.check == "sha256"
    assert not dest.exists()  # nothing of a refused bundle stays staged


def test_an_extra_file_is_refused(bundle_path):
    rewrite(bundle_path, lambda e: [*e, regular("payload/evil.py", b"import os")])
    with pytest.raises(IntegrityError, match=r"evil.py: not listed in the manifest \(extra file\)"):
        check(bundle_path)


def test_a_missing_file_is_refused(bundle_path):
    rewrite(bundle_path, lambda e: [x for x in e if x[0].name != "payload/labels.txt"])
    with pytest.raises(IntegrityError) as info:
        check(bundle_path)
    assert str(info.value) == (
        "labels.txt: listed in the manifest but missing from the bundle (1 file(s))"
    )


def test_a_size_change_is_refused_before_reading(bundle_path):
    def grow(entries):
        return [
            (regular(i.name, d + b"!" * 10_000_000) if i.name.endswith("model.onnx") else (i, d))
            for i, d in entries
        ]

    rewrite(bundle_path, grow)
    with pytest.raises(
        IntegrityError,
        match=r"onnx/model.onnx: size mismatch \(expected 1000 "
        r"bytes, got 10001000\)",
    ):
        check(bundle_path)


def test_a_truncated_bundle_is_refused(bundle_path):
    data = bundle_path.read_bytes()
    bundle_path.write_bytes(data[: len(data) - 2048])
    with pytest.raises(ContainerError) as info:
        check(bundle_path)
    assert info.value.check == "truncated"


def test_manifest_must_come_first(bundle_path):
    rewrite(bundle_path, lambda e: e[1:] + e[:1])
    with pytest.raises(
        ContainerError, match="first member must be 'manifest.json', got 'payload/labels.txt'"
    ):
        inspect_bundle(bundle_path)


def test_metadata_after_the_payload_is_refused(bundle_path):
    rewrite(bundle_path, lambda e: [*e, regular("metadata/targets.json", b"{}")])
    with pytest.raises(ContainerError, match="only payload/ members may follow the metadata"):
        check(bundle_path)


def test_swapped_bytes_after_hashing_are_never_installed(tmp_path, monkeypatch):
    """Row 12 (verify-then-swap): the staged copy is written from the same read that is hashed.

    A writer that changes the bundle on disk while it is being read can only make the check fail;
    it can never get bytes into the staging directory that were not hashed.
    """
    root = make_model_dir(tmp_path / "m", payload=os.urandom(3 << 20))
    path = tmp_path / "big.bundle"
    build_bundle(root, name="big", version="1", out=path)
    with path.open("rb") as f:
        offset = next(m.offset for m in ContainerReader(f) if m.name == "payload/onnx/model.onnx")
    original_open = open_bundle

    def racing_open(p):
        opened = original_open(p)
        with p.open("r+b") as f:  # an attacker rewrites model bytes the reader has not reached
            f.seek(offset + (2 << 20))
            f.write(b"\xff" * 16)
        return opened

    monkeypatch.setattr("tests.unit.test_bundle.open_bundle", racing_open)
    dest = tmp_path / "staging"
    with pytest.raises(IntegrityError, match="onnx/model.onnx: sha256 mismatch"):
        check(path, dest)
    assert not dest.exists()


def test_staging_directory_must_be_new(bundle_path, tmp_path):
    dest = tmp_path / "staging"
    dest.mkdir()
    with pytest.raises(FileExistsError):
        check(bundle_path, dest)


def test_model_dir_without_model_json_is_a_usage_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no model.json"):
        build_bundle(tmp_path / "empty", name="x", version="1", out=tmp_path / "x.bundle")


def test_model_dir_with_a_symlink_is_refused(tmp_path):
    root = make_model_dir(tmp_path / "m")
    (root / "link").symlink_to("/etc/passwd")
    with pytest.raises(BundleError, match="link: symbolic links are not allowed"):
        build_bundle(root, name="x", version="1", out=tmp_path / "x.bundle")


def test_model_json_naming_a_missing_file_is_refused(tmp_path):
    root = make_model_dir(tmp_path / "m")
    (root / "labels.txt").unlink()
    with pytest.raises(ManifestError, match=r"not in the file list: \['labels.txt'\]"):
        build_bundle(root, name="x", version="1", out=tmp_path / "x.bundle")
    assert not (tmp_path / "x.bundle").exists()


def test_bundle_without_name_anywhere_is_a_usage_error(tmp_path):
    root = make_model_dir(tmp_path / "m")
    spec = (root / "model.json").read_text().replace('"name": "tiny", ', "")
    (root / "model.json").write_text(spec)
    with pytest.raises(UsageError, match="--name"):
        build_bundle(root, name=None, version="1", out=tmp_path / "x.bundle")
