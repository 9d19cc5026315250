"""Entry point of the ``edgefleet`` command.

Each role has its own sub-app: ``models`` (example models), ``keys`` (the trust root and role
keys), ``bundle`` (build, inspect, sign, verify). A user error is any
:class:`shared.errors.EdgefleetError`: it prints one line and exits non-zero, never a traceback.
"""

from __future__ import annotations

import typer

from agent import cli as agent_cli
from fleet import cli as fleet_cli
from shared.cli import bundle, demo, keys, models
from shared.cli.common import fail
from shared.errors import EdgefleetError, UsageError
from simulators import cli as sim_cli

__all__ = ["app", "main"]

app = typer.Typer(
    name="edgefleet",
    help="Run ML models on fleets of edge devices: signed bundles, runtime selection, rollouts.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)
app.add_typer(models.app, name="models")
app.add_typer(keys.app, name="keys")
app.add_typer(bundle.app, name="bundle")
app.add_typer(agent_cli.app, name="agent")
app.add_typer(fleet_cli.fleet_app, name="fleet")
app.add_typer(fleet_cli.release_app, name="release")
app.add_typer(fleet_cli.device_app, name="device")
app.add_typer(fleet_cli.rollout_app, name="rollout")
app.add_typer(sim_cli.app, name="sim")
app.command("demo")(demo.demo)


def main() -> None:
    """Run the CLI, turning edgefleet's errors into one line on stderr and a non-zero exit."""
    try:
        app()
    except UsageError as e:
        fail(str(e), code=2)
    except EdgefleetError as e:
        fail(str(e), code=1)
    except KeyboardInterrupt:
        fail("interrupted", code=130)


if __name__ == "__main__":
    main()
