"""torchvision's MobileNetV2 and MobileNetV3 (large, small) in flax.linen, NHWC.

The module tree mirrors torchvision's, so that weight conversion is a renaming plus a
transpose: torch's Sequential children are the flax modules ``"0"``, ``"1"``, ...
(``features.1.conv.0.0.weight`` is ``params/features/1/conv/0/0/kernel``). Only the classifier
sits at the top of ``params`` (``classifier_1``; V3's ``classifier_0`` and ``classifier_3``),
where the engine finds and replaces the head.

The networks have torchvision's initialisers: convolutions ``kaiming_normal_(mode="fan_out")``,
Linear layers N(0, 0.01) with zero biases (not torch.nn.Linear's default).
"""

from __future__ import annotations

import functools
import itertools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax.models import layers
from kdjax.models.layers import BatchNorm, ConvNormActivation, SqueezeExcitation, make_divisible
from kdjax.models.spec import STRIDE_TAPS, InputSpec, ModelSpec, renaming

Dtype = Any

# MobileNetV2's inverted residual stages: expansion ratio t, width c, blocks n, first stride s.
_V2_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
              (6, 320, 1, 1))

# MobileNetV3's blocks (the paper's tables 1 and 2, as torchvision lists them): kernel, expanded
# width, output width, squeeze-and-excitation, activation, stride. Every width is already a
# multiple of 8, so torchvision's rounding leaves them as they are.
_RE, _HS = jax.nn.relu, jax.nn.hard_swish
_V3_LARGE = ((3, 16, 16, False, _RE, 1), (3, 64, 24, False, _RE, 2), (3, 72, 24, False, _RE, 1),
             (5, 72, 40, True, _RE, 2), (5, 120, 40, True, _RE, 1), (5, 120, 40, True, _RE, 1),
             (3, 240, 80, False, _HS, 2), (3, 200, 80, False, _HS, 1), (3, 184, 80, False, _HS, 1),
             (3, 184, 80, False, _HS, 1), (3, 480, 112, True, _HS, 1), (3, 672, 112, True, _HS, 1),
             (5, 672, 160, True, _HS, 2), (5, 960, 160, True, _HS, 1), (5, 960, 160, True, _HS, 1))
_V3_SMALL = ((3, 16, 16, True, _RE, 2), (3, 72, 24, False, _RE, 2), (3, 88, 24, False, _RE, 1),
             (5, 96, 40, True, _HS, 2), (5, 240, 40, True, _HS, 1), (5, 240, 40, True, _HS, 1),
             (5, 120, 48, True, _HS, 1), (5, 144, 48, True, _HS, 1), (5, 288, 96, True, _HS, 2),
             (5, 576, 96, True, _HS, 1), (5, 576, 96, True, _HS, 1))

# torchvision's MobileNetV3 BatchNorm: eps=0.001, momentum=0.01 (flax's convention: 0.99).
_V3_NORM = {"bn_epsilon": 1e-3, "bn_momentum": 0.99}


def _linear(features: int, dtype: Dtype, name: str) -> nn.Dense:
    """torch.nn.Linear as torchvision's MobileNets initialise it: N(0, 0.01) weight, zero bias."""
    return nn.Dense(features, kernel_init=nn.initializers.normal(0.01), bias_init=nn.initializers.zeros,
                    dtype=dtype, param_dtype=jnp.float32, name=name)


class _Features(nn.Module):
    """torchvision's ``features`` Sequential: ``layers`` are ``(module factory, stride)`` pairs,
    each factory called with its name ``"0"``, ``"1"``, ...; returns the last output and, for
    every output stride, the output of its last layer (``{"stride4": ...}``)."""

    layers: tuple[tuple[Callable[..., nn.Module], int], ...]

    @nn.compact
    def __call__(self, x, train: bool, mask=None):
        by_stride, stride = {}, 1
        for i, (layer, layer_stride) in enumerate(self.layers):
            x = layer(name=str(i))(x, train, mask)
            stride *= layer_stride
            by_stride[f"stride{stride}"] = x
        return x, by_stride


