"""Database operations of the fleet service. Functions take a Session; the caller commits.
(The device list, the API's busiest read, takes a Core connection: see ``device_page``.)

Ingest functions are idempotent: a report seen twice (MQTT QoS 1 redelivery, two replicas) is
stored once, thanks to the ``(device_id, seq)`` unique constraints, and a state report older than
the newest one stored is ignored.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import secrets
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from pydantic import TypeAdapter
from sqlalchemy import String, Table, bindparam, func, literal_column, text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection, Engine
from sqlmodel import Session, col, select
from sqlmodel.sql.expression import SelectOfScalar
from typing_extensions import TypedDict

from fleet.models import (
    ApiToken,
    AuditEntry,
    Device,
    DeviceEvent,
    DeviceModel,
    Release,
    TelemetrySample,
)
from shared.protocol import DeploymentEvent, ReportedState, Telemetry

__all__ = [
    "ROLES",
    "ListedDevice",
    "append_audit",
    "authenticate",
    "create_token",
    "device_page",
    "ingest_events",
    "ingest_state",
    "ingest_states",
    "ingest_telemetry",
    "reading",
    "revoke_token",
    "secret_digest",
    "verify_audit_chain",
]

ROLES = ("viewer", "operator", "admin")
GENESIS = "0" * 64
_DEVICE: Table = Device.__table__  # type: ignore[attr-defined]
_DEVICE_MODEL: Table = DeviceModel.__table__  # type: ignore[attr-defined]


def now_utc() -> datetime:
    return datetime.now(UTC)


# -- tokens --------------------------------------------------------------------------------------


def secret_digest(secret: str) -> str:
    """What is stored of a token's secret: its SHA-256, in hex."""
    return hashlib.sha256(secret.encode()).hexdigest()


def create_token(session: Session, *, name: str, role: str, secret: str | None = None) -> str:
    """Store a new token (only its SHA-256) and return the secret, shown once."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    secret = secret or "ef_" + secrets.token_urlsafe(32)
    session.add(
        ApiToken(name=name, role=role, secret_sha256=secret_digest(secret), created_at=now_utc())
    )
    return secret


def authenticate(session: Session, secret: str) -> ApiToken | None:
    """The live token with this secret, or None. Constant work whatever the input."""
    if not secret or len(secret) > 256:
        return None
    token = session.exec(
        select(ApiToken).where(ApiToken.secret_sha256 == secret_digest(secret))
    ).first()
    return token if token is not None and not token.revoked else None


def revoke_token(session: Session, *, name: str) -> ApiToken | None:
    """Mark the live token called ``name`` revoked and return it; None if there is none."""
    token = session.exec(select(ApiToken).where(ApiToken.name == name)).first()
    if token is None or token.revoked:
        return None
    token.revoked = True
    session.add(token)
    return token


# -- audit log -----------------------------------------------------------------------------------


def _entry_hash(prev: str, entry: AuditEntry) -> str:
    """SHA-256 over the previous entry's hash and this entry's time, actor, action, target and
    details: changing, removing or reordering any entry breaks every hash after it."""
    time = entry.time if entry.time.tzinfo else entry.time.replace(tzinfo=UTC)
    material = json.dumps(
        [prev, time.isoformat(), entry.actor, entry.action, entry.target, entry.details],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(material.encode()).hexdigest()


def append_audit(
    session: Session, *, actor: str, action: str, target: str, details: dict[str, Any] | None = None
) -> AuditEntry:
    """Append an entry chained to the previous one (serialised across replicas)."""
    if session.get_bind().dialect.name == "postgresql":
        session.connection().execute(text("SELECT pg_advisory_xact_lock(7261)"))
    last = session.exec(select(AuditEntry).order_by(col(AuditEntry.id).desc()).limit(1)).first()
    prev = last.hash if last else GENESIS
    time = now_utc().replace(microsecond=0)
    details = details or {}
    entry = AuditEntry(
        time=time,
        actor=actor,
        action=action,
        target=target,
        details=details,
        prev_hash=prev,
        hash="",
    )
    entry.hash = _entry_hash(prev, entry)
    session.add(entry)
    session.flush()
    return entry


def verify_audit_chain(session: Session) -> int | None:
    """The id of the first entry whose hash or link is wrong, or None if the chain holds."""
    prev = GENESIS
    for entry in session.exec(select(AuditEntry).order_by(col(AuditEntry.id))):
        expected = _entry_hash(prev, entry)
        if entry.prev_hash != prev or entry.hash != expected:
            return entry.id
        prev = entry.hash
    return None


# -- device reports ------------------------------------------------------------------------------


def _insert(session: Session) -> Any:
    """The ``insert`` of the session's dialect (both have ``ON CONFLICT``)."""
    return pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert


