"""Offline trust checks of releases and director orders (docs SECURITY-MATRIX rows 1-11 and 41).

Each test owns a key directory (the signer's side, ``KeyStore``) and plays a device that verifies
a bundle offline with ``verify_release`` and a director order with ``verify_deployment``. A
persistent ``metadata_dir`` is the device's remembered TUF state: it is what makes metadata
rollback and fast-forward detectable, so the tests that need memory pass one.

python-tuf checks metadata expiry against the real clock; ``now`` only drives the release terms.
Metadata that is already expired, or that an attacker holding online keys would publish, is built
here with ``tuf.api.metadata`` and signed with the store's own signers.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from securesystemslib.signer import CryptoSigner
from tuf.api import exceptions as tuf_errors
from tuf.api.metadata import Metadata, MetaFile, Root, TargetFile, Targets, Timestamp

from shared.bundle import (
    MANIFEST_NAME,
    BundleHeader,
    build_bundle,
    check_payload,
    inspect_bundle,
    open_bundle,
    write_signed_copy,
)
from shared.container import ContainerReader, ContainerWriter
from shared.errors import (
    ContainerError,
    EdgefleetError,
    ExpiredError,
    KeyStoreError,
    ManifestError,
    RollbackError,
    SignatureError,
    TargetingError,
    UsageError,
)
from shared.keystore import DIRECTOR, KeyStore
from shared.trust import (
    DeviceIdentity,
    ReleaseInfo,
    sign_deployment,
    sign_release,
    target_path,
    verify_deployment,
    verify_release,
)

MODEL_SPEC = {
    "name": "tiny",
    "inputs": [{"name": "x", "dtype": "float32", "shape": [1, 4]}],
    "outputs": [{"name": "y", "dtype": "float32", "shape": [1, 2]}],
    "artifacts": [{"format": "onnx", "precision": "fp32", "files": ["onnx/model.onnx"]}],
}
LIFETIME = timedelta(days=30)


@dataclass
class Release:
    """A built and signed bundle as the signer produced it."""

    path: Path
    info: ReleaseInfo
    files: dict[str, bytes]


# -- helpers -------------------------------------------------------------------------------------


def read_header(path: Path) -> BundleHeader:
    """Open the bundle as a device does and return its header (the payload is checked too)."""
    stream, reader, header, first = open_bundle(path)
    with stream:
        check_payload(reader, header.manifest, first)
    return header


def header_with(release: Release, changes: dict[str, bytes | None]) -> BundleHeader:
    """``release``'s header with some metadata files replaced (or removed, for ``None``)."""
    header = read_header(release.path)
    metadata = {**release.files, **changes}
    header.metadata = {name: data for name, data in metadata.items() if data is not None}
    return header


def version_of(data: bytes) -> int:
    return Metadata.from_bytes(data).signed.version


def sign_timestamp(store: KeyStore, *, version: int, snapshot_version: int, expires: datetime):
    """A timestamp signed with the store's real timestamp key (what a compromised key can do)."""
    md = Metadata(
        Timestamp(
            version=version,
            expires=expires.replace(microsecond=0),
            snapshot_meta=MetaFile(version=snapshot_version),
        )
    )
    for signer in store.signers(store.root().signed, "timestamp"):
        md.sign(signer, append=True)
    return md.to_bytes()


def online_only(store: KeyStore, dest: Path) -> KeyStore:
    """A copy of ``store`` holding only the fleet service's online keys (no root, no release)."""
    shutil.copytree(store.path, dest)
    for pem in [*dest.glob("private/root-*.pem"), *dest.glob("private/targets-*.pem")]:
        pem.unlink()
    fleet = KeyStore.open(dest)
    assert fleet.signers(fleet.root().signed, "targets") == []
    return fleet


def replace_manifest(path: Path, manifest: bytes) -> None:
    """Rewrite the container with another manifest.json, keeping every other member as is."""
    out = io.BytesIO()
    writer = ContainerWriter(out)
    with path.open("rb") as stream:
        reader = ContainerReader(stream)
        for member in reader:
            data = reader.read_member(member, max_bytes=10_000_000)
            writer.add_bytes(member.name, manifest if member.name == MANIFEST_NAME else data)
    writer.close()
    path.write_bytes(out.getvalue())


def forged_targets(
    fleet: KeyStore, header: BundleHeader, *, version: int, expires: datetime
) -> Metadata[Targets]:
    """Targets listing ``header``'s manifest, signed with the fleet's director key."""
    target = TargetFile.from_data(
        target_path(header.manifest.name, header.manifest.version),
        header.manifest_bytes,
        ["sha256"],
    )
    md = Metadata(Targets(version=version, expires=expires, targets={target.path: target}))
    for signer in fleet.signers(fleet.root().signed, DIRECTOR):
        md.sign(signer, append=True)
    return md


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture
def now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def write_model(model_dir: Path, payload: bytes = b"weights v1") -> Path:
    (model_dir / "onnx").mkdir(parents=True, exist_ok=True)
    (model_dir / "model.json").write_text(json.dumps(MODEL_SPEC))
    (model_dir / "onnx" / "model.onnx").write_bytes(payload)
    return model_dir


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return write_model(tmp_path / "model")


