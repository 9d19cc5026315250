"""The simulated fleet behind :mod:`simulators.scale`: hardware classes, releases, faults, devices.

Everything here is plain data and its seeded generation; the behaviour lives in
:mod:`simulators.scale`. A fleet is drawn from a :class:`ScaleConfig` by :func:`make_fleet`:

- each device gets a :class:`HardwareClass` by the classes' shares, and from it a runtime, a
  p95 latency (scaled per device), a downlink bandwidth (log-normal around the class median) and
  a round-trip time;
- :class:`NetworkFaults` decides which devices lose chunks more often (flaky links), which are
  offline when the rollout starts (and when they return, or never), which have one outage during
  the run, and which enroll only while the rollout runs;
- a :class:`Release` is what one model version does on devices: which hardware classes fail its
  self-test, how often it crash-loops during probation, how much slower or faster it is.

The same config and seed always give the same fleet.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from agent.transfer import ChunkKey, Transfer

__all__ = [
    "BAD",
    "CURRENT",
    "GOOD",
    "HARDWARE",
    "MODEL",
    "HardwareClass",
    "NetworkFaults",
    "Release",
    "ScaleConfig",
    "SimDevice",
    "WireChunk",
    "make_fleet",
]

MODEL = "cnn"


@dataclass(frozen=True, slots=True)
class HardwareClass:
    """A kind of device: its share of the fleet, its runtime and how fast it is."""

    name: str
    share: float  # of the fleet
    runtime: str  # the agent's runtime key (family/provider), as devices report it
    p95_ms: float  # p95 inference latency of the current model (median over the class)
    bandwidth_mbit_s: float  # median downlink
    rtt_ms: float  # median round trip to the broker
    install_s_per_mb: float  # whole-file verify and atomic install
    self_test_s: float  # runtime trials and test vectors


HARDWARE: tuple[HardwareClass, ...] = (
    HardwareClass("rpi5", 0.30, "litert/xnnpack", 48.0, 8.0, 120.0, 0.08, 14.0),
    HardwareClass(
        "jetson-orin", 0.15, "onnxruntime/CUDAExecutionProvider", 7.0, 40.0, 60.0, 0.03, 20.0
    ),
    HardwareClass("x86-avx2", 0.25, "openvino/CPU", 12.0, 50.0, 40.0, 0.02, 6.0),
    HardwareClass("x86-avx512", 0.10, "openvino/CPU", 8.0, 100.0, 30.0, 0.02, 5.0),
    HardwareClass("nuc-npu", 0.10, "openvino/NPU", 5.0, 50.0, 40.0, 0.02, 9.0),
    HardwareClass("coral", 0.10, "litert/edgetpu", 9.0, 8.0, 120.0, 0.08, 11.0),
)


@dataclass(frozen=True, slots=True)
class Release:
    """What one version of the model does on devices: the fault model of a release."""

    version: str
    fails_self_test_on: frozenset[str] = frozenset()  # hardware classes that always refuse it
    self_test_failure_rate: float = 0.0005  # elsewhere, per device (a bad unit)
    crash_loop_rate: float = 0.001  # per activation: restarts during probation, rolls back
    install_failure_rate: float = 0.002  # per attempt: a transient storage error
    p95_factor: float = 1.0  # p95 latency relative to the current model, same device
    error_rate: float = 0.001  # inference errors per request


CURRENT = Release(  # what the fleet runs: known good on every device, so reverts succeed
    "1.0.0", self_test_failure_rate=0.0, crash_loop_rate=0.0, install_failure_rate=0.0
)
GOOD = Release("2.0.0", p95_factor=0.97)
BAD = Release(
    "3.0.0", fails_self_test_on=frozenset({"coral"}), crash_loop_rate=0.01, p95_factor=1.6
)


@dataclass(frozen=True, slots=True)
class NetworkFaults:
    """Links and presence: chunk loss, offline devices, outages, late enrolment."""

    bandwidth_spread: float = 0.8  # sigma of ln(bandwidth) around the class median
    min_bandwidth_mbit_s: float = 0.25
    chunk_loss_rate: float = 0.005  # a requested chunk that never arrives (request or answer lost)
    flaky_share: float = 0.05  # devices on a flaky link ...
    flaky_chunk_loss_rate: float = 0.15  # ... lose this share of their chunks
    corrupt_chunk_rate: float = 0.001  # a chunk that arrives with wrong bytes (sha256 mismatch)
    offline_at_start_share: float = 0.03  # offline when the rollout starts ...
    offline_return_s: tuple[float, float] = (600.0, 3600.0)  # ... and back uniformly within
    unreachable_share: float = 0.002  # offline when it starts and never back
    outage_share: float = 0.03  # devices with one outage during the run ...
    outage_window_s: float = 3600.0  # ... starting uniformly within this ...
    outage_mean_s: float = 1200.0  # ... lasting exponentially this long on average
    newcomer_share: float = 0.01  # devices that enroll while the rollout runs ...
    newcomer_window_s: float = 3600.0  # ... uniformly within this


@dataclass(frozen=True, kw_only=True)
class ScaleConfig:
    """One simulated run: the fleet, the bundle, the plan's pacing and the simulation's grain."""

    devices: int = 100_000  # the whole fleet, newcomers included
    seed: int = 1
    hardware: tuple[HardwareClass, ...] = HARDWARE
    network: NetworkFaults = field(default_factory=NetworkFaults)
    bundle_mb: float = 20.0  # payload size the link times are computed from
    chunks: int = 4  # chunks of the bundle (coarse: see the simulators.scale docstring)
    stages_percent: tuple[float, ...] = (1.0, 10.0, 50.0, 100.0)
    soak_s: float = 600.0  # the fleet service's default soak
    max_in_flight: int | None = None  # None: 5% of the fleet, at least 100
    device_timeout_s: float = 3600.0
    engine_tick_s: float = 120.0  # the engine is stepped at most this often (simulated)
    skip_idle_ticks: bool = True  # no step when nothing arrived and no engine timer is due
    transfer_tick_s: float = 10.0  # Tick events to a download, at most this far apart
    probation_s: float = 30.0  # the agent's default
    telemetry_interval_s: float = 30.0  # the agent's default
    will_delay_s: float = 90.0  # the broker publishes a lost device's will after its keep-alive
    horizon_s: float = 2 * 86400.0  # stop here whatever happens

    def __post_init__(self) -> None:
        if self.devices < 10:
            raise ValueError(f"devices must be >= 10, got {self.devices}")
        if not 1 <= self.chunks <= 256:
            raise ValueError(f"chunks must be in 1..256, got {self.chunks}")
        if abs(sum(h.share for h in self.hardware) - 1.0) > 1e-6:
            raise ValueError("hardware class shares must add up to 1")
        for name in ("bundle_mb", "engine_tick_s", "transfer_tick_s", "horizon_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")

    @property
    def in_flight_cap(self) -> int:
        """The plan's ``max_in_flight``."""
        if self.max_in_flight is not None:
            return self.max_in_flight
        return max(100, self.devices // 20)


@dataclass(slots=True, eq=False)
class WireChunk:
    """A chunk on its way to a device: bytes arrive from ``first_byte_at`` on."""

    index: int  # in the bundle's chunk plan
    first_byte_at: float
    remaining: float  # modelled bytes still to arrive
    handed: int = 0  # scaled bytes already handed to the transfer as parts
    corrupt: bool = False  # arrives with wrong bytes


@dataclass(slots=True, eq=False)
class SimDevice:
    """One simulated device: what it is, what it runs, and where its deployment stands."""

    index: int
    device_id: str
    hw: HardwareClass
    group: str
    bandwidth_bytes_s: float
    one_way_s: float  # half the round trip
    chunk_loss: float
    latency_factor: float  # this unit's p95 relative to its class
    requests_per_s: float  # inference load from local applications
    enroll_at: float  # 0.0: enrolled before the rollout
    offline_until: float | None  # offline at start: back at this time; inf: never
    outage: tuple[float, float] | None  # (start, duration) of one outage during the run
    # what the device holds and runs
    online: bool = False
    ever_online: bool = False
    came_online_at: float = 0.0  # the last time it came (back) online or enrolled
    running: str | None = None
    previous: str | None = None
    installed: set[str] = field(default_factory=set)
    failed_self_test: set[str] = field(default_factory=set)
    verified: dict[str, set[ChunkKey]] = field(default_factory=dict)  # the durable chunk record
    ran: set[str] = field(default_factory=set)  # versions it ever activated
    # the deployment worker (one at a time; the newest queued order wins)
    busy: bool = False
    deploying: str | None = None
    queued: str | None = None
    token: int = 0  # bumps with every deployment: its stale timers are ignored
    activation: int = 0  # bumps with every switch of version: stale probation timers too
    in_probation: bool = False
    transfer: Transfer | None = None
    wire: list[WireChunk] = field(default_factory=list)  # chunks on their way
    link_t: float = 0.0  # the wire has been advanced up to this time
    link_gen: int = 0  # the pending wake-up of the download
    # while offline
    outbox: list[tuple[int, object]] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)  # held by the broker (persistent session)
    outage_gen: int = 0


