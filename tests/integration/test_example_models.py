"""Run the generated example models in every installed runtime.

Each format is executed by the real runtime and compared with the golden
outputs from the numpy reference (``vectors/output.npy``):

* onnxruntime (CPUExecutionProvider) on ``onnx/model.onnx``
* OpenVINO CPU on ``openvino/model.xml`` and directly on ``onnx/model.onnx``
* LiteRT (``ai_edge_litert``, else ``tflite_runtime``) on ``tflite/model.tflite``

The "small" model is checked vector by vector and as one batch; the "large"
(~1.5 GFLOP) model gets a single whole-batch run per runtime to keep the file
fast. A runtime that is not installed is skipped with a reason, never passed.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from shared.example_models import write_example

pytestmark = pytest.mark.integration

#: fp32 runtimes land around 1e-6 from the float64 reference; 1e-5 catches any
#: real deviation (fp16/bf16 kernels, wrong padding, missing bias) with margin.
TOLERANCE = 1e-5

Runner = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Example:
    size: str
    path: Path
    inputs: np.ndarray
    outputs: np.ndarray

    def file(self, relative: str) -> Path:
        """Path of an artifact, skipping the test if its format was not built."""
        path = self.path / relative
        if not path.is_file():
            pytest.skip(f"{relative} was not written (format library not installed)")
        return path


@pytest.fixture(scope="module", params=["small", "large"])
def example(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Example:
    size: str = request.param
    out_dir = tmp_path_factory.mktemp(f"example-{size}")
    write_example(out_dir, size=size, seed=0)
    return Example(
        size=size,
        path=out_dir,
        inputs=np.load(out_dir / "vectors" / "input.npy"),
        outputs=np.load(out_dir / "vectors" / "output.npy"),
    )


def assert_matches_golden(run: Runner, example: Example) -> None:
    """Compare ``run`` with the golden outputs: each vector (small only), then the batch."""
    x, expected = example.inputs, example.outputs
    checks: list[tuple[str, np.ndarray, np.ndarray]] = []
    if example.size == "small":
        checks += [(f"vector {i}", x[i : i + 1], expected[i : i + 1]) for i in range(len(x))]
    checks.append((f"batch of {len(x)}", x, expected))
    for what, inputs, want in checks:
        got = np.asarray(run(inputs))
        assert got.shape == want.shape, what
        assert got.dtype == np.float32, what
        err = float(np.max(np.abs(got - want)))
        assert err <= TOLERANCE, f"{example.size} {what}: max abs error {err:.3g}"


# --- onnxruntime ------------------------------------------------------------------------


def test_onnxruntime(example: Example) -> None:
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(
        str(example.file("onnx/model.onnx")), providers=["CPUExecutionProvider"]
    )
    assert [i.name for i in session.get_inputs()] == ["input"]
    assert [o.name for o in session.get_outputs()] == ["output"]

    def run(x: np.ndarray) -> np.ndarray:
        result: np.ndarray = session.run(["output"], {"input": x})[0]
        return result

    assert_matches_golden(run, example)


# --- OpenVINO ---------------------------------------------------------------------------


def openvino_runner(model_path: Path) -> Runner:
    ov = pytest.importorskip("openvino")
    # fp32 explicitly: on CPUs with AMX/AVX512-BF16 OpenVINO would otherwise pick bf16.
    compiled = ov.Core().compile_model(str(model_path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    assert compiled.get_property("INFERENCE_PRECISION_HINT") == ov.Type.f32
    output = compiled.output("output")

    def run(x: np.ndarray) -> np.ndarray:
        result: np.ndarray = compiled({"input": x})[output]
        return result

    return run


def test_openvino_ir(example: Example) -> None:
    assert_matches_golden(openvino_runner(example.file("openvino/model.xml")), example)


def test_openvino_reads_onnx(example: Example) -> None:
    assert_matches_golden(openvino_runner(example.file("onnx/model.onnx")), example)


def test_openvino_ir_keeps_fp32_weights_and_dynamic_batch(example: Example) -> None:
    ov = pytest.importorskip("openvino")
    model = ov.Core().read_model(str(example.file("openvino/model.xml")))
    assert model.input("input").get_partial_shape().to_string() == (
        "[?,{},{},3]".format(*example.inputs.shape[1:3])
    )
    const_types = {
        op.get_output_element_type(0).get_type_name()
        for op in model.get_ops()
        if op.get_type_name() == "Constant"
    }
    assert "f16" not in const_types


# --- LiteRT -----------------------------------------------------------------------------


def litert_interpreter_module() -> ModuleType:
    try:
        return importlib.import_module("ai_edge_litert.interpreter")
    except ImportError:
        module: ModuleType = pytest.importorskip(
            "tflite_runtime.interpreter",
            reason="neither ai-edge-litert nor tflite-runtime is installed",
        )
        return module


def test_litert(example: Example) -> None:
    tfl = litert_interpreter_module()
    model_path = str(example.file("tflite/model.tflite"))
    h, w, c = example.inputs.shape[1:]

    interpreter = tfl.Interpreter(model_path=model_path, num_threads=2)
    (inp,) = interpreter.get_input_details()
    (out,) = interpreter.get_output_details()
    assert inp["name"] == "input"
    assert out["name"] == "output"
    assert list(inp["shape"]) == [1, h, w, c]
    assert list(inp["shape_signature"]) == [-1, h, w, c]
    assert interpreter.get_signature_list() == {
        "serving_default": {"inputs": ["input"], "outputs": ["output"]}
    }

    def run(x: np.ndarray) -> np.ndarray:
        # Dynamic batch: resize the input to this batch size before running.
        interpreter.resize_tensor_input(inp["index"], list(x.shape))
        interpreter.allocate_tensors()
        interpreter.set_tensor(inp["index"], x)
        interpreter.invoke()
        result: np.ndarray = interpreter.get_tensor(out["index"])
        return result

    assert_matches_golden(run, example)

    # The serving_default signature gives the same answer.
    runner = tfl.Interpreter(model_path=model_path).get_signature_runner("serving_default")
    got = runner(input=example.inputs[:1])["output"]
    assert float(np.max(np.abs(got - example.outputs[:1]))) <= TOLERANCE


# --- files ------------------------------------------------------------------------------


def test_manifest_lists_existing_artifacts(example: Example) -> None:
    manifest = json.loads((example.path / "model.json").read_text())
    assert manifest["metadata"]["size"] == example.size
    for artifact in manifest["artifacts"]:
        assert artifact["precision"] == "fp32"
        for relative in artifact["files"]:
            assert (example.path / relative).is_file(), relative


def test_same_seed_gives_byte_identical_files(tmp_path: Path) -> None:
    first = write_example(tmp_path / "a", size="small", seed=3)
    write_example(tmp_path / "b", size="small", seed=3)
    other = write_example(tmp_path / "c", size="small", seed=4)
    files = [f for a in json.loads(first.manifest.read_text())["artifacts"] for f in a["files"]]
    files += ["model.json", "vectors/input.npy", "vectors/output.npy"]
    if not first.written:
        pytest.skip(f"no model format library installed: {first.skipped}")
    for relative in files:
        a = (tmp_path / "a" / relative).read_bytes()
        assert a == (tmp_path / "b" / relative).read_bytes(), relative
        if relative.endswith((".onnx", ".tflite", ".bin")):
            assert a != (tmp_path / "c" / relative).read_bytes(), relative
    assert other.written == first.written
