"""Simulated hardware: profiles, model faults, and the runtime backend virtual devices use.

A virtual device runs the real agent; only what it runs *on* is simulated:

- a :class:`HardwareProfile` gives it a hardware class, an accelerator inventory (what the OS
  scan would have found) and a latency scale (its accelerator is that much faster or slower than
  this machine's CPU);
- :class:`SimulatedBackend` is the runtime the agent finds there. It computes inferences with
  the real ONNX Runtime on this machine's CPU (one shared session per model file, so a thousand
  devices cost one copy of the weights), then waits so that the latency the agent measures is
  the profile's scale times the real latency, or times ``FLOOR_MS`` when the model is faster
  than that here (tens of milliseconds is what a small model takes on an edge device, and it
  keeps the simulated latencies well above the scheduling noise of a busy process);
- each distinct input is computed once per model file and process (the first time any device
  asks), and the outputs and the real latency (the best of a few runs) are replayed to every
  device that asks again. Real devices compute on their own hardware; a thousand virtual ones
  computing the same input on this machine's two cores would only measure that machine. The
  outputs are exactly what ONNX Runtime computed, so self-tests judge real results, and the
  simulated latency no longer includes how long this machine took to compute them at the time
  (the sleep a busy process stretches still does);
- :class:`ModelFault` makes a given model version misbehave on given hardware: wrong outputs
  (its self-test fails there) or extra latency (correct but slower).

Backends are created from an import path with keyword arguments
(``simulators.hardware:SimulatedBackend?profile=arm-npu``), like every other backend; the
profiles and faults they refer to are registered in this process with :func:`register`.
"""

from __future__ import annotations

import functools
import hashlib
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.platform import DevicePlatform
from agent.runtimes.base import ArtifactRef, Backend, Candidate, RuntimeLoadError, RuntimeStatus
from agent.runtimes.inventory import Accelerator, CpuInfo, Inventory
from agent.runtimes.trial import TrialSettings
from shared.bundle_format import MANIFEST_NAME
from shared.errors import EdgefleetError, UsageError
from shared.manifest import Artifact, Manifest, parse_manifest

__all__ = [
    "PROFILES",
    "HardwareProfile",
    "ModelFault",
    "SimulatedBackend",
    "parse_profiles",
    "register",
]


@dataclass(frozen=True)
class HardwareProfile:
    """One kind of simulated device."""

    name: str  # the hardware class the device reports, e.g. "arm-npu"
    device: str = "CPU"  # the accelerator the runtime runs on
    latency_scale: float = 1.0  # simulated latency = latency on this machine x scale
    arch: str = "x86_64"
    cores: int = 4
    accelerator: str | None = (
        None  # the kind the OS scan would report (inventory.ACCELERATOR_KINDS)
    )
    weight: float = 1.0  # share of the fleet, relative to the other profiles

    def inventory(self) -> Inventory:
        accelerators = (
            (Accelerator(self.accelerator, f"simulated {self.device}", ("simulator",)),)
            if self.accelerator
            else ()
        )
        cpu = CpuInfo(arch=self.arch, model=f"simulated {self.name}", cores=self.cores)
        return Inventory(cpu=cpu, accelerators=accelerators, os_release="simulated")

    def platform(self) -> DevicePlatform:
        """What a virtual device of this profile runs on: trials in-process, simulated runtime."""
        return DevicePlatform(
            inventory=self.inventory(),
            backends={"onnxruntime": f"simulators.hardware:SimulatedBackend?profile={self.name}"},
            isolate_trials=False,
            # Every test vector is still checked; the timing needs few runs, since a simulated
            # accelerator's latency is the profile's scale (and each run costs real CPU here).
            trial_settings=TrialSettings(warmup_runs=1, min_runs=3, max_runs=5, target_s=0.1),
        )


FLOOR_MS = 40.0  # simulated latency at scale 1 for a model that runs faster than this here
TIMING_RUNS = 3  # runs of a new input; its latency is the best of them
MAX_COMPUTED = 256  # distinct (model, input) results kept per process; the oldest go first

# The built-in catalogue; ``--profiles`` picks from it and sets the shares.
CATALOGUE: dict[str, HardwareProfile] = {
    p.name: p
    for p in (
        HardwareProfile("x86-cpu", device="CPU", latency_scale=1.0, arch="x86_64", cores=4),
        HardwareProfile(
            "arm-npu",
            device="NPU",
            latency_scale=0.5,
            arch="aarch64",
            cores=4,
            accelerator="rockchip-npu",
        ),
        HardwareProfile(
            "jetson-gpu",
            device="GPU",
            latency_scale=0.3,
            arch="aarch64",
            cores=6,
            accelerator="nvidia-jetson",
        ),
        HardwareProfile("rpi-cpu", device="CPU", latency_scale=4.0, arch="aarch64", cores=4),
    )
}
DEFAULT_PROFILES = "x86-cpu=2,arm-npu=1,jetson-gpu=1"


