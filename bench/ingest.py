"""Benchmark: telemetry ingest end to end (broker to PostgreSQL), against a raw batched insert.

One command::

    .venv/bin/python bench/ingest.py [--messages 50000] [--devices 1000] [--publishers 3] [--json]

Set-up: a fresh PostgreSQL database (``--pg``, default ``postgresql+psycopg://postgres@127.0.0.1:
5432``) is created for the run, migrated with :func:`fleet.db.migrate` and dropped at the end. A
mosquitto broker is started on a **plaintext loopback listener** (free port, anonymous,
``max_queued_messages 1000000``, ``set_tcp_nodelay true``); the broker ACL is not used.

The same ``--messages`` telemetry rows (devices ``dev-0000``..``dev-0999``, several reports
each, increasing ``seq``) are stored three times, and sent once without being stored:

- ``raw`` (the limit): the bridge's own write of the rows (``COPY`` into a scratch table, then
  ``INSERT ... SELECT ... ON CONFLICT DO NOTHING``, see :mod:`fleet.crud`) in batches of the
  bridge's ``ingest_batch`` rows, one transaction per batch, from already-parsed reports. No
  MQTT, no parsing, no Device touch.
- ``plain batched INSERT``, for comparison: an executemany of ``INSERT ... ON CONFLICT DO
  NOTHING`` (psycopg pipelines it) in the same batches, from row dicts.
- ``MQTT receive only``: the bridge's MQTT link (paho, the same shared subscription) with a
  consumer that only counts the messages: the most the bridge could take from the broker.
- ``end to end``: :class:`fleet.mqtt_bridge.MqttBridge` runs in this process with default
  settings; a child process publishes every message with QoS 1 (payloads encoded beforehand)
  over ``--publishers`` connections, as fast as the broker acknowledges. The time runs from the
  first publish to the moment ``SELECT count(*) FROM telemetrysample`` (polled every 50 ms)
  reaches the number of messages.

Each MQTT run has a fresh broker. Then a short in-process profile of the bridge's own steps on
the same payloads (topic and JSON parsing, pydantic validation, the Device touch, the write, the
commit) says where the time goes.

Goals (from the issue): >= 5,000 messages/s end to end and >= 50% of the raw rate. The exit
status is 0 whether or not the goals are met: this is a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import common  # noqa: E402 - after the repository is on sys.path

RATE_GOAL = 5000.0
RATIO_GOAL = 0.50
BASE_TIME = datetime(2025, 1, 1, tzinfo=UTC)
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
POLL_S = 0.05  # how often the end-to-end run counts the stored rows


# -- the workload (the same in the parent and in the publisher child) ----------------------------


def device_ids(devices: int) -> list[str]:
    return [f"dev-{i:04d}" for i in range(devices)]


def workload(messages: int, devices: int) -> list[tuple[str, int]]:
    """(device id, seq) in publish order: round-robin over devices, seq increasing."""
    ids = device_ids(devices)
    return [(ids[i % devices], i // devices) for i in range(messages)]


def telemetry(device_id: str, seq: int) -> Any:
    from shared.protocol import Telemetry

    return Telemetry(
        device_id=device_id,
        seq=seq,
        time=BASE_TIME + timedelta(seconds=seq),
        models={"cnn": {"inferences": 120 + seq % 7, "p50_ms": 2.4, "p99_ms": 9.1, "errors": 0}},
        health={"cpu": 0.31, "mem_mb": 84.5, "temp_c": 51.0, "disk_free_mb": 2048.0},
        dropped=0,
    )


# -- publisher child ------------------------------------------------------------------------------
#
# The load generator is a minimal MQTT 3.1.1 client on asyncio: it writes pre-encoded PUBLISH
# packets (QoS 1) and counts the broker's PUBACKs, with at most PUBLISH_WINDOW unacknowledged
# per connection. paho needed about 120 µs of CPU per message to publish, a third of this
# 2-core machine at 5,000 messages/s, taken from the broker, the bridge and PostgreSQL; this
# client needs about 20 µs. Devices publish from their own machines, so the load generator's
# cost is not part of what is measured.

PUBLISH_WINDOW = 1000


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _mqtt_string(text: str) -> bytes:
    data = text.encode()
    return len(data).to_bytes(2, "big") + data


def connect_packet(client_id: str) -> bytes:
    """CONNECT, MQTT 3.1.1, clean session, keep-alive 60 s."""
    body = _mqtt_string("MQTT") + bytes([4, 0x02]) + (60).to_bytes(2, "big")
    body += _mqtt_string(client_id)
    return b"\x10" + _remaining_length(len(body)) + body


def publish_packet(topic: str, payload: bytes, packet_id: int) -> bytes:
    """PUBLISH with QoS 1."""
    body = _mqtt_string(topic) + packet_id.to_bytes(2, "big") + payload
    return b"\x32" + _remaining_length(len(body)) + body


async def read_packet(reader: Any) -> tuple[int, bytes]:
    """(packet type, body) of the next packet from the broker."""
    first = (await reader.readexactly(1))[0]
    length, shift = 0, 0
    while True:
        digit = (await reader.readexactly(1))[0]
        length += (digit & 0x7F) << shift
        shift += 7
        if not digit & 0x80:
            break
    return first >> 4, await reader.readexactly(length) if length else b""


async def publish_all(port: int, client_id: str, packets: list[bytes]) -> int:
    """Send ``packets`` on one connection; return the number the broker acknowledged."""
    import asyncio

    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    writer.write(connect_packet(client_id))
    kind, body = await read_packet(reader)
    if kind != 2 or body[1] != 0:  # CONNACK, accepted
        raise RuntimeError(f"the broker refused the publisher: {body!r}")
    window = asyncio.Semaphore(PUBLISH_WINDOW)
    acked = 0

    async def count_acks() -> None:
        nonlocal acked
        while acked < len(packets):
            kind, _ = await read_packet(reader)
            if kind == 4:  # PUBACK
                acked += 1
                window.release()

    counting = asyncio.create_task(count_acks())
    for i, packet in enumerate(packets):
        await window.acquire()
        writer.write(packet)
        if i % 64 == 63:
            await writer.drain()
    await writer.drain()
    await asyncio.wait_for(counting, 300)
    writer.close()
    return acked


def publisher_main(spec: str) -> None:
    """Connect, say ``ready``, wait for ``go`` on stdin, publish everything, report."""
    import asyncio

    from shared.protocol import UP_TELEMETRY, device_topic

    args = json.loads(spec)
    work = workload(args["messages"], args["devices"])
    n_clients = args["publishers"]
    shards: list[list[bytes]] = [[] for _ in range(n_clients)]
    for i, (device_id, seq) in enumerate(work):
        payload = telemetry(device_id, seq).model_dump_json().encode()
        topic = device_topic(device_id, UP_TELEMETRY)
        shards[i % n_clients].append(publish_packet(topic, payload, i // n_clients % 65535 + 1))
    print("ready", flush=True)
    sys.stdin.readline()
    started = time.perf_counter()

    async def run() -> list[int]:
        return await asyncio.gather(
            *(publish_all(args["port"], f"bench-pub-{k}-{os.getpid()}", shards[k])
              for k in range(n_clients))
        )  # fmt: skip

    acked = asyncio.run(run())
    acked_s = time.perf_counter() - started
    cpu = os.times()
    out = {"acked_s": acked_s, "acked": sum(acked), "cpu_s": cpu.user + cpu.system}
    print(json.dumps(out), flush=True)


# -- parent side ---------------------------------------------------------------------------------


def start_broker(tmp: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = common.free_port()
    conf = tmp / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 1000000\n"
        "set_tcp_nodelay true\npersistence false\n"
    )
    proc = subprocess.Popen(
        [MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("mosquitto did not start")


def machine_info() -> dict[str, Any]:
    import paho.mqtt
    import psycopg
    import sqlalchemy

    try:
        mosquitto = (
            subprocess.run([MOSQUITTO, "-h"], capture_output=True, text=True, check=False)
            .stdout.splitlines()[0]
            .removeprefix("mosquitto version ")
        )
    except (OSError, IndexError):
        mosquitto = "unknown"
    return common.machine_info(
        mosquitto=mosquitto,
        paho_mqtt=paho.mqtt.__version__,
        sqlalchemy=sqlalchemy.__version__,
        psycopg=psycopg.__version__,
        load_average=list(os.getloadavg()),
    )


def row_of(t: Any) -> dict[str, Any]:
    return {
        "device_id": t.device_id,
        "seq": t.seq,
        "time": t.time,
        "models": t.models,
        "health": t.health,
        "dropped": t.dropped,
    }


def count_rows(engine: Any) -> int:
    from sqlalchemy import text

    with engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM telemetrysample")).scalar_one())


def truncate(engine: Any) -> None:
    from sqlalchemy import text

    with engine.begin() as conn:
        conn.execute(text("TRUNCATE telemetrysample, device CASCADE"))
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE telemetrysample"))


def measure_raw(engine: Any, samples: list[Any], batch: int) -> dict[str, Any]:
    """The limit: the bridge's own write of the same rows, in batches of ``ingest_batch``, one
    transaction each, without MQTT, parsing or the Device touch."""
    from sqlmodel import Session

    from fleet import crud

    started = time.perf_counter()
    for i in range(0, len(samples), batch):
        with Session(engine) as session:
            crud._copy_telemetry(session, samples[i : i + batch])
            session.commit()
    seconds = time.perf_counter() - started
    stored = count_rows(engine)
    return {"rows": stored, "seconds": seconds, "rows_per_s": len(samples) / seconds}


def measure_plain_insert(engine: Any, rows: list[dict[str, Any]], batch: int) -> dict[str, Any]:
    """For comparison: the plainest batched insert, an executemany of ``INSERT ... ON CONFLICT
    DO NOTHING`` (psycopg pipelines it), in the same batches."""
    from sqlalchemy.dialects.postgresql import insert

    from fleet.models import TelemetrySample

    statement = insert(TelemetrySample).on_conflict_do_nothing()
    started = time.perf_counter()
    for i in range(0, len(rows), batch):
        with engine.begin() as conn:
            conn.execute(statement, rows[i : i + batch])
    seconds = time.perf_counter() - started
    stored = count_rows(engine)
    return {"rows": stored, "seconds": seconds, "rows_per_s": len(rows) / seconds}


def start_publisher(port: int, messages: int, devices: int, publishers: int) -> Any:
    """The publisher child, connected and waiting for ``go``."""
    spec = json.dumps(
        {"messages": messages, "devices": devices, "publishers": publishers, "port": port}
    )
    child = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--publisher", spec],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    if child.stdout is None or child.stdout.readline().strip() != "ready":
        raise RuntimeError("the publisher child failed")
    return child


def go(child: Any) -> float:
    child.stdin.write("go\n")
    child.stdin.flush()
    return time.perf_counter()


def measure_receive(port: int, messages: int, devices: int, publishers: int) -> dict[str, Any]:
    """The MQTT ceiling: the bridge's link (paho, the same subscription) with a consumer that
    only counts messages. Nothing is parsed or stored."""
    from fleet.mqtt_bridge import SHARE_GROUP
    from shared.mqtt import Message, MqttLink, MqttSettings
    from shared.protocol import PREFIX

    link = MqttLink(
        MqttSettings(url=f"mqtt://127.0.0.1:{port}", client_id=f"bench-receive-{os.getpid()}"),
        subscriptions=[(f"$share/{SHARE_GROUP}/{PREFIX}/+/up/#", 1)],
    )
    link.start()
    if not link.wait_connected(10):
        raise RuntimeError("the receiving link did not connect")
    time.sleep(0.5)  # the subscription is acknowledged
    child = start_publisher(port, messages, devices, publishers)
    cpu0 = os.times()
    started = go(child)
    received = 0
    while received < messages:
        if isinstance(link.events.get(timeout=60), Message):
            received += 1
    seconds = time.perf_counter() - started
    cpu1 = os.times()
    json.loads(child.stdout.readline())
    child.wait(30)
    link.stop()
    return {
        "messages": received,
        "seconds": seconds,
        "messages_per_s": received / seconds,
        "process_cpu_s": (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system),
    }


def measure_e2e(
    engine: Any, url: str, port: int, messages: int, devices: int, publishers: int, log: Any
) -> dict[str, Any]:
    from fleet.config import FleetSettings
    from fleet.distribution import BundleRepository
    from fleet.mqtt_bridge import BATCH_SECONDS, MqttBridge
    from shared.protocol import UP_TELEMETRY, device_topic

    settings = FleetSettings(broker=f"mqtt://127.0.0.1:{port}", db=url)
    bridge = MqttBridge(settings, engine, BundleRepository())
    bridge.start()
    if not bridge.link.connected.wait(10):
        raise RuntimeError("the bridge did not connect")
    # Warm-up: one message through the whole path proves the shared subscription is live.
    warm = telemetry("warmup", 0).model_dump_json().encode()
    deadline = time.monotonic() + 10
    while count_rows(engine) < 1:
        bridge.link.publish(device_topic("warmup", UP_TELEMETRY), warm)
        time.sleep(0.1)
        if time.monotonic() > deadline:
            raise RuntimeError("the warm-up message never reached the database")
    target = messages + 1
    batch_sum0 = _hist(BATCH_SECONDS)

    child = start_publisher(port, messages, devices, publishers)
    log(f"publishing {messages} messages from {publishers} connections...")
    cpu0 = os.times()
    threads0 = thread_cpu_s()
    started = go(child)
    seen = 0
    timeline: list[tuple[float, int]] = []
    limit = started + 300
    while seen < target and time.perf_counter() < limit:
        seen = count_rows(engine)
        timeline.append((time.perf_counter() - started, seen - 1))
        time.sleep(POLL_S)
    seconds = time.perf_counter() - started
    cpu1 = os.times()
    threads1 = thread_cpu_s()
    pub = json.loads(child.stdout.readline())
    child.wait(30)
    batch_sum1 = _hist(BATCH_SECONDS)
    bridge.stop()
    stored = seen - 1
    return {
        "messages": messages,
        "stored": stored,
        "seconds": seconds,
        "messages_per_s": stored / seconds,
        "publish_acked_s": pub["acked_s"],
        "publisher_cpu_s": pub["cpu_s"],
        "bridge_process_cpu_s": (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system),
        # paho's network thread, the bridge's parsing and storing threads
        "thread_cpu_s": {
            name: round(cpu - threads0.get(name, 0.0), 2)
            for name, cpu in threads1.items()
            if name.startswith(("paho", "fleet-ingest", "fleet-store"))
        },
        "batches": batch_sum1[0] - batch_sum0[0],
        "batch_store_s": batch_sum1[1] - batch_sum0[1],
        "complete": stored >= messages,
        "timeline": [(round(t, 2), n) for t, n in timeline[:: max(1, len(timeline) // 20)]],
    }


def thread_cpu_s() -> dict[str, float]:
    """CPU seconds (user + system) used so far by each thread of this process, by name."""
    import threading

    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for thread in threading.enumerate():
        try:
            with open(f"/proc/self/task/{thread.native_id}/stat", encoding="ascii") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[thread.name] = (int(fields[11]) + int(fields[12])) / tick
    return out


def _hist(histogram: Any) -> tuple[float, float]:
    count = total = 0.0
    for metric in histogram.collect():
        for sample in metric.samples:
            if sample.name.endswith("_count"):
                count = sample.value
            elif sample.name.endswith("_sum"):
                total = sample.value
    return count, total


def profile(engine: Any, messages: int, devices: int, batch: int) -> dict[str, Any]:
    """The bridge's steps, timed one by one, on up to 20 batches of the same payloads."""
    from sqlmodel import Session

    from fleet import crud
    from shared.jsonsafe import MAX_DEPTH, load_json
    from shared.protocol import (
        MAX_JSON_PAYLOAD,
        UP_TELEMETRY,
        Telemetry,
        device_topic,
        parse_device_topic,
        parse_payload,
    )

    n = min(messages, 20 * batch)
    # New seqs beyond the run's, so the INSERT really inserts (devices exist: the touch updates).
    offset = messages // devices + 1
    work = [(d, s + offset) for d, s in workload(n, devices)]
    msgs = [
        (device_topic(d, UP_TELEMETRY), telemetry(d, s).model_dump_json().encode()) for d, s in work
    ]
    t = time.perf_counter()
    for topic, _ in msgs:
        parse_device_topic(topic)
    topic_s = time.perf_counter() - t
    t = time.perf_counter()
    raws = [
        load_json(p, what="t", max_bytes=MAX_JSON_PAYLOAD, max_depth=MAX_DEPTH) for _, p in msgs
    ]
    json_s = time.perf_counter() - t
    t = time.perf_counter()
    bodies = [Telemetry.model_validate(r) for r in raws]
    pydantic_s = time.perf_counter() - t
    t = time.perf_counter()
    for _, p in msgs:
        parse_payload(Telemetry, p, what="up/telemetry")
    parse_s = time.perf_counter() - t

    touch_s = insert_s = commit_s = 0.0
    batches = 0
    for i in range(0, n, batch):
        chunk = bodies[i : i + batch]
        with Session(engine) as session:
            t0 = time.perf_counter()
            crud._touch_senders(session, chunk)
            t1 = time.perf_counter()
            crud._copy_telemetry(session, chunk)
            t2 = time.perf_counter()
            session.commit()
            t3 = time.perf_counter()
        touch_s += t1 - t0
        insert_s += t2 - t1
        commit_s += t3 - t2
        batches += 1
    per_msg = 1e6 / n
    return {
        "messages": n,
        "batches": batches,
        "us_per_message": {
            "topic_parse": topic_s * per_msg,
            "json_load_checked": json_s * per_msg,
            "pydantic_validate": pydantic_s * per_msg,
            "parse_payload_total": parse_s * per_msg,
            "device_touch": touch_s * per_msg,
            "copy_and_insert": insert_s * per_msg,
            "commit": commit_s * per_msg,
        },
        "ms_per_batch": {
            "device_touch": touch_s * 1e3 / batches,
            "copy_and_insert": insert_s * 1e3 / batches,
            "commit": commit_s * 1e3 / batches,
        },
    }


