"""Store-and-forward for everything the agent reports: nothing is lost while offline.

Each state report and event is appended to a journal file on disk before it is sent, and removed
only once the broker has acknowledged it (QoS 1 PUBACK). The journal is bounded:
when it holds ``max_records``, the oldest record is dropped and counted, and the count travels
with the next telemetry so the fleet knows what it missed. Restarts lose nothing: the journal is
replayed on start.

Telemetry may take a shorter way (:meth:`Outbox.offer`): when nothing older waits in the journal,
it is sent first and journalled only if the broker does not acknowledge it. A telemetry record
describes the seconds before it; the only ones this can lose (uncounted in ``dropped``) are
those whose acknowledgement was still on its way at a power cut, the same loss as a cut a
moment before they were measured. It spares a device (and its flash) a synced file write every
telemetry interval.

Records are files named by a zero-padded sequence number in ``outbox/``; writing one is
temp file + fsync + rename, so a crash leaves whole records or none. The directory is listed
once, when the outbox opens; after that the outbox keeps the names of its records in memory, so
a report costs one file write and no directory listing (a simulated fleet runs thousands of
agents in one process).
"""

from __future__ import annotations

import json
import os
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path

__all__ = ["Outbox"]


class Outbox:
    """A bounded on-disk queue of (topic, payload) records, oldest first. Thread-safe."""

    def __init__(self, directory: Path, *, max_records: int = 10_000) -> None:
        self.directory = directory
        self.max_records = max_records
        directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        for stale in directory.glob(".tmp-*"):
            stale.unlink(missing_ok=True)
        self._names: deque[str] = deque(sorted(p.name for p in directory.glob("*.json")))
        self._seq = int(self._names[-1].split(".")[0]) if self._names else 0
        self._dropped_path = directory / "dropped"
        self.dropped = int(self._dropped_path.read_text()) if self._dropped_path.exists() else 0

    def __len__(self) -> int:
        return len(self._names)

    def put(self, topic: str, payload: bytes) -> None:
        """Append a record durably; drop the oldest if the journal is full."""
        with self._lock:
            excess = len(self._names) - self.max_records + 1
            for _ in range(max(excess, 0)):
                (self.directory / self._names.popleft()).unlink(missing_ok=True)
                self.dropped += 1
            if excess > 0:
                self._dropped_path.write_text(str(self.dropped))
            self._seq += 1
            path = self.directory / f"{self._seq:012d}.json"
            tmp = self.directory / f".tmp-{path.name}"
            data = json.dumps({"topic": topic, "payload": payload.decode()}).encode()
            with tmp.open("wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            self._names.append(path.name)

    def offer(self, topic: str, payload: bytes, send: Callable[[str, bytes], bool]) -> bool:
        """Send a record at once if nothing older waits; else, or if that fails, journal it.

        Returns whether it went out without touching the disk. Order is kept: while older records
        wait, the new one queues behind them (and everything is tried, oldest first).
        """
        with self._lock:
            waiting = bool(self._names)
        if not waiting and send(topic, payload):
            return True
        self.put(topic, payload)
        self.drain(send)
        return False

    def drain(self, send: Callable[[str, bytes], bool], *, limit: int = 1000) -> int:
        """Send records oldest first until ``send`` returns False; return how many were sent."""
        sent = 0
        with self._lock:
            while self._names and sent < limit:
                path = self.directory / self._names[0]
                try:
                    record = json.loads(path.read_bytes())
                    topic, payload = record["topic"], record["payload"].encode()
                except (OSError, ValueError, KeyError, TypeError, AttributeError):
                    # a damaged or lost record is dropped and counted, not retried forever
                    self._names.popleft()
                    path.unlink(missing_ok=True)
                    self.dropped += 1
                    continue
                if not send(topic, payload):
                    break
                self._names.popleft()
                path.unlink(missing_ok=True)
                sent += 1
        return sent
