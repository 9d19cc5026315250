"""``edgefleet models``: example models for trying edgefleet without a model of your own."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from shared.cli.common import console, fail

app = typer.Typer(help="Example models.", no_args_is_help=True)


@app.command("example")
def example(
    out_dir: Annotated[Path, typer.Argument(help="Directory to write the model directory into.")],
    size: Annotated[
        str, typer.Option(help="small (32x32, for tests) or large (224x224, ~1.5 GFLOP)")
    ] = "small",
    seed: Annotated[int, typer.Option(help="Seed for the weights (inputs use seed+1).")] = 0,
) -> None:
    """Write one CNN as ONNX, OpenVINO IR and TFLite, with test vectors and model.json.

    Weights come from a seeded numpy generator; golden outputs from a numpy reference. Nothing is
    downloaded. A format whose library is not installed is skipped and reported.
    """
    from shared.example_models import SIZES, write_example  # numpy: only for this command
    from shared.example_models.spec import flops

    if size not in SIZES:
        fail(f"--size must be one of {', '.join(sorted(SIZES))}, got {size!r}", code=2)
    result = write_example(out_dir, size=size, seed=seed)
    if not result.written:
        fail(
            "no model format could be written: "
            + "; ".join(f"{fmt}: {why}" for fmt, why in result.skipped.items())
        )
    gflops = flops(result.spec) / 1e9
    console.print(f"wrote {size} example model ({gflops:.3g} GFLOP/inference) to {out_dir}")
    console.print(f"  formats: {', '.join(result.written)}")
    for fmt, why in result.skipped.items():
        console.print(f"  [yellow]skipped {fmt}[/]: {why}")
