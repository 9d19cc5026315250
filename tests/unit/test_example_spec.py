"""Unit tests for the example CNN's numpy definition (shared.example_models.spec).

Pure numpy: no ML runtime or model-format library is needed. The writer tests
at the end build no model formats, only the manifest, labels and test vectors.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from shared.example_models import SIZES, write_example
from shared.example_models import writer as writer_module
from shared.example_models.spec import (
    CnnSpec,
    conv2d_same,
    flops,
    forward,
    make_weights,
    max_pool_2x2,
)

TINY = CnnSpec(name="tiny", height=8, width=12, conv_channels=(4, 5), num_classes=3)


def naive_conv2d_same(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Textbook loop implementation: SAME padding, stride 1, OHWI kernel."""
    n, h, w, c_in = x.shape
    c_out, kh, kw, _ = kernel.shape
    padded = np.zeros((n, h + kh - 1, w + kw - 1, c_in))
    padded[:, kh // 2 : kh // 2 + h, kw // 2 : kw // 2 + w, :] = x
    out = np.zeros((n, h, w, c_out))
    for b in range(n):
        for i in range(h):
            for j in range(w):
                for o in range(c_out):
                    acc = float(bias[o])
                    for di in range(kh):
                        for dj in range(kw):
                            for c in range(c_in):
                                acc += padded[b, i + di, j + dj, c] * kernel[o, di, dj, c]
                    out[b, i, j, o] = acc
    return out


def naive_max_pool(x: np.ndarray) -> np.ndarray:
    n, h, w, c = x.shape
    out = np.empty((n, h // 2, w // 2, c))
    for i in range(h // 2):
        for j in range(w // 2):
            out[:, i, j, :] = x[:, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2, :].max(axis=(1, 2))
    return out


def naive_forward(spec: CnnSpec, seed: int, x: np.ndarray) -> np.ndarray:
    weights = make_weights(spec, seed)
    h = x.astype(np.float64)
    for layer in weights.convs:
        h = naive_max_pool(np.maximum(naive_conv2d_same(h, layer.kernel, layer.bias), 0.0))
    pooled = h.mean(axis=(1, 2))
    logits: np.ndarray = pooled @ weights.dense_kernel.T.astype(np.float64) + weights.dense_bias
    return logits


def random_input(spec: CnnSpec, n: int, seed: int = 123) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform(-1, 1, size=(n, *spec.input_shape)).astype(np.float32)


# --- spec and weights -------------------------------------------------------------------


def test_sizes_are_the_documented_networks() -> None:
    assert SIZES["small"].input_shape == (32, 32, 3)
    assert SIZES["small"].conv_channels == (8, 16)
    assert SIZES["large"].input_shape == (224, 224, 3)
    assert SIZES["large"].conv_channels == (32, 64, 128, 256)
    assert all(spec.num_classes == 10 for spec in SIZES.values())


@pytest.mark.parametrize("size", sorted(SIZES))
def test_weight_shapes_and_dtypes(size: str) -> None:
    spec = SIZES[size]
    weights = make_weights(spec, seed=0)
    in_c = spec.channels
    assert len(weights.convs) == len(spec.conv_channels)
    for layer, out_c in zip(weights.convs, spec.conv_channels, strict=True):
        assert layer.kernel.shape == (out_c, 3, 3, in_c)  # OHWI
        assert layer.bias.shape == (out_c,)
        assert layer.kernel.dtype == np.float32
        assert layer.bias.dtype == np.float32
        in_c = out_c
    assert weights.dense_kernel.shape == (spec.num_classes, spec.features)
    assert weights.dense_bias.shape == (spec.num_classes,)
    assert weights.dense_kernel.dtype == np.float32


def test_weights_are_deterministic_per_seed() -> None:
    spec = SIZES["small"]
    a, b, c = make_weights(spec, 7), make_weights(spec, 7), make_weights(spec, 8)
    for la, lb, lc in zip(a.convs, b.convs, c.convs, strict=True):
        np.testing.assert_array_equal(la.kernel, lb.kernel)
        np.testing.assert_array_equal(la.bias, lb.bias)
        assert not np.array_equal(la.kernel, lc.kernel)
    np.testing.assert_array_equal(a.dense_kernel, b.dense_kernel)
    assert not np.array_equal(a.dense_kernel, c.dense_kernel)


def test_spec_rejects_inputs_that_do_not_pool_evenly() -> None:
    with pytest.raises(ValueError, match="divisible"):
        CnnSpec(name="bad", height=30, width=32, conv_channels=(8, 16))
    with pytest.raises(ValueError, match="at least one"):
        CnnSpec(name="bad", height=32, width=32, conv_channels=())


# --- numerics ---------------------------------------------------------------------------


def test_conv_matches_naive_loop() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 6, 3)).astype(np.float32)
    kernel = rng.normal(size=(4, 3, 3, 3)).astype(np.float32)
    bias = rng.normal(size=4).astype(np.float32)
    got = conv2d_same(x, kernel, bias)
    assert got.shape == (2, 5, 6, 4)
    np.testing.assert_allclose(got, naive_conv2d_same(x, kernel, bias), rtol=1e-12, atol=1e-12)


def test_conv_is_not_symmetric_in_kernel_axes() -> None:
    """Guard against swapped kh/kw (or a correlation/convolution flip) in the fast path."""
    x = np.zeros((1, 3, 3, 1))
    x[0, 1, 2, 0] = 1.0  # a single pixel right of centre
    kernel = np.arange(9, dtype=np.float32).reshape(1, 3, 3, 1)
    out = conv2d_same(x, kernel, np.zeros(1, dtype=np.float32))
    # out[i, j] = sum_{di,dj} x[i+di-1, j+dj-1] * k[di, dj]; at the centre that is k[1, 2].
    assert out[0, 1, 1, 0] == kernel[0, 1, 2, 0]


def test_max_pool_matches_naive_loop() -> None:
    x = np.random.default_rng(1).normal(size=(2, 6, 8, 3))
    np.testing.assert_array_equal(max_pool_2x2(x), naive_max_pool(x))


def test_forward_matches_naive_composition() -> None:
    x = random_input(TINY, n=2)
    got = forward(TINY, make_weights(TINY, seed=3), x)
    assert got.shape == (2, TINY.num_classes)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, naive_forward(TINY, 3, x), rtol=1e-6, atol=1e-6)


def test_forward_rejects_wrong_input_shape() -> None:
    spec = SIZES["small"]
    with pytest.raises(ValueError, match="expected input"):
        forward(spec, make_weights(spec, 0), np.zeros((1, 3, 32, 32), dtype=np.float32))


def test_small_forward_logits_are_unit_scale() -> None:
    """He init should keep logits O(1): neither vanishing nor exploding."""
    spec = SIZES["small"]
    logits = forward(spec, make_weights(spec, 0), random_input(spec, n=8))
    assert 0.1 < float(np.std(logits)) < 10.0


# --- flops ------------------------------------------------------------------------------


def test_flops_counts_multiply_adds_twice() -> None:
    # conv0: 8x12 outputs x 4 ch x 27 MACs; conv1: 4x6 x 5 x 36; dense: 5 x 3.
    expected = 2 * (8 * 12 * 4 * 27 + 4 * 6 * 5 * 36 + 5 * 3)
    assert flops(TINY) == expected


def test_large_model_is_over_a_gigaflop() -> None:
    large, small = flops(SIZES["large"]), flops(SIZES["small"])
    assert large >= 1e9
    assert large < 2e9  # about 1.47 GFLOP
    assert small < 1e7  # about 1 MFLOP
    assert large > 1000 * small


# --- writer without any model format ----------------------------------------------------


def test_write_example_vectors_and_manifest_without_formats(tmp_path: Path) -> None:
    result = write_example(tmp_path, size="small", seed=5, formats=[])
    assert result.written == []
    assert result.skipped == {}

    manifest = json.loads((tmp_path / "model.json").read_text())
    assert manifest["name"] == "example-cnn-small"
    assert manifest["inputs"] == [
        {"name": "input", "dtype": "float32", "shape": [-1, 32, 32, 3], "layout": "NHWC"}
    ]
    assert manifest["outputs"] == [{"name": "output", "dtype": "float32", "shape": [-1, 10]}]
    assert manifest["artifacts"] == []
    assert manifest["accuracy_budget"] == {"max_abs_err": 0.0001}
    assert manifest["metadata"]["seed"] == 5
    assert manifest["metadata"]["size"] == "small"

    labels = (tmp_path / "labels.txt").read_text().splitlines()
    assert labels == [f"class_{i}" for i in range(10)]

    x = np.load(tmp_path / "vectors" / "input.npy")
    y = np.load(tmp_path / "vectors" / "output.npy")
    assert x.shape == (4, 32, 32, 3)
    assert x.dtype == np.float32
    assert x.min() >= -1.0
    assert x.max() < 1.0
    assert y.shape == (4, 10)
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, forward(SIZES["small"], make_weights(SIZES["small"], 5), x))


def test_write_example_skips_a_format_whose_library_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Pretend OpenVINO needs a module that cannot be imported.
    monkeypatch.setitem(writer_module._REQUIRES, "openvino", ("edgefleet_no_such_module",))
    result = write_example(tmp_path, formats=["openvino"])
    assert result.written == []
    assert "edgefleet_no_such_module" in result.skipped["openvino"]
    assert json.loads(result.manifest.read_text())["artifacts"] == []
    assert not (tmp_path / "openvino").exists()


def test_write_example_rejects_unknown_size_and_format(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown size"):
        write_example(tmp_path, size="huge")
    with pytest.raises(ValueError, match="unknown format"):
        write_example(tmp_path, formats=["onnx", "coreml"])
