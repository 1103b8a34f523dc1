"""torchvision's ResNets (v1.5: 18, 34, 50, 101, 152, ResNeXt-50 32x4d, Wide ResNet-50-2) in
flax.linen, NHWC.

Module and parameter names mirror torchvision's state_dict keys (``layer1.0.conv1.weight`` is
``params/layer1_0/conv1/kernel``) so that weight conversion is a renaming plus a transpose, and
every padding is explicit because flax's ``'SAME'`` pads asymmetrically for stride 2 and then
no longer computes torchvision's function.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax.models import kernels, layers
from kdjax.models.layers import BatchNorm, conv_init, linear
from kdjax.models.spec import STRIDE_TAPS, InputSpec, ModelSpec, indexed

Dtype = Any

def _conv(features: int, kernel: int, stride: int, padding: int, name: str, dtype: Dtype,
          groups: int = 1):
    return nn.Conv(
        features,
        (kernel, kernel),
        (stride, stride),
        padding=((padding, padding), (padding, padding)),
        use_bias=False,
        feature_group_count=groups,
        kernel_init=conv_init,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


def _add_shortcut(y, x, stride: int, bn, mask, dtype: Dtype):
    """``relu(y + shortcut(x))``; the shortcut is torchvision's ``downsample`` (1x1 convolution
    + BatchNorm) when the block changes the resolution or the width, else the identity. Called
    inside a block's compact ``__call__``, so the layers are the block's."""
    if stride != 1 or x.shape[-1] != y.shape[-1]:
        x = _conv(y.shape[-1], 1, stride, 0, "downsample_0", dtype)(x)
        x = bn("downsample_1")(x, mask)
    return nn.relu(y + x)


class _Block(nn.Module):
    """What torchvision's two residual blocks share: their fields and their BatchNorm factory."""

    features: int
    stride: int = 1
    dtype: Dtype = jnp.float32
    groups: int = 1
    width_per_group: int = 64

    def batch_norm(self, train: bool):
        """``name -> BatchNorm``: batch statistics in train mode, running ones in eval mode."""
        return lambda name: BatchNorm(not train, dtype=self.dtype, name=name)


class BasicBlock(_Block):
    """torchvision.models.resnet.BasicBlock (expansion 1; torchvision allows no groups or other
    width here, so ``groups`` and ``width_per_group`` must keep their defaults)."""

    expansion = 1

    @nn.compact
    def __call__(self, x, train: bool, mask=None):
        bn = self.batch_norm(train)
        y = _conv(self.features, 3, self.stride, 1, "conv1", self.dtype)(x)
        y = nn.relu(bn("bn1")(y, mask))
        y = _conv(self.features, 3, 1, 1, "conv2", self.dtype)(y)
        y = bn("bn2")(y, mask)
        return _add_shortcut(y, x, self.stride, bn, mask, self.dtype)


class Bottleneck(_Block):
    """torchvision.models.resnet.Bottleneck, v1.5: the stride sits on the 3x3 convolution, which
    is grouped (``groups``, ResNeXt) and ``features * width_per_group / 64 * groups`` wide (Wide
    ResNets double ``width_per_group``)."""

    expansion = 4

    @nn.compact
    def __call__(self, x, train: bool, mask=None):
        bn = self.batch_norm(train)
        out = self.features * self.expansion
        width = int(self.features * (self.width_per_group / 64.0)) * self.groups
        y = _conv(width, 1, 1, 0, "conv1", self.dtype)(x)
        y = nn.relu(bn("bn1")(y, mask))
        y = _conv(width, 3, self.stride, 1, "conv2", self.dtype, self.groups)(y)
        y = nn.relu(bn("bn2")(y, mask))
        y = _conv(out, 1, 1, 0, "conv3", self.dtype)(y)
        y = bn("bn3")(y, mask)
        return _add_shortcut(y, x, self.stride, bn, mask, self.dtype)


class ResNet(nn.Module):
    """ResNet over NHWC float input; returns float32 logits ``[batch, num_classes]``.

    ``dtype`` is the compute dtype (bfloat16 on accelerators); parameters, BatchNorm statistics,
    the global pool and the logits stay float32. ``mask`` marks the real examples of a padded
    batch so that train-mode BatchNorm ignores the padding. ``head=False`` stops at the pooled
    features ``[batch, width]`` (the ``fc`` parameters are then not used); ``classify(model,
    params['fc'], features)`` completes the same function.
    """

    stage_sizes: Sequence[int]
    block: type
    num_classes: int = 1000
    dtype: Dtype = jnp.float32
    head: bool = True
    groups: int = 1  # the Bottleneck's 3x3 convolutions (ResNeXt)
    width_per_group: int = 64  # 128: Wide ResNet-50-2

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, mask: jax.Array | None = None,
                 taps: bool = False):
        """Logits, or with ``taps`` ``(logits, features)``: the four stage outputs
        ``layer1..layer4`` (NHWC, compute dtype; also as ``stride4..stride32``) and the pooled
        pre-logit ``pool`` (float32)."""
        features = {}
        x = x.astype(self.dtype)
        x = _conv(64, 7, 2, 3, "conv1", self.dtype)(x)
        x = nn.relu(BatchNorm(not train, dtype=self.dtype, name="bn1")(x, mask))
        # torchvision pads the max-pool with -inf (reduce_window's init value here), not zeros.
        x = kernels.max_pool(x, 3, 2, 1)
        for i, blocks in enumerate(self.stage_sizes):
            for j in range(blocks):
                stride = 2 if i > 0 and j == 0 else 1
                block = self.block(64 * 2**i, stride, self.dtype, self.groups, self.width_per_group,
                                   name=f"layer{i + 1}_{j}")
                x = block(x, train, mask)
            features[f"layer{i + 1}"] = x
        features.update({tap: features[f"layer{i + 1}"] for i, tap in enumerate(STRIDE_TAPS)})
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        features["pool"] = x
        if self.head:
            x = linear(self.num_classes, x.shape[-1], self.dtype, name="fc")(x).astype(jnp.float32)
        return (x, features) if taps else x


def _spec(name: str, stages: tuple[int, ...], block: type, width: int, groups: int = 1,
          width_per_group: int = 64) -> ModelSpec:
    return ModelSpec(
        name=name,
        build=functools.partial(ResNet, stage_sizes=stages, block=block, groups=groups,
                                width_per_group=width_per_group),
        head="fc",
        head_width=width,
        input=InputSpec(),  # torchvision's IMAGENET1K_V1 transform: 256 -> 224, bilinear
        taps=("layer1", "layer2", "layer3", "layer4", *STRIDE_TAPS, "pool"),
        backbone=layers.without_head,
        classify=layers.classify,
        torchvision=name,
        torch_name=indexed,
    )


SPECS = {
    "resnet18": _spec("resnet18", (2, 2, 2, 2), BasicBlock, 512),
    "resnet34": _spec("resnet34", (3, 4, 6, 3), BasicBlock, 512),
    "resnet50": _spec("resnet50", (3, 4, 6, 3), Bottleneck, 2048),
    "resnet101": _spec("resnet101", (3, 4, 23, 3), Bottleneck, 2048),
    "resnet152": _spec("resnet152", (3, 8, 36, 3), Bottleneck, 2048),
    "resnext50_32x4d": _spec("resnext50_32x4d", (3, 4, 6, 3), Bottleneck, 2048, groups=32, width_per_group=4),
    "wide_resnet50_2": _spec("wide_resnet50_2", (3, 4, 6, 3), Bottleneck, 2048, width_per_group=128),
}
