"""A staged rollout over 100,000 simulated devices, as a discrete-event run of the real logic.

One command::

    python -m simulators.scale [--devices 100000] [--seed 1] [--scenario good|bad|both] [--json]

There is no broker, no process per device, no thread and no sleep: a simulated clock and one
event heap drive the two pure state machines of the system,

- the rollout engine (:func:`fleet.rollouts.step`), fed exactly as the fleet service feeds it:
  device views, deployment events and telemetry go through the service's own mappings
  (:func:`fleet.rollout_service.device_view`, :func:`~fleet.rollout_service.engine_event`,
  :func:`~fleet.rollout_service.telemetry_metrics`) and its ``Dispatch``/``Revert`` actions become
  orders through :func:`~fleet.rollout_service.order_version`;
- the agent's chunk transfer (:class:`agent.transfer.Transfer`), one instance per download, fed
  with ``Start``, ``PartReceived``, ``Tick`` and ``Reconnected`` from a simulated link.

Around them, each device does what the agent does with an order (``agent.daemon`` and
``agent.updater``): one deployment at a time (the newest queued order wins), ``received``, the
manifest round trip, ``downloading`` and the transfer (resuming from the chunks it verified
before), ``downloaded`` after the whole-file check and install, ``self_test``, then ``failed``
or ``activated`` and a probation that ends in ``committed`` or, on a crash loop,
``rolled_back``. It sends a state report after every switch and a telemetry window
``telemetry_interval_s`` after it. Reports travel with the device's one-way latency; while it is
offline they wait in its outbox and orders wait at the broker (persistent sessions), and the fleet
sees it offline when the broker publishes its will (``will_delay_s``).

The fleet and its faults are drawn from a seed (:mod:`simulators.scale_fleet`): hardware classes
with shares, per-device bandwidth and latency, chunk loss (more on flaky links), corrupted chunks,
devices offline at the start (back later, or never), outages during the run, devices enrolling
mid-rollout, and per release: a self-test that fails on a hardware class, crash loops during
probation, transient install errors and a latency factor.

Scenarios: ``good`` rolls out 2.0.0 (slightly faster, rare faults) in stages 1/10/50/100% to the
whole fleet; ``bad`` rolls out 3.0.0, which fails its self-test on the ``coral`` class and is 1.6x
slower elsewhere: the first gate must halt it and revert every device that ran it.

Where the simulation is coarse, on purpose, to run 100,000 devices in under a minute:

- *Engine tick.* The service steps every ``rollout_tick_s`` (1 s); here the engine is stepped every
  ``engine_tick_s`` (120 s) of simulated time: a step over 100,000 devices takes about 0.1 s,
  so the number of steps is what the run costs. An order therefore waits up to one tick, and a
  freed slot up to one tick before it is used again. A tick is skipped when nothing arrived since
  the last step and none of the engine's timers (time-outs, retries, re-sent reverts, the end of
  a soak) fell due: such a step would change nothing. ``skip_idle_ticks=False`` steps at every
  tick; the tests check that both give the same rollout.
- *Garbage collection.* Python's cyclic collector is off during a run: a run makes no reference
  cycles (``gc.collect()`` after one finds nothing), so the collector would only walk the
  million live objects again and again.
- *Chunks.* A bundle of ``bundle_mb`` is cut into ``chunks`` chunks (4 by default, not the
  256 KiB of real bundles), and every byte handed to the transfer stands for
  ``chunk size / 1024`` modelled bytes; the transfer's byte-rate floor is scaled by the same
  factor, so it takes the same decisions. The bytes of the chunks in flight share the link
  (rather than arriving one chunk after the other, which with 5 MB chunks would leave the last
  ones silent for longer than the request time-out), and arrive as one part per chunk per wake-up:
  at each ``Tick`` (every ``transfer_tick_s``) and when a chunk's last byte lands.
- *Telemetry.* Each device sends one telemetry window after each switch of version instead of
  one every 30 s: the engine only reads the latest.

Measured: the simulated time to finish (stage by stage), the blast radius (devices that ever
activated the version, and where they were), and the engine's decision latency: the real time
of every :func:`~fleet.rollouts.step`.
"""

from __future__ import annotations

import argparse
import gc
import heapq
import itertools
import json
import math
import platform
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from hashlib import sha256
from typing import Any

from agent.transfer import Action as TransferAction
from agent.transfer import (
    ChunkSpec,
    Completed,
    Failed,
    PartReceived,
    Reconnected,
    RequestChunks,
    Start,
    Tick,
    Transfer,
    TransferLimits,
    WriteChunk,
)
from fleet.rollout_service import device_view, engine_event, order_version, telemetry_metrics
from fleet.rollouts import (
    DeviceEvent,
    DeviceMetrics,
    DeviceState,
    DeviceView,
    Dispatch,
    GateDecision,
    Gates,
    Plan,
    Revert,
    Rollout,
    RolloutState,
    Stage,
    StateChanged,
    preview,
    step,
)
from simulators.scale_fleet import (
    BAD,
    CURRENT,
    GOOD,
    MODEL,
    Release,
    ScaleConfig,
    SimDevice,
    WireChunk,
    make_fleet,
)

__all__ = ["SCENARIOS", "Report", "main", "run_scale", "simulate"]

SCENARIOS: dict[str, Release] = {"good": GOOD, "bad": BAD}
SCALED_CHUNK_BYTES = 1024  # real bytes handed to the transfer per chunk
PAYLOAD_FILE = "weights/model.bin"
_DONE = 1e-3  # modelled bytes below which a chunk has fully arrived
_SAME_TIME_S = 1e-6

