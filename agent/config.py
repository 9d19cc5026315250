"""The agent's settings: one typed object, read once at start-up and passed down.

Sources, lowest to highest precedence: defaults, a TOML file (``--config``), environment
variables ``EDGEFLEET_AGENT_<FIELD>``, command-line flags. :func:`load_settings` merges them;
:class:`AgentSettings` is a plain pydantic model (pydantic-settings would cost the daemon several
MB of resident memory for what ``load_settings`` does in a few lines).
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from shared.errors import UsageError
from shared.protocol import DEVICE_ID_PATTERN

__all__ = ["ENV_PREFIX", "AgentSettings", "load_settings"]

ENV_PREFIX = "EDGEFLEET_AGENT_"


class AgentSettings(BaseModel):
    """Everything the agent daemon needs to know. Units are in the field names."""

    model_config = ConfigDict(extra="forbid")

    device_id: str = Field(pattern=DEVICE_ID_PATTERN)
    broker: str = Field(description="mqtt://HOST:PORT or mqtts://HOST:PORT")
    data_dir: Path
    trust: Path = Field(description="the trusted root.json")
    hardware_id: str | None = None  # default: the inventory's hardware class
    # MQTT identity
    username: str | None = None
    password: str | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    mqtt_protocol: Literal[5, 311] = 5
    # transfer
    max_message_bytes: int = Field(default=1 << 20, ge=4096)
    window_chunks: int = Field(default=8, ge=1, le=256)
    request_timeout_s: float = Field(default=10.0, gt=0)
    min_bytes_per_s: float = Field(default=1024.0, ge=0)
    throughput_window_s: float = Field(default=30.0, gt=0)  # slow-retrieval window
    download_deadline_s: float = Field(default=3600.0, gt=0)
    # self-test and probation
    objective: Literal["latency", "p99", "throughput"] = "latency"
    latency_budget_ms: float | None = None  # refuse a model slower than this in self-test
    probation_s: float = Field(default=30.0, ge=0)
    max_crash_restarts: int = Field(default=3, ge=1)
    # inference server for local applications
    inference_broker: str | None = None  # default: the fleet broker
    telemetry_interval_s: float = Field(default=30.0, gt=0)
    outbox_max_records: int = Field(default=10_000, ge=10)

    @field_validator("broker", "inference_broker")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("mqtt://", "mqtts://")):
            raise ValueError(f"must start with mqtt:// or mqtts://, got {value!r}")
        return value

    @field_validator("mqtt_protocol", mode="before")
    @classmethod
    def _protocol(cls, value: Any) -> Any:
        return int(value) if isinstance(value, str) and value.isdigit() else value


def load_settings(config_file: Path | None, overrides: dict[str, Any]) -> AgentSettings:
    """Merge the TOML file, the environment and command-line ``overrides`` (None = unset)."""
    values: dict[str, Any] = {}
    if config_file is not None:
        try:
            values = tomllib.loads(config_file.read_text()).get("agent", {})
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise UsageError(f"{config_file}: cannot read the agent configuration ({e})") from e
    prefix = ENV_PREFIX
    for key, value in os.environ.items():  # the environment overrides the file...
        if (
            key.upper().startswith(prefix)
            and key[len(prefix) :].lower() in AgentSettings.model_fields
        ):
            values[key[len(prefix) :].lower()] = value
    values.update({k: v for k, v in overrides.items() if v is not None})  # ...and flags both
    try:
        return AgentSettings(**values)
    except ValueError as e:
        first = str(e).splitlines()
        raise UsageError("agent settings: " + " ".join(line.strip() for line in first[:3])) from e
