"""Staged, gated model rollouts over a fleet: a pure decision engine.

A :class:`Plan` says what to roll out (``model`` ``version``, replacing ``previous_version``), in
which :class:`Stage` s, behind which :class:`Gates`. :func:`step` takes the plan, the
:class:`Rollout` so far, what the caller knows about the target devices (:class:`DeviceView`),
the device reports received since the last step (:class:`DeviceEvent`), per-device telemetry
(:class:`DeviceMetrics`) and ``now`` (UTC epoch seconds); it returns the next :class:`Rollout`
and the actions to carry out, in order: :class:`Dispatch`, :class:`Revert`,
:class:`GateDecision`, :class:`StateChanged`, :class:`DeviceChanged`. Operators act through
:func:`apply_operator`; :func:`preview` shows the stages and the blast radius before a start.

This module does no I/O: it never reads the clock, a database or the network, and never logs.
It will NOT: select the target devices (the caller applies the plan's selector and passes the
matching devices), resolve pins (the caller passes each device's effective pin; see
:func:`effective_pin`), sign or publish orders, store anything, or deduplicate device reports
(the caller drops duplicates by ``(device, seq)``). The same inputs always give the same outputs.

Rules
-----
Rule 1 (cohorts). Every device has a *position* in [0, 1): the first 53 bits of
``sha256(salt + "\\0" + device_id)``. Devices that need the version (not pinned to another
version, not running it already) are grouped into strata by ``(hardware_class, runtime)``;
inside a stratum of ``n`` devices the one at hash rank ``r`` gets the key ``r / n``; all of
them are ordered by ``(key, position, device_id)`` and stage ``k`` takes the first ``C_k``.
``C_k`` is the stage's cumulative target (``ceil(N * percent / 100)`` or ``min(count, N)``, never
below the previous stage's) and ``C_0`` is at least the number of strata: the rank-0 device of
every stratum has key 0, so stage 0 holds at least one device of every hardware class and
runtime present, and every prefix is proportional to the strata within about one device each.
Pinned and up-to-date devices are placed by position alone (Rule 2's thresholds). Percent and
count are cumulative (``Stage(percent=10)``: 10% of the target has been offered the version by
the end of this stage); the last stage must be ``percent=100``.

Rule 2 (newcomers). A device first seen after the first step (it enrolled, or started matching
the target) gets the stage its position gives: the first ``k`` with ``position < C_k / N``
(``N`` = eligible devices at the first step). If that stage is at or before the current stage,
it joins the *current* stage: it is dispatched with the current cohort and judged by the current
gate. A device that was left pending in a stage whose gate has been decided (it was offline, or
pinned) joins the current stage the same way when it is dispatched. So no device is ever
dispatched as a member of a stage whose gate has passed, except after the last gate (Rule 8).
An aborted rollout takes no newcomers.

Rule 3 (dispatch). Only in ``RUNNING`` (and ``COMPLETED``, Rule 8), never while reverting, only
inside a maintenance window when the plan has any, and only to devices that are online, pending
(or failed with a retry due), in a stage at or before the current one, not running the version
already, not pinned to another version and not held by another rollout of the model. At most
``max_in_flight`` devices are ``IN_PROGRESS`` at any time, and at most
``max_in_flight_per_group`` per device group. Every ``IN_PROGRESS`` device holds a slot, online
or not: a silent device holds it until its timeout (Rule 5), and an offline device that was
never dispatched holds none. Devices are dispatched in ``(stage, position, device_id)`` order.

Rule 4 (reports). An event counts at the step that receives it (server time; device clocks are
not trusted). Phases before ``activated`` are signs of life. ``activated`` marks the device as
having run the version. ``committed`` makes it ``SUCCEEDED``, also late (after a timeout).
``failed`` makes an ``IN_PROGRESS`` device ``FAILED`` with the class from
:func:`classify_failure`; ``rolled_back`` makes it ``FAILED`` (``probation``) from
``IN_PROGRESS`` or ``SUCCEEDED``. The reported running version (``DeviceView``) is the truth
when it is newer than the device's last change (``reported_at``): a device that reports the new
version while pending or skipped, or after a time-out, is ``SUCCEEDED``; a ``SUCCEEDED`` device
that reports its previous version again rolled itself back and becomes ``FAILED``
(``probation``), whether or not the event arrived. A report older than the last event never
overrides it (events and state reports travel apart).

Rule 5 (time-outs and retries). An ``IN_PROGRESS`` device with no report for
``device_timeout_s`` becomes ``FAILED`` with class ``timed_out`` and frees its slot, so no device
blocks this rollout or the next one. A failure is retried after
``min(backoff_max_s, backoff_base_s * 2 ** (attempts - 1))`` while ``attempts < max_attempts`` of
its class's :class:`RetryPolicy`; ``incompatible`` is never retried.

Rule 6 (gates). The current stage's gate is evaluated in ``RUNNING`` once (a) no device of the
stage is ``IN_PROGRESS``, (b) no online device that Rule 3 would dispatch in this stage is left
(pending, or failed with a retry to come), and (c) ``soak_s`` has passed since the stage started
and since the last report of its cohort. The cohort is the stage's dispatched devices. Checks:

* install: ``succeeded / (succeeded + failed)`` in the cohort (``incompatible`` failures are
  counted apart, not as install failures), overall and per hardware class and per runtime with
  at least ``min_sample`` finished devices, ``>= min_install_success``;
* crash: of every device that ran the new version (all stages so far), the share that fell back
  on its own (``probation``), ``<= max_crash_rate``;
* errors: inference errors / requests over every device's telemetry on the new version,
  ``<= max_error_rate``, overall and per hardware class with ``min_sample`` devices;
* latency: each new-version device's p95 is divided by the median p95 of the control group of its
  hardware class (telemetry on ``previous_version``: devices still running it, and the last
  window of devices that moved on); the median of these ratios, and each class's ratio of
  medians when both sides have ``min_sample`` devices, must be ``<= max_p95_ratio``. When a
  class has no control device left (a last stage of 100%), the control median measured at this
  rollout's latest earlier gate stands in for it (marked ``control_from_earlier_stage``). A plan
  without ``previous_version`` (no device ran another version of the model when the rollout was
  created: a model's first release) has nothing to compare with: the check is ``off``, and
  ``figures["off_because"]`` and a passing verdict's reason say why.

A stage whose install check must fail whatever its unfinished devices do (counting each as a
success: overall or on one hardware class, with ``min_sample`` finished) fails at once, without
waiting for them or for the soak: a bad release stops as soon as the verdict is certain.

Any check that fails makes the verdict ``fail``; otherwise a check without ``min_sample`` data
makes it ``inconclusive``; otherwise ``pass``. Telemetry arrives on the devices' own schedule,
so when only the error and latency checks lack data at the end of the soak, the gate waits for
them, at most ``sample_wait_s`` more, before it calls the stage inconclusive; a stage whose
install check lacks data (too few devices finished, and none left to finish) is inconclusive at
once. A stage without any device (cumulative targets
that round to the same count) has no install check; the fleet-wide checks still apply. Pass
moves to the next stage (or ``COMPLETED``); fail to ``HALTED`` (plus Rule 7 when
``revert_on_fail``); inconclusive to ``PAUSED``, for a person to decide.
Every :class:`GateDecision` carries the figures that drove it and is kept in
``Rollout.decisions``.

Rule 7 (revert). Abort-and-revert, or a failed gate with ``revert_on_fail``, sets
``Rollout.reverting``. From then on every step sends :class:`Revert` to every device that runs,
ran or may be installing the new version (``IN_PROGRESS``, ``SUCCEEDED``, ``FAILED`` with
``timed_out``, or reporting the new version), to the version it ran before (else
``previous_version``): no gate, window, cap or conflict holds it back. Only a pin to the new
version does. A device is ``REVERTING`` until it reports another version (``REVERTED``); the
revert is sent again when it is online and ``device_timeout_s`` has passed, or at once when it
was offline when the revert was first sent.

Rule 8 (completion). After the last gate passes the rollout is ``COMPLETED`` and keeps
converging: devices left pending (offline at the time) and newcomers are dispatched under Rule 3,
without gates (every gate has approved the version for the whole target). Their failures are
recorded; they change no state.

Rule 9 (pins and conflicts). A device pinned to another version is ``SKIPPED`` (never failed)
and never dispatched; it is pending again when the pin goes. One rollout per model per device
at a time: a device is held by the rollout that has it ``IN_PROGRESS`` or ``REVERTING``
(:func:`held_devices`); the caller passes ``DeviceView.held_by`` and another rollout of the same
model then skips it and tries again at every step. The older rollout keeps the device (nothing is
pre-empted); abort it to hand its devices over. Holding is bounded by ``device_timeout_s``. When a
newer rollout of a model starts, the caller stops stepping the completed ones of that model.

Rule 10 (operators). :func:`apply_operator` checks :data:`TRANSITIONS`. ``Pause`` stops
dispatches and gates (in-flight devices carry on and are still tracked; soak time keeps running).
``Resume`` continues; a paused or halted gate is evaluated again at the next step. ``Promote``
records an operator ``pass`` for the current gate with the figures so far, and starts the next
stage now (or completes); devices still in flight carry on and are judged by no gate.
``Abort(revert=False)`` stops dispatching and keeps what devices run; ``Abort(revert=True)``
also reverts (Rule 7) at the next step; the caller runs a step at once. ``RetryFailed`` makes
every failed device except ``incompatible`` pending again with its attempts reset. After a
revert, only ``Abort`` is accepted.

Decisions
---------
* Two device states beyond the issue's list: ``SKIPPED`` (a pin or another rollout holds the
  device: not a failure, re-checked at every step) and ``REVERTING`` (a revert sent and not yet
  confirmed by a state report), so that both are visible states rather than hidden flags.
* Newcomers are recognised by having no progress record, not by an enrolment time, so a device
  that starts matching the target is treated exactly like one that enrolled.
* Install success is judged per stage cohort, and crash, error and latency checks over every
  device that ran the new version so far. A cohort is what a stage puts at risk, while a crash
  or a slow model can show up long after its stage's gate.
* ``incompatible`` refusals are reported apart, not counted as install failures: they say the
  target is wrong, not that the model is bad. A cohort made only of refusals is inconclusive.
* Retries back off exponentially without jitter: the in-flight cap already spreads dispatches,
  and the same inputs must give the same outputs.
* :func:`apply_operator` changes state only; the Revert actions of ``Abort(revert=True)`` come
  from the next :func:`step`, which is where the device views (pins, what runs) are known.

States
------
Rollout (:func:`describe_transitions` renders :data:`TRANSITIONS`)::

    PENDING    start             -> RUNNING
    PENDING    pause             -> PAUSED
    PENDING    abort             -> ABORTED
    RUNNING    gate_pass         -> RUNNING
    RUNNING    gate_pass_last    -> COMPLETED
    RUNNING    gate_fail         -> HALTED
    RUNNING    gate_inconclusive -> PAUSED
    RUNNING    pause             -> PAUSED
    RUNNING    promote           -> RUNNING
    RUNNING    promote_last      -> COMPLETED
    RUNNING    abort             -> ABORTED
    RUNNING    retry_failed      -> RUNNING
    PAUSED     resume            -> RUNNING
    PAUSED     promote           -> RUNNING
    PAUSED     promote_last      -> COMPLETED
    PAUSED     abort             -> ABORTED
    PAUSED     retry_failed      -> PAUSED
    HALTED     resume            -> RUNNING
    HALTED     promote           -> RUNNING
    HALTED     promote_last      -> COMPLETED
    HALTED     abort             -> ABORTED
    HALTED     retry_failed      -> HALTED
    COMPLETED  abort             -> ABORTED
    COMPLETED  retry_failed      -> COMPLETED

Device (:data:`DEVICE_TRANSITIONS`): ``PENDING`` -> ``IN_PROGRESS`` -> ``SUCCEEDED`` |
``FAILED``; ``SKIPPED`` while pinned or held; ``REVERTING`` -> ``REVERTED``. ``timed_out`` is
``FAILED`` with that class.

Failure classes
---------------
Devices report the agent's classes; :func:`classify_failure` maps them
(:data:`AGENT_FAILURE_CLASSES`):

==========================================================================  ================
agent class (``DeploymentEvent.failure_class``)                             engine class
==========================================================================  ================
``download`` ``slow-retrieval`` ``deadline`` ``endless-data`` ``not-found``  ``download``
``retries-exhausted``
``verification`` ``integrity`` (bytes differ from the signed manifest)      ``verify``
``verification`` whose detail names targeting ("released for hardware",     ``incompatible``
"released for devices") or the rollback floor; ``incompatible``
``storage`` ``internal``, and any unknown class                             ``install``
``self_test``                                                               ``self_test``
``probation`` ``crash_loop`` ``corruption`` (the device fell back)           ``probation``
(no report for ``device_timeout_s``; server side)                          ``timed_out``
==========================================================================  ================

Example
-------
>>> plan = Plan(rollout_id="r1", model="cnn", version="2", previous_version="1", salt="s",
...             stages=(Stage(percent=50, soak_s=0), Stage(percent=100, soak_s=0)),
...             gates=Gates(min_sample=1, max_error_rate=None, max_p95_ratio=None))
>>> fleet = [DeviceView(f"d{i}", hardware_class="rpi5", running_version="1") for i in range(4)]
>>> r = step(plan, Rollout(), devices=fleet, now=0.0)
>>> sent = [a.device_id for a in r.actions if isinstance(a, Dispatch)]
>>> r.rollout.state.name, sent
('RUNNING', ['d0', 'd1'])
>>> done = [DeviceEvent(d, "2", "committed") for d in sent]
>>> r = step(plan, r.rollout, devices=fleet, events=done, now=60.0)
>>> [(a.verdict, a.figures["install"]["rate"]) for a in r.actions if isinstance(a, GateDecision)]
[('pass', 1.0)]
>>> r.rollout.stage, [a.device_id for a in r.actions if isinstance(a, Dispatch)]
(1, ['d3', 'd2'])
"""

