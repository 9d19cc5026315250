"""The fleet service as operators run it, end to end: as separate ``edgefleet fleet serve``
processes on a TLS Mosquitto and PostgreSQL, with virtual devices running the real agent.

Two promises are tested, each on its own fleet and a fresh database:

- **Killed and restarted mid-rollout, the fleet resumes with nothing lost or repeated.** The
  service is killed (SIGKILL: no clean shutdown) just after it sent a stage's orders, and
  started again on the same database and data directory. The rollout must complete and every
  device must run the new version by its own data directory. Nothing repeated: each device
  accepted exactly one order for the new version, by its own order sequence, so an order sent
  before the kill and sent again after it (the rollout's state was not saved) is refused by the
  device as a replay, not installed twice. Nothing lost: every device's ``committed`` event for
  the new version is stored exactly once, including those sent while the service was down (the
  broker keeps them in the service's MQTT session, whose id is its certificate's CN). Events the
  killed process had already read but not yet stored are lost (see :mod:`fleet.mqtt_bridge`),
  so the earlier phases are only checked to be stored at most once.
- **Two replicas on one broker and one database share the work and process no message twice.**
  Each replica has its own certificate (the broker makes the CN the client id, so two replicas
  with one identity would take each other's session over), and the ACL grants both the fleet's
  rights. Releases and the rollouts are created on replica A and followed on replica B. Both
  replicas must have ingested device events and answered fetches (their own Prometheus
  counters), and the event messages the two counted add up to exactly the events stored: the
  broker's shared subscription gave each message to one replica only.

No timing is asserted; the time-outs are generous because the machines running the tests are
shared.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func
from sqlmodel import Session, create_engine, select

from agent.store import StoreState
from fleet.broker_config import FLEET_IDENTITY, ROOT_TOPIC, BrokerConfig, write_broker_config
from fleet.models import DeviceEvent, RolloutRecord
from fleet.pki import DeviceCA
from fleet.rollout_service import RolloutService
from simulators.demo import make_releases
from simulators.hardware import DEFAULT_PROFILES, parse_profiles
from simulators.virtual import Simulation, SimulationOptions
from tests.integration.conftest import PG_ADMIN, find_mosquitto, free_port
from tests.polling import wait_until

pytestmark = pytest.mark.integration

DEVICES = 40
TOKEN = "replicas-admin-" + os.urandom(6).hex()
WAIT_S = 300.0
ROOT = Path(__file__).resolve().parents[2]


class FleetProcess:
    """One ``edgefleet fleet serve`` child process (its output goes to ``<name>.log``)."""

    def __init__(self, work: Path, name: str, args: list[str], port: int) -> None:
        self.name = name
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = work / f"{name}.log"
        self.command = [sys.executable, "-m", "shared.cli.main", "fleet", "serve", *args]
        self.command += ["--port", str(port)]
        self.process: subprocess.Popen[bytes] | None = None
        self.api = httpx.Client(
            base_url=self.url, timeout=60, headers={"Authorization": f"Bearer {TOKEN}"}
        )

    def start(self) -> None:
        env = os.environ | {
            "EDGEFLEET_ADMIN_TOKEN": TOKEN,
            # What simulators.demo.run_fleet sets, for a fleet that reacts within a second.
            "EDGEFLEET_FLEET_ROLLOUT_TICK_S": "0.5",
            "EDGEFLEET_FLEET_INGEST_FLUSH_S": "0.1",
            "EDGEFLEET_FLEET_MAX_MESSAGE_BYTES": str(256 * 1024),
        }
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.command,
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_until(self._healthy, timeout=60, what=f"{self.name} to serve /healthz")

    def _healthy(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(
                f"{self.name} exited with status {self.process.returncode}:\n{self.log()}"
            )
        try:
            return self.api.get("/healthz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def kill(self) -> None:
        """SIGKILL: the process gets no chance to flush, disconnect or commit anything."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()

    def close(self) -> None:
        self.stop()
        self.api.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def metric(self, name: str, **labels: str) -> float:
        """The sum of a counter's samples with ``labels``, from this process's /metrics."""
        text = self.api.get("/metrics").text
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == name and labels.items() <= sample.labels.items()
        )


