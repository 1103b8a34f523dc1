"""torchvision's ConvNeXt (Tiny) in flax.linen, NHWC.

The flax module tree is torchvision's, child for child (``features/1/0/block/3`` is
``features.1.0.block.3``), so weight conversion is a renaming plus a transpose. Two exceptions:
torch's ``classifier`` Sequential is split into the top-level modules ``classifier_0`` (its
LayerNorm2d, part of the backbone) and ``classifier_2`` (the Linear head, a top-level key of
``params`` as the engine expects); ``classifier.1`` is a Flatten. torch's ``block.1`` and
``block.6`` are Permutes to channels-last and back (its LayerNorm and Linear layers work on the
last axis), which NHWC needs neither of, and ``block.4`` is the GELU; so ``block`` has only the
children ``0``, ``2``, ``3`` and ``5``. Every LayerNorm (torch's LayerNorm2d as well as its
channels-last LayerNorm) is flax's over the last axis with torch's biased variance.

ConvNeXt has no BatchNorm: train mode only switches stochastic depth on.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax.models import layers
from kdjax.models.spec import STRIDE_TAPS, InputSpec, ModelSpec, renaming

Dtype = Any

# torchvision initialises every Conv2d and Linear weight with trunc_normal_(std=0.02), whose
# truncation at +-2 is absolute: 100 standard deviations, which no float32 normal draw reaches,
# so a plain normal is the same distribution. Biases are zeros.
weight_init = nn.initializers.normal(0.02)
LAYER_SCALE = 1e-6  # torchvision's ConvNeXt(layer_scale=1e-6): each block's residual branch starts near 0
EPSILON = 1e-6  # torchvision's LayerNorm2d and CNBlock LayerNorm


def _conv(features: int, kernel: int, stride: int, name: str, dtype: Dtype, groups: int = 1) -> nn.Conv:
    """torch.nn.Conv2d with a bias and ConvNeXt's initialiser; the 7x7 convolution pads 3, the
    others (patchify stem, downsampling) none."""
    return layers.conv(features, kernel, stride, name=name, dtype=dtype, groups=groups, bias=True,
                       padding=3 if kernel == 7 else 0, kernel_init=weight_init)


def _linear(features: int, name: str, dtype: Dtype) -> nn.Dense:
    """torch.nn.Linear with ConvNeXt's initialiser; float32 parameters."""
    return nn.Dense(features, kernel_init=weight_init, bias_init=nn.initializers.zeros, dtype=dtype,
                    param_dtype=jnp.float32, name=name)


def _norm(name: str, dtype: Dtype) -> nn.LayerNorm:
    """torch's LayerNorm over the channels (the last axis): the biased variance, eps 1e-6."""
    return nn.LayerNorm(epsilon=EPSILON, use_fast_variance=False, dtype=dtype, param_dtype=jnp.float32,
                        name=name)


class _Branch(nn.Module):
    """CNBlock's ``block`` Sequential: ``0`` 7x7 depthwise conv, ``2`` LayerNorm, ``3`` Linear
    to 4x the width, GELU (torch's exact erf form), ``5`` Linear back."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        dim = x.shape[-1]
        x = _conv(dim, 7, 1, "0", self.dtype, groups=dim)(x)
        x = _norm("2", self.dtype)(x)
        x = _linear(4 * dim, "3", self.dtype)(x)
        x = jax.nn.gelu(x, approximate=False)
        return _linear(dim, "5", self.dtype)(x)


class CNBlock(nn.Module):
    """torchvision.models.convnext.CNBlock: ``x + stochastic_depth(layer_scale * block(x))``,
    ``layer_scale`` a raw parameter in torch's shape ``(C, 1, 1)``."""

    stochastic_depth_prob: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        dim = x.shape[-1]
        scale = self.param("layer_scale", nn.initializers.constant(LAYER_SCALE), (dim, 1, 1), jnp.float32)
        y = _Branch(self.dtype, name="block")(x) * scale.reshape(dim).astype(self.dtype)
        return x + layers.stochastic_depth(self, y, self.stochastic_depth_prob, train)


class _Stem(nn.Module):
    """``features.0``: ``0`` 4x4 stride-4 conv (patchify), ``1`` LayerNorm2d."""

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        return _norm("1", self.dtype)(_conv(self.features, 4, 4, "0", self.dtype)(x))


