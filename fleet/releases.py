"""Publishing releases: a signed bundle is verified against the trust root before it is stored.

The upload streams to a temporary file (capped at ``max_upload_bytes``); the whole bundle is then
verified exactly as a device would verify it (signatures, thresholds, expiry, every file's
SHA-256). Only then is it moved into the bundle store and recorded. A refused upload leaves
nothing behind.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import BinaryIO

from sqlmodel import Session, select

from fleet.crud import append_audit, now_utc
from fleet.models import Release
from shared.bundle import check_payload, open_bundle
from shared.errors import UsageError
from shared.trust import verify_release

__all__ = ["ReleaseConflictError", "publish_release"]


class ReleaseConflictError(UsageError):
    """This name and version is already published with different content."""

    default_check = "conflict"


def _receive(source: BinaryIO, target: Path, max_bytes: int) -> int:
    size = 0
    with target.open("wb") as out:
        while chunk := source.read(1 << 20):
            size += len(chunk)
            if size > max_bytes:
                raise UsageError(f"upload exceeds the limit of {max_bytes} bytes")
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    return size


def publish_release(
    session: Session,
    source: BinaryIO,
    *,
    bundles_dir: Path,
    trust_root: bytes,
    actor: str,
    max_bytes: int,
) -> Release:
    """Verify an uploaded signed bundle and record it. The caller commits.

    Raises:
        EdgefleetError: the bundle fails any check (message names the check); nothing stored.
        ReleaseConflictError: the same version exists with a different manifest.
    """
    bundles_dir.mkdir(parents=True, exist_ok=True)
    tmp = bundles_dir / f".upload-{os.getpid()}-{id(source)}"
    try:
        size = _receive(source, tmp, max_bytes)
        stream, reader, header, first = open_bundle(tmp)
        with stream:
            info = verify_release(header, trust_root)
            check_payload(reader, header.manifest, first)
        manifest = header.manifest
        existing = session.exec(
            select(Release).where(
                Release.name == manifest.name, Release.version == manifest.version
            )
        ).first()
        if existing is not None:
            if existing.manifest_sha256 != info.manifest_sha256:
                raise ReleaseConflictError(
                    f"{manifest.name} {manifest.version} is already published with manifest "
                    f"{existing.manifest_sha256[:12]}...; "
                    f"this one is {info.manifest_sha256[:12]}..."
                )
            target = Path(existing.path)
            shutil.move(tmp, target)  # same release, newer signatures (e.g. re-signed expiry)
            existing.expires = info.expires
            return existing
        target = bundles_dir / f"{manifest.name}-{manifest.version}.bundle"
        os.replace(tmp, target)
        release = Release(
            name=manifest.name,
            version=manifest.version,
            counter=info.counter,
            rollback_floor=info.rollback_floor,
            expires=info.expires,
            manifest_sha256=info.manifest_sha256,
            size=size,
            formats=sorted({f"{a.format}:{a.precision}" for a in manifest.artifacts}),
            hardware_ids=list(info.hardware_ids),
            path=str(target),
            published_at=now_utc(),
            published_by=actor,
        )
        session.add(release)
        append_audit(
            session,
            actor=actor,
            action="release.publish",
            target=f"{manifest.name}/{manifest.version}",
            details={
                "counter": info.counter,
                "size": size,
                "manifest_sha256": info.manifest_sha256,
            },
        )
        return release
    finally:
        tmp.unlink(missing_ok=True)
