"""``TtlCache``: values remembered for a few seconds, for the API's hottest reads.

The API remembers the tokens it found in the database (so that a request costs no token query)
and the device-list pages it answered (so that the clients asking for the same page within a
second share one query). Each is a ``TtlCache``:

- ``get`` returns a value put less than ``ttl_s`` seconds ago, else None; a ``ttl_s`` of 0
  remembers nothing.
- ``forget`` (one key) and ``clear`` (all) take effect at once. A value read from the database
  before one of them may be out of date, so ``put`` stores it only if no ``forget`` or
  ``clear`` happened since the reader took ``generation``::

      generation = cache.generation
      value = read_from_the_database()
      cache.put(key, value, generation=generation)  # skipped if a forget/clear came between

- At most ``max_entries`` values are kept; the oldest go first.

Thread-safe. The clock is injectable for tests; it defaults to ``time.monotonic``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["TtlCache"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class TtlCache(Generic[K, V]):
    """Values by key for ``ttl_s`` seconds; see the module docstring."""

    def __init__(
        self,
        ttl_s: float,
        *,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._clock = clock
        self._values: dict[K, tuple[float, V]] = {}  # key -> (expiry, value), oldest first
        self._generation = 0  # forget() and clear() calls so far
        self._lock = threading.Lock()

    @property
    def generation(self) -> int:
        """Read it before reading a value from its source, and hand it to ``put``."""
        return self._generation

    def get(self, key: K) -> V | None:
        found = self._values.get(key)
        if found is None or found[0] < self._clock():
            return None
        return found[1]

    def put(self, key: K, value: V, *, generation: int) -> None:
        """Remember ``value``, unless ``forget`` or ``clear`` ran since ``generation`` was read."""
        if self.ttl_s <= 0:
            return
        with self._lock:
            if generation != self._generation:
                return
            now = self._clock()
            for old in [k for k, (expires, _) in self._values.items() if expires < now]:
                del self._values[old]
            self._values.pop(key, None)
            while len(self._values) >= self.max_entries:
                del self._values[next(iter(self._values))]
            self._values[key] = (now + self.ttl_s, value)

    def forget(self, key: K) -> None:
        with self._lock:
            self._generation += 1
            self._values.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._generation += 1
            self._values.clear()
