"""Benchmark: fleet API latency of the device list, 10,000 devices, 50 concurrent clients.

One command::

    .venv/bin/python bench/api.py [--devices 10000] [--clients 50] [--duration 20]
        [--page-cache-s S] [--json]

For each database (a fresh PostgreSQL database, dropped at the end, and SQLite, the embedded
default) it:

- migrates the schema and bulk-inserts ``--devices`` devices with one ``DeviceModel`` row each;
- starts the fleet service as shipped (``create_app(settings)`` under ``uvicorn.run``, one
  worker, in a child process; ``EDGEFLEET_ADMIN_TOKEN`` bootstraps the token the clients use);
- from a second child process, runs ``--clients`` concurrent clients, each on its own keep-alive
  HTTP/1.1 connection, sending ``GET /api/v1/devices`` with ``Authorization: Bearer`` back to
  back (closed loop, no think time) for ``--duration`` seconds after ``--warmup`` seconds. The
  client is a minimal asyncio HTTP/1.1 client (much less CPU per request than httpx, which
  matters when client and server share the machine). Every response is checked (status 200,
  Content-Length body; the first answer is checked for the expected number of devices).
- Two cases: ``limit=100``, the page a console shows (the goal applies to it), and the whole
  fleet, page after page of the largest page (``limit=1000``) following each ``Link: rel="next"``
  header, as ``edgefleet device list`` does (reported; a latency sample is a whole walk, and
  under load each client walks once, all at the same time). Each case is also run with a
  single client for ``--single-s`` seconds (latency without queueing).
- The limit: the query the endpoint runs for the same page (``crud.device_page``: one
  statement, whose rows pydantic reads), for every page in the whole-fleet case, on one
  connection, sequentially, no HTTP.
- ``--page-cache-s`` sets the service's ``device_list_cache_s`` (how long it reuses an answer
  for the same query; 1 s by default). All the clients ask for the same page, so with the
  cache nearly every request is answered from memory; ``--page-cache-s 0`` measures the page
  read on every request.

The server's CPU time during the load (``utime + stime`` from ``/proc``) is reported too: a figure
near 1.0 core means the single service process is CPU bound.

Goal (from the issue): API p99 latency for the device list with 10,000 devices under 50
concurrent clients <= 100 ms. The exit status is 0 whether or not the goal is met.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
GOAL_P99_MS = 100.0
TOKEN = "ef_bench-api-token-not-a-secret-0123456789"
PAGE_CASE = "page"  # one page of --page devices: the goal applies here
WALK_CASE = "every page"  # the whole fleet, page after page of MAX_PAGE, following the Link
DEFAULT_PG = "postgresql+psycopg://postgres@127.0.0.1:5432"


# -- child side: the server ----------------------------------------------------------------------


def serve_main(spec: str) -> None:
    args = json.loads(spec)
    sys.path.insert(0, str(REPO))
    import uvicorn

    from fleet.app import create_app
    from fleet.config import FleetSettings

    cache = {} if args["page_cache_s"] is None else {"device_list_cache_s": args["page_cache_s"]}
    settings = FleetSettings(
        data_dir=Path(args["data_dir"]),
        db=args["db"],
        keys=Path(args["keys"]),
        port=args["port"],
        **cache,
    )
    uvicorn.run(
        create_app(settings),
        host="127.0.0.1",
        port=args["port"],
        workers=1,
        log_level="warning",
        access_log=False,
    )


# -- child side: the load ------------------------------------------------------------------------


async def _request(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: bytes
) -> tuple[int, str | None, bytes]:
    """Send one request; return the status, the ``rel="next"`` link if any, and the body."""
    writer.write(raw)
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length = None
    following = None
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == "link" and 'rel="next"' in value:
            following = value.strip().partition(">")[0].removeprefix("<")
    if length is None:
        raise RuntimeError(f"no Content-Length in the response: {head!r}")
    body = await reader.readexactly(length)
    return status, following, body


def _get(path: str, port: int, token: str) -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Authorization: Bearer {token}\r\nAccept: application/json\r\n\r\n"
    ).encode()


async def _walk(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, args: dict[str, Any]
) -> tuple[int, int, int]:
    """GET the first page, and with ``walk`` every next page too, as a client of the API would.

    Returns the worst status, the number of devices and the number of body bytes."""
    path: str | None = f"/api/v1/devices?limit={args['limit']}"
    worst = items = size = 0
    while path is not None:
        status, following, body = await _request(
            reader, writer, _get(path, args["port"], args["token"])
        )
        worst = max(worst, status)
        size += len(body)
        items += body.count(b'"id":')
        path = following if args["walk"] and status == 200 else None
    return worst, items, size


async def _load(args: dict[str, Any]) -> dict[str, Any]:
    clients, limit = args["clients"], args["limit"]
    conns = [await asyncio.open_connection("127.0.0.1", args["port"]) for _ in range(clients)]
    for _, writer in conns:
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    status, items, body_bytes = await _walk(*conns[0], args)  # check one answer in full
    expected = args["devices"] if args["walk"] else min(limit, args["devices"])
    if status != 200 or items != expected:
        raise RuntimeError(f"expected HTTP 200 and {expected} devices, got {status} and {items}")
    start = time.perf_counter()
    per_client = args.get("per_client")  # fixed requests per client, all measured, no warm-up
    measure_from = start if per_client else start + args["warmup"]
    stop_at = float("inf") if per_client else measure_from + args["duration"]
    latencies: list[float] = []
    errors = 0

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal errors
        done = 0
        while True:
            t0 = time.perf_counter()
            if t0 >= stop_at or (per_client and done >= per_client):
                return
            done += 1
            status, _, _ = await _walk(reader, writer, args)
            if t0 >= measure_from:
                latencies.append(time.perf_counter() - t0)
                if status != 200:
                    errors += 1

    cpu0 = time.process_time()
    await asyncio.gather(*(client(r, w) for r, w in conns))
    end = time.perf_counter()
    cpu = time.process_time() - cpu0
    for _, writer in conns:
        writer.close()
    return {
        "latencies": latencies,
        "errors": errors,
        "window_s": end - measure_from,
        "elapsed_s": end - start,
        "body_bytes": body_bytes,
        "client_cpu_s": cpu,
    }


def load_main(spec: str) -> None:
    result = asyncio.run(_load(json.loads(spec)))
    sys.stdout.write(json.dumps(result) + "\n")


# -- parent side ---------------------------------------------------------------------------------


def _free_port() -> int:
    sys.path.insert(0, str(REPO))
    from bench import common

    return common.free_port()


def machine_info() -> dict[str, Any]:
    sys.path.insert(0, str(REPO))
    import fastapi
    import sqlalchemy
    import uvicorn

    from bench import common

    return common.machine_info(
        fastapi=fastapi.__version__,
        uvicorn=uvicorn.__version__,
        sqlalchemy=sqlalchemy.__version__,
        load_average=list(os.getloadavg()),  # other work on the machine moves every figure
    )


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile of a sorted list."""
    index = max(0, min(len(values) - 1, math.ceil(q / 100 * len(values)) - 1))
    return values[index]


