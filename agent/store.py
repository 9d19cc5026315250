"""The device's model store: versioned immutable directories, a journal and an atomic switch.

Layout under the agent's data directory::

    models/<name>/versions/<version>/   one complete, verified install (payload + manifest.json)
    models/<name>/current -> versions/<version>     the active model (a symlink)
    models/<name>/previous -> versions/<version>    kept for an instant local rollback
    models/<name>/journal.json          present only while a switch is in progress
    staging/<name>/<version>/           a download in progress (never loaded from)
    state.json                          per-model rollback floor, failed versions, order sequence

Invariants, whatever instant the process dies (each write is temp file + fsync + rename + fsync
of the directory, and every step that changes two things is journalled first):

- I1 ``current`` resolves to a complete, verified version directory (old or new), or is absent
  before the first install;
- I2 after :meth:`ModelStore.recover`, no ``.tmp-*`` files remain;
- I3 an interrupted switch is finished (if the new version is complete) or undone;
- I4 a version directory is immutable once installed (installs go to a new directory);
- I5 the rollback floor in ``state.json`` never decreases.

Fault injection for tests: with ``EDGEFLEET_FAULT=<point>`` in the environment the process kills
itself with SIGKILL when it reaches that point (see :data:`FAULT_POINTS`), which is how the tests
show the invariants hold at every step.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.installed import InstalledManifest, parse_installed_manifest
from shared.bundle_format import MANIFEST_NAME
from shared.errors import EdgefleetError, RollbackError

if TYPE_CHECKING:
    from shared.manifest import Manifest

__all__ = ["FAULT_POINTS", "ModelStore", "StoreError", "StoreState"]

logger = logging.getLogger(__name__)

FAULT_POINTS = (
    "after_download",
    "after_verify",
    "mid_unpack",
    "before_fsync",
    "after_symlink_tmp",
    "after_replace",
    "before_commit",
    "after_commit",
)
FAULT_ENV = "EDGEFLEET_FAULT"
DEPLOYMENT_PROCESS_ENV = "EDGEFLEET_DEPLOYMENT_PROCESS"  # set in a deployment child process


class StoreError(EdgefleetError):
    """The model store cannot do what was asked (missing version, broken install)."""

    default_check = "store"


# Simulators set this to cut the power of one virtual device (by raising in its thread).
power_cut_hook: Callable[[str], None] | None = None


def kill_point(point: str) -> None:
    """Die here, as a power cut would, when the tests asked for it with ``EDGEFLEET_FAULT``."""
    if os.environ.get(FAULT_ENV) == point:
        if os.environ.get(DEPLOYMENT_PROCESS_ENV):  # a power cut stops the agent too
            os.kill(os.getppid(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)
    if power_cut_hook is not None:
        power_cut_hook(point)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, *, fault: str | None = None) -> None:
    """Replace ``path`` with ``data``: temp file, fsync, rename, fsync the directory.

    ``fault`` names the kill point between the write and the fsync (tests only).
    """
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        if fault is not None:
            kill_point(fault)
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


@dataclass
class StoreState:
    """What must survive restarts besides the files: floors, failures, director sequence."""

    floors: dict[str, int] = field(default_factory=dict)  # model -> rollback floor
    failed: dict[str, list[str]] = field(default_factory=dict)  # model -> versions that failed
    counters: dict[str, dict[str, int]] = field(default_factory=dict)  # model -> version -> ctr
    order_sequence: int = 0  # last accepted director order

    @classmethod
    def load(cls, path: Path) -> StoreState:
        if not path.exists():
            return cls()
        data = json.loads(path.read_text())
        return cls(
            floors=dict(data.get("floors", {})),
            failed=dict(data.get("failed", {})),
            counters=dict(data.get("counters", {})),
            order_sequence=int(data.get("order_sequence", 0)),
        )

    def to_bytes(self) -> bytes:
        return json.dumps(self.__dict__, indent=1, sort_keys=True).encode()


class ModelStore:
    """The on-disk model store of one device. Not thread-safe: one updater drives it."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.models_dir = data_dir / "models"
        self.staging_dir = data_dir / "staging"
        self.state_path = data_dir / "state.json"
        for directory in (self.models_dir, self.staging_dir):
            directory.mkdir(parents=True, exist_ok=True)
        self.state = StoreState.load(self.state_path)

    def reload_state(self) -> None:
        """Read ``state.json`` again, after a deployment process changed it."""
        self.state = StoreState.load(self.state_path)

    # -- queries -------------------------------------------------------------------------------

    def model_dir(self, name: str) -> Path:
        return self.models_dir / name

    def version_dir(self, name: str, version: str) -> Path:
        return self.model_dir(name) / "versions" / version

    def _link(self, name: str, which: str) -> str | None:
        link = self.model_dir(name) / which
        if not link.is_symlink():
            return None
        return Path(os.readlink(link)).name

    def current(self, name: str) -> str | None:
        """The active version of ``name``, or None before its first install."""
        return self._link(name, "current")

    def previous(self, name: str) -> str | None:
        return self._link(name, "previous")

    def models(self) -> list[str]:
        return sorted(p.name for p in self.models_dir.iterdir() if p.is_dir())

    def manifest(self, name: str, version: str) -> Manifest:
        """The installed manifest in full (:mod:`shared.manifest`, which imports pydantic)."""
        from shared.manifest import parse_manifest

        return parse_manifest((self.version_dir(name, version) / MANIFEST_NAME).read_bytes())

    def installed(self, name: str, version: str) -> InstalledManifest:
        """What the daemon needs of the installed manifest, read without pydantic.

        Raises:
            OSError: the version is not installed.
            ManifestError: the file is damaged, or names another release.
        """
        path = self.version_dir(name, version) / MANIFEST_NAME
        return parse_installed_manifest(
            path.read_bytes(), what=f"{name} {version} {MANIFEST_NAME}", name=name, version=version
        )

    def is_complete(self, name: str, version: str) -> bool:
        """A version directory exists only complete (see :meth:`install`); check its manifest."""
        return (self.version_dir(name, version) / MANIFEST_NAME).is_file()

    def check_integrity(self, name: str, version: str) -> str | None:
        """Re-hash an installed version against its manifest; the first problem, or None."""
        root = self.version_dir(name, version)
        try:
            manifest = self.installed(name, version)
        except (OSError, EdgefleetError) as e:
            return f"manifest unreadable: {e}"
        for entry in manifest.files:
            digest = hashlib.sha256()
            try:
                with (root / entry.path).open("rb") as f:
                    while chunk := f.read(1 << 20):
                        digest.update(chunk)
            except OSError as e:
                return f"{entry.path}: {e.strerror}"
            if digest.hexdigest() != entry.sha256:
                return (
                    f"{entry.path}: sha256 mismatch (expected {entry.sha256[:12]}..., got "
                    f"{digest.hexdigest()[:12]}...)"
                )
        return None

    # -- state ---------------------------------------------------------------------------------

    def save_state(self) -> None:
        write_atomic(self.state_path, self.state.to_bytes())

    def floor(self, name: str) -> int:
        return self.state.floors.get(name, 0)

    def check_counter(self, name: str, counter: int) -> None:
        """Refuse a release whose counter is below this model's rollback floor."""
        if counter < self.floor(name):
            raise RollbackError(
                f"{name}: release counter {counter} is below the rollback floor {self.floor(name)}",
                check="counter",
            )

    # -- install -------------------------------------------------------------------------------

    def staging(self, name: str, version: str) -> Path:
        """Where a download of ``name`` ``version`` is assembled (persistent across restarts)."""
        path = self.staging_dir / name / version
        path.mkdir(parents=True, exist_ok=True)
        return path

    def install(
        self, name: str, version: str, staged: Path, manifest_bytes: bytes, *, counter: int
    ) -> Path:
        """Move a fully verified staging directory into ``versions/<version>``, durably.

        ``manifest.json`` is written into the staging directory and everything is fsynced
        first; then one rename publishes the directory, so a version directory either does not
        exist or is complete. Installing a version that is already complete is a no-op.
        """
        target = self.version_dir(name, version)
        if self.is_complete(name, version):
            shutil.rmtree(staged, ignore_errors=True)
            return target
        write_atomic(staged / MANIFEST_NAME, manifest_bytes, fault="before_fsync")
        for directory, _, files in os.walk(staged):
            for file in files:
                fd = os.open(Path(directory, file), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            fsync_dir(Path(directory))
        kill_point("mid_unpack")
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():  # left by something else than this method: never trust it
            shutil.rmtree(target)
        os.replace(staged, target)
        fsync_dir(target.parent)
        self.state.counters.setdefault(name, {})[version] = counter
        self.save_state()
        return target

    def _point(self, name: str, which: str, version: str | None) -> None:
        """Make ``<which>`` point at ``versions/<version>`` atomically (or remove it)."""
        link = self.model_dir(name) / which
        if version is None:
            with contextlib.suppress(FileNotFoundError):
                link.unlink()
            fsync_dir(link.parent)
            return
        tmp = link.with_name(f".tmp-{which}-{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        tmp.symlink_to(Path("versions") / version)
        kill_point("after_symlink_tmp")
        os.replace(tmp, link)
        kill_point("after_replace")
        fsync_dir(link.parent)

    def activate(self, name: str, version: str) -> None:
        """Switch ``current`` to ``version``; the old current becomes ``previous``. Journalled."""
        if not self.is_complete(name, version):
            raise StoreError(f"{name} {version} is not a complete install")
        old = self.current(name)
        if old == version:
            return
        journal = self.model_dir(name) / "journal.json"
        write_atomic(journal, json.dumps({"op": "activate", "from": old, "to": version}).encode())
        if old is not None:
            self._point(name, "previous", old)
        self._point(name, "current", version)
        journal.unlink()
        fsync_dir(journal.parent)

    def commit(self, name: str, version: str, *, rollback_floor: int) -> None:
        """The version passed probation: raise the floor (never lower it) and tidy old versions."""
        kill_point("before_commit")
        self.state.floors[name] = max(self.floor(name), rollback_floor)
        self.save_state()
        kill_point("after_commit")
        self.collect_garbage(name)

    def rollback(self, name: str, *, reason: str) -> str | None:
        """Return to ``previous`` after a bad activation; record the bad version. Journalled."""
        bad, back = self.current(name), self.previous(name)
        if bad is not None:
            self.state.failed.setdefault(name, [])
            if bad not in self.state.failed[name]:
                self.state.failed[name].append(bad)
            self.save_state()
        logger.warning("rolling %s back from %s to %s: %s", name, bad, back, reason)
        journal = self.model_dir(name) / "journal.json"
        write_atomic(journal, json.dumps({"op": "rollback", "from": bad, "to": back}).encode())
        self._point(name, "current", back)
        self._point(name, "previous", None)
        journal.unlink()
        fsync_dir(journal.parent)
        return back

    def mark_failed(self, name: str, version: str) -> None:
        """Remember that ``version`` failed here and delete its install (never retried: a
        release is immutable, so only a new version can be offered again)."""
        failed = self.state.failed.setdefault(name, [])
        if version not in failed:
            failed.append(version)
        self.save_state()
        if version not in (self.current(name), self.previous(name)):
            shutil.rmtree(self.version_dir(name, version), ignore_errors=True)

    def collect_garbage(self, name: str) -> None:
        """Delete versions that are neither current nor previous."""
        keep = {self.current(name), self.previous(name)}
        versions = self.model_dir(name) / "versions"
        if versions.is_dir():
            for path in versions.iterdir():
                if path.name not in keep:
                    shutil.rmtree(path, ignore_errors=True)

    # -- recovery ------------------------------------------------------------------------------

    def recover(self) -> list[str]:
        """Bring the store back to its invariants after a crash; return what was repaired."""
        notes: list[str] = []
        for tmp in self.data_dir.rglob(".tmp-*"):
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                tmp.unlink()
                notes.append(f"removed {tmp.relative_to(self.data_dir)}")
        for name in self.models():
            notes += self._recover_model(name)
        return notes

    def _recover_model(self, name: str) -> list[str]:
        notes = []
        journal = self.model_dir(name) / "journal.json"
        if journal.exists():
            try:
                entry: dict[str, Any] = json.loads(journal.read_text())
            except ValueError:
                entry = {}
            target, origin = entry.get("to"), entry.get("from")
            if entry.get("op") == "activate" and target and self.is_complete(name, target):
                if origin is not None:
                    self._point(name, "previous", origin)
                self._point(name, "current", target)
                notes.append(f"{name}: finished switching to {target}")
            elif entry.get("op") == "rollback":
                self._point(name, "current", target)
                self._point(name, "previous", None)
                notes.append(f"{name}: finished rolling back to {target}")
            else:
                self._point(name, "current", origin)
                notes.append(f"{name}: undid an interrupted switch, back on {origin}")
            journal.unlink()
        current = self.current(name)
        if current is not None and not self.is_complete(name, current):
            back = self.previous(name)
            self._point(name, "current", back)
            notes.append(f"{name}: current {current} was incomplete, back on {back}")
        return notes