# heap events (device side and the engine's ticks)
_TICK, _ORDER, _FETCH, _WIRE, _INSTALLED, _TESTED, _COMMIT, _CRASH = range(8)
_TELEMETRY, _ONLINE, _OFFLINE, _WILL, _ENROLL = range(8, 13)
# what devices send up, as the fleet service receives it
_UP_EVENT, _UP_STATE, _UP_TELEMETRY, _UP_PRESENCE = range(4)

_IN_PROGRESS = DeviceState.IN_PROGRESS
_FAILED = DeviceState.FAILED
_REVERTING = DeviceState.REVERTING
_SUCCEEDED = DeviceState.SUCCEEDED


@dataclass(frozen=True, slots=True)
class Report:
    """A deployment report as a device sends it (``shared.protocol.DeploymentEvent``'s fields)."""

    device_id: str
    model: str
    version: str
    phase: str
    failure_class: str | None = None
    detail: str | None = None


@dataclass(frozen=True)
class _Payload:
    """The bundle as the transfer sees it: scaled chunks, their bytes and the agent's limits."""

    specs: tuple[ChunkSpec, ...]
    data: tuple[bytes, ...]
    corrupt: tuple[bytes, ...]
    chunk_bytes: float  # modelled bytes per chunk
    limits: TransferLimits

    @classmethod
    def make(cls, config: ScaleConfig) -> _Payload:
        rng = random.Random(f"payload-{config.seed}")  # noqa: S311 - simulation, not cryptography
        data = tuple(rng.randbytes(SCALED_CHUNK_BYTES) for _ in range(config.chunks))
        specs = tuple(
            ChunkSpec(PAYLOAD_FILE, i, i * SCALED_CHUNK_BYTES, len(d), sha256(d).hexdigest())
            for i, d in enumerate(data)
        )
        chunk_bytes = config.bundle_mb * 1e6 / config.chunks
        scale = chunk_bytes / SCALED_CHUNK_BYTES
        # the agent's defaults (agent.config.AgentSettings), its byte-rate floor scaled
        limits = TransferLimits(min_bytes_per_s=1024.0 / scale)
        corrupt = tuple(bytes([d[0] ^ 0xFF]) + d[1:] for d in data)
        return cls(specs, data, corrupt, chunk_bytes, limits)


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def _plan(config: ScaleConfig, release: Release) -> Plan:
    return Plan(
        rollout_id=f"scale-{release.version}",
        model=MODEL,
        version=release.version,
        previous_version=CURRENT.version,
        stages=tuple(Stage(percent=p, soak_s=config.soak_s) for p in config.stages_percent),
        salt=f"scale-{config.seed}",
        max_in_flight=config.in_flight_cap,
        gates=Gates(),
        revert_on_fail=True,
        device_timeout_s=config.device_timeout_s,
    )


def next_engine_timer(plan: Plan, rollout: Rollout, *, after: float) -> float:
    """The first time later than ``after`` at which a step with no new input could act.

    The engine acts on time alone through Rule 5 (an in-flight device times out; a retry falls
    due), Rule 7 (a revert is sent again) and Rule 6 (a soak ends). A timer at or before
    ``after`` was already seen by the step at ``after``: only new input can make it matter.
    """
    due = math.inf
    timeout, stage = plan.device_timeout_s, rollout.stage
    last = rollout.stage_started_at or 0.0
    for p in rollout.progress.values():
        st = p.state
        if st is _IN_PROGRESS:
            t = p.updated_at + timeout
            if after < t < due:
                due = t
        elif p.next_retry_at is not None and after < p.next_retry_at < due:
            due = p.next_retry_at
        if (st is _SUCCEEDED or st is _FAILED) and p.stage == stage and p.attempts:
            last = max(last, p.updated_at)
    if rollout.state is RolloutState.RUNNING and not rollout.reverting:
        soak_end = last + plan.stages[stage].soak_s
        if after < soak_end < due:
            due = soak_end
    return due


