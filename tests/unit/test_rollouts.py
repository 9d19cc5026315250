"""The pure rollout engine: one test per rule, property tests over simulated fleets, pair tests.

A tiny simulated fleet (:class:`Sim`) answers the engine's ``Dispatch`` and ``Revert`` actions the
way agents do: deployment events, state reports with the version really running, telemetry. It
runs on a fake clock; nothing sleeps or touches a socket. The pair tests at the end send every
report through the real protocol models (``shared.protocol``) as JSON bytes, as the MQTT bridge
receives them.
"""

from __future__ import annotations

import doctest
import heapq
import itertools
import json
import math
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fleet.rollouts
from fleet.rollouts import (
    AGENT_FAILURE_CLASSES,
    DEFAULT_RETRIES,
    TRANSITIONS,
    Abort,
    Action,
    DeviceChanged,
    DeviceEvent,
    DeviceMetrics,
    DeviceProgress,
    DeviceState,
    DeviceView,
    Dispatch,
    GateDecision,
    Gates,
    MaintenanceWindow,
    OperatorActionError,
    Pause,
    Plan,
    Promote,
    Resume,
    RetryFailed,
    RetryPolicy,
    Revert,
    Rollout,
    RolloutState,
    Stage,
    StateChanged,
    StepResult,
    apply_operator,
    assign_stages,
    classify_failure,
    describe_transitions,
    effective_pin,
    hash_position,
    held_devices,
    preview,
    step,
    window_open,
)
from shared.protocol import DeploymentEvent, ReportedState, Telemetry, parse_payload

V1, V2 = "1.0.0", "2.0.0"
REPORT_TIME = "2026-11-21T12:00:00Z"  # the engine never reads report times (Rule 4)
S = RolloutState
D = DeviceState
NO_TELEMETRY = Gates(min_sample=3, max_error_rate=None, max_p95_ratio=None)
PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def make_plan(**overrides: object) -> Plan:
    values: dict[str, object] = {
        "rollout_id": "r1",
        "model": "cnn",
        "version": V2,
        "previous_version": V1,
        "salt": "salt-1",
        "stages": (
            Stage(percent=10, soak_s=600),
            Stage(percent=50, soak_s=600),
            Stage(percent=100),
        ),
        "max_in_flight": 50,
        "gates": NO_TELEMETRY,
        "device_timeout_s": 1800.0,
    }
    values.update(overrides)
    return Plan(**values)


def make_fleet(
    n: int,
    classes: Iterable[str] = ("rpi5", "jetson"),
    runtimes: Iterable[str] = ("onnxruntime",),
    *,
    prefix: str = "dev",
    **fields: object,
) -> list[DeviceView]:
    pairs = list(itertools.product(classes, runtimes))
    return [
        DeviceView(
            f"{prefix}-{i:04d}",
            hardware_class=pairs[i % len(pairs)][0],
            runtime=pairs[i % len(pairs)][1],
            running_version=V1,
            reported_at=0.0,
            **fields,
        )
        for i in range(n)
    ]


def of(actions: Iterable[Action], kind: type) -> list:
    return [a for a in actions if isinstance(a, kind)]


def dispatched(result: StepResult) -> list[str]:
    return [a.device_id for a in of(result.actions, Dispatch)]


def decisions(result: StepResult) -> list[GateDecision]:
    return of(result.actions, GateDecision)


def states(rollout: Rollout) -> Counter[DeviceState]:
    return Counter(p.state for p in rollout.progress.values())


def committed(ids: Iterable[str], version: str = V2) -> list[DeviceEvent]:
    return [DeviceEvent(d, version, "committed") for d in ids]


def running(
    devices: list[DeviceView], ids: Iterable[str], version: str, at: float
) -> list[DeviceView]:
    chosen = set(ids)
    return [
        replace(v, running_version=version, reported_at=at) if v.device_id in chosen else v
        for v in devices
    ]


# --- a simulated fleet --------------------------------------------------------------------------


@dataclass
class SimDevice:
    view: DeviceView
    outcome: str = "ok"  # ok | fail:<agent class>[:detail] | crash | silent | flaky
    p95_ms: float = 10.0  # on the previous version
    slowdown: float = 1.0  # p95 factor on the new version
    error_share: float = 0.0  # inference errors on the new version


@dataclass
class Sim:
    """Devices that act on Dispatch and Revert like agents, with a report delay."""

    plan: Plan
    devices: dict[str, SimDevice]
    delay_s: float = 60.0
    queue: list[tuple[float, int, str, str]] = field(default_factory=list)
    seq: Iterator[int] = field(default_factory=itertools.count)
    dispatches: Counter[str] = field(default_factory=Counter)
    reverts: Counter[str] = field(default_factory=Counter)
    ran_new: set[str] = field(default_factory=set)
    attempts: Counter[str] = field(default_factory=Counter)
    telemetry: dict[tuple[str, str], DeviceMetrics] = field(default_factory=dict)

    @classmethod
    def of(cls, plan: Plan, views: Iterable[DeviceView], **kw: object) -> Sim:
        return cls(plan, {v.device_id: SimDevice(v) for v in views}, **kw)

    def views(self) -> list[DeviceView]:
        return [d.view for d in self.devices.values()]

    def set(self, device_id: str, **changes: object) -> None:
        d = self.devices[device_id]
        d.view = replace(d.view, **changes)

    def execute(self, actions: Iterable[Action], now: float) -> None:
        for a in actions:
            if isinstance(a, Dispatch):
                self.dispatches[a.device_id] += 1
                self.attempts[a.device_id] += 1
                heapq.heappush(
                    self.queue,
                    (now + self.delay_s, next(self.seq), a.device_id, "deploy"),
                )
            elif isinstance(a, Revert):
                self.reverts[a.device_id] += 1
                if self.devices[a.device_id].view.online:
                    heapq.heappush(
                        self.queue,
                        (now + self.delay_s, next(self.seq), a.device_id, f"revert:{a.to_version}"),
                    )

    def advance(self, now: float) -> list[DeviceEvent]:
        events: list[DeviceEvent] = []
        while self.queue and self.queue[0][0] <= now:
            _, _, did, what = heapq.heappop(self.queue)
            events.extend(self._deliver(did, what, now))
        self._report_telemetry()
        return events

    def _deliver(self, did: str, what: str, now: float) -> list[DeviceEvent]:
        d, v2 = self.devices[did], self.plan.version
        if what.startswith("revert:"):
            back = what.removeprefix("revert:")
            self.set(did, running_version=back, reported_at=now)
            return [DeviceEvent(did, back, "committed")]
        outcome = d.outcome
        if outcome == "flaky":
            outcome = "fail:slow-retrieval" if self.attempts[did] == 1 else "ok"
        if outcome == "silent":
            return []
        events = [DeviceEvent(did, v2, "received"), DeviceEvent(did, v2, "downloading")]
        if outcome.startswith("fail:"):
            _, agent_class, *detail = outcome.split(":", 2)
            return [
                *events,
                DeviceEvent(did, v2, "failed", agent_class, detail[0] if detail else None),
            ]
        self.ran_new.add(did)
        events.append(DeviceEvent(did, v2, "activated"))
        if outcome == "crash":
            self.set(did, reported_at=now)  # it fell back at once: still runs the old version
            return [*events, DeviceEvent(did, v2, "rolled_back", "crash_loop", "3 restarts")]
        self.set(did, running_version=v2, reported_at=now)
        return [*events, DeviceEvent(did, v2, "committed")]

    def _report_telemetry(self) -> None:
        for did, d in self.devices.items():
            version = d.view.running_version
            if version is None:
                continue
            new = version == self.plan.version
            p95 = d.p95_ms * (d.slowdown if new else 1.0)
            errors = round(1000 * d.error_share) if new else 0
            self.telemetry[(did, version)] = DeviceMetrics(1000, errors, p95)


def drive(
    plan: Plan,
    sim: Sim,
    *,
    steps: int,
    rollout: Rollout | None = None,
    start: float = 0.0,
    dt: float = 60.0,
    before_step: Callable[[int, float], None] | None = None,
    operate: Callable[[Rollout, float], Rollout] | None = None,
    check: Callable[[Rollout, StepResult, list[DeviceView]], None] | None = None,
) -> tuple[Rollout, list[StepResult]]:
    rollout = rollout or Rollout()
    history = []
    now = start
    for i in range(steps):
        if before_step is not None:
            before_step(i, now)
        if operate is not None:
            rollout = operate(rollout, now)
        events = sim.advance(now)
        views = sim.views()
        result = step(
            plan, rollout, devices=views, events=events, metrics=dict(sim.telemetry), now=now
        )
        if check is not None:
            check(rollout, result, views)
        sim.execute(result.actions, now)
        rollout = result.rollout
        history.append(result)
        now += dt
    return rollout, history


# --- Rule 1: cohorts ----------------------------------------------------------------------------


def test_stage_assignment_is_reproducible_from_salt_and_device_ids():
    plan = make_plan()
    devices = make_fleet(200, classes=("a", "b", "c"))
    first = assign_stages(plan, devices)
    assert first == assign_stages(plan, list(reversed(devices)))
    other = assign_stages(make_plan(salt="salt-2"), devices)
    assert first != other  # another rollout, other cohorts
    assert hash_position("s", "dev-1") == hash_position("s", "dev-1")
    assert 0 <= hash_position("s", "dev-1") < 1


