"""Pure selection logic: judge trial measurements against the accuracy budget and rank them.

No I/O, no clock, no runtime imports: measurements in, a :class:`Decision` out.

Rules:

1. A candidate whose trial failed (load or inference error, crash, timeout) is rejected with that
   reason.
2. With test vectors, a candidate whose largest output error exceeds the budget is rejected. The
   budget is the bundle's ``accuracy_budget`` when it has one, else a default for the candidate's
   compute precision (:data:`DEFAULT_MAX_ABS_ERR`).
3. Without test vectors, candidates are ranked by speed alone and the decision says correctness
   was not checked.
4. Accepted candidates are ranked by the objective: median latency (``latency``), 99th percentile
   latency (``p99``) or items per second (``throughput``); ties go to the earlier candidate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

from agent.runtimes.base import Candidate, RuntimeLoadError
from agent.runtimes.trial import Measurement

if TYPE_CHECKING:
    from shared.manifest import AccuracyBudget

__all__ = [
    "DEFAULT_MAX_ABS_ERR",
    "OBJECTIVES",
    "Decision",
    "NoRuntimeError",
    "Objective",
    "TrialResult",
    "decide",
    "judge",
]

Objective = Literal["latency", "p99", "throughput"]
OBJECTIVES: tuple[Objective, ...] = ("latency", "p99", "throughput")
# Largest absolute output error accepted when the bundle states no budget, by compute precision.
DEFAULT_MAX_ABS_ERR = {
    "f32": 1e-4,
    "fp32": 1e-4,
    "f16": 1e-2,
    "fp16": 1e-2,
    "bf16": 5e-2,
    "int8": 1e-1,
    "mixed": 5e-2,
}


class NoRuntimeError(RuntimeLoadError):
    """No candidate can run the model on this device; the message lists every reason."""

    default_check = "no-runtime"


@dataclass(frozen=True)
class TrialResult:
    """A candidate with its measurement and the verdict on it."""

    candidate: Candidate
    measurement: Measurement
    accepted: bool
    reason: str

    def to_dict(self) -> dict[str, Any]:
        m = self.measurement
        return {
            **self.candidate.to_dict(),
            "key": self.candidate.key,
            "load_ms": m.load_ms,
            "p50_ms": m.p50_ms,
            "p99_ms": m.p99_ms,
            "throughput_ips": m.throughput_ips,
            "max_abs_err": m.max_abs_err,
            "max_rel_err": m.max_rel_err,
            "cases": m.cases,
            "error": m.error,
            "accepted": self.accepted,
            "reason": self.reason,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrialResult:
        fields = (
            "load_ms",
            "p50_ms",
            "p99_ms",
            "throughput_ips",
            "max_abs_err",
            "max_rel_err",
            "error",
        )
        return cls(
            candidate=Candidate.from_dict(data),
            measurement=Measurement(
                **{f: data.get(f) for f in fields}, cases=int(data.get("cases", 0))
            ),
            accepted=bool(data["accepted"]),
            reason=str(data["reason"]),
        )


def judge(
    candidate: Candidate, measurement: Measurement, budget: AccuracyBudget | None
) -> TrialResult:
    """Accept or reject one measured candidate (rules 1-3)."""
    if measurement.error is not None:
        return TrialResult(candidate, measurement, False, measurement.error)
    if measurement.max_abs_err is None:
        return TrialResult(
            candidate, measurement, True, "accepted (correctness not checked: no test vectors)"
        )
    max_abs = budget.max_abs_err if budget and budget.max_abs_err else None
    max_rel = budget.max_rel_err if budget and budget.max_rel_err else None
    source = "bundle budget"
    if max_abs is None and max_rel is None:
        max_abs = DEFAULT_MAX_ABS_ERR.get(candidate.precision, 1e-4)
        source = f"default for {candidate.precision}"
    if max_abs is not None and measurement.max_abs_err > max_abs:
        return TrialResult(
            candidate,
            measurement,
            False,
            f"max abs error {measurement.max_abs_err:.3g} exceeds {max_abs:.3g} ({source})",
        )
    rel = measurement.max_rel_err
    if max_rel is not None and rel is not None and rel > max_rel:
        return TrialResult(
            candidate,
            measurement,
            False,
            f"max relative error {rel:.3g} exceeds {max_rel:.3g} ({source})",
        )
    return TrialResult(candidate, measurement, True, f"accepted (within {source})")


def _score(result: TrialResult, objective: Objective) -> float:
    m = result.measurement
    if objective == "throughput":
        ips = m.throughput_ips or (1000.0 / m.p50_ms if m.p50_ms else 0.0)
        return -ips
    value = m.p99_ms if objective == "p99" else m.p50_ms
    return value if value is not None else float("inf")


@dataclass(frozen=True)
class Decision:
    """The ranking of accepted candidates (best first) and every result, for one objective."""

    model: str
    objective: Objective
    results: tuple[TrialResult, ...]
    ranking: tuple[TrialResult, ...]
    correctness_checked: bool

    @property
    def selected(self) -> TrialResult:
        return self.ranking[0]

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "objective": self.objective,
            "correctness_checked": self.correctness_checked,
            "candidates": [r.to_dict() for r in self.results],
            "ranking": [r.candidate.key for r in self.ranking],
            "selected": self.selected.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Decision:
        results = tuple(TrialResult.from_dict(r) for r in data["candidates"])
        by_key = {r.candidate.key: r for r in results}
        return cls(
            model=str(data["model"]),
            objective=data["objective"],
            results=results,
            ranking=tuple(by_key[k] for k in data["ranking"]),
            correctness_checked=bool(data["correctness_checked"]),
        )

    def without(self, key: str, reason: str) -> Decision:
        """This decision with one candidate moved out of the ranking (run-time fallback)."""
        results = tuple(
            replace(r, accepted=False, reason=reason) if r.candidate.key == key else r
            for r in self.results
        )
        return replace(
            self, results=results, ranking=tuple(r for r in self.ranking if r.candidate.key != key)
        )


def decide(model: str, results: Sequence[TrialResult], objective: Objective) -> Decision:
    """Rank the accepted results by ``objective`` (rule 4).

    Raises:
        NoRuntimeError: nothing was accepted; the message lists each candidate and why.
    """
    accepted = [r for r in results if r.accepted]
    if not accepted:
        lines = "; ".join(f"{r.candidate.key}: {r.reason}" for r in results) or (
            "no candidate at all (no installed runtime reads any of the bundle's formats)"
        )
        raise NoRuntimeError(f"no runtime on this device can run {model}: {lines}")
    order = sorted(range(len(accepted)), key=lambda i: (_score(accepted[i], objective), i))
    return Decision(
        model=model,
        objective=objective,
        results=tuple(results),
        ranking=tuple(accepted[i] for i in order),
        correctness_checked=any(r.measurement.max_abs_err is not None for r in accepted),
    )
