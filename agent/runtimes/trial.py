"""Try a candidate in a child process with a time limit, and measure it.

A runtime may crash (a broken delegate), hang (a stuck compile) or leak; none of that may reach
the agent. Each runtime gets a worker process (``spawn``, so the parent never imports a runtime
library); the parent sends it one candidate at a time and waits at most ``timeout_s``. A crash or
a timeout rejects that candidate only: the worker is replaced and the next candidate goes on.

In the child, :func:`measure` loads the candidate, runs every test vector and records the largest
absolute and relative error against the golden outputs, then times single inferences: warm-up
runs, then at least ``min_runs`` and at most ``max_runs`` runs or ``target_s`` seconds.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from agent.runtimes.base import Candidate, LoadedModel, RuntimeStatus
from agent.runtimes.registry import load_backend

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

    from shared.manifest import Manifest, TensorSpec

__all__ = ["InProcessWorker", "Measurement", "TrialSettings", "Worker", "measure", "run_job"]


@dataclass(frozen=True)
class TrialSettings:
    """How hard to try each candidate. Times in seconds."""

    timeout_s: float = 60.0
    warmup_runs: int = 2
    min_runs: int = 10
    max_runs: int = 50
    target_s: float = 1.0
    throughput_batch: int = 0  # > 0: also measure items/s with batches of this size


@dataclass(frozen=True)
class Measurement:
    """What one trial found. ``error`` set means the candidate could not run at all."""

    load_ms: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    throughput_ips: float | None = None
    max_abs_err: float | None = None
    max_rel_err: float | None = None
    cases: int = 0  # test vectors compared
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- child side ----------------------------------------------------------------------------------


def _zeros(spec: TensorSpec, batch: int = 1) -> np.ndarray:
    shape = [
        batch if i == 0 and d == -1 else (1 if d == -1 else d) for i, d in enumerate(spec.shape)
    ]
    return np.zeros(shape, dtype=np.dtype(spec.dtype))


def _names(model_names: list[str], spec_names: list[str]) -> dict[str, str]:
    """Map manifest tensor names to the runtime's (by name when they agree, else by position)."""
    if set(model_names) >= set(spec_names):
        return {n: n for n in spec_names}
    return dict(zip(spec_names, model_names, strict=False))