def test_stage_zero_covers_every_hardware_class_and_runtime():
    plan = make_plan(stages=(Stage(percent=1), Stage(percent=100)))
    devices = make_fleet(300, classes=("rpi5", "jetson", "x86"), runtimes=("onnxruntime", "litert"))
    devices.append(DeviceView("lonely", hardware_class="coral", runtime="litert"))
    stage0 = {d for d, k in assign_stages(plan, devices).items() if k == 0}
    by_id = {v.device_id: v for v in devices}
    assert {(by_id[d].hardware_class, by_id[d].runtime) for d in stage0} == {
        (v.hardware_class, v.runtime) for v in devices
    }
    assert len(stage0) == 7  # 1% of 301 is 4; one per stratum wins


def test_stratified_prefix_is_proportional_to_each_stratum():
    plan = make_plan(stages=(Stage(percent=10), Stage(percent=40), Stage(percent=100)))
    devices = make_fleet(600, classes=("a",)) + make_fleet(300, classes=("b",), prefix="b")
    devices += make_fleet(100, classes=("c",), prefix="c")
    stages = assign_stages(plan, devices)
    by_id = {v.device_id: v.hardware_class for v in devices}
    for k, share in ((0, 0.10), (1, 0.40)):
        counts = Counter(by_id[d] for d, s in stages.items() if s <= k)
        for name, n in (("a", 600), ("b", 300), ("c", 100)):
            assert abs(counts[name] - share * n) <= 1, (k, name, counts)


def test_count_stages_and_cumulative_percent():
    plan = make_plan(stages=(Stage(count=5), Stage(percent=50), Stage(percent=100)))
    sizes = Counter(assign_stages(plan, make_fleet(40, classes=("a",))).values())
    assert [sizes[k] for k in range(3)] == [5, 15, 20]


def test_pinned_and_up_to_date_devices_are_outside_the_strata():
    plan = make_plan(stages=(Stage(percent=1), Stage(percent=100)))
    devices = make_fleet(100, classes=("a",))
    devices.append(DeviceView("pinned-b", hardware_class="b", pinned_version=V1))
    devices.append(DeviceView("current-c", hardware_class="c", running_version=V2))
    stages = assign_stages(plan, devices)
    loose = ("pinned-b", "current-c")
    assert sum(k == 0 for d, k in stages.items() if d not in loose) == 1  # one stratum: "a"
    for did in loose:  # placed by position alone
        assert stages[did] == (0 if hash_position(plan.salt, did) < 1 / 100 else 1)


def test_duplicate_device_ids_are_refused():
    plan = make_plan()
    with pytest.raises(ValueError, match="device ids must be unique: 1 repeated"):
        assign_stages(plan, [DeviceView("a"), DeviceView("a")])


@dataclass(frozen=True)
class FleetShape:
    sizes: dict[tuple[str, str], int]
    percents: tuple[int, ...]
    salt: str

    def devices(self) -> list[DeviceView]:
        out = []
        for (hw, rt), n in sorted(self.sizes.items()):
            out += [DeviceView(f"{hw}-{rt}-{i}", hardware_class=hw, runtime=rt) for i in range(n)]
        return out

    def plan(self) -> Plan:
        stages = tuple(Stage(percent=p, soak_s=0) for p in self.percents)
        return make_plan(stages=stages, salt=self.salt)


@st.composite
def fleet_shapes(draw: st.DrawFn) -> FleetShape:
    strata = draw(
        st.dictionaries(
            st.tuples(st.sampled_from("abcdef"), st.sampled_from(["ort", "ov", "lite"])),
            st.integers(1, 60),
            min_size=1,
            max_size=8,
        )
    )
    middle = sorted(set(draw(st.lists(st.integers(1, 99), max_size=4))))
    salt = draw(st.text(min_size=1, max_size=8))
    return FleetShape(strata, (*middle, 100), salt)


@PROPERTY
@given(fleet_shapes(), st.randoms(use_true_random=False))
def test_property_stage_assignment_is_reproducible_and_stratified(shape, rnd):
    plan, devices = shape.plan(), shape.devices()
    stages = assign_stages(plan, devices)
    shuffled = devices[:]
    rnd.shuffle(shuffled)
    assert assign_stages(plan, shuffled) == stages
    stage0 = {(v.hardware_class, v.runtime) for v in devices if stages[v.device_id] == 0}
    assert stage0 == set(shape.sizes)


@PROPERTY
@given(fleet_shapes())
def test_property_cumulative_stage_sizes_match_percentages(shape):
    plan, devices = shape.plan(), shape.devices()
    n, strata = len(devices), len(shape.sizes)
    sizes = Counter(assign_stages(plan, devices).values())
    cumulative = list(itertools.accumulate(sizes[k] for k in range(len(plan.stages))))
    expected, previous = [], min(strata, n)
    for p in shape.percents:
        previous = max(previous, math.ceil(round(n * p / 100, 9)))
        expected.append(previous)
    assert cumulative == expected
    for k, p in enumerate(shape.percents):
        rounded = 0 <= cumulative[k] - n * p / 100 < 1
        carried = cumulative[k] == (cumulative[k - 1] if k else min(strata, n))  # one per stratum
        assert rounded or carried


# --- Rule 2: newcomers --------------------------------------------------------------------------


def _running_in_stage(stage: int) -> tuple[Plan, Rollout, list[DeviceView], float]:
    """A rollout of 40 devices that has passed ``stage`` gates and is dispatching the next."""
    plan = make_plan(
        stages=(Stage(percent=25, soak_s=0), Stage(percent=50, soak_s=0), Stage(percent=100))
    )
    devices = make_fleet(40)
    r = step(plan, Rollout(), devices=devices, now=0.0)
    now = 0.0
    while r.rollout.stage < stage:
        now += 60
        ids = [d for d, p in r.rollout.progress.items() if p.state is D.IN_PROGRESS]
        devices = running(devices, ids, V2, now)
        r = step(plan, r.rollout, devices=devices, events=committed(ids), now=now)
    return plan, r.rollout, devices, now


def newcomer_with_hash_stage(plan: Plan, rollout: Rollout, stage: int) -> str:
    for i in itertools.count():
        did = f"new-{i}"
        pos = hash_position(plan.salt, did)
        k = next(k for k, t in enumerate(rollout.thresholds) if pos < t)
        if k == stage:
            return did
    raise AssertionError  # pragma: no cover


def test_newcomer_with_an_earlier_hash_stage_joins_the_current_stage():
    plan, rollout, devices, now = _running_in_stage(1)
    did = newcomer_with_hash_stage(plan, rollout, 0)
    devices = [*devices, DeviceView(did, hardware_class="rpi5", running_version=V1)]
    r = step(plan, rollout, devices=devices, now=now + 1)
    joined = of(r.actions, DeviceChanged)[0]
    assert (joined.device_id, joined.old, joined.new) == (did, None, D.PENDING)
    assert joined.reason == "joined stage 1"
    assert r.rollout.progress[did].stage == 1
    assert Dispatch(did, V2, 1, 1) in r.actions  # dispatched with stage 1, judged by gate 1


def test_newcomer_with_a_later_hash_stage_waits_for_its_stage():
    plan, rollout, devices, now = _running_in_stage(1)
    did = newcomer_with_hash_stage(plan, rollout, 2)
    devices = [*devices, DeviceView(did, hardware_class="rpi5", running_version=V1)]
    r = step(plan, rollout, devices=devices, now=now + 1)
    assert r.rollout.progress[did].stage == 2
    assert did not in dispatched(r)


def test_device_left_pending_in_a_passed_stage_joins_the_current_stage():
    plan = make_plan(
        stages=(Stage(percent=50, soak_s=0), Stage(percent=100)),
        gates=Gates(min_sample=1, max_error_rate=None, max_p95_ratio=None),
    )
    devices = make_fleet(10)
    stage0 = sorted(d for d, k in assign_stages(plan, devices).items() if k == 0)
    late = stage0[0]
    devices = [replace(v, online=v.device_id != late) for v in devices]
    r = step(plan, Rollout(), devices=devices, now=0.0)
    assert late not in dispatched(r)
    devices = running(devices, dispatched(r), V2, 60.0)
    r = step(plan, r.rollout, devices=devices, events=committed(dispatched(r)), now=60.0)
    assert decisions(r)[0].verdict == "pass"  # the offline device did not block gate 0
    devices = [replace(v, online=True) for v in devices]
    r = step(plan, r.rollout, devices=devices, now=120.0)
    assert Dispatch(late, V2, 1, 1) in r.actions  # it is judged by gate 1, not by gate 0


# --- Rule 3: dispatch ---------------------------------------------------------------------------


def test_in_flight_cap_counts_every_in_progress_device_online_or_not():
    plan = make_plan(stages=(Stage(percent=100),), max_in_flight=3)
    devices = make_fleet(10)
    r = step(plan, Rollout(), devices=devices, now=0.0)
    first = dispatched(r)
    assert len(first) == 3
    devices = [replace(v, online=False) if v.device_id == first[0] else v for v in devices]
    r = step(plan, r.rollout, devices=devices, now=60.0)
    assert dispatched(r) == []  # the offline, silent device still holds its slot
    r = step(plan, r.rollout, devices=devices, events=committed(first[1:]), now=120.0)
    assert len(dispatched(r)) == 2


