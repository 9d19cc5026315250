"""The demo's embedded broker (amqtt, :mod:`simulators.embedded_broker`) keeps the rules of the
Mosquitto configuration that the demo's story and its security depend on: client certificates,
identity = CN, per-device topics, QoS 1 queued for an offline persistent session, last will.

Negative checks ("nothing is delivered") wait a bounded 0.5 s and are paired with a positive
control on the same path. One broker serves the whole module; each test uses its own devices.
"""

from __future__ import annotations

import queue
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from fleet.pki import DeviceCA
from shared.protocol import DOWN_CMD, PREFIX, UP_PRESENCE, UP_STATE, device_topic
from simulators.demo import run_embedded_broker
from simulators.embedded_broker import permitted

pytestmark = pytest.mark.integration

NOT_AUTHORIZED = 0x87  # paho reports MQTT 3.1.1's "not authorized" (5) as MQTT 5's 135
SUBSCRIBE_REFUSED = 0x80


@dataclass
class Broker:
    port: int
    ca: DeviceCA
    home: Path
    clients: list[mqtt.Client] = field(default_factory=list)

    def credentials(self, name: str) -> tuple[str, str]:
        cert, key = self.home / f"{name}.pem", self.home / f"{name}-key.pem"
        if not cert.exists():
            issued = self.ca.issue(name)
            cert.write_bytes(issued.cert_pem)
            key.write_bytes(issued.key_pem)
        return str(cert), str(key)

    def connect(
        self,
        name: str | None,
        *,
        client_id: str | None = None,
        will_topic: str | None = None,
    ) -> Client:
        """Connect over MQTT 3.1.1 with ``name``'s certificate (None: without one)."""
        client = Client(
            mqtt.Client(
                CallbackAPIVersion.VERSION2,
                client_id=client_id or name or "anonymous",
                protocol=mqtt.MQTTv311,
                clean_session=False,
            )
        )
        context = ssl.create_default_context(cafile=str(self.ca.cert_path))
        if name is not None:
            context.load_cert_chain(*self.credentials(name))
        client.paho.tls_set_context(context)
        if will_topic is not None:
            client.paho.will_set(will_topic, b"gone", qos=1)
        client.paho.connect("127.0.0.1", self.port, 30)
        client.paho.loop_start()
        self.clients.append(client.paho)
        return client


class Client:
    """A paho client whose CONNACK, SUBACKs and messages land on queues."""

    def __init__(self, paho: mqtt.Client) -> None:
        self.paho = paho
        self.connack: queue.Queue[int] = queue.Queue()
        self.subacks: queue.Queue[int] = queue.Queue()
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.closed = threading.Event()
        paho.on_connect = lambda _c, _u, _f, reason, _p: self.connack.put(reason.value)
        paho.on_subscribe = lambda _c, _u, _m, reasons, _p: self.subacks.put(reasons[0].value)
        paho.on_message = lambda _c, _u, m: self.messages.put((m.topic, bytes(m.payload)))
        paho.on_disconnect = lambda *_: self.closed.set()

    def accepted(self) -> bool:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not self.closed.is_set():
            try:
                return self.connack.get(timeout=0.05) == 0
            except queue.Empty:
                pass
        return False  # no CONNACK: the handshake failed

    def subscribe(self, topic: str) -> int:
        self.paho.subscribe(topic, 1)
        return self.subacks.get(timeout=5)

    def publish(self, topic: str, payload: bytes) -> None:
        info = self.paho.publish(topic, payload, qos=1)
        info.wait_for_publish(5)
        assert info.is_published()

    def next_message(self, timeout: float = 5.0) -> tuple[str, bytes] | None:
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            return None


@pytest.fixture(scope="module")
def broker(tmp_path_factory) -> Iterator[Broker]:
    work = tmp_path_factory.mktemp("embedded-broker")
    with run_embedded_broker(work) as (port, _cafile):
        b = Broker(port, DeviceCA(work / "fleet" / "pki"), work)
        try:
            yield b
        finally:
            for client in b.clients:
                client.disconnect()
                client.loop_stop()