def _vectors(
    model_root: Path, manifest: Manifest
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    vectors = manifest.test_vectors
    if vectors is None:
        return {}, {}

    def load(rel: str) -> np.ndarray:
        array: np.ndarray = np.load(model_root / rel, allow_pickle=False)
        return array

    return (
        {k: load(v) for k, v in vectors.inputs.items()},
        {k: load(v) for k, v in vectors.outputs.items()},
    )


def _errors(
    model: LoadedModel,
    manifest: Manifest,
    inputs: Mapping[str, np.ndarray],
    golden: Mapping[str, np.ndarray],
) -> tuple[float, float, int]:
    in_names = _names(list(model.input_names), [t.name for t in manifest.inputs])
    out_names = _names(list(model.output_names), [t.name for t in manifest.outputs])
    cases = len(next(iter(inputs.values())))
    max_abs = max_rel = 0.0
    for i in range(cases):
        result = model.infer({in_names[k]: v[i : i + 1] for k, v in inputs.items()})
        for name, expected in golden.items():
            got = np.asarray(result[out_names[name]], dtype=np.float64).reshape(-1)
            want = np.asarray(expected[i : i + 1], dtype=np.float64).reshape(-1)
            if got.shape != want.shape:
                raise ValueError(f"output {name} has {got.size} values, golden has {want.size}")
            diff = np.abs(got - want)
            max_abs = max(max_abs, float(diff.max(initial=0.0)))
            max_rel = max(max_rel, float((diff / np.maximum(np.abs(want), 1e-6)).max(initial=0)))
    return max_abs, max_rel, cases


def _time_runs(
    model: LoadedModel, feeds: Mapping[str, np.ndarray], settings: TrialSettings
) -> list[float]:
    for _ in range(settings.warmup_runs):
        model.infer(feeds)
    samples: list[float] = []
    started = time.perf_counter()
    while len(samples) < settings.max_runs and (
        len(samples) < settings.min_runs or time.perf_counter() - started < settings.target_s
    ):
        t0 = time.perf_counter()
        model.infer(feeds)
        samples.append((time.perf_counter() - t0) * 1000)
    return samples


def measure(
    model_root: Path,
    manifest: Manifest,
    candidate: Candidate,
    backend_path: str,
    settings: TrialSettings,
) -> Measurement:
    """Load and measure ``candidate`` in this process. Runtime failures become ``error``."""
    backend = load_backend(backend_path)
    artifact = manifest.artifacts[candidate.artifact_index]
    t0 = time.perf_counter()
    try:
        model = backend.load(model_root, artifact, candidate)
    except Exception as e:  # any failure of a runtime rejects the candidate, with its message
        return Measurement(error=f"load failed: {e}".splitlines()[0][:300])
    load_ms = (time.perf_counter() - t0) * 1000
    try:
        inputs, golden = _vectors(model_root, manifest)
        max_abs = max_rel = None
        cases = 0
        if inputs and golden:
            max_abs, max_rel, cases = _errors(model, manifest, inputs, golden)
            in_names = _names(list(model.input_names), [t.name for t in manifest.inputs])
            feeds = {in_names[k]: v[:1] for k, v in inputs.items()}
        else:
            in_names = _names(list(model.input_names), [t.name for t in manifest.inputs])
            feeds = {in_names[t.name]: _zeros(t) for t in manifest.inputs}
        samples = _time_runs(model, feeds, settings)
        throughput = None
        if settings.throughput_batch > 0:
            throughput = _throughput(model, feeds, settings)
    except Exception as e:  # a runtime that loads but cannot infer is rejected the same way
        return Measurement(load_ms=load_ms, error=f"inference failed: {e}".splitlines()[0][:300])
    finally:
        model.close()
    return Measurement(
        load_ms=load_ms,
        p50_ms=float(np.percentile(samples, 50)),
        p99_ms=float(np.percentile(samples, 99)),
        throughput_ips=throughput,
        max_abs_err=max_abs,
        max_rel_err=max_rel,
        cases=cases,
    )


def _throughput(
    model: LoadedModel, feeds: Mapping[str, np.ndarray], settings: TrialSettings
) -> float:
    batch = {k: np.repeat(v, settings.throughput_batch, axis=0) for k, v in feeds.items()}
    try:
        model.infer(batch)
    except Exception:
        batch = dict(feeds)
    size = len(next(iter(batch.values())))
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < settings.target_s / 2:
        model.infer(batch)
        done += size
    return done / (time.perf_counter() - started)


def _retime(
    model_root: Path,
    manifest: Manifest,
    *,
    candidate: Candidate,
    backend_path: str,
    runs: int,
    loaded: dict[str, LoadedModel],
) -> float:
    """Median latency (ms) of ``runs`` more single inferences; the model stays loaded."""
    model = loaded.get(candidate.key)
    if model is None:
        artifact = manifest.artifacts[candidate.artifact_index]
        model = load_backend(backend_path).load(model_root, artifact, candidate)
        loaded[candidate.key] = model
    inputs, _ = _vectors(model_root, manifest)
    in_names = _names(list(model.input_names), [t.name for t in manifest.inputs])
    feeds = (
        {in_names[k]: v[:1] for k, v in inputs.items()}
        if inputs
        else {in_names[t.name]: _zeros(t) for t in manifest.inputs}
    )
    samples = _time_runs(
        model, feeds, TrialSettings(warmup_runs=1, min_runs=runs, max_runs=runs, target_s=0.0)
    )
    return float(np.median(samples))


def run_job(job: dict[str, Any], loaded: dict[str, LoadedModel]) -> dict[str, Any]:
    """Answer one status, trial or re-timing job (``loaded`` keeps models between re-timings)."""
    if job["kind"] == "status":
        return load_backend(job["backend"]).status().to_dict()
    from shared.manifest import Manifest  # pydantic: only trial workers and deployments need it

    manifest = Manifest.model_validate(job["manifest"])
    candidate = Candidate.from_dict(job["candidate"])
    if job["kind"] == "retime":
        p50 = _retime(
            Path(job["model_root"]),
            manifest,
            candidate=candidate,
            backend_path=job["backend"],
            runs=int(job["runs"]),
            loaded=loaded,
        )
        return {"p50_ms": p50}
    settings = TrialSettings(**job["settings"])
    return measure(Path(job["model_root"]), manifest, candidate, job["backend"], settings).to_dict()


def _serve(conn: Connection) -> None:
    """The worker loop: status, trial and re-timing jobs in, plain dicts out."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    loaded: dict[str, LoadedModel] = {}  # kept between re-timing rounds
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        if job is None:
            return
        conn.send(run_job(job, loaded))


# -- parent side ---------------------------------------------------------------------------------


class TrialFailedError(Exception):
    """The worker crashed or timed out; the message says which."""


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class Worker:
    """A child process that runs one backend's jobs; replaced after a crash or a timeout."""

    def __init__(self, backend_path: str) -> None:
        import multiprocessing  # not at module level: the idle daemon imports this module

        self.backend_path = backend_path
        self._ctx = multiprocessing.get_context("spawn")
        self._process: Any = None
        self._conn: Connection | None = None

    def _start(self) -> Connection:
        if self._conn is None:
            parent, child = self._ctx.Pipe()
            self._process = self._ctx.Process(
                target=_serve,
                args=(child,),
                daemon=True,
                name=f"edgefleet-trial-{self.backend_path}",
            )
            self._process.start()
            child.close()
            self._conn = parent
        return self._conn

    def _kill(self) -> int | None:
        if self._process is not None:
            if self._process.is_alive():
                self._process.kill()
            self._process.join(5)
            code: int | None = self._process.exitcode
        else:
            code = None
        if self._conn is not None:
            self._conn.close()
        self._process, self._conn = None, None
        return code

    def call(self, job: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        """Send one job and wait for its answer. Raises :class:`TrialFailedError`."""
        conn = self._start()
        job = {**job, "backend": self.backend_path}
        try:
            conn.send(job)
            if not conn.poll(timeout_s):
                self._kill()
                raise TrialFailedError(
                    f"timed out after {timeout_s:g} s (hung in load or inference)"
                )
            answer: dict[str, Any] = conn.recv()
        except (EOFError, OSError, BrokenPipeError) as e:
            code = self._kill()
            raise TrialFailedError(f"runtime crashed ({_describe_exit(code)})") from e
        return answer

    def status(self, timeout_s: float = 60.0) -> RuntimeStatus:
        return RuntimeStatus.from_dict(self.call({"kind": "status"}, timeout_s))

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.send(None)
                self._process.join(5)
            except (OSError, BrokenPipeError):
                pass
        self._kill()


class InProcessWorker:
    """Runs jobs in the calling thread: no isolation and no time limit.

    For simulated devices, whose backends are plain Python and trusted; a real device always
    uses :class:`Worker`.
    """

    def __init__(self, backend_path: str) -> None:
        self.backend_path = backend_path
        self._loaded: dict[str, LoadedModel] = {}

    def call(self, job: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        try:
            return run_job({**job, "backend": self.backend_path}, self._loaded)
        except Exception as e:  # the same contract as a crashed worker: reject the candidate
            raise TrialFailedError(f"runtime failed ({e})") from e

    def status(self, timeout_s: float = 60.0) -> RuntimeStatus:
        return RuntimeStatus.from_dict(self.call({"kind": "status"}, timeout_s))

    def close(self) -> None:
        for model in self._loaded.values():
            model.close()
        self._loaded.clear()
