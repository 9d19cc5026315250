"""``edgefleet demo``: the whole release path on this machine, with real models and real keys.

Today it walks what an ML team's CI and a device do with a release: make the example models,
create the trust root and role keys, build a bundle, sign it, verify it as a device would, and
show that a tampered copy and an untrusted signer are refused. It grows into the full local fleet
demo (broker, fleet service, simulated devices, staged rollouts) as those parts land.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from shared.bundle import (
    build_bundle,
    check_payload,
    inspect_bundle,
    open_bundle,
    write_signed_copy,
)
from shared.cli.common import console, print_json
from shared.errors import EdgefleetError
from shared.keystore import KeyStore
from shared.trust import ReleaseInfo, sign_release, verify_release


def _verify(bundle: Path, root: bytes) -> ReleaseInfo:
    stream, reader, header, first = open_bundle(bundle)
    with stream:
        info = verify_release(header, root)
        check_payload(reader, header.manifest, first)
    return info


def _refusal(action: Callable[[], object]) -> str:
    try:
        action()
    except EdgefleetError as e:
        return f"{e.check}: {e}"
    raise RuntimeError("a tampered or untrusted bundle was accepted")


def demo(
    work_dir: Annotated[Path, typer.Option(help="Where the demo writes its files.")] = Path(
        "edgefleet-demo"
    ),
    size: Annotated[str, typer.Option(help="Example model size: small or large.")] = "small",
    headless: Annotated[bool, typer.Option(help="No progress display.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON summary.")] = False,
) -> None:
    """Run the release path end to end: example models, keys, build, sign, verify, tamper checks."""
    if work_dir.exists():
        shutil.rmtree(work_dir)
    work_dir.mkdir(parents=True)
    now = datetime.now(UTC)
    summary: dict[str, Any] = {"work_dir": str(work_dir)}
    steps: list[tuple[str, Callable[[], None]]] = []
    model_dir, keys_dir = work_dir / "model", work_dir / "keys"
    bundle = work_dir / f"example-cnn-{size}-1.0.0.bundle"

    def make_models() -> None:
        from shared.example_models import write_example  # numpy: only when the demo runs

        result = write_example(model_dir, size=size)
        summary["formats"] = result.written
        summary["skipped_formats"] = result.skipped

    def make_keys() -> None:
        KeyStore.create(keys_dir, now=now)

    def build() -> None:
        manifest = build_bundle(model_dir, name=None, version="1.0.0", out=bundle)
        summary["bundle"] = {
            "path": str(bundle),
            "files": len(manifest.files),
            "bytes": bundle.stat().st_size,
        }

    def sign() -> None:
        store = KeyStore.open(keys_dir)
        _, files = sign_release(
            store, inspect_bundle(bundle), expires_in=timedelta(days=30), now=now
        )
        write_signed_copy(bundle, files)

    def verify() -> None:
        info = _verify(bundle, (keys_dir / "root.json").read_bytes())
        summary["verified"] = {
            "name": info.name,
            "version": info.version,
            "counter": info.counter,
            "expires": info.expires.isoformat(),
        }

    def tamper() -> None:
        tampered = work_dir / "tampered.bundle"
        data = bytearray(bundle.read_bytes())
        data[-1024 - 512 - 1] ^= 0x01  # last byte of padding or data of the last payload file
        data[len(data) // 2] ^= 0x01
        tampered.write_bytes(bytes(data))
        root = (keys_dir / "root.json").read_bytes()
        other = KeyStore.create(work_dir / "attacker-keys", now=now)
        summary["refused"] = {
            "tampered": _refusal(lambda: _verify(tampered, root)),
            "untrusted_root": _refusal(lambda: _verify(bundle, other.root().to_bytes())),
        }

    steps = [
        (f"make the {size} example model (ONNX, OpenVINO IR, TFLite)", make_models),
        ("create the trust root and role keys", make_keys),
        ("build the bundle", build),
        ("sign the release (release key + online freshness keys)", sign),
        ("verify it as a device would", verify),
        ("tamper with it and check it is refused", tamper),
    ]
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=console,
        disable=headless or as_json,
    ) as progress:
        for label, step in steps:
            task = progress.add_task(label, total=1)
            step()
            progress.update(task, completed=1)
    if as_json:
        print_json(summary)
        return
    console.print(
        f"[green]release path ok[/]: {bundle} ({summary['bundle']['bytes']:,} bytes, "
        f"formats {', '.join(summary['formats'])})"
    )
    console.print(
        f"  verified {summary['verified']['name']} {summary['verified']['version']} "
        f"against {keys_dir / 'root.json'}"
    )
    for case, why in summary["refused"].items():
        console.print(f"  refused {case}: {why}")
    console.print(f"try: edgefleet bundle inspect {bundle}")
