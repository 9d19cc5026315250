"""Store-and-forward for everything the agent reports: nothing is lost while offline.

Each report (state, event, telemetry) is appended to a journal file on disk before it is sent,
and removed only once the broker has acknowledged it (QoS 1 PUBACK). The journal is bounded:
when it holds ``max_records``, the oldest record is dropped and counted, and the count travels
with the next telemetry so the fleet knows what it missed. Restarts lose nothing: the journal is
replayed on start.

Records are files named by a zero-padded sequence number in ``outbox/``; writing one is
temp file + fsync + rename, so a crash leaves whole records or none.
"""

from __future__ import annotations

import json
import os
import threading
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
        names = sorted(p.name for p in directory.glob("*.json"))
        self._seq = int(names[-1].split(".")[0]) if names else 0
        self._dropped_path = directory / "dropped"
        self.dropped = int(self._dropped_path.read_text()) if self._dropped_path.exists() else 0

    def __len__(self) -> int:
        return sum(1 for _ in self.directory.glob("*.json"))

    def put(self, topic: str, payload: bytes) -> None:
        """Append a record durably; drop the oldest if the journal is full."""
        with self._lock:
            records = sorted(self.directory.glob("*.json"))
            excess = len(records) - self.max_records + 1
            for old in records[: max(excess, 0)]:
                old.unlink(missing_ok=True)
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

    def drain(self, send: Callable[[str, bytes], bool], *, limit: int = 1000) -> int:
        """Send records oldest first until ``send`` returns False; return how many were sent."""
        sent = 0
        with self._lock:
            for path in sorted(self.directory.glob("*.json"))[:limit]:
                try:
                    record = json.loads(path.read_bytes())
                except ValueError:  # a damaged record is dropped, not retried forever
                    path.unlink(missing_ok=True)
                    self.dropped += 1
                    continue
                if not send(record["topic"], record["payload"].encode()):
                    break
                path.unlink(missing_ok=True)
                sent += 1
        return sent
