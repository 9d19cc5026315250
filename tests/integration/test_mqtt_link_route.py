"""MqttLink against a real broker: routed topics skip the event queue; paced publishes."""

from __future__ import annotations

import queue

import pytest

from shared.mqtt import Connected, Message, MqttLink, MqttSettings
from shared.protocol import DOWN_CMD, DOWN_FETCH, device_topic

pytestmark = pytest.mark.integration

DEVICE = "dev-001"


def test_a_routed_topic_skips_the_event_queue_and_the_rest_still_arrive_there(broker):
    fetch, cmd = device_topic(DEVICE, DOWN_FETCH), device_topic(DEVICE, DOWN_CMD)
    link = _link(broker, DEVICE, subscriptions=[(fetch, 1), (cmd, 1)])
    frames: queue.Queue[bytes] = queue.Queue()
    link.route(fetch, frames)
    link.start()
    try:
        assert isinstance(link.events.get(timeout=10), Connected)
        fleet = broker.client("fleet-svc")
        fleet.publish_and_wait(fetch, b"frame-1")
        fleet.publish_and_wait(cmd, b"command")
        fleet.publish_and_wait(fetch, b"frame-2")
        assert [frames.get(timeout=10), frames.get(timeout=10)] == [b"frame-1", b"frame-2"]
        event = link.events.get(timeout=10)
        assert isinstance(event, Message)
        assert (event.topic, event.payload) == (cmd, b"command")
        assert link.events.empty()  # the routed frames never went through the event queue
    finally:
        link.stop()


def _link(broker, client_id: str, subscriptions=()) -> MqttLink:
    cert, key = broker.pki.client(client_id)
    return MqttLink(
        MqttSettings(
            url=f"mqtts://127.0.0.1:{broker.port}",
            client_id=client_id,
            ca_file=str(broker.pki.ca_cert),
            cert_file=str(cert),
            key_file=str(key),
        ),
        subscriptions=subscriptions,
    )


def test_paced_publishes_through_a_real_broker_all_arrive_in_order(broker):
    fetch = device_topic(DEVICE, DOWN_FETCH)
    device = broker.client(DEVICE)
    device.subscribe_and_wait(fetch)
    fleet = _link(broker, "fleet-svc")
    fleet.start()
    window = 256 * 1024
    payloads = [bytes([i]) * (64 * 1024) for i in range(24)]  # 1.5 MiB through a 256 KiB window
    try:
        assert isinstance(fleet.events.get(timeout=10), Connected)
        for payload in payloads:
            assert fleet.publish_paced(fetch, payload, window_bytes=window)
        assert [device.expect_message().payload for _ in payloads] == payloads
    finally:
        fleet.stop()
    assert not fleet.publish_paced(fetch, b"late", window_bytes=window)  # link down: refused