def _insert_ignore(session: Session, model: Any, rows: Sequence[dict[str, Any]]) -> None:
    """``INSERT ... ON CONFLICT DO NOTHING`` of every row, as one executemany.

    One small statement, compiled once and sent with a list of parameter sets: psycopg 3
    pipelines them (one round trip for the batch) and sqlite3 loops in C. A single multi-row
    ``VALUES`` statement of the same rows cost about 0.15 ms a row just to compile and bind.
    """
    if rows:
        statement = _insert(session)(model).on_conflict_do_nothing()
        session.connection().execute(statement, list(rows))


def _touch(session: Session, device_id: str, seen: datetime) -> Device:
    device = session.get(Device, device_id)
    if device is None:
        device = Device(id=device_id, last_seen=seen, online=True)
        session.add(device)
    else:
        device.last_seen = max(device.last_seen or seen, seen) if device.last_seen else seen
        device.online = True
    return device


def ingest_state(session: Session, state: ReportedState) -> bool:
    """Record a device's reported state; False if it is older than what is stored."""
    return ingest_states(session, [state]) == 1


def ingest_states(session: Session, states: Sequence[ReportedState]) -> int:
    """Record reported states, each device's in ``seq`` order; return how many were recorded.

    A state whose ``seq`` is not newer than the device's stored one only marks the device seen.
    The devices and their model rows are read with one query each for the whole batch.
    """
    if not states:
        return 0
    ids = sorted({s.device_id for s in states})
    devices = {d.id: d for d in session.exec(select(Device).where(col(Device.id).in_(ids)))}
    rows = {
        (row.device_id, row.model): row
        for row in session.exec(select(DeviceModel).where(col(DeviceModel.device_id).in_(ids)))
    }
    recorded = 0
    for state in sorted(states, key=lambda s: s.seq):
        device = devices.get(state.device_id)
        if device is None:
            device = Device(id=state.device_id, last_seen=state.time, online=True)
            devices[state.device_id] = device
            session.add(device)
        else:
            device.last_seen = max(device.last_seen or state.time, state.time)
            device.online = True
        if state.seq <= device.last_state_seq:
            continue
        recorded += 1
        device.last_state_seq = state.seq
        device.hardware_class = state.hardware_class or device.hardware_class
        if state.inventory is not None:
            device.inventory = state.inventory
        for name, model in state.models.items():
            row = rows.get((state.device_id, name))
            if row is None:
                row = DeviceModel(device_id=state.device_id, model=name, updated_at=state.time)
                rows[(state.device_id, name)] = row
                session.add(row)
            row.version, row.runtime = model.version, model.runtime
            row.previous_version, row.state = model.previous_version, model.state
            row.updated_at = state.time
    return recorded


# PostgreSQL gets the whole batch as two array parameters: one statement, one round trip, and
# next to no work in Python (an executemany of single-row upserts costs ~30 µs per device).
_TOUCH_POSTGRESQL = text(
    "INSERT INTO device (id, last_seen, online, labels, pinned, last_state_seq, order_sequence)"
    " SELECT id, seen, true, '{}', '{}', 0, 0"
    " FROM unnest(CAST(:ids AS varchar[]), CAST(:seen AS timestamptz[])) AS sender(id, seen)"
    " ON CONFLICT (id) DO UPDATE SET online = true, last_seen ="
    " GREATEST(COALESCE(device.last_seen, EXCLUDED.last_seen), EXCLUDED.last_seen)"
)


