"""torchvision's EfficientNet-B0 in flax.linen, NHWC.

The module tree mirrors torchvision's: ``features`` is a Sequential of the stem (``0``), seven
stages of MBConv blocks (``1``..``7``, each a Sequential of blocks ``0``, ``1``, ...) and the last
1x1 convolution (``8``); an MBConv's ``block`` is a Sequential of expansion (absent where the
expansion ratio is 1), depthwise convolution, squeeze-and-excitation and projection. So
``params/features/1/0/block/0/0/kernel`` is ``features.1.0.block.0.0.weight``. Only the
classifier's Linear, torch's ``classifier.1``, sits at the top of ``params`` as
``classifier_1``, where the engine expects a head.

torchvision's EfficientNet initialises its Linear differently from torch's default:
U(+-1/sqrt(out_features)) for the weight and zeros for the bias (``--init scratch``).
BatchNorm is ``nn.BatchNorm2d``'s default (eps 1e-5, torch momentum 0.1) in B0, unlike the
V2 models' eps 1e-3.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax.models import layers
from kdjax.models.layers import ConvNormActivation, make_divisible
from kdjax.models.spec import STRIDE_TAPS, InputSpec, ModelSpec, renaming

Dtype = Any

# torchvision's B0 stages (Table 1 of the EfficientNet paper): expansion ratio, kernel, stride
# of the first block, input and output channels, number of blocks.
B0_STAGES = (
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
)

# U(+-1/sqrt(out_features)) for a flax Dense kernel [in, out]: variance 1/3 / fan_out.
_classifier_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_out", "uniform")


class MBConvBranch(nn.Module):
    """torchvision's ``MBConv.block``: 1x1 expansion, depthwise ``kernel`` convolution with the
    block's stride, squeeze-and-excitation to ``input_channels // 4``, linear 1x1 projection."""

    input_channels: int
    out_channels: int
    expand_ratio: float
    kernel: int
    stride: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool, mask=None):
        expanded = make_divisible(self.input_channels * self.expand_ratio)
        expand = expanded != self.input_channels
        if expand:
            x = ConvNormActivation(expanded, 1, activation=nn.silu, dtype=self.dtype, name="0")(x, train, mask)
        i = int(expand)  # the depthwise convolution's index in torch's Sequential
        x = ConvNormActivation(expanded, self.kernel, self.stride, groups=expanded, activation=nn.silu,
                               dtype=self.dtype, name=str(i))(x, train, mask)
        x = layers.SqueezeExcitation(max(1, self.input_channels // 4), nn.silu, nn.sigmoid, self.dtype,
                                     name=str(i + 1))(x)
        return ConvNormActivation(self.out_channels, 1, activation=None, dtype=self.dtype,
                                  name=str(i + 2))(x, train, mask)


class MBConv(nn.Module):
    """torchvision.models.efficientnet.MBConv: the ``block`` branch, plus the input where the
    block keeps the resolution and the width, the branch then dropped per example with
    probability ``stochastic_depth_prob`` in train mode."""

    input_channels: int
    out_channels: int
    expand_ratio: float
    kernel: int
    stride: int
    stochastic_depth_prob: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool, mask=None):
        y = MBConvBranch(self.input_channels, self.out_channels, self.expand_ratio, self.kernel, self.stride,
                         self.dtype, name="block")(x, train, mask)
        if self.stride == 1 and self.input_channels == self.out_channels:
            y = layers.stochastic_depth(self, y, self.stochastic_depth_prob, train) + x
        return y


class Stage(nn.Module):
    """One Sequential of ``features``: ``num_layers`` MBConv blocks; the first has the stage's
    stride and input width, the others stride 1 and the output width. Block ``first_block``
    + j of ``total_blocks`` drops its branch with ``stochastic_depth_prob * (first_block + j) /
    total_blocks``, as torchvision scales it with the depth."""

    expand_ratio: float
    kernel: int
    stride: int
    input_channels: int
    out_channels: int
    num_layers: int
    first_block: int
    total_blocks: int
    stochastic_depth_prob: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool, mask=None):
        for j in range(self.num_layers):
            first = j == 0
            p = self.stochastic_depth_prob * float(self.first_block + j) / self.total_blocks
            x = MBConv(self.input_channels if first else self.out_channels, self.out_channels, self.expand_ratio,
                       self.kernel, self.stride if first else 1, p, self.dtype, name=str(j))(x, train, mask)
        return x


