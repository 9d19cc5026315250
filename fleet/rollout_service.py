"""The I/O around the pure rollout engine: inputs from the database, actions to the devices.

:meth:`RolloutService.tick` runs one :func:`fleet.rollouts.step` per active rollout:

- **inputs** — the target devices (:class:`~fleet.rollouts.DeviceView` from the registry and the
  versions devices report running), the deployment events stored since the last step, and each
  device's latest telemetry for the model;
- **actions** — ``Dispatch`` and ``Revert`` become director orders signed with the fleet's
  director key (per-device sequence numbers, so devices refuse replays) and sent as ``deploy``
  commands; gate decisions and state changes go to the audit log; the new state is stored.

Conflict rule: one active rollout per model at a time. Creating a second one for a model that
has a pending, running, paused or halted rollout is refused; abort the first.

Replicas: on PostgreSQL each rollout row is locked (``FOR UPDATE SKIP LOCKED``) while it is
stepped, so two replicas never step the same rollout at once.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import Text, and_, cast, func, update
from sqlalchemy import select as core_select
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from fleet import crud
from fleet.models import (
    Device,
    DeviceEvent,
    DeviceModel,
    GroupPin,
    Release,
    RolloutRecord,
    TelemetrySample,
)
from fleet.rollout_codec import decode_plan, decode_rollout, encode_plan, encode_rollout
from fleet.rollout_options import RolloutOptions
from fleet.rollouts import (
    Abort,
    Action,
    DeviceMetrics,
    DeviceView,
    Dispatch,
    GateDecision,
    OperatorAction,
    Pause,
    Plan,
    Promote,
    Resume,
    RetryFailed,
    Revert,
    Rollout,
    StateChanged,
    apply_operator,
    preview,
    step,
)
from fleet.rollouts import DeviceEvent as EngineEvent
from shared.bundle import inspect_bundle
from shared.errors import UsageError
from shared.keystore import KeyStore
from shared.protocol import Command
from shared.trust import ReleaseInfo, sign_deployment, verify_release

__all__ = [
    "ACTIVE",
    "DeploymentReport",
    "RolloutService",
    "device_view",
    "engine_event",
    "order_version",
    "parse_target",
    "telemetry_metrics",
]

logger = logging.getLogger(__name__)
ACTIVE = ("pending", "running", "paused", "halted")
OPERATOR_ACTIONS: dict[str, Callable[..., OperatorAction]] = {
    "pause": Pause,
    "resume": Resume,
    "promote": Promote,
    "retry-failed": RetryFailed,
}
SendCommand = Callable[[str, bytes], bool]


def parse_target(selector: str) -> dict[str, str]:
    """``hardware_class=x86_64-avx2,group=lab`` -> a dict; empty selects every device."""
    result: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in selector.split(","))):
        key, sep, value = part.partition("=")
        if not sep or key not in ("hardware_class", "group", "device"):
            raise UsageError(
                f"target selector parts are hardware_class=, group= or device=, got {part!r}"
            )
        result[key] = value
    return result


def _lock_devices(session: Session, device_ids: set[str]) -> None:
    """Lock the rows of the devices about to get orders, in id order (PostgreSQL).

    The bridge marks devices seen in id order too (``crud._touch_senders``), so the two cannot
    deadlock: without this, orders updated rows in the plan's order while a batch of telemetry
    touched them in id order. SQLite has one writer at a time and needs no locks.
    """
    if device_ids and session.get_bind().dialect.name == "postgresql":
        session.exec(
            select(Device.id)
            .where(col(Device.id).in_(device_ids))
            .order_by(Device.id)
            .with_for_update()
        ).all()


def _epoch(moment: datetime | None) -> float | None:
    if moment is None:
        return None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


# -- pure mappings: what devices report -> the engine's inputs; its actions -> orders ----------
# The service feeds them from the database; simulators.scale feeds them from simulated devices.


def device_view(
    *,
    device_id: str,
    model: str,
    hardware_class: str | None,
    online: bool,
    group: str | None,
    pinned: Mapping[str, Any] | None,
    version: str | None,
    runtime: str | None,
    reported_at: datetime | None,
) -> DeviceView:
    """The engine's view of one device: its registry fields and its reported state of ``model``.

    ``version``, ``runtime`` and ``reported_at`` come from the device's latest state report for
    the model (all None when it never reported one); ``runtime`` is the agent's runtime key
    (``onnxruntime/CPUExecutionProvider``), of which the engine uses the family.
    """
    return DeviceView(
        device_id=device_id,
        hardware_class=hardware_class,
        runtime=(runtime or "").split("/")[0] or None,
        online=online,
        running_version=version,
        pinned_version=(pinned or {}).get(model),
        group=group,
        reported_at=_epoch(reported_at),
    )


class DeploymentReport(Protocol):
    """A deployment report as stored (``fleet.models.DeviceEvent``) or sent by a device."""

    @property
    def device_id(self) -> str: ...
    @property
    def model(self) -> str: ...
    @property
    def version(self) -> str: ...
    @property
    def phase(self) -> str: ...
    @property
    def failure_class(self) -> str | None: ...
    @property
    def detail(self) -> str | None: ...


def engine_event(report: DeploymentReport) -> EngineEvent:
    """A deployment report reduced to what the engine uses."""
    return EngineEvent(
        device_id=report.device_id,
        version=report.version,
        phase=report.phase,
        failure_class=report.failure_class,
        detail=report.detail,
        model=report.model,
    )


def telemetry_metrics(entry: object) -> DeviceMetrics | None:
    """One model's entry of a telemetry report (``Telemetry.models[model]``), or None if absent.

    >>> telemetry_metrics({"requests": 90, "errors": 1, "latency_ms": {"p95": 12.5}})
    DeviceMetrics(requests=90, errors=1, p95_ms=12.5)
    """
    if not isinstance(entry, dict):
        return None
    p95 = (entry.get("latency_ms") or {}).get("p95")
    return DeviceMetrics(
        requests=int(entry.get("requests", 0)),
        errors=int(entry.get("errors", 0)),
        p95_ms=float(p95) if p95 is not None else None,
    )


def order_version(action: Action) -> str | None:
    """The version a ``Dispatch`` or ``Revert`` orders its device to run; None for the rest."""
    if isinstance(action, Dispatch):
        return action.version
    if isinstance(action, Revert):
        return action.to_version
    return None


# -- what the scheduler reads at every tick ------------------------------------------------------

_DEVICES = Device.__table__.c  # type: ignore[attr-defined]
_MODELS = DeviceModel.__table__.c  # type: ignore[attr-defined]
_GROUP_PINS = GroupPin.__table__.c  # type: ignore[attr-defined]
_ROLLOUTS = RolloutRecord.__table__.c  # type: ignore[attr-defined]


class _Target(Protocol):
    """What selects a rollout's devices: a ``RolloutRecord`` or its row."""

    @property
    def model(self) -> str: ...
    @property
    def target(self) -> str: ...