class World:
    """The broker, the fleet processes, the devices and the database of one test."""

    def __init__(
        self, work: Path, database_url: str, stack: contextlib.ExitStack, identities: list[str]
    ) -> None:
        self.work = work
        self.database_url = database_url
        self.stack = stack
        self.keys = make_releases(work)
        self.broker_port, self.ca = stack.enter_context(run_broker(work, identities))
        self.engine = create_engine(database_url)
        stack.callback(self.engine.dispose)
        self.sim: Simulation | None = None

    def identity(self, name: str) -> tuple[Path, Path]:
        """A fleet TLS identity (certificate CN ``name``) issued by the CA the broker trusts."""
        credentials = DeviceCA(self.work / "fleet" / "pki").issue(name)
        directory = self.work / "identities"
        directory.mkdir(exist_ok=True)
        cert, key = directory / f"{name}.pem", directory / f"{name}-key.pem"
        cert.write_bytes(credentials.cert_pem)
        key.write_bytes(credentials.key_pem)
        key.chmod(0o600)
        return cert, key

    @property
    def broker(self) -> str:
        return f"mqtts://127.0.0.1:{self.broker_port}"

    def fleet(self, name: str, identity: str = FLEET_IDENTITY) -> FleetProcess:
        """A fleet process (not started) on this world's database, broker, keys and data dir."""
        cert, key = self.identity(identity)
        args = [
            "--db", self.database_url,
            "--broker", self.broker,
            "--keys", str(self.keys),
            "--ca-file", str(self.ca),
            "--cert-file", str(cert),
            "--key-file", str(key),
            "--data-dir", str(self.work / "fleet"),
        ]  # fmt: skip
        process = FleetProcess(self.work, name, args, free_port())
        self.stack.callback(process.close)
        return process

    def publish(self, fleet: FleetProcess, *versions: str) -> None:
        for version in versions:
            bundle = self.work / "releases" / f"cnn-{version}.bundle"
            fleet.api.post("/api/v1/releases", content=bundle.read_bytes()).raise_for_status()

    def start_devices(self, fleet: FleetProcess, prefix: str) -> Simulation:
        sim = Simulation(
            SimulationOptions(
                fleet_url=fleet.url,
                token=TOKEN,
                broker=self.broker,
                devices=DEVICES,
                work_dir=self.work / "devices",
                profiles=parse_profiles(DEFAULT_PROFILES),
                prefix=prefix,
                probation_s=1.0,
                telemetry_interval_s=1.0,
                infer_interval_s=0.5,
            )
        )
        self.sim = sim
        self.stack.callback(sim.stop)
        sim.start()
        wait_until(
            lambda: online(fleet) == DEVICES, what="every device to come online", timeout=WAIT_S
        )
        return sim

    def versions(self) -> Counter[str | None]:
        """How many devices run each version of cnn, by their own data directories."""
        assert self.sim is not None
        return Counter((s["models"].get("cnn") or {}).get("version") for s in self.sim.states())

    def accepted_orders(self) -> dict[str, int]:
        """Each device's last accepted director order sequence, from its own data directory
        (the fleet numbers each device's orders 1, 2, 3...; a device refuses any not above)."""
        assert self.sim is not None
        return {
            d.device_id: StoreState.load(d.data_dir / "state.json").order_sequence
            for d in self.sim.devices
        }

    def phases(self, version: str) -> dict[str, Counter[str]]:
        """For each device, how many events of each phase it stored for cnn ``version``."""
        counts: dict[str, Counter[str]] = {}
        with Session(self.engine) as session:
            rows = session.exec(
                select(DeviceEvent.device_id, DeviceEvent.phase).where(
                    DeviceEvent.model == "cnn", DeviceEvent.version == version
                )
            )
            for device_id, phase in rows:
                counts.setdefault(device_id, Counter())[phase] += 1
        return counts

    def stored_events(self) -> int:
        with Session(self.engine) as session:
            return int(session.exec(select(func.count()).select_from(DeviceEvent)).one())


