"""Write a complete example model directory: model files, test vectors, manifest.

Layout produced by :func:`write_example`::

    out_dir/model.json                 manifest (inputs, outputs, artifacts, ...)
    out_dir/labels.txt                 class_0 .. class_9, one per line
    out_dir/onnx/model.onnx
    out_dir/openvino/model.xml         \\ fp32 IR, converted from the ONNX file
    out_dir/openvino/model.bin         /
    out_dir/tflite/model.tflite
    out_dir/vectors/input.npy          float32 [N, H, W, 3], uniform in [-1, 1)
    out_dir/vectors/output.npy         float32 [N, 10] golden logits (numpy reference)

A format whose library is not installed is skipped, not an error; the result
says which formats were written and why the others were skipped, and
``model.json`` lists only what was written. The test vectors and labels need
nothing but numpy and are always written.

Everything is deterministic: the same size and seed give byte-identical files.
"""

from __future__ import annotations

import importlib.util
import json
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from shared.example_models.spec import SIZES, CnnSpec, Weights, flops, forward, make_weights

__all__ = ["FORMATS", "ExampleResult", "write_example"]

#: Formats in the order they are built and listed in ``model.json``.
FORMATS: tuple[str, ...] = ("onnx", "openvino", "tflite")

#: Python modules each format needs at build time. OpenVINO IR is converted
#: from the ONNX model, so it needs ``onnx`` too.
_REQUIRES: dict[str, tuple[str, ...]] = {
    "onnx": ("onnx",),
    "openvino": ("onnx", "openvino"),
    "tflite": ("flatbuffers", "ai_edge_litert.schema_py_generated"),
}

#: Number of test vectors per size (the large model's reference is slower).
_VECTOR_COUNT: dict[str, int] = {"small": 4, "large": 2}

#: Largest |runtime - reference| a deployment should accept, recorded in model.json.
#: Measured errors of fp32 runtimes are around 1e-6; 1e-4 leaves room for other
#: CPUs and kernel choices without letting a real bug (e.g. fp16 weights) pass.
MAX_ABS_ERR = 1e-4

GENERATOR = "edgefleet models example"


@dataclass
class ExampleResult:
    """What :func:`write_example` produced.

    Attributes:
        out_dir: The directory written to.
        manifest: Path of ``model.json``.
        spec: The network that was written.
        written: Formats written, in :data:`FORMATS` order.
        skipped: Formats requested but not written, mapped to the reason.
    """

    out_dir: Path
    manifest: Path
    spec: CnnSpec
    written: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