class _Run:
    """One scenario: the fleet, the fleet service's records, the engine and the event heap."""

    def __init__(self, config: ScaleConfig, release: Release) -> None:
        self.config = config
        self.release = release
        self.plan = _plan(config, release)
        self.payload = _Payload.make(config)
        self.rng = random.Random(f"run-{config.seed}-{release.version}")  # noqa: S311 - simulation
        self.devices = make_fleet(config)
        self.index = {d.device_id: d.index for d in self.devices}
        self.now = 0.0
        self.heap: list[tuple[float, int, int, int, Any]] = []
        # what devices sent up, by the engine tick that first sees it
        self.inbox: dict[int, list[tuple[float, int, int, int, Any]]] = {}
        self.tick = 0  # the engine's ticks are at tick * engine_tick_s
        self.seq = itertools.count()
        # the fleet service's records of each device (registry, latest state report, telemetry)
        n = len(self.devices)
        self.fleet_online = [False] * n
        self.fleet_version: list[str | None] = [None] * n
        self.fleet_reported_at: list[float | None] = [None] * n
        self.samples: dict[int, DeviceMetrics] = {}
        self.views: dict[str, DeviceView] = {}
        self.metrics: dict[tuple[str, str], DeviceMetrics] = {}
        self.views_changed = False
        # the engine
        self.rollout = Rollout()
        self.last_step_at = -math.inf
        self.next_timer: float | None = None
        self.step_seconds: list[float] = []
        self.gate_step_seconds: list[float] = []
        self.ticks_skipped = 0
        self.stage_starts: dict[int, float] = {}
        self.gates: list[dict[str, Any]] = []
        self.state_at: dict[str, float] = {}
        self.preview_blast_radius = 0
        # bookkeeping
        self.orders_in_flight = 0
        self.presence_ahead = 0  # devices still to come online (back from offline, or enrolling)
        self.finished = ""
        self.counts: Counter[str] = Counter()
        self.switched_at: dict[int, float] = {}  # device -> when it committed the new version
        self.first_failure_at: float | None = None  # a step first receives a failure of it

    # -- the loop --------------------------------------------------------------------------------

    def run(self) -> None:
        self._set_up()
        handlers: dict[int, Callable[[SimDevice, Any], None]] = {  # local: no reference cycle
            _ORDER: self._on_order,
            _FETCH: self._on_fetch,
            _WIRE: self._on_wire,
            _INSTALLED: self._on_installed,
            _TESTED: self._on_tested,
            _COMMIT: self._on_commit,
            _CRASH: self._on_crash,
            _TELEMETRY: self._on_telemetry,
            _ONLINE: self._on_online,
            _OFFLINE: self._on_offline,
            _WILL: self._on_will,
            _ENROLL: self._on_enroll,
        }
        heap, horizon, devices = self.heap, self.config.horizon_s, self.devices
        while heap and not self.finished:
            t, _, kind, i, arg = heapq.heappop(heap)
            if t > horizon:
                self.finished = "horizon"
                break
            self.now = t
            if kind == _TICK:
                self._on_tick()
            else:
                handlers[kind](devices[i], arg)

    def _at(self, t: float, kind: int, dev: SimDevice | None, arg: Any = None) -> None:
        heapq.heappush(self.heap, (t, next(self.seq), kind, -1 if dev is None else dev.index, arg))

    def _set_up(self) -> None:
        for dev in self.devices:
            if dev.enroll_at > 0:
                self._at(dev.enroll_at, _ENROLL, dev)
                self.presence_ahead += 1
                continue
            dev.running = CURRENT.version
            dev.installed.add(CURRENT.version)
            dev.online = dev.ever_online = dev.offline_until is None
            i = dev.index
            self.fleet_online[i] = dev.online
            self.fleet_version[i] = CURRENT.version
            self.fleet_reported_at[i] = 0.0
            self._record_sample(i, self._sample(dev))  # the control group's telemetry
            self._refresh_view(i)
            if dev.offline_until is not None and dev.offline_until != math.inf:
                self._at(dev.offline_until, _ONLINE, dev)
                self.presence_ahead += 1
            self.counts["offline at start" if dev.offline_until else "online at start"] += 1
        for dev in self.devices:
            if dev.outage is not None:
                self._at(dev.outage[0], _OFFLINE, dev, dev.outage[1])
        self.preview_blast_radius = preview(self.plan, list(self.views.values())).blast_radius
        self._at(0.0, _TICK, None)

    # -- the engine, fed as the fleet service feeds it ------------------------------------------

    def _on_tick(self) -> None:
        arrived = self.tick in self.inbox
        if (
            self.config.skip_idle_ticks
            and not arrived
            and not self.views_changed
            and self.now < self._next_timer()
        ):
            self.ticks_skipped += 1
        else:
            self._step()
        if not self.finished:
            self.tick += 1
            self._at(self.tick * self.config.engine_tick_s, _TICK, None)

    def _next_timer(self) -> float:
        if self.next_timer is None:
            self.next_timer = next_engine_timer(self.plan, self.rollout, after=self.last_step_at)
        return self.next_timer

    def _step(self) -> None:
        events = self._receive()
        devices = list(self.views.values())
        started = time.perf_counter()
        result = step(
            self.plan,
            self.rollout,
            devices=devices,
            events=events,
            metrics=self.metrics,
            now=self.now,
        )
        seconds = time.perf_counter() - started
        self.step_seconds.append(seconds)
        before, self.rollout = self.rollout, result.rollout
        self.last_step_at, self.next_timer, self.views_changed = self.now, None, False
        for action in result.actions:
            if isinstance(action, Dispatch | Revert):
                version = order_version(action)  # as the service turns actions into orders
                if version is not None:
                    self._send_order(self.devices[self.index[action.device_id]], version)
            elif isinstance(action, GateDecision):
                self.gate_step_seconds.append(seconds)
                self._record_gate(action, before)
            elif isinstance(action, StateChanged):
                if action.new is not action.old:
                    self.state_at.setdefault(action.new.value, self.now)
                self.stage_starts.setdefault(self.rollout.stage, self.now)
        self._check_finished()

    def _receive(self) -> list[DeviceEvent]:
        """Apply everything that arrived by now, as the MQTT bridge stores it."""
        events = []
        for _, _, kind, i, payload in sorted(self.inbox.pop(self.tick, ())):
            if kind == _UP_EVENT:
                events.append(engine_event(payload))
                if (
                    self.first_failure_at is None
                    and payload.phase in ("failed", "rolled_back")
                    and payload.version == self.release.version
                ):
                    self.first_failure_at = self.now
            elif kind == _UP_STATE:
                self._record_state(i, *payload)
            elif kind == _UP_TELEMETRY:
                self._record_sample(i, payload)
            else:
                self.fleet_online[i] = payload
                self._refresh_view(i)
        return events

    def _record_state(self, i: int, version: str | None, at: float) -> None:
        did, old = self.devices[i].device_id, self.fleet_version[i]
        self.fleet_version[i], self.fleet_reported_at[i] = version, at
        if old != version:  # the latest telemetry is keyed by the version the device reports
            if old is not None:
                self.metrics.pop((did, old), None)
            sample = self.samples.get(i)
            if sample is not None and version is not None:
                self.metrics[(did, version)] = sample
        self._refresh_view(i)

    def _record_sample(self, i: int, entry: dict[str, Any]) -> None:
        sample = telemetry_metrics(entry)
        if sample is None:
            return
        self.samples[i] = sample
        version = self.fleet_version[i]
        if version is not None:
            self.metrics[(self.devices[i].device_id, version)] = sample

    def _refresh_view(self, i: int) -> None:
        dev, at = self.devices[i], self.fleet_reported_at[i]
        self.views[dev.device_id] = device_view(
            device_id=dev.device_id,
            model=MODEL,
            hardware_class=dev.hw.name,
            online=self.fleet_online[i],
            group=dev.group,
            pinned=None,
            version=self.fleet_version[i],
            runtime=dev.hw.runtime,
            reported_at=None if at is None else datetime.fromtimestamp(at, UTC),
        )
        self.views_changed = True

    def _send_order(self, dev: SimDevice, version: str) -> None:
        self.counts["orders"] += 1
        if dev.online:
            self.orders_in_flight += 1
            self._at(self.now + dev.one_way_s, _ORDER, dev, version)
        else:
            dev.commands.append(version)

    def _record_gate(self, d: GateDecision, before: Rollout) -> None:
        figures: dict[str, Any] = dict(d.figures)
        install, latency = figures.get("install", {}), figures.get("latency", {})
        self.gates.append(
            {
                "stage": d.stage,
                "verdict": d.verdict,
                "at_s": round(self.now, 1),
                "cohort": install.get("dispatched"),
                "succeeded": install.get("succeeded"),
                "failed": install.get("failed"),
                "p95_ratio": latency.get("p95_ratio"),
                "crash_rate": figures.get("crash", {}).get("rate"),
                "reason": d.reason[:300],
                **self._cohort_timing(d.stage, before),
            }
        )

    def _cohort_timing(self, stage: int, before: Rollout) -> dict[str, Any]:
        """Why a gate came when it did. Its soak runs from the cohort's last report (``before``
        the deciding step), and devices that came online or enrolled after the stage started
        join it (Rule 2) and report late."""
        start = self.stage_starts.get(stage, 0.0)
        last = rest = start  # the last report of the cohort, and of its devices online at start
        late = 0
        for did, p in before.progress.items():
            if p.stage != stage or not p.attempts:
                continue
            joined = self.devices[self.index[did]].came_online_at > start
            late += joined
            if p.state is _SUCCEEDED or p.state is _FAILED:
                last = max(last, p.updated_at)
                rest = rest if joined else max(rest, p.updated_at)
        return {
            "last_cohort_report_at_s": round(last, 1),
            "came_online_later": late,
            "others_last_report_at_s": round(rest, 1),
        }

    def _check_finished(self) -> None:
        state = self.rollout.state
        if state in (RolloutState.PAUSED, RolloutState.ABORTED):
            self.finished = state.value  # needs a person: the simulation stops here
            return
        if state not in (RolloutState.COMPLETED, RolloutState.HALTED) or self.inbox:
            return
        if self.orders_in_flight or (state is RolloutState.COMPLETED and self.presence_ahead):
            return
        if any(d.busy or d.in_probation or d.commands for d in self.devices):
            return
        for did, p in self.rollout.progress.items():
            if p.state is _IN_PROGRESS or p.state is _REVERTING:
                return
            if (
                state is RolloutState.COMPLETED
                and self.views[did].online
                and (p.state is DeviceState.PENDING or p.next_retry_at is not None)
            ):
                return
        self.finished = state.value

    # -- a device: orders and the deployment pipeline ------------------------------------------

    def _release(self, version: str) -> Release:
        return self.release if version == self.release.version else CURRENT

    def _on_order(self, dev: SimDevice, version: str) -> None:
        self.orders_in_flight -= 1
        if dev.busy:
            dev.queued = version  # single flight: the newest order waits
        else:
            self._deploy(dev, version)

    def _deploy(self, dev: SimDevice, version: str) -> None:
        dev.busy, dev.deploying = True, version
        dev.token += 1
        if version in dev.failed_self_test:
            detail = f"{MODEL} {version} already failed its self-test on this device"
            self._emit(dev, "failed", version, "self_test", detail)
            self._finish(dev)
            return
        self._emit(dev, "received", version)
        self._at(self.now + 2 * dev.one_way_s, _FETCH, dev, dev.token)  # the manifest

    def _on_fetch(self, dev: SimDevice, token: int) -> None:
        if token != dev.token:
            return
        version = dev.deploying or ""
        if version in dev.installed:
            self._self_test(dev)
            return
        self._emit(dev, "downloading", version)
        payload = self.payload
        dev.transfer = Transfer(
            payload.specs,
            have=dev.verified.setdefault(version, set()),
            limits=payload.limits,
            request_id_prefix=f"{dev.index}-{dev.token}",
        )
        dev.wire.clear()
        dev.link_t = self.now
        self._transfer_actions(dev, dev.transfer.handle(Start(self.now)))
        self._wake_later(dev)

    def _on_installed(self, dev: SimDevice, token: int) -> None:
        if token != dev.token:
            return
        version = dev.deploying or ""
        if self.rng.random() < self._release(version).install_failure_rate:
            self.counts["install failures"] += 1
            self._emit(dev, "failed", version, "storage", "install: no space left on device")
            self._finish(dev)
            return
        dev.installed.add(version)
        self._emit(dev, "downloaded", version)
        self._self_test(dev)

    def _self_test(self, dev: SimDevice) -> None:
        self._emit(dev, "self_test", dev.deploying or "")
        took = dev.hw.self_test_s * self.rng.uniform(0.8, 1.2)
        self._at(self.now + took, _TESTED, dev, dev.token)

    def _on_tested(self, dev: SimDevice, token: int) -> None:
        if token != dev.token:
            return
        version = dev.deploying or ""
        release = self._release(version)
        if (
            dev.hw.name in release.fails_self_test_on
            or self.rng.random() < release.self_test_failure_rate
        ):
            self.counts["self-test failures"] += 1
            dev.failed_self_test.add(version)
            detail = f"{MODEL} {version}: no runtime passed the test vectors on {dev.hw.name}"
            self._emit(dev, "failed", version, "self_test", detail)
        elif dev.running == version:
            self._emit(dev, "activated", version, detail="already active")
            self._report_state(dev)
        else:
            self._switch(dev, version)
            if self.rng.random() < release.crash_loop_rate:
                crash_at = self.now + self.config.probation_s * self.rng.uniform(0.2, 0.9)
                self._at(crash_at, _CRASH, dev, dev.activation)
            else:
                self._at(self.now + self.config.probation_s, _COMMIT, dev, dev.activation)
        self._finish(dev)

    def _switch(self, dev: SimDevice, version: str) -> None:
        dev.previous, dev.running = dev.running, version
        dev.ran.add(version)
        dev.activation += 1
        dev.in_probation = True
        self._emit(dev, "activated", version)
        self._report_state(dev)
        wait = self.config.telemetry_interval_s * self.rng.uniform(1.0, 1.5)
        self._at(self.now + wait, _TELEMETRY, dev, dev.activation)

    def _on_commit(self, dev: SimDevice, activation: int) -> None:
        if activation != dev.activation or not dev.in_probation:
            return
        dev.in_probation = False
        if dev.running == self.release.version:
            self.switched_at[dev.index] = self.now
        self._emit(dev, "committed", dev.running or "")
        self._report_state(dev)

    def _on_crash(self, dev: SimDevice, activation: int) -> None:
        if activation != dev.activation or not dev.in_probation:
            return
        self.counts["crash loops"] += 1
        bad = dev.running or ""
        dev.running, dev.previous = dev.previous, None
        dev.activation += 1
        dev.in_probation = False
        self._emit(dev, "rolled_back", bad, "crash_loop", "crash loop: 4 restarts during probation")
        self._report_state(dev)
        self._at(self.now + self.config.telemetry_interval_s, _TELEMETRY, dev, dev.activation)

    def _finish(self, dev: SimDevice) -> None:
        dev.busy, dev.deploying, dev.transfer = False, None, None
        dev.wire.clear()
        if dev.queued is not None:
            version, dev.queued = dev.queued, None
            self._deploy(dev, version)

    # -- a device: the download ----------------------------------------------------------------

    def _transfer_actions(self, dev: SimDevice, actions: list[TransferAction]) -> None:
        for action in actions:
            if isinstance(action, RequestChunks):
                for _, index in action.chunks:
                    self._request_chunk(dev, index)
            elif isinstance(action, WriteChunk):
                dev.verified[dev.deploying or ""].add(action.chunk.key)
            elif isinstance(action, Completed):
                dev.transfer = None
                dev.wire.clear()
                took = 0.5 + dev.hw.install_s_per_mb * self.config.bundle_mb
                self._at(self.now + took, _INSTALLED, dev, dev.token)
            elif isinstance(action, Failed):
                self.counts[f"transfers failed: {action.failure_class}"] += 1
                self._emit(dev, "failed", dev.deploying or "", action.failure_class, action.reason)
                self._finish(dev)

    def _request_chunk(self, dev: SimDevice, index: int) -> None:
        rng = self.rng
        if not dev.online:
            self.counts["chunk requests sent offline"] += 1
        elif rng.random() < dev.chunk_loss:
            self.counts["chunks lost"] += 1
        else:
            corrupt = rng.random() < self.config.network.corrupt_chunk_rate
            self.counts["chunks corrupted"] += corrupt
            first = self.now + 2 * dev.one_way_s
            dev.wire.append(WireChunk(index, first, self.payload.chunk_bytes, corrupt=corrupt))

    def _on_wire(self, dev: SimDevice, gen: int) -> None:
        if gen != dev.link_gen or dev.transfer is None:
            return
        transfer = dev.transfer
        self._deliver(dev)
        if dev.transfer is transfer:
            self._transfer_actions(dev, transfer.handle(Tick(self.now)))
        if dev.transfer is transfer:
            self._wake_later(dev)

    def _advance_wire(self, dev: SimDevice) -> None:
        """Move the link from ``dev.link_t`` to now: the chunks in flight share its bandwidth.

        Each round ends when a chunk completes, a chunk's first byte arrives, or at now.
        """
        t, now, bandwidth = dev.link_t, self.now, dev.bandwidth_bytes_s
        while True:
            active = [w for w in dev.wire if w.first_byte_at <= t and w.remaining > 0.0]
            until = min([now, *(w.first_byte_at for w in dev.wire if w.first_byte_at > t)])
            if active:
                rate = bandwidth / len(active)
                least = min(w.remaining for w in active)
                if t + least / rate <= until + _SAME_TIME_S:  # a chunk completes first
                    until, sent = min(until, t + least / rate), least
                else:
                    sent = (until - t) * rate
                for w in active:
                    w.remaining -= sent
                    if w.remaining <= _DONE:
                        w.remaining = 0.0
            if until >= now:
                break
            t = until
        dev.link_t = now

    def _deliver(self, dev: SimDevice) -> None:
        """Hand the transfer the bytes that arrived since the last wake-up, one part per chunk."""
        self._advance_wire(dev)
        transfer, payload, size = dev.transfer, self.payload, SCALED_CHUNK_BYTES
        for w in list(dev.wire):
            done = w.remaining == 0.0
            upto = size if done else int(size * (1.0 - w.remaining / payload.chunk_bytes))
            if upto > w.handed and transfer is not None:
                data = (payload.corrupt if w.corrupt else payload.data)[w.index]
                part = PartReceived(
                    self.now, PAYLOAD_FILE, w.index, w.handed, size, data[w.handed : upto]
                )
                w.handed = upto
                self._transfer_actions(dev, transfer.handle(part))
                if dev.transfer is not transfer:
                    return
            if done:
                dev.wire.remove(w)

    def _wake_later(self, dev: SimDevice) -> None:
        """The download's next wake-up: the next Tick, or sooner when a chunk completes."""
        now = self.now
        wake = now + self.config.transfer_tick_s
        active = [w.remaining for w in dev.wire if w.first_byte_at <= now]
        if active:
            wake = min(wake, now + min(active) * len(active) / dev.bandwidth_bytes_s)
        for w in dev.wire:
            if now < w.first_byte_at < wake:
                wake = w.first_byte_at
        dev.link_gen += 1
        self._at(max(wake, now + _SAME_TIME_S), _WIRE, dev, dev.link_gen)

    # -- a device: presence, reports and telemetry ---------------------------------------------

    def _send_up(self, arrival: float, kind: int, index: int, payload: object) -> None:
        tick = max(self.tick, math.ceil(arrival / self.config.engine_tick_s))
        self.inbox.setdefault(tick, []).append((arrival, next(self.seq), kind, index, payload))

    def _up(self, dev: SimDevice, kind: int, payload: object) -> None:
        if dev.online:
            self._send_up(self.now + dev.one_way_s, kind, dev.index, payload)
        else:
            dev.outbox.append((kind, payload))  # journalled; sent when the link is back

    def _emit(
        self,
        dev: SimDevice,
        phase: str,
        version: str,
        failure_class: str | None = None,
        detail: str | None = None,
    ) -> None:
        self._up(
            dev, _UP_EVENT, Report(dev.device_id, MODEL, version, phase, failure_class, detail)
        )

    def _report_state(self, dev: SimDevice) -> None:
        self._up(dev, _UP_STATE, (dev.running, self.now))

    def _sample(self, dev: SimDevice) -> dict[str, Any]:
        """One telemetry window of the running version (``Telemetry.models[model]``)."""
        release = self._release(dev.running or "")
        rng = self.rng
        p95 = dev.hw.p95_ms * dev.latency_factor * release.p95_factor * rng.uniform(0.95, 1.05)
        requests = max(1, int(dev.requests_per_s * self.config.telemetry_interval_s))
        errors = int(requests * release.error_rate + rng.random())
        latency = {"p50": p95 * 0.6, "p95": p95, "p99": p95 * 1.3}
        return {"requests": requests, "errors": errors, "latency_ms": latency}

    def _on_telemetry(self, dev: SimDevice, activation: int) -> None:
        if activation == dev.activation and dev.running is not None:
            self._up(dev, _UP_TELEMETRY, self._sample(dev))

    def _on_offline(self, dev: SimDevice, duration: float) -> None:
        if not dev.online:
            return  # not enrolled yet, or already offline
        self.counts["outages"] += 1
        if dev.transfer is not None:
            self._deliver(dev)  # what arrived before the link dropped
        dev.online = False
        dev.wire.clear()
        dev.outage_gen += 1
        self._at(self.now + self.config.will_delay_s, _WILL, dev, dev.outage_gen)
        self._at(self.now + duration, _ONLINE, dev)
        self.presence_ahead += 1

    def _on_will(self, dev: SimDevice, gen: int) -> None:
        if gen == dev.outage_gen and not dev.online:
            self._send_up(self.now, _UP_PRESENCE, dev.index, False)

    def _on_online(self, dev: SimDevice, _: object) -> None:
        self.presence_ahead -= 1
        dev.online = dev.ever_online = True
        dev.came_online_at = self.now
        dev.outage_gen += 1
        self._up(dev, _UP_PRESENCE, True)
        for kind, payload in dev.outbox:
            self._up(dev, kind, payload)
        dev.outbox.clear()
        self._report_state(dev)
        for version in dev.commands:
            self.orders_in_flight += 1
            self._at(self.now + dev.one_way_s, _ORDER, dev, version)
        dev.commands.clear()
        if dev.transfer is not None:
            dev.link_t = self.now
            self._transfer_actions(dev, dev.transfer.handle(Reconnected(self.now)))
            if dev.transfer is not None:
                self._wake_later(dev)

    def _on_enroll(self, dev: SimDevice, _: object) -> None:
        self.counts["enrolled mid-rollout"] += 1
        dev.running = CURRENT.version
        dev.installed.add(CURRENT.version)
        self._on_online(dev, None)
        self._at(self.now + self.config.telemetry_interval_s, _TELEMETRY, dev, dev.activation)


