"""JSON encoding of the rollout engine's plans and states, for the database.

Plain data only (no pickle): what is stored can be read by any tool and can never run code when
it is loaded. Round trips are exact: ``decode_rollout(encode_rollout(r)) == r``.
"""

from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import Any

from fleet.rollouts import (
    DeviceProgress,
    DeviceState,
    GateDecision,
    Gates,
    MaintenanceWindow,
    Plan,
    RetryPolicy,
    Rollout,
    RolloutState,
    Stage,
)

__all__ = ["decode_plan", "decode_rollout", "encode_plan", "encode_rollout"]


def encode_plan(plan: Plan) -> dict[str, Any]:
    return {
        "rollout_id": plan.rollout_id,
        "model": plan.model,
        "version": plan.version,
        "previous_version": plan.previous_version,
        "stages": [dataclasses.asdict(s) for s in plan.stages],
        "salt": plan.salt,
        "max_in_flight": plan.max_in_flight,
        "max_in_flight_per_group": plan.max_in_flight_per_group,
        "gates": dataclasses.asdict(plan.gates),
        "revert_on_fail": plan.revert_on_fail,
        "windows": [
            {"days": sorted(w.days), "start_minute": w.start_minute, "duration_min": w.duration_min}
            for w in plan.windows
        ],
        "device_timeout_s": plan.device_timeout_s,
        "retries": {k: dataclasses.asdict(v) for k, v in plan.retries.items()},
    }


def decode_plan(data: dict[str, Any]) -> Plan:
    return Plan(
        rollout_id=data["rollout_id"],
        model=data["model"],
        version=data["version"],
        previous_version=data["previous_version"],
        stages=tuple(Stage(**s) for s in data["stages"]),
        salt=data["salt"],
        max_in_flight=data["max_in_flight"],
        max_in_flight_per_group=data["max_in_flight_per_group"],
        gates=Gates(**data["gates"]),
        revert_on_fail=data["revert_on_fail"],
        windows=tuple(
            MaintenanceWindow(
                days=frozenset(w["days"]),
                start_minute=w["start_minute"],
                duration_min=w["duration_min"],
            )
            for w in data["windows"]
        ),
        device_timeout_s=data["device_timeout_s"],
        retries={k: RetryPolicy(**v) for k, v in data["retries"].items()},
    )


def _encode_progress(p: DeviceProgress) -> list[Any]:
    return [
        p.state.value,
        p.stage,
        p.position,
        p.hardware_class,
        p.runtime,
        p.attempts,
        p.failure_class,
        p.updated_at,
        p.next_retry_at,
        p.from_version,
        p.ran_new,
        p.note,
    ]


def _decode_progress(v: list[Any]) -> DeviceProgress:
    return DeviceProgress(
        state=DeviceState(v[0]),
        stage=v[1],
        position=v[2],
        hardware_class=v[3],
        runtime=v[4],
        attempts=v[5],
        failure_class=v[6],
        updated_at=v[7],
        next_retry_at=v[8],
        from_version=v[9],
        ran_new=v[10],
        note=v[11],
    )


def encode_rollout(rollout: Rollout) -> dict[str, Any]:
    return {
        "state": rollout.state.value,
        "stage": rollout.stage,
        "stage_started_at": rollout.stage_started_at,
        "reverting": rollout.reverting,
        "thresholds": list(rollout.thresholds),
        "started_at": rollout.started_at,
        "decisions": [
            {
                "stage": d.stage,
                "verdict": d.verdict,
                "figures": dict(d.figures),
                "reason": d.reason,
                "at": d.at,
                "by": d.by,
            }
            for d in rollout.decisions
        ],
        "progress": {k: _encode_progress(p) for k, p in rollout.progress.items()},
    }


def decode_rollout(data: dict[str, Any]) -> Rollout:
    return Rollout(
        state=RolloutState(data["state"]),
        stage=data["stage"],
        stage_started_at=data["stage_started_at"],
        reverting=data["reverting"],
        thresholds=tuple(data["thresholds"]),
        started_at=data["started_at"],
        decisions=tuple(
            GateDecision(
                stage=d["stage"],
                verdict=d["verdict"],
                figures=d["figures"],
                reason=d["reason"],
                at=d["at"],
                by=d["by"],
            )
            for d in data["decisions"]
        ),
        progress=MappingProxyType({k: _decode_progress(v) for k, v in data["progress"].items()}),
    )