from __future__ import annotations

import hashlib
import heapq
import math
import statistics
from bisect import bisect_right
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from types import MappingProxyType
from typing import Final, Literal, TypeAlias

from shared.errors import UsageError

__all__ = [
    "AGENT_FAILURE_CLASSES",
    "DEFAULT_RETRIES",
    "DEVICE_TRANSITIONS",
    "FAILURE_CLASSES",
    "TRANSITIONS",
    "Abort",
    "Action",
    "DeviceChanged",
    "DeviceEvent",
    "DeviceMetrics",
    "DeviceProgress",
    "DeviceState",
    "DeviceView",
    "Dispatch",
    "FailureClass",
    "GateDecision",
    "Gates",
    "MaintenanceWindow",
    "OperatorAction",
    "OperatorActionError",
    "Pause",
    "Plan",
    "Preview",
    "Promote",
    "Resume",
    "RetryFailed",
    "RetryPolicy",
    "Revert",
    "Rollout",
    "RolloutState",
    "Stage",
    "StateChanged",
    "StepResult",
    "Trigger",
    "Verdict",
    "apply_operator",
    "assign_stages",
    "classify_failure",
    "describe_transitions",
    "effective_pin",
    "hash_position",
    "held_devices",
    "preview",
    "step",
    "window_open",
]

FailureClass: TypeAlias = Literal[
    "download", "verify", "incompatible", "install", "self_test", "probation", "timed_out"
]
FAILURE_CLASSES: Final[tuple[FailureClass, ...]] = (
    "download",
    "verify",
    "incompatible",
    "install",
    "self_test",
    "probation",
    "timed_out",
)
Verdict: TypeAlias = Literal["pass", "fail", "inconclusive"]

AGENT_FAILURE_CLASSES: Final[Mapping[str, FailureClass]] = MappingProxyType(
    {
        "download": "download",
        "slow-retrieval": "download",
        "deadline": "download",
        "endless-data": "download",
        "not-found": "download",
        "retries-exhausted": "download",
        "verification": "verify",
        "integrity": "verify",
        "incompatible": "incompatible",
        "targeting": "incompatible",
        "storage": "install",
        "internal": "install",
        "self_test": "self_test",
        "probation": "probation",
        "crash_loop": "probation",
        "corruption": "probation",
    }
)
"""Agent failure class -> engine class. ``verification`` is refined by :func:`classify_failure`."""

# What shared.trust puts in a TargetingError / RollbackError message: the device refuses the
# release for good, so retrying is pointless.
_REFUSAL_MARKERS: Final = ("released for hardware", "released for devices", "rollback floor")
_FAILED_DEVICES_SHOWN: Final = 20
_RUNNING_PHASES: Final = ("activated", "committed")
_COHORT_COUNTS: Final = (
    "members",
    "dispatched",
    "in_progress",
    "reverted",
    "not_dispatched",
    "already_running",
    "skipped",
)
_DETAIL_CHARS: Final = 200


def classify_failure(agent_class: str | None, detail: str | None = None) -> FailureClass:
    """The engine's failure class for what a device reported (see the table in the docstring).

    >>> classify_failure("slow-retrieval")
    'download'
    >>> classify_failure("verification", "cnn 2: released for hardware ['rpi5'], not 'x86'")
    'incompatible'
    """
    if agent_class == "verification" and detail and any(m in detail for m in _REFUSAL_MARKERS):
        return "incompatible"
    return AGENT_FAILURE_CLASSES.get(agent_class or "", "install")


def hash_position(salt: str, device_id: str) -> float:
    """The device's reproducible position in [0, 1) for a rollout salt (53 bits of sha256)."""
    digest = hashlib.sha256(f"{salt}\x00{device_id}".encode()).digest()
    return (int.from_bytes(digest[:8], "big") >> 11) / 9007199254740992.0  # 2 ** 53


def effective_pin(
    *, device: str | None = None, group: str | None = None, fleet: str | None = None
) -> str | None:
    """The pin that applies: the most specific one wins (device, then group, then fleet)."""
    for pin in (device, group, fleet):
        if pin is not None:
            return pin
    return None


class OperatorActionError(UsageError):
    """An operator action is not allowed in the rollout's state (an API answers 409)."""

    default_check = "rollout-state"

    def __init__(self, message: str, *, rollout_id: str, state: RolloutState, action: str) -> None:
        super().__init__(message)
        self.rollout_id = rollout_id
        self.state = state
        self.action = action


# --- plan values --------------------------------------------------------------------------------


def _finite(value: float) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


