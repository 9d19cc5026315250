"""Sign releases and verify them: TUF for the release repository, Uptane for per-device orders.

The rules a device (or ``edgefleet bundle verify``) applies before anything of a bundle runs:

1. **Authentic metadata** — python-tuf's client workflow, fed from the metadata carried in the
   bundle (or fetched from the fleet): root walked version by version from the device's trusted
   root, then timestamp, snapshot and targets, each checked for signatures from the keys root
   names, for the role's threshold, for expiry and for version rollback.
2. **Signed release** — the targets role (the release key) lists ``NAME/VERSION/manifest.json``
   with its length and SHA-256; the bundle's manifest must match byte for byte. The manifest in
   turn lists every payload file's size and SHA-256, so every byte is covered.
3. **Release terms** (:func:`check_release`, pure) — the release's own expiry, its hardware and
   device targeting, and anti-rollback: its counter must not be below the device's floor.
4. **Per-device order** (:func:`verify_deployment`, pure) — the fleet's director key signs "device
   D: install target T with hashes H". The device accepts it only if it names itself, is newer
   than the last order it accepted, is unexpired, and names exactly a target that step 2 verified.
   So a compromised fleet service (online keys only) can neither install what the release key did
   not sign nor push a device below its rollback floor.

Anti-rollback: each release carries ``counter`` (by default one more than the model's previous
release) and ``rollback_floor`` (by default the previous release's counter). A device that
*commits* a release raises its floor to that release's ``rollback_floor``, so it may go back one
release (an operator's revert) but never further, and never below what the release key decided.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from securesystemslib.exceptions import UnverifiedSignatureError
from tuf.api import exceptions as tuf_errors
from tuf.api.metadata import Metadata, Root, TargetFile, Targets
from tuf.ngclient import FetcherInterface, Updater, UpdaterConfig

from shared.bundle import BundleHeader
from shared.errors import (
    ExpiredError,
    KeyStoreError,
    ManifestError,
    RollbackError,
    SignatureError,
    TargetingError,
    TrustError,
    UsageError,
)
from shared.jsonsafe import load_json
from shared.keystore import DIRECTOR, KeyStore, role_keys

__all__ = [
    "Deployment",
    "DeviceIdentity",
    "ReleaseInfo",
    "check_deployment_target",
    "check_release",
    "sign_deployment",
    "sign_release",
    "target_path",
    "verify_deployment",
    "verify_release",
]

CUSTOM_KEY = "edgefleet"
ROOT_MAX_BYTES = 512_000
_BASE_URL = "bundle:/metadata/"


def target_path(name: str, version: str) -> str:
    """The TUF target path under which a release's manifest is signed."""
    return f"{name}/{version}/manifest.json"


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class DeviceIdentity:
    """Who is asking: the device id and its hardware class (e.g. ``rpi5``, ``x86-avx512``)."""

    device_id: str | None = None
    hardware_id: str | None = None