def _summary_ms(seconds: list[float]) -> dict[str, float]:
    ms = sorted(s * 1000 for s in seconds)
    if not ms:
        return {k: float("nan") for k in ("p50", "p95", "p99", "max", "mean")}
    return {
        "p50": round(_percentile(ms, 50), 3),
        "p95": round(_percentile(ms, 95), 3),
        "p99": round(_percentile(ms, 99), 3),
        "max": round(ms[-1], 3),
        "mean": round(statistics.fmean(ms), 3),
    }


def populate(engine: Any, devices: int) -> None:
    """Migrate, then bulk-insert ``devices`` devices and one DeviceModel row each."""
    from sqlalchemy import insert

    from fleet.db import migrate
    from fleet.models import Device, DeviceModel

    migrate(engine)
    now = datetime.now(UTC)
    rows = [
        {
            "id": f"dev-{i:05d}",
            "hardware_class": ("jetson-orin", "rpi5", "x86-cpu")[i % 3],
            "group": f"site-{i % 20:02d}",
            "labels": {"site": f"site-{i % 20:02d}"},
            "inventory": None,
            "online": i % 4 != 0,
            "enrolled_at": now - timedelta(days=30),
            "last_seen": now - timedelta(seconds=i % 600),
            "last_state_seq": 0,
            "pinned": {},
            "order_sequence": 0,
        }
        for i in range(devices)
    ]
    models = [
        {
            "device_id": f"dev-{i:05d}",
            "model": "detector",
            "version": "1.4.2",
            "runtime": "onnxruntime",
            "previous_version": "1.4.1",
            "state": "committed",
            "updated_at": now,
        }
        for i in range(devices)
    ]
    with engine.begin() as conn:
        conn.execute(insert(Device.__table__), rows)  # type: ignore[attr-defined]
        conn.execute(insert(DeviceModel.__table__), models)  # type: ignore[attr-defined]


