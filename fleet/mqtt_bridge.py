"""The fleet service's side of MQTT: ingest device reports, serve fetches, send orders.

Every replica subscribes to the devices' ``up/#`` topics through an MQTT 5 **shared
subscription** (``$share/edgefleet-fleet/...``), so the broker hands each message to one replica
only; with MQTT 3.1.1 (no shared subscriptions) every replica receives everything and the
database's unique ``(device_id, seq)`` constraints make the duplicate ingest a no-op.

Reports are written in batches (``ingest_batch`` messages or ``ingest_flush_s`` seconds, whichever
comes first) in one transaction each, so one slow database round trip serves hundreds of
messages. Malformed messages are counted and dropped; they never reach the database.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import defaultdict
from typing import Any

from prometheus_client import Counter, Histogram
from pydantic import BaseModel
from sqlalchemy.engine import Engine
from sqlmodel import Session

from fleet import crud
from fleet.config import FleetSettings
from fleet.distribution import BundleRepository, answer_fetch
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

__all__ = ["MqttBridge"]

logger = logging.getLogger(__name__)
SHARE_GROUP = "edgefleet-fleet"

MESSAGES = Counter("edgefleet_mqtt_messages_total", "Device messages received", ["kind"])
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
    """One replica's MQTT link, ingest worker and fetch server."""

    def __init__(self, settings: FleetSettings, engine: Engine, repo: BundleRepository) -> None:
        self.settings = settings
        self.engine = engine
        self.repo = repo
        protocol = 5
        topic = f"{PREFIX}/+/up/#"
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
            subscriptions=[(f"$share/{SHARE_GROUP}/{topic}", 1)],
        )
        self._stop = threading.Event()
        self._fetches: queue.Queue[tuple[str, FetchRequest]] = queue.Queue()
        self._threads = [
            threading.Thread(target=self._ingest, name="fleet-ingest", daemon=True),
            threading.Thread(target=self._serve_fetches, name="fleet-fetch", daemon=True),
        ]

    def start(self) -> None:
        self.link.start()
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(5)
        self.link.stop()

    def send_command(self, device_id: str, payload: bytes) -> bool:
        return self.link.publish(device_topic(device_id, DOWN_CMD), payload)

    # -- ingest --------------------------------------------------------------------------------

    def _ingest(self) -> None:
        batch: list[tuple[str, Any]] = []
        deadline = time.monotonic() + self.settings.ingest_flush_s
        while not self._stop.is_set() or batch:
            timeout = max(0.0, deadline - time.monotonic())
            try:
                event = self.link.events.get(timeout=timeout)
            except queue.Empty:
                event = None
            if isinstance(event, Message):
                parsed = self._parse(event)
                if parsed is not None:
                    batch.append(parsed)
            if batch and (len(batch) >= self.settings.ingest_batch or time.monotonic() >= deadline):
                self._store(batch)
                batch = []
            if time.monotonic() >= deadline:
                deadline = time.monotonic() + self.settings.ingest_flush_s
            if self._stop.is_set() and not batch:
                break

    def _parse(self, message: Message) -> tuple[str, Any] | None:
        try:
            device_id, suffix = parse_device_topic(message.topic)
            if suffix == "up/fetch":
                self._fetches.put(
                    (device_id, parse_payload(FetchRequest, message.payload, what="fetch request"))
                )
                MESSAGES.labels("fetch").inc()
                return None
            kind = _KINDS.get(suffix)
            if kind is None:
                raise ProtocolError(f"unknown topic suffix {suffix!r}")
            body: Any = parse_payload(kind, message.payload, what=suffix)
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
        MESSAGES.labels(suffix.removeprefix("up/")).inc()
        return suffix if suffix != "up/presence" else f"presence:{device_id}", body

    def _store(self, batch: list[tuple[str, Any]]) -> None:
        grouped: dict[str, list[Any]] = defaultdict(list)
        for kind, body in batch:
            grouped[kind].append(body)
        started = time.perf_counter()
        try:
            with Session(self.engine) as session:
                for state in sorted(grouped.pop("up/state", []), key=lambda s: s.seq):
                    crud.ingest_state(session, state)
                crud.ingest_events(session, grouped.pop("up/events", []))
                crud.ingest_telemetry(session, grouped.pop("up/telemetry", []))
                for kind, bodies in grouped.items():
                    device_id = kind.removeprefix("presence:")
                    crud.set_presence(session, device_id, online=bodies[-1].online)
                session.commit()
        except Exception:  # a database outage must not kill the bridge; the batch is logged
            logger.exception("could not store a batch of %d device messages", len(batch))
        BATCH_SECONDS.observe(time.perf_counter() - started)

    # -- fetches -------------------------------------------------------------------------------

    def _serve_fetches(self) -> None:
        while not self._stop.is_set():
            try:
                device_id, request = self._fetches.get(timeout=0.5)
            except queue.Empty:
                continue
            topic = device_topic(device_id, DOWN_FETCH)
            for frame in answer_fetch(
                request, self.repo, max_message=self.settings.max_message_bytes
            ):
                FETCH_BYTES.inc(len(frame))
                if not self.link.publish(topic, frame):
                    break