@dataclass(frozen=True, slots=True)
class Stage:
    """One stage: a cumulative share of the target (``percent`` or ``count``) and its soak."""

    percent: float | None = None  # cumulative % of the target reached by the end of this stage
    count: int | None = None  # cumulative number of devices reached by the end of this stage
    soak_s: float = 3600.0  # seconds the stage runs after its last report before its gate

    def __post_init__(self) -> None:
        if (self.percent is None) == (self.count is None):
            raise ValueError(
                f"a stage needs exactly one of percent and count, got percent={self.percent} "
                f"and count={self.count}"
            )
        if self.percent is not None and not (_finite(self.percent) and 0 < self.percent <= 100):
            raise ValueError(f"stage percent must be in (0, 100], got {self.percent}")
        if self.count is not None and self.count < 1:
            raise ValueError(f"stage count must be >= 1, got {self.count}")
        if not (_finite(self.soak_s) and self.soak_s >= 0):
            raise ValueError(f"stage soak_s must be >= 0 seconds, got {self.soak_s}")


@dataclass(frozen=True, slots=True)
class Gates:
    """Thresholds of every stage's gate. ``None`` turns a check off."""

    min_install_success: float = 0.95  # succeeded / (succeeded + failed) in the cohort
    max_crash_rate: float | None = 0.05  # fell back on their own / ran the new version
    max_error_rate: float | None = 0.02  # inference errors / requests on the new version
    max_p95_ratio: float | None = 1.25  # p95 latency, new version / control group
    min_sample: int = 5  # devices a check needs; fewer makes it inconclusive
    sample_wait_s: float = 300.0  # after the soak, how long telemetry checks wait for min_sample

    def __post_init__(self) -> None:
        if not (_finite(self.min_install_success) and 0 <= self.min_install_success <= 1):
            raise ValueError(
                f"min_install_success must be in [0, 1], got {self.min_install_success}"
            )
        for name in ("max_crash_rate", "max_error_rate"):
            value = getattr(self, name)
            if value is not None and not (_finite(value) and 0 <= value <= 1):
                raise ValueError(f"{name} must be in [0, 1] or None, got {value}")
        if self.max_p95_ratio is not None and not (
            _finite(self.max_p95_ratio) and self.max_p95_ratio > 0
        ):
            raise ValueError(f"max_p95_ratio must be > 0 or None, got {self.max_p95_ratio}")
        if self.min_sample < 1:
            raise ValueError(f"min_sample must be >= 1, got {self.min_sample}")
        if not (_finite(self.sample_wait_s) and self.sample_wait_s >= 0):
            raise ValueError(f"sample_wait_s must be >= 0 seconds, got {self.sample_wait_s}")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often a failure class is dispatched again, and after how long."""

    max_attempts: int = 1  # dispatches in all, the first included
    backoff_base_s: float = 300.0  # wait after the first failure; doubles after each
    backoff_max_s: float = 3600.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if not (_finite(self.backoff_base_s) and 0 <= self.backoff_base_s <= self.backoff_max_s):
            raise ValueError(
                f"backoff must satisfy 0 <= backoff_base_s <= backoff_max_s, got "
                f"{self.backoff_base_s} and {self.backoff_max_s}"
            )

    def delay_s(self, attempts: int) -> float:
        """Seconds to wait after the ``attempts``-th failed dispatch."""
        return float(min(self.backoff_max_s, self.backoff_base_s * 2 ** max(0, attempts - 1)))


DEFAULT_RETRIES: Final[Mapping[FailureClass, RetryPolicy]] = MappingProxyType(
    {
        "download": RetryPolicy(3, 60.0, 3600.0),
        "verify": RetryPolicy(2, 300.0, 3600.0),
        "incompatible": RetryPolicy(1, 0.0, 0.0),
        "install": RetryPolicy(2, 300.0, 3600.0),
        "self_test": RetryPolicy(1),
        "probation": RetryPolicy(1),
        "timed_out": RetryPolicy(2, 600.0, 3600.0),
    }
)
"""Used for every class a plan does not name. ``incompatible`` can never be retried."""


@dataclass(frozen=True, slots=True)
class MaintenanceWindow:
    """A weekly window in UTC: ``days`` (0 = Monday), from ``start_minute`` for ``duration_min``.

    >>> w = MaintenanceWindow(days=frozenset({3}), start_minute=60, duration_min=30)
    >>> w.contains(3600.0), w.contains(5400.0)  # 1970-01-01 was a Thursday
    (True, False)
    """

    days: frozenset[int]
    start_minute: int
    duration_min: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "days", frozenset(self.days))
        if not self.days or not self.days <= frozenset(range(7)):
            raise ValueError(f"window days must be a non-empty subset of 0..6, got {self.days}")
        if not 0 <= self.start_minute < 1440:
            raise ValueError(f"window start_minute must be in 0..1439, got {self.start_minute}")
        if not 1 <= self.duration_min <= 10080:
            raise ValueError(f"window duration_min must be in 1..10080, got {self.duration_min}")

    def contains(self, now: float) -> bool:
        """Whether ``now`` (UTC epoch seconds) falls inside the window."""
        days = int(now // 86400)
        minute_of_week = ((days + 3) % 7) * 1440 + int(now % 86400) // 60
        return any(
            (minute_of_week - (day * 1440 + self.start_minute)) % 10080 < self.duration_min
            for day in self.days
        )


def window_open(windows: Sequence[MaintenanceWindow], now: float) -> bool:
    """True when there are no windows, or ``now`` is inside one of them."""
    return not windows or any(w.contains(now) for w in windows)


@dataclass(frozen=True, kw_only=True)
class Plan:
    """What to roll out, to whom it may go (the caller selects), how fast and behind what gates."""

    rollout_id: str
    model: str
    version: str
    previous_version: str | None  # the version devices keep locally to revert to
    stages: tuple[Stage, ...]
    salt: str  # per rollout: cohorts are reproducible, and differ between rollouts
    max_in_flight: int = 100
    max_in_flight_per_group: int | None = None  # e.g. per site or network, by DeviceView.group
    gates: Gates = field(default_factory=Gates)
    revert_on_fail: bool = False
    windows: tuple[MaintenanceWindow, ...] = ()  # no dispatch outside them; reverts ignore them
    device_timeout_s: float = 3600.0  # no report for this long: timed_out (covers probation)
    retries: Mapping[FailureClass, RetryPolicy] = field(default_factory=lambda: DEFAULT_RETRIES)

    def __post_init__(self) -> None:
        problems = []
        if not self.stages:
            problems.append("stages must not be empty")
        elif self.stages[-1].percent != 100:
            problems.append(f"the last stage must be percent=100, got {self.stages[-1]}")
        if self.version == self.previous_version:
            problems.append(f"version and previous_version are both {self.version!r}")
        if not self.salt:
            problems.append("salt must not be empty")
        if self.max_in_flight < 1:
            problems.append(f"max_in_flight must be >= 1, got {self.max_in_flight}")
        if self.max_in_flight_per_group is not None and self.max_in_flight_per_group < 1:
            problems.append(
                f"max_in_flight_per_group must be >= 1 or None, got {self.max_in_flight_per_group}"
            )
        if not (_finite(self.device_timeout_s) and self.device_timeout_s > 0):
            problems.append(f"device_timeout_s must be > 0 seconds, got {self.device_timeout_s}")
        retries = {**DEFAULT_RETRIES, **self.retries}
        unknown = sorted(set(retries) - set(FAILURE_CLASSES))
        if unknown:
            problems.append(f"retries name unknown failure classes {unknown}")
        if retries["incompatible"].max_attempts != 1:
            problems.append(
                "incompatible failures are never retried: its max_attempts must be 1, got "
                f"{retries['incompatible'].max_attempts}"
            )
        if problems:
            raise ValueError(f"invalid plan {self.rollout_id!r}: " + "; ".join(problems))
        object.__setattr__(self, "stages", tuple(self.stages))
        object.__setattr__(self, "windows", tuple(self.windows))
        object.__setattr__(self, "retries", MappingProxyType(retries))

    @property
    def last_stage(self) -> int:
        return len(self.stages) - 1


# --- inputs -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeviceView:
    """What the fleet knows about one target device, from its latest reports and the registry.

    ``runtime`` is a coarse runtime family (``onnxruntime``, ``openvino``, ``litert``): it only
    forms strata. ``running_version`` is the version the device last reported running for the
    plan's model (``ReportedState.models[model].version``), also after a local rollback.
    ``pinned_version`` is the effective pin (:func:`effective_pin`). ``held_by`` names another
    rollout of the same model that has this device in flight (:func:`held_devices`).
    ``reported_at`` dates ``running_version``: a report older than the device's last change in
    this rollout never overrides what its events said (state reports and events travel apart).
    """

    device_id: str
    hardware_class: str | None = None
    runtime: str | None = None
    online: bool = True
    running_version: str | None = None
    pinned_version: str | None = None
    group: str | None = None
    held_by: str | None = None
    reported_at: float | None = None  # server time of the state report behind running_version


@dataclass(frozen=True, slots=True)
class DeviceEvent:
    """A deployment report (``shared.protocol.DeploymentEvent``) reduced to what the engine uses.

    ``phase`` is one of the protocol's phases; ``failure_class`` is the agent's class. Events
    naming another model, or another rollout in ``rollout_id``, are ignored.
    """

    device_id: str
    version: str
    phase: str
    failure_class: str | None = None
    detail: str | None = None
    model: str | None = None  # None: the plan's model
    rollout_id: str | None = None  # DeploymentEvent.deployment_id, when the order carried it


@dataclass(frozen=True, slots=True)
class DeviceMetrics:
    """One device's latest telemetry window for one version of the model."""

    requests: int
    errors: int
    p95_ms: float | None = None


# --- rollout state ------------------------------------------------------------------------------


