"""The deployment pipeline: from a fleet hint to a verified, self-tested, active model.

One deployment runs at a time (single flight), on the agent's worker thread, in these steps;
each emits a :class:`~shared.protocol.DeploymentEvent` and any failure ends it with the current
model still serving:

1. **Trust**: refresh TUF metadata over MQTT (python-tuf, persistent state under ``tuf/``).
2. **Order**: verify the director's signed order for this device (sequence, expiry, device id).
3. **Release**: the order's target must be in the release key's targets with the same hashes;
   fetch the manifest, check its hash, and apply the release terms (expiry, targeting, floor).
4. **Transfer**: plan chunks; copy those already held locally (content addressing); resume
   from the durable record of verified chunks; fetch the rest (:mod:`agent.transfer`).
5. **Verify** every staged file against the manifest, then **install** (:mod:`agent.store`).
6. **Self-test**: choose the runtime by measurement on this device (runtime layer), which runs
   the bundle's test vectors; check the latency budget.
7. **Activate**: load the new model, then swap it in, then release the old one (no gap).
8. **Probation**: the new version must run ``probation_s`` without errors or crash loops before it
   is committed (rollback floor raised); otherwise it is rolled back locally.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import shutil
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

from tuf.api import exceptions as tuf_errors
from tuf.api.metadata import Root
from tuf.ngclient import FetcherInterface, UpdaterConfig
from tuf.ngclient import Updater as TufUpdater

from agent.config import AgentSettings
from agent.fetch import TUF_BASE_URL, FetchClient
from agent.platform import DevicePlatform
from agent.serving import ActiveModel, DeploymentError, Ready, Runtimes
from agent.store import ModelStore, kill_point
from agent.transfer import (
    ChunkSpec,
    Completed,
    ErrorReceived,
    Failed,
    PartReceived,
    Reconnected,
    RequestChunks,
    Start,
    Tick,
    Transfer,
    TransferLimits,
    WriteChunk,
    plan_chunks,
    plan_local_copies,
)
from shared.errors import EdgefleetError, TrustError
from shared.manifest import Manifest, parse_manifest
from shared.protocol import ChunkRef, FetchRequest, ProtocolError
from shared.trust import (
    Deployment,
    DeviceIdentity,
    ReleaseInfo,
    check_deployment_target,
    check_release,
    verify_deployment,
)

__all__ = ["ActiveModel", "Deployer", "DeploymentError", "DeviceTrust", "MqttTufFetcher"]

logger = logging.getLogger(__name__)
FLUSH_BYTES = 8 << 20  # make downloaded chunks durable every 8 MiB...
FLUSH_S = 0.5  # ...or every half second, whichever comes first
Emit = Callable[..., None]  # emit(phase, model, version, **fields)


class MqttTufFetcher(FetcherInterface):
    """python-tuf fetcher over MQTT: ``edgefleet:/metadata/<file>`` -> a metadata request."""

    def __init__(self, client: FetchClient, *, max_bytes: int = 5_000_000) -> None:
        self.client = client
        self.max_bytes = max_bytes

    def _fetch(self, url: str) -> Iterator[bytes]:
        name = url.removeprefix(TUF_BASE_URL)
        request = FetchRequest(request_id=self.client.new_request_id(), kind="metadata", name=name)
        try:
            data = self.client.document(request, max_bytes=self.max_bytes)
        except (TimeoutError, ProtocolError) as e:
            raise tuf_errors.DownloadError(str(e)) from e
        if data is None:
            raise tuf_errors.DownloadHTTPError(f"{name} not found", 404)
        return iter([data])


class DeviceTrust:
    """The device's TUF client state, refreshed over MQTT."""

    def __init__(self, data_dir: Path, trust_root: Path, client: FetchClient) -> None:
        self.dir = data_dir / "tuf"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.trust_root = trust_root
        self.fetcher = MqttTufFetcher(client)
        self._updater: TufUpdater | None = None

    def refresh(self) -> Root:
        """Run the TUF client workflow; return the now-trusted root."""
        bootstrap = None if (self.dir / "root.json").exists() else self.trust_root.read_bytes()
        updater = TufUpdater(
            metadata_dir=str(self.dir),
            metadata_base_url=TUF_BASE_URL,
            fetcher=self.fetcher,
            bootstrap=bootstrap,
            config=UpdaterConfig(max_root_rotations=64, prefix_targets_with_hash=False),
        )
        try:
            updater.refresh()
        except tuf_errors.RepositoryError as e:
            raise DeploymentError("verification", f"signed metadata refused: {e}") from e
        except tuf_errors.DownloadError as e:
            raise DeploymentError("download", f"cannot fetch signed metadata: {e}") from e
        self._updater = updater
        return updater._trusted_set.root

    def release(self, target: str) -> ReleaseInfo:
        assert self._updater is not None
        info = self._updater.get_targetinfo(target)
        if info is None:
            raise DeploymentError(
                "verification", f"{target} is not a signed release (not listed by the release key)"
            )
        return ReleaseInfo.from_target(info)


