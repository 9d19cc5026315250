"""The fleet service's settings: one typed object, built once in ``create_app`` or the CLI.

Sources, lowest to highest precedence: defaults, environment variables ``EDGEFLEET_FLEET_<FIELD>``,
command-line flags. The admin token comes from ``EDGEFLEET_ADMIN_TOKEN``.

``rollout_defaults`` is the fleet's rollout policy: what a new rollout gets for each option its
request leaves out. From the environment it is JSON, and what it leaves out keeps the built-in
default::

    EDGEFLEET_FLEET_ROLLOUT_DEFAULTS='{"stages": [10, 100], "gates": {"min_sample": 3}}'
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from fleet.rollout_options import RolloutOptions

__all__ = ["FleetSettings"]


class FleetSettings(BaseSettings):
    """Everything the fleet service needs. Units are in the field names."""

    model_config = SettingsConfigDict(env_prefix="EDGEFLEET_FLEET_", extra="forbid")

    data_dir: Path = Path("edgefleet-fleet")
    db: str | None = None  # default: sqlite:///<data_dir>/fleet.db
    broker: str | None = None  # mqtt:// or mqtts://; None runs without a broker (API only)
    keys: Path | None = None  # the key directory (online keys; root.json for verification)
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    # the service's MQTT identity (certificate CN fleet-svc)
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    username: str | None = None
    password: str | None = None
    mqtt_protocol: Literal[5, 311] = 5  # 311: no shared subscriptions (see fleet.mqtt_bridge)
    max_message_bytes: int = Field(default=1 << 20, ge=4096)
    max_upload_bytes: int = Field(default=4 << 30, ge=1024)
    ingest_batch: int = Field(default=500, ge=1)
    ingest_flush_s: float = Field(default=0.2, gt=0)
    device_offline_after_s: float = Field(default=120.0, gt=0)
    rollout_tick_s: float = Field(default=1.0, gt=0)
    # how long the API reuses a device-list page for the same query; 0: never (see fleet.api)
    device_list_cache_s: float = Field(default=1.0, ge=0)
    # what a new rollout gets for each option its request leaves out (see fleet.rollout_options)
    rollout_defaults: RolloutOptions = RolloutOptions()

    @field_validator("broker")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("mqtt://", "mqtts://")):
            raise ValueError(f"must start with mqtt:// or mqtts://, got {value!r}")
        return value

    @field_validator("rollout_defaults")
    @classmethod
    def _engine_accepts_defaults(cls, value: RolloutOptions) -> RolloutOptions:
        # what the engine checks across fields (the last stage is 100%), checked at start-up
        value.engine_plan(
            rollout_id="defaults", model="m", version="2", previous_version="1", salt="s"
        )
        return value

    @field_validator("mqtt_protocol", mode="before")
    @classmethod
    def _protocol(cls, value: Any) -> Any:  # "311" from the environment
        return int(value) if isinstance(value, str) and value.isdigit() else value

    @property
    def database_url(self) -> str:
        if self.db:
            return self.db
        return f"sqlite:///{(self.data_dir / 'fleet.db').resolve()}"

    @property
    def bundles_dir(self) -> Path:
        return self.data_dir / "bundles"
