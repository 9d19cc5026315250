"""``edgefleet demo``: the whole system on this machine, with real parts.

1. make the example model and three releases, v1, v2 and v3, signed with fresh keys;
2. create a device CA, a TLS broker configuration with per-device ACLs, and start ``mosquitto``;
3. start the fleet service (SQLite, the MQTT bridge, the rollout scheduler) on localhost;
4. publish the releases, enroll the devices and start them: virtual devices
   (:mod:`simulators.virtual`), each running the real agent on a simulated hardware profile;
5. roll v1 out to all, v2 in stages, v3 in stages, which the gates must halt and revert.

v3 is the bad release: on the ``arm-npu`` hardware class it computes wrong outputs (so the
devices' self-test refuses it there), and everywhere else it is correct but twice as slow (so
the latency gate, which compares it with the devices still on v2, refuses it too).
"""

from __future__ import annotations

import getpass
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from shared.bundle import build_bundle, inspect_bundle, write_signed_copy
from shared.cli.common import console
from shared.errors import UsageError
from shared.keystore import KeyStore
from shared.trust import sign_release
from simulators.hardware import DEFAULT_PROFILES, parse_profiles
from simulators.virtual import Simulation, SimulationOptions, parse_faults

__all__ = ["DemoOptions", "make_releases", "run_broker", "run_demo", "run_fleet"]

VERSIONS = ("1.0.0", "2.0.0", "3.0.0")
# How v3 misbehaves on the simulated hardware (see the module docstring).
BAD_V3 = "wrong-output:version=3.0.0:class=arm-npu,slow:version=3.0.0:factor=2"
ADMIN_TOKEN_ENV = "EDGEFLEET_ADMIN_TOKEN"  # noqa: S105 - the variable name, not a secret


@dataclass
class DemoOptions:
    work_dir: Path
    devices: int = 12
    headless: bool = False
    as_json: bool = False
    port: int = 8080
    timeout_s: float = 300.0


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


@contextmanager
def run_broker(work: Path) -> Iterator[tuple[int, Path]]:
    """A TLS mosquitto with per-device ACLs for a fleet under ``work``; yields (port, CA file)."""
    from fleet.broker_config import BrokerConfig, write_broker_config
    from fleet.pki import DeviceCA

    executable = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
    )
    if executable is None:
        raise UsageError(
            "mosquitto is not installed: install it (apt-get install mosquitto) "
            "or run scripts/services.sh --broker-only"
        )
    ca = DeviceCA(work / "fleet" / "pki")
    server_cert, server_key = ca.issue_server(["127.0.0.1", "localhost"], work / "broker")
    port = _free_port()
    (work / "broker" / "db").mkdir(parents=True, exist_ok=True)
    cfg = BrokerConfig(
        cafile=ca.cert_path,
        certfile=server_cert,
        keyfile=server_key,
        port=port,
        bind_address="127.0.0.1",
        persistence_dir=work / "broker" / "db",
        run_as_user=getpass.getuser(),
    )
    paths = write_broker_config(work / "broker", cfg)
    log = (work / "broker" / "mosquitto.log").open("wb")
    process = subprocess.Popen(
        [executable, "-c", str(paths["conf"])], stdout=log, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        else:
            raise UsageError(f"mosquitto did not start; see {work / 'broker' / 'mosquitto.log'}")
        yield port, ca.cert_path
    finally:
        process.terminate()
        process.wait(10)
        log.close()


@contextmanager
def run_fleet(
    work: Path,
    keys: Path,
    broker_port: int,
    ca: Path,
    port: int,
    *,
    database_url: str | None = None,
) -> Iterator[str]:
    """The fleet service in this process (SQLite under ``work`` by default); yields its URL."""
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
        max_message_bytes=256 * 1024,
    )
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.1)
    if not server.started:
        raise UsageError(f"the fleet service did not start on port {port} (in use?)")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)


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
    stages: list[float],
    progress: Progress | None,
    timeout: float,
) -> dict[str, Any]:
    body = {
        "model": "cnn",
        "version": version,
        "stages": stages,
        "soak_s": 2.0,
        "max_failure_rate": 0.0,
        "revert_on_fail": True,
        "device_timeout_s": 120,
        # The first release has no control group to compare latency with.
        "gates": {
            "min_sample": 1,
            "max_p95_ratio": None if version == VERSIONS[0] else 1.5,
            "max_error_rate": None,
        },
    }
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
        return doc if doc["state"] in ("completed", "halted", "aborted") else None

    return _wait(settled, timeout, f"rollout {version}")


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
    }