def test_per_group_cap():
    plan = make_plan(stages=(Stage(percent=100),), max_in_flight=10, max_in_flight_per_group=2)
    devices = [
        replace(v, group="site-a" if i < 6 else "site-b") for i, v in enumerate(make_fleet(8))
    ]
    r = step(plan, Rollout(), devices=devices, now=0.0)
    groups = Counter(v.group for v in devices if v.device_id in set(dispatched(r)))
    assert groups == {"site-a": 2, "site-b": 2}


def test_offline_devices_are_never_dispatched():
    plan = make_plan(stages=(Stage(percent=100),))
    devices = make_fleet(5, online=False)
    r = step(plan, Rollout(), devices=devices, now=0.0)
    assert dispatched(r) == []
    assert states(r.rollout) == {D.PENDING: 5}


def test_dispatch_order_follows_stage_then_hash_position():
    plan = make_plan(stages=(Stage(percent=100),), max_in_flight=4)
    devices = make_fleet(20)
    r = step(plan, Rollout(), devices=devices, now=0.0)
    expected = sorted((hash_position(plan.salt, v.device_id), v.device_id) for v in devices)
    assert dispatched(r) == [d for _, d in expected[:4]]


def test_maintenance_window_blocks_dispatch():
    thursday_1am = MaintenanceWindow(days=frozenset({3}), start_minute=60, duration_min=60)
    plan = make_plan(stages=(Stage(percent=100),), windows=(thursday_1am,))
    devices = make_fleet(4)
    r = step(plan, Rollout(), devices=devices, now=0.0)  # Thursday 00:00 UTC
    assert dispatched(r) == []
    r = step(plan, r.rollout, devices=devices, now=3600.0)
    assert len(dispatched(r)) == 4


def test_maintenance_window_arithmetic():
    w = MaintenanceWindow(days=frozenset({6}), start_minute=23 * 60, duration_min=120)  # Sun 23:00
    sunday_2330 = 3 * 86400 + 23.5 * 3600  # 1970-01-04 was a Sunday
    assert w.contains(sunday_2330)
    assert w.contains(sunday_2330 + 3600)  # Monday 00:30: across midnight and the week's end
    assert not w.contains(sunday_2330 + 2 * 3600)
    assert window_open((), 0.0)
    assert not window_open((w,), 0.0)
    with pytest.raises(ValueError, match="days must be a non-empty subset of 0..6"):
        MaintenanceWindow(days=frozenset({7}), start_minute=0, duration_min=10)


def test_device_already_running_the_version_succeeds_without_dispatch():
    plan = make_plan(stages=(Stage(percent=100),))
    devices = make_fleet(3)
    devices[0] = replace(devices[0], running_version=V2)
    r = step(plan, Rollout(), devices=devices, now=0.0)
    assert devices[0].device_id not in dispatched(r)
    p = r.rollout.progress[devices[0].device_id]
    assert (p.state, p.attempts, p.note) == (D.SUCCEEDED, 0, f"already running {V2}")


# --- Rule 4: reports ----------------------------------------------------------------------------


def _one_in_flight(**plan_fields: object) -> tuple[Plan, StepResult, list[DeviceView], str]:
    plan = make_plan(stages=(Stage(percent=100, soak_s=0),), **plan_fields)
    devices = make_fleet(1)
    r = step(plan, Rollout(), devices=devices, now=0.0)
    return plan, r, devices, devices[0].device_id


def test_failure_class_table_maps_every_agent_class():
    expected = {
        "download": "download",
        "slow-retrieval": "download",
        "deadline": "download",
        "endless-data": "download",
        "integrity": "verify",
        "not-found": "download",
        "retries-exhausted": "download",
        "verification": "verify",
        "storage": "install",
        "self_test": "self_test",
        "probation": "probation",
        "crash_loop": "probation",
        "corruption": "probation",
        "internal": "install",
    }
    assert {c: classify_failure(c) for c in expected} == expected
    assert set(expected) <= set(AGENT_FAILURE_CLASSES)
    assert classify_failure("something-new") == "install"
    assert classify_failure(None) == "install"


def test_targeting_verification_failure_is_incompatible_and_never_retried():
    detail = "cnn 2.0.0: released for hardware ['jetson'], not 'rpi5'"
    assert classify_failure("verification", detail) == "incompatible"
    assert (
        classify_failure(
            "verification", "release counter 1 is below this device's rollback floor 2"
        )
        == "incompatible"
    )
    assert classify_failure("verification", "signed by 0/1 release keys") == "verify"
    plan, r, devices, did = _one_in_flight()
    event = DeviceEvent(did, V2, "failed", "verification", detail)
    r = step(plan, r.rollout, devices=devices, events=[event], now=60.0)
    p = r.rollout.progress[did]
    assert (p.state, p.failure_class, p.next_retry_at) == (D.FAILED, "incompatible", None)
    r = step(plan, r.rollout, devices=devices, now=10**6)
    assert dispatched(r) == []
    with pytest.raises(ValueError, match="incompatible failures are never retried"):
        make_plan(retries={"incompatible": RetryPolicy(max_attempts=2)})


def test_retries_per_class_with_exponential_backoff():
    plan, r, devices, did = _one_in_flight(
        retries={"download": RetryPolicy(max_attempts=3, backoff_base_s=100, backoff_max_s=150)}
    )
    fail = [DeviceEvent(did, V2, "failed", "slow-retrieval", "12 B/s")]
    r = step(plan, r.rollout, devices=devices, events=fail, now=10.0)
    assert r.rollout.progress[did].next_retry_at == 110.0  # base
    assert dispatched(step(plan, r.rollout, devices=devices, now=109.0)) == []
    r = step(plan, r.rollout, devices=devices, now=110.0)
    assert r.actions[-1] == Dispatch(did, V2, 2, 0)
    r = step(plan, r.rollout, devices=devices, events=fail, now=120.0)
    assert r.rollout.progress[did].next_retry_at == 270.0  # min(150, 2 * base)
    r = step(plan, r.rollout, devices=devices, now=270.0)
    assert dispatched(r) == [did]
    r = step(plan, r.rollout, devices=devices, events=fail, now=300.0)
    p = r.rollout.progress[did]
    assert (p.attempts, p.next_retry_at) == (3, None)  # max_attempts reached
    assert DEFAULT_RETRIES["probation"].max_attempts == 1


def test_committed_event_succeeds_and_activated_marks_the_device_as_having_run_it():
    plan, r, devices, did = _one_in_flight()
    r = step(plan, r.rollout, devices=devices, events=[DeviceEvent(did, V2, "activated")], now=5.0)
    p = r.rollout.progress[did]
    assert (p.state, p.ran_new, p.updated_at) == (D.IN_PROGRESS, True, 5.0)
    r = step(plan, r.rollout, devices=devices, events=committed([did]), now=6.0)
    assert r.rollout.progress[did].state is D.SUCCEEDED


def test_device_rollback_event_is_a_probation_failure():
    plan, r, devices, did = _one_in_flight()
    r = step(plan, r.rollout, devices=devices, events=committed([did]), now=5.0)
    back = DeviceEvent(did, V2, "rolled_back", "crash_loop", "3 restarts during probation")
    r = step(plan, r.rollout, devices=devices, events=[back], now=6.0)
    p = r.rollout.progress[did]
    assert (p.state, p.failure_class, p.ran_new) == (D.FAILED, "probation", True)
    change = of(r.actions, DeviceChanged)[0]
    assert "crash_loop" in change.reason
    assert "3 restarts" in change.reason


def test_server_records_a_local_rollback_seen_only_in_the_state_report():
    plan, r, devices, did = _one_in_flight()
    devices = running(devices, [did], V2, 5.0)
    r = step(plan, r.rollout, devices=devices, events=committed([did]), now=5.0)
    r = step(plan, r.rollout, devices=devices, now=6.0)
    assert r.rollout.progress[did].state is D.SUCCEEDED
    devices = running(devices, [did], V1, 7.0)  # the event was lost; the state report says V1
    r = step(plan, r.rollout, devices=devices, now=8.0)
    p = r.rollout.progress[did]
    assert (p.state, p.failure_class) == (D.FAILED, "probation")
    assert p.note == f"reports running {V1} again: it fell back"


def test_a_state_report_older_than_the_last_event_does_not_override_it():
    plan, r, devices, did = _one_in_flight()
    devices = running(devices, [did], V1, 3.0)  # report from before the commit
    r = step(plan, r.rollout, devices=devices, events=committed([did]), now=5.0)
    r = step(plan, r.rollout, devices=devices, now=6.0)
    assert r.rollout.progress[did].state is D.SUCCEEDED


def test_events_for_another_model_version_or_rollout_are_ignored():
    plan, r, devices, did = _one_in_flight()
    for event in (
        DeviceEvent(did, V2, "committed", model="other"),
        DeviceEvent(did, "3.0.0", "committed"),
        DeviceEvent(did, V2, "committed", rollout_id="r0"),
        DeviceEvent("stranger", V2, "committed"),
    ):
        after = step(plan, r.rollout, devices=devices, events=[event], now=5.0)
        assert after.rollout.progress[did].state is D.IN_PROGRESS


# --- Rule 5: time-outs --------------------------------------------------------------------------


