"""Benchmark: pulling a model bundle over MQTT, against raw paho throughput of the same bytes.

One command::

    .venv/bin/python bench/transfer.py [--size-mb 75] [--repeat 3] [--json]

Set-up (all on this machine, loopback):

- A throw-away PKI (:func:`tests.pki.make_pki`) and one Mosquitto with the production
  configuration (:func:`fleet.broker_config.write_broker_config`: mutual-TLS listener, ACLs,
  ``max_packet_size`` 1 MiB, persistence on) **plus** its development loopback plaintext
  listener (``allow_plaintext_port``). Every figure is measured on both listeners of that one
  broker process: ``tls`` (what devices use) and ``plain``. The production configuration includes
  ``set_tcp_nodelay true``.
- Two signed bundles of a model (the small example CNN as ONNX, plus a ``--size-mb`` MB file of
  random weights), built with the production chunk size (256 KiB). Version 2.0.0 differs from
  1.0.0 in one contiguous region of ``DELTA_SHARE`` (10%) of the weights file, not chunk-aligned.
- Fetches are answered by a responder in this process that does what the fleet service does on
  the wire (like ``tests/integration/fleet_harness.py``): :func:`fleet.distribution.answer_fetch`
  with the production ``max_message`` of 1 MiB (so each 256 KiB chunk is one frame), published
  QoS 1 by a paho client with TCP_NODELAY on its socket (as :class:`shared.mqtt.MqttLink`, which
  the fleet service uses, sets it); orders are signed with :func:`shared.trust.sign_deployment`.

Measured, in interleaved rounds (``--repeat``, median reported), per listener:

- ``raw`` (the limit): one paho client publishes exactly the chunk frames the responder would send
  for the whole v1 payload (same count, same sizes, same bytes, same topic), QoS 1, to one paho
  subscriber in a child process (default paho settings, QoS 1 subscription). Time from the first
  ``publish`` call to the subscriber receiving the last message (CLOCK_MONOTONIC, shared by both
  processes).
- ``agent``: a real, unmodified ``edgefleet agent run`` process with a fresh data directory is
  sent a signed order for v1. Phases are timed from outside: the order, the agent's ``received``,
  ``downloading`` and ``downloaded`` events (their ``time`` field, the agent's wall clock), and a
  1 ms poll of the staging directory's durable record of verified chunks (``.verified``: chunks
  are appended to it in batches, after an ``fdatasync``, every ``FLUSH_BYTES`` or ``FLUSH_S``; its
  last line is written when the last chunk is verified, written and synced; the file is removed
  after the whole-file check). **Transfer** = ``downloading`` event -> last record line: planning
  the chunks, every request, frame, chunk hash, ``pwrite`` and batched sync. **Verify** = last
  line -> record removed (whole-file SHA-256). **Install** = record removed -> ``downloaded``
  (fsync and rename into the store). Throughput is payload bytes over the phase.
- ``delta``: then v2 is ordered on the same agent; the bytes of every chunk frame the responder
  publishes for v2 are counted and compared with the v2 bundle file size.
- ``storage``: the agent's durable chunk writes alone, no network, in a child process: every
  chunk of v1 through :class:`agent.updater.StagedDownload` as the deployer drives it (``write``
  then ``flush(force=False)`` per chunk, ``close``), then the same bytes with one fsync per file
  at the end (the floor for durable writes).

Before each run the benchmark waits (``--max-quiet-wait``) for other processes to use less than
half a core, and every window's CPU use by other processes is reported.

Goals (from the issue): the agent's transfer phase reaches >= 50% of raw paho throughput on the
same listener in the same run; the v2 pull sends <= 20% of the v2 bundle. The exit status is 0
whether or not the goals are met: this is a measurement.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import os
import queue
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import common  # noqa: E402 - after the repository is on sys.path

MIB = 1 << 20
MB = 1_000_000
CHUNK_SIZE = 256 * 1024  # shared.bundle.DEFAULT_CHUNK_SIZE, the production chunk size
MAX_MESSAGE = 1 << 20  # fleet.distribution.answer_fetch's default: one frame per 256 KiB chunk
DELTA_SHARE = 0.10
THROUGHPUT_GOAL = 0.50
DELTA_GOAL = 0.20
DEVICE = "dev-001"
RAW_DEVICE = "dev-002"  # the raw subscriber has its own identity: no session clash with the agent
FLEET = "fleet-svc"
APP = "app-viewer"  # bound to dev-001 in the broker's ACL (inference benchmark)
APP_WIRE = "app-wire"  # a second app identity: client ids are identities, one session each
MODEL = "bench"
TRANSPORTS = ("tls", "plain")
POLL_S = 0.001
QUIET_CORES = 0.5  # other processes' CPU use below which the machine counts as quiet


# -- shared by bench/transfer.py and bench/inference.py ------------------------------------------


def machine_info() -> dict[str, Any]:
    from bench.bundle import machine_info as base

    info = base()
    info["mosquitto"] = mosquitto_version()
    import paho.mqtt

    info["paho_mqtt"] = paho.mqtt.__version__
    return info


def mosquitto_version() -> str:
    exe = find_mosquitto()
    proc = subprocess.run([exe, "-h"], capture_output=True, text=True, check=False)
    first = (proc.stdout or proc.stderr).splitlines()
    return first[0].strip() if first else "unknown"


def find_mosquitto() -> str:
    found = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)),
        None,
    )
    if found is None:
        raise SystemExit("mosquitto (2.0 or newer) is needed: apt-get install mosquitto")
    return found


def proc_status_kib(pid: int | str, field: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def cpu_seconds(pid: int | str) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def system_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, all cores (``/proc/stat``)."""
    with open("/proc/stat", encoding="ascii") as f:
        values = [int(v) for v in f.readline().split()[1:9]]
    idle = values[3] + values[4]  # idle + iowait
    tick = os.sysconf("SC_CLK_TCK")
    return (sum(values) - idle) / tick, sum(values) / tick


