"""The agent daemon as a service: ``python -m agent run``, what the systemd unit starts.

Same options and behaviour as ``edgefleet agent run`` (which calls :func:`serve`), but it imports
only the daemon: not Typer, Rich, the fleet service's or the simulators' command modules, nor the
trust stack the other commands need. That is several MB of resident memory that a device would
otherwise keep for as long as the agent runs (``docs/benchmarks.md``).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from agent.config import load_settings
from shared.errors import EdgefleetError, UsageError

__all__ = ["main", "serve"]


def serve(config: Path | None, overrides: dict[str, Any]) -> None:
    """Run the agent daemon until SIGTERM or Ctrl-C.

    Flags (``overrides``; None = unset) override the config file, which environment variables
    EDGEFLEET_AGENT_* override.
    """
    from agent.daemon import Agent

    settings = load_settings(config, overrides)
    if not settings.trust.is_file():
        raise UsageError(f"{settings.trust}: no trust root there (copy KEYS_DIR/root.json)")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    agent = Agent(settings)
    signal.signal(signal.SIGTERM, lambda *_: agent.stop())
    signal.signal(signal.SIGINT, lambda *_: agent.stop())
    notify("READY=1")
    agent.run(heartbeat=lambda: notify("WATCHDOG=1"))
    notify("STOPPING=1")


def notify(state: str) -> None:
    """Tell systemd (Type=notify) about our state, when it is listening."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(address)
        sock.sendall(state.encode())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m agent",
        description="The edgefleet device agent (the same as `edgefleet agent run`).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="Run the agent daemon until SIGTERM or Ctrl-C.")
    run.add_argument("--broker", help="mqtt://HOST:PORT or mqtts://HOST:PORT")
    run.add_argument("--device-id", help="This device's id.")
    run.add_argument("--data-dir", type=Path, help="Where models and state live.")
    run.add_argument("--trust", type=Path, help="The trusted root.json.")
    run.add_argument("--config", type=Path, help="A TOML file with an [agent] table.")
    run.add_argument("--ca-file", type=Path, help="CA certificate for mqtts://.")
    run.add_argument("--cert-file", type=Path, help="Client certificate (mutual TLS).")
    run.add_argument("--key-file", type=Path, help="Client key (mutual TLS).")
    args = vars(parser.parse_args(argv))
    args.pop("command")
    config = args.pop("config")
    try:
        serve(config, args)
    except EdgefleetError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2 if isinstance(e, UsageError) else 1)
    except KeyboardInterrupt:
        sys.exit(130)