class _Stage(nn.Module):
    """``features.1``, ``.3``, ...: CNBlocks ``0``, ``1``, ... with these stochastic depth
    probabilities."""

    stochastic_depth_probs: Sequence[float]
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        for j, p in enumerate(self.stochastic_depth_probs):
            x = CNBlock(p, self.dtype, name=str(j))(x, train)
        return x


class _Downsample(nn.Module):
    """``features.2``, ``.4``, ``.6``: ``0`` LayerNorm2d, ``1`` 2x2 stride-2 conv to ``features``."""

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        return _conv(self.features, 2, 2, "1", self.dtype)(_norm("0", self.dtype)(x))


class _Features(nn.Module):
    """torch's ``features`` Sequential: the stem, then the stages with a downsampling between
    each two; returns every stage's output."""

    stages: Sequence[tuple[int, int]]
    stochastic_depth_prob: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool) -> list[jax.Array]:
        x = _Stem(self.stages[0][0], self.dtype, name="0")(x)
        # torchvision's linear ramp over all blocks: 0 for the first, stochastic_depth_prob for the last
        total = sum(depth for _, depth in self.stages)
        start, outputs = 0, []
        for i, (_, depth) in enumerate(self.stages):
            probs = tuple(self.stochastic_depth_prob * (start + j) / (total - 1.0) for j in range(depth))
            start += depth
            x = _Stage(probs, self.dtype, name=str(2 * i + 1))(x, train)
            outputs.append(x)
            if i + 1 < len(self.stages):
                x = _Downsample(self.stages[i + 1][0], self.dtype, name=str(2 * i + 2))(x)
        return outputs


class ConvNeXt(nn.Module):
    """torchvision.models.ConvNeXt over NHWC float input; returns logits ``[batch, num_classes]``.

    ``stages`` is torchvision's block setting as ``(width, blocks)`` per stage. ``dtype`` is the
    compute dtype; parameters stay float32, and the global pool, its tap and the logits are
    float32 (float64 in a float64 model, which the tests' certificate needs). ``mask`` is
    accepted for the engine's common signature and unused: there is no BatchNorm, and ``train``
    only switches stochastic depth on (a ``'dropout'`` rng). ``stochastic_depth_prob`` is that
    of the last block (torchvision's ramp). ``head=False`` stops at the head's input, the pooled
    features after ``classifier.0``'s LayerNorm ``[batch, width]``; ``classify(model,
    params['classifier_2'], features)`` completes the same function.
    """

    stages: Sequence[tuple[int, int]]
    num_classes: int = 1000
    dtype: Dtype = jnp.float32
    head: bool = True
    stochastic_depth_prob: float = 0.1  # convnext_tiny's default in torchvision

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, mask: jax.Array | None = None,
                 taps: bool = False):
        """Logits, or with ``taps`` ``(logits, features)``: the four stage outputs
        ``stride4..stride32`` (NHWC, compute dtype) and ``pool``, the pooled last stage before
        ``classifier.0``'s LayerNorm."""
        outputs = _Features(self.stages, self.stochastic_depth_prob, self.dtype, name="features")(
            x.astype(self.dtype), train)
        features = dict(zip(STRIDE_TAPS, outputs))
        x = features["pool"] = jnp.mean(layers.widened(outputs[-1]), axis=(1, 2))
        x = _norm("classifier_0", self.dtype)(x)
        if self.head:
            x = _linear(self.num_classes, "classifier_2", self.dtype)(x)
        x = layers.widened(x)
        return (x, features) if taps else x


SPECS = {
    "convnext_tiny": ModelSpec(
        name="convnext_tiny",
        build=functools.partial(ConvNeXt, stages=((96, 3), (192, 3), (384, 9), (768, 3))),
        head="classifier_2",
        head_width=768,
        # torchvision's ConvNeXt_Tiny_Weights.IMAGENET1K_V1 transform: 236 -> 224, bilinear
        input=InputSpec(crop_size=224, resize_size=236, interpolation="bilinear"),
        taps=(*STRIDE_TAPS, "pool"),
        backbone=layers.without_head,
        classify=layers.classify,
        torchvision="convnext_tiny",
        torch_name=renaming({"classifier_0": "classifier.0", "classifier_2": "classifier.2"}),
    ),
}
