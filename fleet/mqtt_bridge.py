"""The fleet service's side of MQTT: ingest device reports, serve fetches, send orders.

Every replica subscribes to the devices' ``up/#`` topics through an MQTT 5 **shared
subscription** (``$share/edgefleet-fleet/...``), so the broker hands each message to one replica
only; with MQTT 3.1.1 (``mqtt_protocol = 311``: no shared subscriptions) every replica receives
everything and the database's unique ``(device_id, seq)`` constraints make the duplicate
ingest a no-op.

Ingest is a pipeline of two threads, so that parsing the next batch overlaps storing this one:

- ``fleet-ingest`` takes messages off the link's queue, parses and checks them, and groups them
  into batches of ``ingest_batch`` messages, or fewer once ``ingest_flush_s`` has passed since
  the batch's first message. Malformed messages are counted, logged and dropped there; they
  never reach the database.
- ``fleet-store`` writes each batch in one transaction, with a few set-based statements (see
  :mod:`fleet.crud`). If the database refuses a batch because of one of its messages (a string
  longer than its column, say), the batch is stored again one message at a time, so that only
  the bad message is dropped, with the database's reason in the log.

Fetches are answered by ``fleet-fetch``: TUF metadata and manifests (small, and each a
device's round trip before it can ask for anything else) before chunks, but never more than a
few in a row while chunks wait (:class:`fleet.distribution.FetchQueue`). Chunk frames are paced
(:meth:`shared.mqtt.MqttLink.publish_paced`): at most :data:`FETCH_WINDOW_BYTES` wait for the
broker's acknowledgement, so the backlog of a busy rollout waits as requests in this process,
not as frames in paho's queue, where a deploy order or a metadata answer published after it
would wait behind every byte.

Delivery: paho acknowledges a QoS 1 message to the broker when it has read it, before it is
stored. Messages read but not yet stored (the link's queue, the batch being filled and up to
three more) are lost if the process dies; :meth:`MqttBridge.stop` disconnects first and then
stores everything read.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from prometheus_client import Counter, Histogram
from pydantic import BaseModel
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlmodel import Session, select

from fleet import crud
from fleet.config import FleetSettings
from fleet.distribution import BundleRepository, FetchQueue, answer_fetch
from fleet.models import Release
from shared.mqtt import Message, MqttLink, MqttSettings
from shared.protocol import (
    DOWN_CMD,
    DOWN_FETCH,
    PREFIX,
    DeploymentEvent,
    FetchRequest,
    Presence,
    ProtocolError,
    ReportedState,
    Telemetry,
    device_topic,
    parse_device_topic,
    parse_payload,
)
from shared.trust import target_path

__all__ = ["MqttBridge"]

logger = logging.getLogger(__name__)
SHARE_GROUP = "edgefleet-fleet"
MAX_SEQ = 2**63 - 1  # the database's BIGINT columns
PENDING_BATCHES = 2  # parsed batches waiting for the store thread; then parsing waits too
GATHER_S = 0.005  # a batch being filled waits this long for more messages when none is queued
FETCH_WINDOW_BYTES = 16 << 20  # answer bytes sent but not yet acknowledged by the broker
FETCH_SEND_TIMEOUT_S = 10.0  # a frame the window does not let out by then is dropped (asked again)
# PostgreSQL aborts one of two transactions that wait on each other's rows (two replicas storing
# reports of the same devices) or that conflict: the aborted batch is rolled back whole and
# stored again, at most this many times.
TRANSIENT_SQLSTATES = ("40P01", "40001")  # deadlock detected, serialization failure
STORE_ATTEMPTS = 5

Report = tuple[str, Any]  # ("up/state" | "up/events" | "up/telemetry" | "presence:<id>", body)

MESSAGES = Counter("edgefleet_mqtt_messages_total", "Device messages received", ["kind"])
_RECEIVED = {kind: MESSAGES.labels(kind) for kind in ("state", "events", "telemetry", "presence")}
REJECTED = Counter("edgefleet_mqtt_rejected_total", "Device messages refused", ["reason"])
BATCH_SECONDS = Histogram("edgefleet_ingest_batch_seconds", "Time to store one ingest batch")
FETCH_BYTES = Counter("edgefleet_fetch_bytes_total", "Bytes sent in answer to fetches")

_KINDS: dict[str, type[BaseModel]] = {
    "up/state": ReportedState,
    "up/events": DeploymentEvent,
    "up/telemetry": Telemetry,
    "up/presence": Presence,
}


class MqttBridge:
    """One replica's MQTT link, ingest pipeline and fetch server."""

    def __init__(self, settings: FleetSettings, engine: Engine, repo: BundleRepository) -> None:
        self.settings = settings
        self.engine = engine
        self.repo = repo
        protocol = settings.mqtt_protocol
        topic = f"{PREFIX}/+/up/#"
        subscription = f"$share/{SHARE_GROUP}/{topic}" if protocol == 5 else topic
        self.link = MqttLink(
            MqttSettings(
                url=settings.broker or "",
                client_id=f"fleet-svc-{id(self):x}",
                username=settings.username,
                password=settings.password,
                ca_file=str(settings.ca_file) if settings.ca_file else None,
                cert_file=str(settings.cert_file) if settings.cert_file else None,
                key_file=str(settings.key_file) if settings.key_file else None,
                protocol=protocol,
            ),
            subscriptions=[(subscription, 1)],
        )
        self._stop = threading.Event()
        self._fetches = FetchQueue()
        self._batches: queue.Queue[list[Report] | None] = queue.Queue(maxsize=PENDING_BATCHES)
        self._threads = [
            threading.Thread(target=self._collect, name="fleet-ingest", daemon=True),
            threading.Thread(target=self._write, name="fleet-store", daemon=True),
            threading.Thread(target=self._serve_fetches, name="fleet-fetch", daemon=True),
        ]

    def start(self) -> None:
        self.link.start()
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Disconnect, then store every report already read (within 30 s) and stop."""
        self.link.stop()
        self._stop.set()
        for thread in self._threads:
            thread.join(30)
            if thread.is_alive():
                logger.warning("%s did not finish within 30 s of stopping", thread.name)

    def send_command(self, device_id: str, payload: bytes) -> bool:
        return self.link.publish(device_topic(device_id, DOWN_CMD), payload)

    # -- ingest --------------------------------------------------------------------------------

    def _collect(self) -> None:
        """Parse messages into batches and hand each one to the store thread."""
        batch: list[Report] = []
        flush_at = 0.0  # when the batch being filled is due, whatever its size
        while True:
            stopping = self._stop.is_set()
            try:
                if stopping:  # the link is down: take what it had read, without waiting
                    event = self.link.events.get_nowait()
                else:
                    wait = max(0.0, flush_at - time.monotonic()) if batch else 0.5
                    event = self.link.events.get(timeout=wait)
            except queue.Empty:
                event = None
            if isinstance(event, Message) and (report := self._parse(event)) is not None:
                if not batch:
                    flush_at = time.monotonic() + self.settings.ingest_flush_s
                batch.append(report)
            due = event is None or time.monotonic() >= flush_at
            if batch and (due or len(batch) >= self.settings.ingest_batch):
                self._batches.put(batch)  # waits while the store thread is PENDING_BATCHES behind
                batch = []
            elif batch and self.link.events.empty() and not stopping:
                # Let messages gather rather than be woken for each one (a thread switch each).
                time.sleep(min(GATHER_S, max(0.0, flush_at - time.monotonic())))
            if stopping and event is None:
                self._batches.put(None)
                return

    def _parse(self, message: Message) -> Report | None:
        try:
            device_id, suffix = parse_device_topic(message.topic)
            if suffix == "up/fetch":
                request = parse_payload(FetchRequest, message.payload, what="fetch request")
                self._fetches.put(device_id, request)
                MESSAGES.labels("fetch").inc()
                return None
            kind = _KINDS.get(suffix)
            if kind is None:
                raise ProtocolError(f"unknown topic suffix {suffix!r}")
            body: Any = parse_payload(kind, message.payload, what=suffix)
            _check_storable(body, what=suffix)
        except ProtocolError as e:
            REJECTED.labels(e.check).inc()
            logger.warning("dropping a device message on %s: %s", message.topic[:120], e)
            return None
        if hasattr(body, "device_id") and body.device_id != device_id:
            REJECTED.labels("spoofed").inc()
            logger.warning(
                "dropping a message on %s claiming to be from %s", message.topic, body.device_id
            )
            return None
        _RECEIVED[suffix.removeprefix("up/")].inc()
        return suffix if suffix != "up/presence" else f"presence:{device_id}", body

    def _write(self) -> None:
        """Store batches in order until the collector says it is done."""
        while (batch := self._batches.get()) is not None:
            self._store(batch)

    def _store(self, batch: list[Report]) -> None:
        started = time.perf_counter()
        try:
            self._store_retrying(batch)
        except OperationalError:  # the database is unreachable: the batch is logged, not retried
            logger.exception("could not store a batch of %d device messages", len(batch))
        except Exception as e:  # one refused message must not cost the others
            logger.warning(
                "the database refused a batch of %d device messages (%s); storing them one by one",
                len(batch),
                _first_line(e),
            )
            for report in batch:
                self._store_alone(report)
        BATCH_SECONDS.observe(time.perf_counter() - started)

    def _store_retrying(self, batch: list[Report]) -> None:
        """Store ``batch``, again if the database aborted it to break a deadlock."""
        for attempt in range(1, STORE_ATTEMPTS + 1):
            try:
                self._store_together(batch)
                return
            except OperationalError as e:
                if attempt == STORE_ATTEMPTS:
                    raise
                if getattr(e.orig, "sqlstate", None) not in TRANSIENT_SQLSTATES:
                    raise
                logger.info("storing a batch again (attempt %d): %s", attempt + 1, _first_line(e))
                time.sleep(random.uniform(0, 0.05 * attempt))  # noqa: S311 - jitter

    def _store_together(self, batch: list[Report]) -> None:
        """Store ``batch`` in one transaction: states (in seq order), events, telemetry, then
        presence, each kind with a few statements for the whole batch."""
        grouped: dict[str, list[Any]] = defaultdict(list)
        for kind, body in batch:
            grouped[kind].append(body)
        with Session(self.engine) as session:
            crud.ingest_states(session, grouped.pop("up/state", []))
            crud.ingest_events(session, grouped.pop("up/events", []))
            crud.ingest_telemetry(session, grouped.pop("up/telemetry", []))
            for kind, bodies in grouped.items():
                device_id = kind.removeprefix("presence:")
                crud.set_presence(session, device_id, online=bodies[-1].online)
            session.commit()

    def _store_alone(self, report: Report) -> None:
        kind, body = report
        try:
            self._store_together([report])
        except Exception as e:  # logged with its reason, and dropped
            REJECTED.labels("database").inc()
            logger.warning(
                "dropping a %s message from %s (seq %s) that the database refused: %s",
                kind.partition(":")[0],
                getattr(body, "device_id", kind.removeprefix("presence:")),
                getattr(body, "seq", "-"),
                _first_line(e),
            )

    # -- fetches -------------------------------------------------------------------------------

    def _serve_fetches(self) -> None:
        while not self._stop.is_set():
            waiting = self._fetches.get(0.5)
            if waiting is None:
                continue
            device_id, request = waiting
            if request.kind == "metadata" or self.repo.manifest(request.target or "") is None:
                self._index_new_releases()
            topic = device_topic(device_id, DOWN_FETCH)
            for frame in answer_fetch(
                request, self.repo, max_message=self.settings.max_message_bytes
            ):
                if not self.link.publish_paced(
                    topic, frame, window_bytes=FETCH_WINDOW_BYTES, timeout_s=FETCH_SEND_TIMEOUT_S
                ):
                    break
                FETCH_BYTES.inc(len(frame))

    def _index_new_releases(self) -> None:
        """Index the releases published through another replica since this one started.

        Replicas share the database and the bundle files, and the broker hands a device's fetch
        to any replica: each must serve every published release, with the newest metadata.
        """
        with Session(self.engine) as session:
            rows = session.exec(select(Release.name, Release.version, Release.path)).all()
        for name, version, path in rows:
            if self.repo.manifest(target_path(name, version)) is None and Path(path).is_file():
                try:
                    self.repo.add(Path(path))
                except Exception:  # one unreadable bundle must not stop serving the others
                    logger.exception("cannot index the bundle %s", path)


def _check_storable(body: Any, *, what: str) -> None:
    """Refuse what the protocol allows but the database cannot store as meant.

    Raises:
        ProtocolError: a sequence number beyond the database's integer range, or a time
            without a UTC offset (it would be read in the database server's time zone).
    """
    seq = getattr(body, "seq", 0)
    if seq > MAX_SEQ:
        raise ProtocolError(f"{what}: seq {seq} exceeds the largest storable, {MAX_SEQ}")
    sent = getattr(body, "time", None)
    if sent is not None and sent.utcoffset() is None:
        raise ProtocolError(f"{what}: time {sent.isoformat()} has no UTC offset")


def _first_line(error: Exception) -> str:
    """The first line of an error's message (SQLAlchemy appends the statement and parameters)."""
    return str(error).strip().partition("\n")[0][:300]
