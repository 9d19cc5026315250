"""``edgefleet sim``: virtual devices against a running fleet, and the fleet-scale model run."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from shared.cli.common import console, print_json
from shared.durations import parse_duration
from shared.errors import UsageError

__all__ = ["app"]

app = typer.Typer(help="Simulated fleets: virtual devices running the real agent.")


def summarize(states: list[dict[str, Any]]) -> dict[str, Any]:
    """Devices per (model, version) and per hardware profile, from the devices' own data."""
    versions: Counter[str] = Counter()
    for state in states:
        for name, model in state["models"].items():
            versions[f"{name} {model['version'] or 'none'}"] += 1
        if not state["models"]:
            versions["no model"] += 1
    profiles = Counter(s["profile"] for s in states)
    return {"devices": len(states), "versions": dict(versions), "profiles": dict(profiles)}


@app.command("run")
def run(
    fleet: Annotated[str, typer.Option(envvar="EDGEFLEET_URL", help="The fleet service URL.")],
    broker: Annotated[str, typer.Option(help="The broker the devices use: mqtts://HOST:PORT.")],
    devices: Annotated[int, typer.Option(min=1, max=100_000, help="How many devices.")] = 100,
    profiles: Annotated[
        str, typer.Option(help="Hardware profiles and their shares, e.g. x86-cpu=2,arm-npu=1.")
    ] = "",
    faults: Annotated[
        str,
        typer.Option(
            help="Faults, e.g. offline:share=0.1:after=20s:for=1m,"
            "wrong-output:version=3.0.0:class=arm-npu (see docs/simulator.md)."
        ),
    ] = "",
    duration: Annotated[
        str | None, typer.Option(help="Stop after this long (e.g. 10m); default: until Ctrl-C.")
    ] = None,
    work_dir: Annotated[
        Path, typer.Option(help="Where the devices keep their credentials and data.")
    ] = Path("edgefleet-sim"),
    prefix: Annotated[str, typer.Option(help="Device ids are PREFIX-00001, ...")] = "sim",
    probation: Annotated[str, typer.Option(help="The agents' probation time.")] = "5s",
    telemetry: Annotated[str, typer.Option(help="The agents' telemetry interval.")] = "5s",
    infer_every: Annotated[
        float, typer.Option(min=0.05, help="Seconds between inferences asked of each device.")
    ] = 1.0,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print a JSON summary at the end.")
    ] = False,
) -> None:
    """Enroll N virtual devices with the fleet and run them until --duration or Ctrl-C.

    Each device runs the real agent code on a simulated hardware profile, with its own mutual-TLS
    identity and data directory. Needs an admin token in EDGEFLEET_TOKEN (to enroll devices).
    One process holds about 300 devices (three file descriptors each, and paho waits on them with
    select(), which stops at 1,024): run several processes, each with its own --prefix, for more.
    """
    from simulators.hardware import DEFAULT_PROFILES, parse_profiles
    from simulators.virtual import Simulation, SimulationOptions, parse_faults

    token = os.environ.get("EDGEFLEET_TOKEN")
    if not token:
        raise UsageError("set EDGEFLEET_TOKEN to an admin token of the fleet (to enroll devices)")
    model_faults, device_faults = parse_faults(faults)
    sim = Simulation(
        SimulationOptions(
            fleet_url=fleet,
            token=token,
            broker=broker,
            devices=devices,
            work_dir=work_dir,
            profiles=parse_profiles(profiles or DEFAULT_PROFILES),
            model_faults=model_faults,
            device_faults=device_faults,
            prefix=prefix,
            probation_s=parse_duration(probation).total_seconds(),
            telemetry_interval_s=parse_duration(telemetry).total_seconds(),
            infer_interval_s=infer_every,
        )
    )
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    say: Callable[[str], object] = (lambda _m: None) if as_json else console.print
    say(f"starting {devices} virtual devices against {fleet} ...")
    started = time.monotonic()
    try:
        sim.start()
        say(f"{devices} devices running ({time.monotonic() - started:.1f} s); Ctrl-C to stop")
        stop.wait(parse_duration(duration).total_seconds() if duration else None)
    finally:
        sim.stop()
    summary = summarize(sim.states())
    if as_json:
        print_json(summary)
    else:
        for label, count in sorted(summary["versions"].items()):
            console.print(f"  {label}: {count} devices")


@app.command("scale")
def scale(
    devices: Annotated[int, typer.Option(min=10, help="Fleet size.")] = 100_000,
    seed: Annotated[int, typer.Option(help="Fleet and fault seed.")] = 1,
    scenario: Annotated[str, typer.Option(help="good, bad or both.")] = "both",
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON object.")] = False,
) -> None:
    """Rehearse a rollout on a modelled fleet: the real rollout engine and transfer state machine
    on a discrete-event clock (no broker, no processes); see simulators/scale.py."""
    from simulators.scale import main as scale_main

    argv = ["--devices", str(devices), "--seed", str(seed), "--scenario", scenario]
    if scenario not in ("good", "bad", "both"):
        raise UsageError(f"--scenario must be good, bad or both, got {scenario!r}")
    raise typer.Exit(scale_main([*argv, "--json"] if as_json else argv))
