"""Virtual devices: the real agent on simulated hardware, thousands of them in one process.

Each :class:`VirtualDevice` is an enrolled device with its own mutual-TLS identity, its own data
directory and its own MQTT connection, running :class:`agent.daemon.Agent` unchanged: transfer,
verification, install, self-test, probation, rollback and telemetry are the real code. What is
simulated is listed in :mod:`simulators.hardware` (the hardware) and here (the faults):

- ``offline``: the device is switched off for a while (its agent stops; the fleet sees it go
  offline) and comes back with its data directory as it was;
- ``kill-install``: the power fails at an install step of its first deployment (the same kill
  points the agent's crash tests use); the device reboots a moment later and recovers;
- ``lost-chunks``: a share of the bundle chunks sent to the device never arrive;
- ``late-enroll``: the device is enrolled and switched on only after a delay (mid-rollout);
- ``wrong-output`` / ``slow``: a model version misbehaves on a hardware class (see
  :class:`simulators.hardware.ModelFault`).

A small pool of "application" threads asks every running device for an inference now and then,
through the agent's Python API, so that the fleet receives real latency and error telemetry.

The devices of one process share one machine, so they share its health readings too
(:class:`SharedHealth`: one reading of ``/proc`` per second, not one per device and report).
"""

from __future__ import annotations

import hashlib
import logging
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import paho.mqtt.client as paho

import agent.store
from agent.config import AgentSettings
from agent.daemon import Agent
from agent.health import HealthSampler
from agent.runtimes.runner import probe_feeds
from agent.status import read_status
from agent.store import FAULT_POINTS
from shared.durations import parse_duration
from shared.errors import UsageError
from shared.mqtt import MqttLink
from shared.protocol import DOWN_FETCH
from simulators.hardware import HardwareProfile, ModelFault, register

__all__ = ["DeviceFault", "Simulation", "SimulationOptions", "VirtualDevice", "parse_faults"]

logger = logging.getLogger(__name__)
DEVICE_FAULTS = ("offline", "kill-install", "lost-chunks", "late-enroll")
MODEL_FAULTS = ("wrong-output", "slow")
MAX_CONNECTING = 20  # devices switched on but not yet connected, at most, while starting


# -- faults ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceFault:
    """A fault on some devices: those listed, or a reproducible share of the fleet."""

    kind: str
    share: float = 0.0
    devices: frozenset[str] = frozenset()
    after_s: float = 0.0  # offline, late-enroll: when it starts
    for_s: float = 30.0  # offline: how long
    rate: float = 0.1  # lost-chunks: share of chunk messages lost
    point: str = "after_download"  # kill-install: where the power fails

    def picks(self, device_id: str) -> bool:
        if device_id in self.devices:
            return True
        digest = hashlib.sha256(f"{self.kind}/{device_id}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64 < self.share


def _number(text: str, what: str, *, low: float = 0.0, high: float | None = None) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"--faults: {what} expects a number, got {text!r}") from None
    if value < low or (high is not None and value > high):
        bounds = f"between {low:g} and {high:g}" if high is not None else f"at least {low:g}"
        raise UsageError(f"--faults: {what} must be {bounds}, got {text!r}")
    return value


def _seconds(text: str, what: str) -> float:
    if text.strip() in ("0", "0s"):
        return 0.0
    try:
        return parse_duration(text).total_seconds()
    except (ValueError, UsageError):
        raise UsageError(
            f"--faults: {what} expects a duration like 30s or 2m, got {text!r}"
        ) from None


