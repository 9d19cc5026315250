"""``edgefleet demo``: the whole system on this machine, with real parts.

1. make the example model and three releases, v1, v2 and v3, signed with fresh keys;
2. create a device CA and start a TLS broker with per-device ACLs: ``mosquitto`` where it is
   installed, else the embedded Python broker (:mod:`simulators.embedded_broker`, MQTT 3.1.1,
   which the fleet and the devices then speak); ``--broker`` chooses;
3. start the fleet service (SQLite, the MQTT bridge, the rollout scheduler) on localhost;
4. publish the releases, enroll the devices and start them: virtual devices
   (:mod:`simulators.virtual`), each running the real agent on a simulated hardware profile;
5. roll v1 out to all, v2 in stages, v3 in stages, which the gates must halt and revert.

The rollout policy (:func:`demo_policy`) is the fleet's default one, so a rollout names only
its release (and v1 its single stage). With ``rollouts="console"`` (``--rollouts console``) the
demo stops after step 4, prints what to do in the web console, and a person runs step 5 there;
SIGINT or SIGTERM ends it with the same summary of the rollouts that were run (once a halted
rollout's devices have reverted, as after the demo's own rollouts).

SIGTERM is Ctrl-C for the whole demo: before the demo waits for a person, either signal stops it
(:class:`Interrupted`), and it stops what it started (the devices, the fleet service, the
broker) on its way out, whatever step it was in.

v3 is the bad release: on the ``arm-npu`` hardware class it computes wrong outputs (so the
devices' self-test refuses it there), and everywhere else it is correct but six times as slow
(so the latency gate, which compares it with the devices still on v2, refuses it too once it
has enough of them). The gate allows a p95 ratio of 3. All the devices share this machine's
two cores, and the simulated latency is a sleep that a busy process stretches unevenly: a good
release has measured up to 2.3 times its control group here, most in the last stage, which is
compared with the figure its control group had in the stage before (nobody is left on the old
version). On the class with the shortest latencies (``jetson-gpu``, 12 ms) one device's p95
stretched six-fold. So the gates need a third of the devices (``min_sample``), at least four
of 12, and judge the median of their ratios rather than a class of three. The self-test halts
v3 on the NPU whatever the load.
"""

from __future__ import annotations

import getpass
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import httpx
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from fleet.rollout_options import GateOptions, RolloutOptions
from shared.bundle import build_bundle, inspect_bundle, write_signed_copy
from shared.cli.common import console, err_console
from shared.errors import UsageError
from shared.keystore import KeyStore
from shared.trust import sign_release
from simulators.hardware import DEFAULT_PROFILES, parse_profiles
from simulators.virtual import Simulation, SimulationOptions, parse_faults

__all__ = [
    "BROKER_CHOICES",
    "DemoBroker",
    "DemoOptions",
    "Interrupted",
    "make_releases",
    "run_broker",
    "run_demo",
    "run_embedded_broker",
    "run_fleet",
    "start_broker",
]

VERSIONS = ("1.0.0", "2.0.0", "3.0.0")
FIRST_STAGES = [100.0]  # v1 to all at once; v2 and v3 in the policy's stages (demo_policy)
MAX_P95_RATIO = 3.0  # the latency gate (see the module docstring)
# How v3 misbehaves on the simulated hardware (see the module docstring).
BAD_V3 = "wrong-output:version=3.0.0:class=arm-npu,slow:version=3.0.0:factor=6"
ADMIN_TOKEN_ENV = "EDGEFLEET_ADMIN_TOKEN"  # noqa: S105 - the variable name, not a secret
REVERT_WAIT_S = 60.0  # how long the summary waits for a halted release's devices to revert
BROKER_CHOICES = ("auto", "mosquitto", "embedded")
ROLLOUT_CHOICES = ("auto", "console")  # who starts the rollouts: the demo, or a person
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# Where Debian and source builds install mosquitto, outside a normal user's PATH.
MOSQUITTO_DIRS = ("/usr/sbin", "/usr/local/sbin")


@dataclass
class DemoOptions:
    work_dir: Path
    devices: int = 12
    headless: bool = False
    as_json: bool = False
    port: int = 8080
    timeout_s: float = 300.0
    broker: str = "auto"  # one of BROKER_CHOICES
    rollouts: str = "auto"  # one of ROLLOUT_CHOICES


