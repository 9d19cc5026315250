"""Benchmark: a staged rollout of a 5 MB bundle to 1,000 virtual devices on this machine.

One command::

    .venv/bin/python bench/fleet_rollout.py [--devices 1000] [--bundle-mb 5] \
        [--db sqlite|postgresql]

Set-up (all on this machine, loopback, real parts):

- The model: the small example CNN made wider (512 channels in its last conv block and as many
  output classes as it takes) so that its ONNX file, with its test vectors, makes a bundle of
  ``--bundle-mb`` MB. Every weight is used by every inference, and the devices self-test it
  with ONNX Runtime like any other model. v1 and v2 are drawn from different seeds, so no chunk
  of v2 can be copied from v1: every device pulls the whole v2 bundle.
- The broker: mosquitto with TLS and per-device ACLs (:func:`simulators.demo.run_broker`).
- The fleet service (:func:`simulators.demo.run_fleet`) in a child process of its own, on SQLite
  (default) or on a fresh PostgreSQL database on 127.0.0.1:5432 (``--db postgresql``).
- The devices: one :class:`simulators.virtual.Simulation` in this process, ``--devices`` virtual
  devices, each running the real agent (transfer, verify, install, self-test, probation,
  telemetry) with its own TLS connection and data directory.

Measured:

- **memory per virtual device**: the resident set of this process (which holds nothing but the
  simulation) after every device is online, minus before the simulation was created, divided by
  the devices; also the threads per device;
- **start**: enrolling the devices and switching them on until the fleet lists all of them
  online;
- **v1 to all** (one stage, the devices' first install; timed but not the goal);
- **idle**: then, for 10 s, the simulation's CPU while the devices only report telemetry, serve
  their applications' inferences and wait for orders, per device-second: what a rollout's
  transfers have to share the machine with;
- **the staged rollout of v2** (``--stages``, default 1,10,50,100 with a ``--soak`` of 2 s, and
  the API's default of 100 devices in flight: with 1,000 at once, each asking for 8 chunks, the
  fleet's fetch queue holds 2 GB and the devices' 10 s request time-outs fire and ask again):
  from the ``POST /api/v1/rollouts`` to the rollout's ``completed`` state. Per stage, polled
  every 0.2 s from outside: when it started, when its devices had all succeeded, and when its
  gate passed (the next stage started);
- during the staged rollout: the CPU of the simulation, the fleet service and the broker, and
  how busy the machine's cores were (near 100%: the rollout is CPU-bound); and the fleet
  service's peak memory over the whole run;
- **each device's phases**: from the deployment events of 200 devices, p50 and p90 of the time
  from the order's arrival to the download, the download, the checks, the self-test and the
  probation (a device holds one of the in-flight slots for all of it);
- **the raw limit**, measured in the same run before the devices start: the same bytes the fleet
  sends for the v2 rollout (``--devices`` x the bundle, in the same 256 KiB frames) published by
  one plain paho client over the broker's TLS listener to ``--raw-subscribers`` plain paho
  subscribers (device identities) in a child process, QoS 1, from the first publish to the
  last message received. The fleet serves every chunk from one connection of one process, so
  this is the fastest the same broker and TLS could carry the rollout's bytes that way;
- ``--sim-nice`` runs the simulation processes at a lower priority than the fleet service and
  the broker (default 0: the same). At 10 the rollout took twice as long: the fleet answered
  faster than the starved devices could take the bytes in, their requests timed out and were
  sent again, and the simulation spent twice the CPU;
- the result is checked from the devices' own data directories
  (:meth:`simulators.virtual.Simulation.states`): every device must run v2.

Goal (from the issue): the staged rollout of v2 to 1,000 devices in <= 120 s. The exit status is
0 whether or not the goal is met: this is a measurement.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import common  # noqa: E402 - after the repository is on sys.path

MB = 1_000_000
CHUNK_SIZE = 256 * 1024  # the production chunk size (shared.bundle.DEFAULT_CHUNK_SIZE)
FRAME_BYTES = CHUNK_SIZE  # what the fleet sends per message: one chunk (its 1 MiB default limit)
TIME_GOAL_S = 120.0
POLL_S = 0.2
IDLE_S = 10.0  # after v1: the simulation's CPU with nothing to install (telemetry, inference)
MODEL = "cnn"
V1, V2 = "1.0.0", "2.0.0"
TOKEN_ENV = "EDGEFLEET_ADMIN_TOKEN"
PG_SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432"


# -- the model and its releases ------------------------------------------------------------------


def write_model(out: Path, *, bundle_bytes: int, seed: int) -> dict[str, Any]:
    """A wide variant of the small example CNN whose files add up to about ``bundle_bytes``."""
    import numpy as np

    from shared.example_models import SIZES
    from shared.example_models.onnx_format import write_onnx
    from shared.example_models.spec import forward, make_weights
    from shared.example_models.writer import MAX_ABS_ERR

    small = SIZES["small"]
    channels = (small.conv_channels[0], 512)
    conv_floats = 9 * (small.channels * channels[0] + channels[0] * channels[1])
    vector_bytes = 4 * 4 * small.height * small.width * small.channels
    # Each class adds a row of dense weights, a bias, and one output per test vector.
    classes = max(10, (bundle_bytes - vector_bytes - 4 * conv_floats) // (4 * (channels[1] + 5)))
    spec = type(small)(
        name="example-cnn-wide",
        height=small.height,
        width=small.width,
        conv_channels=channels,
        num_classes=int(classes),
    )
    weights = make_weights(spec, seed)
    write_onnx(spec, weights, out / "onnx" / "model.onnx")
    rng = np.random.default_rng(seed + 1)
    inputs = rng.uniform(-1.0, 1.0, size=(4, *spec.input_shape)).astype(np.float32)
    (out / "vectors").mkdir(parents=True, exist_ok=True)
    np.save(out / "vectors" / "input.npy", inputs, allow_pickle=False)
    np.save(out / "vectors" / "output.npy", forward(spec, weights, inputs), allow_pickle=False)
    (out / "labels.txt").write_text("".join(f"class_{i}\n" for i in range(spec.num_classes)))
    manifest = {
        "name": spec.name,
        "description": (
            f"The small example CNN, wider: {list(spec.conv_channels)} conv channels, "
            f"{spec.num_classes} logits. Random weights (seed {seed})."
        ),
        "inputs": [
            {
                "name": "input",
                "dtype": "float32",
                "shape": [-1, *spec.input_shape],
                "layout": "NHWC",
            }
        ],
        "outputs": [{"name": "output", "dtype": "float32", "shape": [-1, spec.num_classes]}],
        "labels": "labels.txt",
        "artifacts": [{"format": "onnx", "precision": "fp32", "files": ["onnx/model.onnx"]}],
        "test_vectors": {
            "inputs": {"input": "vectors/input.npy"},
            "outputs": {"output": "vectors/output.npy"},
        },
        "accuracy_budget": {"max_abs_err": MAX_ABS_ERR},
        "metadata": {"seed": seed},
    }
    (out / "model.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return {"conv_channels": list(spec.conv_channels), "classes": spec.num_classes}


def make_releases(work: Path, bundle_mb: float) -> tuple[Path, dict[str, Any]]:
    """Keys and the signed v1 and v2 bundles under ``work/releases``."""
    from shared.bundle import build_bundle, inspect_bundle, write_signed_copy
    from shared.keystore import KeyStore
    from shared.trust import sign_release

    now = datetime.now(UTC)
    keys = KeyStore.create(work / "keys", now=now)
    info: dict[str, Any] = {}
    for seed, version in enumerate((V1, V2), 1):
        model = work / "models" / version
        info["model"] = write_model(model, bundle_bytes=int(bundle_mb * MB), seed=seed)
        bundle = work / "releases" / f"{MODEL}-{version}.bundle"
        build_bundle(model, name=MODEL, version=version, out=bundle, chunk_size=CHUNK_SIZE)
        _, files = sign_release(keys, inspect_bundle(bundle), expires_in=timedelta(days=1), now=now)
        write_signed_copy(bundle, files)
        info[f"bundle_bytes_{version}"] = bundle.stat().st_size
    return work / "keys", info


# -- the fleet service, in a child process -------------------------------------------------------


def serve_fleet_main(spec: str) -> None:
    """Child process: run the fleet service until stdin closes."""
    from simulators.demo import run_fleet

    args = json.loads(spec)
    with run_fleet(
        Path(args["work"]),
        Path(args["keys"]),
        args["broker_port"],
        Path(args["ca"]),
        args["port"],
        database_url=args["db"],
    ):
        print("ready", flush=True)
        sys.stdin.read()


def start_fleet(work: Path, keys: Path, broker_port: int, ca: Path, db: str | None) -> Any:
    port = common.free_port()
    spec = json.dumps(
        {
            "work": str(work),
            "keys": str(keys),
            "broker_port": broker_port,
            "ca": str(ca),
            "port": port,
            "db": db,
        }
    )
    child = subprocess.Popen(
        [sys.executable, __file__, "--serve-fleet", spec],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    if child.stdout.readline().strip() != "ready":
        child.kill()
        raise SystemExit("the fleet service did not start")
    child.url = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
    return child


def stop_fleet(child: Any) -> None:
    if child.poll() is None:
        child.stdin.close()
        try:
            child.wait(30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait(10)


# -- the raw limit: the same bytes through the same broker, plain paho ---------------------------


RAW_STALL_S = 30.0  # the raw subscribers give up after this long without a message


def raw_subscriber_main(spec: str) -> None:
    """Child process: one paho client per identity, each counting the messages it expects."""
    import paho.mqtt.client as paho

    args = json.loads(spec)
    done = threading.Event()
    remaining = [len(args["identities"]) * args["messages"]]
    lock = threading.Lock()
    last = [0.0]
    clients = []
    ready = threading.Barrier(len(args["identities"]) + 1)

    def on_message(client: Any, userdata: Any, msg: Any) -> None:
        with lock:
            remaining[0] -= 1
            last[0] = time.monotonic()
            if remaining[0] == 0:
                done.set()

    for identity in args["identities"]:
        client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=identity["id"])
        client.tls_set(ca_certs=args["ca"], certfile=identity["cert"], keyfile=identity["key"])

        def on_subscribe(*_: Any, topic: str = identity["topic"]) -> None:
            ready.wait()

        client.on_message = on_message
        client.on_connect = lambda c, u, f, rc, p, t=identity["topic"]: c.subscribe(t, qos=1)
        client.on_subscribe = on_subscribe
        client.connect("127.0.0.1", args["port"])
        client.loop_start()
        clients.append(client)
    ready.wait()
    print("ready", flush=True)
    # The broker drops what overflows a subscriber's queue: stop once nothing came for a while.
    seen = remaining[0]
    while not done.wait(RAW_STALL_S):
        if remaining[0] == seen:
            break
        seen = remaining[0]
    print(json.dumps({"last_received": last[0], "missing": remaining[0]}), flush=True)
    for client in clients:
        client.disconnect()
        client.loop_stop()


def measure_raw(
    work: Path, port: int, ca: Path, total_bytes: int, subscribers: int
) -> dict[str, Any]:
    """Publish ``total_bytes`` in fleet-sized frames to ``subscribers`` identities (see above)."""
    import paho.mqtt.client as paho

    from fleet.pki import DeviceCA
    from shared.protocol import DOWN_FETCH, device_topic

    pki = DeviceCA(work / "fleet" / "pki")
    creds_dir = work / "raw"
    creds_dir.mkdir(parents=True, exist_ok=True)

    def identity(name: str) -> dict[str, str]:
        issued = pki.issue(name)
        cert, key = creds_dir / f"{name}.pem", creds_dir / f"{name}-key.pem"
        cert.write_bytes(issued.cert_pem)
        key.write_bytes(issued.key_pem)
        key.chmod(0o600)
        return {"id": name, "cert": str(cert), "key": str(key)}

    subs = [identity(f"raw-{i:03d}") for i in range(subscribers)]
    for sub in subs:
        sub["topic"] = device_topic(sub["id"], DOWN_FETCH)
    messages = max(1, total_bytes // FRAME_BYTES // subscribers)
    child = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--raw-subscriber",
            json.dumps({"port": port, "ca": str(ca), "identities": subs, "messages": messages}),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    # The fleet's identity may publish to every device's down topics (the broker's ACL). The
    # broker replaces client ids with the certificate's CN, so this runs before the fleet starts.
    fleet = identity("fleet-svc")
    publisher = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="fleet-svc")
    publisher.tls_set(ca_certs=str(ca), certfile=fleet["cert"], keyfile=fleet["key"])
    publisher.max_inflight_messages_set(20)
    publisher.max_queued_messages_set(0)
    publisher.connect("127.0.0.1", port)
    publisher.loop_start()
    try:
        if child.stdout.readline().strip() != "ready":
            raise SystemExit("the raw subscribers did not start")
        payload = os.urandom(FRAME_BYTES)
        started = time.monotonic()
        infos = []
        for _ in range(messages):
            for sub in subs:
                infos.append(publisher.publish(sub["topic"], payload, qos=1))
        for info in infos:
            info.wait_for_publish(600)
        result = json.loads(child.stdout.readline())
    finally:
        publisher.disconnect()
        publisher.loop_stop()
        child.wait(30)
    seconds = result["last_received"] - started
    sent = messages * subscribers * FRAME_BYTES
    return {
        "bytes": sent,
        "frames": messages * subscribers,
        "subscribers": subscribers,
        "seconds": round(seconds, 2),
        "mb_per_s": round(sent / MB / seconds, 1),
        "missing": result["missing"],
    }


# -- the fleet, seen through its API -------------------------------------------------------------


def list_devices(client: Any, query: str = "") -> list[dict[str, Any]]:
    """The fleet's device list (``query``: its filters), following its pages."""
    devices, url = [], f"/api/v1/devices?limit=1000{query}"
    while url:
        response = client.get(url)
        response.raise_for_status()
        devices += response.json()
        url = response.links.get("next", {}).get("url", "")
    return devices


