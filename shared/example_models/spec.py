"""The example CNN as plain data, plus a numpy reference implementation.

This module is pure numpy on purpose: it defines *what* the network is, and the
format builders (``onnx_format``, ``openvino_format``, ``tflite_format``) only
translate it. Nothing here imports an ML runtime, so the golden test vectors
can always be produced, even on a machine that has none installed.

The network, for an input of shape ``[N, H, W, 3]`` (NHWC, float32)::

    for each entry c in CnnSpec.conv_channels:
        Conv 3x3, stride 1, SAME padding (1 pixel each side), bias -> c channels
        ReLU
        MaxPool 2x2, stride 2, VALID
    global average pool over H and W          -> [N, conv_channels[-1]]
    dense (weights [classes, features], bias) -> logits [N, num_classes]

There is no softmax: the outputs are raw logits.

Weight layouts follow TFLite, so ``tflite_format`` can use them unchanged:
conv kernels are OHWI (``[out, kh, kw, in]``) and the dense matrix is
``[classes, features]``. ONNX wants OIHW, so ``onnx_format`` transposes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "KERNEL_SIZE",
    "SIZES",
    "CnnSpec",
    "ConvLayer",
    "Weights",
    "conv2d_same",
    "flops",
    "forward",
    "make_weights",
    "max_pool_2x2",
]

#: Spatial size of every conv kernel (3x3).
KERNEL_SIZE = 3

Float32Array = NDArray[np.float32]
FloatArray = NDArray[np.floating]


@dataclass(frozen=True)
class CnnSpec:
    """Shape of the example network.

    Attributes:
        name: Model name, used in ``model.json`` and inside the model files.
        height: Input image height in pixels.
        width: Input image width in pixels.
        conv_channels: Output channels of each conv block, in order.
        channels: Input channels (RGB).
        num_classes: Number of logits produced.
    """

    name: str
    height: int
    width: int
    conv_channels: tuple[int, ...]
    channels: int = 3
    num_classes: int = 10

    def __post_init__(self) -> None:
        """Reject specs the fixed layer recipe cannot run.

        Raises:
            ValueError: If there are no conv layers or the input does not halve
                cleanly once per conv block.
        """
        if not self.conv_channels:
            raise ValueError("a CnnSpec needs at least one conv layer")
        step = 2 ** len(self.conv_channels)
        if self.height % step or self.width % step:
            raise ValueError(
                f"input {self.height}x{self.width} must be divisible by {step} "
                f"to survive {len(self.conv_channels)} 2x2 max pools"
            )

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """The per-sample input shape ``(H, W, C)``."""
        return (self.height, self.width, self.channels)

    @property
    def features(self) -> int:
        """Width of the vector fed to the dense layer (channels of the last conv)."""
        return self.conv_channels[-1]

    def layer_inputs(self) -> list[tuple[int, int, int]]:
        """``(H, W, C_in)`` seen by each conv layer, in order."""
        shapes = []
        h, w, c = self.height, self.width, self.channels
        for out_c in self.conv_channels:
            shapes.append((h, w, c))
            h, w, c = h // 2, w // 2, out_c
        return shapes


#: The two ready-made sizes. "small" is for fast tests; "large" is about
#: 1.5 GFLOP per inference, enough to make runtime benchmarks meaningful.
SIZES: Mapping[str, CnnSpec] = MappingProxyType(
    {
        "small": CnnSpec(name="example-cnn-small", height=32, width=32, conv_channels=(8, 16)),
        "large": CnnSpec(
            name="example-cnn-large", height=224, width=224, conv_channels=(32, 64, 128, 256)
        ),
    }
)


@dataclass(frozen=True)
class ConvLayer:
    """Parameters of one conv block.

    Attributes:
        kernel: float32 ``[out, kh, kw, in]`` (OHWI).
        bias: float32 ``[out]``.
    """

    kernel: Float32Array
    bias: Float32Array


@dataclass(frozen=True)
class Weights:
    """All parameters of the network, float32.

    Attributes:
        convs: One entry per conv block, in order.
        dense_kernel: ``[num_classes, features]``.
        dense_bias: ``[num_classes]``.
    """

    convs: tuple[ConvLayer, ...]
    dense_kernel: Float32Array
    dense_bias: Float32Array


def make_weights(spec: CnnSpec, seed: int) -> Weights:
    """Draw the network's weights from a seeded generator.

    Kernels use He-normal initialisation (std ``sqrt(2 / fan_in)``), which keeps
    activations roughly unit-scale through the ReLUs; the dense layer uses
    ``sqrt(1 / fan_in)`` since no ReLU follows it. Biases are small (std 0.1)
    but non-zero, so a runtime that drops them would fail the comparison.

    Args:
        spec: Network shape.
        seed: Seed for ``np.random.default_rng``; same seed, same weights.

    Returns:
        The weights, all float32.
    """
    rng = np.random.default_rng(seed)
    convs = []
    in_c = spec.channels
    for out_c in spec.conv_channels:
        fan_in = KERNEL_SIZE * KERNEL_SIZE * in_c
        shape = (out_c, KERNEL_SIZE, KERNEL_SIZE, in_c)
        kernel = rng.normal(0.0, np.sqrt(2.0 / fan_in), size=shape).astype(np.float32)
        bias = rng.normal(0.0, 0.1, size=out_c).astype(np.float32)
        convs.append(ConvLayer(kernel=kernel, bias=bias))
        in_c = out_c
    dense_kernel = rng.normal(
        0.0, np.sqrt(1.0 / spec.features), size=(spec.num_classes, spec.features)
    ).astype(np.float32)
    dense_bias = rng.normal(0.0, 0.1, size=spec.num_classes).astype(np.float32)
    return Weights(convs=tuple(convs), dense_kernel=dense_kernel, dense_bias=dense_bias)


def conv2d_same(x: FloatArray, kernel: FloatArray, bias: FloatArray) -> NDArray[np.float64]:
    """3x3 (or any odd k x k) convolution, stride 1, SAME zero padding, plus bias.

    Implemented as im2col: ``sliding_window_view`` exposes every k x k patch
    without copying, and one ``tensordot`` multiplies all patches with all
    kernels at once. Computation is in float64.

    Args:
        x: Input ``[N, H, W, C_in]``.
        kernel: OHWI ``[C_out, k, k, C_in]``.
        bias: ``[C_out]``.

    Returns:
        ``[N, H, W, C_out]`` float64.
    """
    k = kernel.shape[1]
    pad = k // 2
    x64 = np.asarray(x, dtype=np.float64)
    padded = np.pad(x64, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    # windows: [N, H, W, C_in, kh, kw] -- a view; no data is copied here.
    windows = np.lib.stride_tricks.sliding_window_view(padded, (k, k), axis=(1, 2))
    # Contract (C_in, kh, kw) of the windows with (in, kh, kw) of the OHWI kernel.
    out = np.tensordot(windows, np.asarray(kernel, dtype=np.float64), axes=([3, 4, 5], [3, 1, 2]))
    result: NDArray[np.float64] = out + np.asarray(bias, dtype=np.float64)
    return result


def max_pool_2x2(x: FloatArray) -> FloatArray:
    """Max pool with a 2x2 window and stride 2 (VALID: odd edges are dropped).

    Args:
        x: ``[N, H, W, C]``.

    Returns:
        ``[N, H // 2, W // 2, C]``, same dtype as ``x``.
    """
    n, h, w, c = x.shape
    h2, w2 = h // 2, w // 2
    blocks = x[:, : h2 * 2, : w2 * 2, :].reshape(n, h2, 2, w2, 2, c)
    result: FloatArray = blocks.max(axis=(2, 4))
    return result


def forward(spec: CnnSpec, weights: Weights, x_nhwc: FloatArray) -> Float32Array:
    """Reference forward pass: the ground truth every runtime is compared with.

    Args:
        spec: Network shape.
        weights: Parameters from :func:`make_weights`.
        x_nhwc: Input batch ``[N, H, W, C]``; any float dtype.

    Returns:
        Logits ``[N, num_classes]`` as float32 (computed in float64, rounded once).

    Raises:
        ValueError: If the input shape does not match ``spec``.
    """
    if x_nhwc.ndim != 4 or tuple(x_nhwc.shape[1:]) != spec.input_shape:
        raise ValueError(
            f"expected input [N, {spec.height}, {spec.width}, {spec.channels}], "
            f"got {list(x_nhwc.shape)}"
        )
    h: FloatArray = np.asarray(x_nhwc, dtype=np.float64)
    for layer in weights.convs:
        h = conv2d_same(h, layer.kernel, layer.bias)
        h = np.maximum(h, 0.0)
        h = max_pool_2x2(h)
    pooled = h.mean(axis=(1, 2))  # [N, features]
    logits = pooled @ weights.dense_kernel.astype(np.float64).T + weights.dense_bias
    return np.asarray(logits, dtype=np.float32)


def flops(spec: CnnSpec) -> int:
    """Floating-point operations for one inference (batch of 1).

    Counts the convolutions and the dense layer, one multiply-add = 2 FLOPs.
    Bias adds, ReLU, pooling and the average are ignored; together they are
    well under 1% of the total.

    Args:
        spec: Network shape.

    Returns:
        FLOPs per sample.
    """
    total = 0
    for (h, w, in_c), out_c in zip(spec.layer_inputs(), spec.conv_channels, strict=True):
        total += 2 * h * w * out_c * KERNEL_SIZE * KERNEL_SIZE * in_c
    total += 2 * spec.features * spec.num_classes
    return total