@dataclass(frozen=True)
class DemoBroker:
    """The broker the demo runs, and what the fleet and the devices must speak to it."""

    kind: str  # "mosquitto" or "embedded"
    name: str  # e.g. "mosquitto (/usr/sbin/mosquitto)"
    security: str  # what it checks, and what it lacks
    mqtt_protocol: Literal[5, 311]
    port: int
    ca_file: Path

    @property
    def description(self) -> str:
        """One line for the user: which broker, where, with which security."""
        version = "5" if self.mqtt_protocol == 5 else "3.1.1"
        return f"{self.name}, MQTT {version} over TLS on 127.0.0.1:{self.port}: {self.security}"


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped the demo before its summary; everything it had started (the
    devices, the fleet service, the broker) has been stopped."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


class _StopSignals:
    """What SIGINT and SIGTERM do while the demo runs: raise :class:`Interrupted` (so every
    context manager cleans up), except that once the demo waits for a person (:meth:`expect`,
    :meth:`wait`), the first of them only ends that wait."""

    def __init__(self) -> None:
        self._stopped = threading.Event()
        self._expected = False

    def handle(self, signum: int, _frame: object) -> None:
        if self._expected and not self._stopped.is_set():
            self._stopped.set()
            return
        raise Interrupted(signum)

    def expect(self) -> None:
        """From now on, the first signal ends :meth:`wait` instead of the demo."""
        self._expected = True

    def wait(self) -> None:
        """Block until SIGINT (Ctrl-C) or SIGTERM; a later one raises :class:`Interrupted`."""
        self.expect()
        self._stopped.wait()