def run_demo(options: DemoOptions) -> dict[str, Any]:
    work = options.work_dir
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    say = (lambda msg: None) if options.as_json else console.print
    say("[bold]edgefleet demo[/]: building the example model and three signed releases")
    keys = make_releases(work)
    os.environ.setdefault(ADMIN_TOKEN_ENV, "demo-admin-" + os.urandom(8).hex())
    with run_broker(work) as (broker_port, ca):
        say(f"broker: mosquitto with TLS and per-device ACLs on 127.0.0.1:{broker_port}")
        with run_fleet(work, keys, broker_port, ca, options.port) as url:
            say(
                f"fleet service: console at {url}/ (API docs at {url}/docs); "
                f"log in with the admin token {os.environ[ADMIN_TOKEN_ENV]}"
            )
            client = httpx.Client(
                base_url=url,
                timeout=60,
                headers={"Authorization": f"Bearer {os.environ[ADMIN_TOKEN_ENV]}"},
            )
            for version in VERSIONS:
                bundle = work / "releases" / f"cnn-{version}.bundle"
                client.post("/api/v1/releases", content=bundle.read_bytes()).raise_for_status()
            sim = Simulation(
                SimulationOptions(
                    fleet_url=url,
                    token=os.environ[ADMIN_TOKEN_ENV],
                    broker=f"mqtts://127.0.0.1:{broker_port}",
                    devices=options.devices,
                    work_dir=work / "devices",
                    profiles=parse_profiles(DEFAULT_PROFILES),
                    model_faults=parse_faults(BAD_V3)[0],
                    prefix="demo",
                    probation_s=2.0,
                    telemetry_interval_s=1.0,
                    infer_interval_s=0.5,
                )
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
                with Progress(
                    TextColumn("{task.description}"),
                    BarColumn(),
                    TextColumn("{task.completed}/{task.total}"),
                    TimeElapsedColumn(),
                    console=console,
                    disable=options.headless or options.as_json,
                ) as progress:
                    docs = [
                        _rollout(client, "1.0.0", [100], progress, options.timeout_s),
                        _rollout(client, "2.0.0", [34, 100], progress, options.timeout_s),
                        _rollout(client, "3.0.0", [34, 100], progress, options.timeout_s),
                    ]
                events = [
                    e for d in devices for e in client.get(f"/api/v1/devices/{d}").json()["events"]
                ]
                summary = {
                    "devices": len(devices),
                    "fleet_url": url,
                    "rollouts": [_summary(doc, events) for doc in docs],
                    "device_versions": dict(
                        Counter(
                            (s["models"].get("cnn") or {}).get("version") or "none"
                            for s in sim.states()
                        )
                    ),
                }
                for r in summary["rollouts"]:
                    say(
                        f"  {r['version']}: {r['state']} after {r['stages_reached']} stage(s); "
                        f"{r['devices_updated']} updated, failed {r['devices_failed'] or 'none'}, "
                        f"{r['ever_ran']} ever ran it"
                    )
                if not (options.headless or options.as_json):
                    say(f"running: console at {url}/ , API docs at {url}/docs  (Ctrl-C to stop)")
                    stop = threading.Event()
                    signal.signal(signal.SIGINT, lambda *_: stop.set())
                    stop.wait()
                return summary
            finally:
                sim.stop()
                client.close()