# -- the report ---------------------------------------------------------------------------------


def _ms(values: Sequence[float]) -> dict[str, float]:
    return {
        "p50": round(_percentile(values, 50) * 1000, 2),
        "p95": round(_percentile(values, 95) * 1000, 2),
        "max": round(max(values, default=math.nan) * 1000, 2),
    }


def _stages(run: _Run) -> list[dict[str, Any]]:
    decided = {g["stage"]: g for g in run.gates}
    rows = []
    for k, stage in enumerate(run.plan.stages):
        start = run.stage_starts.get(k)
        gate = decided.get(k)
        end = gate["at_s"] if gate else None
        rows.append(
            {
                "stage": k,
                "percent": stage.percent,
                "started_at_s": None if start is None else round(start, 1),
                "gate_at_s": end,
                "duration_s": None if start is None or end is None else round(end - start, 1),
                "verdict": gate["verdict"] if gate else None,
                "cohort": gate["cohort"] if gate else None,
            }
        )
    return rows


def _group(run: _Run, members: list[SimDevice]) -> dict[str, int]:
    """How many of ``members`` came online at some point and how many run the new version."""
    version = run.release.version
    return {
        "devices": len(members),
        "came_online": sum(d.ever_online for d in members),
        "on_new_version": sum(d.running == version for d in members),
    }