def run_benchmark(opts: argparse.Namespace, log: Any) -> dict[str, Any]:
    from sqlalchemy import create_engine, text

    from fleet.config import FleetSettings
    from fleet.db import make_engine, migrate

    batch = FleetSettings().ingest_batch
    admin_url = opts.pg.rstrip("/") + "/postgres"
    db_name = f"edgefleet_bench_{uuid.uuid4().hex[:8]}"
    url = opts.pg.rstrip("/") + "/" + db_name
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{db_name}"'))
    engine = make_engine(url)
    broker = None
    try:
        migrate(engine)
        log(f"database {db_name} created and migrated; building {opts.messages} rows...")
        samples = [telemetry(d, s) for d, s in workload(opts.messages, opts.devices)]
        rows = [row_of(t) for t in samples]
        log(f"plain batched INSERT of {len(rows)} rows in batches of {batch}...")
        plain = measure_plain_insert(engine, rows, batch)
        truncate(engine)
        log(f"the bridge's write (COPY, then INSERT ... SELECT) of the same {len(rows)} rows...")
        raw = measure_raw(engine, samples, batch)
        truncate(engine)
        # A fresh broker for each run: the receiving link's session outlives its connection.
        with tempfile.TemporaryDirectory(prefix="edgefleet-bench-ingest-") as tmp_name:
            broker, port = start_broker(Path(tmp_name))
            log("MQTT receive only (nothing parsed or stored)...")
            receive = measure_receive(port, opts.messages, opts.devices, opts.publishers)
            broker.terminate()
            broker.wait(10)
            broker, port = start_broker(Path(tmp_name))
            e2e = measure_e2e(engine, url, port, opts.messages, opts.devices, opts.publishers, log)
        log("profiling the bridge's steps...")
        prof = profile(engine, opts.messages, opts.devices, batch)
    finally:
        if broker is not None:
            broker.terminate()
            broker.wait(10)
        engine.dispose()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)'))
        admin.dispose()

    ratio = e2e["messages_per_s"] / raw["rows_per_s"]
    return {
        "benchmark": "ingest",
        "command": shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv])),
        "machine": machine_info(),
        "broker": "mosquitto, plaintext loopback listener (no TLS), QoS 1",
        "database": "PostgreSQL, fresh database per run: " + opts.pg.split("@")[-1],
        "devices": opts.devices,
        "messages": opts.messages,
        "publishers": opts.publishers,
        "ingest_batch": batch,
        "raw": raw,
        "plain_insert": plain,
        "receive_only": receive,
        "end_to_end": e2e,
        "e2e_vs_raw": round(ratio, 3),
        "profile": prof,
        "goals": {"messages_per_s_min": RATE_GOAL, "e2e_vs_raw_min": RATIO_GOAL},
        "goal_met": {
            "rate": e2e["complete"] and e2e["messages_per_s"] >= RATE_GOAL,
            "ratio": e2e["complete"] and ratio >= RATIO_GOAL,
        },
    }


