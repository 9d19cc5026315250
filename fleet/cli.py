"""``edgefleet fleet``, ``edgefleet release`` and ``edgefleet device``: run and drive the fleet."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from shared.cli.common import console, print_json
from shared.errors import UsageError

fleet_app = typer.Typer(help="Run the fleet service.", no_args_is_help=True)
release_app = typer.Typer(help="Publish and list releases.", no_args_is_help=True)
device_app = typer.Typer(help="List and inspect devices.", no_args_is_help=True)

FleetUrl = Annotated[str | None, typer.Option("--fleet", help="Fleet URL (or EDGEFLEET_URL).")]


@fleet_app.command("serve")
def serve(
    db: Annotated[
        str | None, typer.Option(help="sqlite:///... (default) or postgresql+psycopg://...")
    ] = None,
    broker: Annotated[str | None, typer.Option(help="mqtt://HOST:PORT or mqtts://...")] = None,
    keys: Annotated[Path | None, typer.Option(help="The key directory (root.json).")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8080,
    data_dir: Annotated[Path, typer.Option(help="Bundles, SQLite file, admin token.")] = Path(
        "edgefleet-fleet"
    ),
    ca_file: Annotated[Path | None, typer.Option(help="CA for mqtts://.")] = None,
    cert_file: Annotated[
        Path | None, typer.Option(help="The service's client certificate.")
    ] = None,
    key_file: Annotated[Path | None, typer.Option(help="The service's client key.")] = None,
    access_log: Annotated[
        bool, typer.Option(help="Log every HTTP request (uvicorn's access log).")
    ] = True,
) -> None:
    """Serve the API and bridge the broker. Migrations are applied on start."""
    import uvicorn

    from fleet.app import create_app
    from fleet.config import FleetSettings
    from fleet.console import end_live_streams

    settings = FleetSettings(
        db=db,
        broker=broker,
        keys=keys,
        host=host,
        port=port,
        data_dir=data_dir,
        ca_file=ca_file,
        cert_file=cert_file,
        key_file=key_file,
    )
    app = create_app(settings)
    console.print(
        f"fleet service on http://{host}:{port} (API docs at /docs), database "
        f"{settings.database_url.split('@')[-1]}"
    )

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            end_live_streams(app)  # else open consoles hold the stop for up to 30 s
            super().handle_exit(sig, frame)

    Server(uvicorn.Config(app, host=host, port=port, log_level="info", access_log=access_log)).run()


@fleet_app.command("migrate")
def migrate_cmd(
    db: Annotated[str | None, typer.Option(help="Database URL.")] = None,
    data_dir: Annotated[Path, typer.Option(help="For the default SQLite file.")] = Path(
        "edgefleet-fleet"
    ),
) -> None:
    """Apply the database migrations and exit."""
    from fleet.config import FleetSettings
    from fleet.db import make_engine, migrate

    settings = FleetSettings(db=db, data_dir=data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    migrate(make_engine(settings.database_url))
    console.print(f"database at {settings.database_url.split('@')[-1]} is up to date")


@fleet_app.command("broker-config")
def broker_config(
    out_dir: Annotated[Path, typer.Argument(help="Where to write mosquitto.conf and acl.")],
    cafile: Annotated[Path, typer.Option(help="CA that issues device certificates.")],
    certfile: Annotated[Path, typer.Option(help="The broker's server certificate.")],
    keyfile: Annotated[Path, typer.Option(help="The broker's server key.")],
    crlfile: Annotated[Path | None, typer.Option(help="Certificate revocation list.")] = None,
    port: Annotated[int, typer.Option(help="TLS listener port.")] = 8883,
    fleet_identity: Annotated[str, typer.Option(help="CN of the fleet's certificate.")] = (
        "fleet-svc"
    ),
) -> None:
    """Write a Mosquitto configuration: TLS listener, per-device ACLs, the fleet identity."""
    from fleet.broker_config import BrokerConfig, write_broker_config

    cfg = BrokerConfig(
        cafile=cafile, certfile=certfile, keyfile=keyfile, crlfile=crlfile, port=port
    )
    paths = write_broker_config(out_dir, cfg, fleet_identity=fleet_identity)
    console.print(
        f"wrote {paths['conf']} and {paths['acl']}; start with: mosquitto -c {paths['conf']}"
    )


def _client(fleet: str | None) -> Any:
    import httpx

    url = fleet or os.environ.get("EDGEFLEET_URL")
    token = os.environ.get("EDGEFLEET_TOKEN")
    if not url:
        raise UsageError("no fleet URL: pass --fleet URL or set EDGEFLEET_URL")
    if not token:
        raise UsageError(
            "no token: set EDGEFLEET_TOKEN (the admin token is in the fleet's "
            "data directory, file admin-token)"
        )
    return httpx.Client(
        base_url=url.rstrip("/"), headers={"Authorization": f"Bearer {token}"}, timeout=60
    )


def _field_problem(problem: dict[str, Any]) -> str:
    """One line for one of FastAPI's field errors: ``soak_s: Input should be ..., got -1``."""
    field = ".".join(map(str, problem.get("loc", ())[1:])) or "the request"
    if problem.get("type") == "missing":  # what arrived is the whole body: not worth quoting
        return f"{field}: {problem.get('msg')}"
    return f"{field}: {problem.get('msg')}, got {problem.get('input')!r}"


