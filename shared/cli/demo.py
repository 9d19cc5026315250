"""``edgefleet demo``: the whole system on this machine (see :mod:`simulators.demo`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from shared.cli.common import fail, print_json


def demo(
    devices: Annotated[
        int, typer.Option(help="How many virtual devices, each running the real agent.")
    ] = 12,
    headless: Annotated[bool, typer.Option(help="Exit when the story is done.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON summary and exit.")] = (
        False
    ),
    work_dir: Annotated[Path, typer.Option(help="Where the demo keeps its files.")] = Path(
        "edgefleet-demo"
    ),
    port: Annotated[int, typer.Option(help="The fleet service's port.")] = 8080,
    broker: Annotated[
        str,
        typer.Option(
            help="auto (mosquitto if installed, else the embedded Python broker), "
            "mosquitto, or embedded (amqtt: MQTT 3.1.1, no packet size limit)."
        ),
    ] = "auto",
    rollouts: Annotated[
        str,
        typer.Option(
            help="auto (the demo runs the three rollouts) or console (you run them in the web "
            "console; the demo prints the steps and waits for Ctrl-C)."
        ),
    ] = "auto",
) -> None:
    """Run the whole system locally: broker, fleet service, devices, three staged rollouts.

    v1 goes to every device, v2 in stages, and a bad v3 in stages, which the gates halt and
    revert. Keeps running until Ctrl-C (or exits with --headless / --json). With --rollouts
    console a person starts the rollouts from the web console, and Ctrl-C ends the demo with
    the summary. SIGTERM does what Ctrl-C does; either one before that stops the demo, and
    what it started, with exit code 128 + the signal's number.
    """
    from shared.errors import UsageError
    from simulators.demo import DemoOptions, Interrupted, run_demo

    if devices < 1:
        raise UsageError(f"--devices must be at least 1, got {devices}")
    try:
        summary = run_demo(
            DemoOptions(
                work_dir=work_dir,
                devices=devices,
                headless=headless,
                as_json=as_json,
                port=port,
                broker=broker,
                rollouts=rollouts,
            )
        )
    except Interrupted as e:
        # One line, like any interrupted command (shared.cli.main), with the shell's exit code
        # for the signal: 130 for SIGINT, 143 for SIGTERM.
        fail(f"{e}: the demo and everything it started have stopped", code=128 + e.signum)
    if as_json:
        print_json(summary)