@contextmanager
def _stop_signals() -> Iterator[_StopSignals]:
    """SIGINT and SIGTERM handled by a :class:`_StopSignals` until the block ends (in the main
    thread only); the handlers before are restored after."""
    stop = _StopSignals()
    previous = {sig: signal.signal(sig, stop.handle) for sig in STOP_SIGNALS}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def demo_policy(devices: int) -> RolloutOptions:
    """The demo's rollout policy for a fleet of ``devices``, which the fleet takes as its
    defaults: two stages, a short soak, no install failure tolerated, a revert when a gate
    fails, and the latency gate of the module docstring (no error-rate check: the simulated
    runtime makes no inference errors worth judging)."""
    return RolloutOptions(
        stages=[34.0, 100.0],
        soak_s=2.0,
        max_failure_rate=0.0,
        revert_on_fail=True,
        device_timeout_s=120.0,
        gates=GateOptions(
            # A third of the devices: a stage of 34% has that many, and a few devices' p95 is
            # too noisy to judge a release by.
            min_sample=max(1, devices // 3),
            max_p95_ratio=MAX_P95_RATIO,
            max_error_rate=None,
        ),
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_releases(work: Path) -> Path:
    """Keys and the signed cnn 1.0.0, 2.0.0 and 3.0.0 bundles under ``work/releases``."""
    from shared.example_models import write_example

    keys = KeyStore.create(work / "keys", now=datetime.now(UTC))
    model = work / "model"
    write_example(model, size="small")
    for version in VERSIONS:
        spec = json.loads((model / "model.json").read_text())
        spec["metadata"]["release"] = version
        (model / "model.json").write_text(json.dumps(spec))
        bundle = work / "releases" / f"cnn-{version}.bundle"
        build_bundle(model, name="cnn", version=version, out=bundle, chunk_size=64 * 1024)
        _, files = sign_release(
            keys, inspect_bundle(bundle), expires_in=timedelta(days=30), now=datetime.now(UTC)
        )
        write_signed_copy(bundle, files)
    return work / "keys"


def find_mosquitto() -> str | None:
    """The mosquitto executable on PATH or in :data:`MOSQUITTO_DIRS`, or None."""
    return shutil.which("mosquitto") or next(
        (
            path
            for path in (os.path.join(d, "mosquitto") for d in MOSQUITTO_DIRS)
            if os.access(path, os.X_OK)
        ),
        None,
    )


def _server_identity(work: Path) -> tuple[Path, Path, Path]:
    """The fleet's device CA under ``work`` and a 127.0.0.1 server certificate from it:
    (CA file, certificate, key)."""
    from fleet.pki import DeviceCA

    ca = DeviceCA(work / "fleet" / "pki")
    server_cert, server_key = ca.issue_server(["127.0.0.1", "localhost"], work / "broker")
    return ca.cert_path, server_cert, server_key


@contextmanager
def _child_broker(command: list[str], port: int, log_path: Path, what: str) -> Iterator[None]:
    """Run a broker process until the block ends, once it accepts connections on ``port``."""
    log = log_path.open("wb")
    # In a session of its own, so that a Ctrl-C in the terminal reaches only the demo, which
    # stops the broker once it is done with it (a halted rollout's devices revert through it).
    process = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and process.poll() is None:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        else:
            raise UsageError(f"{what} did not start; see {log_path}")
        yield
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@contextmanager
def run_broker(work: Path) -> Iterator[tuple[int, Path]]:
    """A TLS mosquitto with per-device ACLs for a fleet under ``work``; yields (port, CA file)."""
    from fleet.broker_config import BrokerConfig, write_broker_config

    executable = find_mosquitto()
    if executable is None:
        raise UsageError(
            "mosquitto is not installed: install it (apt-get install mosquitto) "
            "or run scripts/services.sh --broker-only"
        )
    cafile, server_cert, server_key = _server_identity(work)
    port = _free_port()
    (work / "broker" / "db").mkdir(parents=True, exist_ok=True)
    cfg = BrokerConfig(
        cafile=cafile,
        certfile=server_cert,
        keyfile=server_key,
        port=port,
        bind_address="127.0.0.1",
        persistence_dir=work / "broker" / "db",
        run_as_user=getpass.getuser(),
    )
    paths = write_broker_config(work / "broker", cfg)
    command = [executable, "-c", str(paths["conf"])]
    with _child_broker(command, port, work / "broker" / "mosquitto.log", "mosquitto"):
        yield port, cafile


def _amqtt_version() -> str | None:
    """amqtt's version, or None if it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    if importlib.util.find_spec("amqtt") is None:
        return None
    try:
        return version("amqtt")
    except PackageNotFoundError:
        return None


@contextmanager
def run_embedded_broker(work: Path) -> Iterator[tuple[int, Path]]:
    """The embedded broker (:mod:`simulators.embedded_broker`, amqtt) in a child process, with
    TLS, client certificates and device ACLs, for a fleet under ``work``; yields (port, CA file).

    It speaks MQTT 3.1.1 only: the fleet and the devices must use ``mqtt_protocol=311``.
    """
    if _amqtt_version() is None:
        raise UsageError(
            "the embedded broker needs amqtt: pip install 'edgefleet[demo]' (or install mosquitto)"
        )
    cafile, server_cert, server_key = _server_identity(work)
    port = _free_port()
    command = [
        sys.executable,
        "-m",
        "simulators.embedded_broker",
        *("--port", str(port), "--cafile", str(cafile)),
        *("--certfile", str(server_cert), "--keyfile", str(server_key)),
    ]
    with _child_broker(command, port, work / "broker" / "amqtt.log", "the embedded broker"):
        yield port, cafile


@contextmanager
def start_broker(work: Path, choice: str = "auto") -> Iterator[DemoBroker]:
    """The demo's broker: ``mosquitto``, ``embedded``, or ``auto`` (mosquitto where it is
    installed, else the embedded broker).

    Raises:
        UsageError: an unknown choice, or the chosen broker (for auto: either) is not installed.
    """
    if choice not in BROKER_CHOICES:
        raise UsageError(f"--broker must be one of {', '.join(BROKER_CHOICES)}, got {choice!r}")
    mosquitto = find_mosquitto() if choice != "embedded" else None
    if choice == "mosquitto" or mosquitto is not None:
        kind, run = "mosquitto", run_broker
        mqtt_protocol: Literal[5, 311] = 5
        name = f"mosquitto ({mosquitto})"
        security = "client certificates required, per-device ACLs"
    else:
        version = _amqtt_version()
        if version is None and choice == "auto":
            raise UsageError(
                "no MQTT broker: install mosquitto (apt-get install mosquitto), or amqtt for the "
                "embedded broker (pip install 'edgefleet[demo]')"
            )
        kind, run = "embedded", run_embedded_broker
        mqtt_protocol = 311
        why = "mosquitto not found, so " if choice == "auto" else ""
        name = f"{why}the embedded Python broker (amqtt {version})"
        security = (
            "client certificates required, per-device topic checks; no shared subscriptions, "
            "no packet size limit, sessions in memory only (mosquitto is the broker for a fleet)"
        )
    with run(work) as (port, cafile):
        yield DemoBroker(
            kind=kind,
            name=name,
            security=security,
            mqtt_protocol=mqtt_protocol,
            port=port,
            ca_file=cafile,
        )


@contextmanager
def run_fleet(
    work: Path,
    keys: Path,
    broker_port: int,
    ca: Path,
    port: int,
    *,
    database_url: str | None = None,
    mqtt_protocol: Literal[5, 311] = 5,
    rollout_defaults: RolloutOptions | None = None,
) -> Iterator[str]:
    """The fleet service in this process (SQLite under ``work`` by default); yields its URL.

    ``mqtt_protocol`` is the MQTT version it speaks: 5, or 311 for the embedded broker;
    ``rollout_defaults`` the fleet's rollout policy (None: the built-in one).
    """
    import uvicorn

    from fleet.app import create_app
    from fleet.config import FleetSettings
    from fleet.pki import DeviceCA

    credentials = DeviceCA(work / "fleet" / "pki").issue("fleet-svc")
    identity = work / "fleet" / "identity"
    identity.mkdir(parents=True, exist_ok=True)
    (identity / "fleet-svc.pem").write_bytes(credentials.cert_pem)
    key_path = identity / "fleet-svc-key.pem"
    key_path.write_bytes(credentials.key_pem)
    key_path.chmod(0o600)
    settings = FleetSettings(
        data_dir=work / "fleet",
        keys=keys,
        broker=f"mqtts://127.0.0.1:{broker_port}",
        ca_file=ca,
        cert_file=identity / "fleet-svc.pem",
        key_file=key_path,
        host="127.0.0.1",
        port=port,
        rollout_tick_s=0.5,
        db=database_url,
        ingest_flush_s=0.1,
        mqtt_protocol=mqtt_protocol,
        rollout_defaults=rollout_defaults or RolloutOptions(),
    )
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.1)
        if not server.started:
            raise UsageError(f"the fleet service did not start on port {port} (in use?)")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)


class _DemoSimulation(Simulation):
    """The virtual devices, their agents speaking the broker's MQTT version."""

    def __init__(self, options: SimulationOptions, *, mqtt_protocol: Literal[5, 311]) -> None:
        self.mqtt_protocol = mqtt_protocol
        super().__init__(options)

    @property
    def overrides(self) -> dict[str, Any]:
        return {**super().overrides, "mqtt_protocol": self.mqtt_protocol}


def _device_versions(sim: Simulation) -> Counter[str]:
    """Devices per cnn version they run ("none": no model yet), from their own data."""
    return Counter((s["models"].get("cnn") or {}).get("version") or "none" for s in sim.states())


def _wait(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.3)
    raise UsageError(f"the demo timed out waiting for {what}")


def _rollout(
    client: httpx.Client,
    version: str,
    progress: Progress | None,
    *,
    timeout: float,
    stages: list[float] | None = None,
) -> dict[str, Any]:
    """Start a rollout of cnn ``version`` under the fleet's default policy (``stages``, if
    given, instead of the default ones) and follow it until it settles."""
    body: dict[str, Any] = {"model": "cnn", "version": version}
    if stages is not None:
        body["stages"] = stages
    response = client.post("/api/v1/rollouts", json=body)
    if response.status_code != 201:
        raise UsageError(f"rollout of {version} refused: {response.text}")
    rollout_id = response.json()["id"]
    task = progress.add_task(f"rollout {version}", total=None) if progress else None

    def settled() -> dict[str, Any] | None:
        doc: dict[str, Any] = client.get(f"/api/v1/rollouts/{rollout_id}").json()
        if progress is not None and task is not None:
            total = sum(doc["devices"].values()) or None
            done = doc["devices"]["succeeded"] + doc["devices"]["failed"]
            progress.update(
                task,
                total=total,
                completed=done,
                description=f"rollout {version}: {doc['state']}, stage {doc['stage']}",
            )
        # A pause (an inconclusive gate) waits for a person: the demo reports it, not waits.
        return doc if doc["state"] in ("completed", "halted", "aborted", "paused") else None

    doc: dict[str, Any] = _wait(settled, timeout, f"rollout {version}")
    return doc


def _run_story(client: httpx.Client, sim: Simulation, options: DemoOptions) -> list[dict[str, Any]]:
    """The rollouts of the story, one after the other; each one's status once it settled."""
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
        disable=options.headless or options.as_json,
    ) as progress:
        docs = []
        for version in VERSIONS:
            stages = FIRST_STAGES if version == VERSIONS[0] else None
            docs.append(
                _rollout(client, version, progress, timeout=options.timeout_s, stages=stages)
            )
            if version != VERSIONS[-1] and docs[-1]["state"] != "completed":
                # v1 and v2 are good releases: if the gates stopped one, say why.
                summary = _summary(docs[-1], [])
                raise UsageError(
                    f"the good release {version} was {summary['state']} by the "
                    f"gates, so the demo cannot go on: {summary['halt_reason']}"
                )
    return docs


