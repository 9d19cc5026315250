"""A signer's key directory: the role keys and the current signed repository state.

``edgefleet keys init KEYS_DIR`` creates::

    KEYS_DIR/root.json                      the current root metadata: the public trust root
                                            to install on devices (``--trust``)
    KEYS_DIR/private/<role>-<keyid>.pem     private keys, PKCS#8 PEM, mode 0600, folder 0700
    KEYS_DIR/repository/<N>.root.json       every root version, so a device can walk 1 -> N
    KEYS_DIR/repository/targets.json        the release role's current list of releases
    KEYS_DIR/repository/snapshot.json       } the online roles' current freshness statements
    KEYS_DIR/repository/timestamp.json      }

Roles (TUF names, with what edgefleet uses them for):

- ``root``: offline keys with a threshold; signs which keys hold every other role.
- ``targets``: the *release key*, held by the ML team or CI; signs each release (manifest hash,
  release counter, expiry, targeting).
- ``snapshot`` and ``timestamp``: online keys held by the fleet service; sign freshness.
- ``director``: an online key held by the fleet service; signs per-device deployment
  instructions (Uptane's director). TUF's root has no such role, so its keys and threshold live
  in root's signed ``x-edgefleet-roles`` field.

In production the root and release keys never sit next to the online keys: each party keeps only
its own ``private/`` files. This class simply signs with whatever private keys are present.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.serialization import load_pem_private_key
from securesystemslib.signer import CryptoSigner, Key
from tuf.api.metadata import (
    Metadata,
    MetaFile,
    Role,
    Root,
    Snapshot,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer

from shared.errors import KeyStoreError

__all__ = [
    "DIRECTOR",
    "EXTRA_ROLES_FIELD",
    "KeyStore",
    "role_keys",
]

DIRECTOR = "director"
EXTRA_ROLES_FIELD = "x-edgefleet-roles"
ONLINE_ROLES = ("snapshot", "timestamp", DIRECTOR)
ROOT_LIFETIME = timedelta(days=365)
_SERIALIZER = JSONSerializer(compact=False)


def role_keys(root: Root, role: str) -> tuple[list[str], int]:
    """The key ids and threshold of ``role`` in ``root``, including the director role."""
    if role in root.roles:
        return list(root.roles[role].keyids), root.roles[role].threshold
    extra = root.unrecognized_fields.get(EXTRA_ROLES_FIELD, {}).get(role)
    if not isinstance(extra, dict):
        raise KeyStoreError(f"root has no role {role!r}")
    return list(extra.get("keyids", [])), int(extra.get("threshold", 1))


def _write_private(path: Path, pem: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass
class KeyStore:
    """The key directory at ``path``. Use :meth:`create` for a new one, :meth:`open` otherwise."""

    path: Path

    @property
    def private_dir(self) -> Path:
        return self.path / "private"

    @property
    def repo_dir(self) -> Path:
        return self.path / "repository"

    # -- creation ----------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: Path,
        *,
        root_keys: int = 3,
        root_threshold: int = 2,
        release_keys: int = 1,
        release_threshold: int = 1,
        now: datetime,
    ) -> KeyStore:
        """Generate every role's keys and write root version 1 (signed by all root keys).

        Raises:
            KeyStoreError: ``path`` already holds keys, or a threshold exceeds its key count.
        """
        for role, count, threshold in (
            ("root", root_keys, root_threshold),
            ("targets", release_keys, release_threshold),
        ):
            if not 1 <= threshold <= count:
                raise KeyStoreError(
                    f"{role}: threshold must be between 1 and the key count {count}, got "
                    f"{threshold}",
                    check="threshold",
                )
        store = cls(path)
        if (path / "root.json").exists() or store.private_dir.exists():
            raise KeyStoreError(f"{path}: already holds keys; refusing to overwrite them")
        store.private_dir.mkdir(parents=True, mode=0o700)
        store.repo_dir.mkdir(parents=True, exist_ok=True)

        root = Root(expires=now + ROOT_LIFETIME, consistent_snapshot=False)
        layout = {
            "root": (root_keys, root_threshold),
            "targets": (release_keys, release_threshold),
            "snapshot": (1, 1),
            "timestamp": (1, 1),
        }
        for role, (count, threshold) in layout.items():
            keyids = [store._new_key(role, root) for _ in range(count)]
            root.roles[role] = Role(keyids, threshold)
        director = store._new_key(DIRECTOR, root)
        root.unrecognized_fields[EXTRA_ROLES_FIELD] = {
            DIRECTOR: {"keyids": [director], "threshold": 1}
        }
        md = Metadata(root)
        for signer in store.signers(md.signed, "root"):
            md.sign(signer, append=True)
        store.save_root(md)
        return store

    def _new_key(self, role: str, root: Root) -> str:
        signer = CryptoSigner.generate_ed25519()
        key = signer.public_key
        _write_private(self.private_dir / f"{role}-{key.keyid}.pem", signer.private_bytes)
        root.keys[key.keyid] = key
        return key.keyid

    @classmethod
    def open(cls, path: Path) -> KeyStore:
        """Open an existing key directory.

        Raises:
            KeyStoreError: ``path`` has no root.json.
        """
        store = cls(path)
        if not (path / "root.json").is_file():
            raise KeyStoreError(
                f"{path}: no root.json here (create a key directory with 'edgefleet keys init')"
            )
        return store

    # -- keys --------------------------------------------------------------------------------

    def signers(self, root: Root, role: str) -> list[CryptoSigner]:
        """Signers for every private key of ``role`` present in this directory."""
        keyids, _ = role_keys(root, role)
        found = []
        for keyid in keyids:
            pem_path = self.private_dir / f"{role}-{keyid}.pem"
            if not pem_path.is_file():
                continue
            private = load_pem_private_key(pem_path.read_bytes(), password=None)
            found.append(CryptoSigner(private, root.keys[keyid]))  # type: ignore[arg-type]
        return found

    def sign(self, md: Metadata[Any], root: Root, role: str, *, required: bool = True) -> bool:
        """Replace ``md``'s signatures with those of every ``role`` key present.

        Returns whether the role's threshold was met. With ``required``, raise if not.
        """
        _, threshold = role_keys(root, role)
        signers = self.signers(root, role)
        md.signatures.clear()
        for signer in signers:
            md.sign(signer, append=True)
        if len(signers) < threshold and required:
            raise KeyStoreError(
                f"{role}: needs {threshold} signature(s), only {len(signers)} private key(s) for "
                f"it in {self.private_dir}",
                check="threshold",
            )
        return len(signers) >= threshold

    def new_key(self, role: str, root: Root) -> Key:
        """Generate a key for ``role``, store its private half and add the public key to root."""
        keyid = self._new_key(role, root)
        return root.keys[keyid]

    def retire_key(self, role: str, keyid: str) -> None:
        """Move a private key out of use (kept under private/retired/ for audit)."""
        source = self.private_dir / f"{role}-{keyid}.pem"
        if source.exists():
            retired = self.private_dir / "retired"
            retired.mkdir(mode=0o700, exist_ok=True)
            os.replace(source, retired / source.name)

    def rotate(self, role: str, *, now: datetime) -> Metadata[Root]:
        """Replace ``role``'s keys with new ones and publish the next root version.

        The new root is signed by the current root keys (to the current threshold) and, for a
        root rotation, also by the new ones, so that devices walk from the old root to the new
        one by themselves (TUF 5.3.4). Metadata signed by the rotated role is re-signed.

        Raises:
            KeyStoreError: the root keys needed to sign the new root are not here.
        """
        old_md = self.root()
        old_root = old_md.signed
        new_md = Metadata[Root].from_bytes(old_md.to_bytes())
        new_root = new_md.signed
        new_root.version += 1
        new_root.expires = now + ROOT_LIFETIME
        old_keyids, threshold = role_keys(old_root, role)
        new_keyids = [self._new_key(role, new_root) for _ in old_keyids]
        if role == DIRECTOR:
            new_root.unrecognized_fields[EXTRA_ROLES_FIELD][DIRECTOR]["keyids"] = new_keyids
        else:
            new_root.roles[role] = Role(new_keyids, threshold)
        still_used = {k for r in new_root.roles.values() for k in r.keyids}
        still_used |= set(role_keys(new_root, DIRECTOR)[0])
        for keyid in old_keyids:
            if keyid not in still_used:
                new_root.keys.pop(keyid, None)

        new_md.signatures.clear()
        signers = self.signers(old_root, "root")
        if role == "root":
            signers += self.signers(new_root, "root")
        _, old_threshold = role_keys(old_root, "root")
        if len(self.signers(old_root, "root")) < old_threshold:
            raise KeyStoreError(
                f"root: rotating needs {old_threshold} current root key(s) in {self.private_dir}",
                check="threshold",
            )
        for signer in signers:
            new_md.sign(signer, append=True)
        self.save_root(new_md)
        for keyid in old_keyids:
            self.retire_key(role, keyid)
        self._resign_after_rotation(role, new_root, now=now)
        return new_md

    def _resign_after_rotation(self, role: str, root: Root, *, now: datetime) -> None:
        targets = self.load("targets")
        if targets is None or role not in ("targets", "snapshot", "timestamp"):
            return
        if role == "targets":
            targets.signed.version += 1
            self.sign(targets, root, "targets")
        expires = max(targets.signed.expires, now + timedelta(days=1))
        self.publish_freshness(targets, root, expires=expires, required=False)

    # -- metadata ----------------------------------------------------------------------------

    def root(self) -> Metadata[Root]:
        return Metadata[Root].from_bytes((self.path / "root.json").read_bytes())

    def root_history(self) -> dict[str, bytes]:
        """Every root version as ``{"<N>.root.json": bytes}``."""
        return {p.name: p.read_bytes() for p in sorted(self.repo_dir.glob("*.root.json"))}

    def save_root(self, md: Metadata[Root]) -> None:
        data = md.to_bytes(_SERIALIZER)
        _write_atomic(self.repo_dir / f"{md.signed.version}.root.json", data)
        _write_atomic(self.path / "root.json", data)

    def load(self, role: str) -> Metadata[Any] | None:
        """The current signed metadata of ``role`` (targets, snapshot, timestamp), if any."""
        path = self.repo_dir / f"{role}.json"
        return Metadata.from_bytes(path.read_bytes()) if path.exists() else None

    def save(self, md: Metadata[Any]) -> bytes:
        data = md.to_bytes(_SERIALIZER)
        _write_atomic(self.repo_dir / f"{md.signed.type}.json", data)
        return data

    def publish_freshness(
        self, targets: Metadata[Targets], root: Root, *, expires: datetime, required: bool
    ) -> dict[str, bytes]:
        """Sign snapshot and timestamp for ``targets`` with the online keys present.

        Returns the files written, by TUF file name. Without online keys (a release key holder
        in production), with ``required`` False, returns only targets: the fleet service adds
        snapshot and timestamp when the release is published.
        """
        files = {"targets.json": self.save(targets)}
        old_snapshot = self.load("snapshot")
        snapshot = Metadata(Snapshot(expires=expires))
        if old_snapshot is not None:
            snapshot.signed.version = old_snapshot.signed.version + 1
        snapshot.signed.meta["targets.json"] = MetaFile(version=targets.signed.version)
        if not self.sign(snapshot, root, "snapshot", required=required):
            return files
        files["snapshot.json"] = self.save(snapshot)
        old_timestamp = self.load("timestamp")
        timestamp = Metadata(Timestamp(expires=expires))
        if old_timestamp is not None:
            timestamp.signed.version = old_timestamp.signed.version + 1
        timestamp.signed.snapshot_meta = MetaFile(version=snapshot.signed.version)
        if not self.sign(timestamp, root, "timestamp", required=required):
            return files
        files["timestamp.json"] = self.save(timestamp)
        return files
