"""The agent's settings (agent.config): conversions, refusals, and the order of the sources."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from agent.config import AgentSettings, load_settings
from shared.errors import UsageError

REQUIRED = {
    "device_id": "dev-001",
    "broker": "mqtts://fleet:8883",
    "data_dir": "/var/lib/edgefleet",
    "trust": "/etc/edgefleet/root.json",
}


def settings(**values):
    return AgentSettings(**{**REQUIRED, **values})


def test_defaults_and_types():
    s = settings()
    assert s.data_dir == Path("/var/lib/edgefleet")
    assert s.trust == Path("/etc/edgefleet/root.json")
    assert (s.mqtt_protocol, s.window_chunks, s.probation_s, s.objective) == (5, 8, 30.0, "latency")
    assert s.ca_file is None
    assert pickle.loads(pickle.dumps(s)) == s  # how a deployment child process receives them


@pytest.mark.parametrize(
    ("field", "given", "expected"),
    [
        ("window_chunks", "16", 16),  # text from the environment or a flag
        ("window_chunks", 16.0, 16),
        ("probation_s", "1.5", 1.5),
        ("probation_s", 2, 2.0),
        ("mqtt_protocol", "311", 311),
        ("mqtt_protocol", 311, 311),
        ("ca_file", "ca.pem", Path("ca.pem")),
        ("ca_file", Path("ca.pem"), Path("ca.pem")),
        ("latency_budget_ms", None, None),
        ("inference_broker", "mqtt://127.0.0.1:1883", "mqtt://127.0.0.1:1883"),
        ("objective", "p99", "p99"),
    ],
)
def test_values_are_converted_where_text_stands_for_a_number_or_a_path(field, given, expected):
    value = getattr(settings(**{field: given}), field)
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"device_id": "../etc"}, r"^device_id: must match"),
        ({"broker": "http://fleet"}, r"^broker: must start with mqtt:// or mqtts://, got 'http"),
        ({"inference_broker": "fleet:1883"}, r"^inference_broker: must start with mqtt://"),
        ({"window_chunks": 0}, r"^window_chunks: must be >= 1, got 0$"),
        ({"window_chunks": 257}, r"^window_chunks: must be <= 256, got 257$"),
        ({"window_chunks": "many"}, r"^window_chunks: expected an integer, got 'many'$"),
        ({"window_chunks": 2.5}, r"^window_chunks: expected an integer, got 2.5$"),
        ({"window_chunks": True}, r"^window_chunks: expected an integer, got True$"),
        ({"request_timeout_s": 0}, r"^request_timeout_s: must be > 0, got 0.0$"),
        ({"probation_s": "nan"}, r"^probation_s: expected a finite number, got 'nan'$"),
        ({"max_message_bytes": 1024}, r"^max_message_bytes: must be >= 4096, got 1024$"),
        ({"outbox_max_records": 9}, r"^outbox_max_records: must be >= 10, got 9$"),
        ({"mqtt_protocol": 3}, r"^mqtt_protocol: must be one of 5, 311, got 3$"),
        ({"mqtt_protocol": True}, r"^mqtt_protocol: must be one of 5, 311, got True$"),
        ({"objective": "fast"}, r"^objective: must be one of 'latency', 'p99', 'throughput'"),
        ({"username": 7}, r"^username: expected text, got 7$"),
        ({"data_dir": None}, r"^data_dir: required, got None$"),
        ({"trust": 1}, r"^trust: expected a path, got 1$"),
    ],
)
def test_invalid_values_are_refused_by_name(values, message):
    with pytest.raises(ValueError, match=message):
        settings(**values)


def test_unknown_settings_are_refused():
    with pytest.raises(TypeError, match="window_size"):
        settings(window_size=4)


def test_sources_file_then_environment_then_flags(tmp_path, monkeypatch):
    config = tmp_path / "agent.toml"
    config.write_text(
        '[agent]\ndevice_id = "dev-file"\nbroker = "mqtt://file:1883"\n'
        'data_dir = "/data"\ntrust = "/root.json"\nwindow_chunks = 4\nprobation_s = 5\n'
    )
    monkeypatch.setenv("EDGEFLEET_AGENT_WINDOW_CHUNKS", "12")
    monkeypatch.setenv("EDGEFLEET_AGENT_DEVICE_ID", "dev-env")
    monkeypatch.setenv("EDGEFLEET_AGENT_NOT_A_SETTING", "ignored")
    s = load_settings(config, {"device_id": "dev-flag", "broker": None})
    assert (s.device_id, s.broker, s.window_chunks, s.probation_s) == (
        "dev-flag",
        "mqtt://file:1883",
        12,
        5.0,
    )


def test_load_settings_refusals_are_usage_errors(tmp_path, monkeypatch):
    for key in ("DEVICE_ID", "BROKER", "DATA_DIR", "TRUST"):
        monkeypatch.delenv(f"EDGEFLEET_AGENT_{key}", raising=False)
    with pytest.raises(UsageError, match=r"^agent settings: broker, data_dir, trust must be set$"):
        load_settings(None, {"device_id": "dev-1"})
    with pytest.raises(UsageError, match=r"^agent settings: window_chunks: must be >= 1, got 0$"):
        load_settings(None, {**REQUIRED, "window_chunks": 0})
    config = tmp_path / "agent.toml"
    config.write_text("[agent]\nwindow_size = 4\n")
    with pytest.raises(UsageError, match=r"unknown agent settings \['window_size'\]"):
        load_settings(config, REQUIRED)
    config.write_text("[agent\n")
    with pytest.raises(UsageError, match="cannot read the agent configuration"):
        load_settings(config, REQUIRED)
