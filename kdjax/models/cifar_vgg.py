"""The CIFAR VGGs of the KD literature (vgg8/11/13/16/19 with BatchNorm) in flax.linen, NHWC:
mdistiller's ``mdistiller/models/cifar/vgg.py`` (RepDistiller's ``models/vgg.py``).

Five blocks of 3x3 convolutions (with bias), each followed by BatchNorm and ReLU, the last ReLU
of a block applied outside it (so mdistiller can read the block's output before it); 2x2
max-pools ``pool0..pool2`` before blocks 1-3, ``pool3`` before block 4 only for a 64 px input
(Tiny-ImageNet; at 32 px block 4 runs at block 3's 4x4), then a global average pool and
``classifier`` (Linear(512, num_classes)). Convolutions N(0, sqrt(2 / fan_out)) with zero biases,
the Linear N(0, 0.01) with a zero bias.

Module names are torch's with ``.`` as ``_``: block ``i``'s ``j``-th convolution is
``block<i>_<3j>`` and its BatchNorm ``block<i>_<3j + 1>`` (torch's Sequential counts the ReLUs).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax.models import cifar_layers, kernels, layers
from kdjax.models.layers import BatchNorm

Dtype = Any

# mdistiller's cfg: the convolution widths of the five blocks.
VGG_STAGES = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),  # cfg "S"
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),  # "A"
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),  # "B"
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),  # "D"
    "vgg19": ((64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512), (512, 512, 512, 512)),  # "E"
}


class CifarVGG(nn.Module):
    """mdistiller's VGG with BatchNorm over NHWC float input; float32 logits (float64 when
    ``dtype`` is float64).

    ``stages``: the convolution widths of the five blocks (``VGG_STAGES``). ``dtype`` is the
    compute dtype; parameters and BatchNorm statistics stay float32. ``mask`` marks the real
    examples of a padded batch for train-mode BatchNorm. ``head=False`` returns the pooled
    features (the input of ``classifier``).
    """

    stages: tuple[tuple[int, ...], ...]
    num_classes: int = 100
    dtype: Dtype = jnp.float32
    head: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, mask: jax.Array | None = None, taps: bool = False):
        """Logits, or with ``taps`` ``(logits, features)``: mdistiller's ``feats`` as
        ``feat0..feat4`` (each block's output after its ReLU; at 32 px strides 1, 2, 4, 8, 8), its
        ``preact_feats`` as ``preact1..preact4`` (the same before that ReLU), ``stride1``,
        ``stride2``, ``stride4``, ``stride8`` (the last block's output at each stride: at 32 px
        ``feat0, feat1, feat2, feat4``; at 64 px ``stride8`` is ``feat3``) and ``pool`` (its
        ``pooled_feat``, float32)."""
        if len(self.stages) != 5:
            raise ValueError(f"mdistiller's VGG has five blocks, got {len(self.stages)}")
        pool3 = x.shape[1] == 64  # mdistiller: `if h == 64: x = self.pool3(x)`
        x = x.astype(self.dtype)
        features, preacts, by_stride, stride = {}, {}, {}, 1
        for i, widths in enumerate(self.stages):
            if i in (1, 2, 3) or (i == 4 and pool3):
                x = kernels.max_pool(x, 2, 2, 0)
                stride *= 2
            for j, width in enumerate(widths):
                if j:
                    x = nn.relu(x)
                x = layers.conv(width, 3, name=f"block{i}_{3 * j}", dtype=self.dtype, bias=True)(x)
                x = BatchNorm(not train, dtype=self.dtype, name=f"block{i}_{3 * j + 1}")(x, mask)
            if i:
                preacts[f"preact{i}"] = x
            x = nn.relu(x)
            features[f"feat{i}"] = by_stride[stride] = x
        features.update(preacts)
        features.update(cifar_layers.stride_taps(by_stride, (1, 2, 4, 8)))
        logits = cifar_layers.pooled_logits(
            self, x, features, lambda fan_in: cifar_layers.zero_bias_linear(self.num_classes, self.dtype, "classifier",
                                                                            weight_std=0.01))
        return (logits, features) if taps else logits
