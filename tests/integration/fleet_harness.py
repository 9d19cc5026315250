"""A stand-in for the fleet service over a real broker, for the agent's end-to-end tests.

It does what the fleet service does on the wire, with the project's own pieces: answers
``up/fetch`` from signed bundle files through :mod:`fleet.distribution`, signs director orders
with the director key (:func:`shared.trust.sign_deployment`) and sends them as ``down/cmd``, and
records every state, event and telemetry report. Faults can be injected on the answers: a share
of parts dropped, parts duplicated, and a fixed delay per part.
"""

from __future__ import annotations

import json
import random
import threading
import time
import uuid
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from fleet.distribution import BundleRepository, answer_fetch
from shared.bundle import inspect_bundle
from shared.keystore import KeyStore
from shared.protocol import (
    DOWN_CMD,
    DOWN_FETCH,
    Command,
    FetchRequest,
    decode_frame,
    device_topic,
    parse_device_topic,
    parse_payload,
)
from shared.trust import ReleaseInfo, sign_deployment


class FleetHarness:
    def __init__(self, broker: Any, keys: KeyStore, *, max_message: int = 64 * 1024) -> None:
        self.keys = keys
        self.repo = BundleRepository()
        self.releases: dict[str, ReleaseInfo] = {}
        self.max_message = max_message
        self.drop_ratio = 0.0
        self.duplicate_ratio = 0.0
        self.part_delay_s = 0.0
        self.answering = threading.Event()
        self.answering.set()
        self.rng = random.Random(7)
        self.fetches: list[FetchRequest] = []
        self.chunk_bytes_sent = 0
        self.dropped_parts: list[tuple[str, int]] = []  # (file, chunk index) of each dropped part
        self.duplicated_parts = 0
        self.reports: dict[str, list[tuple[str, dict[str, Any]]]] = defaultdict(list)
        self._lock = threading.Condition()
        self._sequence = 0
        self.client = broker.client("fleet-svc")
        self.client.subscribe_and_wait("edgefleet/v1/devices/+/up/#")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    # -- releases and orders -------------------------------------------------------------------

    def publish(self, bundle: Path) -> ReleaseInfo:
        """Make a signed bundle available to devices; return its signed release terms."""
        from shared.trust import verify_release

        header = inspect_bundle(bundle)
        info = verify_release(header, self.keys.root().to_bytes())
        self.repo.add(bundle)
        self.releases[info.version] = info
        return info

    def deploy(self, device_id: str, version: str, *, expires_in_s: float = 3600) -> bytes:
        """Sign a director order for ``device_id`` to run ``version`` and send it.

        Returns the exact ``down/cmd`` payload published (for replay tests)."""
        payload = self.deploy_command_payload(device_id, version, expires_in_s=expires_in_s)
        self.send_command(device_id, payload)
        return payload

    def deploy_command_payload(
        self, device_id: str, version: str, *, expires_in_s: float = 3600
    ) -> bytes:
        """The ``down/cmd`` payload of a new signed order (next sequence), without sending it."""
        self._sequence += 1
        order = sign_deployment(
            self.keys,
            device_id=device_id,
            release=self.releases[version],
            sequence=self._sequence,
            expires=datetime.now(UTC) + timedelta(seconds=expires_in_s),
        )
        command = Command(
            id=uuid.uuid4().hex, type="deploy", issued_at=datetime.now(UTC), order=order.decode()
        )
        return command.model_dump_json().encode()

    def continue_sequence(self, last: int) -> None:
        """Number the next orders after ``last``: for a device whose data directory accepted
        orders from another harness (e.g. copied from a template)."""
        self._sequence = max(self._sequence, last)

    def send_command(self, device_id: str, command: Command | bytes) -> None:
        payload = command if isinstance(command, bytes) else command.model_dump_json().encode()
        self.client.publish(device_topic(device_id, DOWN_CMD), payload, qos=1)

    def reconnect(self, broker: Any) -> None:
        """Connect a fresh fleet client (e.g. after ``broker.restart()``, which drops this one:
        the probe client never reconnects by itself) and resume serving and recording."""
        old = self.client
        client = broker.client("fleet-svc")
        client.messages = old.messages  # keep what was received and not yet handled
        client.subscribe_and_wait("edgefleet/v1/devices/+/up/#")
        self.client = client

    # -- the serving loop ----------------------------------------------------------------------

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                message = self.client.messages.get(timeout=0.2)
            except Exception:  # queue.Empty
                continue
            try:
                device_id, suffix = parse_device_topic(message.topic)
            except ValueError:
                continue
            if suffix == "up/fetch":
                if self.answering.is_set():
                    self._answer(device_id, message.payload)
                continue
            try:
                body = json.loads(message.payload)
            except ValueError:
                continue
            with self._lock:
                self.reports[device_id].append((suffix, body))
                self._lock.notify_all()

    def _answer(self, device_id: str, payload: bytes) -> None:
        request = parse_payload(FetchRequest, payload, what="fetch request")
        self.fetches.append(request)
        topic = device_topic(device_id, DOWN_FETCH)
        for frame in answer_fetch(request, self.repo, max_message=self.max_message):
            if request.kind == "chunks":
                self.chunk_bytes_sent += len(frame)
                if self.rng.random() < self.drop_ratio:
                    header, _ = decode_frame(frame)
                    self.dropped_parts.append((header.file or "", header.index or 0))
                    continue
            if self.part_delay_s:
                time.sleep(self.part_delay_s)
            self.client.publish(topic, frame, qos=1)
            if request.kind == "chunks" and self.rng.random() < self.duplicate_ratio:
                self.duplicated_parts += 1
                self.client.publish(topic, frame, qos=1)

    # -- observations --------------------------------------------------------------------------

    def events(self, device_id: str, *, since: int = 0) -> list[dict[str, Any]]:
        """Events of ``device_id``, of the reports after the first ``since`` (see
        :meth:`report_count`)."""
        with self._lock:
            return [b for s, b in self.reports[device_id][since:] if s == "up/events"]

    def report_count(self, device_id: str) -> int:
        """How many reports of ``device_id`` were recorded so far (a mark for ``since``)."""
        with self._lock:
            return len(self.reports[device_id])

    def wait_for(
        self,
        device_id: str,
        predicate: Any,
        *,
        timeout: float = 60.0,
        what: str = "report",
        since: int = 0,
    ) -> dict[str, Any]:
        """Wait for a report (state/event) of ``device_id`` matching ``predicate``, looking only
        at reports recorded after the first ``since`` (see :meth:`report_count`)."""
        deadline = time.monotonic() + timeout
        seen = since
        with self._lock:
            while True:
                reports = self.reports[device_id]
                for suffix, body in reports[seen:]:
                    if predicate(suffix, body):
                        return body
                seen = len(reports)
                left = deadline - time.monotonic()
                if left <= 0:
                    phases = [
                        (b.get("phase"), b.get("version"), b.get("detail"))
                        for s, b in reports
                        if s == "up/events"
                    ]
                    raise AssertionError(
                        f"{device_id}: no {what} within {timeout} s; events so far: {phases}"
                    )
                self._lock.wait(left)

    def wait_phase(
        self, device_id: str, phase: str, version: str, *, timeout: float = 60.0, since: int = 0
    ) -> dict[str, Any]:
        return self.wait_for(
            device_id,
            lambda s, b: (
                s == "up/events" and b.get("phase") == phase and b.get("version") == version
            ),
            timeout=timeout,
            what=f"{phase} event for {version}",
            since=since,
        )

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