def parse_faults(spec: str) -> tuple[list[ModelFault], list[DeviceFault]]:
    """Parse ``--faults``: comma-separated ``KIND:key=value:...`` items.

    Examples: ``wrong-output:version=3.0.0:class=arm-npu``, ``slow:version=3.0.0:factor=1.6``,
    ``offline:share=0.1:after=20s:for=1m``, ``kill-install:share=0.05:point=after_verify``,
    ``lost-chunks:share=0.2:rate=0.1``, ``late-enroll:share=0.05:after=30s``,
    ``offline:device=sim-0007``.

    Raises:
        UsageError: unknown kind or option, or a bad value; the message says what was expected.
    """
    model_faults: list[ModelFault] = []
    device_faults: list[DeviceFault] = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        kind, *pairs = item.split(":")
        options: dict[str, str] = {}
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep or not value:
                raise UsageError(f"--faults: {item!r}: expected key=value, got {pair!r}")
            options[key] = value
        if kind in MODEL_FAULTS:
            model_faults.append(_model_fault(kind, options, item))
        elif kind in DEVICE_FAULTS:
            device_faults.append(_device_fault(kind, options, item))
        else:
            raise UsageError(
                f"--faults: unknown fault {kind!r}; expected one of "
                f"{', '.join(MODEL_FAULTS + DEVICE_FAULTS)}"
            )
    return model_faults, device_faults


def _check_keys(item: str, options: dict[str, str], allowed: set[str]) -> None:
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise UsageError(
            f"--faults: {item!r}: unknown option(s) {unknown}; expected {sorted(allowed)}"
        )


def _model_fault(kind: str, options: dict[str, str], item: str) -> ModelFault:
    _check_keys(item, options, {"version", "class", "factor"})
    if "version" not in options:
        raise UsageError(f"--faults: {item!r}: which model version? (version=...)")
    factor = _number(options.get("factor", "2"), "factor", low=1.0) if kind == "slow" else 1.0
    return ModelFault(options["version"], kind, hardware=options.get("class"), factor=factor)


def _device_fault(kind: str, options: dict[str, str], item: str) -> DeviceFault:
    _check_keys(item, options, {"share", "device", "after", "for", "rate", "point"})
    if "share" not in options and "device" not in options:
        raise UsageError(f"--faults: {item!r}: which devices? (share=0.1 or device=ID)")
    point = options.get("point", "after_download")
    if point not in FAULT_POINTS:
        raise UsageError(f"--faults: point must be one of {', '.join(FAULT_POINTS)}, got {point!r}")
    return DeviceFault(
        kind,
        share=_number(options.get("share", "0"), "share", high=1.0),
        devices=frozenset(options["device"].split("+")) if "device" in options else frozenset(),
        after_s=_seconds(options.get("after", "0s"), "after"),
        for_s=_seconds(options.get("for", "30s"), "for"),
        rate=_number(options.get("rate", "0.1"), "rate", high=1.0),
        point=point,
    )


# -- one virtual device --------------------------------------------------------------------------


class PowerCutError(BaseException):
    """Raised at a kill point in a virtual device's worker thread: its power just failed.

    A BaseException, so that the agent's own error handling (which keeps the worker alive through
    any Exception) cannot catch it: like a real power cut, nothing after it runs.
    """