def test_silent_device_times_out_frees_its_slot_and_is_retried():
    plan, r, devices, did = _one_in_flight()
    r = step(
        plan, r.rollout, devices=devices, events=[DeviceEvent(did, V2, "downloading")], now=100.0
    )
    r = step(plan, r.rollout, devices=devices, now=100.0 + 1799)
    assert r.rollout.progress[did].state is D.IN_PROGRESS  # reports reset the clock
    r = step(plan, r.rollout, devices=devices, now=100.0 + 1800)
    p = r.rollout.progress[did]
    assert (p.state, p.failure_class) == (D.FAILED, "timed_out")
    assert held_devices(r.rollout) == frozenset()
    assert p.next_retry_at == 1900.0 + DEFAULT_RETRIES["timed_out"].backoff_base_s


def test_device_that_reports_after_its_timeout_is_recorded_as_it_is():
    plan, r, devices, did = _one_in_flight(retries={"timed_out": RetryPolicy(max_attempts=1)})
    r = step(plan, r.rollout, devices=devices, now=1800.0)
    assert r.rollout.progress[did].failure_class == "timed_out"
    devices = running(devices, [did], V2, 1900.0)
    r = step(plan, r.rollout, devices=devices, now=2000.0)
    p = r.rollout.progress[did]
    assert (p.state, p.ran_new) == (D.SUCCEEDED, True)


# --- Rule 6: gates ------------------------------------------------------------------------------


def _stage0_done(
    n: int = 20,
    *,
    gates: Gates = NO_TELEMETRY,
    outcome: Callable[[str], str] = lambda did: "ok",
    revert_on_fail: bool = False,
    classes: Iterable[str] = ("rpi5", "jetson"),
) -> tuple[Plan, Sim, Rollout, list[StepResult]]:
    """Run stage 0 (50% of ``n`` devices) with a 10-minute soak until its gate decides."""
    plan = make_plan(
        stages=(Stage(percent=50, soak_s=600), Stage(percent=100, soak_s=600)),
        gates=gates,
        revert_on_fail=revert_on_fail,
    )
    sim = Sim.of(plan, make_fleet(n, classes=classes))
    for did, d in sim.devices.items():
        d.outcome = outcome(did)
    rollout, history = drive(plan, sim, steps=20)
    return plan, sim, rollout, history


def test_gate_waits_for_in_flight_devices_and_the_soak():
    _, _, _, history = _stage0_done()
    first = next(i for i, r in enumerate(history) if decisions(r))
    assert first == 11  # the cohort reports at 60 s, then 600 s of soak: decided at 660 s
    assert decisions(history[first])[0].at == 660.0


def test_gate_pass_starts_the_next_stage_with_figures():
    _plan, _, rollout, history = _stage0_done()
    decision = next(d for r in history for d in decisions(r))
    assert (decision.stage, decision.verdict, decision.by) == (0, "pass", "gate")
    install = decision.figures["install"]
    assert (install["succeeded"], install["failed"], install["rate"]) == (10, 0, 1.0)
    assert decision.figures["checks"] == {
        "install": "pass",
        "crash": "pass",
        "errors": "off",
        "latency": "off",
    }
    change = next(a for r in history for a in of(r.actions, StateChanged) if a.stage == 1)
    assert (change.old, change.new) == (S.RUNNING, S.RUNNING)
    assert rollout.decisions[0] == decision


def test_gate_fail_halts_and_a_halted_rollout_never_dispatches():
    _plan, sim, rollout, history = _stage0_done(outcome=lambda did: "fail:storage:disk full")
    decision = next(d for r in history for d in decisions(r))
    assert decision.verdict == "fail"
    assert decision.reason.startswith("install success 0.000 < 0.95 (0 of 10 succeeded)")
    assert decision.figures["install"]["by_failure_class"] == {"install": 10}
    assert rollout.state is S.HALTED
    assert not rollout.reverting
    i = next(i for i, r in enumerate(history) if decisions(r))
    assert all(not dispatched(r) for r in history[i:])
    assert sum(sim.dispatches.values()) == 20  # 10 devices x 2 attempts (install retries once)


def test_a_certain_install_failure_halts_without_waiting_for_the_rest_or_the_soak():
    """Half the first stage fails its self-test (never retried) while the other half is still
    silent: even if they all succeed the stage cannot pass, so the gate halts at once."""
    silent = {f"dev-{i:04d}" for i in range(0, 20, 2)}
    _plan, _sim, rollout, history = _stage0_done(
        outcome=lambda did: "silent" if did in silent else "fail:self_test:wrong outputs"
    )
    decision = next(d for r in history for d in decisions(r))
    assert rollout.state is S.HALTED
    assert decision.verdict == "fail"
    assert "before the soak ended" in decision.reason
    assert decision.at < 600  # neither the silent devices' time-out nor the soak was awaited
    assert states(rollout)[DeviceState.IN_PROGRESS] > 0


def test_a_failure_the_rest_can_still_outweigh_waits_for_the_gate():
    gates = Gates(min_sample=3, max_error_rate=None, max_p95_ratio=None, min_install_success=0.5)
    plan = make_plan(stages=(Stage(percent=50, soak_s=600), Stage(percent=100, soak_s=600)))
    stages = assign_stages(plan, make_fleet(20, classes=("rpi5", "jetson")))
    cohort = sorted(did for did, stage in stages.items() if stage == 0)
    _plan, _sim, _rollout, history = _stage0_done(
        gates=gates, outcome=lambda did: "fail:self_test:x" if did == cohort[0] else "ok"
    )
    decision = next(d for r in history for d in decisions(r))
    assert decision.figures["install"]["failed"] == 1  # the failing device is in the cohort
    assert decision.verdict == "pass"
    assert decision.at >= 600  # after the soak, as usual


def test_gate_fail_with_revert_on_fail_reverts_the_blast_radius_without_gates():
    crashing = {f"dev-{i:04d}" for i in range(0, 20, 3)}
    _plan, sim, rollout, history = _stage0_done(
        outcome=lambda did: "crash" if did in crashing else "ok", revert_on_fail=True
    )
    decision = next(d for r in history for d in decisions(r))
    assert decision.verdict == "fail"
    assert decision.reason.startswith("install success")
    assert rollout.state is S.HALTED
    assert rollout.reverting
    survivors = {d for d in sim.ran_new if rollout.progress[d].failure_class != "probation"}
    assert survivors
    assert set(sim.reverts) == survivors
    assert all(sim.devices[d].view.running_version == V1 for d in sim.devices)
    assert states(rollout)[D.REVERTED] == len(survivors)


def test_gate_is_inconclusive_below_min_sample_and_pauses():
    _plan, _, rollout, history = _stage0_done(n=4)
    decision = next(d for r in history for d in decisions(r))
    assert decision.verdict == "inconclusive"
    assert (
        decision.reason == "install: 2 devices finished, fewer than min_sample 3; "
        "crash: 2 devices ran 2.0.0, fewer than 3"
    )
    assert rollout.state is S.PAUSED


def test_install_gate_fails_on_one_hardware_class():
    bad = {f"dev-{i:04d}" for i in range(1, 40, 2)}  # every jetson fails self-test
    _, _, _rollout, history = _stage0_done(
        n=40, outcome=lambda did: "fail:self_test:no runtime" if did in bad else "ok"
    )
    decision = next(d for r in history for d in decisions(r))
    assert decision.verdict == "fail"
    assert (
        "install success 0.000 < 0.95 on hardware class jetson (0 of 10 succeeded)"
        in decision.reason
    )
    by_class = decision.figures["install"]["by_hardware_class"]
    assert by_class == {
        "jetson": {"succeeded": 0, "failed": 10, "rate": 0.0},
        "rpi5": {"succeeded": 10, "failed": 0, "rate": 1.0},
    }


def _stage0_ids(n: int = 20, classes: Iterable[str] = ("rpi5", "jetson")) -> list[str]:
    plan = make_plan(stages=(Stage(percent=50), Stage(percent=100)))
    stages = assign_stages(plan, make_fleet(n, classes=classes))
    return sorted(d for d, k in stages.items() if k == 0)


def test_a_stage_without_devices_is_judged_by_the_fleet_wide_checks_only():
    plan = make_plan(
        stages=(Stage(count=5, soak_s=0), Stage(percent=10, soak_s=0), Stage(percent=100))
    )
    devices = make_fleet(40)
    r = step(plan, Rollout(), devices=devices, now=0.0)
    ids = dispatched(r)
    devices = running(devices, ids, V2, 60.0)
    r = step(plan, r.rollout, devices=devices, events=committed(ids), now=60.0)
    assert [(d.stage, d.verdict) for d in decisions(r)] == [(0, "pass")]
    r = step(plan, r.rollout, devices=devices, now=120.0)
    empty = decisions(r)[0]
    assert (empty.stage, empty.verdict) == (1, "pass")
    assert empty.figures["checks"]["install"] == "no devices"
    assert r.rollout.stage == 2
    assert len(dispatched(r)) == 35


def test_incompatible_failures_are_counted_apart_from_install_failures():
    refused = set(_stage0_ids()[:3])
    _, _, rollout, history = _stage0_done(
        outcome=lambda d: "fail:verification:released for hardware ['x']" if d in refused else "ok"
    )
    decision = next(d for r in history for d in decisions(r))
    install = decision.figures["install"]
    assert (install["succeeded"], install["failed"], install["incompatible"]) == (7, 0, 3)
    assert install["by_failure_class"] == {"incompatible": 3}
    assert decision.verdict == "pass"
    assert all(rollout.progress[d].attempts == 1 for d in refused)  # never retried


