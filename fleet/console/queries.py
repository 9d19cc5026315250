"""What the console's pages show, read from the database: one function per page.

Every function takes a Session and returns a JSON-ready dict. Counts over the fleet are SQL
``GROUP BY`` aggregates (SQLAlchemy Core): the overview of 10,000 devices reads a few dozen
aggregate rows, never the device rows themselves. Lists are paginated.

The same functions feed the HTTP endpoints (:mod:`fleet.console.routes`) and the live feed
(:mod:`fleet.console.live`), so a page's first load and its live updates have the same shape.

>>> overview(session, summaries)["devices"]                     # doctest: +SKIP
{'total': 10000, 'online': 9731, 'offline': 269}

Unknown ids raise :class:`NotFound`; bad filter values raise :class:`ValueError`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import and_, exists, func, or_
from sqlalchemy import select as core_select
from sqlalchemy.sql.elements import ColumnElement
from sqlmodel import Session, select

from fleet.models import AuditEntry, Device, DeviceEvent, DeviceModel, RolloutRecord
from fleet.models import TelemetrySample as Sample

__all__ = [
    "NotFound",
    "audit",
    "device_detail",
    "devices",
    "overview",
    "rollout_list",
    "runtime_family",
]

DEVICES = Device.__table__.c  # type: ignore[attr-defined]
MODELS = DeviceModel.__table__.c  # type: ignore[attr-defined]
EVENTS = DeviceEvent.__table__.c  # type: ignore[attr-defined]
SAMPLES = Sample.__table__.c  # type: ignore[attr-defined]
AUDIT = AuditEntry.__table__.c  # type: ignore[attr-defined]
ROLLOUTS = RolloutRecord.__table__.c  # type: ignore[attr-defined]

EVENTS_SHOWN = 100  # a device page's timeline
SAMPLES_SHOWN = 120  # telemetry points per chart
FAILURE_PHASES = ("failed", "rolled_back")

# RolloutViews.summaries: (session, active_only=..., limit=...) -> the newest rollouts' summaries
Summaries = Callable[..., list[dict[str, Any]]]


class NotFound(LookupError):  # noqa: N818  (reads as "raise NotFound(...)")
    """The page asked for a device, rollout or topic that does not exist."""


def runtime_family(runtime: str | None) -> str:
    """``onnxruntime/CPUExecutionProvider`` -> ``onnxruntime``; ``None`` -> ``none``."""
    return (runtime or "").split("/")[0] or "none"


def _iso(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).isoformat()


def _rows(session: Session, statement: Any) -> list[Any]:
    return list(session.connection().execute(statement))


# -- overview ------------------------------------------------------------------------------------


def overview(session: Session, summaries: Summaries) -> dict[str, Any]:
    """Devices by online state, hardware class, runtime, model version and install state; the
    active rollouts with their progress.

    Two aggregate queries: devices by (hardware class, online), and model installs by
    (model, version, state, runtime); both are answered from an index (migration 0005).
    """
    devices = _rows(
        session,
        select(DEVICES.hardware_class, DEVICES.online, func.count()).group_by(
            DEVICES.hardware_class, DEVICES.online
        ),
    )
    installs = _rows(
        session,
        core_select(
            MODELS.model, MODELS.version, MODELS.state, MODELS.runtime, func.count()
        ).group_by(MODELS.model, MODELS.version, MODELS.state, MODELS.runtime),
    )
    classes: dict[str | None, list[int]] = {}
    for name, up, n in devices:
        counts = classes.setdefault(name, [0, 0])
        counts[0] += n
        counts[1] += n if up else 0
    total = sum(n for n, _ in classes.values())
    online = sum(up for _, up in classes.values())
    versions = [(model, version, state, n) for model, version, state, _, n in installs]
    return {
        "devices": {"total": total, "online": online, "offline": total - online},
        "hardware_classes": [
            {"name": name or "unknown", "devices": n, "online": up}
            for name, (n, up) in sorted(classes.items(), key=lambda kv: -kv[1][0])
        ],
        "runtimes": _fold_runtimes([(runtime, n) for *_, runtime, n in installs]),
        "models": _fold_versions(versions),
        "states": _fold_states(versions),
        "rollouts": summaries(session, active_only=True),
    }


def _fold_runtimes(rows: list[Any]) -> list[dict[str, Any]]:
    counts: dict[str, int] = defaultdict(int)
    for runtime, n in rows:
        counts[runtime_family(runtime)] += n
    return [{"name": k, "devices": v} for k, v in sorted(counts.items(), key=lambda kv: -kv[1])]


def _fold_versions(rows: list[Any]) -> list[dict[str, Any]]:
    """``[{model, version, devices, states: {active: n, ...}}]``, most devices first."""
    folded: dict[tuple[str, str], dict[str, Any]] = {}
    for model, version, state, n in rows:
        entry = folded.setdefault(
            (model, version or "none"),
            {"model": model, "version": version or "none", "devices": 0, "states": {}},
        )
        entry["devices"] += n
        entry["states"][state] = entry["states"].get(state, 0) + n
    return sorted(folded.values(), key=lambda e: (e["model"], -e["devices"]))


def _fold_states(rows: list[Any]) -> dict[str, int]:
    states: dict[str, int] = defaultdict(int)
    for _, _, state, n in rows:
        states[state] += n
    return dict(states)


# -- rollouts ------------------------------------------------------------------------------------


def rollout_list(session: Session, summaries: Summaries, *, limit: int = 100) -> dict[str, Any]:
    """The newest ``limit`` rollouts, each as its summary."""
    return {"rollouts": summaries(session, limit=limit)}


# -- devices -------------------------------------------------------------------------------------


def _device_filters(
    *,
    search: str | None,
    online: bool | None,
    hardware_class: str | None,
    model: str | None,
    version: str | None,
    state: str | None,
) -> list[ColumnElement[bool]]:
    filters: list[ColumnElement[bool]] = []
    if search:
        filters.append(
            or_(
                DEVICES.id.contains(search, autoescape=True),
                DEVICES.group.contains(search, autoescape=True),
            )
        )
    if online is not None:
        filters.append(DEVICES.online == online)
    if hardware_class:
        filters.append(
            DEVICES.hardware_class.is_(None)
            if hardware_class == "unknown"
            else DEVICES.hardware_class == hardware_class
        )
    if model or version or state:
        running = [MODELS.device_id == DEVICES.id]
        if model:
            running.append(MODELS.model == model)
        if version:
            running.append(
                MODELS.version.is_(None) if version == "none" else MODELS.version == version
            )
        if state:
            running.append(MODELS.state == state)
        filters.append(exists().where(and_(*running)))
    return filters


def devices(
    session: Session,
    *,
    search: str | None = None,
    online: bool | None = None,
    hardware_class: str | None = None,
    model: str | None = None,
    version: str | None = None,
    state: str | None = None,
    limit: int = 50,
    offset: int = 0,
) -> dict[str, Any]:
    """One page of devices (by id) matching the filters, the total that match, and what each
    device on the page runs."""
    filters = _device_filters(
        search=search,
        online=online,
        hardware_class=hardware_class,
        model=model,
        version=version,
        state=state,
    )
    total = _rows(session, select(func.count()).select_from(Device).where(*filters))[0][0]
    page = _rows(
        session,
        core_select(
            DEVICES.id, DEVICES.online, DEVICES.hardware_class, DEVICES.group, DEVICES.last_seen
        )
        .where(*filters)
        .order_by(DEVICES.id)
        .limit(limit)
        .offset(offset),
    )
    models: dict[str, list[dict[str, Any]]] = defaultdict(list)
    if page:
        for row in _rows(
            session,
            core_select(
                MODELS.device_id, MODELS.model, MODELS.version, MODELS.runtime, MODELS.state
            )
            .where(MODELS.device_id.in_([d.id for d in page]))
            .order_by(MODELS.model),
        ):
            models[row.device_id].append(
                {
                    "model": row.model,
                    "version": row.version,
                    "runtime": row.runtime,
                    "state": row.state,
                }
            )
    return {
        "total": total,
        "offset": offset,
        "limit": limit,
        "devices": [
            {
                "id": d.id,
                "online": d.online,
                "hardware_class": d.hardware_class,
                "group": d.group,
                "last_seen": _iso(d.last_seen),
                "models": models.get(d.id, []),
            }
            for d in page
        ],
    }


def device_detail(session: Session, device_id: str) -> dict[str, Any]:
    """A device: what it runs, its deployment timeline, its telemetry series and the detail of
    its latest failure (the log tail the agent sent with it).

    Raises:
        NotFound: no device ``device_id``.
    """
    device = session.get(Device, device_id)
    if device is None:
        raise NotFound(f"no device {device_id!r}")
    events = _rows(
        session,
        select(EVENTS)
        .where(EVENTS.device_id == device_id)
        .order_by(EVENTS.seq.desc())
        .limit(EVENTS_SHOWN),
    )
    timeline = [
        {
            "seq": e.seq,
            "time": _iso(e.time),
            "model": e.model,
            "version": e.version,
            "phase": e.phase,
            "failure_class": e.failure_class,
            "detail": e.detail,
        }
        for e in events
    ]
    failure = next((e for e in timeline if e["phase"] in FAILURE_PHASES and e["detail"]), None)
    models = _rows(
        session, select(MODELS).where(MODELS.device_id == device_id).order_by(MODELS.model)
    )
    return {
        "id": device.id,
        "online": device.online,
        "hardware_class": device.hardware_class,
        "group": device.group,
        "labels": device.labels,
        "enrolled_at": _iso(device.enrolled_at),
        "last_seen": _iso(device.last_seen),
        "inventory": device.inventory,
        "models": [
            {
                "model": m.model,
                "version": m.version,
                "previous_version": m.previous_version,
                "runtime": m.runtime,
                "state": m.state,
                "updated_at": _iso(m.updated_at),
            }
            for m in models
        ],
        "events": timeline,
        "last_failure": failure,
        "telemetry": telemetry(session, device_id),
    }


def telemetry(session: Session, device_id: str) -> dict[str, Any]:
    """The device's last :data:`SAMPLES_SHOWN` telemetry reports as chart series.

    ``latency_p95_ms`` and ``errors`` are per model; ``errors`` counts the inference errors
    since the previous report (the agent reports running totals, which restart at zero).
    """
    rows = _rows(
        session,
        select(SAMPLES.time, SAMPLES.models, SAMPLES.health)
        .where(SAMPLES.device_id == device_id)
        .order_by(SAMPLES.seq.desc())
        .limit(SAMPLES_SHOWN),
    )
    rows.reverse()
    times = [_iso(r.time) for r in rows]
    cpu = [_number(r.health, "cpu_percent") for r in rows]
    memory = [_memory_percent(r.health) for r in rows]
    latency: dict[str, list[float | None]] = {}
    errors: dict[str, list[float | None]] = {}
    names = sorted({name for r in rows for name in (r.models or {})})
    for name in names:
        latency[name] = []
        errors[name] = []
        previous: int | None = None
        for r in rows:
            data = (r.models or {}).get(name)
            data = data if isinstance(data, dict) else {}
            latency[name].append(_number(data.get("latency_ms") or {}, "p95"))
            total = data.get("errors")
            if not isinstance(total, int):
                errors[name].append(None)
                continue
            restarted = previous is None or total < previous
            errors[name].append(0.0 if previous is None or restarted else float(total - previous))
            previous = total
    return {
        "times": times,
        "cpu_percent": cpu,
        "memory_percent": memory,
        "latency_p95_ms": latency,
        "errors": errors,
    }


def _number(data: Any, key: str) -> float | None:
    value = data.get(key) if isinstance(data, dict) else None
    return float(value) if isinstance(value, int | float) else None


def _memory_percent(health: Any) -> float | None:
    total = _number(health, "memory_total_mb")
    available = _number(health, "memory_available_mb")
    if not total or available is None:
        return None
    return round(100.0 * (total - available) / total, 1)


# -- audit log -----------------------------------------------------------------------------------


def audit(
    session: Session,
    *,
    action: str | None = None,
    actor: str | None = None,
    target: str | None = None,
    before: int | None = None,
    limit: int = 100,
) -> dict[str, Any]:
    """The newest ``limit`` audit entries (older than id ``before``) matching the filters:
    ``action`` is a prefix (``rollout.`` matches every rollout action), ``actor`` exact,
    ``target`` a substring."""
    filters = []
    if action:
        filters.append(AUDIT.action.startswith(action, autoescape=True))
    if actor:
        filters.append(AUDIT.actor == actor)
    if target:
        filters.append(AUDIT.target.contains(target, autoescape=True))
    if before is not None:
        filters.append(AUDIT.id < before)
    rows = _rows(
        session,
        core_select(AUDIT.id, AUDIT.time, AUDIT.actor, AUDIT.action, AUDIT.target, AUDIT.details)
        .where(*filters)
        .order_by(AUDIT.id.desc())
        .limit(limit),
    )
    return {
        "entries": [
            {
                "id": r.id,
                "time": _iso(r.time),
                "actor": r.actor,
                "action": r.action,
                "target": r.target,
                "details": r.details,
            }
            for r in rows
        ],
        "limit": limit,
    }