def _local_index(store: ModelStore, name: str) -> dict[str, tuple[str, int, int]]:
    """sha256 -> (path, offset, size) of every chunk of the installed versions of ``name``."""
    index: dict[str, tuple[str, int, int]] = {}
    for version in filter(None, (store.current(name), store.previous(name))):
        try:
            manifest = store.manifest(name, version)
        except (OSError, EdgefleetError):
            continue
        if manifest.chunk_size is None:
            continue
        root = store.version_dir(name, version)
        for entry in manifest.files:
            for i, digest in enumerate(entry.chunks or []):
                size = min(manifest.chunk_size, entry.size - i * manifest.chunk_size)
                index.setdefault(digest, (str(root / entry.path), i * manifest.chunk_size, size))
    return index


class StagedDownload:
    """Payload files assembled by offset in the staging directory, plus the durable record
    of verified chunks (``.verified``: one ``file\\tindex`` line per chunk, appended)."""

    def __init__(self, root: Path, manifest: Manifest) -> None:
        self.root = root
        self.record = root / ".verified"
        for entry in manifest.files:
            path = root / entry.path
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.exists() or path.stat().st_size != entry.size:
                with path.open("ab") as f:
                    f.truncate(entry.size)
        self._fds: dict[str, int] = {}
        self._unflushed: list[tuple[str, int]] = []
        self._unflushed_bytes = 0
        self._flushed_at = time.monotonic()

    def verified(self) -> set[tuple[str, int]]:
        if not self.record.exists():
            return set()
        keys = set()
        for line in self.record.read_text().splitlines():
            file, _, index = line.partition("\t")
            if index.isdigit():
                keys.add((file, int(index)))
        return keys

    def write(self, chunk: ChunkSpec, data: bytes) -> None:
        """Write a verified chunk at its offset; it becomes durable at the next :meth:`flush`."""
        fd = self._fds.get(chunk.file)
        if fd is None:
            fd = self._fds[chunk.file] = os.open(self.root / chunk.file, os.O_WRONLY)
        os.pwrite(fd, data, chunk.offset)
        self._unflushed.append(chunk.key)
        self._unflushed_bytes += len(data)

    def flush(self, *, force: bool = True) -> None:
        """Make written chunks durable, then record them: the record never names unsynced bytes.

        Without ``force``, only when ``FLUSH_BYTES`` or ``FLUSH_S`` have accumulated (one fsync
        per few MiB instead of two per chunk).
        """
        due = self._unflushed_bytes >= FLUSH_BYTES or time.monotonic() - self._flushed_at >= FLUSH_S
        if not self._unflushed or not (force or due):
            return
        for fd in self._fds.values():
            os.fdatasync(fd)
        with self.record.open("a") as f:
            f.writelines(f"{file}\t{index}\n" for file, index in self._unflushed)
            f.flush()
            os.fsync(f.fileno())
        self._unflushed.clear()
        self._unflushed_bytes = 0
        self._flushed_at = time.monotonic()

    def close(self) -> None:
        self.flush()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