def online(fleet: FleetProcess) -> int:
    return sum(d["online"] for d in fleet.api.get("/api/v1/devices?limit=1000").json())


def create_rollout(fleet: FleetProcess, version: str, stages: list[float]) -> str:
    body = {
        "model": "cnn",
        "version": version,
        "stages": stages,
        "soak_s": 2.0,
        "max_failure_rate": 0.0,
        "revert_on_fail": True,
        "device_timeout_s": 120,
        "gates": {"min_sample": 1, "max_error_rate": None, "max_p95_ratio": None},
    }
    response = fleet.api.post("/api/v1/rollouts", json=body)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def rollout_status(fleet: FleetProcess, rollout_id: str) -> dict[str, Any]:
    response = fleet.api.get(f"/api/v1/rollouts/{rollout_id}")
    response.raise_for_status()
    return dict(response.json())


def settled(fleet: FleetProcess, rollout_id: str) -> dict[str, Any]:
    return wait_until(
        lambda: (
            (s := rollout_status(fleet, rollout_id))["state"]
            in ("completed", "halted", "paused", "aborted")
            and s
        ),
        what=f"rollout {rollout_id} to settle",
        timeout=WAIT_S,
    )


@pytest.fixture
def database_url() -> Iterator[str]:
    """A fresh PostgreSQL database for one test (see ``postgres_url`` in conftest)."""
    name = f"edgefleet_test_{uuid.uuid4().hex[:10]}"
    try:
        admin = psycopg.connect(PG_ADMIN, autocommit=True)
    except psycopg.OperationalError as e:
        pytest.fail(f"PostgreSQL is not reachable at 127.0.0.1:5432 ({e})")
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture
def make_world(tmp_path: Path, database_url: str) -> Iterator[Callable[[list[str]], World]]:
    """``make_world(fleet_identities)``: a world whose broker grants those CNs the fleet's rights;
    everything it starts is stopped at teardown."""
    with contextlib.ExitStack() as stack:
        yield lambda identities: World(tmp_path, database_url, stack, identities)