def sql_limit(engine: Any, limit: int, repeat: int, *, walk: bool = False) -> dict[str, Any]:
    """Time the endpoint's query for one page, or for every page with ``walk``
    (``crud.device_page``: the statement, and pydantic reading its rows), on one connection,
    sequentially, without HTTP (the limit)."""
    from fleet import crud

    times = []
    with crud.reading(engine) as conn:
        for i in range(repeat + 3):
            t0 = time.perf_counter()
            after, rows = None, 0
            while True:
                page = crud.device_page(conn, limit=limit, after=after)
                rows += len(page)
                if not walk or len(page) < limit:
                    break
                after = page[-1]["id"]
            if i >= 3:  # three warm-up rounds
                times.append(time.perf_counter() - t0)
    return {"runs": repeat, "rows": rows, **_summary_ms(times)}


def run_load(port: int, server_pid: int, **args: Any) -> dict[str, Any]:
    spec = json.dumps({"port": port, "token": TOKEN, **args})
    cpu0 = _cpu_seconds(server_pid)
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--load", spec],
        capture_output=True,
        text=True,
        check=False,
    )
    server_cpu = _cpu_seconds(server_pid) - cpu0
    if proc.returncode != 0:
        raise RuntimeError(f"load failed (exit {proc.returncode}):\n{proc.stderr}")
    raw = json.loads(proc.stdout.strip().splitlines()[-1])
    n = len(raw["latencies"])
    total_s = raw["elapsed_s"]
    return {
        "clients": args["clients"],
        "limit": args["limit"],
        "walk": args["walk"],
        "requests": n,
        "errors": raw["errors"],
        "requests_per_s": round(n / raw["window_s"], 1),
        "latency_ms": _summary_ms(raw["latencies"]),
        "body_bytes": raw["body_bytes"],
        "per_client": args.get("per_client"),
        # over warm-up + measurement: CPU cores kept busy on average
        "server_cpu_cores": round(server_cpu / total_s, 2),
        "client_cpu_cores": round(raw["client_cpu_s"] / raw["window_s"], 2),
    }


def _wait_ready(port: int, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode})")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("the server did not become ready")


def bench_backend(
    name: str, url: str, tmp: Path, keys: Path, opts: argparse.Namespace, log: Any
) -> dict[str, Any]:
    from fleet.api import MAX_PAGE
    from fleet.db import make_engine

    engine = make_engine(url)
    try:
        log(f"[{name}] migrating and inserting {opts.devices} devices...")
        t0 = time.perf_counter()
        populate(engine, opts.devices)
        insert_s = time.perf_counter() - t0
        log(f"[{name}] SQL limit (Core queries, sequential)...")
        limits = {
            PAGE_CASE: sql_limit(engine, opts.page, 300),
            WALK_CASE: sql_limit(engine, MAX_PAGE, 20, walk=True),
        }
    finally:
        engine.dispose()

    port = _free_port()
    spec = {
        "data_dir": str(tmp / f"data-{name}"),
        "db": url,
        "keys": str(keys),
        "port": port,
        "page_cache_s": opts.page_cache_s,
    }
    env = {**os.environ, "EDGEFLEET_ADMIN_TOKEN": TOKEN}
    server = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--serve", json.dumps(spec)], env=env
    )
    cases: dict[str, Any] = {}
    try:
        _wait_ready(port, server)
        common = {"devices": opts.devices, "warmup": opts.warmup}
        page = {"limit": opts.page, "walk": False}
        log(f"[{name}] limit={opts.page}: 1 client for {opts.single_s:g} s...")
        single = run_load(port, server.pid, clients=1, duration=opts.single_s, **page, **common)
        log(f"[{name}] limit={opts.page}: {opts.clients} clients for {opts.duration:g} s...")
        loaded = run_load(
            port, server.pid, clients=opts.clients, duration=opts.duration, **page, **common
        )
        cases[PAGE_CASE] = {"loaded": loaded, "single": single, "sql": limits[PAGE_CASE]}

        walk = {"limit": MAX_PAGE, "walk": True}
        log(f"[{name}] every page of {MAX_PAGE}: 1 client for {opts.single_s:g} s...")
        single = run_load(port, server.pid, clients=1, duration=opts.single_s, **walk, **common)
        log(f"[{name}] every page of {MAX_PAGE}: {opts.clients} clients, one walk each...")
        loaded = run_load(
            port, server.pid, clients=opts.clients, duration=0, per_client=1, **walk, **common
        )
        cases[WALK_CASE] = {"loaded": loaded, "single": single, "sql": limits[WALK_CASE]}
    finally:
        server.terminate()
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    return {"database": name, "insert_s": round(insert_s, 2), "cases": cases}


