"""Live updates for the console: stream tickets, one shared poller per process, and
:class:`Recent`, which lets viewers and the poller share one computation of a page.

A page watches one *topic* (``overview``, ``rollouts``, ``rollout/<id>``, ``device/<id>``,
``devices?<filters>``, ``audit?<filters>``) over server-sent events. :class:`LiveHub` polls
every watched topic every ``interval_s`` (0.25 s) in a single asyncio task, computing each
topic's snapshot once in a worker thread however many browsers watch it, and pushes a snapshot
to the topic's watchers only when it differs from the last one sent. A watcher that falls
behind skips to the newest snapshot. The poller runs only while somebody watches.

So an update reaches the browser within ``interval_s`` plus the snapshot's own query time of a
change in the database, whichever process (API, scheduler, MQTT ingest, another replica) made it.

``EventSource`` cannot send an ``Authorization`` header, so a stream is opened with a **ticket**
(docs/adr/0006-console-live-updates-with-stream-tickets.md): ``POST /api/v1/console/ticket``
with the bearer token returns ``<token id>.<expiry>.<mac>``, valid for :data:`TICKET_TTL_S`,
where the MAC is an HMAC-SHA256 keyed with the token's stored digest. Any replica can check it
without shared state, and a revoked token's tickets stop working at once.

>>> ticket = issue_ticket(token, now=1000.0)                           # doctest: +SKIP
>>> check_ticket(session, ticket, now=1030.0).name                     # doctest: +SKIP
'admin'
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from sqlmodel import Session

from fleet.models import ApiToken

__all__ = ["TICKET_TTL_S", "LiveHub", "Recent", "Snapshot", "check_ticket", "issue_ticket"]

logger = logging.getLogger(__name__)
TICKET_TTL_S = 60
_TICKET_CONTEXT = b"edgefleet console stream ticket\0"

Snapshot = tuple[str, str]  # (SSE event name, JSON text)
T = TypeVar("T")


# -- tickets ---------------------------------------------------------------------------------


def _mac(token: ApiToken, expires: int) -> str:
    message = _TICKET_CONTEXT + f"{token.id}.{expires}".encode()
    return hmac.new(token.secret_sha256.encode(), message, hashlib.sha256).hexdigest()


def issue_ticket(token: ApiToken, *, now: float) -> str:
    """A ticket that opens live streams as ``token`` for :data:`TICKET_TTL_S` seconds."""
    expires = int(now) + TICKET_TTL_S
    return f"{token.id}.{expires}.{_mac(token, expires)}"


def check_ticket(session: Session, ticket: str, *, now: float) -> ApiToken | None:
    """The live token ``ticket`` was issued for, or None (malformed, expired, revoked, forged)."""
    parts = ticket.split(".")
    if len(parts) != 3 or not parts[0].isdigit() or not parts[1].isdigit():
        return None
    token_id, expires = int(parts[0]), int(parts[1])
    if not now <= expires <= now + TICKET_TTL_S:
        return None
    token = session.get(ApiToken, token_id)
    if token is None or token.revoked:
        return None
    return token if hmac.compare_digest(parts[2], _mac(token, expires)) else None


# -- sharing a result ------------------------------------------------------------------------


class Recent(Generic[T]):
    """The latest result of one computation, shared while it is younger than ``max_age_s``.

    Viewers that load a page at the same time, and the live feed, then compute it once. One
    computation runs at a time: a caller that arrives meanwhile waits for it and takes its
    result. The age counts from the start of the computation, so a result never reflects the
    database as of more than ``max_age_s`` ago. Safe from any thread.
    """

    def __init__(self, max_age_s: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_age_s = max_age_s
        self._clock = clock
        self._lock = threading.Lock()
        self._value: T | None = None
        self._started = -math.inf

    def get(self, compute: Callable[[], T]) -> T:
        """The shared result, computed now by ``compute`` if there is none young enough."""
        with self._lock:
            started = self._clock()
            if self._value is None or started - self._started >= self.max_age_s:
                self._value = compute()
                self._started = started
            return self._value


# -- the hub ---------------------------------------------------------------------------------


@dataclass(eq=False)
class _Watcher:
    """One open stream: the newest snapshot not yet sent, and an event that says it is there."""

    ready: asyncio.Event = field(default_factory=asyncio.Event)
    snapshot: Snapshot | None = None
    closed: bool = False

    def push(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        self.ready.set()

    def close(self) -> None:
        self.closed = True
        self.ready.set()

    async def next(self) -> Snapshot | None:
        """The newest snapshot not yet sent, or None once the hub has closed (the server is
        stopping)."""
        await self.ready.wait()
        self.ready.clear()
        if self.closed:
            return None
        assert self.snapshot is not None
        return self.snapshot


class LiveHub:
    """Polls the watched topics and fans their changed snapshots out to the watchers.

    ``compute(topics)`` runs in a worker thread and returns a snapshot per topic; it must not
    raise for one bad topic (return an ``("problem", ...)`` snapshot for it instead).
    """

    def __init__(
        self, compute: Callable[[list[str]], dict[str, Snapshot]], *, interval_s: float = 0.25
    ) -> None:
        self._compute = compute
        self.interval_s = interval_s
        self._watchers: dict[str, set[_Watcher]] = {}
        self._last: dict[str, Snapshot] = {}
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.closed = False

    def close_threadsafe(self) -> None:
        """End every stream now and any later one at once: the server is stopping.

        Safe from any thread and from a signal handler. The ASGI server gives a stream no
        shutdown signal, so without this a stop would wait for the streams to end by
        themselves."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._close)

    def _close(self) -> None:
        self.closed = True
        for watchers in self._watchers.values():
            for watcher in watchers:
                watcher.close()

    @asynccontextmanager
    async def watch(self, topic: str) -> AsyncIterator[_Watcher]:
        """Watch ``topic`` for the duration of the block; the newest known snapshot comes
        first. :meth:`_Watcher.next` gives None once the hub has closed."""
        self._loop = asyncio.get_running_loop()
        watcher = _Watcher()
        self._watchers.setdefault(topic, set()).add(watcher)
        if self.closed:
            watcher.close()
        elif topic in self._last:
            watcher.push(self._last[topic])
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._poll(), name="console-live")
        try:
            yield watcher
        finally:
            watchers = self._watchers.get(topic, set())
            watchers.discard(watcher)
            if not watchers:
                self._watchers.pop(topic, None)
                self._last.pop(topic, None)

    async def _poll(self) -> None:
        loop = asyncio.get_running_loop()
        while self._watchers:
            started = loop.time()
            topics = list(self._watchers)
            try:
                snapshots = await asyncio.to_thread(self._compute, topics)
            except Exception:  # a database hiccup must not end the poller; the next round retries
                logger.exception("console live update failed for %s", topics)
                snapshots = {}
            for topic, snapshot in snapshots.items():
                if topic in self._watchers and snapshot != self._last.get(topic):
                    self._last[topic] = snapshot
                    for watcher in self._watchers[topic]:
                        watcher.push(snapshot)
            await asyncio.sleep(max(0.0, self.interval_s - (loop.time() - started)))