@pytest.fixture
def store(tmp_path: Path, now: datetime) -> KeyStore:
    return KeyStore.create(tmp_path / "keys", now=now)


@pytest.fixture
def trusted_root(store: KeyStore) -> bytes:
    """Root version 1, as installed on the device at manufacture."""
    return (store.path / "root.json").read_bytes()


@pytest.fixture
def device_root(trusted_root: bytes) -> Root:
    return Metadata[Root].from_bytes(trusted_root).signed


@pytest.fixture
def build(tmp_path: Path, model_dir: Path) -> Callable[..., Path]:
    def make(version: str = "1.0.0", *, out: Path | None = None) -> Path:
        path = out or tmp_path / f"tiny-{version}.bundle"
        build_bundle(model_dir, name=None, version=version, out=path)
        return path

    return make


@pytest.fixture
def sign(store: KeyStore, now: datetime) -> Callable[..., Release]:
    def make(path: Path, *, signer: KeyStore | None = None, **terms: Any) -> Release:
        terms.setdefault("expires_in", LIFETIME)
        info, files = sign_release(signer or store, inspect_bundle(path), now=now, **terms)
        write_signed_copy(path, files)
        return Release(path, info, files)

    return make


@pytest.fixture
def release(build: Callable[..., Path], sign: Callable[..., Release]) -> Callable[..., Release]:
    def make(version: str = "1.0.0", **terms: Any) -> Release:
        return sign(build(version), **terms)

    return make


@pytest.fixture
def verify(trusted_root: bytes) -> Callable[..., ReleaseInfo]:
    """Verify a bundle path or header as a device trusting root v1 (unless told otherwise)."""

    def check(source: Path | BundleHeader, *, root: bytes | None = None, **kw: Any) -> ReleaseInfo:
        header = read_header(source) if isinstance(source, Path) else source
        return verify_release(header, root or trusted_root, **kw)

    return check


# -- 1. arbitrary software -----------------------------------------------------------------------


def test_bundle_signed_by_unknown_keys_is_refused(tmp_path, now, release, verify):
    good = release("1.0.0")
    dev = tmp_path / "dev"
    verify(good.path, metadata_dir=dev)
    stranger = KeyStore.create(tmp_path / "stranger", now=now)
    evil = release("2.0.0", signer=stranger)

    with pytest.raises(SignatureError) as caught:
        verify(evil.path, metadata_dir=dev)

    assert caught.value.check == "threshold"
    assert "tiny 2.0.0: signature check failed" in str(caught.value)
    assert "timestamp was signed by 0/1 keys" in str(caught.value)
    assert version_of((dev / "timestamp.json").read_bytes()) == 1
    assert verify(good.path, metadata_dir=dev).version == "1.0.0"


def test_unsigned_bundle_is_refused_as_missing_metadata(build, verify):
    path = build("1.0.0")
    assert not read_header(path).signed

    with pytest.raises(SignatureError) as caught:
        verify(path)

    assert caught.value.check == "unsigned"
    assert "tiny 1.0.0: signed metadata missing (timestamp.json is not in the bundle)" in str(
        caught.value
    )


def test_random_bytes_instead_of_a_bundle_are_refused(tmp_path):
    path = tmp_path / "random.bundle"
    path.write_bytes(bytes(range(256)) * 8)

    with pytest.raises(ContainerError) as caught:
        read_header(path)

    assert caught.value.check == "header"
    assert str(caught.value).startswith("random.bundle: header at offset 0")


# -- 2. manifest changed after signing -----------------------------------------------------------


def test_manifest_changed_after_signing_is_refused(release, verify):
    good = release("1.0.0")
    original = read_header(good.path).manifest_bytes
    tampered = original.replace(b'"name": "x"', b'"name": "z"', 1)
    assert tampered != original
    assert len(tampered) == len(original)
    replace_manifest(good.path, tampered)
    assert read_header(good.path).manifest_bytes == tampered  # still a well-formed bundle

    with pytest.raises(SignatureError) as caught:
        verify(good.path)

    assert caught.value.check == "manifest-hash"
    message = str(caught.value)
    assert "tiny 1.0.0: manifest.json does not match the signed release" in message
    assert good.info.manifest_sha256 in message
    assert hashlib.sha256(tampered).hexdigest() in message


# -- 4. threshold --------------------------------------------------------------------------------


def test_release_signed_below_threshold_is_refused(tmp_path, now, model_dir, verify):
    store = KeyStore.create(tmp_path / "keys2", now=now, release_keys=2, release_threshold=2)
    root = (store.path / "root.json").read_bytes()
    path = tmp_path / "tiny.bundle"
    build_bundle(model_dir, name=None, version="1.0.0", out=path)
    _, files = sign_release(store, inspect_bundle(path), expires_in=LIFETIME, now=now)
    targets = Metadata.from_bytes(files["targets.json"])
    assert len(targets.signatures) == 2
    targets.signatures.popitem()
    write_signed_copy(path, {**files, "targets.json": targets.to_bytes()})

    with pytest.raises(SignatureError) as caught:
        verify(path, root=root)

    assert caught.value.check == "threshold"
    assert "targets was signed by 1/2 keys" in str(caught.value)
    assert "threshold not met" in str(caught.value)
    write_signed_copy(path, files)
    assert verify(path, root=root).version == "1.0.0"