def test_crash_rate_counts_devices_that_fell_back():
    gates = Gates(
        min_install_success=0.0,
        max_crash_rate=0.2,
        min_sample=3,
        max_error_rate=None,
        max_p95_ratio=None,
    )
    for crashing, verdict in ((2, "pass"), (3, "fail")):
        chosen = set(_stage0_ids()[:crashing])
        _, _, _, history = _stage0_done(
            gates=gates, outcome=lambda d, chosen=chosen: "crash" if d in chosen else "ok"
        )
        decision = next(d for r in history for d in decisions(r))
        assert decision.figures["crash"] == {
            "ran_new": 10,
            "fell_back": crashing,
            "rate": crashing / 10,
        }
        assert decision.verdict == verdict
    assert decision.reason == "crash rate 0.300 > 0.2 (3 of 10 fell back)"


def _telemetry_run(
    slow: Callable[[SimDevice], float], errors: Callable[[SimDevice], float]
) -> GateDecision:
    gates = Gates(min_sample=5)
    plan = make_plan(stages=(Stage(percent=50, soak_s=600), Stage(percent=100)), gates=gates)
    sim = Sim.of(plan, make_fleet(40, classes=("rpi5", "jetson")))
    for d in sim.devices.values():
        d.p95_ms = 40.0 if d.view.hardware_class == "jetson" else 10.0
        d.slowdown, d.error_share = slow(d), errors(d)
    _, history = drive(plan, sim, steps=15)
    return next(d for r in history for d in decisions(r))


def test_latency_gate_compares_with_the_control_group_of_the_same_hardware_class():
    ok = _telemetry_run(lambda d: 1.1, lambda d: 0.0)
    assert ok.verdict == "pass", ok.reason
    latency = ok.figures["latency"]
    assert latency["p95_ratio"] == pytest.approx(1.1)
    assert latency["by_hardware_class"]["jetson"]["control_median_p95_ms"] == 40.0
    slow = _telemetry_run(lambda d: 2.0 if d.view.hardware_class == "rpi5" else 1.0, lambda d: 0.0)
    assert slow.verdict == "fail"
    assert "p95 latency ratio 2.000 > 1.25 on hardware class rpi5" in slow.reason


def test_error_rate_gate():
    decision = _telemetry_run(lambda d: 1.0, lambda d: 0.05)
    assert decision.verdict == "fail"
    assert decision.reason.startswith("error rate 0.0500 > 0.02 (1000 of 20000 requests)")
    assert decision.figures["errors"]["control_rate"] == 0.0


def test_a_last_stage_with_nobody_left_on_the_old_version_uses_the_earlier_control_figure():
    """Only live telemetry (no window of devices that moved on): the 100% stage has no control
    group of its own, so the control median of the first stage's gate stands in for it."""
    plan = make_plan(
        stages=(Stage(percent=50, soak_s=600), Stage(percent=100, soak_s=600)),
        gates=Gates(min_sample=5),
    )
    sim = Sim.of(plan, make_fleet(40, classes=("rpi5", "jetson")))
    for d in sim.devices.values():
        d.slowdown = 1.1

    def forget_old_versions(_i: int, _now: float) -> None:
        for did, version in list(sim.telemetry):
            if version != sim.devices[did].view.running_version:
                del sim.telemetry[(did, version)]

    rollout, history = drive(plan, sim, steps=60, before_step=forget_old_versions)
    first, last = [d for r in history for d in decisions(r)]
    assert rollout.state is RolloutState.COMPLETED, last.reason
    assert not first.figures["latency"]["by_hardware_class"]["rpi5"]["control_from_earlier_stage"]
    rpi5 = last.figures["latency"]["by_hardware_class"]["rpi5"]
    assert rpi5["control_from_earlier_stage"]
    assert rpi5["control_median_p95_ms"] == 10.0
    assert rpi5["ratio"] == pytest.approx(1.1)


def test_latency_gate_is_inconclusive_without_a_control_group():
    plan = make_plan(
        stages=(Stage(percent=100, soak_s=0),), gates=Gates(min_sample=2, sample_wait_s=60)
    )
    devices = make_fleet(4)
    r = step(plan, Rollout(), devices=devices, now=0.0)
    ids = dispatched(r)
    new = {(d, V2): DeviceMetrics(100, 0, 12.0) for d in ids}
    devices = running(devices, ids, V2, 10.0)
    events = committed(ids)
    r = step(plan, r.rollout, devices=devices, events=events, metrics=new, now=10.0)
    assert not decisions(r), "the gate waits sample_wait_s for telemetry first"
    r = step(plan, r.rollout, devices=devices, metrics=new, now=71.0)
    decision = decisions(r)[0]
    assert decision.verdict == "inconclusive"
    assert decision.figures["checks"]["latency"] == "inconclusive"
    assert "0 control devices" in decision.reason
    assert r.rollout.state is RolloutState.PAUSED


def test_a_first_release_has_no_latency_check_and_says_why():
    """No device runs an earlier version: nothing to compare latency with, so the check is off
    (a first rollout completes instead of pausing for a control group that cannot exist)."""
    plan = make_plan(
        previous_version=None,
        stages=(Stage(percent=100, soak_s=0),),
        gates=Gates(min_sample=2, max_error_rate=None, sample_wait_s=60),
    )
    devices = [replace(v, running_version=None) for v in make_fleet(4)]
    r = step(plan, Rollout(), devices=devices, now=0.0)
    ids = dispatched(r)
    new = {(d, V2): DeviceMetrics(100, 0, 12.0) for d in ids}
    devices = running(devices, ids, V2, 10.0)
    r = step(plan, r.rollout, devices=devices, events=committed(ids), metrics=new, now=10.0)
    decision = decisions(r)[0]
    assert decision.verdict == "pass", decision.reason
    assert decision.figures["checks"]["latency"] == "off"
    assert decision.figures["off_because"] == {
        "latency": "no earlier version of cnn to compare with"
    }
    assert decision.reason.endswith("latency off (no earlier version of cnn to compare with)")
    assert r.rollout.state is RolloutState.COMPLETED


def _first_stage_done(sample_wait_s: float) -> tuple[Plan, StepResult, list[DeviceView], list[str]]:
    """A two-stage rollout whose first stage has just finished installing, with no telemetry."""
    plan = make_plan(
        stages=(Stage(percent=50, soak_s=5), Stage(percent=100, soak_s=5)),
        gates=Gates(min_sample=2, sample_wait_s=sample_wait_s),
    )
    devices = make_fleet(8)
    r = step(plan, Rollout(), devices=devices, now=0.0)
    ids = dispatched(r)
    devices = running(devices, ids, V2, 10.0)
    r = step(plan, r.rollout, devices=devices, events=committed(ids), metrics={}, now=10.0)
    assert not decisions(r)
    return plan, r, devices, ids


def test_gate_waits_after_the_soak_for_telemetry_that_arrives_late():
    plan, r, devices, ids = _first_stage_done(sample_wait_s=120)
    # the soak is over, but the new version's devices have not reported telemetry yet
    r = step(plan, r.rollout, devices=devices, metrics={}, now=20.0)
    assert not decisions(r)
    assert r.rollout.state is RolloutState.RUNNING
    control = [d.device_id for d in devices if d.device_id not in ids]
    metrics = {(d, V2): DeviceMetrics(100, 0, 11.0) for d in ids} | {
        (d, V1): DeviceMetrics(100, 0, 10.0) for d in control
    }
    r = step(plan, r.rollout, devices=devices, metrics=metrics, now=30.0)
    decision = decisions(r)[0]
    assert decision.verdict == "pass", decision.reason
    assert decision.figures["checks"]["latency"] == "pass"


def test_gate_without_telemetry_pauses_once_sample_wait_has_passed():
    plan, r, devices, _ids = _first_stage_done(sample_wait_s=120)
    r = step(plan, r.rollout, devices=devices, metrics={}, now=134.0)  # soak ended at 15 s
    assert not decisions(r)
    r = step(plan, r.rollout, devices=devices, metrics={}, now=136.0)
    decision = decisions(r)[0]
    assert decision.verdict == "inconclusive"
    assert "latency" in decision.reason
    assert r.rollout.state is RolloutState.PAUSED


def test_gates_refuse_a_negative_sample_wait():
    with pytest.raises(ValueError, match="sample_wait_s must be >= 0 seconds, got -1"):
        Gates(sample_wait_s=-1)


def test_step_is_deterministic():
    def run() -> list[StepResult]:
        plan = make_plan(gates=Gates(min_sample=2))
        sim = Sim.of(plan, make_fleet(60, classes=("a", "b", "c")))
        for i, d in enumerate(sim.devices.values()):
            d.outcome = ("ok", "crash", "fail:download", "silent", "flaky")[i % 5]
        return drive(plan, sim, steps=30)[1]

    assert run() == run()


# --- Rule 7: revert -----------------------------------------------------------------------------


def test_revert_is_sent_again_until_the_device_reports_the_old_version():
    plan, r, devices, did = _one_in_flight()
    devices = running(devices, [did], V2, 5.0)
    r = step(plan, r.rollout, devices=devices, events=committed([did]), now=5.0)
    r = apply_operator(plan, r.rollout, Abort(revert=True, reason="bad outputs"), now=10.0)
    assert r.rollout.state is S.ABORTED
    assert r.rollout.reverting
    assert of(r.actions, Revert) == []
    r = step(plan, r.rollout, devices=devices, now=10.0)
    assert of(r.actions, Revert) == [Revert(did, V1, "revert to 1.0.0: rollout r1 is aborted")]
    r = step(plan, r.rollout, devices=devices, now=10.0 + 1799)
    assert of(r.actions, Revert) == []
    r = step(plan, r.rollout, devices=devices, now=10.0 + 1800)
    assert [a.reason for a in of(r.actions, Revert)] == ["revert not confirmed yet: sent again"]
    devices = running(devices, [did], V1, 2000.0)
    r = step(plan, r.rollout, devices=devices, now=2001.0)
    assert r.rollout.progress[did].state is D.REVERTED