def _devices(run: _Run) -> dict[str, Any]:
    version = run.release.version
    progress = run.rollout.progress
    enrolled = [d for d in run.devices if d.running is not None]
    reachable = [d for d in enrolled if d.ever_online]
    left: Counter[str] = Counter()  # reachable devices not on the new version, by engine record
    for d in reachable:
        if d.running != version:
            p = progress.get(d.device_id)
            left[(p.failure_class or p.state.value) if p else "not in the rollout"] += 1
    done = sorted(run.switched_at.values())
    completed = run.state_at.get("completed", math.inf)
    return {
        "fleet": len(run.devices),
        "enrolled": len(enrolled),
        "reachable": len(reachable),
        "never_online": len(enrolled) - len(reachable),
        "on_new_version": sum(d.running == version for d in reachable),
        "not_on_new_version": dict(sorted(left.items())),
        "offline_at_start": _group(run, [d for d in run.devices if d.offline_until is not None]),
        "enrolled_mid_rollout": _group(run, [d for d in run.devices if d.enroll_at > 0]),
        "with_an_outage": _group(run, [d for d in enrolled if d.outage is not None]),
        "updated_after_completion": sum(t > completed for t in done),
        "committed_at_s": {  # when devices committed the version (end of probation)
            "p50": round(_percentile(done, 50), 1) if done else None,
            "p99": round(_percentile(done, 99), 1) if done else None,
            "last": round(done[-1], 1) if done else None,
        },
    }


