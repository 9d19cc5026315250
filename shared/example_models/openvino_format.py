"""Convert the example ONNX model to OpenVINO IR (``model.xml`` + ``model.bin``).

OpenVINO IR is derived from the ONNX file rather than built by hand: OpenVINO's
model converter (``openvino.convert_model``) already does the translation, and
deriving it keeps the two formats equal by construction. The converter also
folds the constant sub-graphs the ONNX frontend produces (bias reshapes, shape
computations), so the IR is just Transpose, Convolution + Add, ReLU, MaxPool,
ReduceMean, Reshape and MatMul + Add.

The IR is saved with ``compress_to_fp16=False``, so weights stay fp32 and
results match the numpy reference to float32 rounding. The batch dimension
stays dynamic (``-1``), as in the ONNX model. Note that on CPUs with bf16
support OpenVINO *runs* fp32 models in bf16 unless the caller compiles with
``INFERENCE_PRECISION_HINT = f32``; the error then exceeds the manifest budget.

Reproducibility: OpenVINO names the nodes it invents (``Constant_2``,
``Reshape_17``, ...) from a process-wide counter, so converting twice in one
process would give different XML. :func:`_stable_names` renames those nodes by
their position in the graph. The converter records the source file in the XML
only as ``DIR/<file name>``, so with the same seed and OpenVINO version,
``model.xml`` and ``model.bin`` are byte-identical. The XML does record the
OpenVINO version that wrote it.

Telemetry is switched off for the import and the conversion (see
:mod:`shared.openvino_quiet` for why: it can deadlock numpy).

``openvino`` is imported inside the function: it is a heavy, optional
dependency and importing this module must not require it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from shared.openvino_quiet import import_openvino, telemetry_off

__all__ = ["convert_onnx_to_openvino"]


def convert_onnx_to_openvino(onnx_path: Path, xml_path: Path) -> list[Path]:
    """Convert an ONNX file to OpenVINO IR, fp32.

    Args:
        onnx_path: Source ``.onnx`` file.
        xml_path: Destination ``.xml``; the weights go next to it with a ``.bin``
            suffix. Parent directories are created.

    Returns:
        ``[xml_path, bin_path]``.

    Raises:
        ModuleNotFoundError: If ``openvino`` is not installed.
    """
    with telemetry_off():
        ov = import_openvino()
        model = ov.convert_model(str(onnx_path))
    _stable_names(model)
    xml_path.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, str(xml_path), compress_to_fp16=False)
    return [xml_path, xml_path.with_suffix(".bin")]


# Friendly names OpenVINO generates itself: "<OpType>_<counter>". Names that come
# from the ONNX graph (conv0, relu0, gap, dense/WithoutBiases, ...) never match.
_AUTO_NAME = re.compile(r"^([A-Z][A-Za-z0-9]*)_\d+$")


def _stable_names(model: Any) -> None:
    """Replace counter-based node names with names based on graph position."""
    for position, op in enumerate(model.get_ordered_ops()):
        match = _AUTO_NAME.match(op.get_friendly_name())
        if match:
            op.set_friendly_name(f"{match.group(1)}_{position}")
