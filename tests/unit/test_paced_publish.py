"""MqttLink.publish_paced against a stand-in for paho whose acknowledgements the test gives."""

from __future__ import annotations

import threading

import paho.mqtt.client as paho

from shared.mqtt import MqttLink, MqttSettings


class Info:
    """What paho's publish returns: acknowledged when the test says so."""

    def __init__(self) -> None:
        self.rc = paho.MQTT_ERR_SUCCESS
        self.acked = threading.Event()

    def is_published(self) -> bool:
        return self.acked.is_set()

    def wait_for_publish(self, timeout: float) -> None:
        self.acked.wait(timeout)


class Paho:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, Info]] = []

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> Info:
        info = Info()
        self.sent.append((payload, info))
        return info


def link() -> tuple[MqttLink, Paho]:
    mqtt = MqttLink(MqttSettings(url="mqtt://127.0.0.1:1", client_id="fleet-svc"))
    fake = Paho()
    mqtt._client = fake  # type: ignore[assignment]
    mqtt.connected.set()
    return mqtt, fake


def test_a_publish_waits_until_the_window_has_room():
    mqtt, fake = link()
    assert mqtt.publish_paced("t", b"a" * 60, window_bytes=100)
    done = threading.Event()
    second = threading.Thread(
        target=lambda: done.set() if mqtt.publish_paced("t", b"b" * 60, window_bytes=100) else None
    )
    second.start()
    assert not done.wait(0.3)  # 120 bytes would wait: the second is held back...
    assert [payload[:1] for payload, _ in fake.sent] == [b"a"]
    fake.sent[0][1].acked.set()  # ...until the broker acknowledges the first
    second.join(5)
    assert done.is_set()
    assert [payload[:1] for payload, _ in fake.sent] == [b"a", b"b"]


def test_a_window_that_stays_shut_times_out_and_a_lost_link_empties_it():
    mqtt, fake = link()
    assert mqtt.publish_paced("t", b"a" * 80, window_bytes=100)
    assert not mqtt.publish_paced("t", b"b" * 80, window_bytes=100, timeout_s=0.2)
    assert len(fake.sent) == 1  # not sent
    mqtt.connected.clear()  # the link went down: what waited no longer holds the window
    assert not mqtt.publish_paced("t", b"c" * 80, window_bytes=100)
    mqtt.connected.set()
    assert mqtt.publish_paced("t", b"d" * 80, window_bytes=100, timeout_s=0.2)
    assert [payload[:1] for payload, _ in fake.sent] == [b"a", b"d"]


def test_a_payload_larger_than_the_window_goes_out_alone():
    mqtt, fake = link()
    assert mqtt.publish_paced("t", b"x" * 500, window_bytes=100)  # nothing else waits
    fake.sent[0][1].acked.set()
    assert mqtt.publish_paced("t", b"y" * 500, window_bytes=100, timeout_s=0.2)
    assert len(fake.sent) == 2