@contextlib.contextmanager
def run_broker(work: Path, fleet_identities: list[str]) -> Iterator[tuple[int, Path]]:
    """:func:`simulators.demo.run_broker`'s TLS Mosquitto, with every identity in
    ``fleet_identities`` granted the fleet service's rights; yields (port, CA file)."""
    ca = DeviceCA(work / "fleet" / "pki")
    server_cert, server_key = ca.issue_server(["127.0.0.1", "localhost"], work / "broker")
    (work / "broker" / "db").mkdir(parents=True, exist_ok=True)
    cfg = BrokerConfig(
        cafile=ca.cert_path,
        certfile=server_cert,
        keyfile=server_key,
        port=free_port(),
        bind_address="127.0.0.1",
        persistence_dir=work / "broker" / "db",
        run_as_user=getpass.getuser(),
    )
    paths = write_broker_config(work / "broker", cfg, fleet_identity=fleet_identities[0])
    with paths["acl"].open("a") as acl:
        for identity in fleet_identities[1:]:
            acl.write(f"\nuser {identity}\ntopic readwrite {ROOT_TOPIC}/#\n")
    with (work / "broker" / "mosquitto.log").open("wb") as log:
        process = subprocess.Popen(
            [find_mosquitto(), "-c", str(paths["conf"])], stdout=log, stderr=subprocess.STDOUT
        )
    try:
        wait_until(lambda: port_open(cfg.port), timeout=10, what="mosquitto to listen")
        yield cfg.port, ca.cert_path
    finally:
        process.terminate()
        process.wait(10)


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_fleet_killed_mid_rollout_resumes_with_nothing_lost_or_repeated(
    make_world: Callable[[list[str]], World],
) -> None:
    world = make_world([FLEET_IDENTITY])
    fleet = world.fleet("fleet")
    fleet.start()
    world.publish(fleet, "1.0.0", "2.0.0")
    world.start_devices(fleet, "restart")
    v1 = settled(fleet, create_rollout(fleet, "1.0.0", [100]))
    assert v1["state"] == "completed", v1["decisions"]
    accepted_before = world.accepted_orders()

    rollout_id = create_rollout(fleet, "2.0.0", [10, 50, 100])
    # Kill once the first gate has passed and second-stage devices are being updated.
    wait_until(
        lambda: (
            (s := rollout_status(fleet, rollout_id))["stage"] >= 1
            and s["devices"]["in_progress"] > 0
        ),
        what="the second stage to be in flight",
        timeout=WAIT_S,
    )
    fleet.kill()
    before = rollout_status_from_db(world, rollout_id)
    assert before["state"] == "running"
    assert before["devices"]["succeeded"] < DEVICES
    time.sleep(3)  # the devices carry on meanwhile, reporting to a fleet that is not there
    fleet.start()

    done = settled(fleet, rollout_id)
    assert done["state"] == "completed", done["decisions"]
    assert done["devices"]["succeeded"] == DEVICES, done["devices"]
    assert world.versions() == Counter({"2.0.0": DEVICES})
    # Nothing repeated: by its own data directory, each device accepted one more order.
    assert world.accepted_orders() == {d: n + 1 for d, n in accepted_before.items()}
    # Nothing lost: each device's final report reached the database, once; nothing twice.
    phases = world.phases("2.0.0")
    assert set(phases) == set(accepted_before)
    for device_id, counts in sorted(phases.items()):
        assert counts["committed"] == 1, (device_id, counts)
        assert max(counts.values()) == 1, (device_id, counts)
        assert counts["failed"] == counts["rolled_back"] == 0, (device_id, counts)


def rollout_status_from_db(world: World, rollout_id: str) -> dict[str, Any]:
    """A rollout's status as the database holds it (the service that would say is dead)."""
    with Session(world.engine) as session:
        record = session.get(RolloutRecord, rollout_id)
        assert record is not None
        return RolloutService(world.engine, None, b"").status(session, record)


def test_two_replicas_share_the_work_and_process_no_message_twice(
    make_world: Callable[[list[str]], World],
) -> None:
    world = make_world([FLEET_IDENTITY, "fleet-svc-b"])
    a, b = world.fleet("replica-a"), world.fleet("replica-b", identity="fleet-svc-b")
    a.start()
    b.start()
    # Everything is created on A while B runs: B learns of it through the database.
    world.publish(a, "1.0.0", "2.0.0")
    sim = world.start_devices(a, "replica")
    v1 = settled(b, create_rollout(a, "1.0.0", [100]))
    assert v1["state"] == "completed", v1["decisions"]
    v2 = settled(b, create_rollout(a, "2.0.0", [25, 100]))
    assert v2["state"] == "completed", v2["decisions"]
    assert world.versions() == Counter({"2.0.0": DEVICES})

    sim.stop()  # no more reports: the counters and the database can settle
    replicas = (a, b)
    for replica in replicas:
        # Each did part of the work: ingested device events and answered chunk fetches.
        assert replica.metric("edgefleet_mqtt_messages_total", kind="events") > 0, replica.name
        assert replica.metric("edgefleet_fetch_bytes_total") > 0, replica.name

    def counted() -> float:
        return sum(r.metric("edgefleet_mqtt_messages_total", kind="events") for r in replicas)

    # Every event message is stored once (duplicates are dropped by (device, seq)), so if the
    # two replicas had both processed one, their counts would add up to more than the rows.
    deadline = time.monotonic() + 30
    while counted() != world.stored_events() and time.monotonic() < deadline:
        time.sleep(0.5)
    processed, stored = counted(), world.stored_events()
    assert processed == stored, (
        f"the replicas processed {processed} event messages, {stored} stored"
    )