# (id, hardware_class, online, group, pinned as JSON text, the group's pin, then the device's
# latest state report of the model: version, runtime, updated_at): plain values, compared as is
DeviceRow = tuple[Any, ...]


def _device_rows(session: Session, record: _Target) -> list[DeviceRow]:
    """One row per device that ``record``'s target selects, in one query (in no set order).

    The rows are the driver's own tuples, with the values as the database stores them (the
    pins as JSON text, the report time as SQLite's text or PostgreSQL's datetime): a tick reads
    and compares 10,000 of them in a few ms, half the time SQLAlchemy's result rows take.
    :func:`_view` decodes them.
    """
    selector = parse_target(record.target)
    joined = Device.__table__.outerjoin(  # type: ignore[attr-defined]
        DeviceModel.__table__,  # type: ignore[attr-defined]
        and_(_MODELS.device_id == _DEVICES.id, _MODELS.model == record.model),
    ).outerjoin(
        GroupPin.__table__,  # type: ignore[attr-defined]
        and_(
            _GROUP_PINS.group == func.coalesce(_DEVICES.group, ""),
            _GROUP_PINS.model == record.model,
        ),
    )
    query = core_select(
        _DEVICES.id,
        _DEVICES.hardware_class,
        _DEVICES.online,
        _DEVICES.group,
        cast(_DEVICES.pinned, Text),
        _GROUP_PINS.version,
        _MODELS.version,
        _MODELS.runtime,
        _MODELS.updated_at,
    ).select_from(joined)
    if "hardware_class" in selector:
        query = query.where(_DEVICES.hardware_class == selector["hardware_class"])
    if "group" in selector:
        query = query.where(_DEVICES.group == selector["group"])
    if "device" in selector:
        query = query.where(_DEVICES.id == selector["device"])
    connection = session.connection()
    compiled = query.compile(dialect=connection.dialect)
    params: Any = compiled.params
    if connection.dialect.positional:
        params = tuple(params[name] for name in compiled.positiontup or ())
    cursor = connection.connection.cursor()  # in the session's transaction
    try:
        cursor.execute(str(compiled), params)
        return [tuple(row) for row in cursor.fetchall()]
    finally:
        cursor.close()


