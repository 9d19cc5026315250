"""The project's only contact with paho-mqtt: a link that turns callbacks into queued events.

Both sides use it: the agent (one link per broker) and the fleet service's bridge.

Nothing here decides anything. :class:`MqttLink` connects (TLS or mutual TLS, username and
password, MQTT 3.1.1 or 5), keeps a persistent session, sets a last will, reconnects with
exponential backoff and full jitter, and puts every happening on one :class:`queue.Queue` as a
:class:`Connected`, :class:`Disconnected` or :class:`Message` event. The updater reads that queue
on its own thread; no edgefleet logic ever runs on paho's network thread. Bulk data can skip that
queue: :meth:`MqttLink.route` puts the payloads of one topic straight on the queue of the thread
that consumes them (one hand-off per message instead of two). paho's own thread
(``loop_start``) does the I/O, which is what makes :meth:`MqttLink.publish` safe from any thread.
Bulk data can also be paced: :meth:`MqttLink.publish_paced` keeps at most a window of bytes
waiting for the broker's acknowledgement, so a backlog stays with the caller, where it can be
put in order, rather than in paho's outgoing queue, where everything published after it (a
control message, a small answer) would wait behind all of it.
Reconnects use paho's loop with the delay set before each attempt: exponential backoff with full
jitter, so a fleet does not reconnect in lockstep after a broker restart.

A broker that says the session was taken over (another client with our id) gets the longest
backoff rather than a reconnect fight.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import random
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from shared.errors import UsageError

__all__ = ["Connected", "Disconnected", "Message", "MqttLink", "MqttSettings", "backoff_delay"]

SESSION_TAKEN_OVER = 0x8E


@dataclass(frozen=True)
class MqttSettings:
    """How to reach the broker. Times in seconds."""

    url: str  # mqtt://host:port or mqtts://host:port
    client_id: str
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None  # client certificate for mutual TLS
    key_file: str | None = None
    protocol: int = 5  # 5 or 311
    keepalive_s: int = 30
    session_expiry_s: int = 7 * 86400
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 60.0
    will_topic: str | None = None
    will_payload: bytes = b""

    @property
    def host_port_tls(self) -> tuple[str, int, bool]:
        parsed = urlparse(self.url)
        if parsed.scheme not in ("mqtt", "mqtts") or not parsed.hostname:
            raise UsageError(
                f"broker URL must look like mqtt://HOST:PORT or mqtts://HOST:PORT, got {self.url!r}"
            )
        tls = parsed.scheme == "mqtts"
        return parsed.hostname, parsed.port or (8883 if tls else 1883), tls


@dataclass(frozen=True)
class Connected:
    session_present: bool


@dataclass(frozen=True)
class Disconnected:
    reason: str
    retry_in_s: float


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    response_topic: str | None = None
    correlation_data: bytes | None = None


Event = Connected | Disconnected | Message


def backoff_delay(attempt: int, *, minimum: float, maximum: float, rng: random.Random) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(max, minimum * 2**attempt)]."""
    ceiling = min(maximum, minimum * (2 ** min(attempt, 30)))
    return max(minimum / 2, rng.uniform(0, ceiling))