def _blast(run: _Run) -> dict[str, Any]:
    version = run.release.version
    progress = run.rollout.progress
    ran = [d for d in run.devices if version in d.ran]
    outside = [d.device_id for d in ran if progress[d.device_id].stage != 0]
    states = Counter(progress[d.device_id].state.value for d in ran)
    return {
        "ever_ran": len(ran),
        "ever_ran_by_engine": sum(p.ran_new for p in progress.values()),
        "outside_first_stage": len(outside),
        "came_online_after_the_start": sum(d.came_online_at > 0 for d in ran),
        "outside_first_stage_devices": [] if run.finished == "completed" else outside[:20],
        "still_running": sum(d.running == version for d in run.devices),
        "by_engine_state": dict(sorted(states.items())),
        "preview_blast_radius": run.preview_blast_radius,
    }


def simulate(config: ScaleConfig, release: Release) -> dict[str, Any]:
    """Run one rollout of ``release`` over the fleet of ``config``; return its report."""
    started, cpu_started = time.perf_counter(), time.process_time()
    collecting = gc.isenabled()
    gc.disable()  # a run makes no reference cycles: see the module docstring
    try:
        run = _Run(config, release)
        run.run()
    finally:
        if collecting:
            gc.enable()
    real_s = time.perf_counter() - started
    cpu_s = time.process_time() - cpu_started
    engine_s = sum(run.step_seconds)
    report: dict[str, Any] = {
        "version": release.version,
        "outcome": run.finished or "stalled",
        "state": run.rollout.state.value,
        "stages_reached": run.rollout.stage + 1,
        "simulated": {
            "finished_at_s": round(run.now, 1),
            "completed_at_s": run.state_at.get("completed"),
            "halted_at_s": run.state_at.get("halted"),
            "first_failure_received_at_s": run.first_failure_at,
            "stages": _stages(run),
        },
        "devices": _devices(run),
        "blast_radius": _blast(run),
        "gates": run.gates,
        "faults": dict(sorted(run.counts.items())),
        "engine": {
            "steps": len(run.step_seconds),
            "ticks_skipped": run.ticks_skipped,
            "tick_s": config.engine_tick_s,
            "step_ms": _ms(run.step_seconds),
            "first_step_ms": round(run.step_seconds[0] * 1000, 2),
            "gate_step_ms": _ms(run.gate_step_seconds) if run.gate_step_seconds else None,
            "seconds": round(engine_s, 3),
        },
        "real_seconds": round(real_s, 3),
        "real_seconds_outside_engine": round(real_s - engine_s, 3),
        "cpu_seconds": round(cpu_s, 3),  # of this process: less sensitive to a busy machine
    }
    return report