def count_online(client: Any) -> int:
    return len(list_devices(client, "&online=true"))


def wait_for(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(POLL_S)
    raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")


def run_rollout(
    client: Any, version: str, stages: list[float], opts: argparse.Namespace, log: Any
) -> dict[str, Any]:
    """Create a rollout and poll it to the end; per stage: started, devices done, gate passed."""
    body = {
        "model": MODEL,
        "version": version,
        "stages": stages,
        "soak_s": opts.soak,
        "max_failure_rate": opts.max_failure_rate,
        "max_in_flight": opts.max_in_flight,
        "revert_on_fail": True,
        "device_timeout_s": 300,
        # The first release has no control group to compare latency with.
        "gates": {
            "min_sample": 1,
            "max_p95_ratio": None if version == V1 else 1.5,
            "max_error_rate": None,
        },
    }
    started = time.monotonic()
    response = client.post("/api/v1/rollouts", json=body)
    if response.status_code != 201:
        raise SystemExit(f"rollout of {version} refused: {response.text}")
    rollout_id = response.json()["id"]
    marks: list[dict[str, float]] = [{} for _ in stages]
    last_log = 0.0
    while True:
        doc = client.get(f"/api/v1/rollouts/{rollout_id}").json()
        now = time.monotonic() - started
        for stage in doc["stages"]:
            mark = marks[stage["index"]]
            if stage["state"] != "pending":
                mark.setdefault("started_s", now)
            counts = stage["counts"]
            if stage["devices"] and counts["succeeded"] == stage["devices"]:
                mark.setdefault("devices_done_s", now)
            if stage["state"] == "passed":
                mark.setdefault("passed_s", now)
        if now - last_log >= 10:
            last_log = now
            log(f"  {version}: {doc['state']}, stage {doc['stage']}, devices {doc['devices']}")
        if doc["state"] in ("completed", "halted", "aborted"):
            break
        if now > opts.timeout:
            log(f"  {version}: gave up after {now:.0f} s")
            break
        time.sleep(POLL_S)
    seconds = time.monotonic() - started
    per_stage = []
    previous_end = 0.0
    for stage, mark in zip(doc["stages"], marks, strict=True):
        end = mark.get("passed_s", seconds)
        per_stage.append(
            {
                "percent": stage["percent"],
                "devices": stage["devices"],
                "started_s": round(mark.get("started_s", previous_end), 2),
                "devices_done_s": round(mark["devices_done_s"], 2)
                if "devices_done_s" in mark
                else None,
                "passed_s": round(end, 2),
                "stage_s": round(end - mark.get("started_s", previous_end), 2),
            }
        )
        previous_end = end
    return {
        "version": version,
        "state": doc["state"],
        "seconds": round(seconds, 2),
        "devices": doc["devices"],
        "failures": doc["failures"],
        "decisions": [
            {"stage": d["stage"], "verdict": d["verdict"], "reason": d["reason"]}
            for d in doc["decisions"]
        ],
        "stages": per_stage,
    }


PHASES = ("received", "downloading", "downloaded", "self_test", "activated", "committed")


def phase_times(client: Any, version: str, sample: int = 200) -> dict[str, Any]:
    """How long a device's deployment of ``version`` spends between its reported phases, from
    the events of up to ``sample`` devices (every device runs on this machine's clock).

    A device holds one of the rollout's in-flight slots from its order to ``committed``; this
    says which part of that time is the download, the checks and self-test, or probation.
    """
    ids = [d["id"] for d in list_devices(client)]
    step = max(1, len(ids) // sample)
    gaps: dict[str, list[float]] = {}
    for device_id in ids[::step][:sample]:
        events = client.get(f"/api/v1/devices/{device_id}").json()["events"]
        when = {
            e["phase"]: datetime.fromisoformat(e["time"])
            for e in events
            if e["version"] == version and e["phase"] in PHASES
        }
        for a, b in itertools.pairwise(PHASES):
            if a in when and b in when:
                gaps.setdefault(f"{a}->{b}", []).append((when[b] - when[a]).total_seconds())
        if "received" in when and "committed" in when:
            total = (when["committed"] - when["received"]).total_seconds()
            gaps.setdefault("received->committed", []).append(total)

    def summary(values: list[float]) -> dict[str, float]:
        values = sorted(values)
        return {
            "p50": round(values[len(values) // 2], 2),
            "p90": round(values[min(len(values) - 1, int(len(values) * 0.9))], 2),
        }

    return {"devices": len(ids[::step][:sample]), **{k: summary(v) for k, v in gaps.items()}}


def fetched_bytes(client: Any) -> float:
    """``edgefleet_fetch_bytes_total`` from the fleet's Prometheus endpoint."""
    text = client.get("/metrics").text
    for line in text.splitlines():
        if line.startswith("edgefleet_fetch_bytes_total "):
            return float(line.split()[1])
    return 0.0


# -- the simulation processes --------------------------------------------------------------------


class SimProcesses:
    """``edgefleet sim run`` children, at most ``per_process`` devices each (paho's select()
    stops at file descriptor 1,024, and each device holds three)."""

    def __init__(
        self, opts: argparse.Namespace, url: str, broker: str, work: Path, token: str
    ) -> None:
        count = -(-opts.devices // opts.per_process)
        sizes = [
            opts.devices // count + (1 if i < opts.devices % count else 0) for i in range(count)
        ]
        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        self.children = []
        for index, size in enumerate(sizes):
            out = (work / f"sim-{index}.log").open("wb")
            self.children.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "shared.cli.main",
                        "sim",
                        "run",
                        "--fleet",
                        url,
                        "--broker",
                        broker,
                        "--devices",
                        str(size),
                        "--prefix",
                        f"sim{index}",
                        "--work-dir",
                        str(work / f"p{index}"),
                        "--probation",
                        f"{max(1, round(opts.probation))}s",
                        "--telemetry",
                        f"{max(1, round(opts.telemetry))}s",
                        "--infer-every",
                        str(opts.infer),
                    ],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, "EDGEFLEET_TOKEN": token},
                    preexec_fn=functools.partial(os.nice, opts.sim_nice),  # noqa: PLW1509
                )
            )

    def rss_bytes(self) -> int:
        total = 0
        for child in self.children:
            with open(f"/proc/{child.pid}/statm", encoding="ascii") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        return total

    def threads(self) -> int:
        return sum(len(os.listdir(f"/proc/{c.pid}/task")) for c in self.children)

    def cpu_seconds(self) -> float:
        return sum(process_cpu_seconds(child.pid) for child in self.children)

    def states(self) -> list[dict[str, Any]]:
        from agent.status import read_status
        from shared.errors import UsageError

        states = []
        for data in sorted(self.work.glob("p*/*/data")):
            try:
                states.append(read_status(data))
            except UsageError:  # a device that never started has no state yet
                states.append({"device_id": data.parent.name, "models": {}})
        return states

    def stop(self) -> None:
        for child in self.children:
            child.send_signal(signal.SIGTERM)
        for child in self.children:
            try:
                child.wait(120)
            except subprocess.TimeoutExpired:
                child.kill()


# -- this process ---------------------------------------------------------------------------------


def measure_idle(sim_cpu: Any, devices: int, seconds: float) -> dict[str, float]:
    """The simulation's CPU while its devices only report, serve and wait for orders."""
    cpu_before, started = sim_cpu(), time.monotonic()
    time.sleep(seconds)
    cpu, wall = sim_cpu() - cpu_before, time.monotonic() - started
    return {
        "seconds": round(wall, 1),
        "cpu_s": round(cpu, 2),
        "cores": round(cpu / wall, 3),
        "ms_per_device_second": round(1000 * cpu / wall / devices, 3),
    }


def rss_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU of another process so far (Linux ``/proc/PID/stat``)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def child_pid(name: str) -> int | None:
    """The pid of this process's child whose command name is ``name`` (e.g. the broker)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text(encoding="ascii")
        except OSError:  # it ended while we looked
            continue
        comm, rest = text[text.index("(") + 1 : text.rindex(")")], text.rsplit(")", 1)[1].split()
        if comm == name and int(rest[1]) == os.getpid():
            return int(stat.parent.name)
    return None


def peak_rss_mb(pid: int) -> float:
    """The most memory another process has held at once (``VmHWM``), in MB."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) * 1024 / MB, 1)
    return 0.0


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, all cores (``/proc/stat``)."""
    with open("/proc/stat", encoding="ascii") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user
    return (total - idle) / os.sysconf("SC_CLK_TCK"), total / os.sysconf("SC_CLK_TCK")


# -- the benchmark --------------------------------------------------------------------------------


def create_database() -> tuple[str, Any]:
    from sqlalchemy import create_engine, text

    name = f"edgefleet_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_SERVER + "/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    return f"{PG_SERVER}/{name}", drop


def run_benchmark(opts: argparse.Namespace, log: Any) -> dict[str, Any]:
    import httpx

    from simulators.demo import run_broker
    from simulators.hardware import DEFAULT_PROFILES, parse_profiles
    from simulators.virtual import Simulation, SimulationOptions

    stages = [float(s) for s in opts.stages.split(",")]
    work = Path(tempfile.mkdtemp(prefix="edgefleet-bench-rollout-"))
    token = "bench-admin-" + os.urandom(8).hex()
    os.environ[TOKEN_ENV] = token
    db_url, drop_db = create_database() if opts.db == "postgresql" else (None, None)
    report: dict[str, Any] = {
        "benchmark": "fleet_rollout",
        "command": shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv])),
        "machine": machine_info(),
        "database": "PostgreSQL (fresh database)" if db_url else "SQLite",
        "devices": opts.devices,
        "stages": stages,
        "soak_s": opts.soak,
        "max_in_flight": opts.max_in_flight,
        "sim_nice": opts.sim_nice if opts.per_process else None,
    }
    fleet = None
    try:
        log(f"building the {opts.bundle_mb:g} MB model and signing v1 and v2...")
        keys, report["release"] = make_releases(work, opts.bundle_mb)
        bundle_bytes = report["release"][f"bundle_bytes_{V2}"]
        with run_broker(work) as (broker_port, ca):
            log(f"raw limit: {opts.devices} x {bundle_bytes / MB:.1f} MB through the broker...")
            report["raw"] = (
                measure_raw(
                    work, broker_port, ca, opts.devices * bundle_bytes, opts.raw_subscribers
                )
                if opts.raw_subscribers
                else None
            )
            log(f"  {report['raw']}")
            fleet = start_fleet(work, keys, broker_port, ca, db_url)
            client = httpx.Client(
                base_url=fleet.url, timeout=120, headers={"Authorization": f"Bearer {token}"}
            )
            for version in (V1, V2):
                bundle = work / "releases" / f"{MODEL}-{version}.bundle"
                client.post("/api/v1/releases", content=bundle.read_bytes()).raise_for_status()
            rss_before, threads_before = rss_bytes(), threading.active_count()
            if opts.per_process:
                sim: Any = SimProcesses(
                    opts, fleet.url, f"mqtts://127.0.0.1:{broker_port}", work / "devices", token
                )
            else:
                sim = Simulation(
                    SimulationOptions(
                        fleet_url=fleet.url,
                        token=token,
                        broker=f"mqtts://127.0.0.1:{broker_port}",
                        devices=opts.devices,
                        work_dir=work / "devices",
                        profiles=parse_profiles(DEFAULT_PROFILES),
                        probation_s=opts.probation,
                        telemetry_interval_s=opts.telemetry,
                        infer_interval_s=opts.infer,
                        start_rate=opts.start_rate,
                    )
                )
            try:
                log(f"starting {opts.devices} virtual devices...")
                started = time.monotonic()
                if not opts.per_process:
                    sim.start()
                switched_on = time.monotonic() - started
                wait_for(
                    lambda: count_online(client) == opts.devices, 600, "the devices to be online"
                )
                online = time.monotonic() - started
                if opts.per_process:  # the devices live in the children: count theirs
                    rss_before, threads_before = 0, 0
                    rss_after, threads_after = sim.rss_bytes(), sim.threads()
                else:
                    rss_after, threads_after = rss_bytes(), threading.active_count()
                report["start"] = {
                    "switched_on_s": round(switched_on, 2),
                    "all_online_s": round(online, 2),
                    "rss_before_mb": round(rss_before / MB, 1),
                    "rss_after_mb": round(rss_after / MB, 1),
                    "mb_per_device": round((rss_after - rss_before) / MB / opts.devices, 3),
                    "threads_per_device": round((threads_after - threads_before) / opts.devices, 2),
                }
                log(f"  {report['start']}")
                log("v1 to all devices (one stage; the devices' first install)...")
                report["v1"] = run_rollout(client, V1, [100.0], opts, log)
                log(f"  v1: {report['v1']['state']} in {report['v1']['seconds']} s")
                sim_cpu = sim.cpu_seconds if opts.per_process else cpu_seconds
                report["idle"] = measure_idle(sim_cpu, opts.devices, IDLE_S)
                log(f"  idle: {report['idle']}")
                log(f"v2, staged {opts.stages}, soak {opts.soak:g} s...")
                bytes_before, cpu_before = fetched_bytes(client), sim_cpu()
                fleet_cpu_before = process_cpu_seconds(fleet.pid)
                broker_pid = child_pid("mosquitto")
                broker_cpu_before = process_cpu_seconds(broker_pid) if broker_pid else 0.0
                machine_before = machine_cpu()
                report["v2"] = run_rollout(client, V2, stages, opts, log)
                machine_after = machine_cpu()
                report["v2"]["fleet_sent_mb"] = round(
                    (fetched_bytes(client) - bytes_before) / MB, 1
                )
                report["v2"]["simulation_cpu_s"] = round(sim_cpu() - cpu_before, 1)
                report["v2"]["fleet_cpu_s"] = round(
                    process_cpu_seconds(fleet.pid) - fleet_cpu_before, 1
                )
                report["v2"]["broker_cpu_s"] = (
                    round(process_cpu_seconds(broker_pid) - broker_cpu_before, 1)
                    if broker_pid
                    else None
                )
                report["v2"]["fleet_peak_rss_mb"] = peak_rss_mb(fleet.pid)
                # How much of the machine's CPU was in use: near 1, the rollout is CPU-bound.
                busy, total = (a - b for a, b in zip(machine_after, machine_before, strict=True))
                report["v2"]["machine_busy"] = round(busy / total, 3) if total else None
                log(f"  v2: {report['v2']['state']} in {report['v2']['seconds']} s")
                report["v2"]["phases_s"] = phase_times(client, V2)
                versions = Counter(
                    (s["models"].get(MODEL) or {}).get("version") or "none" for s in sim.states()
                )
                report["device_versions"] = dict(versions)
            finally:
                log("stopping the devices...")
                sim.stop()
                client.close()
                stop_fleet(fleet)
    finally:
        if fleet is not None:
            stop_fleet(fleet)
        if drop_db is not None:
            drop_db()
        shutil.rmtree(work, ignore_errors=True)
    v2 = report["v2"]
    report["goal_s"] = TIME_GOAL_S
    report["goal_met"] = (
        v2["state"] == "completed"
        and report["device_versions"].get(V2) == opts.devices
        and v2["seconds"] <= TIME_GOAL_S
    )
    if report["raw"]:
        report["v2_vs_raw"] = round(report["raw"]["seconds"] / v2["seconds"], 3)
    return report


def machine_info() -> dict[str, Any]:
    import onnxruntime
    import paho.mqtt

    from bench.transfer import mosquitto_version

    return common.machine_info(
        mosquitto=mosquitto_version(),
        paho_mqtt=paho.mqtt.__version__,
        onnxruntime=onnxruntime.__version__,
    )


def _seconds(value: float | None) -> str:
    return "not measured" if value is None else f"{value} s"


def _share(value: float | None) -> str:
    return "(not measured)" if value is None else f"{value:.0%}"


def print_report(report: dict[str, Any]) -> None:
    m, start, raw, v1, v2 = (report[k] for k in ("machine", "start", "raw", "v1", "v2"))
    print(f"command: {report['command']}")
    print(
        f"machine: {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), Python "
        f"{m['python']}, {m['mosquitto']}, paho-mqtt {m['paho_mqtt']}, onnxruntime "
        f"{m['onnxruntime']}, {m['os']}"
    )
    rel = report["release"]
    print(
        f"fleet: {report['devices']} virtual devices, {report['database']}; bundle "
        f"{rel[f'bundle_bytes_{V2}'] / MB:.2f} MB (model {rel['model']})"
    )
    print(
        f"start: all switched on in {start['switched_on_s']} s, all online in "
        f"{start['all_online_s']} s; memory {start['mb_per_device'] * 1000:.0f} kB per device "
        f"(RSS {start['rss_before_mb']} -> {start['rss_after_mb']} MB), "
        f"{start['threads_per_device']} threads per device"
    )
    print(f"v1 to all (one stage, first install): {v1['state']} in {v1['seconds']} s")
    idle = report["idle"]
    print(
        f"idle for {idle['seconds']} s: the simulation used {idle['cores']} cores, "
        f"{idle['ms_per_device_second']} ms of CPU per device-second"
    )
    print(
        f"v2 staged {report['stages']} soak {report['soak_s']:g} s, max in flight "
        f"{report['max_in_flight']}: {v2['state']} in {v2['seconds']} s; fleet sent "
        f"{v2['fleet_sent_mb']} MB; simulation CPU {v2['simulation_cpu_s']} s, "
        f"fleet service CPU {v2['fleet_cpu_s']} s (peak memory {v2['fleet_peak_rss_mb']} MB), "
        f"broker CPU {_seconds(v2['broker_cpu_s'])}; "
        f"the machine's cores were {_share(v2['machine_busy'])} busy"
    )
    phases = v2["phases_s"]
    print(
        f"  per device (p50 / p90 s, {phases['devices']} devices): "
        + ", ".join(f"{k} {v['p50']} / {v['p90']}" for k, v in phases.items() if k != "devices")
    )
    print(f"  {'stage':>6} {'devices':>8} {'started':>8} {'all done':>9} {'passed':>8} {'took':>7}")
    for s in v2["stages"]:
        done = f"{s['devices_done_s']:.1f}" if s["devices_done_s"] is not None else "-"
        print(
            f"  {s['percent']:>5g}% {s['devices']:>8} {s['started_s']:>8.1f} {done:>9} "
            f"{s['passed_s']:>8.1f} {s['stage_s']:>7.1f}"
        )
    if v2["failures"] or v2["state"] != "completed":
        print(f"  failures: {v2['failures']}; decisions: {v2['decisions']}")
    if raw is None:
        print("raw limit: not measured (--raw-subscribers 0)")
    else:
        print(
            f"raw limit: {raw['bytes'] / MB:.0f} MB in {raw['frames']} frames, one paho publisher "
            f"-> {raw['subscribers']} paho subscribers over TLS: {raw['seconds']} s "
            f"({raw['mb_per_s']} MB/s); raw / rollout = {report['v2_vs_raw']}"
        )
        if raw["missing"]:
            print(f"  the broker dropped {raw['missing']} frames (a subscriber's queue overflowed)")
    print(f"devices' own data directories: {report['device_versions']}")
    verdict = "MET" if report["goal_met"] else "NOT MET"
    print(f"goal: v2 on all {report['devices']} devices in <= {TIME_GOAL_S:.0f} s: {verdict}")


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--serve-fleet":
        serve_fleet_main(sys.argv[2])
        return
    if len(sys.argv) == 3 and sys.argv[1] == "--raw-subscriber":
        raw_subscriber_main(sys.argv[2])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=1000, help="default 1000")
    parser.add_argument("--bundle-mb", type=float, default=5.0, help="default 5")
    parser.add_argument("--db", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--stages", default="1,10,50,100", help="default 1,10,50,100")
    parser.add_argument("--soak", type=float, default=2.0, help="seconds per stage (default 2)")
    parser.add_argument("--max-in-flight", type=int, default=100, help="default 100")
    parser.add_argument(
        "--max-failure-rate",
        type=float,
        default=0.05,
        help="failed installs a stage tolerates, as the API's default (0.05)",
    )
    parser.add_argument("--probation", type=float, default=2.0, help="seconds (default 2)")
    parser.add_argument("--telemetry", type=float, default=5.0, help="seconds (default 5)")
    parser.add_argument(
        "--infer", type=float, default=5.0, help="seconds between inferences per device (default 5)"
    )
    parser.add_argument("--start-rate", type=float, default=100.0, help="devices per second")
    parser.add_argument(
        "--per-process",
        type=int,
        default=250,
        help="devices per simulation process (default 250; 0: all in this process)",
    )
    parser.add_argument(
        "--sim-nice",
        type=int,
        default=0,
        help="niceness of the simulation processes (default 0; 10 serves the fleet and the "
        "broker first, which measured twice as slow: the devices fall behind and ask again)",
    )
    parser.add_argument(
        "--raw-subscribers", type=int, default=8, help="default 8; 0 skips the raw limit"
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="per rollout (default 600)")
    parser.add_argument("--json", action="store_true", help="print a JSON object instead")
    opts = parser.parse_args()
    # A plain `kill` stops the benchmark through its clean-up (broker, fleet, temp files).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    report = run_benchmark(opts, log)
    if opts.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print_report(report)


if __name__ == "__main__":
    main()
