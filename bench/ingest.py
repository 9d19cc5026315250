"""Benchmark: telemetry ingest end to end (broker to PostgreSQL), against a raw batched insert.

One command::

    .venv/bin/python bench/ingest.py [--messages 50000] [--devices 1000] [--publishers 3] [--json]

Set-up: a fresh PostgreSQL database (``--pg``, default ``postgresql+psycopg://postgres@127.0.0.1:
5432``) is created for the run, migrated with :func:`fleet.db.migrate` and dropped at the end. A
mosquitto broker is started on a **plaintext loopback listener** (free port, anonymous,
``max_queued_messages 1000000``, ``set_tcp_nodelay true``); the broker ACL is not used.

The same ``--messages`` telemetry rows (devices ``dev-0000``..``dev-0999``, several reports
each, increasing ``seq``) are stored twice:

- ``raw`` (the limit): SQLAlchemy Core ``insert(telemetrysample).values(batch)`` in batches of
  the bridge's ``ingest_batch`` rows, one transaction per batch, from already-built row dicts.
- ``end to end``: :class:`fleet.mqtt_bridge.MqttBridge` runs in this process with default
  settings; a child process holding ``--publishers`` paho clients (payloads JSON-encoded
  beforehand) publishes every message with QoS 1 as fast as the broker acknowledges. The time
  runs from the first publish to the moment ``SELECT count(*) FROM telemetrysample`` (polled
  every 10 ms) reaches the number of messages.

Then a short in-process profile of the bridge's own steps on the same payloads (topic and JSON
parsing, pydantic validation, the Device touch, the INSERT, the commit) says where the time goes.

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
import threading
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


def publisher_main(spec: str) -> None:
    """Connect the clients, say ``ready``, wait for ``go`` on stdin, publish, report."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    from shared.protocol import UP_TELEMETRY, device_topic

    args = json.loads(spec)
    work = workload(args["messages"], args["devices"])
    n_clients = args["publishers"]
    shards: list[list[tuple[str, bytes]]] = [[] for _ in range(n_clients)]
    for i, (device_id, seq) in enumerate(work):
        payload = telemetry(device_id, seq).model_dump_json().encode()
        shards[i % n_clients].append((device_topic(device_id, UP_TELEMETRY), payload))

    clients = []
    acked = [0] * n_clients
    done = [threading.Event() for _ in range(n_clients)]
    for k in range(n_clients):

        def on_publish(client: Any, userdata: Any, mid: Any, reason: Any, props: Any, k=k) -> None:
            acked[k] += 1
            if acked[k] == len(shards[k]):
                done[k].set()

        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"bench-pub-{k}-{os.getpid()}",
            protocol=paho.MQTTv5,
        )
        client.max_inflight_messages_set(1000)
        client.max_queued_messages_set(0)
        client.on_publish = on_publish
        client.connect("127.0.0.1", args["port"])
        client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.loop_start()
        clients.append(client)
    time.sleep(0.3)
    print("ready", flush=True)
    sys.stdin.readline()
    started = time.perf_counter()

    def run(k: int) -> None:
        for topic, payload in shards[k]:
            client = clients[k]
            client.publish(topic, payload, qos=1)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    published = time.perf_counter() - started
    for event in done:
        event.wait(300)
    acked_s = time.perf_counter() - started
    for client in clients:
        client.disconnect()
        client.loop_stop()
    cpu = os.times()
    out = {"publish_s": published, "acked_s": acked_s, "acked": sum(acked)}
    out["cpu_s"] = cpu.user + cpu.system
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
    from bench.bundle import machine_info as base

    info = base()
    try:
        info["mosquitto"] = (
            subprocess.run([MOSQUITTO, "-h"], capture_output=True, text=True, check=False)
            .stdout.splitlines()[0]
            .removeprefix("mosquitto version ")
        )
    except (OSError, IndexError):
        info["mosquitto"] = "unknown"
    import paho.mqtt
    import sqlalchemy

    info["paho_mqtt"] = paho.mqtt.__version__
    info["sqlalchemy"] = sqlalchemy.__version__
    info["load_average"] = list(os.getloadavg())
    return info


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