# -- 5. rollback ---------------------------------------------------------------------------------


def test_older_validly_signed_bundle_is_refused_after_a_newer_one(tmp_path, release, verify):
    v1 = release("1.0.0")
    v2 = release("2.0.0")
    assert (version_of(v1.files["targets.json"]), version_of(v2.files["targets.json"])) == (1, 2)
    dev = tmp_path / "dev"
    verify(v1.path, metadata_dir=tmp_path / "fresh")  # v1 alone is a valid release
    verify(v2.path, metadata_dir=dev)

    with pytest.raises(RollbackError) as caught:
        verify(v1.path, metadata_dir=dev)

    # The first thing python-tuf sees lower is the timestamp that came with the old bundle.
    assert caught.value.check == "rollback"
    assert isinstance(caught.value.__cause__, tuf_errors.BadVersionNumberError)
    assert "tiny 1.0.0: metadata version check failed: rollback or mix-and-match" in str(
        caught.value
    )
    assert "New timestamp version 1 must be >= 2" in str(caught.value)
    assert version_of((dev / "timestamp.json").read_bytes()) == 2
    assert verify(v2.path, metadata_dir=dev).version == "2.0.0"


def test_older_targets_under_fresh_timestamp_and_snapshot_is_refused(
    tmp_path, store, now, release, verify
):
    """Whoever holds the online keys re-publishes freshness over the older targets."""
    v1 = release("1.0.0")
    v2 = release("2.0.0")
    dev = tmp_path / "dev"
    verify(v2.path, metadata_dir=dev)
    fleet = online_only(store, tmp_path / "fleet")
    old_targets = Metadata.from_bytes(v1.files["targets.json"])
    replay = fleet.publish_freshness(
        old_targets, fleet.root().signed, expires=now + LIFETIME, required=True
    )
    assert version_of(replay["timestamp.json"]) == 3

    with pytest.raises(RollbackError) as caught:
        verify(header_with(v1, replay), metadata_dir=dev)

    assert isinstance(caught.value.__cause__, tuf_errors.BadVersionNumberError)
    assert "targets.json" in str(caught.value)
    assert "version 1, got 2" in str(caught.value)


def test_release_counter_below_device_floor_is_refused(release, verify):
    v1 = release("1.0.0")

    with pytest.raises(RollbackError) as caught:
        verify(v1.path, floor=2)

    assert caught.value.check == "counter"
    assert str(caught.value) == (
        "tiny 1.0.0: release counter 1 is below this device's rollback floor 2"
    )
    assert verify(v1.path, floor=1).counter == 1


def test_default_counters_allow_one_step_operator_revert(tmp_path, release, verify):
    v1, v2, v3 = release("1.0.0"), release("2.0.0"), release("3.0.0")
    assert [(r.info.counter, r.info.rollback_floor) for r in (v1, v2, v3)] == [
        (1, 1),
        (2, 1),
        (3, 2),
    ]
    dev = tmp_path / "dev"
    assert verify(v3.path, metadata_dir=dev, floor=1).rollback_floor == 2  # device commits floor 2
    # The operator reverts: older bundles carry the current metadata (which lists every release).
    write_signed_copy(v2.path, v3.files)
    write_signed_copy(v1.path, v3.files)

    assert verify(v2.path, metadata_dir=dev, floor=2).counter == 2
    with pytest.raises(RollbackError) as caught:
        verify(v1.path, metadata_dir=dev, floor=2)
    assert caught.value.check == "counter"
    assert "release counter 1 is below this device's rollback floor 2" in str(caught.value)


def test_explicit_counter_and_floor_are_signed_and_continued(release, verify):
    v1 = release("1.0.0", counter=10, rollback_floor=7)
    v2 = release("2.0.0")

    info = verify(v1.path)
    assert (info.counter, info.rollback_floor) == (10, 7)
    assert (v2.info.counter, v2.info.rollback_floor) == (11, 10)


def test_counter_below_the_models_latest_is_refused(store, build, sign, release):
    release("1.0.0", counter=10)
    before = store.load("targets").signed

    with pytest.raises(KeyStoreError) as caught:
        sign(build("2.0.0"), counter=5)

    assert caught.value.check == "counter"
    assert str(caught.value) == "counter 5 is below tiny's latest release counter 10"
    after = store.load("targets").signed
    assert after.version == before.version
    assert set(after.targets) == {"tiny/1.0.0/manifest.json"}


def test_rollback_floor_above_counter_is_a_usage_error(build, sign):
    with pytest.raises(UsageError) as caught:
        sign(build("1.0.0"), counter=3, rollback_floor=4)

    assert "rollback floor must be between 0 and the counter 3, got 4" in str(caught.value)


