"""MqttLink.route: payloads of one topic go straight to their consumer's queue, others to events."""

from __future__ import annotations

import queue

import pytest

from shared.mqtt import Connected, Message, MqttLink, MqttSettings
from shared.protocol import DOWN_CMD, DOWN_FETCH, device_topic

pytestmark = pytest.mark.integration

DEVICE = "dev-001"


def test_a_routed_topic_skips_the_event_queue_and_the_rest_still_arrive_there(broker):
    cert, key = broker.pki.client(DEVICE)
    fetch, cmd = device_topic(DEVICE, DOWN_FETCH), device_topic(DEVICE, DOWN_CMD)
    link = MqttLink(
        MqttSettings(
            url=f"mqtts://127.0.0.1:{broker.port}",
            client_id=DEVICE,
            ca_file=str(broker.pki.ca_cert),
            cert_file=str(cert),
            key_file=str(key),
        ),
        subscriptions=[(fetch, 1), (cmd, 1)],
    )
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
