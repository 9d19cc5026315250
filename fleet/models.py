"""The fleet's database tables (SQLModel). Schema changes go through Alembic (``fleet/migrations``).

Times are UTC. Device ids, model names and versions use the same patterns as the protocol and
the bundle format. Nothing here holds logic: queries live in :mod:`fleet.crud`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Column, Index, UniqueConstraint
from sqlmodel import Field, SQLModel

__all__ = [
    "ApiToken",
    "AuditEntry",
    "Device",
    "DeviceEvent",
    "DeviceModel",
    "Release",
    "RolloutRecord",
    "TelemetrySample",
]


class Device(SQLModel, table=True):
    """A device known to the fleet: enrolled, or seen on the broker."""

    # the console overview counts devices by class and presence from this index alone
    __table_args__ = (Index("ix_device_class_online", "hardware_class", "online"),)

    id: str = Field(primary_key=True, max_length=64)
    hardware_class: str | None = Field(default=None, max_length=128)
    group: str | None = Field(default=None, max_length=64, index=True)
    labels: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    inventory: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    online: bool = False
    enrolled_at: datetime | None = None
    last_seen: datetime | None = None
    last_state_seq: int = Field(default=0, sa_type=BigInteger)  # agents count in ms since 1970
    pinned: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    order_sequence: int = 0  # last director order sequence sent (monotonic per device)


class GroupPin(SQLModel, table=True):
    """Every device of ``group`` stays on ``version`` of ``model``; rollouts skip it.

    A device's own pin (``Device.pinned``) wins over its group's."""

    __table_args__ = (UniqueConstraint("group", "model"),)

    id: int | None = Field(default=None, primary_key=True)
    group: str = Field(max_length=64, index=True)
    model: str = Field(max_length=64)
    version: str = Field(max_length=64)
    set_by: str = Field(max_length=64)
    set_at: datetime


class DeviceModel(SQLModel, table=True):
    """What a device reports it really runs, per model (also after a local rollback)."""

    __table_args__ = (
        UniqueConstraint("device_id", "model"),
        # the console overview counts installs by these columns from this index alone
        Index("ix_devicemodel_counts", "model", "version", "state", "runtime"),
    )

    id: int | None = Field(default=None, primary_key=True)
    device_id: str = Field(foreign_key="device.id", max_length=64, index=True)
    model: str = Field(max_length=64)
    version: str | None = Field(default=None, max_length=64)
    runtime: str | None = Field(default=None, max_length=256)
    previous_version: str | None = Field(default=None, max_length=64)
    state: str = Field(default="none", max_length=16)
    updated_at: datetime


class DeviceEvent(SQLModel, table=True):
    """A deployment event as the device reported it; (device_id, seq) is unique (dedup)."""

    __table_args__ = (
        UniqueConstraint("device_id", "seq"),
        Index("ix_event_model_version", "model", "version"),
    )

    id: int | None = Field(default=None, primary_key=True)
    device_id: str = Field(max_length=64, index=True)
    seq: int = Field(sa_type=BigInteger)
    time: datetime
    model: str = Field(max_length=64)
    version: str = Field(max_length=64)
    phase: str = Field(max_length=16)
    failure_class: str | None = Field(default=None, max_length=32)
    detail: str | None = Field(default=None, max_length=4096)
    deployment_id: str | None = Field(default=None, max_length=64)


class TelemetrySample(SQLModel, table=True):
    """One telemetry report; (device_id, seq) is unique (dedup)."""

    __table_args__ = (UniqueConstraint("device_id", "seq"),)

    id: int | None = Field(default=None, primary_key=True)
    device_id: str = Field(max_length=64, index=True)
    seq: int = Field(sa_type=BigInteger)
    time: datetime
    models: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    health: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    dropped: int = 0


class Release(SQLModel, table=True):
    """A signed bundle published to the fleet (verified against the trust root on upload)."""

    __table_args__ = (UniqueConstraint("name", "version"),)

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=64, index=True)
    version: str = Field(max_length=64)
    counter: int
    rollback_floor: int
    expires: datetime
    manifest_sha256: str = Field(max_length=64)
    size: int
    formats: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    hardware_ids: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    path: str = Field(max_length=1024)
    published_at: datetime
    published_by: str = Field(max_length=64)


class ApiToken(SQLModel, table=True):
    """An API token, stored as a SHA-256 of the secret; the role decides what it may do."""

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=64, unique=True)
    role: str = Field(max_length=16)  # viewer, operator, admin
    secret_sha256: str = Field(max_length=64, unique=True)
    created_at: datetime
    revoked: bool = False


class AuditEntry(SQLModel, table=True):
    """Append-only, hash-chained: each entry's hash covers its content and the previous hash."""

    id: int | None = Field(default=None, primary_key=True)
    time: datetime
    actor: str = Field(max_length=64)
    action: str = Field(max_length=64)
    target: str = Field(max_length=256)
    details: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    prev_hash: str = Field(max_length=64)
    hash: str = Field(max_length=64, unique=True)


class RolloutRecord(SQLModel, table=True):
    """A rollout: its plan, the engine's state between steps, and where ingest left off."""

    id: str = Field(primary_key=True, max_length=64)
    model: str = Field(max_length=64, index=True)
    version: str = Field(max_length=64)
    target: str = Field(default="", max_length=512)
    status: str = Field(max_length=16, index=True)  # the engine's RolloutState value
    plan: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    state: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    last_event_id: int = 0
    created_at: datetime
    created_by: str = Field(max_length=64)
    updated_at: datetime
