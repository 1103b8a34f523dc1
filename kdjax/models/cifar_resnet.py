"""The CIFAR ResNets and Wide ResNets of the KD literature in flax.linen, NHWC: mdistiller's
``mdistiller/models/cifar/resnet.py`` and ``wrn.py`` (RepDistiller's ``models/resnet.py`` and
``wrn.py``, the same networks).

- ``CifarResNet``: a 3x3 stem and three stages of ``(depth - 2) / 6`` BasicBlocks of widths
  ``widths[1:]`` (strides 1, 2, 2), torchvision's block with ``downsample`` (1x1 convolution and
  BatchNorm) where a block changes stride or width; convolutions ``kaiming_normal_(mode=
  "fan_out")``, torch's default Linear. resnet20..110 are also torchdistill's ``ResNet4Cifar``.
- ``WideResNet``: Zagoruyko's pre-activation WRN as mdistiller writes it (from xternalz'
  WideResNet-pytorch): a block that changes the width activates its input *before* the 1x1
  ``convShortcut``, so the shortcut reads ``relu(bn1(x))``, not ``x``; a final BatchNorm and ReLU
  before the pool; convolutions N(0, sqrt(2 / fan_out)), torch's default Linear weight with a
  zero bias. Dropout is 0 in every KD recipe and absent here.

Module names are torch's with ``.`` as ``_`` (``layer1.0.downsample.0`` is ``layer1_0/downsample_0``,
``block1.layer.0.convShortcut`` is ``block1_layer_0/convShortcut``): ``cifar_layers.torch_name``.
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


def _norm(train: bool, dtype: Dtype):
    """``name -> BatchNorm``: batch statistics in train mode, running ones in eval mode."""
    return lambda name: BatchNorm(not train, dtype=dtype, name=name)


class _BasicBlock(nn.Module):
    """mdistiller's ``resnet.BasicBlock``: ``conv1`` (3x3, ``stride``), ``bn1``, ReLU, ``conv2``,
    ``bn2``, plus the shortcut; returns ``(relu(sum), sum)``: mdistiller's last block of a stage
    also returns the sum before its ReLU, the stage's ``preact`` feature."""

    features: int
    stride: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool, mask=None):
        bn = _norm(train, self.dtype)
        y = layers.conv(self.features, 3, self.stride, name="conv1", dtype=self.dtype)(x)
        y = nn.relu(bn("bn1")(y, mask))
        y = layers.conv(self.features, 3, name="conv2", dtype=self.dtype)(y)
        y = bn("bn2")(y, mask)
        if self.stride != 1 or x.shape[-1] != self.features:
            x = layers.conv(self.features, 1, self.stride, name="downsample_0", dtype=self.dtype)(x)
            x = bn("downsample_1")(x, mask)
        preact = y + x
        return nn.relu(preact), preact


class CifarResNet(nn.Module):
    """mdistiller's CIFAR ResNet (BasicBlock, ``depth = 6n + 2``) over NHWC float input; float32
    logits (float64 when ``dtype`` is float64).

    ``widths``: mdistiller's ``num_filters``, the stem's width then the three stages' ([16, 16,
    32, 64]; the ``x4`` networks [32, 64, 128, 256]). ``dtype`` is the compute dtype; parameters
    and BatchNorm statistics stay float32. ``mask`` marks the real examples of a padded batch for
    train-mode BatchNorm. ``head=False`` returns the pooled features (the input of ``fc``).
    """

    depth: int
    widths: tuple[int, int, int, int]
    num_classes: int = 100
    dtype: Dtype = jnp.float32
    head: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, mask: jax.Array | None = None, taps: bool = False):
        """Logits, or with ``taps`` ``(logits, features)``: mdistiller's ``feats`` as ``feat0``
        (the stem after its ReLU, stride 1) and ``feat1..feat3`` (each stage's output, after the
        ReLU; strides 1, 2, 4), its ``preact_feats`` as ``preact1..preact3`` (the same before the
        last ReLU), ``stride1``, ``stride2``, ``stride4`` (= ``feat1..feat3``) and ``pool`` (its
        ``pooled_feat``, float32)."""
        if self.depth < 8 or (self.depth - 2) % 6:
            raise ValueError(f"a CIFAR ResNet of BasicBlocks has depth 6n + 2 (8, 14, 20, ...), got {self.depth}")
        blocks = (self.depth - 2) // 6
        x = layers.conv(self.widths[0], 3, name="conv1", dtype=self.dtype)(x.astype(self.dtype))
        x = nn.relu(BatchNorm(not train, dtype=self.dtype, name="bn1")(x, mask))
        features, preacts = {"feat0": x}, {}
        for i, width in enumerate(self.widths[1:]):
            for j in range(blocks):
                stride = 2 if i > 0 and j == 0 else 1
                x, preact = _BasicBlock(width, stride, self.dtype, name=f"layer{i + 1}_{j}")(x, train, mask)
            features[f"feat{i + 1}"], preacts[f"preact{i + 1}"] = x, preact
        features.update(preacts)
        features.update(cifar_layers.stride_taps({1: features["feat1"], 2: features["feat2"], 4: x}, (1, 2, 4)))
        logits = cifar_layers.pooled_logits(
            self, x, features, lambda fan_in: layers.linear(self.num_classes, fan_in, self.dtype, name="fc"))
        return (logits, features) if taps else logits