def _check(response: Any) -> Any:
    if response.status_code >= 400:
        try:
            detail = response.json().get("detail")
        except ValueError:
            detail = response.text
        if isinstance(detail, list):  # the request's shape: one problem per field
            detail = "; ".join(_field_problem(p) for p in detail if isinstance(p, dict))
        raise UsageError(f"the fleet refused: {response.status_code} {detail}")
    return response.json()


@release_app.command("publish")
def publish(
    bundle: Annotated[Path, typer.Argument(help="A signed bundle.")], fleet: FleetUrl = None
) -> None:
    """Upload a signed bundle; the service verifies it against the trust root first."""
    if not bundle.is_file():
        raise UsageError(f"{bundle}: no such file")
    with _client(fleet) as client, bundle.open("rb") as f:
        release = _check(
            client.post(
                "/api/v1/releases", content=f, headers={"content-type": "application/octet-stream"}
            )
        )
    console.print(
        f"published {release['name']} {release['version']} (counter "
        f"{release['counter']}, {release['size']:,} bytes)"
    )


@release_app.command("list")
def list_releases(
    fleet: FleetUrl = None, as_json: Annotated[bool, typer.Option("--json")] = False
) -> None:
    """List published releases."""
    with _client(fleet) as client:
        releases = _check(client.get("/api/v1/releases"))
    if as_json:
        print_json(releases)
        return
    for r in releases:
        console.print(
            f"{r['name']} {r['version']}  counter {r['counter']}  "
            f"{', '.join(r['formats'])}  expires {r['expires']}"
        )


@device_app.command("list")
def list_devices(
    fleet: FleetUrl = None, as_json: Annotated[bool, typer.Option("--json")] = False
) -> None:
    """List devices with their online state and the versions they report running."""
    devices: list[dict[str, Any]] = []
    with _client(fleet) as client:
        page: str | None = "/api/v1/devices?limit=1000"
        while page:  # each full page links to the next one
            response = client.get(page)
            devices += _check(response)
            page = response.links.get("next", {}).get("url")
    if as_json:
        print_json(devices)
        return
    for d in devices:
        models = ", ".join(f"{m}={v}" for m, v in d["models"].items()) or "-"
        console.print(
            f"{d['id']:24} {'online ' if d['online'] else 'offline'} "
            f"{d['hardware_class'] or '?':24} {models}"
        )