class _InvertedResidual(nn.Module):
    """torchvision's InvertedResidual, V2's and V3's: its Sequential (``sequential``, a factory
    called with torch's name for it, ``conv`` or ``block``), plus the block's input where
    ``residual`` (stride 1 and an unchanged width)."""

    sequential: Callable[..., nn.Module]
    sequential_name: str
    residual: bool

    @nn.compact
    def __call__(self, x, train: bool, mask=None):
        y = self.sequential(name=self.sequential_name)(x, train, mask)
        return x + y if self.residual else y


class _V2Conv(nn.Module):
    """mobilenetv2.InvertedResidual's ``conv``: a 1x1 expansion to ``hidden`` (none when the
    expansion ratio is 1) and the 3x3 depthwise convolution, both with ReLU6, then the linear
    1x1 projection to ``features`` and its BatchNorm."""

    features: int
    hidden: int
    stride: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool, mask=None):
        index = map(str, itertools.count())
        cna = functools.partial(ConvNormActivation, activation=jax.nn.relu6, dtype=self.dtype)
        if self.hidden != x.shape[-1]:
            x = cna(self.hidden, kernel=1, name=next(index))(x, train, mask)
        x = cna(self.hidden, stride=self.stride, groups=self.hidden, name=next(index))(x, train, mask)
        x = layers.conv(self.features, 1, name=next(index), dtype=self.dtype)(x)
        return BatchNorm(not train, dtype=self.dtype, name=next(index))(x, mask)


class _V3Block(nn.Module):
    """mobilenetv3.InvertedResidual's ``block``: a 1x1 expansion to ``expanded`` (none when the
    width stays) and the ``kernel`` x ``kernel`` depthwise convolution, both with
    ``activation``, the squeeze-and-excitation (with a hard sigmoid) where ``se``, then the
    linear 1x1 projection to ``features``."""

    kernel: int
    expanded: int
    features: int
    se: bool
    activation: Callable
    stride: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool, mask=None):
        index = map(str, itertools.count())
        cna = functools.partial(ConvNormActivation, dtype=self.dtype, **_V3_NORM)
        if self.expanded != x.shape[-1]:
            x = cna(self.expanded, kernel=1, activation=self.activation, name=next(index))(x, train, mask)
        x = cna(self.expanded, self.kernel, self.stride, groups=self.expanded, activation=self.activation,
                name=next(index))(x, train, mask)
        if self.se:
            x = SqueezeExcitation(make_divisible(self.expanded // 4), scale_activation=jax.nn.hard_sigmoid,
                                  dtype=self.dtype, name=next(index))(x)
        return cna(self.features, kernel=1, activation=None, name=next(index))(x, train, mask)


def _features_and_classifier(net: nn.Module, stack: list, x: jax.Array, train: bool, mask: jax.Array | None,
                             head_name: str, hidden: int | None = None) -> tuple[jax.Array, dict]:
    """V2's and V3's shared forward pass after their layer tables, inside ``net``'s compact
    ``__call__``: the ``features`` Sequential of ``stack``, the global average pool, V3's hidden
    ``classifier_0`` Linear to ``hidden`` with Hardswish (V2 has none: ``hidden=None``),
    ``net.dropout``, and with ``net.head`` the head Linear ``head_name``. Returns the logits
    (``layers.widened``; with ``head=False`` the head's input) and the taps ``__call__``
    documents."""
    x, by_stride = _Features(tuple(stack), name="features")(x.astype(net.dtype), train, mask)
    features = {k: by_stride[k] for k in STRIDE_TAPS}
    x = jnp.mean(layers.widened(x), axis=(1, 2))
    features["pool"] = x.astype(jnp.float32)
    if hidden is not None:
        x = jax.nn.hard_swish(_linear(hidden, net.dtype, "classifier_0")(x))
    x = layers.dropout(net, x, net.dropout, train)
    if net.head:
        x = _linear(net.num_classes, net.dtype, head_name)(x)
    return layers.widened(x), features


class MobileNetV2(nn.Module):
    """torchvision.models.MobileNetV2 (width 1) over NHWC float input; float32 logits (float64
    when ``dtype`` is float64).

    ``dtype`` is the compute dtype; parameters and BatchNorm statistics stay float32. ``mask``
    marks the real examples of a padded batch for train-mode BatchNorm. ``dropout`` precedes the
    head (``classifier_1``); ``head=False`` returns its input, the pooled features after dropout.
    """

    num_classes: int = 1000
    dtype: Dtype = jnp.float32
    head: bool = True
    dropout: float = 0.2

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, mask: jax.Array | None = None, taps: bool = False):
        """Logits, or with ``taps`` ``(logits, features)``: the output of the last block at each of
        ``STRIDE_TAPS`` (NHWC, compute dtype) and ``pool`` (float32)."""
        cna = functools.partial(ConvNormActivation, activation=jax.nn.relu6, dtype=self.dtype)
        stack = [(functools.partial(cna, 32, stride=2), 2)]
        width = 32
        for t, c, n, s in _V2_STAGES:
            for i in range(n):
                stride = s if i == 0 else 1
                conv = functools.partial(_V2Conv, c, round(width * t), stride, self.dtype)
                stack.append((functools.partial(_InvertedResidual, conv, "conv", stride == 1 and width == c), stride))
                width = c
        stack.append((functools.partial(cna, 1280, kernel=1), 1))
        logits, features = _features_and_classifier(self, stack, x, train, mask, head_name="classifier_1")
        return (logits, features) if taps else logits