def test_revert_to_an_offline_device_is_sent_again_when_it_comes_online():
    plan, r, devices, did = _one_in_flight()
    devices = running(devices, [did], V2, 5.0)
    r = step(plan, r.rollout, devices=devices, events=committed([did]), now=5.0)
    r = apply_operator(plan, r.rollout, Abort(revert=True), now=10.0)
    offline = [replace(v, online=False) for v in devices]
    r = step(plan, r.rollout, devices=offline, now=10.0)
    assert len(of(r.actions, Revert)) == 1  # sent at once anyway
    r = step(plan, r.rollout, devices=offline, now=20.0)
    assert of(r.actions, Revert) == []
    r = step(plan, r.rollout, devices=devices, now=30.0)
    assert len(of(r.actions, Revert)) == 1
    r = step(plan, r.rollout, devices=running(devices, [did], V1, 9.0), now=40.0)
    assert r.rollout.progress[did].state is D.REVERTING  # a report from before the revert
    r = step(plan, r.rollout, devices=running(devices, [did], V1, 45.0), now=50.0)
    assert r.rollout.progress[did].state is D.REVERTED


def test_revert_ignores_windows_and_caps_but_not_a_pin_to_the_new_version():
    window = MaintenanceWindow(days=frozenset({0}), start_minute=0, duration_min=1)
    plan = make_plan(stages=(Stage(percent=100),), max_in_flight=1, windows=(window,))
    # never dispatched, but running the new version (installed by hand, say)
    devices = [replace(v, running_version=V2) for v in make_fleet(3)]
    devices[0] = replace(devices[0], pinned_version=V2)
    r = step(plan, Rollout(), devices=devices, now=0.0)
    r = apply_operator(plan, r.rollout, Abort(revert=True), now=1.0)
    r = step(plan, r.rollout, devices=devices, now=1.0)
    assert sorted(a.device_id for a in of(r.actions, Revert)) == [v.device_id for v in devices[1:]]


def test_revert_goes_to_the_version_each_device_ran_before():
    plan, r, devices, did = _one_in_flight()
    plan2 = replace(plan, rollout_id="r2")
    devices = [replace(v, running_version="0.9.0") for v in devices]
    r = step(plan2, Rollout(), devices=devices, now=0.0)
    r = step(plan2, r.rollout, devices=devices, events=committed([did]), now=1.0)
    r = apply_operator(plan2, r.rollout, Abort(revert=True), now=2.0)
    r = step(plan2, r.rollout, devices=devices, now=2.0)
    assert of(r.actions, Revert)[0].to_version == "0.9.0"


# --- Rule 8: completion -------------------------------------------------------------------------


def test_aborted_rollout_takes_no_newcomers():
    plan = make_plan()
    r = step(plan, Rollout(), devices=make_fleet(10), now=0.0)
    r = apply_operator(plan, r.rollout, Abort(), now=1.0)
    r = step(plan, r.rollout, devices=[*make_fleet(10), DeviceView("new-1")], now=2.0)
    assert "new-1" not in r.rollout.progress
    assert r.actions == ()


def test_completed_rollout_converges_stragglers_and_newcomers():
    plan = make_plan(
        stages=(Stage(percent=100, soak_s=0),),
        gates=Gates(min_sample=1, max_error_rate=None, max_p95_ratio=None),
    )
    devices = make_fleet(3)
    devices[2] = replace(devices[2], online=False)
    r = step(plan, Rollout(), devices=devices, now=0.0)
    ids = dispatched(r)
    r = step(
        plan, r.rollout, devices=running(devices, ids, V2, 5.0), events=committed(ids), now=5.0
    )
    assert r.rollout.state is S.COMPLETED
    devices = [replace(v, online=True) for v in devices] + [DeviceView("new-1", hardware_class="x")]
    r = step(plan, r.rollout, devices=devices, now=10.0)
    assert sorted(dispatched(r)) == [devices[2].device_id, "new-1"]
    fail = DeviceEvent("new-1", V2, "failed", "storage", "disk full")
    r = step(plan, r.rollout, devices=devices, events=[fail], now=20.0)
    assert r.rollout.state is S.COMPLETED


# --- Rule 9: pins and conflicts -----------------------------------------------------------------


def test_pinned_device_is_skipped_not_failed_and_rejoins_when_unpinned():
    plan = make_plan(stages=(Stage(percent=100),))
    devices = make_fleet(3)
    devices[0] = replace(devices[0], pinned_version=V1)
    devices[1] = replace(devices[1], pinned_version=V2)  # a pin that agrees does not block
    r = step(plan, Rollout(), devices=devices, now=0.0)
    pinned = devices[0].device_id
    assert pinned not in dispatched(r)
    assert devices[1].device_id in dispatched(r)
    p = r.rollout.progress[pinned]
    assert (p.state, p.note) == (D.SKIPPED, f"pinned to {V1}")
    devices[0] = replace(devices[0], pinned_version=None)
    r = step(plan, r.rollout, devices=devices, now=1.0)
    assert dispatched(r) == [pinned]


def test_effective_pin_most_specific_wins():
    assert effective_pin(device="1", group="2", fleet="3") == "1"
    assert effective_pin(group="2", fleet="3") == "2"
    assert effective_pin(fleet="3") == "3"
    assert effective_pin() is None


def test_one_rollout_per_model_per_device():
    plan_a = make_plan(stages=(Stage(percent=100),))
    plan_b = make_plan(rollout_id="r2", version="3.0.0", stages=(Stage(percent=100),))
    devices = make_fleet(2)
    a = step(plan_a, Rollout(), devices=devices, now=0.0)
    held = held_devices(a.rollout)
    assert held == {v.device_id for v in devices}
    views_b = [replace(v, held_by="r1") if v.device_id in held else v for v in devices]
    b = step(plan_b, Rollout(), devices=views_b, now=1.0)
    assert dispatched(b) == []
    assert {p.note for p in b.rollout.progress.values()} == {"held by rollout r1"}
    a = step(plan_a, a.rollout, devices=devices, now=1800.0)  # silent: times out, lets go
    assert held_devices(a.rollout) == frozenset()
    b = step(plan_b, b.rollout, devices=devices, now=1801.0)
    assert len(dispatched(b)) == 2


# --- Rule 10: operators -------------------------------------------------------------------------


def test_pause_stops_dispatch_and_resume_continues():
    plan = make_plan(stages=(Stage(percent=100),), max_in_flight=1)
    devices = make_fleet(3)
    r = step(plan, Rollout(), devices=devices, now=0.0)
    r = apply_operator(plan, r.rollout, Pause(reason="weekend"), now=1.0)
    assert of(r.actions, StateChanged) == [
        StateChanged(S.RUNNING, S.PAUSED, 0, "pause by an operator (weekend)")
    ]
    first = dispatched(step(plan, Rollout(), devices=devices, now=0.0))
    r = step(plan, r.rollout, devices=devices, events=committed(first), now=2.0)
    assert dispatched(r) == []
    r = apply_operator(plan, r.rollout, Resume(), now=3.0)
    r = step(plan, r.rollout, devices=devices, now=3.0)
    assert len(dispatched(r)) == 1


def test_promote_skips_the_current_gate_and_records_the_decision():
    plan = make_plan()
    r = step(plan, Rollout(), devices=make_fleet(30), now=0.0)
    r = apply_operator(plan, r.rollout, Promote(reason="hotfix"), now=5.0)
    decision = decisions(r)[0]
    assert (decision.stage, decision.verdict, decision.by) == (0, "pass", "operator")
    assert decision.reason == "promoted by an operator (hotfix)"
    assert decision.figures["install"]["in_progress"] == 3
    assert decision.figures["checks"]["latency"] == "not evaluated"
    assert (r.rollout.stage, r.rollout.stage_started_at) == (1, 5.0)


def test_promote_in_the_last_stage_completes():
    plan = make_plan(stages=(Stage(percent=100),))
    r = step(plan, Rollout(), devices=make_fleet(3), now=0.0)
    r = apply_operator(plan, r.rollout, Promote(), now=5.0)
    assert r.rollout.state is S.COMPLETED


def test_abort_and_keep_stops_dispatching_and_reverts_nothing():
    plan = make_plan(stages=(Stage(percent=100),), max_in_flight=1)
    devices = make_fleet(3)
    r = step(plan, Rollout(), devices=devices, now=0.0)
    first = dispatched(r)
    r = apply_operator(plan, r.rollout, Abort(), now=1.0)
    r = step(
        plan, r.rollout, devices=running(devices, first, V2, 2.0), events=committed(first), now=2.0
    )
    assert dispatched(r) == []
    assert of(r.actions, Revert) == []
    assert r.rollout.progress[first[0]].state is D.SUCCEEDED  # what it really runs