class RolloutState(Enum):
    PENDING = "pending"
    RUNNING = "running"
    PAUSED = "paused"
    HALTED = "halted"
    COMPLETED = "completed"
    ABORTED = "aborted"


class DeviceState(Enum):
    PENDING = "pending"
    IN_PROGRESS = "in_progress"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"  # pinned to another version, or held by another rollout
    REVERTING = "reverting"
    REVERTED = "reverted"


_PENDING = DeviceState.PENDING
_IN_PROGRESS = DeviceState.IN_PROGRESS
_SUCCEEDED = DeviceState.SUCCEEDED
_FAILED = DeviceState.FAILED
_SKIPPED = DeviceState.SKIPPED
_REVERTING = DeviceState.REVERTING
_REVERTED = DeviceState.REVERTED

Trigger: TypeAlias = Literal[
    "start",
    "gate_pass",
    "gate_pass_last",
    "gate_fail",
    "gate_inconclusive",
    "pause",
    "resume",
    "promote",
    "promote_last",
    "abort",
    "retry_failed",
]

_R = RolloutState
TRANSITIONS: Final[Mapping[RolloutState, Mapping[Trigger, RolloutState]]] = MappingProxyType(
    {
        _R.PENDING: {"start": _R.RUNNING, "pause": _R.PAUSED, "abort": _R.ABORTED},
        _R.RUNNING: {
            "gate_pass": _R.RUNNING,
            "gate_pass_last": _R.COMPLETED,
            "gate_fail": _R.HALTED,
            "gate_inconclusive": _R.PAUSED,
            "pause": _R.PAUSED,
            "promote": _R.RUNNING,
            "promote_last": _R.COMPLETED,
            "abort": _R.ABORTED,
            "retry_failed": _R.RUNNING,
        },
        _R.PAUSED: {
            "resume": _R.RUNNING,
            "promote": _R.RUNNING,
            "promote_last": _R.COMPLETED,
            "abort": _R.ABORTED,
            "retry_failed": _R.PAUSED,
        },
        _R.HALTED: {
            "resume": _R.RUNNING,
            "promote": _R.RUNNING,
            "promote_last": _R.COMPLETED,
            "abort": _R.ABORTED,
            "retry_failed": _R.HALTED,
        },
        _R.COMPLETED: {"abort": _R.ABORTED, "retry_failed": _R.COMPLETED},
        _R.ABORTED: {},
    }
)
"""rollout state -> trigger -> next state. A trigger absent from a state is refused."""

DEVICE_TRANSITIONS: Final[Mapping[DeviceState, frozenset[DeviceState]]] = MappingProxyType(
    {
        _PENDING: frozenset({_IN_PROGRESS, _SKIPPED, _SUCCEEDED, _REVERTING}),
        _SKIPPED: frozenset({_PENDING, _SUCCEEDED, _REVERTING}),
        _IN_PROGRESS: frozenset({_SUCCEEDED, _FAILED, _REVERTING}),
        _SUCCEEDED: frozenset({_FAILED, _REVERTING}),
        _FAILED: frozenset({_IN_PROGRESS, _SUCCEEDED, _PENDING, _REVERTING}),
        _REVERTING: frozenset({_REVERTED}),
        _REVERTED: frozenset({_REVERTING}),
    }
)
"""device state -> the states it may move to."""


def describe_transitions() -> str:
    """The rollout state table as text, one ``STATE  trigger -> NEXT`` line per trigger."""
    return "\n".join(
        f"{state.name:<10} {trigger:<17} -> {target.name}"
        for state, triggers in TRANSITIONS.items()
        for trigger, target in triggers.items()
    )


@dataclass(frozen=True, slots=True)
class DeviceProgress:
    """One device in one rollout."""

    state: DeviceState
    stage: int  # the stage whose gate judges it (the stage it was last dispatched in)
    position: float  # hash_position(plan.salt, device_id)
    hardware_class: str | None = None  # as first seen: strata and figures
    runtime: str | None = None
    attempts: int = 0  # dispatches so far
    failure_class: FailureClass | None = None  # the last failure's class
    updated_at: float = 0.0  # the last change or report (server time)
    next_retry_at: float | None = None  # FAILED: retry due; REVERTING: revert to be sent again
    from_version: str | None = None  # what it ran when first dispatched: the revert target
    ran_new: bool = False  # it has run the new version (activated, committed or reported)
    note: str = ""  # why: skip reason, the last failure's detail


@dataclass(frozen=True, slots=True)
class GateDecision:
    """A gate's verdict, with every figure that drove it. Also an action (store it)."""

    stage: int
    verdict: Verdict
    figures: Mapping[str, object]
    reason: str
    at: float
    by: Literal["gate", "operator"] = "gate"


@dataclass(frozen=True)
class Rollout:
    """A rollout's state between steps. Start with ``Rollout()``; :func:`step` returns the next."""

    state: RolloutState = RolloutState.PENDING
    stage: int = 0
    stage_started_at: float | None = None
    progress: Mapping[str, DeviceProgress] = field(default_factory=lambda: MappingProxyType({}))
    decisions: tuple[GateDecision, ...] = ()
    reverting: bool = False  # Rule 7: every step sends reverts
    thresholds: tuple[float, ...] = ()  # cumulative share per stage for newcomers (Rule 2)
    started_at: float | None = None


# --- actions (out) ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Dispatch:
    """Send ``device_id`` a signed order for ``version`` of the plan's model."""

    device_id: str
    version: str
    attempt: int
    stage: int


@dataclass(frozen=True, slots=True)
class Revert:
    """Send ``device_id`` a revert to ``to_version`` (kept on the device; ``None``: no model)."""

    device_id: str
    to_version: str | None
    reason: str


@dataclass(frozen=True, slots=True)
class StateChanged:
    """The rollout moved (or started a new stage when ``old is new``)."""

    old: RolloutState
    new: RolloutState
    stage: int
    reason: str


@dataclass(frozen=True, slots=True)
class DeviceChanged:
    """One line of a device's timeline in this rollout (``old`` is None when it joins)."""

    device_id: str
    old: DeviceState | None
    new: DeviceState
    failure_class: FailureClass | None
    reason: str


Action: TypeAlias = Dispatch | Revert | GateDecision | StateChanged | DeviceChanged


@dataclass(frozen=True, slots=True)
class StepResult:
    rollout: Rollout
    actions: tuple[Action, ...]


@dataclass(frozen=True, slots=True)
class Pause:
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Resume:
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Promote:
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Abort:
    revert: bool = False
    reason: str = ""


@dataclass(frozen=True, slots=True)
class RetryFailed:
    reason: str = ""


OperatorAction: TypeAlias = Pause | Resume | Promote | Abort | RetryFailed


# --- cohorts ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Assignment:
    stage_of: dict[str, tuple[int, float]]  # device -> (stage, position)
    cumulative: tuple[int, ...]  # eligible devices reached by the end of each stage
    thresholds: tuple[float, ...]
    strata: int


def _cumulative(stages: Sequence[Stage], n: int, strata: int) -> tuple[int, ...]:
    out: list[int] = []
    previous = min(strata, n)  # Rule 1: stage 0 covers every stratum
    for st in stages:
        if st.count is not None:
            target = min(st.count, n)
        else:
            target = math.ceil(round(n * float(st.percent or 0) / 100, 9))
        previous = max(previous, target)
        out.append(previous)
    return tuple(out)


def _thresholds(stages: Sequence[Stage], cumulative: Sequence[int], n: int) -> tuple[float, ...]:
    if n:
        shares = [c / n for c in cumulative]
    else:  # nobody yet: percent stages by their percent, count stages add nothing
        shares, previous = [], 0.0
        for st in stages:
            previous = max(previous, float(st.percent) / 100) if st.percent else previous
            shares.append(previous)
    shares[-1] = 1.0
    return tuple(shares)


def _stage_for(thresholds: Sequence[float], position: float) -> int:
    return min(bisect_right(thresholds, position), len(thresholds) - 1)


def _assign(plan: Plan, devices: Sequence[DeviceView]) -> _Assignment:
    salt, version = plan.salt, plan.version
    strata: dict[tuple[str | None, str | None], list[tuple[float, str]]] = {}
    loose: list[tuple[float, str]] = []  # pinned elsewhere or up to date: by position only
    for v in devices:
        pos = hash_position(salt, v.device_id)
        if (
            v.pinned_version is not None and v.pinned_version != version
        ) or v.running_version == version:
            loose.append((pos, v.device_id))
        else:
            strata.setdefault((v.hardware_class, v.runtime), []).append((pos, v.device_id))
    keyed: list[tuple[float, float, str]] = []
    for members in strata.values():
        members.sort()
        n = len(members)
        keyed.extend((rank / n, pos, did) for rank, (pos, did) in enumerate(members))
    keyed.sort()
    total = len(keyed)
    cumulative = _cumulative(plan.stages, total, len(strata))
    thresholds = _thresholds(plan.stages, cumulative, total)
    stage_of: dict[str, tuple[int, float]] = {}
    k = 0
    for i, (_, pos, did) in enumerate(keyed):
        while i >= cumulative[k]:
            k += 1
        stage_of[did] = (k, pos)
    for pos, did in loose:
        stage_of[did] = (_stage_for(thresholds, pos), pos)
    if len(stage_of) != len(devices):
        raise ValueError(f"device ids must be unique: {len(devices) - len(stage_of)} repeated")
    return _Assignment(stage_of, cumulative, thresholds, len(strata))


