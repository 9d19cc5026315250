"""``edgefleet bundle``: build, inspect, sign and verify model bundles."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from shared.bundle import (
    build_bundle,
    check_payload,
    inspect_bundle,
    open_bundle,
    write_signed_copy,
)
from shared.cli.common import console, print_json
from shared.durations import parse_duration
from shared.errors import UsageError
from shared.keystore import KeyStore
from shared.manifest import Manifest
from shared.trust import DeviceIdentity, ReleaseInfo, sign_release, verify_release

app = typer.Typer(help="Build, inspect, sign and verify model bundles.", no_args_is_help=True)

BundleFile = Annotated[Path, typer.Argument(help="The bundle file.")]


def _manifest_summary(manifest: Manifest) -> dict[str, Any]:
    return {
        "name": manifest.name,
        "version": manifest.version,
        "format_version": manifest.format_version,
        "artifacts": [a.model_dump() for a in manifest.artifacts],
        "inputs": [t.model_dump(exclude_none=True) for t in manifest.inputs],
        "outputs": [t.model_dump(exclude_none=True) for t in manifest.outputs],
        "labels": manifest.labels,
        "test_vectors": manifest.test_vectors is not None,
        "accuracy_budget": manifest.accuracy_budget.model_dump(exclude_none=True)
        if manifest.accuracy_budget
        else None,
        "metadata": manifest.metadata,
        "files": [f.model_dump() for f in manifest.files],
        "total_size": manifest.total_size,
    }


def _release_summary(info: ReleaseInfo) -> dict[str, Any]:
    return {
        "counter": info.counter,
        "rollback_floor": info.rollback_floor,
        "expires": info.expires.isoformat(),
        "hardware_ids": list(info.hardware_ids),
        "device_ids": list(info.device_ids),
        "manifest_sha256": info.manifest_sha256,
    }


def _print_manifest(manifest: Manifest) -> None:
    console.print(
        f"[bold]{manifest.name} {manifest.version}[/]  (bundle format "
        f"{manifest.format_version}, {manifest.total_size:,} bytes in "
        f"{len(manifest.files)} files)"
    )
    for artifact in manifest.artifacts:
        console.print(
            f"  artifact {artifact.format}/{artifact.precision}: {', '.join(artifact.files)}"
        )
    for kind, tensors in (("input", manifest.inputs), ("output", manifest.outputs)):
        for t in tensors:
            console.print(f"  {kind} {t.name}: {t.dtype} {t.shape}")
    budget = manifest.accuracy_budget
    console.print(
        f"  test vectors: {'yes' if manifest.test_vectors else 'none'}; "
        f"accuracy budget: {budget.model_dump(exclude_none=True) if budget else 'none'}"
    )


@app.command("build")
def build(
    model_dir: Annotated[Path, typer.Argument(help="A directory with model.json and its files.")],
    version: Annotated[str, typer.Option(help="The release version, e.g. 1.4.0.")],
    out: Annotated[Path, typer.Option(help="Where to write the bundle file.")],
    name: Annotated[
        str | None, typer.Option(help="Bundle name (default: model.json's name).")
    ] = None,
) -> None:
    """Package a model directory into one bundle file with a manifest of every file's SHA-256."""
    manifest = build_bundle(model_dir, name=name, version=version, out=out)
    console.print(f"built {out} ({out.stat().st_size:,} bytes)")
    _print_manifest(manifest)


@app.command("inspect")
def inspect(
    bundle: BundleFile,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show a bundle's manifest and whether it carries signed metadata (checks nothing)."""
    header = inspect_bundle(bundle)
    if as_json:
        print_json(
            {
                **_manifest_summary(header.manifest),
                "signed": header.signed,
                "metadata_files": sorted(header.metadata),
            }
        )
        return
    _print_manifest(header.manifest)
    console.print(f"  signed metadata: {', '.join(sorted(header.metadata)) or 'none (unsigned)'}")


@app.command("sign")
def sign(
    bundle: BundleFile,
    keys: Annotated[Path, typer.Option(help="The key directory (edgefleet keys init).")],
    expires: Annotated[str, typer.Option(help="Release lifetime, like 30d, 12h or 10s.")] = "30d",
    counter: Annotated[
        int | None,
        typer.Option(help="Anti-rollback release counter (default: previous release's + 1)."),
    ] = None,
    rollback_floor: Annotated[
        int | None,
        typer.Option(
            help="Lowest counter a device on this release may go back to "
            "(default: the previous release's counter)."
        ),
    ] = None,
    hardware_id: Annotated[
        list[str] | None,
        typer.Option(help="Only devices of this hardware class may install it (repeatable)."),
    ] = None,
    device_id: Annotated[
        list[str] | None, typer.Option(help="Only these devices may install it (repeatable).")
    ] = None,
) -> None:
    """Make a signed release of the bundle: the release key signs its manifest's hash."""
    lifetime = parse_duration(expires)
    store = KeyStore.open(keys)
    header = inspect_bundle(bundle)
    info, files = sign_release(
        store,
        header,
        expires_in=lifetime,
        now=datetime.now(UTC),
        counter=counter,
        rollback_floor=rollback_floor,
        hardware_ids=hardware_id or (),
        device_ids=device_id or (),
    )
    write_signed_copy(bundle, files)
    console.print(
        f"signed {info.name} {info.version}: counter {info.counter}, rollback floor "
        f"{info.rollback_floor}, expires {info.expires.isoformat()}"
    )
    if "timestamp.json" not in files:
        console.print(
            "  [yellow]no snapshot/timestamp keys here:[/] the fleet service adds "
            "freshness metadata when the release is published"
        )


@app.command("verify")
def verify(
    bundle: BundleFile,
    trust: Annotated[Path, typer.Option(help="The trusted root.json (from edgefleet keys init).")],
    device_id: Annotated[
        str | None, typer.Option(help="Check device targeting for this id.")
    ] = None,
    hardware_id: Annotated[
        str | None, typer.Option(help="Check hardware targeting for this class.")
    ] = None,
    floor: Annotated[int | None, typer.Option(help="Refuse release counters below this.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Check signatures, thresholds, expiry, targeting, rollback and every file's SHA-256.

    Exits 0 with a summary, or non-zero with one line naming the failed check.
    """
    try:
        trusted_root = trust.read_bytes()
    except OSError as e:
        raise UsageError(f"{trust}: cannot read the trust root ({e.strerror})") from e
    device = None
    if device_id or hardware_id:
        device = DeviceIdentity(device_id=device_id, hardware_id=hardware_id)
    stream, reader, header, first = open_bundle(bundle)
    with stream:
        info = verify_release(header, trusted_root, device=device, floor=floor)
        check_payload(reader, header.manifest, first)
    if as_json:
        print_json(
            {
                "verified": True,
                **_manifest_summary(header.manifest),
                "release": _release_summary(info),
            }
        )
        return
    manifest = header.manifest
    console.print(
        f"[green]verified[/] {manifest.name} {manifest.version}: signatures and "
        f"thresholds ok, {len(manifest.files)} files ({manifest.total_size:,} bytes) "
        "match their sha256"
    )
    console.print(
        f"  release counter {info.counter}, rollback floor {info.rollback_floor}, "
        f"expires {info.expires.isoformat()}"
    )
    if info.hardware_ids or info.device_ids:
        console.print(
            f"  targeted at hardware {list(info.hardware_ids) or 'any'}, devices "
            f"{list(info.device_ids) or 'any'}"
        )
