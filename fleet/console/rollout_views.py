"""Rollouts as the console shows them: summaries, the rollout page, and a dry-run preview.

- :meth:`RolloutViews.summaries` — each rollout's state and progress counts (the overview and
  the rollouts list), recomputed only when the rollout's stored state changed;
- :meth:`RolloutViews.detail` — the rollout page: stages with their soak, every gate decision
  with its figures, failures grouped by failure class x hardware class x runtime, the failed
  devices with the detail they reported, and the operator actions the current state allows;
- :meth:`RolloutViews.dry_run` — what a plan would do before anything is stored: stage
  membership per hardware class and the worst-case blast radius, from the same engine and the
  same device selection as the real rollout. It returns the plan it previewed (with its salt);
  creating the rollout with that plan gives exactly the previewed cohorts.

Counts and figures come from :meth:`fleet.rollout_service.RolloutService.status`, so the console
and ``edgefleet rollout status`` never disagree.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from sqlmodel import Session, col, select

from fleet import crud
from fleet.models import RolloutRecord
from fleet.rollout_codec import decode_plan, decode_rollout, encode_plan
from fleet.rollout_options import RolloutOptions
from fleet.rollout_service import ACTIVE, RolloutService
from fleet.rollouts import TRANSITIONS, DeviceState, Gates, RolloutState, preview

__all__ = ["FAILED_DEVICES_SHOWN", "RolloutViews", "allowed_actions"]

FAILED_DEVICES_SHOWN = 50
# engine trigger -> the API's action name (``POST /api/v1/rollouts/{id}/{action}``)
_ACTION_OF_TRIGGER = {
    "pause": "pause",
    "resume": "resume",
    "promote": "promote",
    "promote_last": "promote",
    "abort": "abort",
    "retry_failed": "retry-failed",
}
_ACTION_ORDER = ("pause", "resume", "promote", "retry-failed", "abort")


def allowed_actions(status: str) -> list[str]:
    """The operator actions the engine accepts in rollout state ``status`` (its table)."""
    triggers = TRANSITIONS.get(RolloutState(status), {})
    names = {_ACTION_OF_TRIGGER[t] for t in triggers if t in _ACTION_OF_TRIGGER}
    return [a for a in _ACTION_ORDER if a in names]


def _iso_epoch(seconds: float | None) -> str | None:
    return None if seconds is None else datetime.fromtimestamp(seconds, UTC).isoformat()


class RolloutViews:
    """Reads rollouts for the console through the service that steps them."""

    def __init__(self, service: RolloutService) -> None:
        self.service = service
        self._summaries: dict[str, tuple[tuple[str, datetime], dict[str, Any]]] = {}

    # -- summaries -------------------------------------------------------------------------------

    def summaries(
        self, session: Session, *, active_only: bool = False, limit: int = 100
    ) -> list[dict[str, Any]]:
        """The newest ``limit`` rollouts' summaries (only the active ones if ``active_only``).

        A summary is recomputed only when the rollout's stored state changed, which moves its
        ``updated_at`` (the scheduler stores a state only when a step changed it). A
        10,000-device state is about 1.3 MB of JSON: decoding it and counting its devices
        costs about 100 ms, so the overview and its live feed read only the small columns.
        """
        rollouts = RolloutRecord.__table__.c  # type: ignore[attr-defined]
        query = (
            select(rollouts.id, rollouts.status, rollouts.updated_at)
            .order_by(rollouts.created_at.desc())
            .limit(limit)
        )
        if active_only:
            query = query.where(rollouts.status.in_(ACTIVE))
        shown = []
        for rollout_id, status, updated_at in session.connection().execute(query):
            key = (status, updated_at)
            cached = self._summaries.get(rollout_id)
            if cached is None or cached[0] != key:
                record = session.get(RolloutRecord, rollout_id)
                if record is None:  # deleted since the query above
                    continue
                cached = (key, self._summary(session, record))
                if len(self._summaries) > 1000:  # old rollouts drop out; cheap to recompute
                    self._summaries.clear()
                self._summaries[rollout_id] = cached
            shown.append(cached[1])
        return shown

    def _summary(self, session: Session, record: RolloutRecord) -> dict[str, Any]:
        """State, stage and device counts."""
        status = self.service.status(session, record)
        summary = {
            name: status[name]
            for name in ("id", "model", "version", "state", "target", "stage", "devices")
        }
        summary["stages"] = [
            {k: s[k] for k in ("index", "percent", "state", "devices", "counts")}
            for s in status["stages"]
        ]
        summary["created_at"] = status["created_at"]
        summary["created_by"] = status["created_by"]
        return summary

    # -- the rollout page ------------------------------------------------------------------------

    def detail(self, session: Session, record: RolloutRecord) -> dict[str, Any]:
        """Everything the rollout page shows (see the module docstring)."""
        status = self.service.status(session, record)
        plan = decode_plan(record.plan)
        rollout = decode_rollout(record.state)
        for stage, spec in zip(status["stages"], plan.stages, strict=True):
            stage["soak_s"] = spec.soak_s
            stage["count"] = spec.count
        decisions = status["decisions"]
        for shown, decision in zip(decisions, rollout.decisions, strict=True):
            shown["at"] = _iso_epoch(decision.at)
        failed = sorted(
            (
                (device_id, p)
                for device_id, p in rollout.progress.items()
                if p.state is DeviceState.FAILED
            ),
            key=lambda item: -item[1].updated_at,
        )
        return {
            **status,
            "failures": _group_failures(status["failures"]),
            "failed_devices": [
                {
                    "device_id": device_id,
                    "failure_class": p.failure_class,
                    "hardware_class": p.hardware_class,
                    "runtime": p.runtime,
                    "attempts": p.attempts,
                    "stage": p.stage,
                    "detail": p.note,
                    "at": _iso_epoch(p.updated_at),
                }
                for device_id, p in failed[:FAILED_DEVICES_SHOWN]
            ],
            "failed_devices_total": len(failed),
            "reverting": rollout.reverting,
            "stage_started_at": _iso_epoch(rollout.stage_started_at),
            "plan": {
                "gates": _gates(plan.gates),
                "max_in_flight": plan.max_in_flight,
                "revert_on_fail": plan.revert_on_fail,
                "device_timeout_s": plan.device_timeout_s,
            },
            "actions": allowed_actions(record.status),
        }

    # -- dry-run preview -------------------------------------------------------------------------

    def dry_run(
        self,
        session: Session,
        *,
        model: str,
        version: str,
        target: str = "",
        options: RolloutOptions,
    ) -> dict[str, Any]:
        """Preview a plan built as :meth:`RolloutService.create` builds it, storing nothing.

        Raises:
            UsageError: no such release, a bad target selector or a bad plan value.
        """
        plan = self.service.build_plan(
            session,
            rollout_id="preview",
            model=model,
            version=version,
            target=target,
            options=options,
        )
        previous = plan.previous_version
        now = crud.now_utc()
        draft = RolloutRecord(  # never added to the session: only its model and target are read
            id="preview",
            model=model,
            version=version,
            target=target,
            status="pending",
            plan={},
            state={},
            created_at=now,
            created_by="preview",
            updated_at=now,
        )
        views = self.service.devices(session, draft)
        p = preview(plan, views)
        encoded = encode_plan(plan)
        for name in ("rollout_id", "model", "version"):  # set by the server on creation
            encoded.pop(name)
        return {
            "model": model,
            "version": version,
            "target": target,
            "previous_version": previous,
            "target_devices": len(views),
            "stages": [s.percent for s in plan.stages],
            "stage_sizes": list(p.stage_sizes),
            "cumulative": list(p.cumulative),
            "by_hardware_class": {k: list(v) for k, v in p.by_hardware_class.items()},
            "by_stratum": {k: list(v) for k, v in p.by_stratum.items()},
            "blast_radius": p.blast_radius,
            "newcomer_stage0_share": p.newcomer_stage0_share,
            "skipped": p.skipped,
            "already_running": p.already_running,
            "offline": p.offline,
            "warnings": list(p.warnings),
            "conflict": _conflict(session, model),
            "plan": encoded,
        }


def _gates(gates: Gates) -> dict[str, Any]:
    return {
        "min_install_success": gates.min_install_success,
        "max_crash_rate": gates.max_crash_rate,
        "max_error_rate": gates.max_error_rate,
        "max_p95_ratio": gates.max_p95_ratio,
        "min_sample": gates.min_sample,
    }


def _group_failures(failures: Mapping[str, int]) -> list[dict[str, Any]]:
    """``{"class|hardware|runtime": n}`` -> rows, most devices first."""
    rows = []
    for label, n in failures.items():
        failure_class, hardware_class, runtime = [*label.split("|"), "", ""][:3]
        rows.append(
            {
                "failure_class": failure_class,
                "hardware_class": hardware_class,
                "runtime": runtime,
                "devices": n,
            }
        )
    return sorted(rows, key=lambda r: (-r["devices"], r["failure_class"]))


def _conflict(session: Session, model: str) -> str | None:
    """Why a rollout of ``model`` cannot start now (one active rollout per model), or None."""
    busy = session.exec(
        select(RolloutRecord).where(
            RolloutRecord.model == model, col(RolloutRecord.status).in_(ACTIVE)
        )
    ).first()
    if busy is None:
        return None
    return (
        f"rollout {busy.id} of {model} is still {busy.status}; abort it or let it finish first "
        "(one active rollout per model)"
    )