def test_retry_failed_resets_every_failed_device_except_incompatible():
    plan = make_plan(stages=(Stage(percent=100),))
    devices = make_fleet(2)
    r = step(plan, Rollout(), devices=devices, now=0.0)
    a, b = devices[0].device_id, devices[1].device_id
    events = [
        DeviceEvent(a, V2, "failed", "self_test", "no runtime"),
        DeviceEvent(b, V2, "failed", "verification", "released for hardware ['x'], not 'y'"),
    ]
    r = step(plan, r.rollout, devices=devices, events=events, now=1.0)
    r = apply_operator(plan, r.rollout, RetryFailed(), now=2.0)
    assert r.rollout.progress[a].state is D.PENDING
    assert r.rollout.progress[a].attempts == 0
    assert r.rollout.progress[b].state is D.FAILED
    r = step(plan, r.rollout, devices=devices, now=3.0)
    assert dispatched(r) == [a]


def test_operator_actions_not_allowed_in_a_state_are_refused():
    plan = make_plan()
    r = step(plan, Rollout(), devices=make_fleet(5), now=0.0)
    with pytest.raises(OperatorActionError, match=r"cannot resume rollout r1: it is running") as e:
        apply_operator(plan, r.rollout, Resume(), now=1.0)
    assert (e.value.state, e.value.action, e.value.check) == (S.RUNNING, "resume", "rollout-state")
    aborted = apply_operator(plan, r.rollout, Abort(), now=1.0).rollout
    for action in (Pause(), Resume(), Promote(), Abort(), RetryFailed()):
        with pytest.raises(OperatorActionError, match="it is aborted"):
            apply_operator(plan, aborted, action, now=2.0)


def test_after_a_revert_only_abort_is_allowed():
    plan = make_plan(revert_on_fail=True)
    halted = Rollout(state=S.HALTED, reverting=True, thresholds=(0.1, 0.5, 1.0))
    with pytest.raises(OperatorActionError, match="it reverted its devices; only abort"):
        apply_operator(plan, halted, Promote(), now=0.0)
    assert apply_operator(plan, halted, Abort(), now=0.0).rollout.state is S.ABORTED


def test_pending_rollout_can_be_paused_before_it_starts():
    plan = make_plan()
    r = apply_operator(plan, Rollout(), Pause(), now=0.0)
    r = step(plan, r.rollout, devices=make_fleet(10), now=1.0)
    assert r.rollout.state is S.PAUSED
    assert dispatched(r) == []
    assert r.rollout.thresholds  # cohorts are fixed at the first step


# --- values, preview, documentation -------------------------------------------------------------


def test_plan_validation_states_the_facts():
    with pytest.raises(ValueError, match=r"the last stage must be percent=100"):
        make_plan(stages=(Stage(percent=50),))
    with pytest.raises(ValueError, match=r"version and previous_version are both '2.0.0'"):
        make_plan(previous_version=V2)
    with pytest.raises(ValueError, match="exactly one of percent and count"):
        Stage(percent=5, count=5)
    with pytest.raises(ValueError, match=r"stage percent must be in \(0, 100\], got 0"):
        Stage(percent=0)
    with pytest.raises(ValueError, match=r"min_sample must be >= 1, got 0"):
        Gates(min_sample=0)
    with pytest.raises(ValueError, match="retries name unknown failure classes"):
        make_plan(retries={"cosmic-ray": RetryPolicy()})


def test_preview_shows_stage_sizes_per_class_and_the_blast_radius():
    plan = make_plan(stages=(Stage(percent=5), Stage(percent=50), Stage(percent=100)))
    devices = make_fleet(100, classes=("rpi5", "jetson"), runtimes=("onnxruntime", "litert"))
    devices[0] = replace(devices[0], pinned_version=V1)
    p = preview(plan, devices)
    assert p.cumulative == (5, 50, 100)
    assert sum(p.stage_sizes) == 100
    assert set(p.by_hardware_class) == {"jetson", "rpi5"}
    assert all(sizes[0] >= 1 for sizes in p.by_stratum.values())
    stage0 = {d for d, k in assign_stages(plan, devices).items() if k == 0}
    assert p.blast_radius == len(stage0 - {devices[0].device_id})
    assert p.skipped == 1
    assert p.newcomer_stage0_share == pytest.approx(5 / 99)
    assert "1 devices are pinned to another version or held: skipped" in p.warnings


def test_preview_warns_when_a_stage_is_smaller_than_min_sample():
    plan = make_plan(stages=(Stage(count=2), Stage(percent=100)))
    p = preview(plan, make_fleet(10, classes=("a",)))
    assert p.warnings[0].startswith("stage 0 has 2 devices, fewer than gates.min_sample 3")


def test_docstring_state_table_matches_transitions():
    doc_lines = {line.strip() for line in (fleet.rollouts.__doc__ or "").splitlines()}
    for line in describe_transitions().splitlines():
        assert line.strip() in doc_lines, line
    assert set(TRANSITIONS) == set(RolloutState)


def test_docstring_examples_run():
    assert doctest.testmod(fleet.rollouts).failed == 0


def test_device_transitions_are_checked():
    progress = {"a": DeviceProgress(D.REVERTING, 0, 0.5)}
    rollout = Rollout(state=S.RUNNING, progress=progress, thresholds=(1.0,))
    plan = make_plan(stages=(Stage(percent=100),))
    run = fleet.rollouts._Run(plan, rollout, 0.0)
    with pytest.raises(AssertionError, match="REVERTING -> SUCCEEDED is not a device transition"):
        run.succeed("a", progress["a"], "x")


# --- properties over simulated fleets -----------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    n: int
    classes: tuple[str, ...]
    runtimes: tuple[str, ...]
    percents: tuple[int, ...]
    cap: int
    fail_share: float
    revert_on_fail: bool
    seed: int
    newcomers: int
    pin_share: float
    flap: float

    def build(self) -> tuple[Plan, Sim, random.Random]:
        plan = make_plan(
            stages=tuple(Stage(percent=p, soak_s=120) for p in self.percents),
            max_in_flight=self.cap,
            gates=Gates(min_sample=2, max_error_rate=None, max_p95_ratio=None),
            revert_on_fail=self.revert_on_fail,
            device_timeout_s=600.0,
        )
        rnd = random.Random(self.seed)
        sim = Sim.of(plan, make_fleet(self.n, self.classes, self.runtimes))
        for did, d in sim.devices.items():
            d.outcome = (
                rnd.choice(("fail:download", "crash", "silent", "fail:self_test"))
                if rnd.random() < self.fail_share
                else rnd.choice(("ok", "ok", "ok", "flaky"))
            )
            if rnd.random() < self.pin_share:
                sim.set(did, pinned_version=rnd.choice((V1, "0.9.0")))
            if rnd.random() < 0.1:
                sim.set(did, online=False)
        return plan, sim, rnd

    def operate(self, plan: Plan, rollout: Rollout, rnd: random.Random, now: float) -> Rollout:
        """A person answers pauses (promote or look again) and sometimes overrides a halt."""
        if rollout.state is S.PAUSED and rnd.random() < 0.3:
            action = Promote() if rnd.random() < 0.5 else Resume()
        elif rollout.state is S.HALTED and not rollout.reverting and rnd.random() < 0.05:
            action = rnd.choice((Promote(), RetryFailed()))
        else:
            return rollout
        return apply_operator(plan, rollout, action, now=now).rollout

    def churn(self, sim: Sim, rnd: random.Random, i: int, now: float) -> None:
        """Devices go offline and back, pins change, newcomers enroll."""
        for did in list(sim.devices):
            if rnd.random() < self.flap:
                view = sim.devices[did].view
                sim.set(did, online=not view.online)
            if rnd.random() < self.flap / 4:
                sim.set(did, pinned_version=rnd.choice((None, V1)))
        if i % 5 == 4 and i // 5 < self.newcomers:
            did = f"new-{i}"
            sim.devices[did] = SimDevice(
                DeviceView(
                    did,
                    hardware_class=rnd.choice(self.classes),
                    runtime=self.runtimes[0],
                    running_version=V1,
                    reported_at=now,
                )
            )


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    middle = sorted(set(draw(st.lists(st.integers(1, 99), max_size=3))))
    return Scenario(
        n=draw(st.integers(1, 80)),
        classes=tuple(
            draw(
                st.lists(
                    st.sampled_from(["rpi5", "jetson", "x86", "nuc"]),
                    min_size=1,
                    max_size=4,
                    unique=True,
                )
            )
        ),
        runtimes=tuple(
            draw(
                st.lists(
                    st.sampled_from(["ort", "ov", "lite"]), min_size=1, max_size=2, unique=True
                )
            )
        ),
        percents=(*middle, 100),
        cap=draw(st.integers(1, 20)),
        fail_share=draw(st.sampled_from([0.0, 0.05, 0.3, 0.8])),
        revert_on_fail=draw(st.booleans()),
        seed=draw(st.integers(0, 2**32 - 1)),
        newcomers=draw(st.integers(0, 8)),
        pin_share=draw(st.sampled_from([0.0, 0.1, 0.3])),
        flap=draw(st.sampled_from([0.0, 0.05, 0.2])),
    )


def simulate(
    scenario: Scenario,
    check: Callable[[Plan, Rollout, StepResult, list[DeviceView]], None],
    steps: int = 80,
) -> tuple[Plan, Sim, Rollout, list[StepResult]]:
    plan, sim, rnd = scenario.build()
    rollout, history = drive(
        plan,
        sim,
        steps=steps,
        before_step=lambda i, now: scenario.churn(sim, rnd, i, now),
        operate=lambda rollout, now: scenario.operate(plan, rollout, rnd, now),
        check=lambda before, result, views: check(plan, before, result, views),
    )
    return plan, sim, rollout, history