def _touch_senders(session: Session, reports: Sequence[DeploymentEvent | Telemetry]) -> None:
    """Mark every device that sent one of ``reports`` as online and seen at its newest report.

    One upsert for the batch (a device's ``last_seen`` never moves back), in device id order so
    that two replicas touching the same devices cannot deadlock.
    """
    newest: dict[str, datetime] = {}
    for report in reports:
        newest[report.device_id] = max(newest.get(report.device_id, report.time), report.time)
    if not newest:
        return
    session.flush()  # pending ORM changes first: this statement bypasses the session
    ids = sorted(newest)
    if session.get_bind().dialect.name == "postgresql":
        session.connection().execute(
            _TOUCH_POSTGRESQL, {"ids": ids, "seen": [newest[d] for d in ids]}
        )
    else:
        statement = sqlite_insert(Device)
        statement = statement.on_conflict_do_update(
            index_elements=["id"],
            set_={
                "online": True,
                "last_seen": func.max(  # SQLite's max() of two values
                    func.coalesce(Device.last_seen, statement.excluded.last_seen),
                    statement.excluded.last_seen,
                ),
            },
        )
        new_device = {
            "online": True,
            "labels": {},
            "pinned": {},
            "last_state_seq": 0,
            "order_sequence": 0,
        }
        rows = [{"id": d, "last_seen": newest[d], **new_device} for d in ids]
        session.connection().execute(statement, rows)
    session.expire_all()  # ORM objects loaded earlier must not hide the new values


def ingest_events(session: Session, events: Sequence[DeploymentEvent]) -> None:
    """Store deployment events (a ``(device_id, seq)`` already stored is skipped)."""
    _touch_senders(session, events)
    _insert_ignore(
        session,
        DeviceEvent,
        [
            {
                "device_id": e.device_id,
                "seq": e.seq,
                "time": e.time,
                "model": e.model,
                "version": e.version,
                "phase": e.phase,
                "failure_class": e.failure_class,
                "detail": e.detail,
                "deployment_id": e.deployment_id,
            }
            for e in events
        ],
    )


def ingest_telemetry(session: Session, samples: Sequence[Telemetry]) -> None:
    """Store telemetry reports (a ``(device_id, seq)`` already stored is skipped)."""
    _touch_senders(session, samples)
    if session.get_bind().dialect.name == "postgresql":
        _copy_telemetry(session, samples)
        return
    _insert_ignore(
        session,
        TelemetrySample,
        [
            {
                "device_id": t.device_id,
                "seq": t.seq,
                "time": t.time,
                "models": t.models,
                "health": t.health,
                "dropped": t.dropped,
            }
            for t in samples
        ],
    )


# A per-connection scratch table with the same column types, emptied at every commit.
_TELEMETRY_STAGING = text(
    "CREATE TEMPORARY TABLE IF NOT EXISTS incoming_telemetry ON COMMIT DELETE ROWS AS"
    " SELECT device_id, seq, time, models, health, dropped FROM telemetrysample WITH NO DATA"
)
_TELEMETRY_COPY = (
    "COPY incoming_telemetry (device_id, seq, time, models, health, dropped) FROM STDIN"
)
_TELEMETRY_FROM_STAGING = text(
    "INSERT INTO telemetrysample (device_id, seq, time, models, health, dropped)"
    " SELECT device_id, seq, time, models, health, dropped FROM incoming_telemetry"
    " ON CONFLICT (device_id, seq) DO NOTHING"
)


def _copy_telemetry(session: Session, samples: Sequence[Telemetry]) -> None:
    """PostgreSQL: ``COPY`` the samples into a scratch table, then ``INSERT ... SELECT ... ON
    CONFLICT DO NOTHING`` from it into ``telemetrysample``.

    ``COPY`` streams the batch with the least work per row on both sides (about 11 µs a row in
    Python against about 30 µs for an executemany); the ``INSERT`` keeps ingest idempotent,
    which a ``COPY`` straight into the table would not.
    """
    if not samples:
        return
    connection = session.connection()
    connection.execute(_TELEMETRY_STAGING)
    psycopg_connection: Any = connection.connection.dbapi_connection
    with psycopg_connection.cursor() as cursor, cursor.copy(_TELEMETRY_COPY) as copy:
        for t in samples:
            copy.write_row(
                (t.device_id, t.seq, t.time, json.dumps(t.models), json.dumps(t.health), t.dropped)
            )
    connection.execute(_TELEMETRY_FROM_STAGING)


def set_presence(session: Session, device_id: str, *, online: bool) -> None:
    device = _touch(session, device_id, now_utc())
    device.online = online


# -- queries -------------------------------------------------------------------------------------


class ListedDevice(TypedDict):
    """A device as the device list shows it: ``models`` maps a model's name to the version the
    device reports running."""

    id: str
    online: bool
    hardware_class: str | None
    group: str | None
    last_seen: datetime | None
    models: dict[str, str | None]


_LISTED_DEVICES = TypeAdapter(list[ListedDevice])
_LISTED = ("id", "online", "hardware_class", "group", "last_seen")
_PAGE_FILTERS = ("after", "online", "hardware_class", "search")