def measure_raw(engine: Any, rows: list[dict[str, Any]], batch: int) -> dict[str, Any]:
    from sqlalchemy import insert

    from fleet.models import TelemetrySample

    table = TelemetrySample.__table__
    started = time.perf_counter()
    for i in range(0, len(rows), batch):
        with engine.begin() as conn:
            conn.execute(insert(table).values(rows[i : i + batch]))
    seconds = time.perf_counter() - started
    stored = count_rows(engine)
    return {"rows": stored, "seconds": seconds, "rows_per_s": len(rows) / seconds}


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

    spec = json.dumps(
        {"messages": messages, "devices": devices, "publishers": publishers, "port": port}
    )
    child = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--publisher", spec],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdin is not None
    assert child.stdout is not None
    if child.stdout.readline().strip() != "ready":
        raise RuntimeError("the publisher child failed")
    log(f"publishing {messages} messages from {publishers} clients...")
    cpu0 = os.times()
    started = time.perf_counter()
    child.stdin.write("go\n")
    child.stdin.flush()
    seen = 0
    timeline: list[tuple[float, int]] = []
    limit = started + 300
    while seen < target and time.perf_counter() < limit:
        seen = count_rows(engine)
        timeline.append((time.perf_counter() - started, seen - 1))
        time.sleep(0.01)
    seconds = time.perf_counter() - started
    cpu1 = os.times()
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
        "publish_s": pub["publish_s"],
        "publish_acked_s": pub["acked_s"],
        "publisher_cpu_s": pub["cpu_s"],
        "bridge_process_cpu_s": (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system),
        "batches": batch_sum1[0] - batch_sum0[0],
        "batch_store_s": batch_sum1[1] - batch_sum0[1],
        "complete": stored >= messages,
        "timeline": [(round(t, 2), n) for t, n in timeline[:: max(1, len(timeline) // 20)]],
    }


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
    from fleet.models import TelemetrySample
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
            crud._insert_ignore(session, TelemetrySample, [row_of(b) for b in chunk])
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
            "insert_on_conflict": insert_s * per_msg,
            "commit": commit_s * per_msg,
        },
        "ms_per_batch": {
            "device_touch": touch_s * 1e3 / batches,
            "insert_on_conflict": insert_s * 1e3 / batches,
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
        rows = [row_of(telemetry(d, s)) for d, s in workload(opts.messages, opts.devices)]
        with tempfile.TemporaryDirectory(prefix="edgefleet-bench-ingest-") as tmp_name:
            broker, port = start_broker(Path(tmp_name))
            log(f"raw batched insert of {len(rows)} rows in batches of {batch}...")
            raw = measure_raw(engine, rows, batch)
            truncate(engine)
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
        f"SQLAlchemy {m['sqlalchemy']}, {m['os']}"
    )
    console.print(f"[bold]broker:[/] {report['broker']}; [bold]db:[/] {report['database']}")
    raw, e2e = report["raw"], report["end_to_end"]
    table = Table(
        title=f"telemetry ingest: {report['messages']} messages from {report['devices']} devices, "
        f"batches of {report['ingest_batch']}"
    )
    for col in ("path", "rows stored", "seconds", "rows/s", "vs raw"):
        table.add_column(col, justify="left" if col == "path" else "right")
    table.add_row(
        "raw batched INSERT (limit)", str(raw["rows"]), f"{raw['seconds']:.2f}",
        f"{raw['rows_per_s']:,.0f}", "1.00",
    )  # fmt: skip
    table.add_row(
        "end to end: publish -> bridge -> PostgreSQL", str(e2e["stored"]),
        f"{e2e['seconds']:.2f}", f"{e2e['messages_per_s']:,.0f}", f"{report['e2e_vs_raw']:.2f}",
    )  # fmt: skip
    console.print(table)
    console.print(
        f"publishers: all published in {e2e['publish_s']:.2f} s, all acknowledged in "
        f"{e2e['publish_acked_s']:.2f} s (child CPU {e2e['publisher_cpu_s']:.1f} s); bridge "
        f"process CPU {e2e['bridge_process_cpu_s']:.1f} s; {e2e['batches']:.0f} batches stored "
        f"in {e2e['batch_store_s']:.2f} s"
    )
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
    parser.add_argument("--publishers", type=int, default=3, help="paho clients (default 3)")
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