def loadavg() -> float:
    with open("/proc/loadavg", encoding="ascii") as f:
        return float(f.read().split()[0])


class Broker:
    """One mosquitto: the production configuration plus the loopback plaintext listener."""

    def __init__(self, root: Path) -> None:
        from fleet.broker_config import BrokerConfig, write_broker_config
        from tests.pki import issue_client, make_pki

        self.pki = make_pki(root / "pki")
        issue_client(self.pki, APP_WIRE)
        (root / "db").mkdir()
        self.ports = {"tls": common.free_port(), "plain": common.free_port()}
        self.cfg = BrokerConfig(
            cafile=self.pki.ca_cert,
            certfile=self.pki.server_cert,
            keyfile=self.pki.server_key,
            crlfile=self.pki.crl,
            port=self.ports["tls"],
            bind_address="127.0.0.1",
            persistence_dir=root / "db",
            allow_plaintext_port=self.ports["plain"],
            run_as_user=getpass.getuser(),
            log_types=("error", "warning"),
        )
        paths = write_broker_config(root, self.cfg, apps={APP: DEVICE, APP_WIRE: DEVICE})
        self.log_path = root / "mosquitto.log"
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [find_mosquitto(), "-c", str(paths["conf"])],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 10
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.log_path.read_text()}")
            try:
                for port in self.ports.values():
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def url(self, transport: str) -> str:
        scheme = "mqtts" if transport == "tls" else "mqtt"
        return f"{scheme}://127.0.0.1:{self.ports[transport]}"

    def spec(self, transport: str, name: str) -> dict[str, Any]:
        """What a client process needs to connect as ``name`` (JSON-friendly)."""
        spec: dict[str, Any] = {"port": self.ports[transport], "name": name, "tls": None}
        if transport == "tls":
            cert, key = self.pki.client(name)
            spec["tls"] = [str(self.pki.ca_cert), str(cert), str(key)]
        return spec

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Client:
    """A paho client (default settings, MQTT 5, clean start) run by paho's own thread."""

    def __init__(self, spec: dict[str, Any]) -> None:
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

        self.messages: queue.Queue[Any] = queue.Queue()
        self.on_message_hook: Any = None
        self._acks: dict[int, Any] = {}
        self._changed = threading.Condition()
        self._connected = threading.Event()
        c = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=spec["name"],
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        if spec["tls"]:
            ca, cert, key = spec["tls"]
            c.tls_set(ca_certs=ca, certfile=cert, keyfile=key)
        else:
            c.username_pw_set(spec["name"])
        c.on_connect = lambda *a: self._connected.set()
        c.on_message = self._on_message
        c.on_subscribe = self._on_ack
        self.paho = c
        c.connect("127.0.0.1", spec["port"], keepalive=30, clean_start=True)
        c.loop_start()
        if not self._connected.wait(10):
            raise RuntimeError(f"{spec['name']}: no CONNACK")

    def _on_message(self, _c: Any, _u: Any, message: Any) -> None:
        if self.on_message_hook is not None:
            self.on_message_hook(message)
        else:
            self.messages.put(message)

    def _on_ack(self, _c: Any, _u: Any, mid: int, *_rest: Any) -> None:
        with self._changed:
            self._acks[mid] = True
            self._changed.notify_all()

    def subscribe(self, topic: str) -> None:
        _, mid = self.paho.subscribe(topic, qos=1)
        with self._changed:
            if not self._changed.wait_for(lambda: mid in self._acks, 10):
                raise RuntimeError(f"no SUBACK for {topic}")

    def publish(self, topic: str, payload: bytes) -> None:
        self.paho.publish(topic, payload, qos=1)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.paho.disconnect()
        self.paho.loop_stop()


class Releases:
    """Keys and signed bundles; ``build`` makes one signed bundle of a model directory."""

    def __init__(self, root: Path) -> None:
        from shared.keystore import KeyStore

        self.root = root
        self.keys_dir = root / "keys"
        self.keys = KeyStore.create(self.keys_dir, now=datetime.now(UTC))
        self.trust = self.keys_dir / "root.json"

    def build(self, model_dir: Path, name: str, version: str) -> Path:
        from shared.bundle import build_bundle, inspect_bundle, write_signed_copy
        from shared.trust import sign_release

        bundle = self.root / f"{name}-{version}.bundle"
        build_bundle(model_dir, name=name, version=version, out=bundle, chunk_size=CHUNK_SIZE)
        _, files = sign_release(
            self.keys, inspect_bundle(bundle), expires_in=timedelta(days=1), now=datetime.now(UTC)
        )
        write_signed_copy(bundle, files)
        return bundle