def print_report(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console.width = max(console.width, 130)
    m = report["machine"]
    console.print(f"[bold]command:[/] {report['command']}")
    console.print(
        f"[bold]machine:[/] {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), "
        f"Python {m['python']}, mosquitto {m['mosquitto']}, paho-mqtt {m['paho_mqtt']}, "
        f"SQLAlchemy {m['sqlalchemy']}, psycopg {m['psycopg']}, {m['os']}; load average "
        f"{m['load_average'][0]:.1f} at the end"
    )
    console.print(f"[bold]broker:[/] {report['broker']}; [bold]db:[/] {report['database']}")
    raw, receive, e2e = report["raw"], report["receive_only"], report["end_to_end"]
    plain = report["plain_insert"]
    table = Table(
        title=f"telemetry ingest: {report['messages']} messages from {report['devices']} devices, "
        f"batches of {report['ingest_batch']}"
    )
    for col in ("path", "rows stored", "seconds", "rows/s", "vs raw"):
        table.add_column(col, justify="left" if col == "path" else "right")
    table.add_row(
        "raw: the bridge's write, COPY + INSERT (limit)", str(raw["rows"]), f"{raw['seconds']:.2f}",
        f"{raw['rows_per_s']:,.0f}", "1.00",
    )  # fmt: skip
    table.add_row(
        "plain batched INSERT (executemany)", str(plain["rows"]), f"{plain['seconds']:.2f}",
        f"{plain['rows_per_s']:,.0f}", f"{plain['rows_per_s'] / raw['rows_per_s']:.2f}",
    )  # fmt: skip
    table.add_row(
        "MQTT receive only (nothing stored)", "-", f"{receive['seconds']:.2f}",
        f"{receive['messages_per_s']:,.0f}", f"{receive['messages_per_s'] / raw['rows_per_s']:.2f}",
    )  # fmt: skip
    table.add_row(
        "end to end: publish -> bridge -> PostgreSQL", str(e2e["stored"]),
        f"{e2e['seconds']:.2f}", f"{e2e['messages_per_s']:,.0f}", f"{report['e2e_vs_raw']:.2f}",
    )  # fmt: skip
    console.print(table)
    console.print(
        f"end to end: the broker acknowledged every publish in {e2e['publish_acked_s']:.2f} s "
        f"(publisher CPU {e2e['publisher_cpu_s']:.1f} s); bridge "
        f"process CPU {e2e['bridge_process_cpu_s']:.1f} s; {e2e['batches']:.0f} batches stored "
        f"in {e2e['batch_store_s']:.2f} s"
    )
    per_thread = ", ".join(
        f"{name.split('-client-')[0]} {cpu:.2f} s ({cpu * 1e6 / e2e['messages']:.0f} µs/message)"
        for name, cpu in e2e["thread_cpu_s"].items()
    )
    console.print(f"bridge threads' CPU: {per_thread}")
    prof = report["profile"]
    ptable = Table(title=f"bridge steps, in process ({prof['messages']} messages)")
    ptable.add_column("step")
    ptable.add_column("µs per message", justify="right")
    for step, us in prof["us_per_message"].items():
        ptable.add_row(step, f"{us:.1f}")
    console.print(ptable)
    met = report["goal_met"]

    def verdict(ok: bool) -> str:
        return "[green]MET[/]" if ok else "[red]NOT MET[/]"

    console.print(
        f"end to end = {e2e['messages_per_s']:,.0f} messages/s (goal >= {RATE_GOAL:,.0f}): "
        f"{verdict(met['rate'])}"
    )
    console.print(
        f"end to end / raw = {report['e2e_vs_raw']:.2f} (goal >= {RATIO_GOAL:.2f}): "
        f"{verdict(met['ratio'])}"
    )


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--publisher":
        publisher_main(sys.argv[2])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=50_000, help="default 50000")
    parser.add_argument("--devices", type=int, default=1000, help="default 1000")
    parser.add_argument(
        "--publishers", type=int, default=3, help="publishing connections (default 3)"
    )
    parser.add_argument(
        "--pg", default="postgresql+psycopg://postgres@127.0.0.1:5432", help="server URL, no db"
    )
    parser.add_argument("--json", action="store_true", help="print a JSON object instead")
    opts = parser.parse_args()
    if opts.messages < opts.devices or opts.devices < 1 or not 1 <= opts.publishers <= 16:
        parser.error("need --messages >= --devices >= 1 and 1 <= --publishers <= 16")

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    report = run_benchmark(opts, log)
    if opts.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print_report(report)


if __name__ == "__main__":
    main()
