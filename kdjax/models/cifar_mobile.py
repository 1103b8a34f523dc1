"""The small CIFAR students of the KD literature in flax.linen, NHWC: mdistiller's CIFAR
MobileNetV2 (``mdistiller/models/cifar/mobilenetv2.py``, RepDistiller's ``models/mobilenetv2.py``)
and ShuffleNet V1 / V2 (``ShuffleNetv1.py``, ``ShuffleNetv2.py``, after kuangliu's
pytorch-cifar).

- ``CifarMobileNetV2``: not torchvision's. Every inverted residual has its 1x1 expansion (also
  at ratio 1), ReLU (not ReLU6), the second stage keeps stride 1 (total stride 16: a 2x2 map at
  32 px), a 1x1 ``conv2`` to 1280 and a ``classifier`` Sequential of one Linear; widths scaled
  by ``width`` as ``int(c * width)`` (``mobile_half``: expansion ``T = 6``, width 0.5).
  Convolutions N(0, sqrt(2 / fan_out)), the Linear N(0, 0.01) with a zero bias.
- ``ShuffleNetV1`` (groups 3): a 1x1 stem of 24 channels; bottlenecks of grouped 1x1
  convolutions around a channel shuffle and a depthwise 3x3; a stage's first block (stride 2)
  concatenates an ``AvgPool2d(3, 2, 1)`` shortcut. torch's default initialisers.
- ``ShuffleNetV2`` (net size 1: 116, 232, 464, 1024): a 1x1 stem of 24 channels; each stage a
  ``DownBlock`` (two strided branches, concatenated, shuffled) then channel-split
  ``BasicBlock``s; a final 1x1 ``conv2``. torch's default initialisers.

Module names are torch's with ``.`` as ``_`` (``blocks.1.0.conv.3`` is ``blocks_1_0/conv_3``,
``classifier.0`` the top-level ``classifier_0``): ``cifar_layers.torch_name``.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax.models import cifar_layers, layers
from kdjax.models.layers import BatchNorm

Dtype = Any

# mdistiller's interverted_residual_setting: expansion (T: the network's), width, blocks, stride.
_V2_STAGES = ((1, 16, 1, 1), (None, 24, 2, 1), (None, 32, 3, 2), (None, 64, 4, 2), (None, 96, 3, 1),
              (None, 160, 3, 2), (None, 320, 1, 1))

# torch's default Conv2d initialiser, kaiming_uniform_(a=sqrt(5)): U(+-1/sqrt(fan_in)), as
# torch's Linear (flax's fan_in of a grouped kernel [k, k, in / groups, out] is torch's).
_TORCH_CONV_INIT = layers.dense_kernel_init


def conv_bn(x, train: bool, mask, features: int, names: tuple[str, str], **conv):
    """``BatchNorm(Conv2d(x))`` inside the calling module's compact ``__call__``: the layers named
    ``names`` (torch's, dots as ``_``); ``conv``: ``layers.conv``'s ``kernel``, ``stride``,
    ``groups``, ``kernel_init``, ``dtype``."""
    kernel, dtype = conv.pop("kernel", 1), conv.pop("dtype")
    x = layers.conv(features, kernel, conv.pop("stride", 1), name=names[0], dtype=dtype, **conv)(x)
    return BatchNorm(not train, dtype=dtype, name=names[1])(x, mask)


class _InvertedResidual(nn.Module):
    """mdistiller's MobileNetV2 ``InvertedResidual``: ``conv`` = 1x1 expansion to ``hidden``,
    BatchNorm, ReLU, depthwise 3x3 (``stride``), BatchNorm, ReLU, 1x1 projection to
    ``features``, BatchNorm (``conv_0..conv_7``); plus the input at stride 1 and unchanged width."""

    features: int
    hidden: int
    stride: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool, mask=None):
        cb = functools.partial(conv_bn, train=train, mask=mask, dtype=self.dtype)
        y = nn.relu(cb(x, features=self.hidden, names=("conv_0", "conv_1")))
        y = nn.relu(cb(y, features=self.hidden, names=("conv_3", "conv_4"), kernel=3, stride=self.stride,
                       groups=self.hidden))
        y = cb(y, features=self.features, names=("conv_6", "conv_7"))
        return x + y if self.stride == 1 and x.shape[-1] == self.features else y


class CifarMobileNetV2(nn.Module):
    """mdistiller's CIFAR ``MobileNetV2(T=expansion, width_mult=width)`` over NHWC float input;
    float32 logits (float64 when ``dtype`` is float64).

    ``dtype`` is the compute dtype; parameters and BatchNorm statistics stay float32. ``mask``
    marks the real examples of a padded batch for train-mode BatchNorm. ``head=False`` returns the
    pooled features (the input of ``classifier_0``). mdistiller's MobileNetV2 has no dropout.
    """

    expansion: int = 6
    width: float = 0.5
    num_classes: int = 100
    dtype: Dtype = jnp.float32
    head: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, mask: jax.Array | None = None, taps: bool = False):
        """Logits, or with ``taps`` ``(logits, features)``: mdistiller's ``feats`` as ``feat0``
        (the stem ``conv1``, stride 2), ``feat1`` (after ``blocks.1``, stride 2), ``feat2``
        (``blocks.2``, stride 4), ``feat3`` (``blocks.4``, stride 8), ``feat4`` (``blocks.6``,
        stride 16); ``stride2``, ``stride4``, ``stride8`` (= ``feat1..feat3``), ``stride16`` (the
        last layer at stride 16: ``conv2``'s 1280 channels after its ReLU, as kdjax's torchvision
        MobileNets end their strides) and ``pool`` (its ``pooled_feat``, float32). Its blocks end
        with a linear BatchNorm, so there are no separate pre-activation features."""
        cb = functools.partial(conv_bn, train=train, mask=mask, dtype=self.dtype)
        width = int(32 * self.width)
        x = nn.relu(cb(x.astype(self.dtype), features=width, names=("conv1_0", "conv1_1"), kernel=3, stride=2))
        features, by_stride, stride = {"feat0": x}, {}, 2
        for i, (t, c, n, s) in enumerate(_V2_STAGES):
            out = int(c * self.width)
            for j in range(n):
                block = _InvertedResidual(out, width * (t or self.expansion), s if j == 0 else 1, self.dtype,
                                          name=f"blocks_{i}_{j}")
                x = block(x, train, mask)
                width = out
            stride *= s
            by_stride[stride] = x
            if i in (1, 2, 4, 6):
                features[f"feat{len(features)}"] = x
        last = int(1280 * self.width) if self.width > 1.0 else 1280
        x = nn.relu(cb(x, features=last, names=("conv2_0", "conv2_1")))
        by_stride[stride] = x
        features.update(cifar_layers.stride_taps(by_stride, (2, 4, 8, 16)))
        logits = cifar_layers.pooled_logits(
            self, x, features,
            lambda fan_in: cifar_layers.zero_bias_linear(self.num_classes, self.dtype, "classifier_0", weight_std=0.01))
        return (logits, features) if taps else logits


class _ShuffleV1Block(nn.Module):
    """mdistiller's ShuffleNetV1 ``Bottleneck``: ``conv1`` (1x1, ``in_groups``), ``bn1``, ReLU,
    shuffle, ``conv2`` (depthwise 3x3, ``stride``), ``bn2``, ReLU, ``conv3`` (1x1, ``groups``),
    ``bn3``; at stride 2 concatenated with the ``AvgPool2d(3, 2, 1)`` of the input, else added to
    it. Returns ``(relu(preact), preact)``."""

    features: int
    stride: int
    groups: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool, mask=None):
        mid = self.features // 4
        in_groups = 1 if x.shape[-1] == 24 else self.groups  # the stem's 24 channels are not grouped
        cb = functools.partial(conv_bn, train=train, mask=mask, dtype=self.dtype, kernel_init=_TORCH_CONV_INIT)
        y = nn.relu(cb(x, features=mid, names=("conv1", "bn1"), groups=in_groups))
        y = cifar_layers.channel_shuffle(y, in_groups)
        y = nn.relu(cb(y, features=mid, names=("conv2", "bn2"), kernel=3, stride=self.stride, groups=mid))
        y = cb(y, features=self.features, names=("conv3", "bn3"), groups=self.groups)
        if self.stride == 2:
            preact = jnp.concatenate([y, cifar_layers.avg_pool_3x3_stride2(x)], axis=-1)
        else:
            preact = y + x
        return nn.relu(preact), preact


class ShuffleNetV1(nn.Module):
    """mdistiller's ``ShuffleV1``: ``ShuffleNet(out_planes=widths, num_blocks=blocks, groups)``
    over NHWC float input; logits, ``dtype``, ``mask`` and ``head`` (the input of ``linear``) as in
    ``CifarMobileNetV2``."""

    widths: tuple[int, int, int] = (240, 480, 960)
    blocks: tuple[int, int, int] = (4, 8, 4)
    groups: int = 3
    num_classes: int = 100
    dtype: Dtype = jnp.float32
    head: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, mask: jax.Array | None = None, taps: bool = False):
        """Logits, or with ``taps`` ``(logits, features)``: mdistiller's ``feats`` as ``feat0``
        (the stem after its ReLU, stride 1) and ``feat1..feat3`` (each stage's output after the
        ReLU; strides 2, 4, 8), its ``preact_feats`` as ``preact1..preact3`` (the same before
        that ReLU), ``stride1``, ``stride2``, ``stride4``, ``stride8`` (= ``feat0..feat3``) and
        ``pool`` (its ``pooled_feat``, float32)."""
        x = conv_bn(x.astype(self.dtype), train, mask, 24, ("conv1", "bn1"), kernel_init=_TORCH_CONV_INIT,
                    dtype=self.dtype)
        x = nn.relu(x)
        features, preacts = {"feat0": x}, {}
        for i, (width, n) in enumerate(zip(self.widths, self.blocks)):
            for j in range(n):
                # a stage's first block concatenates its input, so its branch is narrower by as much
                block = _ShuffleV1Block(width - x.shape[-1] if j == 0 else width, 2 if j == 0 else 1, self.groups,
                                        self.dtype, name=f"layer{i + 1}_{j}")
                x, preact = block(x, train, mask)
            features[f"feat{i + 1}"], preacts[f"preact{i + 1}"] = x, preact
        features.update(preacts)
        features.update(cifar_layers.stride_taps({2**i: features[f"feat{i}"] for i in range(4)}, (1, 2, 4, 8)))
        logits = cifar_layers.pooled_logits(
            self, x, features, lambda fan_in: layers.linear(self.num_classes, fan_in, self.dtype, name="linear"))
        return (logits, features) if taps else logits


class _ShuffleV2Down(nn.Module):
    """mdistiller's ShuffleNetV2 ``DownBlock`` (stride 2) to ``features`` channels: the left
    branch ``conv1`` (depthwise 3x3) ``bn1`` ``conv2`` (1x1) ``bn2`` ReLU, the right ``conv3``
    (1x1) ``bn3`` ReLU ``conv4`` (depthwise 3x3) ``bn4`` ``conv5`` (1x1) ``bn5`` ReLU, each to
    ``features / 2``; concatenated and shuffled (2 groups)."""

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool, mask=None):
        mid, width = self.features // 2, x.shape[-1]
        cb = functools.partial(conv_bn, train=train, mask=mask, dtype=self.dtype, kernel_init=_TORCH_CONV_INIT)
        left = cb(x, features=width, names=("conv1", "bn1"), kernel=3, stride=2, groups=width)
        left = nn.relu(cb(left, features=mid, names=("conv2", "bn2")))
        right = nn.relu(cb(x, features=mid, names=("conv3", "bn3")))
        right = cb(right, features=mid, names=("conv4", "bn4"), kernel=3, stride=2, groups=mid)
        right = nn.relu(cb(right, features=mid, names=("conv5", "bn5")))
        return cifar_layers.channel_shuffle(jnp.concatenate([left, right], axis=-1), 2)


class _ShuffleV2Basic(nn.Module):
    """mdistiller's ShuffleNetV2 ``BasicBlock`` (split ratio 0.5): the second half of the
    channels through ``conv1`` (1x1) ``bn1`` ReLU ``conv2`` (depthwise 3x3) ``bn2`` ``conv3``
    (1x1) ``bn3`` ReLU, concatenated after the untouched first half and shuffled (2 groups).
    Returns ``(output, preact)``: mdistiller's ``preact`` is the concatenation before the last
    ReLU, not shuffled."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool, mask=None):
        half = x.shape[-1] // 2
        kept, y = x[..., :half], x[..., half:]
        width = y.shape[-1]
        cb = functools.partial(conv_bn, train=train, mask=mask, dtype=self.dtype, kernel_init=_TORCH_CONV_INIT)
        y = nn.relu(cb(y, features=width, names=("conv1", "bn1")))
        y = cb(y, features=width, names=("conv2", "bn2"), kernel=3, groups=width)
        y = cb(y, features=width, names=("conv3", "bn3"))
        out = jnp.concatenate([kept, nn.relu(y)], axis=-1)
        return cifar_layers.channel_shuffle(out, 2), jnp.concatenate([kept, y], axis=-1)


class ShuffleNetV2(nn.Module):
    """mdistiller's ``ShuffleV2``: ``ShuffleNetV2(net_size=1)``, stage widths ``widths[:3]``
    with ``blocks`` BasicBlocks after each DownBlock and a final 1x1 ``conv2`` to ``widths[3]``,
    over NHWC float input; logits, ``dtype``, ``mask`` and ``head`` (the input of ``linear``) as in
    ``CifarMobileNetV2``."""

    widths: tuple[int, int, int, int] = (116, 232, 464, 1024)
    blocks: tuple[int, int, int] = (3, 7, 3)
    num_classes: int = 100
    dtype: Dtype = jnp.float32
    head: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, mask: jax.Array | None = None, taps: bool = False):
        """Logits, or with ``taps`` ``(logits, features)``: mdistiller's ``feats`` as ``feat0``
        (the stem after its ReLU, stride 1) and ``feat1..feat3`` (each stage's output, shuffled;
        strides 2, 4, 8), its ``preact_feats`` as ``preact1..preact3`` (each stage's last
        concatenation before the ReLU, not shuffled), ``stride1``, ``stride2``, ``stride4``
        (= ``feat0..feat2``), ``stride8`` (the last layer at stride 8: ``conv2`` after its ReLU)
        and ``pool`` (its ``pooled_feat``, float32)."""
        cb = functools.partial(conv_bn, train=train, mask=mask, dtype=self.dtype, kernel_init=_TORCH_CONV_INIT)
        x = nn.relu(cb(x.astype(self.dtype), features=24, names=("conv1", "bn1")))
        features, preacts = {"feat0": x}, {}
        for i, (width, n) in enumerate(zip(self.widths, self.blocks)):
            x = _ShuffleV2Down(width, self.dtype, name=f"layer{i + 1}_0")(x, train, mask)
            for j in range(n):
                x, preact = _ShuffleV2Basic(self.dtype, name=f"layer{i + 1}_{j + 1}")(x, train, mask)
            features[f"feat{i + 1}"], preacts[f"preact{i + 1}"] = x, preact
        x = nn.relu(cb(x, features=self.widths[3], names=("conv2", "bn2")))
        features.update(preacts)
        by_stride = {1: features["feat0"], 2: features["feat1"], 4: features["feat2"], 8: x}
        features.update(cifar_layers.stride_taps(by_stride, (1, 2, 4, 8)))
        logits = cifar_layers.pooled_logits(
            self, x, features, lambda fan_in: layers.linear(self.num_classes, fan_in, self.dtype, name="linear"))
        return (logits, features) if taps else logits