@PROPERTY
@given(scenarios())
def test_property_in_flight_never_exceeds_the_cap(scenario):
    def check(plan: Plan, before: Rollout, result: StepResult, views: list[DeviceView]) -> None:
        in_flight = sum(p.state is D.IN_PROGRESS for p in result.rollout.progress.values())
        assert in_flight <= plan.max_in_flight

    simulate(scenario, check)


@PROPERTY
@given(scenarios())
def test_property_no_device_outside_stage_0_is_dispatched_before_the_first_gate_passes(scenario):
    initial: dict[str, int] = {}

    def check(plan: Plan, before: Rollout, result: StepResult, views: list[DeviceView]) -> None:
        if not before.thresholds:
            initial.update(assign_stages(plan, views))
        if any(d.verdict == "pass" for d in before.decisions):
            return
        passed_now = any(d.verdict == "pass" for d in decisions(result))
        for a in of(result.actions, Dispatch):
            if passed_now and a.stage == 1:
                continue  # dispatched after the gate passed, in the same step
            assert a.stage == 0
            if a.device_id in initial:
                assert initial[a.device_id] == 0
            else:  # a newcomer: its position puts it in stage 0
                pos = hash_position(plan.salt, a.device_id)
                assert pos < result.rollout.thresholds[0]

    simulate(scenario, check)


@PROPERTY
@given(scenarios())
def test_property_a_halted_rollout_never_dispatches(scenario):
    def check(plan: Plan, before: Rollout, result: StepResult, views: list[DeviceView]) -> None:
        if before.state in (S.HALTED, S.ABORTED, S.PAUSED) or result.rollout.state is S.HALTED:
            assert dispatched(result) == []

    simulate(scenario, check)


@PROPERTY
@given(scenarios())
def test_property_newcomers_never_skip_a_gate(scenario):
    def check(plan: Plan, before: Rollout, result: StepResult, views: list[DeviceView]) -> None:
        if result.rollout.state is S.COMPLETED:
            return  # Rule 8: every gate has passed
        passed = {d.stage for d in result.rollout.decisions if d.verdict == "pass"}
        for a in of(result.actions, Dispatch):
            assert a.stage == result.rollout.stage
            assert a.stage not in passed

    simulate(scenario, check)


@PROPERTY
@given(scenarios())
def test_property_pinned_devices_are_never_dispatched(scenario):
    def check(plan: Plan, before: Rollout, result: StepResult, views: list[DeviceView]) -> None:
        pins = {v.device_id: v.pinned_version for v in views}
        for did in dispatched(result):
            assert pins[did] in (None, plan.version)

    simulate(scenario, check)


@PROPERTY
@given(scenarios(), st.integers(5, 60))
def test_property_a_revert_reaches_every_device_that_ever_ran_the_new_version(scenario, abort_at):
    plan, sim, rnd = scenario.build()
    rollout, _ = drive(
        plan,
        sim,
        steps=abort_at,
        before_step=lambda i, now: scenario.churn(sim, rnd, i, now),
        operate=lambda rollout, now: scenario.operate(plan, rollout, rnd, now),
    )
    now = abort_at * 60.0
    if rollout.state is not S.ABORTED:
        rollout = apply_operator(plan, rollout, Abort(revert=True), now=now).rollout
    on_new = {d for d, dev in sim.devices.items() if dev.view.running_version == plan.version}
    for did in sim.devices:  # everyone comes back online, keeping its pins
        sim.set(did, online=True)
    rollout, history = drive(plan, sim, steps=90, rollout=rollout, start=now)
    assert not any(dispatched(r) for r in history)
    for did in sim.ran_new | on_new:
        if sim.devices[did].view.pinned_version == plan.version:
            continue
        assert sim.devices[did].view.running_version != plan.version, did
        if did in on_new:
            assert sim.reverts[did] > 0, did
        assert rollout.progress[did].state is not D.REVERTING, rollout.progress[did]


# --- pair tests through the wire format ---------------------------------------------------------


class WireFleet(Sim):
    """The simulated fleet, with every report going through the protocol's JSON models."""

    seq_no: int = 0

    def _wire(self, model: type, payload: dict) -> object:
        self.seq_no += 1
        payload = {"seq": self.seq_no, "time": REPORT_TIME, **payload}
        return parse_payload(model, json.dumps(payload).encode(), what=model.__name__)

    def advance(self, now: float) -> list[DeviceEvent]:
        out = []
        for e in super().advance(now):
            wire = self._wire(
                DeploymentEvent,
                {
                    "device_id": e.device_id,
                    "model": self.plan.model,
                    "version": e.version,
                    "phase": e.phase,
                    "failure_class": e.failure_class,
                    "detail": e.detail,
                    "deployment_id": self.plan.rollout_id,
                },
            )
            assert isinstance(wire, DeploymentEvent)
            out.append(
                DeviceEvent(
                    wire.device_id,
                    wire.version,
                    wire.phase,
                    wire.failure_class,
                    wire.detail,
                    model=wire.model,
                    rollout_id=wire.deployment_id,
                )
            )
        return out

    def _report_telemetry(self) -> None:
        for did, d in self.devices.items():
            version = d.view.running_version or ""
            new = version == self.plan.version
            p95 = d.p95_ms * (d.slowdown if new else 1.0)
            tel = self._wire(
                Telemetry,
                {
                    "device_id": did,
                    "models": {
                        self.plan.model: {
                            "requests": 1000,
                            "errors": round(1000 * d.error_share) if new else 0,
                            "latency_ms": {"p50": p95 / 2, "p95": p95, "p99": p95 * 1.5},
                        }
                    },
                },
            )
            state = self._wire(
                ReportedState,
                {
                    "device_id": did,
                    "models": {self.plan.model: {"version": version, "state": "active"}},
                },
            )
            assert isinstance(tel, Telemetry)
            assert isinstance(state, ReportedState)
            m = tel.models[self.plan.model]
            running_now = state.models[self.plan.model].version or ""
            self.telemetry[(did, running_now)] = DeviceMetrics(
                int(m["requests"]), int(m["errors"]), float(m["latency_ms"]["p95"])
            )


def test_pair_gate_halts_when_one_hardware_class_fails_to_install():
    plan = make_plan(
        stages=(Stage(percent=20, soak_s=300), Stage(percent=100, soak_s=300)),
        gates=Gates(min_sample=5),
        revert_on_fail=True,
    )
    sim = WireFleet.of(plan, make_fleet(100, classes=("rpi5", "jetson", "x86")))
    for i, d in enumerate(sim.devices.values()):
        if d.view.hardware_class == "jetson" and i % 2:
            d.outcome = "fail:verification:cnn 2.0.0: manifest digest mismatch"
    rollout, history = drive(plan, sim, steps=30)
    decision = next(d for r in history for d in decisions(r))
    assert (decision.stage, decision.verdict) == (0, "fail")
    install = decision.figures["install"]
    assert install["by_hardware_class"]["jetson"]["failed"] > 0
    assert install["by_hardware_class"]["rpi5"] == {"succeeded": 7, "failed": 0, "rate": 1.0}
    assert install["by_failure_class"] == {"verify": install["failed"]}
    assert "on hardware class jetson" in decision.reason or "install success" in decision.reason
    assert rollout.state is S.HALTED
    assert rollout.reverting
    # no device outside stage 0 was ever touched, and everything that ran 2.0.0 went back
    stage0 = {
        d
        for d, k in assign_stages(plan, make_fleet(100, classes=("rpi5", "jetson", "x86"))).items()
        if k == 0
    }
    assert set(sim.dispatches) <= stage0
    assert {d for d in sim.devices if sim.devices[d].view.running_version == V2} == set()


def test_pair_gate_halts_on_a_latency_regression_with_the_figures():
    plan = make_plan(
        stages=(Stage(percent=20, soak_s=300), Stage(percent=100, soak_s=300)),
        gates=Gates(min_sample=5),
    )
    sim = WireFleet.of(plan, make_fleet(100, classes=("rpi5", "jetson")))
    for d in sim.devices.values():
        d.p95_ms = 30.0 if d.view.hardware_class == "jetson" else 12.0
        d.slowdown = 1.6 if d.view.hardware_class == "jetson" else 1.05
    rollout, history = drive(plan, sim, steps=20)
    decision = next(d for r in history for d in decisions(r))
    assert decision.verdict == "fail"
    latency = decision.figures["latency"]
    jetson = latency["by_hardware_class"]["jetson"]
    assert (jetson["new_median_p95_ms"], jetson["control_median_p95_ms"]) == (48.0, 30.0)
    assert jetson["ratio"] == pytest.approx(1.6)
    assert latency["by_hardware_class"]["rpi5"]["ratio"] == pytest.approx(1.05)
    assert decision.reason == (
        "p95 latency ratio 1.325 > 1.25 (median over 20 devices); "
        "p95 latency ratio 1.600 > 1.25 on hardware class jetson"
    )
    assert decision.figures["checks"] == {
        "install": "pass",
        "crash": "pass",
        "errors": "pass",
        "latency": "fail",
    }
    assert rollout.state is S.HALTED
    assert not rollout.reverting
    assert rollout.decisions == (decision,)