class MqttLink:
    """One connection to one broker, driven by its own thread. Thread-safe publish/subscribe."""

    def __init__(
        self,
        settings: MqttSettings,
        *,
        subscriptions: Sequence[tuple[str, int]] = (),
        logger: logging.Logger | None = None,
    ) -> None:
        self.settings = settings
        self.events: queue.Queue[Event] = queue.Queue()
        self.connected = threading.Event()
        self._routes: dict[str, queue.Queue[bytes]] = {}
        self._subscriptions = list(subscriptions)
        self._log = logger or logging.getLogger(__name__)
        self._rng = random.Random()  # noqa: S311 - jitter, not cryptography
        self._attempt = 0
        self._taken_over = False
        # publish_paced's publishes not yet acknowledged, oldest first, and their bytes
        self._paced: deque[tuple[paho.MQTTMessageInfo, int]] = deque()
        self._paced_bytes = 0
        self._paced_lock = threading.Lock()
        self._client = self._make_client()

    # -- set-up --------------------------------------------------------------------------------

    def _make_client(self) -> paho.Client:
        s = self.settings
        protocol = MQTTProtocolVersion.MQTTv5 if s.protocol == 5 else MQTTProtocolVersion.MQTTv311
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=s.client_id,
            protocol=protocol,
            clean_session=None if s.protocol == 5 else False,
        )
        _, _, tls = s.host_port_tls
        if tls:
            client.tls_set(
                ca_certs=s.ca_file,
                certfile=s.cert_file,
                keyfile=s.key_file,
                cert_reqs=ssl.CERT_REQUIRED,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        if s.username is not None:
            client.username_pw_set(s.username, s.password)
        if s.will_topic:
            client.will_set(s.will_topic, s.will_payload, qos=1, retain=False)
        client.max_inflight_messages_set(64)
        client.max_queued_messages_set(0)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_connect_fail = self._on_connect_fail
        return client

    def _connect_properties(self) -> Properties | None:
        if self.settings.protocol != 5:
            return None
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self.settings.session_expiry_s
        return props

    # -- paho callbacks (paho's thread: only translate and enqueue) ----------------------------

    def _on_connect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        if reason.is_failure:
            self._log.warning("broker refused the connection: %s", reason)
            return
        self._attempt = 0
        self._taken_over = False
        sock = client.socket()
        if isinstance(sock, socket.socket):  # small requests and replies go out at once
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for topic, qos in self._subscriptions:
            client.subscribe(topic, qos)
        self.connected.set()
        self.events.put(Connected(session_present=bool(flags.session_present)))

    def _on_disconnect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        self.connected.clear()
        if getattr(reason, "value", None) == SESSION_TAKEN_OVER:
            self._taken_over = True
        self.events.put(Disconnected(reason=str(reason), retry_in_s=0.0))

    def route(self, topic: str, sink: queue.Queue[bytes]) -> None:
        """Put the payloads of messages on ``topic`` (an exact topic name) on ``sink`` rather
        than on :attr:`events`, for data that needs nothing else of the message (fetch frames)."""
        self._routes[topic] = sink

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        sink = self._routes.get(msg.topic)
        if sink is not None:
            sink.put(bytes(msg.payload))
            return
        props = getattr(msg, "properties", None)
        self.events.put(
            Message(
                topic=msg.topic,
                payload=bytes(msg.payload),
                response_topic=getattr(props, "ResponseTopic", None),
                correlation_data=getattr(props, "CorrelationData", None),
            )
        )

    # -- the network thread (paho's own: it makes publish() thread-safe) ---------------------

    def start(self) -> None:
        """Start connecting in the background; events arrive on :attr:`events`."""
        host, port, _ = self.settings.host_port_tls
        self._set_next_delay()
        self._client.connect_async(
            host,
            port,
            self.settings.keepalive_s,
            clean_start=False,
            properties=self._connect_properties(),
        )
        self._client.loop_start()

    def _on_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        self._log.warning("cannot reach the broker at %s", self.settings.url)
        delay = self._set_next_delay()
        self.events.put(Disconnected(reason="connection failed", retry_in_s=delay))

    def _set_next_delay(self) -> float:
        """Tell paho how long to wait before its next attempt: backoff with full jitter."""
        s = self.settings
        if self._taken_over:  # someone else has our id: do not fight over the session
            delay = s.reconnect_max_s
        else:
            delay = backoff_delay(
                self._attempt, minimum=s.reconnect_min_s, maximum=s.reconnect_max_s, rng=self._rng
            )
            self._attempt += 1
        self._client.reconnect_delay_set(
            min_delay=max(1, round(delay)), max_delay=max(1, round(delay))
        )
        return delay

    # -- API for the updater -------------------------------------------------------------------

    def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, properties: Properties | None = None
    ) -> bool:
        """Queue a publish; False if the link is down (the caller keeps the data)."""
        if not self.connected.is_set():
            return False
        info = self._client.publish(topic, payload, qos=qos, retain=False, properties=properties)
        return info.rc == paho.MQTT_ERR_SUCCESS

    def publish_paced(
        self, topic: str, payload: bytes, *, window_bytes: int, timeout_s: float = 10.0
    ) -> bool:
        """Publish at QoS 1 once at most ``window_bytes`` of paced publishes, this one included,
        would wait for the broker's acknowledgement; blocks until then. A payload larger than
        the window goes out once nothing else waits.

        Returns False if the link is down or the window did not open within ``timeout_s``: the
        caller takes the message as not sent (paho may still deliver one it queued as the link
        went down), and the peer that asked for the data asks again. While the link is down the
        unacknowledged publishes stop counting (paho resends them on reconnect, or they are lost
        with the session). For one thread (the lock is held while it waits), never paho's own.
        """
        deadline = time.monotonic() + timeout_s
        with self._paced_lock:
            while self._paced and self._paced_bytes + len(payload) > window_bytes:
                info, size = self._paced[0]
                if not info.is_published():
                    if not self.connected.is_set():
                        self._paced.clear()
                        self._paced_bytes = 0
                        return False
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return False
                    with contextlib.suppress(RuntimeError, ValueError):  # disconnected meanwhile
                        info.wait_for_publish(min(remaining, 0.5))
                    continue
                self._paced.popleft()
                self._paced_bytes -= size
            if not self.connected.is_set():
                return False
            info = self._client.publish(topic, payload, qos=1, retain=False)
            if info.rc != paho.MQTT_ERR_SUCCESS:  # e.g. disconnected this instant
                return False  # (paho may still send what it queued, on reconnect)
            self._paced.append((info, len(payload)))
            self._paced_bytes += len(payload)
            return True

    def publish_confirmed(self, topic: str, payload: bytes, *, timeout_s: float = 5.0) -> bool:
        """Publish at QoS 1 and wait for the broker's acknowledgement; False if none came."""
        if not self.connected.is_set():
            return False
        info = self._client.publish(topic, payload, qos=1, retain=False)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            return False
        try:
            info.wait_for_publish(timeout_s)
        except (RuntimeError, ValueError):  # disconnected while waiting
            return False
        return info.is_published()

    def wait_connected(self, timeout_s: float) -> bool:
        return self.connected.wait(timeout_s)

    def stop(self) -> None:
        """Disconnect cleanly (no last will) and stop paho's thread."""
        self._client.disconnect()
        self._client.loop_stop()
        self.connected.clear()