def write_example(
    out_dir: Path,
    *,
    size: str = "small",
    seed: int = 0,
    formats: Sequence[str] | None = None,
) -> ExampleResult:
    """Write the example CNN in every available format, with test vectors.

    Args:
        out_dir: Directory to write into; created if missing. Existing files
            with the same names are overwritten, other files are left alone.
        size: A key of ``SIZES`` ("small" or "large").
        seed: Seeds the weights; the test inputs use ``seed + 1``.
        formats: Formats to build, a subset of :data:`FORMATS`; ``None`` means all.

    Returns:
        Which formats were written and which were skipped (and why).

    Raises:
        ValueError: For an unknown size or format.
    """
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {sorted(SIZES)}")
    requested = FORMATS if formats is None else tuple(formats)
    unknown = sorted(set(requested) - set(FORMATS))
    if unknown:
        raise ValueError(f"unknown format(s) {unknown}; choose from {list(FORMATS)}")

    spec = SIZES[size]
    weights = make_weights(spec, seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = ExampleResult(out_dir=out_dir, manifest=out_dir / "model.json", spec=spec)
    # The numpy reference runs first, before any ML library is imported: some
    # (OpenVINO's telemetry) fork from background threads, which can deadlock a
    # concurrent multi-threaded BLAS call. See openvino_format for details.
    _write_vectors(spec, weights, out_dir, count=_VECTOR_COUNT[size], seed=seed + 1)

    builders: dict[str, Callable[[CnnSpec, Weights, Path], list[str]]] = {
        "onnx": _write_onnx,
        "openvino": _write_openvino,
        "tflite": _write_tflite,
    }
    artifacts: list[dict[str, Any]] = []
    for fmt in FORMATS:
        if fmt not in requested:
            continue
        reason = _missing_dependency(fmt)
        if reason is not None:
            result.skipped[fmt] = reason
            continue
        files = builders[fmt](spec, weights, out_dir)
        result.written.append(fmt)
        artifacts.append({"format": fmt, "precision": "fp32", "files": files})

    labels = [f"class_{i}" for i in range(spec.num_classes)]
    (out_dir / "labels.txt").write_text("\n".join(labels) + "\n", encoding="utf-8")

    manifest = _manifest(spec, size=size, seed=seed, artifacts=artifacts)
    result.manifest.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return result


def _missing_dependency(fmt: str) -> str | None:
    """Return why ``fmt`` cannot be built here, or ``None`` if it can.

    Uses ``find_spec`` rather than importing, so nothing heavy is loaded (and
    OpenVINO is first imported inside ``openvino_format``, telemetry off).
    """
    for module in _REQUIRES[fmt]:
        try:
            found = importlib.util.find_spec(module) is not None
        except ImportError:  # a parent package of a dotted name is missing
            found = False
        if not found:
            return f"python module {module!r} is not installed"
    return None


def _write_onnx(spec: CnnSpec, weights: Weights, out_dir: Path) -> list[str]:
    from shared.example_models.onnx_format import write_onnx

    write_onnx(spec, weights, out_dir / "onnx" / "model.onnx")
    return ["onnx/model.onnx"]


def _write_openvino(spec: CnnSpec, weights: Weights, out_dir: Path) -> list[str]:
    from shared.example_models.onnx_format import write_onnx
    from shared.example_models.openvino_format import convert_onnx_to_openvino

    # Convert from a fresh ONNX copy rather than out_dir/onnx/model.onnx, which
    # may be absent (ONNX not requested) or left over from an earlier run.
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = write_onnx(spec, weights, Path(tmp) / "model.onnx")
        convert_onnx_to_openvino(onnx_path, out_dir / "openvino" / "model.xml")
    return ["openvino/model.xml", "openvino/model.bin"]


def _write_tflite(spec: CnnSpec, weights: Weights, out_dir: Path) -> list[str]:
    from shared.example_models.tflite_format import write_tflite

    write_tflite(spec, weights, out_dir / "tflite" / "model.tflite")
    return ["tflite/model.tflite"]


def _write_vectors(
    spec: CnnSpec, weights: Weights, out_dir: Path, *, count: int, seed: int
) -> None:
    """Write seeded random inputs and the reference outputs for them."""
    rng = np.random.default_rng(seed)
    inputs = rng.uniform(-1.0, 1.0, size=(count, *spec.input_shape)).astype(np.float32)
    outputs = forward(spec, weights, inputs)
    vectors = out_dir / "vectors"
    vectors.mkdir(parents=True, exist_ok=True)
    np.save(vectors / "input.npy", inputs, allow_pickle=False)
    np.save(vectors / "output.npy", outputs, allow_pickle=False)


def _manifest(
    spec: CnnSpec, *, size: str, seed: int, artifacts: list[dict[str, Any]]
) -> dict[str, Any]:
    """The ``model.json`` content. The batch dimension is dynamic (-1) in every format."""
    return {
        "name": spec.name,
        "description": (
            f"Example {size} CNN: {spec.height}x{spec.width}x{spec.channels} NHWC input, "
            f"{len(spec.conv_channels)} conv blocks {list(spec.conv_channels)}, "
            f"{spec.num_classes} logits. Random weights (seed {seed}): for exercising "
            "runtimes and rollouts, not for real predictions."
        ),
        "inputs": [
            {
                "name": "input",
                "dtype": "float32",
                "shape": [-1, spec.height, spec.width, spec.channels],
                "layout": "NHWC",
            }
        ],
        "outputs": [{"name": "output", "dtype": "float32", "shape": [-1, spec.num_classes]}],
        "labels": "labels.txt",
        "artifacts": artifacts,
        "test_vectors": {
            "inputs": {"input": "vectors/input.npy"},
            "outputs": {"output": "vectors/output.npy"},
        },
        "accuracy_budget": {"max_abs_err": MAX_ABS_ERR},
        "metadata": {
            "generator": GENERATOR,
            "size": size,
            "seed": seed,
            "gflops": round(flops(spec) / 1e9, 4),
        },
    }