def _wait_for_reverts(
    sim: Simulation, docs: list[dict[str, Any]], say: Callable[[str], object]
) -> None:
    """Wait up to :data:`REVERT_WAIT_S` until no device runs a version whose rollout (among
    ``docs``) was halted: its devices revert after the halt, and the summary reports them once
    they have (or as they are, after the wait)."""
    halted = {doc["version"] for doc in docs if doc["state"] == "halted"}
    if not halted & set(_device_versions(sim)):
        return
    versions = ", ".join(sorted(halted))
    say(
        f"waiting up to {REVERT_WAIT_S:g} s for the devices of the halted {versions} to revert "
        "(Ctrl-C stops the demo without the summary)"
    )
    deadline = time.monotonic() + REVERT_WAIT_S
    while halted & set(_device_versions(sim)) and time.monotonic() < deadline:
        time.sleep(0.3)


def _console_steps(url: str, token: str, policy: RolloutOptions) -> str:
    """What an operator does in the console to tell the story."""
    stages = ", ".join(f"{p:g}" for p in policy.stages)
    return "\n".join(
        (
            f"Run the rollouts in the console: open {url}/ and log in with the token {token}",
            "Rollouts > New rollout; the form starts from the demo's policy (the fleet's "
            f"defaults: stages {stages}, soak {policy.soak_s:g} s, gates need "
            f"{policy.gates.min_sample} devices, p95 ratio at most {policy.gates.max_p95_ratio:g})",
            "  1. cnn 1.0.0 with stages 100: every device gets it at once",
            f"  2. cnn 2.0.0 with the default stages ({stages}): it completes stage by stage",
            "  3. cnn 3.0.0 with the default stages: the first stage's gate halts it and its "
            "devices revert to 2.0.0",
            "Ctrl-C stops the demo and prints a summary of the rollouts.",
        )
    )


