"""The fleet bridge's message handling: any topic and payload is parsed or refused cleanly."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from hypothesis import given, settings
from hypothesis import strategies as st

from fleet.config import FleetSettings
from fleet.db import make_engine
from fleet.distribution import BundleRepository
from fleet.mqtt_bridge import MqttBridge
from shared.mqtt import Message

BRIDGE = MqttBridge(
    FleetSettings(broker="mqtt://127.0.0.1:1"), make_engine("sqlite://"), BundleRepository()
)  # never started: only its parsing is exercised

topics = st.one_of(
    st.text(max_size=80),
    st.sampled_from(
        [
            "up/state",
            "up/events",
            "up/telemetry",
            "up/presence",
            "up/fetch",
            "down/cmd",
            "up/unknown",
        ]
    ).map(lambda s: f"edgefleet/v1/devices/dev-1/{s}"),
)
payloads = st.one_of(
    st.binary(max_size=300),
    st.dictionaries(st.text(max_size=12), st.integers() | st.text(max_size=12), max_size=6).map(
        lambda d: json.dumps(d).encode()
    ),
)


@settings(max_examples=300, deadline=None)
@given(topics, payloads)
def test_any_message_is_parsed_or_refused_without_raising(topic, payload):
    result = BRIDGE._parse(Message(topic=topic, payload=payload))
    assert (
        result is None
        or result[0] in ("up/state", "up/events", "up/telemetry")
        or result[0].startswith("presence:")
    )


def test_a_report_claiming_another_device_is_refused():
    body = {"device_id": "dev-2", "seq": 1, "time": datetime.now(UTC).isoformat()}
    message = Message(
        topic="edgefleet/v1/devices/dev-1/up/state", payload=json.dumps(body).encode()
    )
    assert BRIDGE._parse(message) is None
    body["device_id"] = "dev-1"
    assert BRIDGE._parse(Message(topic=message.topic, payload=json.dumps(body).encode()))