def test_resigning_the_same_version_keeps_its_counter(store, sign, release, verify):
    v1 = release("1.0.0", counter=4, rollback_floor=2)
    again = sign(v1.path, expires_in=LIFETIME * 2)

    assert (again.info.counter, again.info.rollback_floor) == (4, 2)
    assert again.info.expires > v1.info.expires
    assert version_of(again.files["targets.json"]) == 2
    assert verify(v1.path).counter == 4


def test_resigning_an_older_version_after_a_newer_release_keeps_its_counter(sign, release, verify):
    """Refreshing the expiry of the release an operator may revert to (v2 while v3 is out)."""
    v1 = release("1.0.0")
    release("2.0.0")

    again = sign(v1.path, expires_in=LIFETIME * 2)

    assert (again.info.counter, again.info.rollback_floor) == (1, 1)
    assert verify(v1.path).expires == again.info.expires


def test_different_manifest_under_a_released_version_is_refused(
    tmp_path, store, build, sign, release, verify
):
    v1 = release("1.0.0")
    targets_before = store.load("targets").to_bytes()
    write_model(tmp_path / "model", payload=b"other weights")
    other = build("1.0.0", out=tmp_path / "other.bundle")

    with pytest.raises(KeyStoreError) as caught:
        sign(other)

    assert caught.value.check == "immutable"
    assert str(caught.value) == (
        f"tiny 1.0.0 is already released with a different manifest "
        f"(sha256 {v1.info.manifest_sha256[:12]}...); release a new version"
    )
    assert store.load("targets").to_bytes() == targets_before
    assert verify(v1.path).manifest_sha256 == v1.info.manifest_sha256


# -- 6. freeze -----------------------------------------------------------------------------------


def test_expired_timestamp_is_refused_and_not_remembered(tmp_path, store, now, release, verify):
    good = release("1.0.0")
    dev = tmp_path / "dev"
    verify(good.path, metadata_dir=dev)
    stale = sign_timestamp(
        store,
        version=99,
        snapshot_version=version_of(good.files["snapshot.json"]),
        expires=datetime.now(UTC) - timedelta(days=1),
    )

    with pytest.raises(ExpiredError) as caught:
        verify(header_with(good, {"timestamp.json": stale}), metadata_dir=dev)

    assert caught.value.check == "expiry"
    assert isinstance(caught.value.__cause__, tuf_errors.ExpiredMetadataError)
    assert "tiny 1.0.0: metadata expired (timestamp.json is expired)" in str(caught.value)
    # A higher-versioned but expired timestamp must not become the device's rollback reference.
    assert version_of((dev / "timestamp.json").read_bytes()) == 1
    assert verify(good.path, metadata_dir=dev).version == "1.0.0"


def test_expired_release_is_refused_with_its_expiry(now, release, verify):
    good = release("1.0.0", expires_in=timedelta(days=2))
    later = now + timedelta(days=3)

    with pytest.raises(ExpiredError) as caught:
        verify(good.path, now=later)

    expiry = good.info.expires.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert caught.value.check == "expiry"
    assert str(caught.value) == (
        f"tiny 1.0.0: release expired at {expiry} (now {later.strftime('%Y-%m-%dT%H:%M:%SZ')})"
    )
    assert verify(good.path, now=now + timedelta(days=1)).version == "1.0.0"


# -- 7. fast-forward, then recovery --------------------------------------------------------------


def test_fast_forwarded_timestamp_blocks_updates_until_timestamp_key_rotation(
    tmp_path, store, now, build, sign, release, verify
):
    v1 = release("1.0.0")
    dev = tmp_path / "dev"
    forward = sign_timestamp(
        store,
        version=2**31,
        snapshot_version=version_of(v1.files["snapshot.json"]),
        expires=now + LIFETIME,
    )
    write_signed_copy(v1.path, {**v1.files, "timestamp.json": forward})
    verify(v1.path, metadata_dir=dev)
    assert version_of((dev / "timestamp.json").read_bytes()) == 2**31

    v2 = release("2.0.0")
    with pytest.raises(RollbackError) as caught:
        verify(v2.path, metadata_dir=dev)
    assert "New timestamp version 2 must be >= 2147483648" in str(caught.value)

    store.rotate("timestamp", now=now)
    v2 = sign(v2.path)
    assert "2.root.json" in v2.files

    assert verify(v2.path, metadata_dir=dev).version == "2.0.0"
    assert version_of((dev / "timestamp.json").read_bytes()) < 2**31
    assert (dev / "root_history" / "2.root.json").is_file()


# -- 8. mix-and-match ----------------------------------------------------------------------------


def test_snapshot_from_one_signing_with_targets_from_another_is_refused(release, verify):
    a = release("1.0.0")
    b = release("2.0.0")
    mixed = header_with(a, {"targets.json": b.files["targets.json"]})

    with pytest.raises(RollbackError) as caught:
        verify(mixed)

    assert caught.value.check == "rollback"
    assert isinstance(caught.value.__cause__, tuf_errors.BadVersionNumberError)
    assert (
        "tiny 1.0.0: metadata version check failed: rollback or mix-and-match "
        "(Expected targets v1, got v2.)" in str(caught.value)
    )


