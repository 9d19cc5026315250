"""The fleet bridge's message handling: any topic and payload is parsed or refused cleanly."""

from __future__ import annotations

import doctest
import json
from datetime import UTC, datetime

from hypothesis import given, settings
from hypothesis import strategies as st

import fleet.distribution
from fleet.config import FleetSettings
from fleet.db import make_engine
from fleet.distribution import BundleRepository, FetchQueue
from fleet.mqtt_bridge import MqttBridge
from shared.mqtt import Message
from shared.protocol import FetchRequest

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


def test_metadata_and_manifest_requests_are_answered_before_a_backlog_of_chunks():
    """A device's TUF and manifest round trips must not wait behind other devices' chunks."""
    bridge = MqttBridge(
        FleetSettings(broker="mqtt://127.0.0.1:1"), make_engine("sqlite://"), BundleRepository()
    )

    def chunks(request_id: str, index: int) -> dict[str, object]:
        return {
            "request_id": request_id,
            "kind": "chunks",
            "target": "m/1/manifest.json",
            "chunks": [{"file": "model.onnx", "index": index}],
        }

    requests = [
        ("dev-1", chunks("c1", 0)),
        ("dev-2", chunks("c2", 1)),
        ("dev-3", {"request_id": "t3", "kind": "metadata", "name": "timestamp.json"}),
        ("dev-1", chunks("c3", 2)),
        ("dev-4", {"request_id": "m4", "kind": "manifest", "target": "m/1/manifest.json"}),
    ]
    for device, body in requests:
        topic = f"edgefleet/v1/devices/{device}/up/fetch"
        assert bridge._parse(Message(topic=topic, payload=json.dumps(body).encode())) is None
    served = [bridge._fetches.get(0)[1].request_id for _ in requests]
    assert served == ["t3", "m4", "c1", "c2", "c3"]  # small first, then in arrival order


def test_a_flood_of_metadata_requests_slows_chunks_down_but_cannot_stop_them():
    fetches = FetchQueue(small_run=3)
    chunk = FetchRequest(request_id="c", kind="chunks", target="m/1/manifest.json")
    fetches.put("dev-1", chunk)
    for i in range(10):
        fetches.put("flooder", FetchRequest(request_id=f"t{i}", kind="metadata", name="x.json"))
    kinds = [fetches.get(0)[1].kind for _ in range(11)]
    assert kinds.index("chunks") == 3  # after three small answers in a row, the chunk's turn
    assert fetches.get(0) is None
    assert len(fetches) == 0


def test_the_fetch_queue_example_runs():
    assert doctest.testmod(fleet.distribution).failed == 0