@device_app.command("show")
def show_device(
    device_id: Annotated[str, typer.Argument()],
    fleet: FleetUrl = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Show one device: inventory, models and recent deployment events."""
    with _client(fleet) as client:
        device = _check(client.get(f"/api/v1/devices/{device_id}"))
    if as_json:
        print_json(device)
        return
    console.print(json.dumps(device, indent=2, default=str))


@device_app.command("pin")
def pin(
    model: Annotated[str, typer.Argument(help="The model to hold.")],
    version: Annotated[str, typer.Argument(help="The version to keep.")],
    device: Annotated[str | None, typer.Option(help="Pin this device.")] = None,
    group: Annotated[str | None, typer.Option(help="Pin every device of this group.")] = None,
    fleet: FleetUrl = None,
) -> None:
    """Keep a device, or every device of a group, on one version of a model (rollouts skip it).

    A device's own pin wins over its group's.
    """
    path = _pin_path(device, group, model)
    with _client(fleet) as client:
        _check(client.put(path, json={"version": version}))
    console.print(f"{device or 'group ' + str(group)}: {model} pinned to {version}")


@device_app.command("unpin")
def unpin(
    model: Annotated[str, typer.Argument(help="The model to release.")],
    device: Annotated[str | None, typer.Option(help="Unpin this device.")] = None,
    group: Annotated[str | None, typer.Option(help="Unpin this group.")] = None,
    fleet: FleetUrl = None,
) -> None:
    """Remove a pin: rollouts of the model reach the device (or group) again."""
    with _client(fleet) as client:
        _check(client.delete(_pin_path(device, group, model)))
    console.print(f"{device or 'group ' + str(group)}: {model} no longer pinned")


@device_app.command("group")
def set_group(
    device_id: Annotated[str, typer.Argument()],
    group: Annotated[str, typer.Argument(help="The group's name; '-' for none.")],
    fleet: FleetUrl = None,
) -> None:
    """Put a device in a group (rollout targets group=NAME, group pins)."""
    with _client(fleet) as client:
        body = {"group": None if group == "-" else group}
        _check(client.put(f"/api/v1/devices/{device_id}/group", json=body))
    console.print(f"{device_id}: group {group}")


def _pin_path(device: str | None, group: str | None, model: str) -> str:
    if (device is None) == (group is None):
        raise UsageError("give exactly one of --device ID or --group NAME")
    if device is not None:
        return f"/api/v1/devices/{device}/pins/{model}"
    return f"/api/v1/groups/{group}/pins/{model}"


@device_app.command("enroll")
def enroll(
    device_id: Annotated[str, typer.Argument(help="The new device's id.")],
    out: Annotated[
        Path | None,
        typer.Option(help="Where to write the credentials (default ./<ID>-credentials)."),
    ] = None,
    broker: Annotated[str, typer.Option(help="The broker URL devices use.")] = (
        "mqtts://BROKER:8883"
    ),
    fleet: FleetUrl = None,
) -> None:
    """Register a device, write its key, certificate and trust root, print how to start it."""
    with _client(fleet) as client:
        creds = _check(client.post(f"/api/v1/devices/{device_id}/enroll"))
    out = out or Path(f"{device_id}-credentials")
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    (out / "device.pem").write_text(creds["cert_pem"])
    key_path = out / "device-key.pem"
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(creds["key_pem"])
    (out / "ca.pem").write_text(creds["ca_pem"])
    (out / "root.json").write_text(creds["trust_root"])
    console.print(f"enrolled {device_id}; credentials in {out}/. On the device, run:")
    console.print(
        f"  edgefleet agent run --broker {broker} --device-id {device_id} "
        f"--data-dir /var/lib/edgefleet --trust {out}/root.json --ca-file {out}/ca.pem "
        f"--cert-file {out}/device.pem --key-file {out}/device-key.pem"
    )


rollout_app = typer.Typer(help="Create and drive staged rollouts.", no_args_is_help=True)


def _print_rollout(r: dict[str, Any]) -> None:
    counts = ", ".join(f"{k} {v}" for k, v in r["devices"].items())
    console.print(
        f"{r['id']}  {r['model']} {r['version']}  {r['state']}  stage {r['stage']}  ({counts})"
    )
    for s in r["stages"]:
        console.print(
            f"  stage {s['index']} ({s['percent']}%): {s['state']}, {s['devices']} devices"
        )
    for d in r["decisions"]:
        console.print(f"  gate {d['stage']}: {d['verdict']} - {d['reason']}")


@rollout_app.command("create")
def rollout_create(
    name: Annotated[str, typer.Argument(help="Model name.")],
    version: Annotated[str, typer.Argument(help="Release version.")],
    target: Annotated[str, typer.Option(help="hardware_class=..,group=..,device=..")] = "",
    stages: Annotated[
        str | None, typer.Option(help="Cumulative percentages, like 5,25,100.")
    ] = None,
    soak: Annotated[str | None, typer.Option(help="Soak time per stage, like 10m.")] = None,
    max_failure_rate: Annotated[
        float | None, typer.Option(help="Install failure share a gate tolerates.")
    ] = None,
    max_in_flight: Annotated[int | None, typer.Option(help="Devices updating at once.")] = None,
    plan: Annotated[
        Path | None, typer.Option(help="A JSON plan file (overrides the above).")
    ] = None,
    fleet: FleetUrl = None,
) -> None:
    """Create a staged rollout of NAME VERSION; prints its id.

    An option left out takes the fleet's default (GET /api/v1/rollout-defaults).
    """
    from shared.durations import parse_duration

    body: dict[str, Any] = {"model": name, "version": version, "target": target}
    if stages is not None:
        try:
            body["stages"] = [float(p) for p in stages.split(",") if p.strip()]
        except ValueError as e:
            raise UsageError(f"--stages must be comma-separated percentages, got {stages!r}") from e
    if soak is not None:
        body["soak_s"] = parse_duration(soak).total_seconds()
    if max_failure_rate is not None:
        body["max_failure_rate"] = max_failure_rate
    if max_in_flight is not None:
        body["max_in_flight"] = max_in_flight
    if plan is not None:
        try:
            body["plan"] = json.loads(plan.read_text())
        except (OSError, ValueError) as e:
            raise UsageError(f"--plan must be a JSON file of a previewed plan: {e}") from e
    with _client(fleet) as client:
        rollout = _check(client.post("/api/v1/rollouts", json=body))
    console.print(rollout["id"])


@rollout_app.command("list")
def rollout_list(
    fleet: FleetUrl = None, as_json: Annotated[bool, typer.Option("--json")] = False
) -> None:
    """List rollouts, newest first."""
    with _client(fleet) as client:
        rollouts = _check(client.get("/api/v1/rollouts"))
    if as_json:
        print_json(rollouts)
        return
    for r in rollouts:
        _print_rollout(r)


@rollout_app.command("status")
def rollout_status(
    rollout_id: Annotated[str, typer.Argument()],
    fleet: FleetUrl = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Show a rollout: stages, device counts, gate decisions."""
    with _client(fleet) as client:
        rollout = _check(client.get(f"/api/v1/rollouts/{rollout_id}"))
    if as_json:
        print_json(rollout)
    else:
        _print_rollout(rollout)


def _act(rollout_id: str, action: str, fleet: str | None, **params: Any) -> None:
    with _client(fleet) as client:
        rollout = _check(client.post(f"/api/v1/rollouts/{rollout_id}/{action}", params=params))
    _print_rollout(rollout)


@rollout_app.command("pause")
def rollout_pause(rollout_id: Annotated[str, typer.Argument()], fleet: FleetUrl = None) -> None:
    """Stop dispatching; devices in flight finish."""
    _act(rollout_id, "pause", fleet)


@rollout_app.command("resume")
def rollout_resume(rollout_id: Annotated[str, typer.Argument()], fleet: FleetUrl = None) -> None:
    """Resume a paused rollout."""
    _act(rollout_id, "resume", fleet)


@rollout_app.command("promote")
def rollout_promote(rollout_id: Annotated[str, typer.Argument()], fleet: FleetUrl = None) -> None:
    """Pass the current stage's gate now."""
    _act(rollout_id, "promote", fleet)


@rollout_app.command("abort")
def rollout_abort(
    rollout_id: Annotated[str, typer.Argument()],
    revert: Annotated[
        bool, typer.Option(help="Send every device that ran the new version back.")
    ] = False,
    fleet: FleetUrl = None,
) -> None:
    """Stop the rollout, keeping or reverting what was installed."""
    _act(rollout_id, "abort", fleet, revert=revert)


@rollout_app.command("retry-failed")
def rollout_retry(rollout_id: Annotated[str, typer.Argument()], fleet: FleetUrl = None) -> None:
    """Offer the version again to devices that failed (except incompatible ones)."""
    _act(rollout_id, "retry-failed", fleet)