def test_timestamp_from_one_signing_with_snapshot_from_another_is_refused(release, verify):
    a = release("1.0.0")
    b = release("2.0.0")
    mixed = header_with(b, {"snapshot.json": a.files["snapshot.json"]})

    with pytest.raises(RollbackError) as caught:
        verify(mixed)

    assert "Expected snapshot version 2, got 1" in str(caught.value)


# -- 9. wrong target -----------------------------------------------------------------------------


def test_release_for_other_hardware_is_refused(release, verify):
    r = release("1.0.0", hardware_ids=["rpi5"])

    with pytest.raises(TargetingError) as caught:
        verify(r.path, device=DeviceIdentity(device_id="dev-001", hardware_id="jetson"))

    assert caught.value.check == "hardware-id"
    assert str(caught.value) == "tiny 1.0.0: released for hardware ['rpi5'], not 'jetson'"
    assert verify(r.path, device=DeviceIdentity(hardware_id="rpi5")).hardware_ids == ("rpi5",)


def test_release_for_other_devices_is_refused(release, verify):
    r = release("1.0.0", device_ids=["dev-002"])

    with pytest.raises(TargetingError) as caught:
        verify(r.path, device=DeviceIdentity(device_id="dev-001", hardware_id="rpi5"))

    assert caught.value.check == "device-id"
    assert str(caught.value) == "tiny 1.0.0: released for devices ['dev-002'], not 'dev-001'"
    assert verify(r.path, device=DeviceIdentity(device_id="dev-002")).device_ids == ("dev-002",)


@pytest.mark.parametrize(
    "device",
    [DeviceIdentity(), DeviceIdentity("dev-001", "jetson"), DeviceIdentity("dev-9", "x86-avx512")],
)
def test_release_without_targeting_verifies_for_any_device(release, verify, device):
    r = release("1.0.0")

    assert verify(r.path, device=device).version == "1.0.0"


# -- 10. root rotation ---------------------------------------------------------------------------


def test_device_walks_two_root_rotations(tmp_path, store, now, build, sign, verify):
    path = build("1.0.0")
    store.rotate("root", now=now)
    store.rotate("root", now=now)
    signed = sign(path)
    assert {"1.root.json", "2.root.json", "3.root.json"} <= set(signed.files)
    dev = tmp_path / "dev"

    assert verify(path, metadata_dir=dev).version == "1.0.0"
    assert (dev / "root_history" / "3.root.json").read_bytes() == signed.files["3.root.json"]
    assert Metadata[Root].from_bytes((dev / "root.json").read_bytes()).signed.version == 3


def test_root_signed_only_by_new_keys_is_refused(tmp_path, release, verify):
    good = release("1.0.0")
    forged = Metadata[Root].from_bytes(good.files["1.root.json"])
    forged.signed.version = 2
    new_keys = [CryptoSigner.generate_ed25519() for _ in range(3)]
    for keyid in list(forged.signed.roles["root"].keyids):
        forged.signed.revoke_key(keyid, "root")
    for signer in new_keys:
        forged.signed.add_key(signer.public_key, "root")
    forged.signatures.clear()
    for signer in new_keys:
        forged.sign(signer, append=True)
    dev = tmp_path / "dev"

    with pytest.raises(SignatureError) as caught:
        verify(header_with(good, {"2.root.json": forged.to_bytes()}), metadata_dir=dev)

    assert caught.value.check == "threshold"
    assert "root was signed by 0/2 keys" in str(caught.value)
    assert not (dev / "root_history" / "2.root.json").exists()
    assert verify(good.path, metadata_dir=dev).version == "1.0.0"


def test_release_key_rotation_requires_resigning(store, now, sign, release, verify):
    old = release("1.0.0")
    store.rotate("targets", now=now)
    new_root = (store.path / "root.json").read_bytes()

    with pytest.raises(SignatureError) as caught:
        verify(old.path, root=new_root)
    assert caught.value.check == "threshold"
    assert "targets was signed by 0/1 keys" in str(caught.value)

    resigned = sign(old.path)
    assert resigned.info.counter == old.info.counter
    assert verify(old.path, root=new_root).version == "1.0.0"


# -- 11. malformed metadata ----------------------------------------------------------------------


def _edit_signed(data: bytes, edit: Callable[[dict[str, Any]], object]) -> bytes:
    doc = json.loads(data)
    edit(doc)
    return json.dumps(doc).encode()