class Features(nn.Module):
    """torchvision's ``EfficientNet.features``; returns the last map and the stride taps (the
    output of the last child at each output stride: ``features.2``, ``.3``, ``.5`` and ``.8``)."""

    stochastic_depth_prob: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool, mask=None):
        taps = {}
        x = ConvNormActivation(B0_STAGES[0][3], 3, 2, activation=nn.silu, dtype=self.dtype, name="0")(x, train, mask)
        stride = 2
        total_blocks = sum(stage[-1] for stage in B0_STAGES)
        first_block = 0
        for i, stage in enumerate(B0_STAGES):
            x = Stage(*stage, first_block, total_blocks, self.stochastic_depth_prob, self.dtype,
                      name=str(i + 1))(x, train, mask)
            first_block += stage[-1]
            stride *= stage[2]
            taps[f"stride{stride}"] = x
        last = 4 * B0_STAGES[-1][4]
        x = ConvNormActivation(last, 1, activation=nn.silu, dtype=self.dtype,
                               name=str(len(B0_STAGES) + 1))(x, train, mask)
        taps[f"stride{stride}"] = x
        return x, {k: taps[k] for k in STRIDE_TAPS}


class EfficientNet(nn.Module):
    """EfficientNet-B0 over NHWC float input; returns float32 logits ``[batch, num_classes]``.

    ``dtype`` is the compute dtype; parameters, BatchNorm statistics, the global pool and the
    logits stay float32 (float64 when ``dtype`` is float64). ``mask`` marks the real examples of a
    padded batch for train-mode BatchNorm. ``dropout`` (before the classifier) and
    ``stochastic_depth_prob`` (the deepest block's; shallower blocks' scale linearly) are
    torchvision's arguments and defaults. ``head=False`` stops at the pooled features after the
    dropout ``[batch, 1280]``; ``classify(model, params['classifier_1'], features)`` completes
    the same function.
    """

    num_classes: int = 1000
    dtype: Dtype = jnp.float32
    head: bool = True
    dropout: float = 0.2
    stochastic_depth_prob: float = 0.2

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, mask: jax.Array | None = None, taps: bool = False):
        """Logits, or with ``taps`` ``(logits, features)``: ``stride4..stride32`` (NHWC, compute
        dtype) and the pooled ``pool`` (float32)."""
        x, features = Features(self.stochastic_depth_prob, self.dtype, name="features")(
            x.astype(self.dtype), train, mask)
        x = jnp.mean(layers.widened(x), axis=(1, 2))
        features["pool"] = x
        x = layers.dropout(self, x, self.dropout, train)
        if self.head:
            x = nn.Dense(self.num_classes, kernel_init=_classifier_init, bias_init=nn.initializers.zeros,
                         dtype=self.dtype, param_dtype=jnp.float32, name="classifier_1")(x)
        x = layers.widened(x)
        return (x, features) if taps else x


SPECS = {
    "efficientnet_b0": ModelSpec(
        name="efficientnet_b0",
        build=EfficientNet,
        head="classifier_1",
        head_width=4 * B0_STAGES[-1][4],
        # torchvision's EfficientNet_B0_Weights.IMAGENET1K_V1 transform: 256 -> 224, bicubic
        input=InputSpec(crop_size=224, resize_size=256, interpolation="bicubic"),
        taps=(*STRIDE_TAPS, "pool"),
        backbone=layers.without_head,
        classify=layers.classify,
        torchvision="efficientnet_b0",
        torch_name=renaming({"classifier_1": "classifier.1"}),
    ),
}
