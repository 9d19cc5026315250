"""Request/response over MQTT: ask the fleet for metadata, manifests and chunks.

:class:`FetchClient` publishes :class:`~shared.protocol.FetchRequest` on ``up/fetch`` and
collects the ``down/fetch`` frames that answer it: their payloads arrive on its ``frames`` queue
(put there by the MQTT link's route, or by the pipe of an isolated deployment) and are decoded
by the thread that waits for them.
python-tuf's client fetches its metadata through it (:class:`agent.updater.MqttTufFetcher`),
so all trust decisions stay in python-tuf while the bytes travel over MQTT. This module does not
import python-tuf: the idle daemon keeps a :class:`FetchClient` without the trust stack.
"""

from __future__ import annotations

import contextlib
import itertools
import queue
import threading
import time
from typing import Protocol

from shared.protocol import (
    UP_FETCH,
    FetchRequest,
    FetchResponse,
    ProtocolError,
    decode_frame,
    device_topic,
)

__all__ = ["TUF_BASE_URL", "FetchClient", "Link"]

TUF_BASE_URL = "edgefleet:/metadata/"
Frame = tuple[FetchResponse, bytes]


class Link(Protocol):
    """What the client needs of a connection: a :class:`shared.mqtt.MqttLink`, or the pipe to
    the agent that a deployment process talks through (:mod:`agent.isolation`)."""

    connected: threading.Event

    def publish(self, topic: str, payload: bytes) -> bool: ...

    def wait_connected(self, timeout_s: float) -> bool: ...


class FetchClient:
    """Send fetch requests and receive their frames. One outstanding document at a time."""

    def __init__(self, link: Link, device_id: str, *, timeout_s: float = 10.0) -> None:
        self.link = link
        self.device_id = device_id
        self.timeout_s = timeout_s
        self.frames: queue.Queue[bytes] = queue.Queue()  # down/fetch payloads, not yet decoded
        self._ids = itertools.count(1)
        self._prefix = f"{int(time.time())}"

    def new_request_id(self) -> str:
        return f"{self._prefix}-{next(self._ids)}"

    def deliver(self, payload: bytes) -> None:
        """Take one ``down/fetch`` payload; it is decoded by :meth:`next_frame`."""
        self.frames.put(payload)

    def next_frame(self, timeout_s: float) -> Frame:
        """The next well-formed frame; malformed ones are dropped.

        Raises:
            queue.Empty: none within ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            payload = self.frames.get(timeout=max(deadline - time.monotonic(), 0.0))
            with contextlib.suppress(ProtocolError):
                return decode_frame(payload)
            if time.monotonic() >= deadline:  # a stream of malformed frames must not hold us
                raise queue.Empty

    def send(self, request: FetchRequest) -> bool:
        topic = device_topic(self.device_id, UP_FETCH)
        return self.link.publish(topic, request.model_dump_json(exclude_none=True).encode())

    def document(self, request: FetchRequest, *, max_bytes: int) -> bytes | None:
        """Fetch a whole small document (metadata or manifest); None if the fleet says 404.

        Parts are placed by offset; duplicates and frames of other requests are ignored. The
        size is capped at ``max_bytes`` before any part is stored.

        Raises:
            TimeoutError: no complete answer within the timeout (after one re-send).
            ProtocolError: the answer is larger than ``max_bytes`` or inconsistent.
        """
        for _attempt in range(2):
            if not self.send(request):
                self.link.wait_connected(self.timeout_s)
                continue
            buffer: bytearray | None = None
            covered: set[int] = set()
            received = 0
            deadline = time.monotonic() + self.timeout_s
            while (left := deadline - time.monotonic()) > 0:
                try:
                    header, data = self.next_frame(left)
                except queue.Empty:
                    break
                if header.request_id != request.request_id:
                    continue
                if header.status == 404:
                    return None
                total = header.total or 0
                if total > max_bytes:
                    raise ProtocolError(
                        f"{request.kind} {request.name or request.target}: "
                        f"{total} bytes exceeds the limit of {max_bytes}"
                    )
                if buffer is None:
                    buffer = bytearray(total)
                if len(buffer) != total or header.offset + len(data) > total:
                    raise ProtocolError(f"inconsistent parts for request {request.request_id}")
                if header.offset not in covered:
                    covered.add(header.offset)
                    buffer[header.offset : header.offset + len(data)] = data
                    received += len(data)
                if received >= total:
                    return bytes(buffer)
        raise TimeoutError(
            f"no answer to {request.kind} request {request.request_id} "
            f"({request.name or request.target}) within {self.timeout_s:g} s"
        )