def _set(path: list[str], value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(doc: dict[str, Any]) -> None:
        node = doc
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return edit


def _deep(data: bytes, depth: int = 1000) -> bytes:
    """Add a field nested ``depth`` arrays deep to the ``signed`` part (compact or indented)."""
    field = b'"x-deep": ' + b"[" * depth + b"]" * depth + b", "
    return data.replace(b'"_type"', field + b'"_type"', 1)


MALFORMED_TARGETS: dict[str, tuple[Callable[[bytes], bytes], type[EdgefleetError], str]] = {
    "truncated": (lambda d: d[: len(d) // 2], ManifestError, "invalid JSON"),
    "duplicate-key": (
        lambda d: d.replace(b'"_type": "targets",', b'"_type": "targets", "_type": "targets",', 1),
        ManifestError,
        "duplicate key '_type'",
    ),
    "6MB-string": (
        lambda d: _edit_signed(d, _set(["signed", "x-pad"], "a" * 6_000_000)),
        ManifestError,
        "exceeds the limit of 5000000 bytes",
    ),
    "depth-1000": (
        _deep,
        ManifestError,
        "nesting depth exceeds the limit of 32",
    ),
    "version-string": (
        lambda d: _edit_signed(d, _set(["signed", "version"], "x")),
        SignatureError,
        "invalid signed metadata",
    ),
    "expires-number": (
        lambda d: _edit_signed(d, _set(["signed", "expires"], 5)),
        SignatureError,
        "invalid signed metadata",
    ),
    "targets-list": (
        lambda d: _edit_signed(d, _set(["signed", "targets"], [])),
        SignatureError,
        "invalid signed metadata",
    ),
    "non-hex-signature": (
        lambda d: _edit_signed(d, lambda doc: doc["signatures"][0].update(sig="zz" * 64)),
        SignatureError,
        "targets was signed by 0/1 keys",
    ),
    "not-utf8": (lambda d: b"\xff" + d, ManifestError, "not UTF-8"),
    "nan": (lambda d: d.replace(b'"version": 1', b'"version": NaN', 1), ManifestError, "NaN"),
    "5000-digit-integer": (
        lambda d: d.replace(b'"version": 1', b'"version": ' + b"1" * 5000, 1),
        ManifestError,
        "targets.json",
    ),
}


@pytest.mark.parametrize("kind", list(MALFORMED_TARGETS))
def test_malformed_targets_metadata_is_refused_cleanly(tmp_path, release, verify, kind):
    mutate, error, fragment = MALFORMED_TARGETS[kind]
    good = release("1.0.0")
    dev = tmp_path / "dev"  # a device that has not seen this targets version yet
    bad = mutate(good.files["targets.json"])
    assert bad != good.files["targets.json"]

    with pytest.raises(EdgefleetError) as caught:
        verify(header_with(good, {"targets.json": bad}), metadata_dir=dev)

    assert type(caught.value) is error
    assert fragment in str(caught.value)
    assert verify(good.path, metadata_dir=dev).version == "1.0.0"


def test_malformed_next_root_is_refused(release, verify):
    good = release("1.0.0")

    with pytest.raises(SignatureError) as caught:
        verify(
            header_with(good, {"2.root.json": b'{"signed": {"version": "2"}, "signatures": []}'})
        )

    assert caught.value.check == "metadata"
    assert "tiny 1.0.0: invalid signed metadata (DeserializationError" in str(caught.value)


def test_oversized_metadata_member_is_refused_before_parsing(release):
    good = release("1.0.0")
    write_signed_copy(good.path, {**good.files, "targets.json": b" " * 6_000_000})

    with pytest.raises(ContainerError) as caught:
        read_header(good.path)

    assert caught.value.check == "size"
    assert "'metadata/targets.json': 6000000 bytes exceeds the limit of 5000000" in str(
        caught.value
    )


def test_oversized_timestamp_is_reported_as_oversized_not_missing(release, verify):
    """A timestamp over python-tuf's 16 KiB cap is present but too large, not 'missing'."""
    good = release("1.0.0")
    padded = good.files["timestamp.json"] + b" " * 20_000

    with pytest.raises(SignatureError) as caught:
        verify(header_with(good, {"timestamp.json": padded}))

    assert "exceeding the maximum allowed length of 16384" in str(caught.value)
    assert caught.value.check != "unsigned"
    assert "missing" not in str(caught.value)


@pytest.fixture(scope="module")
def fuzz_release(tmp_path_factory) -> tuple[BundleHeader, bytes, ReleaseInfo]:
    base = tmp_path_factory.mktemp("fuzz")
    now = datetime.now(UTC).replace(microsecond=0)
    store = KeyStore.create(base / "keys", now=now)
    path = base / "tiny.bundle"
    build_bundle(write_model(base / "model"), name=None, version="1.0.0", out=path)
    info, files = sign_release(store, inspect_bundle(path), expires_in=LIFETIME, now=now)
    write_signed_copy(path, files)
    return read_header(path), (store.path / "root.json").read_bytes(), info


EDITS = st.lists(
    st.tuples(st.sampled_from(["set", "insert", "delete"]), st.integers(0), st.integers(0, 255)),
    min_size=1,
    max_size=4,
)


@settings(max_examples=60, deadline=None, database=None)
@given(edits=EDITS)
def test_mutated_targets_metadata_only_raises_edgefleet_errors(fuzz_release, edits):
    header, root, good = fuzz_release
    data = bytearray(header.metadata["targets.json"])
    for op, position, byte in edits:
        i = position % (len(data) + 1)
        if op == "insert":
            data[i:i] = bytes([byte])
        elif data and op == "set":
            data[i % len(data)] = byte
        elif data:
            del data[i % len(data)]
    mutated = BundleHeader(
        manifest=header.manifest,
        manifest_bytes=header.manifest_bytes,
        metadata={**header.metadata, "targets.json": bytes(data)},
    )

    try:
        info = verify_release(mutated, root)
    except EdgefleetError:
        return
    assert info == good  # a harmless edit (whitespace, unsigned field) changes nothing signed


# -- 41. compromised fleet service (online keys only) --------------------------------------------


@pytest.fixture
def fleet(tmp_path: Path, store: KeyStore) -> KeyStore:
    return online_only(store, tmp_path / "fleet")


def test_fleet_cannot_sign_a_release(fleet, build, sign):
    with pytest.raises(KeyStoreError) as caught:
        sign(build("6.6.6"), signer=fleet)

    assert caught.value.check == "threshold"
    assert "targets: needs 1 signature(s), only 0 private key(s)" in str(caught.value)


def test_order_for_a_target_the_release_key_never_signed_is_refused(
    tmp_path, now, fleet, device_root, build, release, verify
):
    genuine = release("1.0.0")
    evil_header = read_header(build("6.6.6"))
    unreleased = ReleaseInfo(
        name="tiny",
        version="6.6.6",
        counter=99,
        rollback_floor=0,
        expires=now + LIFETIME,
        manifest_length=len(evil_header.manifest_bytes),
        manifest_sha256=hashlib.sha256(evil_header.manifest_bytes).hexdigest(),
    )
    order = sign_deployment(
        fleet, device_id="dev-001", release=unreleased, sequence=1, expires=now + LIFETIME
    )
    info = verify(genuine.path)

    with pytest.raises(SignatureError) as caught:
        verify_deployment(
            order, device_root, device_id="dev-001", last_sequence=0, now=now, release=info
        )

    assert caught.value.check == "director-mismatch"
    assert str(caught.value) == (
        f"deployment order names tiny/6.6.6/manifest.json ({unreleased.manifest_sha256[:12]}...), "
        f"which is not the release the release key signed (tiny/1.0.0/manifest.json, "
        f"{info.manifest_sha256[:12]}...)"
    )
    # Without the release check the order itself is well signed: full verification is what saves us.
    alone = verify_deployment(order, device_root, device_id="dev-001", last_sequence=0, now=now)
    assert alone.target == "tiny/6.6.6/manifest.json"


def test_order_with_the_right_path_but_another_manifest_is_refused(
    now, fleet, device_root, release, verify
):
    genuine = release("1.0.0")
    info = verify(genuine.path)
    swapped = ReleaseInfo(**{**info.__dict__, "manifest_sha256": "0" * 64})
    order = sign_deployment(
        fleet, device_id="dev-001", release=swapped, sequence=1, expires=now + LIFETIME
    )

    with pytest.raises(SignatureError) as caught:
        verify_deployment(
            order, device_root, device_id="dev-001", last_sequence=0, now=now, release=info
        )

    assert caught.value.check == "director-mismatch"
    assert "000000000000..." in str(caught.value)


def test_targets_forged_with_online_keys_are_refused(tmp_path, now, store, build, release, verify):
    genuine = release("1.0.0")
    fleet = online_only(store, tmp_path / "fleet-now")  # it publishes after the genuine release
    evil_path = build("6.6.6")
    evil_header = read_header(evil_path)
    forged = forged_targets(fleet, evil_header, version=2, expires=now + LIFETIME)
    files = fleet.root_history() | fleet.publish_freshness(
        forged, fleet.root().signed, expires=now + LIFETIME, required=True
    )
    write_signed_copy(evil_path, files)
    assert version_of(files["timestamp.json"]) == version_of(genuine.files["timestamp.json"]) + 1
    dev = tmp_path / "dev"

    with pytest.raises(SignatureError) as caught:
        verify(evil_path, metadata_dir=dev)

    assert caught.value.check == "threshold"
    assert "tiny 6.6.6: signature check failed (targets was signed by 0/1 keys" in str(caught.value)
    # Freshness signed with the real online keys is remembered; the forged targets never are.
    assert (dev / "timestamp.json").is_file()
    assert not (dev / "targets.json").exists()


def test_unreleased_manifest_with_genuine_metadata_is_refused(build, release, verify):
    genuine = release("1.0.0")
    evil_path = build("6.6.6")
    write_signed_copy(evil_path, genuine.files)

    with pytest.raises(SignatureError) as caught:
        verify(evil_path)

    assert caught.value.check == "not-released"
    assert "tiny 6.6.6: not listed in the release key's signed targets" in str(caught.value)


def test_order_for_a_release_below_the_device_floor_is_refused(
    now, fleet, device_root, release, verify
):
    v1 = release("1.0.0")
    release("2.0.0")
    order = sign_deployment(
        fleet, device_id="dev-001", release=v1.info, sequence=7, expires=now + LIFETIME
    )
    deployment = verify_deployment(
        order, device_root, device_id="dev-001", last_sequence=6, now=now
    )
    assert deployment.target == v1.info.path  # the order is authentic; the counter is not enough

    with pytest.raises(RollbackError) as caught:
        verify(v1.path, floor=2)

    assert caught.value.check == "counter"
    assert "release counter 1 is below this device's rollback floor 2" in str(caught.value)


@pytest.fixture
def order_for(now: datetime, fleet: KeyStore) -> Callable[..., bytes]:
    def make(release: Release, *, device_id="dev-001", sequence=5, expires=None) -> bytes:
        return sign_deployment(
            fleet,
            device_id=device_id,
            release=release.info,
            sequence=sequence,
            expires=expires or now + timedelta(hours=1),
        )

    return make


def test_order_for_another_device_is_refused(now, device_root, release, order_for):
    order = order_for(release("1.0.0"), device_id="dev-002")

    with pytest.raises(TargetingError) as caught:
        verify_deployment(order, device_root, device_id="dev-001", last_sequence=0, now=now)

    assert caught.value.check == "device-id"
    assert str(caught.value) == "deployment order is for device 'dev-002', this is 'dev-001'"
    assert verify_deployment(order, device_root, device_id="dev-002", last_sequence=0, now=now)


@pytest.mark.parametrize("last_sequence", [5, 6])
def test_replayed_order_is_refused(now, device_root, release, order_for, last_sequence):
    r = release("1.0.0")
    order = order_for(r, sequence=5)
    accepted = verify_deployment(
        order, device_root, device_id="dev-001", last_sequence=4, now=now, release=r.info
    )
    assert accepted.sequence == 5

    with pytest.raises(RollbackError) as caught:
        verify_deployment(
            order, device_root, device_id="dev-001", last_sequence=last_sequence, now=now
        )

    assert caught.value.check == "replay"
    assert str(caught.value) == (
        f"deployment order sequence 5 is not newer than the last accepted {last_sequence} (replay)"
    )


def test_expired_order_is_refused(now, device_root, release, order_for):
    expires = now + timedelta(minutes=10)
    order = order_for(release("1.0.0"), expires=expires)

    with pytest.raises(ExpiredError) as caught:
        verify_deployment(order, device_root, device_id="dev-001", last_sequence=0, now=expires)

    assert caught.value.check == "expiry"
    assert str(caught.value) == (
        f"deployment order expired at {expires.strftime('%Y-%m-%dT%H:%M:%SZ')}"
    )
    assert verify_deployment(
        order, device_root, device_id="dev-001", last_sequence=0, now=expires - timedelta(seconds=1)
    )


@pytest.mark.parametrize("signer_role", ["timestamp", "foreign-director"])
def test_order_signed_by_a_non_director_key_is_refused(
    tmp_path, now, store, device_root, release, signer_role
):
    r = release("1.0.0")
    if signer_role == "timestamp":
        signers = store.signers(store.root().signed, "timestamp")
        md = Metadata.from_bytes(
            sign_deployment(
                store, device_id="dev-001", release=r.info, sequence=1, expires=now + LIFETIME
            )
        )
        md.signatures.clear()
        for signer in signers:
            md.sign(signer, append=True)
        order = md.to_bytes()
    else:
        other = KeyStore.create(tmp_path / "other", now=now)
        order = sign_deployment(
            other, device_id="dev-001", release=r.info, sequence=1, expires=now + LIFETIME
        )

    with pytest.raises(SignatureError) as caught:
        verify_deployment(order, device_root, device_id="dev-001", last_sequence=0, now=now)

    assert caught.value.check == "threshold"
    assert str(caught.value) == "deployment order: signed by 0/1 director keys"


def _order_edit(edit: Callable[[dict[str, Any]], object]) -> Callable[[bytes], bytes]:
    return lambda data: _edit_signed(data, edit)


MALFORMED_ORDERS: dict[str, tuple[Callable[[bytes], bytes], type[EdgefleetError]]] = {
    "truncated": (lambda d: d[:-10], ManifestError),
    "duplicate-key": (
        lambda d: d.replace(b'"version":', b'"version":1,"version":', 1),
        ManifestError,
    ),
    "depth-1000": (_deep, ManifestError),
    "version-string": (_order_edit(_set(["signed", "version"], "x")), SignatureError),
    "non-hex-signature": (
        _order_edit(lambda doc: doc["signatures"][0].update(sig="zz" * 64)),
        SignatureError,
    ),
    "float-field": (_order_edit(_set(["signed", "x-note"], 1.5)), SignatureError),
    "5000-digit-integer": (
        lambda d: d.replace(b'"version":5', b'"version":' + b"5" * 5000, 1),
        ManifestError,
    ),
    "not-an-object": (lambda d: b"[]", SignatureError),
}


@pytest.mark.parametrize("kind", list(MALFORMED_ORDERS))
def test_malformed_order_is_refused_cleanly(now, device_root, release, order_for, kind):
    mutate, error = MALFORMED_ORDERS[kind]
    order = order_for(release("1.0.0"))
    bad = mutate(order)
    assert bad != order

    with pytest.raises(EdgefleetError) as caught:
        verify_deployment(bad, device_root, device_id="dev-001", last_sequence=0, now=now)

    assert type(caught.value) is error
    assert str(caught.value).startswith("deployment order")
