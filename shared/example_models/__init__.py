"""A small example CNN, built without TensorFlow or PyTorch, in three formats.

edgefleet needs real model files to test bundles, runtime selection and
rollouts end to end, but downloading models in tests is slow and fragile. This
package generates one instead: the same network, with weights drawn from a
seeded numpy generator, written as ONNX, OpenVINO IR and TFLite, together with
test vectors whose expected outputs come from a plain numpy implementation.

How the pieces fit:

* :mod:`~shared.example_models.spec` -- pure numpy. ``CnnSpec`` describes the
  network, ``make_weights`` draws its weights, ``forward`` is the reference
  forward pass (the ground truth), ``flops`` counts its cost. ``SIZES`` holds
  the two ready-made sizes: "small" (32x32 input, ~1 MFLOP, for tests) and
  "large" (224x224 input, ~1.5 GFLOP, for benchmarks).
* :mod:`~shared.example_models.onnx_format` -- translates spec + weights into
  an ONNX graph with ``onnx.helper``.
* :mod:`~shared.example_models.openvino_format` -- converts that ONNX file to
  fp32 OpenVINO IR.
* :mod:`~shared.example_models.tflite_format` -- writes the TFLite flatbuffer
  directly with the schema bindings that ship in ``ai-edge-litert``.
* :mod:`~shared.example_models.writer` -- :func:`write_example` puts it all in
  one directory with a ``model.json`` manifest, labels and test vectors,
  skipping any format whose library is not installed.

Every format takes NHWC float32 input named ``input`` with a dynamic batch
dimension and returns float32 logits named ``output``; all of them must match
the numpy reference within float32 rounding.

Example::

    from pathlib import Path
    from shared.example_models import write_example

    result = write_example(Path("example-model"), size="small", seed=0)
    print(result.written, result.skipped)

Only numpy is needed to import this package; the format libraries are
imported when a format is built.
"""

from shared.example_models.spec import SIZES, CnnSpec
from shared.example_models.writer import FORMATS, ExampleResult, write_example

__all__ = ["FORMATS", "SIZES", "CnnSpec", "ExampleResult", "write_example"]
