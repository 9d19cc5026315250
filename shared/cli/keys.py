"""``edgefleet keys``: create and rotate the trust root and role keys."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer

from shared.cli.common import console, print_json
from shared.errors import UsageError
from shared.keystore import DIRECTOR, KeyStore, role_keys

app = typer.Typer(help="Trust root and role keys.", no_args_is_help=True)

ROLES = ("root", "targets", "snapshot", "timestamp", DIRECTOR)
KeysDir = Annotated[Path, typer.Argument(help="The key directory.")]


def _describe(store: KeyStore) -> dict[str, object]:
    root = store.root().signed
    roles = {}
    for role in ROLES:
        keyids, threshold = role_keys(root, role)
        present = len(store.signers(root, role))
        roles[role] = {"keyids": keyids, "threshold": threshold, "private_keys_here": present}
    return {"root_version": root.version, "root_expires": root.expires.isoformat(), "roles": roles}


def _print(store: KeyStore) -> None:
    info = _describe(store)
    console.print(f"root version {info['root_version']}, expires {info['root_expires']}")
    for role, r in info["roles"].items():  # type: ignore[attr-defined]
        name = "targets (release key)" if role == "targets" else role
        console.print(
            f"  {name:22} {len(r['keyids'])} key(s), threshold {r['threshold']}, "
            f"{r['private_keys_here']} private key(s) here"
        )


@app.command("init")
def init(
    keys_dir: KeysDir,
    root_keys: Annotated[int, typer.Option(help="Number of offline root keys.")] = 3,
    root_threshold: Annotated[int, typer.Option(help="Root signatures required.")] = 2,
    release_keys: Annotated[int, typer.Option(help="Number of release (targets) keys.")] = 1,
    release_threshold: Annotated[int, typer.Option(help="Release signatures required.")] = 1,
) -> None:
    """Create every role's keys and KEYS_DIR/root.json, the trust root to install on devices.

    Roles: root (offline, threshold), targets (the release key for the ML team or CI),
    snapshot and timestamp (online, fleet service), director (online, per-device orders).
    Move the root keys offline after this; see docs/security.md.
    """
    store = KeyStore.create(
        keys_dir,
        root_keys=root_keys,
        root_threshold=root_threshold,
        release_keys=release_keys,
        release_threshold=release_threshold,
        now=datetime.now(UTC),
    )
    console.print(f"created keys in {keys_dir}; trust root: {keys_dir / 'root.json'}")
    _print(store)


@app.command("show")
def show(
    keys_dir: KeysDir,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show the roles, key ids, thresholds and which private keys this directory holds."""
    store = KeyStore.open(keys_dir)
    if as_json:
        print_json(_describe(store))
    else:
        _print(store)


@app.command("rotate")
def rotate(
    role: Annotated[str, typer.Argument(help=f"One of: {', '.join(ROLES)}.")],
    keys_dir: Annotated[Path, typer.Option("--keys", help="The key directory.")],
) -> None:
    """Replace a role's keys and publish the next root version, signed by the current root.

    Devices are not touched: they walk to the new root the next time they see it (it travels
    inside every bundle signed afterwards). Sign existing bundles again to refresh their metadata.
    """
    if role not in ROLES:
        raise UsageError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    store = KeyStore.open(keys_dir)
    md = store.rotate(role, now=datetime.now(UTC))
    console.print(f"rotated {role}: root is now version {md.signed.version}")
    _print(store)