class _LossyLink(MqttLink):
    """An MQTT link on which a share of the fetch replies (bundle chunks) get lost."""

    def __init__(self, *args: Any, loss: float, seed: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._loss = loss
        self._loss_rng = random.Random(seed)  # noqa: S311 - simulation, not cryptography
        self.lost = 0  # fetch replies dropped so far

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        if msg.topic.endswith(DOWN_FETCH) and self._loss_rng.random() < self._loss:
            self.lost += 1
            return
        super()._on_message(client, userdata, msg)


class SharedHealth:
    """One :class:`~agent.health.HealthSampler` for every virtual device of this process: the
    machine they share is read at most once per ``max_age_s``, and each device gets a copy."""

    def __init__(self, data_dir: Path, *, max_age_s: float = 1.0) -> None:
        self._sampler = HealthSampler(data_dir)
        self._max_age_s = max_age_s
        self._lock = threading.Lock()
        self._sample: dict[str, float] = {}
        self._taken = -float("inf")

    def sample(self) -> dict[str, float]:
        with self._lock:
            if time.monotonic() - self._taken >= self._max_age_s:
                self._sample = self._sampler.sample()
                self._taken = time.monotonic()
            return dict(self._sample)


_SHARED_HEALTH: dict[Path, SharedHealth] = {}  # by the simulation's work directory
_SHARED_HEALTH_LOCK = threading.Lock()


def _shared_health(data_dir: Path) -> SharedHealth:
    root = data_dir.parent.parent  # devices live in <work dir>/<device>/data
    with _SHARED_HEALTH_LOCK:
        if root not in _SHARED_HEALTH:
            _SHARED_HEALTH[root] = SharedHealth(root)
        return _SHARED_HEALTH[root]


class _VirtualAgent(Agent):
    """The agent with a lossy network where the device's faults say so, and the health readings
    of the machine it shares with the other virtual devices."""

    def __init__(self, settings: AgentSettings, profile: HardwareProfile, *, loss: float) -> None:
        self.loss = loss  # read by _make_link, which the base constructor calls
        super().__init__(settings, profile.platform())

    def _make_health(self, settings: AgentSettings) -> SharedHealth:
        return _shared_health(settings.data_dir)

    def _make_link(self, settings: AgentSettings) -> MqttLink:
        link = super()._make_link(settings)
        if self.loss <= 0:
            return link
        return _LossyLink(
            link.settings,
            subscriptions=link._subscriptions,
            loss=self.loss,
            seed=self.device_id,
        )


@dataclass
class VirtualDevice:
    """One simulated device: identity, data directory, profile, faults, and its agent when on."""

    device_id: str
    profile: HardwareProfile
    home: Path
    faults: list[DeviceFault] = field(default_factory=list)
    agent: Agent | None = None
    thread: threading.Thread | None = None
    power_cuts: int = 0
    _cut_done: bool = False

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    def fault(self, kind: str) -> DeviceFault | None:
        return next((f for f in self.faults if f.kind == kind), None)

    def enroll(self, fleet: httpx.Client) -> None:
        """Get this device's credentials from the fleet (once; kept in its home directory)."""
        if (self.home / "device.pem").exists():
            return
        response = fleet.post(f"/api/v1/devices/{self.device_id}/enroll")
        if response.status_code != 201:
            raise UsageError(f"enrolling {self.device_id} failed: {response.text[:300]}")
        creds = response.json()
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "ca.pem").write_text(creds["ca_pem"])
        (self.home / "root.json").write_text(creds["trust_root"])
        key = self.home / "device-key.pem"
        key.write_text(creds["key_pem"])
        key.chmod(0o600)
        (self.home / "device.pem").write_text(creds["cert_pem"])  # last: marks enrolled

    def settings(self, broker: str, overrides: dict[str, Any]) -> AgentSettings:
        return AgentSettings(
            device_id=self.device_id,
            broker=broker,
            data_dir=self.data_dir,
            trust=self.home / "root.json",
            hardware_id=self.profile.name,
            ca_file=self.home / "ca.pem",
            cert_file=self.home / "device.pem",
            key_file=self.home / "device-key.pem",
            **overrides,
        )

    def power_on(self, broker: str, overrides: dict[str, Any]) -> None:
        if self.agent is not None:
            return
        lossy = self.fault("lost-chunks")
        agent = _VirtualAgent(
            self.settings(broker, overrides), self.profile, loss=lossy.rate if lossy else 0.0
        )
        self.agent = agent
        self.thread = threading.Thread(
            target=agent.run, name=f"edgefleet-device-{self.device_id}", daemon=True
        )
        self.thread.start()

    def power_off(self) -> None:
        agent, thread = self.agent, self.thread
        self.agent, self.thread = None, None
        if agent is not None:
            agent.stop()
        if thread is not None:
            thread.join(30)

    def connected(self) -> bool:
        agent_ = self.agent
        return agent_ is not None and agent_.link.connected.is_set()

    def should_cut(self, point: str) -> bool:
        fault = self.fault("kill-install")
        if fault is None or self._cut_done or fault.point != point:
            return False
        self._cut_done = True
        return True

    def status(self) -> dict[str, Any]:
        try:
            return read_status(self.data_dir)
        except UsageError:
            return {"device_id": self.device_id, "models": {}}