def _pg_admin(base: str, sql: str) -> None:
    import psycopg

    dsn = base.replace("postgresql+psycopg://", "postgresql://") + "/postgres"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql)  # type: ignore[arg-type]


def run_benchmark(opts: argparse.Namespace, log: Any) -> dict[str, Any]:
    sys.path.insert(0, str(REPO))
    from shared.keystore import KeyStore

    results: list[dict[str, Any]] = []
    load_before = list(os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-api-") as tmp_name:
        tmp = Path(tmp_name)
        keys = tmp / "keys"
        KeyStore.create(keys, now=datetime.now(UTC))
        for backend in opts.databases.split(","):
            if backend == "postgresql":
                dbname = f"edgefleet_bench_api_{os.getpid()}"
                _pg_admin(opts.pg, f'DROP DATABASE IF EXISTS "{dbname}"')
                _pg_admin(opts.pg, f'CREATE DATABASE "{dbname}"')
                try:
                    results.append(
                        bench_backend(backend, f"{opts.pg}/{dbname}", tmp, keys, opts, log)
                    )
                finally:
                    _pg_admin(opts.pg, f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
            elif backend == "sqlite":
                url = f"sqlite:///{tmp / 'fleet.db'}"
                results.append(bench_backend(backend, url, tmp, keys, opts, log))
            else:
                raise SystemExit(f"unknown database {backend!r} (postgresql, sqlite)")

    page = str(opts.page)
    goal = {r["database"]: r["cases"][PAGE_CASE]["loaded"]["latency_ms"]["p99"] for r in results}
    return {
        "benchmark": "api",
        "command": shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv])),
        "machine": {**machine_info(), "load_average_before": load_before},
        "units": {"latency": "ms", "throughput": "requests/s", "cpu": "cores (CPU s per s)"},
        "page_cache_s": _page_cache_s(opts),
        "request": f"GET /api/v1/devices?limit={page} (one page), and every page of the whole "
        "fleet by limit=1000, following each Link header; Authorization: Bearer; closed loop, "
        "one keep-alive connection per client",
        "devices": opts.devices,
        "clients": opts.clients,
        "duration_s": opts.duration,
        "warmup_s": opts.warmup,
        "results": results,
        "goals": {"p99_ms_max": GOAL_P99_MS, "applies_to": f"limit={page}, {opts.clients} clients"},
        "p99_ms": goal,
        "goal_met": {db: p99 <= GOAL_P99_MS for db, p99 in goal.items()},
    }


def _page_cache_s(opts: argparse.Namespace) -> float:
    """The device_list_cache_s the service runs with."""
    if opts.page_cache_s is not None:
        return float(opts.page_cache_s)
    sys.path.insert(0, str(REPO))
    from fleet.config import FleetSettings

    return float(FleetSettings.model_fields["device_list_cache_s"].default)