def test_the_rules_are_those_of_the_mosquitto_acl():
    assert permitted("dev-1", device_topic("dev-1", UP_STATE), "publish")
    assert permitted("dev-1", device_topic("dev-1", "down/#"), "subscribe")
    assert permitted("dev-1", device_topic("dev-1", "infer/request"), "receive")
    assert not permitted("dev-1", device_topic("dev-1", DOWN_CMD), "publish")
    assert not permitted("dev-1", device_topic("dev-2", UP_STATE), "publish")
    assert not permitted("dev-1", f"{PREFIX}/+/down/#", "subscribe")
    assert not permitted("dev-1", "#", "subscribe")
    assert permitted("fleet-svc", f"{PREFIX}/+/up/#", "subscribe")
    assert permitted("fleet-svc", device_topic("dev-1", DOWN_CMD), "publish")
    assert not permitted("fleet-svc", "$SYS/#", "subscribe")


def test_a_client_needs_a_certificate_whose_cn_is_its_client_id(broker):
    assert not broker.connect(None).accepted()  # no certificate: the handshake fails
    refused = broker.connect("emb-a1", client_id="emb-a2")
    assert refused.connack.get(timeout=5) == NOT_AUTHORIZED
    assert broker.connect("emb-a1").accepted()
    assert broker.connect("fleet-svc", client_id="fleet-svc-replica1").accepted()


def test_a_device_reaches_only_its_own_topics(broker):
    fleet = broker.connect("fleet-svc", client_id="fleet-svc-b")
    assert fleet.accepted()
    assert fleet.subscribe(f"{PREFIX}/+/up/#") == 1
    mine = broker.connect("emb-b1")
    other = broker.connect("emb-b2")
    assert mine.accepted()
    assert other.accepted()
    assert mine.subscribe(device_topic("emb-b2", "down/#")) == SUBSCRIBE_REFUSED
    assert other.subscribe(device_topic("emb-b2", "down/#")) == 1

    mine.publish(device_topic("emb-b2", UP_STATE), b"spoofed")  # dropped by the broker
    mine.publish(device_topic("emb-b1", UP_STATE), b"mine")
    assert fleet.next_message() == (device_topic("emb-b1", UP_STATE), b"mine")
    assert fleet.next_message(0.5) is None

    fleet.publish(device_topic("emb-b2", DOWN_CMD), b"for b2")
    assert other.next_message() == (device_topic("emb-b2", DOWN_CMD), b"for b2")
    assert mine.next_message(0.5) is None


def test_qos1_waits_for_a_persistent_session_and_the_will_is_sent(broker):
    fleet = broker.connect("fleet-svc", client_id="fleet-svc-c")
    assert fleet.accepted()
    assert fleet.subscribe(f"{PREFIX}/+/{UP_PRESENCE}") == 1
    device = broker.connect("emb-c1", will_topic=device_topic("emb-c1", UP_PRESENCE))
    assert device.accepted()
    assert device.subscribe(device_topic("emb-c1", "down/#")) == 1
    device.paho.disconnect()  # a clean disconnect: no will
    assert device.closed.wait(5)
    fleet.publish(device_topic("emb-c1", DOWN_CMD), b"while away")

    again = broker.connect("emb-c1", will_topic=device_topic("emb-c1", UP_PRESENCE))
    assert again.accepted()
    assert again.next_message() == (device_topic("emb-c1", DOWN_CMD), b"while away")
    assert fleet.next_message(0.5) is None
    again.paho.loop_stop()
    again.paho.socket().close()  # the connection drops: the broker sends the will
    assert fleet.next_message() == (device_topic("emb-c1", UP_PRESENCE), b"gone")


def test_a_last_will_on_another_devices_topic_is_refused(broker):
    forger = broker.connect("emb-d1", will_topic=device_topic("emb-d2", UP_PRESENCE))
    assert forger.connack.get(timeout=5) == NOT_AUTHORIZED