def _settings(config: ScaleConfig) -> dict[str, Any]:
    return {
        "devices": config.devices,
        "seed": config.seed,
        "hardware_classes": {h.name: h.share for h in config.hardware},
        "bundle_mb": config.bundle_mb,
        "chunks": config.chunks,
        "stages_percent": list(config.stages_percent),
        "soak_s": config.soak_s,
        "max_in_flight": config.in_flight_cap,
        "engine_tick_s": config.engine_tick_s,
        "skip_idle_ticks": config.skip_idle_ticks,
        "probation_s": config.probation_s,
    }


def run_scale(
    devices: int, seed: int, scenario: str, *, config: ScaleConfig | None = None
) -> dict[str, Any]:
    """Run ``scenario`` (``good``, ``bad`` or ``both``) over ``devices`` devices; the report.

    ``config`` overrides the defaults (its ``devices`` and ``seed`` are replaced by the
    arguments).
    """
    if scenario not in (*SCENARIOS, "both"):
        raise ValueError(f"scenario must be good, bad or both, got {scenario!r}")
    config = replace(config or ScaleConfig(), devices=devices, seed=seed)
    names = list(SCENARIOS) if scenario == "both" else [scenario]
    started, cpu_started = time.perf_counter(), time.process_time()
    scenarios = {name: simulate(config, SCENARIOS[name]) for name in names}
    return {
        "settings": _settings(config),
        "scenarios": scenarios,
        "real_seconds": round(time.perf_counter() - started, 3),
        "cpu_seconds": round(time.process_time() - cpu_started, 3),
    }