@dataclass(frozen=True)
class ModelFault:
    """A model version that misbehaves: on ``hardware`` (all classes if None)."""

    version: str
    kind: str  # "wrong-output" (the self-test fails) or "slow" (correct, ``factor`` x slower)
    hardware: str | None = None
    factor: float = 1.0

    def applies(self, version: str, hardware: str) -> bool:
        return self.version == version and self.hardware in (None, hardware)


# What this process simulates; set by :func:`register` before any virtual device starts.
PROFILES: dict[str, HardwareProfile] = dict(CATALOGUE)
MODEL_FAULTS: list[ModelFault] = []


def register(profiles: Iterable[HardwareProfile], faults: Iterable[ModelFault] = ()) -> None:
    """Make profiles and model faults known to the simulated backends of this process."""
    PROFILES.update({p.name: p for p in profiles})
    MODEL_FAULTS[:] = list(faults)


def parse_profiles(spec: str) -> list[HardwareProfile]:
    """``x86-cpu=2,arm-npu=1:scale=0.4`` -> profiles with shares (and optional overrides).

    Raises:
        UsageError: an unknown profile, a bad share or a bad option; the message lists the
            known profiles.
    """
    profiles = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        head, *options = item.split(":")
        name, _, share = head.partition("=")
        base = CATALOGUE.get(name)
        if base is None:
            raise UsageError(
                f"--profiles: unknown hardware profile {name!r}; "
                f"expected one of {', '.join(sorted(CATALOGUE))}"
            )
        fields: dict[str, Any] = {"weight": _positive(share or "1", f"share of {name}")}
        for option in options:
            key, _, value = option.partition("=")
            if key != "scale":
                raise UsageError(f"--profiles: unknown option {key!r} for {name} (expected scale)")
            fields["latency_scale"] = _positive(value, f"scale of {name}")
        profiles.append(HardwareProfile(**{**base.__dict__, **fields}))
    if not profiles:
        raise UsageError(f"--profiles: no profile given (e.g. {DEFAULT_PROFILES})")
    return profiles


def _positive(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"{what}: expected a positive number, got {text!r}") from None
    if not value > 0:
        raise UsageError(f"{what}: expected a positive number, got {text!r}")
    return value


# -- the runtime --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Computed:
    """What the real runtime computed for one input: read-only outputs and the best latency."""

    outputs: tuple[np.ndarray, ...]
    seconds: float


class _SharedSessions:
    """One ONNX Runtime session per model file digest, shared by every virtual device, and the
    results it computed, by input (see the module docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sessions: dict[str, tuple[Any, int]] = {}
        # Results outlive the sessions (a self-test's session is closed before serving opens
        # another), bounded by MAX_COMPUTED; one computation per key at a time (_computing).
        self._computed: dict[tuple[str, bytes], _Computed] = {}
        self._computing: dict[tuple[str, bytes], threading.Lock] = {}

    def run(self, digest: str, session: Any, feeds: Mapping[str, np.ndarray]) -> _Computed:
        """The outputs of ``session`` for ``feeds``: computed on first use, then replayed.

        Devices that ask for the same new input at once wait for the first one's computation.
        """
        key = (digest, _feeds_key(feeds))
        computed = self._computed.get(key)
        if computed is not None:
            return computed
        with self._lock:
            gate = self._computing.setdefault(key, threading.Lock())
        with gate:
            computed = self._computed.get(key)
            if computed is not None:  # computed while this thread waited
                return computed
            try:
                computed = _compute(session, feeds)
                with self._lock:
                    if len(self._computed) >= MAX_COMPUTED:
                        self._computed.pop(next(iter(self._computed)))  # the oldest
                    self._computed[key] = computed
            finally:
                with self._lock:
                    self._computing.pop(key, None)
        return computed

    def acquire(self, path: Path, digest: str) -> Any:
        import onnxruntime as ort

        with self._lock:
            session, users = self._sessions.get(digest, (None, 0))
            if session is None:
                options = ort.SessionOptions()
                options.intra_op_num_threads = 1
                options.inter_op_num_threads = 1
                options.log_severity_level = 3
                try:
                    session = ort.InferenceSession(
                        str(path), sess_options=options, providers=["CPUExecutionProvider"]
                    )
                except Exception as e:  # onnxruntime raises its own types
                    raise RuntimeLoadError(f"cannot load {path.name}: {e}") from e
            self._sessions[digest] = (session, users + 1)
            return session

    def release(self, digest: str) -> None:
        with self._lock:
            session, users = self._sessions.get(digest, (None, 0))
            if users <= 1:
                self._sessions.pop(digest, None)
            else:
                self._sessions[digest] = (session, users - 1)


def _compute(session: Any, feeds: Mapping[str, np.ndarray]) -> _Computed:
    """Run ``feeds`` ``TIMING_RUNS`` times: the outputs (read-only) and the best latency."""
    output_names = [o.name for o in session.get_outputs()]
    best, results = float("inf"), []
    for _ in range(TIMING_RUNS):
        started = time.perf_counter()
        results = session.run(output_names, dict(feeds))
        best = min(best, time.perf_counter() - started)
    for array in results:
        array.flags.writeable = False  # replayed to every device: nobody may change it
    return _Computed(tuple(results), best)


def _feeds_key(feeds: Mapping[str, np.ndarray]) -> bytes:
    """A digest of the inputs' names, types, shapes and bytes."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(feeds):
        array = np.ascontiguousarray(feeds[name])
        h.update(f"{name}\0{array.dtype.str}\0{array.shape}\0".encode())
        h.update(array.data)
    return h.digest()