def _rollouts_of_cnn(client: httpx.Client) -> list[dict[str, Any]]:
    """The status of every rollout of cnn, oldest first.

    Raises:
        UsageError: the fleet did not answer with the list.
    """
    response = client.get("/api/v1/rollouts")
    if response.is_error:
        answer = " ".join(response.text.split())[:300] or "(no body)"
        raise UsageError(
            f"the fleet answered {response.status_code} {response.reason_phrase} when asked "
            f"for the rollouts, so the demo has no summary: {answer}"
        )
    return [doc for doc in reversed(response.json()) if doc["model"] == "cnn"]


def _summary(doc: dict[str, Any], events: list[dict[str, Any]]) -> dict[str, Any]:
    failed: dict[str, int] = {}
    for label, count in doc["failures"].items():
        klass = label.split("|")[0]
        failed[klass] = failed.get(klass, 0) + count
    ran = {
        e["device_id"]
        for e in events
        if e["version"] == doc["version"] and e["phase"] in ("activated", "committed")
    }
    return {
        "id": doc["id"],
        "version": doc["version"],
        "state": doc["state"],
        "stages_reached": doc["stage"] + 1,
        "devices_updated": doc["devices"]["succeeded"],
        "devices_failed": failed,
        "ever_ran": len(ran),
        # Why the gates stopped it, if they did: the last verdict that was not a pass.
        "halt_reason": next(
            (d["reason"] for d in reversed(doc["decisions"]) if d["verdict"] != "pass"), None
        ),
    }


def run_demo(options: DemoOptions) -> dict[str, Any]:
    """Run the demo (see the module docstring); return its summary. Call it from the main
    thread: it handles SIGINT and SIGTERM until it returns (the handlers before are restored).

    Raises:
        UsageError: a bad choice of options, or a step of the story that did not happen.
        Interrupted: SIGINT or SIGTERM before the summary (what the demo started is stopped).
    """
    if options.rollouts not in ROLLOUT_CHOICES:
        raise UsageError(
            f"--rollouts must be one of {', '.join(ROLLOUT_CHOICES)}, got {options.rollouts!r}"
        )
    if options.rollouts == "console" and options.headless:
        raise UsageError(
            "--headless cannot go with --rollouts console: a person runs the rollouts there"
        )
    with _stop_signals() as stop:
        return _run(options, stop)