# -- the command ----------------------------------------------------------------------------------


def _machine() -> dict[str, Any]:
    from agent.runtimes.inventory import scan_cpu

    cpu = scan_cpu()
    return {
        "cpu": cpu.model,
        "usable_cores": cpu.cores,
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
    }


def _minutes(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds / 60:.1f} min"


def _scenario_lines(name: str, r: dict[str, Any]) -> list[str]:
    sim, dev, blast, eng = r["simulated"], r["devices"], r["blast_radius"], r["engine"]
    version = r["version"]
    lines = [
        f"[{name}] {version}: rollout {r['state']} after {r['stages_reached']} stage(s); "
        f"simulation done at {_minutes(sim['finished_at_s'])}; real {r['real_seconds']:.1f} s"
    ]
    gates = {g["stage"]: g for g in r["gates"]}
    for st in sim["stages"]:
        g = gates.get(st["stage"])
        if st["started_at_s"] is None or g is None:
            continue
        lines.append(
            f"  stage {st['stage']} ({st['percent']:g}%): {_minutes(st['started_at_s'])} -> "
            f"gate {g['verdict']} at {_minutes(g['at_s'])}; cohort {g['cohort']:,} "
            f"({g['came_online_later']} came online later); last report "
            f"{_minutes(g['last_cohort_report_at_s'])} (of the others: "
            f"{_minutes(g['others_last_report_at_s'])})"
        )
        if g["verdict"] != "pass":
            lines.append(f"    {g['reason']}")
    if r["state"] == "completed":
        late = dev["offline_at_start"], dev["enrolled_mid_rollout"], dev["with_an_outage"]
        lines.append(
            f"  devices: {dev['on_new_version']:,} of {dev['reachable']:,} reachable run "
            f"{version} ({dev['never_online']} never came online); not: "
            f"{dev['not_on_new_version']}; updated after the last gate: "
            f"{dev['updated_after_completion']}"
        )
        lines.append(
            "  caught up: offline at start {}/{}, enrolled late {}/{}, with an outage {}/{}".format(
                *(x for g in late for x in (g["on_new_version"], g["came_online"]))
            )
        )
    else:
        lines.append(
            f"  blast radius: {blast['ever_ran']:,} devices ran {version} "
            f"({blast['came_online_after_the_start']} of them came online after the start; "
            f"{blast['outside_first_stage']} outside stage 0; {blast['still_running']} still "
            f"run it; engine states {blast['by_engine_state']}); first failure received at "
            f"{_minutes(sim['first_failure_received_at_s'])}, halted at "
            f"{_minutes(sim['halted_at_s'])}"
        )
    step_ms = eng["step_ms"]
    lines.append(
        f"  engine: {eng['steps']} steps ({eng['ticks_skipped']} idle ticks skipped); step "
        f"p50 {step_ms['p50']:.1f} ms, p95 {step_ms['p95']:.1f} ms, max {step_ms['max']:.1f} ms; "
        f"{eng['seconds']:.1f} s of {r['real_seconds']:.1f} s in the engine"
    )
    lines.append(f"  faults: {', '.join(f'{k} {v}' for k, v in r['faults'].items())}")
    return lines


def format_report(report: dict[str, Any]) -> str:
    """The report as lines of text."""
    s = report["settings"]
    lines = [
        f"{s['devices']:,} devices, seed {s['seed']}; bundle {s['bundle_mb']:g} MB in "
        f"{s['chunks']} chunks; stages {s['stages_percent']} %, soak {s['soak_s']:g} s, "
        f"max_in_flight {s['max_in_flight']:,}; engine tick {s['engine_tick_s']:g} s"
    ]
    for name, r in report["scenarios"].items():
        lines.append("")
        lines.extend(_scenario_lines(name, r))
    lines.append("")
    lines.append(
        f"total: {report['real_seconds']:.1f} s real time, {report['cpu_seconds']:.1f} s of CPU"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m simulators.scale``: run, print the report (text or ``--json``), exit 0."""
    parser = argparse.ArgumentParser(
        prog="python -m simulators.scale", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("--devices", type=int, default=100_000, help="fleet size (100000)")
    parser.add_argument("--seed", type=int, default=1, help="fleet and fault seed (1)")
    parser.add_argument(
        "--scenario",
        choices=(*SCENARIOS, "both"),
        default="both",
        help="good: 2.0.0 to the whole fleet; bad: 3.0.0, which the first gate must halt (both)",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON object instead")
    opts = parser.parse_args(argv)
    if opts.devices < 10:
        parser.error("--devices must be >= 10")
    report = run_scale(opts.devices, opts.seed, opts.scenario)
    report["machine"] = _machine()
    given = sys.argv[1:] if argv is None else list(argv)
    report["command"] = " ".join(["python -m simulators.scale", *given])
    print(json.dumps(report, indent=2) if opts.json else format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