class _WideBlock(nn.Module):
    """mdistiller's ``wrn.BasicBlock`` (dropout 0): ``bn1`` and ReLU on the input, ``conv1`` (3x3,
    ``stride``), ``bn2``, ReLU, ``conv2``, plus the input, or where the width changes
    ``convShortcut`` (1x1, ``stride``) of the *activated* input. Returns ``(sum, bn1's output)``:
    the second is what mdistiller's ``preact`` features read from a stage's first block.

    ``reapply_bn1``: apply ``bn1`` a second time to the input, as mdistiller's ``forward`` does to
    compute its ``preact`` features, which in train mode moves the running statistics twice."""

    features: int
    stride: int
    reapply_bn1: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool, mask=None):
        conv = functools.partial(layers.conv, dtype=self.dtype)
        bn1 = _norm(train, self.dtype)("bn1")
        normed = bn1(x, mask)
        activated = nn.relu(normed)
        y = conv(self.features, 3, self.stride, name="conv1")(activated)
        y = nn.relu(BatchNorm(not train, dtype=self.dtype, name="bn2")(y, mask))
        y = conv(self.features, 3, name="conv2")(y)
        if x.shape[-1] == self.features:
            if self.stride != 1:
                raise ValueError("mdistiller's WRN block has no shortcut for a stride without a change of width")
            shortcut = x
        else:
            shortcut = conv(self.features, 1, self.stride, name="convShortcut")(activated)
        if self.reapply_bn1:
            normed = bn1(x, mask)
        return y + shortcut, normed


class WideResNet(nn.Module):
    """mdistiller's Wide ResNet ``wrn_<depth>_<widen>`` (``depth = 6n + 4``, dropout 0) over NHWC
    float input; logits, ``dtype``, ``mask`` and ``head`` as in ``CifarResNet``.

    ``mdistiller_preact``: mdistiller's ``forward`` re-applies three BatchNorms to compute its
    ``preact`` features (``block2.layer.0.bn1``, ``block3.layer.0.bn1``, ``bn1``), and so in
    train mode updates their running statistics twice per step. True (the default) does the same,
    so that training matches mdistiller's; False updates them once (RepDistiller's forward without
    ``preact``). The logits and the taps are the same either way.
    """

    depth: int
    widen: int
    num_classes: int = 100
    dtype: Dtype = jnp.float32
    head: bool = True
    mdistiller_preact: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, mask: jax.Array | None = None, taps: bool = False):
        """Logits, or with ``taps`` ``(logits, features)``: mdistiller's ``feats`` as ``feat0``
        (the stem convolution, stride 1) and ``feat1..feat3`` (each stage's output, the residual
        sum before any BatchNorm; strides 1, 2, 4), its ``preact_feats`` as ``preact1..preact3``
        (those outputs after the next BatchNorm: the next stage's first ``bn1``, then the final
        ``bn1``), ``stride1``, ``stride2``, ``stride4`` (= ``feat1..feat3``) and ``pool`` (the
        pooled ``relu(bn1(feat3))``, float32)."""
        if self.depth < 10 or (self.depth - 4) % 6:
            raise ValueError(f"a Wide ResNet has depth 6n + 4 (10, 16, 22, ...), got {self.depth}")
        blocks = (self.depth - 4) // 6
        x = layers.conv(16, 3, name="conv1", dtype=self.dtype)(x.astype(self.dtype))
        features, preacts = {"feat0": x}, {}
        for i, width in enumerate((16 * self.widen, 32 * self.widen, 64 * self.widen)):
            for j in range(blocks):
                first = i > 0 and j == 0  # its bn1 normalises the previous stage's output
                block = _WideBlock(width, 2 if first else 1, self.mdistiller_preact and first, self.dtype,
                                   name=f"block{i + 1}_layer_{j}")
                x, normed = block(x, train, mask)
                if first:
                    preacts[f"preact{i}"] = normed
            features[f"feat{i + 1}"] = x
        bn1 = BatchNorm(not train, dtype=self.dtype, name="bn1")
        normed = bn1(x, mask)
        preacts["preact3"] = bn1(x, mask) if self.mdistiller_preact else normed
        features.update(preacts)
        features.update(cifar_layers.stride_taps({1: features["feat1"], 2: features["feat2"], 4: x}, (1, 2, 4)))
        logits = cifar_layers.pooled_logits(
            self, nn.relu(normed), features,
            lambda fan_in: cifar_layers.zero_bias_linear(self.num_classes, self.dtype, "fc"))
        return (logits, features) if taps else logits