def assign_stages(plan: Plan, devices: Sequence[DeviceView]) -> dict[str, int]:
    """Each device's stage index under Rule 1 (pinned and up-to-date ones by position alone).

    Raises:
        ValueError: a device id appears twice.
    """
    return {did: stage for did, (stage, _) in _assign(plan, devices).stage_of.items()}


@dataclass(frozen=True)
class Preview:
    """What a plan would do to these devices, before it starts."""

    stage_sizes: tuple[int, ...]  # devices per stage (not cumulative)
    cumulative: tuple[int, ...]
    by_hardware_class: Mapping[str, tuple[int, ...]]  # devices per stage
    by_stratum: Mapping[str, tuple[int, ...]]  # "hardware_class/runtime" -> devices per stage
    blast_radius: int  # devices that could run the new version before the first gate decision
    newcomer_stage0_share: float  # share of newcomers that would join stage 0 (Rule 2)
    skipped: int  # pinned to another version or held by another rollout
    already_running: int
    offline: int
    warnings: tuple[str, ...]


def _label(value: str | None) -> str:
    return "unknown" if value is None else value


def preview(plan: Plan, devices: Sequence[DeviceView]) -> Preview:
    """Stage sizes per hardware class and stratum, and the worst-case blast radius.

    The blast radius counts the stage-0 devices that may be dispatched (online or not, since they
    may come online before the gate); newcomers add about ``newcomer_stage0_share`` of their
    number while stage 0 runs.
    """
    a = _assign(plan, devices)
    stages = len(plan.stages)
    sizes = [0] * stages
    by_class: dict[str, list[int]] = {}
    by_stratum: dict[str, list[int]] = {}
    skipped = already = offline = blast = 0
    for v in devices:
        k = a.stage_of[v.device_id][0]
        sizes[k] += 1
        by_class.setdefault(_label(v.hardware_class), [0] * stages)[k] += 1
        key = f"{_label(v.hardware_class)}/{_label(v.runtime)}"
        by_stratum.setdefault(key, [0] * stages)[k] += 1
        offline += not v.online
        if v.running_version == plan.version:
            already += 1
        elif (
            v.pinned_version is not None and v.pinned_version != plan.version
        ) or v.held_by is not None:
            skipped += 1
        elif k == 0:
            blast += 1
    cumulative = tuple(sum(sizes[: k + 1]) for k in range(stages))
    warnings = []
    minimum = plan.gates.min_sample
    for k, size in enumerate(sizes):
        if size < minimum:
            warnings.append(
                f"stage {k} has {size} devices, fewer than gates.min_sample {minimum}: its "
                "install check will be inconclusive and the rollout will pause there"
            )
    first = plan.stages[0]
    if (
        first.percent is not None
        and a.cumulative
        and a.cumulative[0] > math.ceil(len(a.stage_of) * first.percent / 100)
    ):
        warnings.append(
            f"stage 0 holds {a.cumulative[0]} devices, more than {first.percent}%: one device of "
            f"each of the {a.strata} hardware class/runtime strata"
        )
    if skipped:
        warnings.append(f"{skipped} devices are pinned to another version or held: skipped")
    return Preview(
        stage_sizes=tuple(sizes),
        cumulative=cumulative,
        by_hardware_class=MappingProxyType({c: tuple(n) for c, n in sorted(by_class.items())}),
        by_stratum=MappingProxyType({c: tuple(n) for c, n in sorted(by_stratum.items())}),
        blast_radius=blast,
        newcomer_stage0_share=a.thresholds[0],
        skipped=skipped,
        already_running=already,
        offline=offline,
        warnings=tuple(warnings),
    )


def held_devices(rollout: Rollout) -> frozenset[str]:
    """Devices this rollout holds (Rule 9): ``IN_PROGRESS`` or ``REVERTING``."""
    return frozenset(
        did
        for did, p in rollout.progress.items()
        if p.state is _IN_PROGRESS or p.state is _REVERTING
    )