SESSIONS = _SharedSessions()


class _SimulatedModel:
    def __init__(
        self, session: Any, digest: str, *, scale: float, wrong: bool, device: str
    ) -> None:
        self._session = session
        self._digest = digest
        self._scale = scale
        self._wrong = wrong
        self._device = device
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._session is None:
            raise RuntimeLoadError(f"the simulated {self._device} model was closed")
        started = time.perf_counter()
        computed = SESSIONS.run(self._digest, self._session, feeds)
        target = self._scale * max(computed.seconds, FLOOR_MS / 1000)
        elapsed = time.perf_counter() - started
        if target > elapsed:
            time.sleep(target - elapsed)
        outputs = dict(zip(self.output_names, computed.outputs, strict=True))
        if self._wrong:  # what an accelerator with a broken kernel for this model returns
            outputs = {k: v + np.asarray(1.0, dtype=v.dtype) for k, v in outputs.items()}
        return outputs

    def close(self) -> None:
        if self._session is not None:
            self._session = None
            SESSIONS.release(self._digest)


class SimulatedBackend(Backend):
    """ONNX Runtime on a simulated accelerator (see the module docstring)."""

    name = "onnxruntime"
    formats = frozenset({"onnx"})
    distributions = ("onnxruntime",)

    def __init__(self, profile: str) -> None:
        if profile not in PROFILES:
            raise RuntimeLoadError(f"no simulated hardware profile {profile!r} in this process")
        self.profile = PROFILES[profile]

    def status(self) -> RuntimeStatus:
        try:
            import onnxruntime as ort
        except ImportError as e:
            return RuntimeStatus(self.name, installed=False, reason=f"not installed ({e})")
        return RuntimeStatus(
            self.name, installed=True, version=ort.__version__, devices=(self.profile.device,)
        )

    def candidates(
        self,
        artifact_index: int,
        artifact: Artifact,
        status: RuntimeStatus,
        *,
        cores: int,
        cpu_flags: frozenset[str],
    ) -> list[Candidate]:
        return [
            Candidate.make(
                runtime=self.name,
                device=self.profile.device,
                artifact_index=artifact_index,
                artifact=artifact,
                settings={"simulated": True},
                precision="f32" if artifact.precision == "fp32" else artifact.precision,
            )
        ]

    def load(
        self, model_root: Path, artifact: ArtifactRef, candidate: Candidate
    ) -> _SimulatedModel:
        manifest = _manifest(model_root)
        path = model_root / artifact.files[0]
        digests = {f.path: f.sha256 for f in manifest.files} if manifest else {}
        digest = digests.get(artifact.files[0]) or hashlib.sha256(path.read_bytes()).hexdigest()
        version = manifest.version if manifest else ""
        faults = [f for f in MODEL_FAULTS if f.applies(version, self.profile.name)]
        scale = self.profile.latency_scale
        for fault in faults:
            if fault.kind == "slow":
                scale *= fault.factor
        return _SimulatedModel(
            SESSIONS.acquire(path, digest),
            digest,
            scale=scale,
            wrong=any(f.kind == "wrong-output" for f in faults),
            device=self.profile.device,
        )


def _manifest(model_root: Path) -> Manifest | None:
    """The installed version's manifest (trials and serving both load from a version dir)."""
    try:
        return _parse_manifest((model_root / MANIFEST_NAME).read_bytes())
    except (OSError, EdgefleetError):
        return None


@functools.lru_cache(maxsize=64)
def _parse_manifest(data: bytes) -> Manifest:
    """Parsed once per process for all the devices that installed the same version (frozen)."""
    return parse_manifest(data)