class Deployer:
    """Runs deployments for one device. Call :meth:`deploy` from one thread only."""

    def __init__(
        self,
        settings: AgentSettings,
        store: ModelStore,
        client: FetchClient,
        platform: DevicePlatform,
        emit: Emit,
    ) -> None:
        self.settings = settings
        self.store = store
        self.client = client
        self.platform = platform
        self.inventory = platform.inventory
        self.emit = emit
        self.trust = DeviceTrust(settings.data_dir, settings.trust, client)
        self.identity = DeviceIdentity(
            settings.device_id, settings.hardware_id or self.inventory.hardware_class()
        )
        self.runtimes = Runtimes(settings, store, platform)

    # -- the pipeline --------------------------------------------------------------------------

    def deploy(self, order_text: str) -> Ready:
        """Run steps 1-6 for a director order; return what is ready to activate.

        Raises:
            DeploymentError: with the failure class; nothing active has changed.
        """
        root = self.trust.refresh()
        try:
            order = verify_deployment(
                order_text.encode(),
                root,
                device_id=self.settings.device_id,
                last_sequence=self.store.state.order_sequence,
                now=datetime.now(UTC),
            )
        except TrustError as e:
            raise DeploymentError("verification", str(e)) from e
        release = self.trust.release(order.target)
        try:
            return self._deploy_release(order, release)
        except DeploymentError as e:
            e.model, e.version = release.name, release.version
            raise
        except OSError as e:  # disk full, file size limit, I/O error: abort cleanly
            shutil.rmtree(self.store.staging(release.name, release.version), ignore_errors=True)
            raise DeploymentError(
                "storage",
                f"{release.name} {release.version}: cannot write "
                f"the download ({e.strerror or e}); staging removed",
                model=release.name,
                version=release.version,
            ) from e

    def _deploy_release(self, order: Deployment, release: ReleaseInfo) -> Ready:
        try:
            check_deployment_target(order, release)
            check_release(
                release,
                now=datetime.now(UTC),
                device=self.identity,
                floor=self.store.floor(release.name),
            )
        except TrustError as e:
            raise DeploymentError("verification", str(e)) from e
        if release.version in self.store.state.failed.get(release.name, []):
            raise DeploymentError(
                "self_test",
                f"{release.name} {release.version} already failed "
                "its self-test on this device; release a new version",
            )
        self.store.state.order_sequence = order.sequence
        self.store.save_state()
        self.emit("received", release.name, release.version)
        manifest_bytes = self._fetch_manifest(release)
        manifest = parse_manifest(manifest_bytes)
        if self.store.is_complete(release.name, release.version):
            pass  # already installed (e.g. a revert to the previous version)
        else:
            self._download(manifest, manifest_bytes, release)
        self.emit("self_test", release.name, release.version)
        decision = self.runtimes.self_test(manifest)
        return Ready(manifest, decision, release.rollback_floor)

    def _fetch_manifest(self, release: ReleaseInfo) -> bytes:
        request = FetchRequest(
            request_id=self.client.new_request_id(), kind="manifest", target=release.path
        )
        try:
            data = self.client.document(request, max_bytes=1 << 20)
        except (TimeoutError, EdgefleetError) as e:
            raise DeploymentError("download", f"manifest of {release.path}: {e}") from e
        if data is None:
            raise DeploymentError("download", f"the fleet has no {release.path}")
        digest = hashlib.sha256(data).hexdigest()
        if len(data) != release.manifest_length or digest != release.manifest_sha256:
            raise DeploymentError(
                "verification",
                f"manifest of {release.path} does not match the signed release "
                f"(expected {release.manifest_sha256[:12]}..., got "
                f"{digest[:12]}...)",
            )
        return data

    def _download(self, manifest: Manifest, manifest_bytes: bytes, release: ReleaseInfo) -> None:
        name, version = manifest.name, manifest.version
        self.emit("downloading", name, version)
        staged = StagedDownload(self.store.staging(name, version), manifest)
        try:
            chunks = plan_chunks(manifest)
            have = staged.verified()
            copies, _ = plan_local_copies(
                [c for c in chunks if c.key not in have], _local_index(self.store, name)
            )
            for chunk, (path, offset, size) in copies:
                with open(path, "rb") as f:
                    f.seek(offset)
                    data = f.read(size)
                if hashlib.sha256(data).hexdigest() == chunk.sha256:
                    staged.write(chunk, data)
                    have.add(chunk.key)
            reused = sum(c.size for c in chunks if c.key in have)
            self._transfer(release, chunks, have, staged)
        except ValueError as e:
            raise DeploymentError("download", str(e)) from e
        finally:
            staged.close()
        kill_point("after_download")
        for entry in manifest.files:
            with (staged.root / entry.path).open("rb") as f:  # block by block: bounded memory
                digest = hashlib.file_digest(f, "sha256").hexdigest()
            if digest != entry.sha256:
                raise DeploymentError(
                    "verification",
                    f"{entry.path}: sha256 mismatch after "
                    f"download (expected {entry.sha256[:12]}..., got "
                    f"{digest[:12]}...)",
                )
        kill_point("after_verify")
        (staged.root / ".verified").unlink(missing_ok=True)
        self.store.install(name, version, staged.root, manifest_bytes, counter=release.counter)
        self.emit("downloaded", name, version, metrics={"reused_bytes": float(reused)})

    def _transfer(
        self,
        release: ReleaseInfo,
        chunks: list[ChunkSpec],
        have: set[tuple[str, int]],
        staged: StagedDownload,
    ) -> None:
        s = self.settings
        limits = TransferLimits(
            window_chunks=s.window_chunks,
            request_timeout_s=s.request_timeout_s,
            min_bytes_per_s=s.min_bytes_per_s,
            throughput_window_s=s.throughput_window_s,
            deadline_s=s.download_deadline_s,
        )
        transfer = Transfer(
            chunks, have=have, limits=limits, request_id_prefix=self.client.new_request_id()
        )
        pending = transfer.handle(Start(time.monotonic()))
        was_connected = True
        while True:
            for action in pending:
                if isinstance(action, RequestChunks):
                    self.client.send(
                        FetchRequest(
                            request_id=action.request_id,
                            kind="chunks",
                            target=release.path,
                            chunks=[ChunkRef(file=f, index=i) for f, i in action.chunks],
                        )
                    )
                elif isinstance(action, WriteChunk):
                    staged.write(action.chunk, action.data)
                    staged.flush(force=False)
                elif isinstance(action, Completed):
                    return
                elif isinstance(action, Failed):
                    raise DeploymentError(action.failure_class, action.reason)
            pending = []
            connected = self.client.link.connected.is_set()
            if connected and not was_connected:
                pending += transfer.handle(Reconnected(time.monotonic()))
            was_connected = connected
            try:
                header, data = self.client.next_frame(0.2)
            except queue.Empty:
                pending += transfer.handle(Tick(time.monotonic()))
                continue
            now = time.monotonic()
            if header.kind == "chunk" and header.file is not None and header.index is not None:
                pending += transfer.handle(
                    PartReceived(
                        now, header.file, header.index, header.offset, header.total or 0, data
                    )
                )
            elif header.kind == "error":
                pending += transfer.handle(
                    ErrorReceived(
                        now, header.error or "error", header.status, header.file, header.index
                    )
                )
            pending += transfer.handle(Tick(now))