@dataclass(frozen=True)
class ReleaseInfo:
    """What the release key signed about one bundle (the TUF target and its custom fields)."""

    name: str
    version: str
    counter: int
    rollback_floor: int
    expires: datetime
    manifest_length: int
    manifest_sha256: str
    hardware_ids: tuple[str, ...] = ()
    device_ids: tuple[str, ...] = ()

    @property
    def path(self) -> str:
        return target_path(self.name, self.version)

    def custom(self) -> dict[str, Any]:
        return {
            CUSTOM_KEY: {
                "name": self.name,
                "version": self.version,
                "counter": self.counter,
                "rollback_floor": self.rollback_floor,
                "expires": _iso(self.expires),
                "hardware_ids": list(self.hardware_ids),
                "device_ids": list(self.device_ids),
            }
        }

    @classmethod
    def from_target(cls, target: TargetFile) -> ReleaseInfo:
        """Read the release terms from a verified TUF target.

        Raises:
            ManifestError: the target's custom fields are missing or of the wrong type.
        """
        custom: dict[str, Any] = (target.unrecognized_fields.get("custom") or {}).get(
            CUSTOM_KEY
        ) or {}
        try:
            return cls(
                name=str(custom["name"]),
                version=str(custom["version"]),
                counter=int(custom["counter"]),
                rollback_floor=int(custom["rollback_floor"]),
                expires=datetime.strptime(custom["expires"], "%Y-%m-%dT%H:%M:%SZ").replace(
                    tzinfo=UTC
                ),
                manifest_length=target.length,
                manifest_sha256=target.hashes["sha256"],
                hardware_ids=tuple(str(h) for h in custom.get("hardware_ids", [])),
                device_ids=tuple(str(d) for d in custom.get("device_ids", [])),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ManifestError(
                f"target {target.path}: release terms missing or invalid ({e!r})", check="release"
            ) from e


# -- signing -------------------------------------------------------------------------------------


def _releases_of(targets: Targets, name: str) -> list[ReleaseInfo]:
    found = []
    for target in targets.targets.values():
        custom = (target.unrecognized_fields.get("custom") or {}).get(CUSTOM_KEY) or {}
        if custom.get("name") == name:
            found.append(ReleaseInfo.from_target(target))
    return found


def sign_release(
    store: KeyStore,
    header: BundleHeader,
    *,
    expires_in: timedelta,
    now: datetime,
    counter: int | None = None,
    rollback_floor: int | None = None,
    hardware_ids: Sequence[str] = (),
    device_ids: Sequence[str] = (),
) -> tuple[ReleaseInfo, dict[str, bytes]]:
    """Add the bundle to the release role's targets and sign the repository metadata.

    Returns the release terms and the metadata files to embed in the bundle (every root version,
    targets and, when the online keys are present, snapshot and timestamp).

    Raises:
        KeyStoreError: the release key is missing, or the version is already released with a
            different manifest (releases are immutable), or the counter goes backwards.
    """
    manifest = header.manifest
    root = store.root().signed
    previous = store.load("targets")
    targets_md: Metadata[Targets] = previous or Metadata(Targets(expires=now + expires_in))
    targets = targets_md.signed
    path = target_path(manifest.name, manifest.version)
    new_target = TargetFile.from_data(path, header.manifest_bytes, ["sha256"])
    existing = targets.targets.get(path)
    if existing is not None and existing.hashes != new_target.hashes:
        raise KeyStoreError(
            f"{manifest.name} {manifest.version} is already released with a different manifest "
            f"(sha256 {existing.hashes['sha256'][:12]}...); release a new version",
            check="immutable",
        )
    others = [r for r in _releases_of(targets, manifest.name) if r.version != manifest.version]
    latest = max((r.counter for r in others), default=0)
    # Signing the same release again (new expiry, rotated keys) keeps its terms by default.
    kept = ReleaseInfo.from_target(existing) if existing is not None else None
    if kept is not None:
        counter = kept.counter if counter is None else counter
        rollback_floor = kept.rollback_floor if rollback_floor is None else rollback_floor
    counter = latest + 1 if counter is None else counter
    if rollback_floor is None:
        rollback_floor = latest if others else counter
    resigning_as_is = kept is not None and counter == kept.counter
    if counter < latest and not resigning_as_is:
        raise KeyStoreError(
            f"counter {counter} is below {manifest.name}'s latest release counter {latest}",
            check="counter",
        )
    if not 0 <= rollback_floor <= counter:
        raise UsageError(
            f"rollback floor must be between 0 and the counter {counter}, got {rollback_floor}"
        )
    info = ReleaseInfo(
        name=manifest.name,
        version=manifest.version,
        counter=counter,
        rollback_floor=rollback_floor,
        expires=(now + expires_in).replace(microsecond=0),
        manifest_length=new_target.length,
        manifest_sha256=new_target.hashes["sha256"],
        hardware_ids=tuple(hardware_ids),
        device_ids=tuple(device_ids),
    )
    new_target.unrecognized_fields["custom"] = info.custom()
    targets.targets[path] = new_target
    if previous is not None:
        targets.version += 1
    targets.expires = max(
        [info.expires, *(ReleaseInfo.from_target(t).expires for t in targets.targets.values())]
    ).replace(microsecond=0)
    store.sign(targets_md, root, "targets")
    files = store.root_history()
    files |= store.publish_freshness(targets_md, root, expires=info.expires, required=False)
    return info, files


# -- verification --------------------------------------------------------------------------------


class _BundleFetcher(FetcherInterface):
    """Serves the TUF client the metadata files carried in a bundle, as if from a repository."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self._files = files

    def _fetch(self, url: str) -> Iterator[bytes]:
        name = url.removeprefix(_BASE_URL)
        if name not in self._files:
            raise tuf_errors.DownloadHTTPError(f"{name} is not in the bundle", 404)
        return iter([self._files[name]])


def _translate(err: Exception, what: str) -> TrustError:  # noqa: PLR0911 (one per error kind)
    """Turn a python-tuf error into edgefleet's tree, keeping tuf's factual message."""
    text = str(err) or type(err).__name__
    if isinstance(err, tuf_errors.ExpiredMetadataError):
        return ExpiredError(f"{what}: metadata expired ({text})")
    if isinstance(err, tuf_errors.BadVersionNumberError):
        return RollbackError(
            f"{what}: metadata version check failed: rollback or mix-and-match ({text})"
        )
    if isinstance(err, tuf_errors.DownloadLengthMismatchError):
        return SignatureError(f"{what}: signed metadata too large ({text})", check="size")
    if isinstance(err, tuf_errors.UnsignedMetadataError):
        return SignatureError(
            f"{what}: signature check failed ({text}; threshold not met or key "
            "unknown to the trust root)",
            check="threshold",
        )
    if isinstance(err, tuf_errors.LengthOrHashMismatchError):
        return SignatureError(
            f"{what}: manifest.json does not match the signed release ({text})",
            check="manifest-hash",
        )
    if isinstance(err, tuf_errors.DownloadHTTPError | tuf_errors.DownloadError):
        return SignatureError(
            f"{what}: signed metadata missing ({text}); was the bundle signed with "
            "'edgefleet bundle sign'?",
            check="unsigned",
        )
    return SignatureError(
        f"{what}: invalid signed metadata ({type(err).__name__}: {text})", check="metadata"
    )


def _validate_metadata_files(files: dict[str, bytes]) -> None:
    """Refuse duplicate keys, deep nesting and oversize before python-tuf parses anything."""
    for name, data in files.items():
        load_json(data, what=f"metadata/{name}", max_bytes=5_000_000)


def verify_release(
    header: BundleHeader,
    trusted_root: bytes,
    *,
    metadata_dir: Path | None = None,
    now: datetime | None = None,
    device: DeviceIdentity | None = None,
    floor: int | None = None,
) -> ReleaseInfo:
    """Verify that ``header``'s manifest is a signed, fresh release meant for ``device``.

    Args:
        header: the bundle's manifest and embedded metadata.
        trusted_root: the root metadata the verifier already trusts (e.g. ``root.json``).
        metadata_dir: where the client keeps its trusted metadata between runs (a device's state:
            it is what makes metadata rollback detectable). ``None`` uses a throwaway directory.
        now: the time for the release-expiry check (UTC); defaults to the clock.
        device: check hardware/device targeting against this identity, when given.
        floor: the device's anti-rollback floor for this model, when it has one.

    Raises:
        SignatureError, ExpiredError, RollbackError, TargetingError: a trust check failed.
        ManifestError: signed metadata is malformed.
    """
    what = f"{header.manifest.name} {header.manifest.version}"
    _validate_metadata_files(header.metadata)
    load_json(trusted_root, what="trust root", max_bytes=ROOT_MAX_BYTES)
    with tempfile.TemporaryDirectory(prefix="edgefleet-tuf-") as scratch:
        directory = str(metadata_dir or scratch)
        if metadata_dir is not None:
            metadata_dir.mkdir(parents=True, exist_ok=True)
        try:
            updater = Updater(
                metadata_dir=directory,
                metadata_base_url=_BASE_URL,
                fetcher=_BundleFetcher(header.metadata),
                config=UpdaterConfig(max_root_rotations=64, prefix_targets_with_hash=False),
                bootstrap=trusted_root,
            )
            updater.refresh()
            target = updater.get_targetinfo(
                target_path(header.manifest.name, header.manifest.version)
            )
        except tuf_errors.RepositoryError as e:
            raise _translate(e, what) from e
        except tuf_errors.DownloadError as e:
            raise _translate(e, what) from e
        except ValueError as e:  # malformed trusted root
            raise SignatureError(f"trust root: invalid ({e})", check="trust-root") from e
    if target is None:
        raise SignatureError(
            f"{what}: not listed in the release key's signed targets (never released, or "
            "withdrawn)",
            check="not-released",
        )
    try:
        target.verify_length_and_hashes(header.manifest_bytes)
    except tuf_errors.LengthOrHashMismatchError as e:
        raise _translate(e, what) from e
    info = ReleaseInfo.from_target(target)
    if (info.name, info.version) != (header.manifest.name, header.manifest.version):
        raise SignatureError(
            f"{what}: signed terms name {info.name} {info.version}", check="release"
        )
    check_release(info, now=now or datetime.now(UTC), device=device, floor=floor)
    return info


def check_release(
    info: ReleaseInfo, *, now: datetime, device: DeviceIdentity | None, floor: int | None
) -> None:
    """Apply a verified release's own terms: expiry, targeting and anti-rollback. Pure.

    Raises:
        ExpiredError: ``now`` is at or past the release's expiry.
        TargetingError: the release names devices or hardware classes, and ``device`` is not one.
        RollbackError: the release counter is below ``floor``.
    """
    label = f"{info.name} {info.version}"
    if now >= info.expires:
        raise ExpiredError(f"{label}: release expired at {_iso(info.expires)} (now {_iso(now)})")
    if device is not None:
        if info.device_ids and device.device_id not in info.device_ids:
            raise TargetingError(
                f"{label}: released for devices {list(info.device_ids)}, not {device.device_id!r}",
                check="device-id",
            )
        if info.hardware_ids and device.hardware_id not in info.hardware_ids:
            raise TargetingError(
                f"{label}: released for hardware {list(info.hardware_ids)}, not "
                f"{device.hardware_id!r}",
                check="hardware-id",
            )
    if floor is not None and info.counter < floor:
        raise RollbackError(
            f"{label}: release counter {info.counter} is below this device's rollback floor "
            f"{floor}",
            check="counter",
        )


# -- per-device orders (Uptane director) ---------------------------------------------------------


@dataclass(frozen=True)
class Deployment:
    """A verified director order: install ``target`` (with these hashes) on ``device_id``."""

    device_id: str
    sequence: int
    expires: datetime
    target: str
    length: int
    sha256: str


def sign_deployment(
    store: KeyStore,
    *,
    device_id: str,
    release: ReleaseInfo,
    sequence: int,
    expires: datetime,
) -> bytes:
    """Sign an order for one device with the director key(s) in ``store``."""
    root = store.root().signed
    target = TargetFile(
        length=release.manifest_length,
        hashes={"sha256": release.manifest_sha256},
        path=release.path,
    )
    md = Metadata(
        Targets(
            version=sequence, expires=expires.replace(microsecond=0), targets={release.path: target}
        )
    )
    md.signed.unrecognized_fields["device_id"] = device_id
    store.sign(md, root, DIRECTOR)
    return md.to_bytes()


def verify_deployment(
    data: bytes,
    root: Root,
    *,
    device_id: str,
    last_sequence: int,
    now: datetime,
    release: ReleaseInfo | None = None,
) -> Deployment:
    """Check a director order for this device. Pure: no clock, no I/O.

    Args:
        data: the signed order as received.
        root: the device's trusted root (names the director keys and threshold).
        device_id: this device.
        last_sequence: the sequence of the last order this device accepted (replay defence).
        now: the current UTC time.
        release: when given, the verified release the order must name exactly.

    Raises:
        SignatureError, ExpiredError, RollbackError, TargetingError.
    """
    load_json(data, what="deployment order", max_bytes=64_000)
    try:
        md = Metadata[Targets].from_bytes(data)
    except Exception as e:  # python-tuf raises DeserializationError for any malformation
        raise SignatureError(f"deployment order: malformed ({e})", check="metadata") from e
    try:
        payload = md.signed_bytes
    except Exception as e:  # e.g. floats, which canonical JSON cannot encode
        raise SignatureError(
            f"deployment order: cannot be canonicalised ({e})", check="metadata"
        ) from e
    keyids, threshold = role_keys(root, DIRECTOR)
    valid = 0
    for keyid in keyids:
        signature = md.signatures.get(keyid)
        if signature is None:
            continue
        try:
            root.keys[keyid].verify_signature(signature, payload)
            valid += 1
        except UnverifiedSignatureError:
            continue
    if valid < threshold:
        raise SignatureError(
            f"deployment order: signed by {valid}/{threshold} director keys", check="threshold"
        )
    order = md.signed
    addressed = order.unrecognized_fields.get("device_id")
    if addressed != device_id:
        raise TargetingError(
            f"deployment order is for device {addressed!r}, this is {device_id!r}",
            check="device-id",
        )
    if order.version <= last_sequence:
        raise RollbackError(
            f"deployment order sequence {order.version} is not newer than the last accepted "
            f"{last_sequence} (replay)",
            check="replay",
        )
    if order.is_expired(now):
        raise ExpiredError(f"deployment order expired at {_iso(order.expires)}")
    if len(order.targets) != 1:
        raise SignatureError(
            f"deployment order must name one target, names {len(order.targets)}", check="metadata"
        )
    (target,) = order.targets.values()
    deployment = Deployment(
        device_id=device_id,
        sequence=order.version,
        expires=order.expires,
        target=target.path,
        length=target.length,
        sha256=target.hashes.get("sha256", ""),
    )
    if release is not None:
        check_deployment_target(deployment, release)
    return deployment


def check_deployment_target(deployment: Deployment, release: ReleaseInfo) -> None:
    """Uptane full verification: the order must name exactly the target the release key signed.

    Raises:
        SignatureError: the path, length or hash differ (check ``director-mismatch``).
    """
    if (
        deployment.target != release.path
        or deployment.length != release.manifest_length
        or deployment.sha256 != release.manifest_sha256
    ):
        raise SignatureError(
            f"deployment order names {deployment.target} ({deployment.sha256[:12]}...), which is "
            f"not the release the release key signed ({release.path}, "
            f"{release.manifest_sha256[:12]}...)",
            check="director-mismatch",
        )
