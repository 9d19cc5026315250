"""Probe a bundle on this device: plan candidates, try each in isolation, decide, remember.

This is the I/O side of runtime selection (processes, files); the decisions themselves are made
by the pure :mod:`agent.runtimes.selection`. Steps:

1. Key the decision cache with the bundle digest, installed runtime versions (from package
   metadata), the hardware fingerprint and the objective; a hit returns at once.
2. Ask each installed runtime, in its own worker process, for its version and devices.
3. Plan candidates: artifact format x runtime x device x settings, dropping the impossible (a
   format no installed runtime reads, a runtime that is not installed) with the reason.
4. Try each candidate in its runtime's worker with a time limit; judge and rank; cache.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.runtimes.base import Candidate, RuntimeStatus
from agent.runtimes.cache import DecisionCache, cache_key
from agent.runtimes.inventory import Inventory
from agent.runtimes.registry import BACKENDS, load_backend
from agent.runtimes.selection import Decision, Objective, TrialResult, decide, judge
from agent.runtimes.trial import (
    InProcessWorker,
    Measurement,
    TrialFailedError,
    TrialSettings,
    Worker,
)

if TYPE_CHECKING:
    from shared.manifest import Manifest

__all__ = ["ProbeReport", "cached_decision", "plan_candidates", "probe_model", "runtime_versions"]

logger = logging.getLogger(__name__)
Progress = Callable[[str], None]
CONTENDER_MARGIN = 0.10  # re-time accepted candidates within 10% of the best
MAX_CONTENDERS = 4
RETIME_ROUNDS = 5
RETIME_RUNS = 20


@dataclass
class ProbeReport:
    """What a probe found: the machine, each runtime, and the decision."""

    inventory: Inventory
    statuses: list[RuntimeStatus]
    decision: Decision
    from_cache: bool
    cache_key: str
    dropped: list[TrialResult] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        decision = self.decision.to_dict()
        return {
            "inventory": {
                **self.inventory.to_dict(),
                "runtimes": [s.to_dict() for s in self.statuses],
            },
            "candidates": decision["candidates"],
            "selected": decision["selected"],
            "ranking": decision["ranking"],
            "objective": self.decision.objective,
            "correctness_checked": self.decision.correctness_checked,
            "from_cache": self.from_cache,
            "cache_key": self.cache_key,
        }


def runtime_versions(backends: Mapping[str, str]) -> dict[str, str | None]:
    """Installed distribution and version per runtime, without importing any runtime."""
    return {name: load_backend(path).installed_version() for name, path in backends.items()}


def cached_decision(
    *,
    bundle_digest: str,
    inventory: Inventory,
    objective: Objective,
    cache: DecisionCache | None,
    backends: Mapping[str, str] = BACKENDS,
) -> tuple[str, Decision | None]:
    """Step 1 alone: the cache key, and the decision cached under it (None: measure).

    Needs no manifest, so the daemon serves an installed version without parsing it fully.
    """
    key = cache_key(
        bundle_digest=bundle_digest,
        runtime_versions=runtime_versions(backends),
        hardware_fingerprint=inventory.fingerprint(),
        objective=objective,
    )
    return key, (cache.load(key) if cache is not None else None)


def _dropped(runtime: str, fmt: str, index: int, precision: str, reason: str) -> TrialResult:
    candidate = Candidate(
        runtime=runtime,
        device="-",
        artifact_index=index,
        artifact_format=fmt,
        artifact_precision=precision,
    )
    return TrialResult(candidate, Measurement(error=reason), False, reason)


def plan_candidates(
    manifest: Manifest,
    statuses: Mapping[str, RuntimeStatus],
    backends: Mapping[str, str],
    *,
    cores: int,
    cpu_flags: frozenset[str],
) -> tuple[list[tuple[str, Candidate]], list[TrialResult]]:
    """Every (backend name, candidate) worth a trial, and the impossible ones with reasons."""
    planned: list[tuple[str, Candidate]] = []
    dropped: list[TrialResult] = []
    for index, artifact in enumerate(manifest.artifacts):
        readers = 0
        for name, path in backends.items():
            backend = load_backend(path)
            if artifact.format not in backend.formats:
                continue
            readers += 1
            status = statuses[name]
            if not status.installed:
                dropped.append(
                    _dropped(
                        name,
                        artifact.format,
                        index,
                        artifact.precision,
                        f"{name} {status.reason or 'not installed'}",
                    )
                )
                continue
            found = backend.candidates(index, artifact, status, cores=cores, cpu_flags=cpu_flags)
            planned += [(name, c) for c in found]
        if readers == 0:
            dropped.append(
                _dropped(
                    "-",
                    artifact.format,
                    index,
                    artifact.precision,
                    f"no runtime reads the {artifact.format!r} format",
                )
            )
    return planned, dropped


def _retime_contenders(
    results: list[TrialResult],
    *,
    planned: list[tuple[str, Candidate]],
    workers: Mapping[str, Worker | InProcessWorker],
    model_root: Path,
    manifest_data: dict[str, Any],
    settings: TrialSettings,
    say: Progress,
) -> list[TrialResult]:
    """Time the close contenders again, interleaved, so a burst of load cannot pick the winner.

    The accepted candidates within ``CONTENDER_MARGIN`` of the best (at most
    ``MAX_CONTENDERS``) each get ``RETIME_ROUNDS`` more rounds of ``RETIME_RUNS`` inferences,
    round-robin across candidates; their median latency becomes the median of round medians.
    Any other process's burst then hits every contender alike instead of one.
    """
    accepted = [r for r in results if r.accepted and r.measurement.p50_ms is not None]
    if len(accepted) < 2:
        return results
    best = min(r.measurement.p50_ms or 0.0 for r in accepted)
    contenders = sorted(
        (r for r in accepted if (r.measurement.p50_ms or 0.0) <= best * (1 + CONTENDER_MARGIN)),
        key=lambda r: r.measurement.p50_ms or 0.0,
    )[:MAX_CONTENDERS]
    if len(contenders) < 2:
        return results
    runtime_of = {c.key: name for name, c in planned}
    rounds: dict[str, list[float]] = {r.candidate.key: [] for r in contenders}
    say(f"re-timing {len(contenders)} close contenders in {RETIME_ROUNDS} interleaved rounds")
    for _ in range(RETIME_ROUNDS):
        for result in contenders:
            job = {
                "kind": "retime",
                "model_root": str(model_root),
                "manifest": manifest_data,
                "candidate": result.candidate.to_dict(),
                "runs": RETIME_RUNS,
            }
            try:
                answer = workers[runtime_of[result.candidate.key]].call(job, settings.timeout_s)
                rounds[result.candidate.key].append(float(answer["p50_ms"]))
            except (TrialFailedError, KeyError):
                continue
    from statistics import median  # not at module level: the idle daemon imports this module

    updated = []
    for result in results:
        samples = rounds.get(result.candidate.key)
        if samples:
            m = result.measurement.to_dict() | {"p50_ms": median(samples)}
            updated.append(
                TrialResult(result.candidate, Measurement(**m), result.accepted, result.reason)
            )
        else:
            updated.append(result)
    return updated


def probe_model(
    model_root: Path,
    manifest: Manifest,
    *,
    bundle_digest: str,
    inventory: Inventory,
    objective: Objective = "latency",
    cache: DecisionCache | None = None,
    backends: Mapping[str, str] = BACKENDS,
    settings: TrialSettings | None = None,
    progress: Progress | None = None,
    isolate: bool = True,
) -> ProbeReport:
    """Decide which runtime, device and settings run ``manifest``'s model best on this device.

    ``isolate=False`` runs the trials in this process (simulated devices only: a crash or a hang
    would then take the caller down).

    Raises:
        NoRuntimeError: no candidate loads and passes the accuracy check.
    """
    settings = settings or TrialSettings()
    if objective == "throughput" and settings.throughput_batch == 0:
        settings = TrialSettings(**{**settings.__dict__, "throughput_batch": 8})
    say = progress or (lambda _msg: None)
    key, cached = cached_decision(
        bundle_digest=bundle_digest,
        inventory=inventory,
        objective=objective,
        cache=cache,
        backends=backends,
    )
    if cached is not None:
        return ProbeReport(inventory, [], cached, from_cache=True, cache_key=key)

    make_worker = Worker if isolate else InProcessWorker
    workers = {name: make_worker(path) for name, path in backends.items()}
    try:
        statuses = {}
        for name, worker in workers.items():
            say(f"asking {name} what it sees")
            try:
                statuses[name] = worker.status(settings.timeout_s)
            except TrialFailedError as e:
                statuses[name] = RuntimeStatus(name, installed=False, reason=str(e))
        for status in statuses.values():
            if status.installed:
                inventory = inventory.with_runtime_devices(status.name, status.devices)
        planned, dropped = plan_candidates(
            manifest, statuses, backends, cores=inventory.cpu.cores, cpu_flags=inventory.cpu.flags
        )
        manifest_data = manifest.model_dump(mode="json")
        results = list(dropped)
        for number, (name, candidate) in enumerate(planned, 1):
            say(f"[{number}/{len(planned)}] {candidate.key}")
            job = {
                "kind": "trial",
                "model_root": str(model_root),
                "manifest": manifest_data,
                "candidate": candidate.to_dict(),
                "settings": settings.__dict__,
            }
            try:
                measurement = Measurement(**workers[name].call(job, settings.timeout_s))
            except TrialFailedError as e:
                measurement = Measurement(error=str(e))
            results.append(judge(candidate, measurement, manifest.accuracy_budget))
        if objective == "latency":
            results = _retime_contenders(
                results,
                planned=planned,
                workers=workers,
                model_root=model_root,
                manifest_data=manifest_data,
                settings=settings,
                say=say,
            )
    finally:
        for worker in workers.values():
            worker.close()
    decision = decide(manifest.name, results, objective)
    if cache is not None:
        cache.save(key, decision)
    return ProbeReport(
        inventory,
        list(statuses.values()),
        decision,
        from_cache=False,
        cache_key=key,
        dropped=dropped,
    )