# --- gates --------------------------------------------------------------------------------------


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def _r6(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


class _Checks:
    """Collects each check's outcome and the facts behind it."""

    def __init__(self) -> None:
        self.status: dict[str, str] = {}
        self.failures: list[str] = []
        self.gaps: list[str] = []
        self.off_because: dict[str, str] = {}

    def off(self, name: str, why: str | None = None) -> None:
        self.status[name] = "off"
        if why is not None:
            self.off_because[name] = why

    def unsure(self, name: str, why: str) -> None:
        self.status[name] = "inconclusive"
        self.gaps.append(why)

    def judge(self, name: str, failures: list[str]) -> None:
        self.status[name] = "fail" if failures else "pass"
        self.failures.extend(failures)

    def verdict(self) -> Verdict:
        if self.failures:
            return "fail"
        return "inconclusive" if self.gaps else "pass"


_UNDISPATCHED: Final[Mapping[DeviceState, str]] = MappingProxyType(
    {_SKIPPED: "skipped", _SUCCEEDED: "already_running"}
)


class _Cohort:
    """The install figures of one stage's cohort (its dispatched devices)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.classes: Counter[str] = Counter()
        self.by_dim: dict[str, dict[str, list[int]]] = {"hardware_class": {}, "runtime": {}}
        self.failed_ids: list[str] = []

    def add(self, did: str, p: DeviceProgress) -> None:
        counts, st = self.counts, p.state
        counts["members"] += 1
        if p.attempts == 0:
            counts[_UNDISPATCHED.get(st, "not_dispatched")] += 1
            return
        counts["dispatched"] += 1
        if st is _FAILED:
            self.classes[str(p.failure_class)] += 1
            if p.failure_class == "incompatible":
                counts["incompatible"] += 1
                return
            if len(self.failed_ids) < _FAILED_DEVICES_SHOWN:
                self.failed_ids.append(did)
        elif st is not _SUCCEEDED:
            counts["in_progress" if st is _IN_PROGRESS else "reverted"] += 1
            return
        ok = st is _SUCCEEDED
        counts["succeeded" if ok else "failed"] += 1
        for dim, value in (("hardware_class", p.hardware_class), ("runtime", p.runtime)):
            pair = self.by_dim[dim].setdefault(_label(value), [0, 0])
            pair[0 if ok else 1] += 1

    def judge(self, g: Gates, checks: _Checks) -> float | None:
        succeeded, failed = self.counts["succeeded"], self.counts["failed"]
        rate = _ratio(succeeded, succeeded + failed)
        if not self.counts["members"]:  # an empty stage: nobody to judge, nobody skips a gate
            checks.status["install"] = "no devices"
            return rate
        if succeeded + failed < g.min_sample:
            checks.unsure(
                "install",
                f"install: {succeeded + failed} devices finished, fewer than min_sample "
                f"{g.min_sample}",
            )
            return rate
        problems = []
        if rate is not None and rate < g.min_install_success:
            problems.append(
                f"install success {rate:.3f} < {g.min_install_success} "
                f"({succeeded} of {succeeded + failed} succeeded)"
            )
        for dim, groups in self.by_dim.items():
            for name, (ok, bad) in sorted(groups.items()):
                if ok + bad >= g.min_sample and ok / (ok + bad) < g.min_install_success:
                    problems.append(
                        f"install success {ok / (ok + bad):.3f} < {g.min_install_success} on "
                        f"{dim.replace('_', ' ')} {name} ({ok} of {ok + bad} succeeded)"
                    )
        checks.judge("install", problems)
        return rate

    def figures(self, rate: float | None) -> dict[str, object]:
        counts = self.counts
        return {
            **{k: counts[k] for k in _COHORT_COUNTS},
            "finished": counts["succeeded"] + counts["failed"],
            "succeeded": counts["succeeded"],
            "failed": counts["failed"],
            "incompatible": counts["incompatible"],
            "rate": _r6(rate),
            "by_failure_class": dict(sorted(self.classes.items())),
            **{
                f"by_{dim}": {
                    name: {"succeeded": ok, "failed": bad, "rate": _r6(_ratio(ok, ok + bad))}
                    for name, (ok, bad) in sorted(groups.items())
                }
                for dim, groups in self.by_dim.items()
            },
            "failed_devices": sorted(self.failed_ids),
        }


def _install_fails_whatever_comes(
    plan: Plan, progress: Mapping[str, DeviceProgress], stage: int
) -> str | None:
    """Why the stage's install check fails even if every unfinished member succeeds, or None.

    Judged overall and per hardware class, with at least ``min_sample`` finished devices, so a
    bad release is halted as soon as the verdict is certain instead of after the soak.
    """
    g = plan.gates
    # class -> [succeeded, failed, unfinished]; "" is the whole cohort
    tally: dict[str, list[int]] = {}
    for p in progress.values():
        if p.stage != stage or (p.state is _FAILED and p.failure_class == "incompatible"):
            continue
        final_failure = p.state is _FAILED and p.attempts and p.next_retry_at is None
        slot = 0 if p.state is _SUCCEEDED else 1 if final_failure else 2  # 2: may still succeed
        for key in ("", _label(p.hardware_class)):
            tally.setdefault(key, [0, 0, 0])[slot] += 1
    for key, (ok, bad, open_) in sorted(tally.items()):
        if bad == 0 or ok + bad < g.min_sample:
            continue
        best = (ok + open_) / (ok + bad + open_)
        if best < g.min_install_success:
            where = f" on hardware class {key}" if key else ""
            return (
                f"install success at most {best:.3f} < {g.min_install_success}{where} "
                f"({bad} of {ok + bad + open_} failed)"
            )
    return None


def _install(
    plan: Plan, progress: Mapping[str, DeviceProgress], stage: int, checks: _Checks
) -> dict[str, object]:
    cohort = _Cohort()
    for did, p in progress.items():
        if p.stage == stage:
            cohort.add(did, p)
    return cohort.figures(cohort.judge(plan.gates, checks))


def _crash(
    plan: Plan, progress: Mapping[str, DeviceProgress], checks: _Checks
) -> dict[str, object]:
    limit, minimum = plan.gates.max_crash_rate, plan.gates.min_sample
    ran = fell = 0
    for p in progress.values():
        if p.ran_new:
            ran += 1
            fell += p.failure_class == "probation" and p.state is _FAILED
    rate = _ratio(fell, ran)
    if limit is None:
        checks.off("crash")
    elif ran < minimum:
        checks.unsure("crash", f"crash: {ran} devices ran {plan.version}, fewer than {minimum}")
    else:
        checks.judge(
            "crash",
            [f"crash rate {rate:.3f} > {limit} ({fell} of {ran} fell back)"]
            if rate is not None and rate > limit
            else [],
        )
    return {"ran_new": ran, "fell_back": fell, "rate": _r6(rate)}


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _telemetry(
    plan: Plan,
    progress: Mapping[str, DeviceProgress],
    metrics: Mapping[tuple[str, str], DeviceMetrics],
    checks: _Checks,
    baseline: Mapping[str, tuple[float, int]],
) -> tuple[dict[str, object], dict[str, object]]:
    g = plan.gates
    new_p95: dict[str, list[float]] = {}
    control_p95: dict[str, list[float]] = {}
    traffic: dict[str, list[int]] = {}  # class -> [devices, requests, errors] on the new version
    control_traffic = [0, 0]
    for (did, version), m in metrics.items():
        p = progress.get(did)
        if p is None or m.requests <= 0:
            continue
        hw = _label(p.hardware_class)
        if version == plan.version:
            t = traffic.setdefault(hw, [0, 0, 0])
            t[0] += 1
            t[1] += m.requests
            t[2] += m.errors
            if m.p95_ms is not None:
                new_p95.setdefault(hw, []).append(m.p95_ms)
        elif version == plan.previous_version:
            control_traffic[0] += m.requests
            control_traffic[1] += m.errors
            if m.p95_ms is not None:
                control_p95.setdefault(hw, []).append(m.p95_ms)
    devices = sum(t[0] for t in traffic.values())
    requests = sum(t[1] for t in traffic.values())
    errors_n = sum(t[2] for t in traffic.values())
    error_rate = _ratio(errors_n, requests)
    if g.max_error_rate is None:
        checks.off("errors")
    elif devices < g.min_sample:
        checks.unsure(
            "errors",
            f"errors: {devices} devices report traffic on {plan.version}, fewer than "
            f"{g.min_sample}",
        )
    else:
        limit = g.max_error_rate
        problems = []
        if error_rate is not None and error_rate > limit:
            problems.append(
                f"error rate {error_rate:.4f} > {limit} ({errors_n} of {requests} requests)"
            )
        for hw, (n, req, err) in sorted(traffic.items()):
            if n >= g.min_sample and err / req > limit:
                problems.append(
                    f"error rate {err / req:.4f} > {limit} on hardware class {hw} "
                    f"({err} of {req} requests, {n} devices)"
                )
        checks.judge("errors", problems)
    errors: dict[str, object] = {
        "devices": devices,
        "requests": requests,
        "errors": errors_n,
        "rate": _r6(error_rate),
        "control_rate": _r6(_ratio(control_traffic[1], control_traffic[0])),
        "by_hardware_class": {
            hw: {"devices": n, "requests": req, "errors": err, "rate": _r6(err / req)}
            for hw, (n, req, err) in sorted(traffic.items())
        },
    }
    return errors, _latency(plan, new_p95, control_p95, checks, baseline)


def _latency(
    plan: Plan,
    new_p95: dict[str, list[float]],
    control_p95: dict[str, list[float]],
    checks: _Checks,
    baseline: Mapping[str, tuple[float, int]],
) -> dict[str, object]:
    g = plan.gates
    normalized: list[float] = []
    control_n = 0
    by_class: dict[str, object] = {}
    class_ratios: list[tuple[float, str]] = []
    for hw, values in sorted(new_p95.items()):
        control = control_p95.get(hw, [])
        base, base_n, carried = _median(control), len(control), False
        if not base and hw in baseline:  # nobody left on the old version: the last known figure
            (base, base_n), carried = baseline[hw], True
        med = _median(values)
        ratio = med / base if med is not None and base else None
        by_class[hw] = {
            "new": len(values),
            "control": base_n,
            "new_median_p95_ms": _r6(med),
            "control_median_p95_ms": _r6(base),
            "control_from_earlier_stage": carried,
            "ratio": _r6(ratio),
        }
        if not base:
            continue
        control_n += base_n
        normalized.extend(v / base for v in values)
        if ratio is not None and len(values) >= g.min_sample and base_n >= g.min_sample:
            class_ratios.append((ratio, hw))
    pooled = _median(normalized)
    worst = max(
        [r for r, _ in class_ratios] + ([pooled] if pooled is not None else []), default=None
    )
    limit = g.max_p95_ratio
    if limit is None:
        checks.off("latency")
    elif plan.previous_version is None:
        checks.off("latency", f"no earlier version of {plan.model} to compare with")
    elif len(normalized) < g.min_sample or control_n < g.min_sample:
        checks.unsure(
            "latency",
            f"latency: {len(normalized)} devices on {plan.version} and {control_n} control devices "
            f"of the same hardware classes, fewer than {g.min_sample}",
        )
    else:
        problems = []
        if pooled is not None and pooled > limit:
            problems.append(
                f"p95 latency ratio {pooled:.3f} > {limit} (median over {len(normalized)} devices)"
            )
        problems.extend(
            f"p95 latency ratio {ratio:.3f} > {limit} on hardware class {hw}"
            for ratio, hw in class_ratios
            if ratio > limit
        )
        checks.judge("latency", problems)
    return {
        "new_devices": len(normalized),
        "control_devices": control_n,
        "pooled_ratio": _r6(pooled),
        "p95_ratio": _r6(worst),
        "by_hardware_class": by_class,
    }


def _control_baseline(decisions: Sequence[GateDecision]) -> dict[str, tuple[float, int]]:
    """Per hardware class, the latest control-group median p95 (ms) a gate measured, and of how
    many devices: the reference for a later stage that leaves nobody on the old version."""
    baseline: dict[str, tuple[float, int]] = {}
    for decision in decisions:
        latency = decision.figures.get("latency")
        classes = latency.get("by_hardware_class", {}) if isinstance(latency, Mapping) else {}
        for hw, row in classes.items():
            if isinstance(row, Mapping) and not row.get("control_from_earlier_stage"):
                median, count = row.get("control_median_p95_ms"), row.get("control")
                if isinstance(median, float | int) and median > 0 and isinstance(count, int):
                    baseline[hw] = (float(median), count)
    return baseline


def _evaluate(
    plan: Plan,
    progress: Mapping[str, DeviceProgress],
    stage: int,
    metrics: Mapping[tuple[str, str], DeviceMetrics] | None,
    decisions: Sequence[GateDecision] = (),
) -> tuple[Verdict, dict[str, object], str]:
    checks = _Checks()
    figures: dict[str, object] = {"stage": stage}
    figures["install"] = _install(plan, progress, stage, checks)
    figures["crash"] = _crash(plan, progress, checks)
    if metrics is not None:
        figures["errors"], figures["latency"] = _telemetry(
            plan, progress, metrics, checks, _control_baseline(decisions)
        )
    else:
        checks.status["errors"] = checks.status["latency"] = "not evaluated"
    g = plan.gates
    figures["checks"] = dict(checks.status)
    if checks.off_because:
        figures["off_because"] = dict(checks.off_because)
    figures["thresholds"] = {
        "min_install_success": g.min_install_success,
        "max_crash_rate": g.max_crash_rate,
        "max_error_rate": g.max_error_rate,
        "max_p95_ratio": g.max_p95_ratio,
        "min_sample": g.min_sample,
        "sample_wait_s": g.sample_wait_s,
    }
    verdict = checks.verdict()
    if verdict == "fail":
        reason = "; ".join(checks.failures)
    elif verdict == "inconclusive":
        reason = "; ".join(checks.gaps)
    else:
        reason = "every check passed: " + ", ".join(
            f"{name} {status}"
            + (f" ({checks.off_because[name]})" if name in checks.off_because else "")
            for name, status in checks.status.items()
        )
    return verdict, figures, reason


def _awaiting_telemetry(figures: Mapping[str, object]) -> bool:
    """True when the only checks without enough data are the telemetry ones."""
    status = figures.get("checks")
    if not isinstance(status, Mapping):
        return False
    unsure = {name for name, outcome in status.items() if outcome == "inconclusive"}
    return bool(unsure) and unsure <= {"errors", "latency"}


# --- the step -----------------------------------------------------------------------------------


class _Run:
    """Working state of one step or operator action; becomes the next Rollout."""

    def __init__(self, plan: Plan, rollout: Rollout, now: float) -> None:
        self.plan = plan
        self.now = now
        self.state = rollout.state
        self.stage = rollout.stage
        self.stage_started_at = rollout.stage_started_at
        self.progress: dict[str, DeviceProgress] = dict(rollout.progress)
        self.decisions = list(rollout.decisions)
        self.reverting = rollout.reverting
        self.thresholds = rollout.thresholds
        self.started_at = rollout.started_at
        self.actions: list[Action] = []

    def result(self) -> StepResult:
        rollout = Rollout(
            state=self.state,
            stage=self.stage,
            stage_started_at=self.stage_started_at,
            progress=MappingProxyType(self.progress),
            decisions=tuple(self.decisions),
            reverting=self.reverting,
            thresholds=self.thresholds,
            started_at=self.started_at,
        )
        return StepResult(rollout, tuple(self.actions))

    def fire(self, trigger: Trigger, reason: str) -> None:
        new = TRANSITIONS[self.state][trigger]
        self.actions.append(StateChanged(self.state, new, self.stage, reason))
        self.state = new

    def put(self, did: str, old: DeviceProgress, new: DeviceProgress, reason: str) -> None:
        if new.state is not old.state and new.state not in DEVICE_TRANSITIONS[old.state]:
            msg = f"device {did}: {old.state.name} -> {new.state.name} is not a device transition"
            raise AssertionError(msg)
        self.progress[did] = new
        if new.state is not old.state or new.failure_class != old.failure_class:
            self.actions.append(DeviceChanged(did, old.state, new.state, new.failure_class, reason))

    def fail(
        self, did: str, p: DeviceProgress, cls: FailureClass, reason: str, *, ran: bool = False
    ) -> DeviceProgress:
        policy = self.plan.retries[cls]
        retry = cls != "incompatible" and p.attempts < policy.max_attempts
        new = replace(
            p,
            state=_FAILED,
            failure_class=cls,
            updated_at=self.now,
            next_retry_at=self.now + policy.delay_s(p.attempts) if retry else None,
            note=reason[:_DETAIL_CHARS],
            ran_new=p.ran_new or ran,
        )
        self.put(did, p, new, reason)
        return new

    def succeed(self, did: str, p: DeviceProgress, reason: str) -> None:
        new = replace(
            p,
            state=_SUCCEEDED,
            failure_class=None,
            updated_at=self.now,
            next_retry_at=None,
            ran_new=True,
            note=reason[:_DETAIL_CHARS],
        )
        self.put(did, p, new, reason)

    # -- Rule 1 and 2 --------------------------------------------------------------------------

    def admit(self, v: DeviceView, stage: int, position: float, *, quiet: bool) -> None:
        version = self.plan.version
        if v.running_version == version:
            state, note = _SUCCEEDED, f"already running {version}"
        elif v.pinned_version is not None and v.pinned_version != version:
            state, note = _SKIPPED, f"pinned to {v.pinned_version}"
        elif v.held_by is not None:
            state, note = _SKIPPED, f"held by rollout {v.held_by}"
        else:
            state, note = _PENDING, ""
        self.progress[v.device_id] = DeviceProgress(
            state=state,
            stage=stage,
            position=position,
            hardware_class=v.hardware_class,
            runtime=v.runtime,
            updated_at=self.now,
            ran_new=state is _SUCCEEDED,
            note=note,
        )
        if not quiet:
            reason = f"joined stage {stage}" + (f": {note}" if note else "")
            self.actions.append(DeviceChanged(v.device_id, None, state, None, reason))

    # -- Rule 4 ---------------------------------------------------------------------------------

    def apply_event(self, e: DeviceEvent) -> None:
        plan = self.plan
        p = self.progress.get(e.device_id)
        if p is None or (e.model is not None and e.model != plan.model):
            return
        if e.rollout_id is not None and e.rollout_id != plan.rollout_id:
            return
        if e.version != plan.version:
            back = p.from_version or plan.previous_version
            if p.state is _REVERTING and e.version == back and e.phase in _RUNNING_PHASES:
                new = replace(p, state=_REVERTED, updated_at=self.now)
                self.put(e.device_id, p, new, f"runs {back} again")
            return
        if e.phase == "committed":
            self._committed(e.device_id, p)
        elif e.phase == "failed":
            if p.state is _IN_PROGRESS:
                cls = classify_failure(e.failure_class, e.detail)
                why = f"failed: {e.failure_class} ({e.detail or 'no detail'})"
                self.fail(e.device_id, p, cls, why)
        elif e.phase == "rolled_back":
            self._rolled_back(e, p)
        elif p.state is _IN_PROGRESS:  # a sign of life; activated: it now runs the version
            ran = p.ran_new or e.phase == "activated"
            self.progress[e.device_id] = replace(p, updated_at=self.now, ran_new=ran)
        elif e.phase == "activated" and not p.ran_new:
            self.progress[e.device_id] = replace(p, ran_new=True)

    def _committed(self, did: str, p: DeviceProgress) -> None:
        if p.state in (_PENDING, _SKIPPED, _IN_PROGRESS, _FAILED):
            self.succeed(did, p, f"committed {self.plan.version}")
        elif not p.ran_new:
            self.progress[did] = replace(p, ran_new=True)

    def _rolled_back(self, e: DeviceEvent, p: DeviceProgress) -> None:
        did, st = e.device_id, p.state
        if st is _REVERTING:
            new = replace(p, state=_REVERTED, ran_new=True, updated_at=self.now)
            self.put(did, p, new, "rolled back")
        elif (
            st is _IN_PROGRESS
            or st is _SUCCEEDED
            or (st is _FAILED and p.failure_class == "timed_out")
        ):
            why = f"rolled back on its own: {e.failure_class} ({e.detail or 'no detail'})"
            self.fail(did, p, "probation", why, ran=True)
        elif not p.ran_new:
            self.progress[did] = replace(p, ran_new=True)

    # -- the reported truth (Rule 4), newcomers (Rule 2) and pins (Rule 9) ----------------------

    def reconcile(
        self, devices: Sequence[DeviceView], initial: _Assignment | None
    ) -> dict[str, DeviceView]:
        progress, stage, thresholds, salt = (
            self.progress,
            self.stage,
            self.thresholds,
            self.plan.salt,
        )
        views: dict[str, DeviceView] = {}
        for v in devices:
            did = v.device_id
            views[did] = v
            p = progress.get(did)
            if p is not None:
                if p.state is _PENDING or p.state is _SKIPPED:
                    self._pins(did, p, v)
                elif v.running_version is not None and p.state is not _REVERTED:
                    self._truth(did, p, v, v.running_version)
            elif initial is not None:
                k, pos = initial.stage_of[did]
                self.admit(v, k, pos, quiet=True)
            elif thresholds and self.state is not RolloutState.ABORTED:  # aborted: nobody joins
                pos = hash_position(salt, did)
                self.admit(v, max(stage, _stage_for(thresholds, pos)), pos, quiet=False)
        return views

    def _pins(self, did: str, p: DeviceProgress, v: DeviceView) -> None:
        version = self.plan.version
        if v.running_version == version:
            self.succeed(did, p, f"reports running {version}")
        elif v.pinned_version is not None and v.pinned_version != version:
            if p.state is _PENDING:
                why = f"pinned to {v.pinned_version}"
                self.put(did, p, replace(p, state=_SKIPPED, note=why), why)
        elif v.held_by is not None:
            if p.state is _PENDING:
                why = f"held by rollout {v.held_by}"
                self.put(did, p, replace(p, state=_SKIPPED, note=why), why)
        elif p.state is _SKIPPED:
            self.put(did, p, replace(p, state=_PENDING, note=""), "no longer pinned or held")

    def _truth(self, did: str, p: DeviceProgress, v: DeviceView, running: str) -> None:
        version, st = self.plan.version, p.state
        fresh = v.reported_at is not None and v.reported_at > p.updated_at
        if st is _SUCCEEDED:
            if (
                fresh
                and running != version
                and running in (p.from_version, self.plan.previous_version)
            ):
                self.fail(did, p, "probation", f"reports running {running} again: it fell back")
        elif st is _FAILED:
            if fresh and running == version and p.failure_class == "timed_out":
                self.succeed(did, p, f"reports running {version} after its time-out")
        elif st is _IN_PROGRESS:
            if running == version and not p.ran_new:
                self.progress[did] = replace(p, ran_new=True)
        elif st is _REVERTING and fresh and running != version:
            new = replace(p, state=_REVERTED, updated_at=self.now)
            self.put(did, p, new, f"reports running {running}")

    # -- Rule 5, and what Rule 3 and 6 need to know ----------------------------------------------

    def survey(self, views: Mapping[str, DeviceView]) -> _Survey:
        plan, now, stage, version = self.plan, self.now, self.stage, self.plan.version
        timeout = plan.device_timeout_s
        started = self.stage_started_at
        s = _Survey(last_activity=now if started is None else started)
        per_group = plan.max_in_flight_per_group is not None
        for did, p in self.progress.items():
            st = p.state
            if st is _IN_PROGRESS:
                if now - p.updated_at < timeout:
                    s.in_flight += 1
                    if per_group:
                        view = views.get(did)
                        s.group_in_flight[view.group if view else None] += 1
                    s.cohort_busy = s.cohort_busy or p.stage == stage
                    continue
                p = self.fail(did, p, "timed_out", f"no report for {timeout:g} s")  # noqa: PLW2901
                st = _FAILED
            if st is _PENDING or (st is _FAILED and p.next_retry_at is not None):
                v = views.get(did)
                if (
                    v is None
                    or not v.online
                    or v.held_by is not None
                    or v.running_version == version
                    or (v.pinned_version is not None and v.pinned_version != version)
                ):
                    continue
                if p.stage <= stage:
                    s.waiting += 1
                if p.stage <= stage + 1 and (p.next_retry_at is None or p.next_retry_at <= now):
                    s.candidates.append((p.stage, p.position, did))
            if (st is _SUCCEEDED or st is _FAILED) and p.stage == stage and p.attempts:
                s.last_activity = max(s.last_activity, p.updated_at)
        return s

    # -- Rule 6 ---------------------------------------------------------------------------------

    def gate(self, s: _Survey, metrics: Mapping[tuple[str, str], DeviceMetrics]) -> None:
        soak_end = s.last_activity  # >= the stage's start
        soak_end += self.plan.stages[self.stage].soak_s
        if s.cohort_busy or s.waiting or self.now < soak_end:
            certain = _install_fails_whatever_comes(self.plan, self.progress, self.stage)
            if certain is not None:  # no need to wait: even if every other device succeeds
                verdict, figures, reason = _evaluate(
                    self.plan, self.progress, self.stage, metrics, self.decisions
                )
                why = reason if verdict == "fail" else certain
                self.decide("fail", figures, f"{why} (before the soak ended: {certain})", by="gate")
            return
        verdict, figures, reason = _evaluate(
            self.plan, self.progress, self.stage, metrics, self.decisions
        )
        if (
            verdict == "inconclusive"
            and _awaiting_telemetry(figures)
            and self.now < soak_end + self.plan.gates.sample_wait_s
        ):
            return  # the devices' next telemetry reports may complete the sample
        self.decide(verdict, figures, reason, by="gate")

    def decide(
        self,
        verdict: Verdict,
        figures: dict[str, object],
        reason: str,
        *,
        by: Literal["gate", "operator"],
    ) -> None:
        decision = GateDecision(
            self.stage, verdict, MappingProxyType(figures), reason, self.now, by
        )
        self.decisions.append(decision)
        self.actions.append(decision)
        last = self.stage == self.plan.last_stage
        if verdict == "pass":
            prefix = "promoted by an operator" if by == "operator" else f"gate {self.stage} passed"
            if last:
                self.fire("promote_last" if by == "operator" else "gate_pass_last", prefix)
            else:
                self.stage += 1
                self.stage_started_at = self.now
                self.fire(
                    "promote" if by == "operator" else "gate_pass",
                    f"{prefix}: stage {self.stage} starts",
                )
        elif verdict == "fail":
            revert = self.plan.revert_on_fail
            self.fire(
                "gate_fail",
                f"gate {self.stage} failed: {reason}" + ("; reverting" if revert else ""),
            )
            self.reverting = self.reverting or revert
        else:
            self.fire("gate_inconclusive", f"gate {self.stage} inconclusive: {reason}")

    # -- Rule 7 ---------------------------------------------------------------------------------

    def revert(self, views: Mapping[str, DeviceView]) -> None:
        plan, now, version = self.plan, self.now, self.plan.version
        for did, p in self.progress.items():
            v = views.get(did)
            online = v is not None and v.online
            st = p.state
            back = (
                p.from_version if p.from_version not in (None, version) else plan.previous_version
            )
            if st is _REVERTING:
                if online and p.next_retry_at is not None and now >= p.next_retry_at:
                    self.progress[did] = replace(p, next_retry_at=now + plan.device_timeout_s)
                    self.actions.append(Revert(did, back, "revert not confirmed yet: sent again"))
                continue
            runs_new = v is not None and v.running_version == version
            if not (
                runs_new
                or st is _IN_PROGRESS
                or (st is _SUCCEEDED and p.ran_new)
                or (st is _FAILED and p.failure_class == "timed_out")
            ):
                continue
            if v is not None and v.pinned_version == version:
                continue  # Rule 7: the pin wins
            retry_at = now + plan.device_timeout_s if online else now
            new = replace(p, state=_REVERTING, updated_at=now, next_retry_at=retry_at)
            reason = f"revert to {back}: rollout {plan.rollout_id} is {self.state.value}"
            self.put(did, p, new, reason)
            self.actions.append(Revert(did, back, reason))

    # -- Rule 3 ---------------------------------------------------------------------------------

    def dispatch(self, s: _Survey, views: Mapping[str, DeviceView]) -> None:
        plan, now, stage = self.plan, self.now, self.stage
        free = plan.max_in_flight - s.in_flight
        if free <= 0 or not window_open(plan.windows, now):
            return
        heap = [c for c in s.candidates if c[0] <= stage]
        heapq.heapify(heap)
        group_cap = plan.max_in_flight_per_group
        while heap and free > 0:
            _, _, did = heapq.heappop(heap)
            v = views[did]
            if group_cap is not None:
                if s.group_in_flight[v.group] >= group_cap:
                    continue
                s.group_in_flight[v.group] += 1
            p = self.progress[did]
            k = max(p.stage, stage)
            attempt = p.attempts + 1
            new = replace(
                p,
                state=_IN_PROGRESS,
                stage=k,
                attempts=attempt,
                updated_at=now,
                next_retry_at=None,
                from_version=p.from_version if p.from_version is not None else v.running_version,
            )
            self.put(did, p, new, f"dispatched {plan.version} (attempt {attempt}, stage {k})")
            self.actions.append(Dispatch(did, plan.version, attempt, k))
            free -= 1


@dataclass(slots=True)
class _Survey:
    last_activity: float
    in_flight: int = 0
    group_in_flight: Counter[str | None] = field(default_factory=Counter)
    cohort_busy: bool = False  # a device of the current stage is in progress
    waiting: int = 0  # online devices Rule 3 would still dispatch at or before this stage
    candidates: list[tuple[int, float, str]] = field(default_factory=list)


def step(
    plan: Plan,
    rollout: Rollout,
    *,
    devices: Sequence[DeviceView],
    events: Sequence[DeviceEvent] = (),
    metrics: Mapping[tuple[str, str], DeviceMetrics] | None = None,
    now: float,
) -> StepResult:
    """Advance a rollout: apply reports, time out silent devices, judge a gate, revert, dispatch.

    Args:
        plan: the rollout's plan (the same object at every step).
        rollout: the state returned by the previous step (``Rollout()`` at first).
        devices: every device currently matching the target, once each.
        events: deployment reports received since the previous step, in arrival order.
        metrics: latest telemetry per ``(device_id, version)``.
        now: UTC epoch seconds.

    Returns:
        The next rollout state and the actions to carry out, in order.

    Raises:
        ValueError: a device id appears twice in ``devices`` at the first step.
    """
    run = _Run(plan, rollout, now)
    initial = None
    if not run.thresholds and run.state is not RolloutState.ABORTED:
        initial = _assign(plan, devices)
        run.thresholds = initial.thresholds
        run.stage_started_at = run.started_at = now
    if run.state is RolloutState.PENDING:
        run.fire("start", f"stage 0 of {len(plan.stages)} starts")
    for event in events:
        run.apply_event(event)
    views = run.reconcile(devices, initial)
    survey = run.survey(views)
    if run.state is RolloutState.RUNNING and not run.reverting:
        run.gate(survey, metrics if metrics is not None else {})
    if run.reverting:
        run.revert(views)
    elif run.state is RolloutState.RUNNING or run.state is RolloutState.COMPLETED:
        run.dispatch(survey, views)
    return run.result()


_ACTION_NAMES: Final[Mapping[type, str]] = {
    Pause: "pause",
    Resume: "resume",
    Promote: "promote",
    Abort: "abort",
    RetryFailed: "retry_failed",
}


def apply_operator(
    plan: Plan, rollout: Rollout, action: OperatorAction, *, now: float
) -> StepResult:
    """Apply an operator's action (Rule 10). Reverts follow at the next :func:`step`.

    Raises:
        OperatorActionError: the action is not allowed in the rollout's state.
    """
    run = _Run(plan, rollout, now)
    name = _ACTION_NAMES[type(action)]
    trigger: Trigger = name  # type: ignore[assignment]
    if isinstance(action, Promote) and rollout.stage == plan.last_stage:
        trigger = "promote_last"
    allowed = TRANSITIONS[rollout.state]
    if trigger not in allowed:
        raise OperatorActionError(
            f"cannot {name.replace('_', ' ')} rollout {plan.rollout_id}: it is "
            f"{rollout.state.value} (allowed: {', '.join(sorted(allowed)) or 'nothing'})",
            rollout_id=plan.rollout_id,
            state=rollout.state,
            action=name,
        )
    if rollout.reverting and not isinstance(action, Abort):
        raise OperatorActionError(
            f"cannot {name.replace('_', ' ')} rollout {plan.rollout_id}: it reverted its devices; "
            "only abort is allowed (start a new rollout instead)",
            rollout_id=plan.rollout_id,
            state=rollout.state,
            action=name,
        )
    why = f" ({action.reason})" if action.reason else ""
    if isinstance(action, Promote):
        _, figures, _ = _evaluate(plan, run.progress, run.stage, None)
        run.decide("pass", figures, f"promoted by an operator{why}", by="operator")
    elif isinstance(action, Abort):
        run.reverting = run.reverting or action.revert
        run.fire("abort", ("abort and revert" if action.revert else "abort and keep") + why)
    elif isinstance(action, RetryFailed):
        for did, p in list(run.progress.items()):
            if p.state is _FAILED and p.failure_class != "incompatible":
                new = replace(p, state=_PENDING, attempts=0, next_retry_at=None, updated_at=now)
                run.put(did, p, new, f"retry requested by an operator{why}")
        run.fire("retry_failed", f"retry failed devices{why}")
    else:
        run.fire(trigger, f"{name} by an operator{why}")
    return run.result()