class MobileNetV3(nn.Module):
    """torchvision.models.MobileNetV3 (width 1, no dilation) over NHWC float input; logits as in
    ``MobileNetV2``. ``blocks`` is the table of inverted residuals (``_V3_LARGE``, ``_V3_SMALL``);
    ``last_channel`` the width of the classifier's hidden Linear (``classifier_0``).

    ``dtype``, ``mask`` and ``taps`` as in ``MobileNetV2``. ``head=False`` returns the input of
    the head (``classifier_3``): the pooled features after ``classifier_0``, Hardswish and
    ``dropout``.
    """

    blocks: tuple[tuple[int, int, int, bool, Callable, int], ...]
    last_channel: int
    num_classes: int = 1000
    dtype: Dtype = jnp.float32
    head: bool = True
    dropout: float = 0.2

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, mask: jax.Array | None = None, taps: bool = False):
        """Logits, or with ``taps`` ``(logits, features)``, as ``MobileNetV2.__call__``."""
        cna = functools.partial(ConvNormActivation, activation=jax.nn.hard_swish, dtype=self.dtype, **_V3_NORM)
        stack = [(functools.partial(cna, 16, stride=2), 2)]
        width = 16
        for kernel, expanded, out, se, activation, stride in self.blocks:
            block = functools.partial(_V3Block, kernel, expanded, out, se, activation, stride, self.dtype)
            stack.append((functools.partial(_InvertedResidual, block, "block", stride == 1 and width == out), stride))
            width = out
        stack.append((functools.partial(cna, 6 * width, kernel=1), 1))
        logits, features = _features_and_classifier(self, stack, x, train, mask, head_name="classifier_3",
                                                    hidden=self.last_channel)
        return (logits, features) if taps else logits


def _spec(name: str, build: Callable[..., nn.Module], head: str, head_width: int,
          aliases: dict[str, str]) -> ModelSpec:
    return ModelSpec(
        name=name,
        build=build,
        head=head,
        head_width=head_width,
        input=InputSpec(),  # torchvision's IMAGENET1K_V1 transform: 256 -> 224, bilinear
        taps=(*STRIDE_TAPS, "pool"),
        backbone=layers.without_head,
        classify=layers.classify,
        torchvision=name,
        torch_name=renaming(aliases),
    )


_V3_CLASSIFIER = {"classifier_0": "classifier.0", "classifier_3": "classifier.3"}

SPECS = {
    "mobilenet_v2": _spec("mobilenet_v2", MobileNetV2, "classifier_1", 1280, {"classifier_1": "classifier.1"}),
    "mobilenet_v3_small": _spec("mobilenet_v3_small",
                                functools.partial(MobileNetV3, blocks=_V3_SMALL, last_channel=1024),
                                "classifier_3", 1024, _V3_CLASSIFIER),
    "mobilenet_v3_large": _spec("mobilenet_v3_large",
                                functools.partial(MobileNetV3, blocks=_V3_LARGE, last_channel=1280),
                                "classifier_3", 1280, _V3_CLASSIFIER),
}