class Responder:
    """What the fleet service does on the wire: answers ``up/fetch`` with
    :func:`fleet.distribution.answer_fetch`, sends signed orders, records reports with their
    arrival time (``time.time()``) and the chunk frames it sends per release."""

    def __init__(self, broker: Broker, transport: str, releases: Releases) -> None:
        from fleet.distribution import BundleRepository

        self.releases = releases
        self.repo = BundleRepository()
        self.infos: dict[str, Any] = {}
        self.sequence = 0
        self.chunk_bytes: dict[str, int] = defaultdict(int)  # target -> frame bytes sent
        self.chunk_frames: dict[str, int] = defaultdict(int)
        self.first_chunk_request: dict[str, float] = {}
        self.last_chunk_frame: dict[str, float] = {}
        self.requests: dict[str, int] = defaultdict(int)
        self.reports: list[tuple[float, str, dict[str, Any]]] = []
        self._lock = threading.Condition()
        self.client = Client(broker.spec(transport, FLEET))
        # as shared.mqtt.MqttLink (the fleet service's link) does on connect
        self.client.paho.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.client.subscribe("edgefleet/v1/devices/+/up/#")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True, name="responder")
        self._thread.start()

    def publish_release(self, bundle: Path) -> str:
        from shared.bundle import inspect_bundle
        from shared.trust import target_path, verify_release

        info = verify_release(inspect_bundle(bundle), self.releases.trust.read_bytes())
        self.repo.add(bundle)
        self.infos[info.version] = info
        return target_path(info.name, info.version)

    def deploy(self, device_id: str, version: str, *, sequence: int) -> float:
        """Sign and send an order; return the wall time just before it was published."""
        from shared.protocol import DOWN_CMD, Command, device_topic
        from shared.trust import sign_deployment

        order = sign_deployment(
            self.releases.keys,
            device_id=device_id,
            release=self.infos[version],
            sequence=sequence,
            expires=datetime.now(UTC) + timedelta(hours=1),
        )
        command = Command(
            id=uuid.uuid4().hex, type="deploy", issued_at=datetime.now(UTC), order=order.decode()
        )
        payload = command.model_dump_json().encode()
        sent = time.time()
        self.client.publish(device_topic(device_id, DOWN_CMD), payload)
        return sent

    def _serve(self) -> None:
        from shared.protocol import parse_device_topic

        while not self._stop.is_set():
            try:
                message = self.client.messages.get(timeout=0.2)
            except queue.Empty:
                continue
            arrived = time.time()
            try:
                device_id, suffix = parse_device_topic(message.topic)
            except ValueError:
                continue
            if suffix == "up/fetch":
                self._answer(device_id, message.payload, arrived)
                continue
            try:
                body = json.loads(message.payload)
            except ValueError:
                continue
            with self._lock:
                self.reports.append((arrived, suffix, body))
                self._lock.notify_all()

    def _answer(self, device_id: str, payload: bytes, arrived: float) -> None:
        from fleet.distribution import answer_fetch
        from shared.protocol import DOWN_FETCH, FetchRequest, device_topic, parse_payload

        request = parse_payload(FetchRequest, payload, what="fetch request")
        topic = device_topic(device_id, DOWN_FETCH)
        target = request.target or ""
        if request.kind == "chunks":
            self.requests[target] += 1
            self.first_chunk_request.setdefault(target, arrived)
        for frame in answer_fetch(request, self.repo, max_message=MAX_MESSAGE):
            self.client.publish(topic, frame)
            if request.kind == "chunks":
                self.chunk_bytes[target] += len(frame)
                self.chunk_frames[target] += 1
                self.last_chunk_frame[target] = time.time()

    def wait_for(
        self, predicate: Any, *, timeout: float, what: str
    ) -> tuple[float, dict[str, Any]]:
        """The first report (arrival time, body) matching ``predicate(suffix, body)``."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self._lock:
            while True:
                for arrived, suffix, body in self.reports[seen:]:
                    if predicate(suffix, body):
                        return arrived, body
                seen = len(self.reports)
                left = deadline - time.monotonic()
                if left <= 0:
                    events = [
                        (b.get("phase"), b.get("version"), b.get("detail"))
                        for _, s, b in self.reports
                        if s == "up/events"
                    ]
                    raise TimeoutError(f"no {what} within {timeout} s; events: {events}")
                self._lock.wait(left)

    def wait_phase(self, phase: str, version: str, *, timeout: float = 120) -> dict[str, Any]:
        """The event ``phase`` of ``version``, with ``arrived`` and ``agent_time`` (wall s)."""
        arrived, body = self.wait_for(
            lambda s, b: (
                s == "up/events"
                and b.get("version") == version
                and b.get("phase") in (phase, "failed")
            ),
            timeout=timeout,
            what=f"{phase} event for {version}",
        )
        if body.get("phase") == "failed":
            raise RuntimeError(f"deployment of {version} failed: {body}")
        return {**body, "arrived": arrived, "agent_time": event_time(body)}

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.client.close()


def event_time(body: dict[str, Any]) -> float:
    return datetime.fromisoformat(body["time"]).timestamp()


def start_agent(
    broker: Broker,
    transport: str,
    releases: Releases,
    data_dir: Path,
    *,
    settings: dict[str, Any] | None = None,
    log: Path | None = None,
    entry: tuple[str, ...] = ("shared.cli.main", "agent", "run"),
) -> subprocess.Popen[bytes]:
    """A real ``edgefleet agent run`` (``python -m shared.cli.main``) as device ``dev-001``.

    ``entry``: the module and arguments after ``python -m`` (``("agent", "run")``: the command
    the systemd unit runs, same options).
    """
    data_dir.mkdir(parents=True)
    config = data_dir.parent / f"{data_dir.name}.toml"
    values: dict[str, Any] = {"probation_s": 0.5, **(settings or {})}
    if transport == "plain":
        values["username"] = DEVICE  # the plaintext listener trusts the claimed name
    config.write_text("[agent]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()))
    command = [
        sys.executable,
        "-m",
        *entry,
        "--broker",
        broker.url(transport),
        "--device-id",
        DEVICE,
        "--data-dir",
        str(data_dir),
        "--trust",
        str(releases.trust),
        "--config",
        str(config),
    ]
    if transport == "tls":
        cert, key = broker.pki.client(DEVICE)
        command += [
            "--ca-file",
            str(broker.pki.ca_cert),
            "--cert-file",
            str(cert),
            "--key-file",
            str(key),
        ]
    out = (log or data_dir.parent / f"{data_dir.name}.log").open("ab")
    try:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    finally:
        out.close()


def stop_agent(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- child side ----------------------------------------------------------------------------------


def child_subscribe(spec: dict[str, Any]) -> dict[str, Any]:
    """The raw subscriber: subscribe, say ``ready``, receive ``count`` messages, report."""
    expected = int(spec["count"])
    done = threading.Event()
    state: dict[str, Any] = {"count": 0, "bytes": 0, "first": 0.0, "last": 0.0}

    def on_message(message: Any) -> None:
        now = time.monotonic()
        if state["count"] == 0:
            state["first"] = now
        state["count"] += 1
        state["bytes"] += len(message.payload)
        if state["count"] >= expected:
            state["last"] = now
            done.set()

    client = Client(spec)
    client.on_message_hook = on_message
    client.subscribe(spec["topic"])
    cpu_before = cpu_seconds("self")
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    done.wait(float(spec.get("timeout", 120)))
    state["cpu_s"] = cpu_seconds("self") - cpu_before
    client.close()
    return state


def child_storage(spec: dict[str, Any]) -> dict[str, Any]:
    """The agent's durable chunk writes alone, no network: every chunk of the bundle through
    :class:`agent.updater.StagedDownload` as the deployer drives it (``write`` and
    ``flush(force=False)`` per chunk: batched fdatasync + record lines; ``close``), then the same
    bytes with pwrite only and one fsync per file at the end (the floor)."""
    from agent.transfer import plan_chunks
    from agent.updater import FLUSH_BYTES, FLUSH_S, StagedDownload
    from fleet.distribution import BundleRepository

    repo = BundleRepository()
    target = repo.add(Path(spec["bundle"]))
    manifest = _manifest(repo, target)
    chunks = [(c, repo.chunk(target, c.file, c.index)) for c in plan_chunks(manifest)]
    result: dict[str, Any] = {
        "bytes": sum(c.size for c, _ in chunks),
        "flush_bytes": FLUSH_BYTES,
        "flush_s": FLUSH_S,
    }

    root = Path(spec["dir"]) / "staged"
    root.mkdir(parents=True)
    start = time.perf_counter()
    staged = StagedDownload(root, manifest)
    per_chunk = []
    for chunk, data in chunks:
        t = time.perf_counter()
        staged.write(chunk, data or b"")
        staged.flush(force=False)
        per_chunk.append(time.perf_counter() - t)
    staged.close()
    result["staged_write_s"] = time.perf_counter() - start
    result["staged_write_ms_per_chunk_median"] = statistics.median(per_chunk) * 1000
    result["staged_write_ms_per_chunk_max"] = max(per_chunk) * 1000

    root = Path(spec["dir"]) / "one-fsync"
    root.mkdir(parents=True)
    start = time.perf_counter()
    StagedDownload(root, manifest).close()  # same file creation, then plain pwrites
    fds: dict[str, int] = {}
    for chunk, data in chunks:
        fd = fds.get(chunk.file)
        if fd is None:
            fd = fds[chunk.file] = os.open(root / chunk.file, os.O_WRONLY)
        os.pwrite(fd, data or b"", chunk.offset)
    for fd in fds.values():
        os.fsync(fd)
        os.close(fd)
    result["one_fsync_s"] = time.perf_counter() - start
    return result


# -- parent side ---------------------------------------------------------------------------------


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{spec['op']} failed (exit {proc.returncode}):\n{proc.stderr}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def make_model(root: Path, weights: bytes) -> Path:
    """The small example CNN (ONNX only) plus ``weights`` as ``weights/weights.bin``."""
    from shared.example_models import write_example

    write_example(root, size="small", formats=["onnx"])
    (root / "weights").mkdir()
    (root / "weights" / "weights.bin").write_bytes(weights)
    return root


def chunk_frames(repo: Any, target: str) -> list[bytes]:
    """Every chunk frame the responder sends for a full pull of ``target``, in plan order."""
    from agent.transfer import plan_chunks
    from fleet.distribution import answer_fetch
    from shared.protocol import ChunkRef, FetchRequest

    frames: list[bytes] = []
    for spec in plan_chunks(_manifest(repo, target)):
        request = FetchRequest(
            request_id="raw-1",
            kind="chunks",
            target=target,
            chunks=[ChunkRef(file=spec.file, index=spec.index)],
        )
        frames.extend(answer_fetch(request, repo, max_message=MAX_MESSAGE))
    return frames


class CpuMeter:
    """CPU seconds used by named processes, and by the rest of the machine, between two marks."""

    def __init__(self, pids: dict[str, int | str]) -> None:
        self.pids = pids
        self.start = self._read()

    def _read(self) -> dict[str, float]:
        busy, _ = system_cpu()
        return {**{k: cpu_seconds(v) for k, v in self.pids.items()}, "_machine": busy}

    def stop(self) -> dict[str, float]:
        end = self._read()
        used = {k: end[k] - self.start[k] for k in end}
        machine = used.pop("_machine")
        used["others"] = max(0.0, machine - sum(used.values()))
        return used


def run_raw(broker: Broker, transport: str, frames: list[bytes]) -> dict[str, Any]:
    """One paho publisher (here) -> broker -> one paho subscriber (child), QoS 1."""
    from shared.protocol import DOWN_FETCH, device_topic

    topic = device_topic(RAW_DEVICE, DOWN_FETCH)
    spec = {
        **broker.spec(transport, RAW_DEVICE),
        "op": "subscribe",
        "topic": topic,
        "count": len(frames),
    }
    child = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    assert child.stdout is not None
    try:
        if child.stdout.readline().strip() != "ready":
            raise RuntimeError("the raw subscriber did not start")
        publisher = Client(broker.spec(transport, FLEET))
        try:
            meter = CpuMeter({"subscriber": child.pid, "broker": broker.pid, "publisher": "self"})
            start = time.monotonic()
            for frame in frames:
                publisher.publish(topic, frame)
            result = json.loads(child.stdout.readline())
            cpu = meter.stop()
        finally:
            publisher.close()
    finally:
        child.wait(30)
    if result["count"] < len(frames):
        raise RuntimeError(f"raw subscriber got {result['count']} of {len(frames)} messages")
    seconds = result["last"] - start
    cpu["subscriber"] = result["cpu_s"]  # the child's own count, up to its last message
    return {
        "messages": result["count"],
        "bytes": result["bytes"],
        "seconds": seconds,
        "mb_per_s": result["bytes"] / MB / seconds,
        "cpu_s": cpu,
    }


class StagingWatch(threading.Thread):
    """Polls a staging directory's ``.verified`` record: when its first line appears, when it
    holds one line per chunk (the transfer is over), when it is removed (verified)."""

    def __init__(self, path: Path, full_size: int, pids: dict[str, int | str]) -> None:
        super().__init__(daemon=True, name="staging-watch")
        self.path = path
        self.full_size = full_size
        self.pids = pids
        self.marks: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self._meter: CpuMeter | None = None
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                size: int | None = os.stat(self.path).st_size
            except FileNotFoundError:
                size = None
            if size is not None and "first_line" not in self.marks:
                self.marks["first_line"] = time.time()
                self._meter = CpuMeter(self.pids)
            if size is not None and size >= self.full_size and "last_line" not in self.marks:
                self.marks["last_line"] = time.time()
                if self._meter is not None:
                    self.cpu = self._meter.stop()
            if size is None and "last_line" in self.marks:
                self.marks["removed"] = time.time()
                return
            time.sleep(POLL_S)

    def stop(self) -> None:
        self._stop_event.set()


def record_size(manifest: Any) -> int:
    """Bytes of a complete ``.verified`` record: one ``file\\tindex\\n`` line per chunk."""
    from agent.transfer import plan_chunks

    return sum(len(f"{c.file}\t{c.index}\n".encode()) for c in plan_chunks(manifest))


def _manifest(repo: Any, target: str) -> Any:
    from shared.manifest import parse_manifest

    return parse_manifest(repo.manifest(target))


def run_agent(
    broker: Broker,
    transport: str,
    releases: Releases,
    bundles: dict[str, Path],
    work: Path,
    sequence: int,
    *,
    delta: bool = True,
    before_order: Any = None,
) -> dict[str, Any]:
    """A fresh agent pulls v1 (timed by phase), then, with ``delta``, v2 (bytes counted)."""
    responder = Responder(broker, transport, releases)
    targets = {v: responder.publish_release(b) for v, b in bundles.items()}
    manifest = _manifest(responder.repo, targets["1.0.0"])
    data_dir = work / "data"
    proc = start_agent(broker, transport, releases, data_dir)
    v2: dict[str, Any] | None = None
    try:
        responder.wait_for(lambda s, b: s == "up/state", timeout=60, what="first state report")
        rss_idle = proc_status_kib(proc.pid, "VmRSS")
        pids: dict[str, int | str] = {"agent": proc.pid, "broker": broker.pid, "responder": "self"}
        staging = data_dir / "staging" / MODEL / "1.0.0" / ".verified"
        if before_order is not None:
            before_order()  # wait for a quiet machine, with the agent up and idle
        watch = StagingWatch(staging, record_size(manifest), pids)
        watch.start()
        meter = CpuMeter(pids)
        ordered = responder.deploy(DEVICE, "1.0.0", sequence=sequence)
        received = responder.wait_phase("received", "1.0.0")
        downloading = responder.wait_phase("downloading", "1.0.0")
        downloaded = responder.wait_phase("downloaded", "1.0.0")
        cpu_order_to_downloaded = meter.stop()
        watch.join(5)
        watch.stop()
        peak_after_v1 = proc_status_kib(proc.pid, "VmHWM")
        activated = responder.wait_phase("activated", "1.0.0")
        if delta:
            responder.wait_phase("committed", "1.0.0", timeout=30)
            target2 = targets["2.0.0"]
            ordered2 = responder.deploy(DEVICE, "2.0.0", sequence=sequence + 1)
            downloading2 = responder.wait_phase("downloading", "2.0.0")
            downloaded2 = responder.wait_phase("downloaded", "2.0.0")
            responder.wait_phase("activated", "2.0.0")
            size2 = bundles["2.0.0"].stat().st_size
            v2 = {
                "chunk_frame_bytes": responder.chunk_bytes[target2],
                "chunk_frames": responder.chunk_frames[target2],
                "chunk_requests": responder.requests[target2],
                "bundle_bytes": size2,
                "share": responder.chunk_bytes[target2] / size2,
                "reused_bytes": downloaded2.get("metrics", {}).get("reused_bytes"),
                "downloading_to_downloaded_s": downloaded2["agent_time"]
                - downloading2["agent_time"],
                "order_to_downloaded_s": downloaded2["agent_time"] - ordered2,
            }
    finally:
        stop_agent(proc)
        responder.close()

    marks = watch.marks
    if "last_line" not in marks or "removed" not in marks:
        raise RuntimeError(f"the staging watch missed the transfer: {marks}")
    payload = sum(e.size for e in manifest.files)
    t_down, t_done = downloading["agent_time"], downloaded["agent_time"]
    phases = {
        "order_to_received": received["agent_time"] - ordered,
        "received_to_downloading": t_down - received["agent_time"],
        "transfer": marks["last_line"] - t_down,
        "first_request_to_last_line": marks["last_line"]
        - responder.first_chunk_request[targets["1.0.0"]],
        "verify": marks["removed"] - marks["last_line"],
        "install": t_done - marks["removed"],
        "downloading_to_downloaded": t_done - t_down,
        "order_to_downloaded": t_done - ordered,
        "downloaded_to_activated": activated["agent_time"] - t_done,
    }
    return {
        "payload_bytes": payload,
        "largest_file_bytes": max(e.size for e in manifest.files),
        "bundle_bytes": bundles["1.0.0"].stat().st_size,
        "phases_s": phases,
        "transfer_mb_per_s": payload / MB / phases["transfer"],
        "downloading_to_downloaded_mb_per_s": payload / MB / phases["downloading_to_downloaded"],
        "order_to_downloaded_mb_per_s": payload / MB / phases["order_to_downloaded"],
        "chunk_requests": responder.requests[targets["1.0.0"]],
        "chunk_frames": responder.chunk_frames[targets["1.0.0"]],
        "cpu_s_transfer": watch.cpu,
        "cpu_s_order_to_downloaded": cpu_order_to_downloaded,
        "transfer_wall_s_between_cpu_marks": marks["last_line"] - marks["first_line"],
        "agent_rss_mib_before_deploy": (rss_idle or 0) / 1024,
        "agent_peak_rss_mib_after_v1": (peak_after_v1 or 0) / 1024,
        "delta": v2,
    }


def wait_quiet(max_wait_s: float, log: Any) -> dict[str, float]:
    """Wait (at most ``max_wait_s``) until the rest of the machine uses < QUIET_CORES cores,
    sampled over 0.5 s while this benchmark is idle; return the wait and the last sample."""
    started = time.monotonic()
    while True:
        busy0, total0 = system_cpu()
        time.sleep(0.5)
        busy1, total1 = system_cpu()
        cores = (os.cpu_count() or 1) * (busy1 - busy0) / max(total1 - total0, 1e-9)
        waited = time.monotonic() - started
        if cores < QUIET_CORES or waited >= max_wait_s:
            return {"waited_s": round(waited, 1), "others_cores": round(cores, 2)}
        if waited < 1:
            log(f"  the machine is busy ({cores:.1f} cores used by others): waiting...")


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _summarize_agent(runs: list[dict[str, Any]], raw_mb_s: float) -> dict[str, Any]:
    first = runs[0]
    summary: dict[str, Any] = {
        "runs": len(runs),
        "payload_bytes": first["payload_bytes"],
        "largest_file_bytes": first["largest_file_bytes"],
        "chunk_requests": first["chunk_requests"],
        "chunk_frames": first["chunk_frames"],
        "phases_s_median": {
            k: round(_median([x["phases_s"][k] for x in runs]), 4) for k in first["phases_s"]
        },
        "transfer_mb_per_s_median": _median([x["transfer_mb_per_s"] for x in runs]),
        "transfer_mb_per_s_all": [round(x["transfer_mb_per_s"], 1) for x in runs],
        "downloading_to_downloaded_mb_per_s_median": _median(
            [x["downloading_to_downloaded_mb_per_s"] for x in runs]
        ),
        "order_to_downloaded_mb_per_s_median": _median(
            [x["order_to_downloaded_mb_per_s"] for x in runs]
        ),
        "cpu_s_transfer_median": {
            k: round(_median([x["cpu_s_transfer"][k] for x in runs]), 3)
            for k in first["cpu_s_transfer"]
        },
        "transfer_wall_s_between_cpu_marks_median": _median(
            [x["transfer_wall_s_between_cpu_marks"] for x in runs]
        ),
        "agent_rss_mib_before_deploy_max": round(
            max(x["agent_rss_mib_before_deploy"] for x in runs), 1
        ),
        "agent_peak_rss_mib_after_v1_max": round(
            max(x["agent_peak_rss_mib_after_v1"] for x in runs), 1
        ),
        "raw_mb_per_s_same_broker": raw_mb_s,
    }
    summary["transfer_vs_raw"] = round(summary["transfer_mb_per_s_median"] / raw_mb_s, 3)
    summary["downloading_to_downloaded_vs_raw"] = round(
        summary["downloading_to_downloaded_mb_per_s_median"] / raw_mb_s, 3
    )
    summary["order_to_downloaded_vs_raw"] = round(
        summary["order_to_downloaded_mb_per_s_median"] / raw_mb_s, 3
    )
    deltas = [x["delta"] for x in runs if x["delta"] is not None]
    if deltas:
        summary["delta"] = {
            "chunk_frame_bytes": deltas[0]["chunk_frame_bytes"],
            "chunk_frame_bytes_all": [d["chunk_frame_bytes"] for d in deltas],
            "chunk_frames": deltas[0]["chunk_frames"],
            "chunk_requests": deltas[0]["chunk_requests"],
            "bundle_bytes": deltas[0]["bundle_bytes"],
            "share_max": max(d["share"] for d in deltas),
            "reused_bytes": deltas[0]["reused_bytes"],
            "downloading_to_downloaded_s_median": _median(
                [d["downloading_to_downloaded_s"] for d in deltas]
            ),
            "order_to_downloaded_s_median": _median([d["order_to_downloaded_s"] for d in deltas]),
        }
    return summary


def _summarize_raw(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "runs": len(runs),
        "messages": runs[0]["messages"],
        "bytes": runs[0]["bytes"],
        "seconds_median": _median([x["seconds"] for x in runs]),
        "mb_per_s_median": _median([x["mb_per_s"] for x in runs]),
        "mb_per_s_all": [round(x["mb_per_s"], 1) for x in runs],
        "cpu_s_median": {
            k: round(_median([x["cpu_s"][k] for x in runs]), 3) for k in runs[0]["cpu_s"]
        },
    }


def run_benchmark(
    size_mb: float,
    repeat: int,
    transports: list[str],
    max_quiet_wait_s: float,
    log: Any,
) -> dict[str, Any]:
    from fleet.distribution import BundleRepository

    size = int(size_mb * MB)
    load_before = loadavg()
    quiet: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-transfer-") as tmp_name:
        tmp = Path(tmp_name)
        log(f"writing a {size / MB:.0f} MB model and its 10%-changed version, signing bundles...")
        weights = os.urandom(size)
        start = int(size * 0.45) + 12_345  # a contiguous region, deliberately not chunk-aligned
        changed = int(size * DELTA_SHARE)
        weights2 = weights[:start] + os.urandom(changed) + weights[start + changed :]
        releases = Releases(tmp / "releases")
        bundles = {
            "1.0.0": releases.build(make_model(tmp / "model-1", weights), MODEL, "1.0.0"),
            "2.0.0": releases.build(make_model(tmp / "model-2", weights2), MODEL, "2.0.0"),
        }
        del weights, weights2
        repo = BundleRepository()
        target = repo.add(bundles["1.0.0"])
        frames = chunk_frames(repo, target)
        frame_sizes = sorted({len(f) for f in frames})
        log("starting mosquitto (production config: TLS + loopback plaintext)...")
        broker = Broker(tmp / "broker")
        raw: dict[str, list[dict[str, Any]]] = defaultdict(list)
        agent: dict[str, list[dict[str, Any]]] = defaultdict(list)
        storage: list[dict[str, Any]] = []
        sequence = 1
        try:
            for transport in transports:  # warm-up (page cache, TLS code paths)
                run_raw(broker, transport, frames[: max(1, len(frames) // 8)])
            for i in range(repeat):
                for transport in transports:
                    log(f"round {i + 1}/{repeat}, {transport}: raw paho")
                    quiet.append(wait_quiet(max_quiet_wait_s, log))
                    raw[transport].append(run_raw(broker, transport, frames))
                    log(f"round {i + 1}/{repeat}, {transport}: agent as shipped, v1 then v2")
                    agent[transport].append(
                        run_agent(
                            broker,
                            transport,
                            releases,
                            bundles,
                            tmp / f"a-{transport}-{i}",
                            sequence,
                            before_order=lambda: quiet.append(wait_quiet(max_quiet_wait_s, log)),
                        )
                    )
                    sequence += 2
                log(f"round {i + 1}/{repeat}: the agent's durable chunk writes alone (no network)")
                quiet.append(wait_quiet(max_quiet_wait_s, log))
                storage.append(
                    run_child(
                        {
                            "op": "storage",
                            "bundle": str(bundles["1.0.0"]),
                            "dir": str(tmp / f"s-{i}"),
                        }
                    )
                )
                shutil.rmtree(tmp / f"s-{i}", ignore_errors=True)
        finally:
            broker.stop()
        total_frame_bytes = sum(len(f) for f in frames)

    results: dict[str, Any] = {}
    for transport in transports:
        raw_summary = _summarize_raw(raw[transport])
        results[transport] = {
            "raw": raw_summary,
            "agent": _summarize_agent(agent[transport], raw_summary["mb_per_s_median"]),
        }

    shipped = {t: results[t]["agent"] for t in transports}
    payload = shipped[transports[0]]["payload_bytes"]
    storage_summary = {
        "runs": len(storage),
        "bytes": storage[0]["bytes"],
        "staged_write_s_median": _median([s["staged_write_s"] for s in storage]),
        "staged_write_mb_per_s_median": _median(
            [s["bytes"] / MB / s["staged_write_s"] for s in storage]
        ),
        "staged_write_ms_per_chunk_median": _median(
            [s["staged_write_ms_per_chunk_median"] for s in storage]
        ),
        "staged_write_ms_per_chunk_max": max(s["staged_write_ms_per_chunk_max"] for s in storage),
        "flush_bytes": storage[0]["flush_bytes"],
        "flush_s": storage[0]["flush_s"],
        "one_fsync_s_median": _median([s["one_fsync_s"] for s in storage]),
        "one_fsync_mb_per_s_median": _median([s["bytes"] / MB / s["one_fsync_s"] for s in storage]),
    }
    return {
        "benchmark": "transfer",
        "command": shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv])),
        "machine": machine_info(),
        "load_average_1min": {"before": load_before, "after": loadavg()},
        "quiet_waits": {
            "total_waited_s": round(sum(q["waited_s"] for q in quiet), 1),
            "others_cores_max_at_start": max(q["others_cores"] for q in quiet),
        },
        "units": {"throughput": "MB/s (10^6 bytes)", "time": "s", "memory": "MiB"},
        "settings": {
            "chunk_size": CHUNK_SIZE,
            "max_message": MAX_MESSAGE,
            "frame_bytes": frame_sizes,
            "frames_per_pull": len(frames),
            "frame_bytes_total": total_frame_bytes,
            "payload_bytes": payload,
            "agent": "as shipped, defaults (window_chunks 8, 4 chunks per request, "
            "request_timeout_s 10)",
            "broker": "fleet.broker_config production config + loopback plaintext listener",
            "delta_share": DELTA_SHARE,
            "weights_bytes": size,
        },
        "storage": storage_summary,
        "results": results,
        "goals": {"transfer_vs_raw_min": THROUGHPUT_GOAL, "delta_share_max": DELTA_GOAL},
        "goal_met": {
            **{
                f"throughput_{t}": shipped[t]["transfer_vs_raw"] >= THROUGHPUT_GOAL for t in shipped
            },
            **{f"delta_{t}": shipped[t]["delta"]["share_max"] <= DELTA_GOAL for t in shipped},
        },
    }


def print_report(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console.width = max(console.width, 150)
    m = report["machine"]
    s = report["settings"]
    load = report["load_average_1min"]
    q = report["quiet_waits"]
    console.print(f"[bold]command:[/] {report['command']}")
    console.print(
        f"[bold]machine:[/] {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), "
        f"Python {m['python']}, {m['openssl']}, {m['os']}, {m['mosquitto']}, "
        f"paho-mqtt {m['paho_mqtt']}; load average {load['before']:.2f} before, "
        f"{load['after']:.2f} after; waited {q['total_waited_s']:.0f} s for a quiet machine "
        f"(others used up to {q['others_cores_max_at_start']:.1f} cores at a run's start)"
    )
    console.print(
        f"[bold]settings:[/] chunk {s['chunk_size'] // 1024} KiB, max_message "
        f"{s['max_message'] // 1024} KiB -> {s['frames_per_pull']} frames "
        f"({min(s['frame_bytes'])}-{max(s['frame_bytes'])} bytes) per pull of "
        f"{s['payload_bytes'] / MB:.1f} MB; agent {s['agent']}"
    )
    r = report["results"]
    table = Table(title="bundle pull vs raw paho on the same broker (MB/s of payload, median)")
    for col in ("listener", "what", "seconds", "MB/s", "MB/s all runs", "vs raw"):
        table.add_column(col, justify="left" if col in ("listener", "what") else "right")
    for t, x in r.items():
        raw, a = x["raw"], x["agent"]
        ph = a["phases_s_median"]
        table.add_row(
            t,
            "raw paho pub -> sub (the limit)",
            f"{raw['seconds_median']:.3f}",
            f"{raw['mb_per_s_median']:.0f}",
            " ".join(f"{v:.0f}" for v in raw["mb_per_s_all"]),
            "1.00",
        )
        table.add_row(
            t,
            "agent: transfer phase (the goal)",
            f"{ph['transfer']:.3f}",
            f"{a['transfer_mb_per_s_median']:.0f}",
            " ".join(f"{v:.0f}" for v in a["transfer_mb_per_s_all"]),
            f"{a['transfer_vs_raw']:.2f}",
        )
        table.add_row(
            t,
            "agent: downloading -> downloaded",
            f"{ph['downloading_to_downloaded']:.3f}",
            f"{a['downloading_to_downloaded_mb_per_s_median']:.0f}",
            "",
            f"{a['downloading_to_downloaded_vs_raw']:.2f}",
        )
        table.add_row(
            t,
            "agent: order -> downloaded",
            f"{ph['order_to_downloaded']:.3f}",
            f"{a['order_to_downloaded_mb_per_s_median']:.0f}",
            "",
            f"{a['order_to_downloaded_vs_raw']:.2f}",
            end_section=True,
        )
    console.print(table)

    st = report["storage"]
    console.print(
        f"[bold]durable chunk writes alone[/] (agent.updater.StagedDownload.write, no network, "
        f"{st['bytes'] / MB:.1f} MB): {st['staged_write_s_median']:.3f} s = "
        f"{st['staged_write_mb_per_s_median']:.0f} MB/s, "
        f"{st['staged_write_ms_per_chunk_median']:.2f} ms per chunk "
        f"(max {st['staged_write_ms_per_chunk_max']:.1f}; sync every "
        f"{st['flush_bytes'] // MIB} MiB or {st['flush_s']:g} s); pwrite + one fsync per file: "
        f"{st['one_fsync_s_median']:.3f} s = {st['one_fsync_mb_per_s_median']:.0f} MB/s"
    )

    phases = Table(title="agent pull of v1, phases (seconds, median)")
    names = {
        "order_to_received": "order -> received",
        "received_to_downloading": "-> downloading",
        "transfer": "transfer",
        "first_request_to_last_line": "1st request -> last chunk",
        "verify": "verify",
        "install": "install",
        "downloading_to_downloaded": "downloading -> downloaded",
        "downloaded_to_activated": "-> activated",
    }
    phases.add_column("listener")
    for title in names.values():
        phases.add_column(title, justify="right")
    for t, x in r.items():
        ph = x["agent"]["phases_s_median"]
        phases.add_row(t, *(f"{ph[k]:.3f}" for k in names))
    console.print(phases)

    cpu = Table(title="CPU seconds (utime+stime) per process during the window, median")
    cpu.add_column("listener")
    cpu.add_column("window")
    for col in ("wall s", "agent / subscriber", "broker", "responder / publisher", "others"):
        cpu.add_column(col, justify="right")
    for t, x in r.items():
        raw, a = x["raw"], x["agent"]
        rc, ac = raw["cpu_s_median"], a["cpu_s_transfer_median"]
        cpu.add_row(
            t,
            "raw run",
            f"{raw['seconds_median']:.3f}",
            f"{rc['subscriber']:.2f}",
            f"{rc['broker']:.2f}",
            f"{rc['publisher']:.2f}",
            f"{rc['others']:.2f}",
        )
        cpu.add_row(
            t,
            "agent: first to last durable record batch",
            f"{a['transfer_wall_s_between_cpu_marks_median']:.3f}",
            f"{ac['agent']:.2f}",
            f"{ac['broker']:.2f}",
            f"{ac['responder']:.2f}",
            f"{ac['others']:.2f}",
        )
    console.print(cpu)

    delta = Table(title="v2 (10% of the weights changed, contiguous) after v1, agent as shipped")
    for col in (
        "listener",
        "chunk frame bytes sent",
        "v2 bundle bytes",
        "share",
        "reused bytes",
        "downloading->downloaded s",
    ):
        delta.add_column(col, justify="left" if col == "listener" else "right")
    for t, x in r.items():
        d = x["agent"]["delta"]
        delta.add_row(
            t,
            f"{d['chunk_frame_bytes']:,}",
            f"{d['bundle_bytes']:,}",
            f"{d['share_max']:.3f}",
            f"{d['reused_bytes']:,.0f}" if d["reused_bytes"] is not None else "-",
            f"{d['downloading_to_downloaded_s_median']:.3f}",
        )
    console.print(delta)
    for t, x in r.items():
        a = x["agent"]
        console.print(
            f"[bold]{t}[/]: agent RSS {a['agent_rss_mib_before_deploy_max']:.0f} MiB before the "
            f"order, peak {a['agent_peak_rss_mib_after_v1_max']:.0f} MiB after the v1 pull "
            f"(largest payload file {a['largest_file_bytes'] / MIB:.0f} MiB)"
        )

    def verdict(ok: bool) -> str:
        return "[green]MET[/]" if ok else "[red]NOT MET[/]"

    met = report["goal_met"]
    for t, x in r.items():
        a = x["agent"]
        console.print(
            f"{t}: agent transfer / raw paho = {a['transfer_vs_raw']:.2f} "
            f"(goal >= {THROUGHPUT_GOAL:.2f}): {verdict(met[f'throughput_{t}'])}; "
            f"v2 sends {a['delta']['share_max']:.1%} of its bundle (goal <= {DELTA_GOAL:.0%}): "
            f"{verdict(met[f'delta_{t}'])}"
        )


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        spec = json.loads(sys.argv[2])
        op = {"subscribe": child_subscribe, "storage": child_storage}[spec["op"]]
        sys.stdout.write(json.dumps(op(spec)) + "\n")
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=float, default=75, help="weights size (default 75)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds (default 3)")
    parser.add_argument(
        "--transport", choices=(*TRANSPORTS, "both"), default="both", help="listener(s) to use"
    )
    parser.add_argument(
        "--max-quiet-wait",
        type=float,
        default=20,
        help="seconds to wait, before each run, for other processes to go quiet (default 20)",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON object instead")
    opts = parser.parse_args()
    if opts.size_mb <= 0 or opts.repeat < 1:
        parser.error("--size-mb must be > 0 and --repeat >= 1")
    transports = list(TRANSPORTS) if opts.transport == "both" else [opts.transport]

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    report = run_benchmark(
        opts.size_mb,
        opts.repeat,
        transports,
        opts.max_quiet_wait,
        log,
    )
    if opts.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)


if __name__ == "__main__":
    main()
