"""``edgefleet agent``: commands that run on a device."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from shared.bundle import check_payload, open_bundle
from shared.cli.common import console, err_console, print_json
from shared.errors import UsageError

app = typer.Typer(
    help="Device agent: the daemon, its local state and runtime probing.", no_args_is_help=True
)


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgefleet" / "runtime-decisions"


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


@app.command("probe")
def probe(
    bundle: Annotated[Path | None, typer.Option(help="A bundle to choose a runtime for.")] = None,
    objective: Annotated[
        str, typer.Option(help="latency (median), p99 or throughput.")
    ] = "latency",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    cache_dir: Annotated[Path | None, typer.Option(help="Where decisions are remembered.")] = None,
    no_cache: Annotated[
        bool, typer.Option(help="Measure again even if a decision exists.")
    ] = False,
    timeout: Annotated[float, typer.Option(help="Seconds each candidate may take.")] = 60.0,
) -> None:
    """Show this device's accelerators and runtimes; with --bundle, measure and pick a runtime.

    Every candidate (artifact format x runtime x device x settings) runs in a child process with a
    time limit, is checked against the bundle's golden outputs, and is ranked by the objective.
    """
    from agent.runtimes.cache import DecisionCache
    from agent.runtimes.inventory import scan
    from agent.runtimes.probe import probe_model
    from agent.runtimes.registry import BACKENDS
    from agent.runtimes.selection import OBJECTIVES
    from agent.runtimes.trial import TrialSettings, Worker

    if objective not in OBJECTIVES:
        raise UsageError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    inventory = scan()
    if bundle is None:
        statuses = []
        for path in BACKENDS.values():
            worker = Worker(path)
            try:
                statuses.append(worker.status(timeout))
            finally:
                worker.close()
        for s in statuses:
            if s.installed:
                inventory = inventory.with_runtime_devices(s.name, s.devices)
        if as_json:
            print_json(
                {
                    "inventory": {
                        **inventory.to_dict(),
                        "runtimes": [s.to_dict() for s in statuses],
                    },
                    "candidates": [],
                    "selected": None,
                }
            )
            return
        _print_inventory(inventory.to_dict(), [s.to_dict() for s in statuses])
        return

    cache = None if no_cache else DecisionCache(cache_dir or _default_cache_dir())
    stream, reader, header, first = open_bundle(bundle)
    with stream, tempfile.TemporaryDirectory(prefix="edgefleet-probe-") as scratch:
        model_root = Path(scratch) / "model"
        check_payload(reader, header.manifest, first, dest=model_root)
        say = None if as_json else (lambda msg: err_console.print(f"  trying {msg}", style="dim"))
        report = probe_model(
            model_root,
            header.manifest,
            bundle_digest=hashlib.sha256(header.manifest_bytes).hexdigest(),
            inventory=inventory,
            objective=objective,
            cache=cache,
            settings=TrialSettings(timeout_s=timeout),
            progress=say,
        )
    data = report.to_dict()
    if as_json:
        print_json(data)
        return
    _print_inventory(data["inventory"], data["inventory"]["runtimes"])
    _print_ranking(data, header.manifest.name)


def _print_inventory(inventory: dict[str, Any], runtimes: list[dict[str, Any]]) -> None:
    cpu = inventory["cpu"]
    console.print(
        f"[bold]device[/] {inventory['hardware_class']} (fingerprint "
        f"{inventory['fingerprint']}): {cpu['model']}, {cpu['cores']} cores, "
        f"flags {' '.join(sorted(cpu['flags'])) or 'none'}"
    )
    for acc in inventory["accelerators"]:
        console.print(f"  accelerator {acc['kind']}: {acc['name']}")
    if not inventory["accelerators"]:
        console.print("  no accelerators found")
    for rt in runtimes:
        if rt["installed"]:
            console.print(f"  runtime {rt['name']} {rt['version']}: {', '.join(rt['devices'])}")
        else:
            console.print(f"  runtime {rt['name']}: [yellow]{rt['reason']}[/]")


def _print_ranking(data: dict[str, Any], model: str) -> None:
    ranking = {key: i + 1 for i, key in enumerate(data["ranking"])}
    table = Table(
        title=f"{model}: candidates ranked by {data['objective']}"
        + (" (from cache)" if data["from_cache"] else "")
    )
    for column in (
        "rank",
        "runtime",
        "device",
        "artifact",
        "settings",
        "load ms",
        "p50 ms",
        "p99 ms",
        "max abs err",
        "verdict",
    ):
        table.add_column(column, overflow="fold")
    rows = sorted(data["candidates"], key=lambda c: ranking.get(c["key"], 10_000))
    for c in rows:
        settings = ",".join(f"{k}={v}" for k, v in c["settings"].items()) or "-"
        table.add_row(
            str(ranking.get(c["key"], "-")),
            c["runtime"],
            c["device"],
            f"{c['artifact']['format']}:{c['artifact']['precision']}",
            settings,
            _fmt(c["load_ms"], 0),
            _fmt(c["p50_ms"], 3),
            _fmt(c["p99_ms"], 3),
            "-" if c["max_abs_err"] is None else f"{c['max_abs_err']:.2g}",
            ("[green]" if c["accepted"] else "[red]") + c["reason"],
        )
    console.print(table)
    selected = data["selected"]
    console.print(f"[bold green]selected[/] {selected['key']}: p50 {selected['p50_ms']:.3f} ms")
    if not data["correctness_checked"]:
        console.print("[yellow]correctness was not checked: the bundle has no test vectors[/]")


@app.command("run")
def run(
    broker: Annotated[
        str | None, typer.Option(help="mqtt://HOST:PORT or mqtts://HOST:PORT")
    ] = None,
    device_id: Annotated[str | None, typer.Option(help="This device's id.")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Where models and state live.")] = None,
    trust: Annotated[Path | None, typer.Option(help="The trusted root.json.")] = None,
    config: Annotated[Path | None, typer.Option(help="A TOML file with an [agent] table.")] = None,
    ca_file: Annotated[Path | None, typer.Option(help="CA certificate for mqtts://.")] = None,
    cert_file: Annotated[Path | None, typer.Option(help="Client certificate (mutual TLS).")] = None,
    key_file: Annotated[Path | None, typer.Option(help="Client key (mutual TLS).")] = None,
) -> None:
    """Run the agent daemon until SIGTERM or Ctrl-C.

    Flags override the config file, which environment variables EDGEFLEET_AGENT_* override.
    On a device, `python -m agent run` (same options) runs it without the rest of this CLI.
    """
    from agent.service import serve

    serve(
        config,
        {
            "broker": broker,
            "device_id": device_id,
            "data_dir": data_dir,
            "trust": trust,
            "ca_file": ca_file,
            "cert_file": cert_file,
            "key_file": key_file,
        },
    )


@app.command("status")
def status(
    data_dir: Annotated[Path, typer.Option(help="The agent's data directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show the device's local state: active, previous and in-progress versions per model."""
    from agent.status import read_status

    report = read_status(data_dir)
    models = report["models"]
    if as_json:
        print_json(report)
        return
    console.print(f"device {report['device_id'] or '?'} ({data_dir})")
    for name, m in models.items():
        console.print(
            f"  {name}: {m['version'] or 'none'} on {m['runtime'] or '?'}"
            f" (previous {m['previous_version'] or 'none'}, floor {m['rollback_floor']})"
            + (", on probation" if m["probation"] else "")
            + (f", downloading {', '.join(m['downloading'])}" if m["downloading"] else "")
        )
    if not models:
        console.print("  no models installed")