# One listed device as a JSON object, rendered by the database from a row of the page subquery
# (named ``page``); its models come from a correlated subquery through the
# ``devicemodel.device_id`` index. ``last_seen`` is UTC with a ``Z``, so that it is read back as
# the same aware time. SQLite writes ``online`` as 0 or 1, which reads back as a bool; its
# ``json()`` keeps the models an object (a JSON subtype does not cross a subquery).
_DEVICE_JSON = {
    "postgresql": (
        "CAST(json_build_object('id', page.id, 'online', page.online,"
        " 'hardware_class', page.hardware_class, 'group', page.\"group\","
        " 'last_seen', to_char(page.last_seen AT TIME ZONE 'UTC',"
        ' \'YYYY-MM-DD"T"HH24:MI:SS.US"Z"\'),'
        " 'models', COALESCE((SELECT json_object_agg(model, version) FROM devicemodel"
        " WHERE devicemodel.device_id = page.id), '{}')) AS TEXT)"
    ),
    "sqlite": (
        "json_object('id', page.id, 'online', page.online,"
        " 'hardware_class', page.hardware_class, 'group', page.\"group\","
        " 'last_seen', page.last_seen || 'Z',"
        " 'models', json((SELECT json_group_object(model, version) FROM devicemodel"
        " WHERE devicemodel.device_id = page.id)))"
    ),
}


@contextmanager
def reading(engine: Engine) -> Iterator[Connection]:
    """A connection for reads that need no transaction around them.

    On PostgreSQL it runs outside one (no ``BEGIN`` and ``ROLLBACK`` round trips); SQLite's
    driver begins none for a read anyway, and switching its isolation level would cost a
    ``PRAGMA`` at checkout and another at checkin.
    """
    with engine.connect() as connection:
        if connection.dialect.name == "postgresql":
            connection.execution_options(isolation_level="AUTOCOMMIT")
        yield connection


@functools.cache
def _page_statement(dialect: str, filters: frozenset[str]) -> SelectOfScalar[str]:
    """The device list's statement for ``dialect`` with ``filters`` (names from
    ``_PAGE_FILTERS``), every value a bound parameter: built once, not on every request."""
    device = _DEVICE.c
    conditions = {
        "after": device.id > bindparam("after"),
        "online": device.online == bindparam("online"),
        "hardware_class": device.hardware_class == bindparam("hardware_class"),
        "search": device.id.like(bindparam("search"), escape="/"),
    }
    query = select(*(device[name] for name in _LISTED))
    for name in _PAGE_FILTERS:
        if name in filters:
            query = query.where(conditions[name])
    page = (
        query.order_by(device.id)
        .offset(bindparam("offset"))
        .limit(bindparam("limit"))
        .subquery("page")
    )
    device_json = literal_column(_DEVICE_JSON[dialect], String)
    return select(device_json).select_from(page).order_by(page.c.id)


def device_page(
    connection: Connection,
    *,
    limit: int,
    after: str | None = None,
    offset: int = 0,
    online: bool | None = None,
    hardware_class: str | None = None,
    search: str | None = None,
) -> list[ListedDevice]:
    """One page of the device list, ordered by id, in one query.

    ``after`` is a device id: the page starts after it (keyset pagination, as cheap on the
    last page as on the first). ``search`` is a part of the device id.

    The API's busiest read, so no Python runs per device: the database renders each device
    as a JSON object (PostgreSQL's and SQLite's JSON functions), and pydantic reads and checks
    the whole page in one pass. It takes a Core connection, not a Session (see ``reading``).
    """
    values: dict[str, Any] = {
        "after": after,
        "online": online,
        "hardware_class": hardware_class or None,
        # LIKE with '/' as the escape character: the search matches itself, wildcards included
        "search": "%" + re.sub(r"([/%_])", r"/\1", search) + "%" if search else None,
    }
    given = {name: value for name, value in values.items() if value is not None}
    statement = _page_statement(connection.dialect.name, frozenset(given))
    rows = connection.execute(statement, {**given, "limit": limit, "offset": offset}).scalars()
    return _LISTED_DEVICES.validate_json("[" + ",".join(rows) + "]")


def count_devices(session: Session) -> int:
    return int(session.exec(select(func.count()).select_from(Device)).one())


def releases(session: Session, name: str | None = None) -> list[Release]:
    query = select(Release).order_by(col(Release.name), col(Release.counter))
    if name:
        query = query.where(Release.name == name)
    return list(session.exec(query))