def print_report(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console.width = max(console.width, 150)
    m = report["machine"]
    console.print(f"[bold]command:[/] {report['command']}")
    console.print(
        f"[bold]machine:[/] {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), "
        f"Python {m['python']}, FastAPI {m['fastapi']}, uvicorn {m['uvicorn']}, "
        f"SQLAlchemy {m['sqlalchemy']}, {m['os']}; load average before/after "
        f"{m['load_average_before'][0]:.1f}/{m['load_average'][0]:.1f}"
    )
    console.print(f"[bold]request:[/] {report['request']}")
    console.print(
        f"[bold]page cache:[/] the service reuses an answer for {report['page_cache_s']:g} s "
        "(device_list_cache_s; 0: every request reads its page)"
    )
    table = Table(
        title=f"fleet API, device list, {report['devices']} devices "
        f"({report['duration_s']:g} s per loaded case, latency in ms)"
    )
    columns = (
        "database",
        "limit",
        "case",
        "requests",
        "req/s",
        "p50",
        "p95",
        "p99",
        "max",
        "errors",
        "server CPU",
        "client CPU",
        "body KB",
    )
    for col in columns:
        table.add_column(col, justify="left" if col in ("database", "case") else "right")
    for r in report["results"]:
        for case_name, case in r["cases"].items():
            limit = f"{case['single']['limit']}" + (
                ", every page" if case_name == WALK_CASE else ""
            )
            sql = case["sql"]
            table.add_row(
                r["database"],
                limit,
                "SQL limit (Core, sequential)",
                str(sql["runs"]),
                f"{1000 / sql['p50']:.0f}",
                f"{sql['p50']:.2f}",
                f"{sql['p95']:.2f}",
                f"{sql['p99']:.2f}",
                f"{sql['max']:.2f}",
                "",
                "",
                "",
                "",
            )
            for key in ("single", "loaded"):
                s = case[key]
                label = f"{s['clients']} client" + ("s" if s["clients"] > 1 else "")
                if s["per_client"]:
                    label += ", one walk each" if s["walk"] else f", {s['per_client']} req each"
                lat = s["latency_ms"]
                table.add_row(
                    r["database"],
                    limit,
                    label,
                    str(s["requests"]),
                    f"{s['requests_per_s']:.0f}",
                    f"{lat['p50']:.2f}",
                    f"{lat['p95']:.2f}",
                    f"{lat['p99']:.2f}",
                    f"{lat['max']:.2f}",
                    str(s["errors"]),
                    f"{s['server_cpu_cores']:.2f}",
                    f"{s['client_cpu_cores']:.2f}",
                    f"{s['body_bytes'] / 1000:.1f}",
                )
        table.add_section()
    console.print(table)
    for db, p99 in report["p99_ms"].items():
        ok = report["goal_met"][db]
        console.print(
            f"{db}: p99 {p99:.1f} ms for {report['goals']['applies_to']} "
            f"(goal <= {GOAL_P99_MS:.0f} ms): {'[green]MET[/]' if ok else '[red]NOT MET[/]'}"
        )


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--serve":
        serve_main(sys.argv[2])
        return
    if len(sys.argv) == 3 and sys.argv[1] == "--load":
        load_main(sys.argv[2])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=10_000, help="fleet size (default 10000)")
    parser.add_argument("--clients", type=int, default=50, help="concurrent clients (default 50)")
    parser.add_argument("--page", type=int, default=100, help="page size, limit= (default 100)")
    parser.add_argument("--duration", type=float, default=20, help="seconds per loaded case")
    parser.add_argument("--warmup", type=float, default=3, help="warm-up seconds per case")
    parser.add_argument("--single-s", type=float, default=5, help="seconds of the 1-client case")
    parser.add_argument("--databases", default="postgresql,sqlite", help="comma-separated")
    parser.add_argument("--pg", default=DEFAULT_PG, help="PostgreSQL server URL")
    parser.add_argument(
        "--page-cache-s",
        type=float,
        default=None,
        help="the service's device_list_cache_s (default: its own default); 0 reads every page",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON object instead")
    opts = parser.parse_args()
    if opts.devices < 1 or opts.clients < 1 or opts.page < 1 or opts.duration <= 0:
        parser.error("--devices, --clients, --page must be >= 1 and --duration > 0")

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    report = run_benchmark(opts, log)
    if opts.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)


if __name__ == "__main__":
    main()