def _pick_class(rng: random.Random, classes: tuple[HardwareClass, ...]) -> HardwareClass:
    x, acc = rng.random(), 0.0
    for hw in classes:
        acc += hw.share
        if x < acc:
            return hw
    return classes[-1]


def make_fleet(config: ScaleConfig) -> list[SimDevice]:
    """Draw ``config.devices`` devices from ``config.seed`` (see the module docstring)."""
    rng = random.Random(f"fleet-{config.seed}")  # noqa: S311 - simulation, not cryptography
    net = config.network
    devices = []
    for i in range(config.devices):
        hw = _pick_class(rng, config.hardware)
        mbit = hw.bandwidth_mbit_s * math.exp(rng.gauss(0.0, net.bandwidth_spread))
        rtt_s = hw.rtt_ms / 1000 * math.exp(rng.gauss(0.0, 0.3))
        flaky = rng.random() < net.flaky_share
        x = rng.random()
        offline_until: float | None = None
        enroll_at = 0.0
        if x < net.unreachable_share:
            offline_until = math.inf
        elif x < net.unreachable_share + net.offline_at_start_share:
            offline_until = rng.uniform(*net.offline_return_s)
        elif x < net.unreachable_share + net.offline_at_start_share + net.newcomer_share:
            enroll_at = rng.uniform(1.0, net.newcomer_window_s)
        outage = None
        if rng.random() < net.outage_share:
            outage = (rng.uniform(0.0, net.outage_window_s), rng.expovariate(1 / net.outage_mean_s))
        devices.append(
            SimDevice(
                index=i,
                device_id=f"dev-{i:06d}",
                hw=hw,
                group=f"site-{i % 50}",
                bandwidth_bytes_s=max(mbit, net.min_bandwidth_mbit_s) * 125_000,
                one_way_s=rtt_s / 2,
                chunk_loss=net.flaky_chunk_loss_rate if flaky else net.chunk_loss_rate,
                latency_factor=math.exp(rng.gauss(0.0, 0.1)),
                requests_per_s=rng.uniform(0.5, 4.0),
                enroll_at=enroll_at,
                offline_until=offline_until,
                outage=outage,
            )
        )
    return devices