def _stored_time(value: datetime | str | None) -> datetime | None:
    """A time column read without its type: SQLite gives text, PostgreSQL a datetime."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)  # stored as UTC without an offset


def _view(model: str, row: DeviceRow) -> DeviceView:
    device_id, hardware_class, online, group, pinned, group_pin, version, runtime, at = row
    own = json.loads(pinned).get(model) if pinned not in (None, "{}", "null") else None
    pin = own or group_pin  # a device's own pin wins over its group's
    return device_view(
        device_id=device_id,
        model=model,
        hardware_class=hardware_class,
        online=bool(online),
        group=group,
        pinned={model: pin} if pin else None,
        version=version,
        runtime=runtime,
        reported_at=_stored_time(at),
    )


@dataclass(eq=False)
class _Kept:
    """A rollout as the scheduler last stored it, and the inputs of its last step."""

    mark: tuple[str, int, float | None]  # status, last_event_id, updated_at as stored
    plan: Plan
    rollout: Rollout
    rows: list[DeviceRow] = field(default_factory=list)  # the target's devices
    views: list[DeviceView] = field(default_factory=list)  # built from ``rows``
    metrics_mark: tuple[int | None, dict[str, str]] | None = None
    metrics: dict[tuple[str, str], DeviceMetrics] = field(default_factory=dict)


@dataclass
class RolloutService:
    engine: Engine
    keys: KeyStore | None
    trust_root: bytes
    send: SendCommand | None = None

    def __post_init__(self) -> None:
        self._releases: dict[tuple[str, str], ReleaseInfo] = {}
        # One step at a time in this process: the scheduler thread and request handlers both step
        # rollouts, and SQLite has no row locks (on PostgreSQL, FOR UPDATE also covers replicas).
        self.stepping = threading.RLock()
        self._kept: dict[str, _Kept] = {}  # by rollout id; only the scheduler's steps use it

    # -- creation ------------------------------------------------------------------------------

    def create(
        self,
        session: Session,
        *,
        model: str,
        version: str,
        actor: str,
        target: str = "",
        options: RolloutOptions | None = None,
        plan: dict[str, Any] | None = None,
    ) -> RolloutRecord:
        """Store a new rollout (state pending); the next tick starts it.

        ``plan`` (an encoded plan, such as the console's preview returns) wins over ``options``;
        without either, the engine's own defaults apply (the API passes the fleet's).
        """
        self._check_release(session, model, version)
        busy = session.exec(
            select(RolloutRecord).where(
                RolloutRecord.model == model, col(RolloutRecord.status).in_(ACTIVE)
            )
        ).first()
        if busy is not None:
            raise UsageError(
                f"rollout {busy.id} of {model} is still {busy.status}; abort it or "
                "let it finish first (one active rollout per model)"
            )
        rollout_id = f"r-{uuid.uuid4().hex[:10]}"
        if plan is not None:  # a previewed plan: its cohorts, but what it replaces is now's
            parse_target(target)
            server_side = {
                "rollout_id": rollout_id,
                "model": model,
                "version": version,
                "previous_version": self._previous_version(session, model, version),
            }
            try:
                engine_plan = decode_plan({**plan, **server_side})
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                raise UsageError(
                    f"the plan is not one the preview made ({type(e).__name__}: {e}); "
                    "preview again, or send the options instead of a plan"
                ) from e
        else:
            engine_plan = self.build_plan(
                session,
                rollout_id=rollout_id,
                model=model,
                version=version,
                target=target,
                options=options or RolloutOptions(),
            )
        now = crud.now_utc()
        record = RolloutRecord(
            id=rollout_id,
            model=model,
            version=version,
            target=target,
            status="pending",
            plan=encode_plan(engine_plan),
            state=encode_rollout(Rollout()),
            created_at=now,
            created_by=actor,
            updated_at=now,
            last_event_id=self._last_event_id(session),
        )
        session.add(record)
        crud.append_audit(
            session,
            actor=actor,
            action="rollout.create",
            target=rollout_id,
            details={
                "model": model,
                "version": version,
                "target": target,
                "stages": [s.percent for s in engine_plan.stages],
            },
        )
        return record

    @staticmethod
    def _last_event_id(session: Session) -> int:
        last = session.exec(
            select(DeviceEvent).order_by(col(DeviceEvent.id).desc()).limit(1)
        ).first()
        return last.id or 0 if last else 0

    def build_plan(
        self,
        session: Session,
        *,
        rollout_id: str,
        model: str,
        version: str,
        target: str = "",
        options: RolloutOptions,
    ) -> Plan:
        """The engine's plan of ``options`` for this release (what :meth:`create` stores; the
        console's preview shows it before anything is stored).

        Raises:
            UsageError: no such release, a bad target selector or a bad plan value.
        """
        self._check_release(session, model, version)
        parse_target(target)
        try:
            return options.engine_plan(
                rollout_id=rollout_id,
                model=model,
                version=version,
                previous_version=self._previous_version(session, model, version),
                salt=secrets.token_hex(8),
            )
        except (ValueError, TypeError) as e:
            raise UsageError(str(e)) from e

    @staticmethod
    def _check_release(session: Session, model: str, version: str) -> None:
        release = session.exec(
            select(Release.id).where(Release.name == model, Release.version == version)
        ).first()
        if release is None:
            raise UsageError(f"no published release {model} {version}; publish it first")

    @staticmethod
    def _previous_version(session: Session, model: str, version: str) -> str | None:
        """The version most devices run now other than ``version``: what a revert goes back to."""
        row = session.exec(
            select(DeviceModel.version, func.count().label("n"))
            .where(
                DeviceModel.model == model,
                col(DeviceModel.version).is_not(None),
                DeviceModel.version != version,
            )
            .group_by(col(DeviceModel.version))
            .order_by(func.count().desc(), col(DeviceModel.version))
            .limit(1)
        ).first()
        return row[0] if row else None

    # -- inputs --------------------------------------------------------------------------------

    def devices(self, session: Session, record: RolloutRecord) -> list[DeviceView]:
        """The engine's view of every device that ``record``'s target selects."""
        return [_view(record.model, row) for row in _device_rows(session, record)]

    def _kept_views(self, session: Session, kept: _Kept, record: _Target) -> list[DeviceView]:
        """:meth:`devices`, building views only for the devices whose rows changed."""
        rows = _device_rows(session, record)
        if rows == kept.rows:
            return kept.views
        old = {row[0]: (row, view) for row, view in zip(kept.rows, kept.views, strict=True)}
        views = []
        for row in rows:
            seen = old.get(row[0])
            views.append(
                seen[1] if seen is not None and seen[0] == row else _view(record.model, row)
            )
        kept.rows, kept.views = rows, views
        return views

    @staticmethod
    def _events(session: Session, model: str, after: int) -> tuple[list[EngineEvent], int]:
        """The deployment reports for ``model`` stored after event id ``after``, and the last id."""
        rows = list(
            session.exec(
                select(DeviceEvent)
                .where(col(DeviceEvent.id) > after, DeviceEvent.model == model)
                .order_by(col(DeviceEvent.id))
            )
        )
        events = [engine_event(r) for r in rows]
        last = max((r.id or 0 for r in rows), default=after)
        return events, last

    def _metrics(
        self, session: Session, model: str, views: list[DeviceView], kept: _Kept | None = None
    ) -> dict[tuple[str, str], DeviceMetrics]:
        """Each device's latest telemetry for the model, keyed by the version it measured.

        One query over the latest sample per device. Agents name the version their figures are
        for; an older agent's figures count for the version the device runs. With ``kept``, the
        figures are read again only when a sample arrived or a device runs another version.
        """
        running = {v.device_id: v.running_version for v in views if v.running_version}
        if not running:
            return {}
        if kept is not None:
            newest = session.exec(select(func.max(TelemetrySample.id))).one()
            if kept.metrics_mark == (newest, running):
                return kept.metrics
        latest = (
            select(TelemetrySample.device_id, func.max(TelemetrySample.seq).label("seq"))
            .where(col(TelemetrySample.device_id).in_(list(running)))
            .group_by(col(TelemetrySample.device_id))
            .subquery()
        )
        rows = session.exec(
            select(TelemetrySample.device_id, TelemetrySample.models).join(
                latest,
                (col(TelemetrySample.device_id) == latest.c.device_id)
                & (col(TelemetrySample.seq) == latest.c.seq),
            )
        )
        metrics = {}
        for device_id, models in rows:
            entry = models.get(model) if isinstance(models, dict) else None
            figures = telemetry_metrics(entry)
            if figures is not None and isinstance(entry, dict):
                version = entry.get("version") or running[device_id]
                metrics[(device_id, str(version))] = figures
        if kept is not None:
            kept.metrics_mark, kept.metrics = (newest, running), metrics
        return metrics

    # -- stepping ------------------------------------------------------------------------------

    def tick(self, now: datetime | None = None) -> int:
        """Step every active rollout once; return how many were stepped.

        An unchanged tick is cheap: the service keeps each rollout's decoded state and device
        views between ticks (:class:`_Kept`), reads the device rows again but builds views only
        for the rows that changed, reads telemetry only when a sample arrived, and stores the
        state only when the step changed it. The engine itself runs at every tick, so its timers
        (time-outs, retries, soaks, maintenance windows) fire as before.
        """
        now = now or crud.now_utc()
        stepped = 0
        with Session(self.engine) as session:
            ids = list(
                session.exec(select(RolloutRecord.id).where(col(RolloutRecord.status).in_(ACTIVE)))
            )
            ids += self._converging(session)
        for rollout_id in ids:
            with self.stepping, Session(self.engine) as session:
                if self._step_kept(session, rollout_id, now):
                    session.commit()
                    stepped += 1
        with self.stepping:
            for gone in self._kept.keys() - set(ids):  # finished, aborted or superseded
                del self._kept[gone]
        return stepped

    @staticmethod
    def _converging(session: Session) -> list[str]:
        """Completed rollouts that still bring late devices up to date (the engine's Rule 8):
        for each model, the newest rollout when it is completed. A newer rollout of the model,
        whatever its state, supersedes it."""
        newest: dict[str, tuple[str, str]] = {}
        rows = session.exec(
            select(RolloutRecord.model, RolloutRecord.id, RolloutRecord.status).order_by(
                col(RolloutRecord.created_at)
            )
        )
        for model, rollout_id, status in rows:
            newest[model] = (rollout_id, status)
        return [rollout_id for rollout_id, status in newest.values() if status == "completed"]

    @staticmethod
    def _lock(session: Session, rollout_id: str, *, wait: bool = False) -> RolloutRecord | None:
        """The rollout's row, locked on PostgreSQL until the session ends; None if missing or
        (without ``wait``) locked by another replica, which is stepping it."""
        query = select(RolloutRecord).where(RolloutRecord.id == rollout_id)
        if session.get_bind().dialect.name == "postgresql":
            query = query.with_for_update(skip_locked=not wait)
        return session.exec(query).first()

    def _step(self, session: Session, record: RolloutRecord, now: datetime) -> None:
        """Step ``record`` from what is stored (after an operator's action)."""
        self._kept.pop(record.id, None)
        plan = decode_plan(record.plan)
        views = self.devices(session, record)
        events, last_event = self._events(session, record.model, record.last_event_id)
        result = step(
            plan,
            decode_rollout(record.state),
            devices=views,
            events=events,
            metrics=self._metrics(session, record.model, views),
            now=now.timestamp(),
        )
        self._execute(session, record.id, plan, result.actions)
        record.state = encode_rollout(result.rollout)
        record.status = result.rollout.state.value
        record.last_event_id = last_event
        record.updated_at = now

    def _step_kept(self, session: Session, rollout_id: str, now: datetime) -> bool:
        """One scheduled step of ``rollout_id`` from the state kept since the last one; False
        if the rollout is gone or (on PostgreSQL) another replica is stepping it.

        The kept state is used only while the row's status, last event id and ``updated_at``
        are the ones this service stored; any other writer (an operator's action, another
        replica) changes ``updated_at``, and the state is then decoded again.
        """
        query = core_select(
            _ROLLOUTS.model,
            _ROLLOUTS.target,
            _ROLLOUTS.status,
            _ROLLOUTS.last_event_id,
            _ROLLOUTS.updated_at,
        ).where(_ROLLOUTS.id == rollout_id)
        if session.get_bind().dialect.name == "postgresql":
            query = query.with_for_update(skip_locked=True)
        row = session.connection().execute(query).first()
        if row is None:
            return False
        mark = (row.status, row.last_event_id, _epoch(row.updated_at))
        kept = self._kept.get(rollout_id)
        if kept is None or kept.mark != mark:
            plan, state = (
                session.connection()
                .execute(
                    core_select(_ROLLOUTS.plan, _ROLLOUTS.state).where(_ROLLOUTS.id == rollout_id)
                )
                .one()
            )
            kept = self._kept[rollout_id] = _Kept(mark, decode_plan(plan), decode_rollout(state))
        views = self._kept_views(session, kept, row)
        events, last_event = self._events(session, row.model, row.last_event_id)
        result = step(
            kept.plan,
            kept.rollout,
            devices=views,
            events=events,
            metrics=self._metrics(session, row.model, views, kept),
            now=now.timestamp(),
        )
        unchanged = result.rollout == kept.rollout and last_event == row.last_event_id
        if unchanged and not result.actions:
            return True  # nothing to store: the usual tick while devices are busy or silent
        self._execute(session, rollout_id, kept.plan, result.actions)
        status = result.rollout.state.value
        session.connection().execute(
            update(RolloutRecord)
            .where(_ROLLOUTS.id == rollout_id)
            .values(
                state=encode_rollout(result.rollout),
                status=status,
                last_event_id=last_event,
                updated_at=now,
            )
        )
        kept.mark, kept.rollout = (status, last_event, _epoch(now)), result.rollout
        return True

    def _execute(
        self, session: Session, rollout_id: str, plan: Plan, actions: tuple[Any, ...]
    ) -> None:
        _lock_devices(session, {a.device_id for a in actions if order_version(a) is not None})
        for action in actions:
            version = order_version(action)
            if version is not None:
                self._order(session, action.device_id, plan.model, version)
            elif isinstance(action, GateDecision):
                crud.append_audit(
                    session,
                    actor="gate",
                    action=f"gate.{action.verdict}",
                    target=rollout_id,
                    details={
                        "stage": action.stage,
                        "reason": action.reason,
                        "figures": dict(action.figures),
                        "by": action.by,
                    },
                )
            elif isinstance(action, StateChanged) and action.old is not action.new:
                crud.append_audit(
                    session,
                    actor="engine",
                    action="rollout.state",
                    target=rollout_id,
                    details={
                        "from": action.old.value,
                        "to": action.new.value,
                        "stage": action.stage,
                        "reason": action.reason,
                    },
                )

    def _release_info(self, session: Session, model: str, version: str) -> ReleaseInfo:
        key = (model, version)
        if key not in self._releases:
            release = session.exec(
                select(Release).where(Release.name == model, Release.version == version)
            ).one()
            self._releases[key] = verify_release(
                inspect_bundle(Path(release.path)), self.trust_root
            )
        return self._releases[key]

    def _order(self, session: Session, device_id: str, model: str, version: str) -> None:
        """Sign and send a director order for ``device_id`` to run ``model`` ``version``."""
        if self.keys is None or self.send is None:
            logger.warning(
                "cannot order %s to %s %s: no director key or no broker", device_id, model, version
            )
            return
        device = session.get(Device, device_id)
        if device is None:
            return
        device.order_sequence += 1
        order = sign_deployment(
            self.keys,
            device_id=device_id,
            release=self._release_info(session, model, version),
            sequence=device.order_sequence,
            expires=crud.now_utc() + timedelta(hours=24),
        )
        command = Command(
            id=uuid.uuid4().hex,
            type="deploy",
            issued_at=crud.now_utc(),
            order=order.decode(),
            model=model,
        )
        session.flush()
        self.send(device_id, command.model_dump_json().encode())

    # -- operators -----------------------------------------------------------------------------

    def act(
        self, session: Session, rollout_id: str, action: str, *, actor: str, revert: bool = False
    ) -> RolloutRecord:
        """Apply an operator action, then step at once (a revert never waits).

        Call it holding :attr:`stepping` until the session commits.
        """
        record = self._lock(session, rollout_id, wait=True)
        if record is None:
            raise UsageError(f"no rollout {rollout_id!r}")
        if action != "abort" and action not in OPERATOR_ACTIONS:
            raise UsageError(
                f"action must be abort or one of {', '.join(OPERATOR_ACTIONS)}, got {action!r}"
            )
        operator = Abort(revert=revert) if action == "abort" else OPERATOR_ACTIONS[action]()
        now = crud.now_utc()
        plan = decode_plan(record.plan)
        result = apply_operator(plan, decode_rollout(record.state), operator, now=now.timestamp())
        self._execute(session, record.id, plan, result.actions)
        record.state = encode_rollout(result.rollout)
        record.status = result.rollout.state.value
        crud.append_audit(
            session,
            actor=actor,
            action=f"rollout.{action}",
            target=rollout_id,
            details={"revert": revert} if action == "abort" else {},
        )
        self._step(session, record, now)
        return record

    def status(self, session: Session, record: RolloutRecord) -> dict[str, Any]:
        """The status document of ``edgefleet rollout status --json``."""
        plan = decode_plan(record.plan)
        rollout = decode_rollout(record.state)
        counts = dict.fromkeys(("pending", "in_progress", "succeeded", "failed", "reverted"), 0)
        per_stage: list[dict[str, int]] = [dict(counts) for _ in plan.stages]
        failures: dict[str, int] = {}
        for progress in rollout.progress.values():
            state = progress.state.value
            key = {"reverting": "reverted", "skipped": "pending"}.get(state, state)
            counts[key] += 1
            per_stage[min(progress.stage, len(per_stage) - 1)][key] += 1
            if state == "failed" and progress.failure_class:
                label = f"{progress.failure_class}|{progress.hardware_class}|{progress.runtime}"
                failures[label] = failures.get(label, 0) + 1
        decided = {d.stage: d.verdict for d in rollout.decisions}
        stages = []
        for index, stage in enumerate(plan.stages):
            if index in decided:
                state = {"pass": "passed", "fail": "failed"}.get(decided[index], "inconclusive")
            elif index == rollout.stage and rollout.state.value in ("running", "paused"):
                state = "running"
            else:
                state = "pending" if index > rollout.stage else "passed"
            stages.append(
                {
                    "index": index,
                    "percent": stage.percent,
                    "state": state,
                    "devices": sum(per_stage[index].values()),
                    "counts": per_stage[index],
                }
            )
        return {
            "id": record.id,
            "model": record.model,
            "version": record.version,
            "previous_version": plan.previous_version,
            "state": record.status,
            "target": record.target,
            "stage": rollout.stage,
            "stages": stages,
            "devices": counts,
            "failures": failures,
            "decisions": [
                {
                    "stage": d.stage,
                    "verdict": d.verdict,
                    "reason": d.reason,
                    "figures": dict(d.figures),
                    "by": d.by,
                }
                for d in rollout.decisions
            ],
            "created_at": record.created_at.isoformat(),
            "created_by": record.created_by,
        }

    def preview(self, session: Session, record: RolloutRecord) -> dict[str, Any]:
        """Stage membership per hardware class and the worst-case blast radius."""
        p = preview(decode_plan(record.plan), self.devices(session, record))
        return {
            "stage_sizes": list(p.stage_sizes),
            "cumulative": list(p.cumulative),
            "by_hardware_class": {k: list(v) for k, v in p.by_hardware_class.items()},
            "blast_radius": p.blast_radius,
            "skipped": p.skipped,
            "already_running": p.already_running,
            "offline": p.offline,
            "warnings": list(p.warnings),
        }