# -- the simulation ------------------------------------------------------------------------------


@dataclass
class SimulationOptions:
    fleet_url: str
    token: str
    broker: str
    devices: int
    work_dir: Path
    profiles: list[HardwareProfile]
    model_faults: list[ModelFault] = field(default_factory=list)
    device_faults: list[DeviceFault] = field(default_factory=list)
    prefix: str = "sim"
    probation_s: float = 5.0
    telemetry_interval_s: float = 5.0
    infer_interval_s: float = 1.0  # each device gets an inference request this often
    reboot_s: float = 2.0  # how long a device stays dark after a power cut
    start_rate: float = 100.0  # devices switched on per second at start


class Simulation:
    """Enrolls and runs virtual devices, applies the faults on schedule, drives inference."""

    def __init__(self, options: SimulationOptions) -> None:
        self.options = options
        register(options.profiles, options.model_faults)
        self.devices = self._make_devices()
        self._by_worker = {f"edgefleet-worker-{d.device_id}": d for d in self.devices}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self.started_at = 0.0

    def _make_devices(self, first: int = 1, count: int | None = None) -> list[VirtualDevice]:
        o = self.options
        weights = [p.weight for p in o.profiles]
        total = sum(weights)
        devices = []
        for i in range(first, first + (o.devices if count is None else count)):
            device_id = f"{o.prefix}-{i:05d}"
            # The profile follows the shares exactly (largest remainder), in a shuffled order.
            rank = int.from_bytes(hashlib.sha256(device_id.encode()).digest()[:8], "big") / 2**64
            cumulative, profile = 0.0, o.profiles[-1]
            for p, w in zip(o.profiles, weights, strict=True):
                cumulative += w / total
                if rank < cumulative:
                    profile = p
                    break
            faults = [f for f in o.device_faults if f.picks(device_id)]
            devices.append(VirtualDevice(device_id, profile, o.work_dir / device_id, faults))
        return devices

    @property
    def overrides(self) -> dict[str, Any]:
        o = self.options
        return {
            "probation_s": o.probation_s,
            "telemetry_interval_s": o.telemetry_interval_s,
            "request_timeout_s": 10.0,
        }

    # -- life cycle --------------------------------------------------------------------------

    def start(self, progress: Callable[[int, int], None] | None = None) -> None:
        """Enroll the devices and switch them on (late enrollers wait for their turn)."""
        agent.store.power_cut_hook = self._power_cut
        previous_hook = threading.excepthook

        def excepthook(args: threading.ExceptHookArgs) -> None:
            if args.exc_type is PowerCutError:
                return
            previous_hook(args)

        threading.excepthook = excepthook
        self.started_at = time.monotonic()
        self._bring_up([d for d in self.devices if d.fault("late-enroll") is None], progress)
        self._spawn(self._schedule_faults, "edgefleet-sim-faults")
        self._spawn(self._applications, "edgefleet-sim-apps")

    def add_devices(self, count: int) -> list[VirtualDevice]:
        """Enroll ``count`` more devices now and switch them on (devices joining mid-rollout)."""
        new = self._make_devices(len(self.devices) + 1, count)
        self.devices.extend(new)
        self._by_worker.update({f"edgefleet-worker-{d.device_id}": d for d in new})
        self._bring_up(new)
        return new

    def _bring_up(
        self, devices: list[VirtualDevice], progress: Callable[[int, int], None] | None = None
    ) -> None:
        """Enroll ``devices`` (once) and switch them on, at ``start_rate`` devices a second."""
        o = self.options
        with httpx.Client(
            base_url=o.fleet_url, timeout=60, headers={"Authorization": f"Bearer {o.token}"}
        ) as fleet:
            connecting: list[VirtualDevice] = []
            for number, device in enumerate(devices, 1):
                device.enroll(fleet)
                device.power_on(o.broker, self.overrides)
                connecting.append(device)
                # No connection storm: at most MAX_CONNECTING TLS handshakes under way at once
                # (a thousand at a time starve each other past the connect timeout).
                while len(connecting) >= MAX_CONNECTING:
                    connecting = [d for d in connecting if not d.connected()]
                    if len(connecting) >= MAX_CONNECTING:
                        time.sleep(0.02)
                if progress is not None:
                    progress(number, len(devices))
                time.sleep(1.0 / o.start_rate)

    def device(self, device_id: str) -> VirtualDevice:
        return next(d for d in self.devices if d.device_id == device_id)

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)
        # Tell every agent first, so that they all wind down at once, then wait for each.
        for device in self.devices:
            if device.agent is not None:
                device.agent.stop()
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda d: d.power_off(), self.devices))
        agent.store.power_cut_hook = None

    def _power_cut(self, point: str) -> None:
        device = self._by_worker.get(threading.current_thread().name)
        if device is None or not device.should_cut(point):
            return
        device.power_cuts += 1
        logger.info("%s: power cut at %s", device.device_id, point)
        threading.Thread(
            target=self._reboot, args=(device,), name=f"reboot-{device.device_id}", daemon=True
        ).start()
        raise PowerCutError(point)

    def _reboot(self, device: VirtualDevice) -> None:
        device.power_off()
        if not self._stop.wait(self.options.reboot_s):
            device.power_on(self.options.broker, self.overrides)

    def _schedule_faults(self) -> None:
        """Switch devices off and on, and enroll late devices, when their time comes."""
        o = self.options
        pending: list[tuple[float, str, VirtualDevice]] = []
        for device in self.devices:
            if (late := device.fault("late-enroll")) is not None:
                pending.append((late.after_s, "enroll", device))
            if (off := device.fault("offline")) is not None:
                pending.append((off.after_s, "off", device))
                pending.append((off.after_s + off.for_s, "on", device))
        pending.sort(key=lambda p: (p[0], p[1]))
        with httpx.Client(
            base_url=o.fleet_url, timeout=60, headers={"Authorization": f"Bearer {o.token}"}
        ) as fleet:
            for at, action, device in pending:
                wait = self.started_at + at - time.monotonic()
                if wait > 0 and self._stop.wait(wait):
                    return
                try:
                    if action == "enroll":
                        device.enroll(fleet)
                        device.power_on(o.broker, self.overrides)
                    elif action == "off":
                        device.power_off()
                    else:
                        device.power_on(o.broker, self.overrides)
                except Exception:  # one device's trouble must not stop the schedule
                    logger.exception("%s: %s failed", device.device_id, action)

    def _applications(self) -> None:
        """Ask every running device for inferences, as the applications on it would."""
        interval = self.options.infer_interval_s
        with ThreadPoolExecutor(32, thread_name_prefix="edgefleet-sim-app") as pool:
            while not self._stop.is_set():
                started = time.monotonic()
                list(pool.map(_one_inference, list(self.devices)))
                self._stop.wait(max(0.05, interval - (time.monotonic() - started)))

    # -- results -----------------------------------------------------------------------------

    def states(self) -> list[dict[str, Any]]:
        """Every device's local state, as read from its own data directory."""
        return [
            {**d.status(), "device_id": d.device_id, "profile": d.profile.name}
            for d in self.devices
        ]


def _feeds(agent_: Agent, name: str) -> dict[str, np.ndarray] | None:
    active = agent_.models.get(name)
    return None if active is None else probe_feeds(active.manifest.inputs)


def _one_inference(device: VirtualDevice) -> None:
    agent_ = device.agent
    if agent_ is None:
        return
    for name in list(agent_.models):
        feeds = _feeds(agent_, name)
        if feeds is None:
            continue
        try:
            agent_.infer(name, feeds)
        except Exception as e:  # counted as an error in the agent's metrics already
            logger.debug("%s: inference failed: %s", device.device_id, e)