def _run(options: DemoOptions, stop: _StopSignals) -> dict[str, Any]:
    """:func:`run_demo` once its options are checked, with ``stop`` handling the signals."""
    by_hand = options.rollouts == "console"
    work = options.work_dir
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    say: Callable[[str], object] = (lambda _m: None) if options.as_json else console.print
    # What a person must read: on stderr with --json, which keeps stdout for the summary.
    tell: Callable[[str], object] = err_console.print if options.as_json else console.print
    say("[bold]edgefleet demo[/]: building the example model and three signed releases")
    keys = make_releases(work)
    os.environ.setdefault(ADMIN_TOKEN_ENV, "demo-admin-" + os.urandom(8).hex())
    token = os.environ[ADMIN_TOKEN_ENV]
    policy = demo_policy(options.devices)
    with start_broker(work, options.broker) as broker:
        say(f"broker: {broker.description}")
        with (
            run_fleet(
                work,
                keys,
                broker.port,
                broker.ca_file,
                options.port,
                mqtt_protocol=broker.mqtt_protocol,
                rollout_defaults=policy,
            ) as url,
            httpx.Client(
                base_url=url, timeout=60, headers={"Authorization": f"Bearer {token}"}
            ) as client,
        ):
            say(
                f"fleet service: console at {url}/ (API docs at {url}/docs); "
                f"log in with the admin token {token}"
            )
            for version in VERSIONS:
                bundle = work / "releases" / f"cnn-{version}.bundle"
                client.post("/api/v1/releases", content=bundle.read_bytes()).raise_for_status()
            sim = _DemoSimulation(
                SimulationOptions(
                    fleet_url=url,
                    token=token,
                    broker=f"mqtts://127.0.0.1:{broker.port}",
                    devices=options.devices,
                    work_dir=work / "devices",
                    profiles=parse_profiles(DEFAULT_PROFILES),
                    model_faults=parse_faults(BAD_V3)[0],
                    prefix="demo",
                    probation_s=2.0,
                    telemetry_interval_s=1.0,
                    infer_interval_s=0.5,
                ),
                mqtt_protocol=broker.mqtt_protocol,
            )
            devices = [d.device_id for d in sim.devices]
            try:
                sim.start()
                classes = ", ".join(
                    f"{n} {p}"
                    for p, n in sorted(Counter(d.profile.name for d in sim.devices).items())
                )
                say(f"{len(devices)} virtual devices, each running the real agent: {classes}")
                _wait(
                    lambda: (
                        sum(d["online"] for d in client.get("/api/v1/devices").json())
                        == len(devices)
                    ),
                    options.timeout_s,
                    "the devices to come online",
                )
                if by_hand:
                    stop.expect()  # before the steps: once they are printed, a signal ends the wait
                    tell(_console_steps(url, token, policy))
                    stop.wait()
                    docs = _rollouts_of_cnn(client)
                else:
                    docs = _run_story(client, sim, options)
                _wait_for_reverts(sim, docs, tell)
                events = [
                    e for d in devices for e in client.get(f"/api/v1/devices/{d}").json()["events"]
                ]
                summary: dict[str, Any] = {
                    "devices": len(devices),
                    "fleet_url": url,
                    "broker": {
                        "kind": broker.kind,
                        "mqtt_protocol": broker.mqtt_protocol,
                        "description": broker.description,
                    },
                    "rollouts": [_summary(doc, events) for doc in docs],
                    "device_versions": dict(_device_versions(sim)),
                }
                for r in summary["rollouts"]:
                    say(
                        f"  {r['version']}: {r['state']} after {r['stages_reached']} stage(s); "
                        f"{r['devices_updated']} updated, failed {r['devices_failed'] or 'none'}, "
                        f"{r['ever_ran']} ever ran it"
                    )
                if not (by_hand or options.headless or options.as_json):
                    say(f"running: console at {url}/ , API docs at {url}/docs  (Ctrl-C to stop)")
                    stop.wait()
                return summary
            finally:
                sim.stop()
