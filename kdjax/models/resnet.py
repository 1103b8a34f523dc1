"""torchvision's ResNets (v1.5: 18, 34, 50, 101, 152, ResNeXt-50 32x4d, Wide ResNet-50-2) in
flax.linen, NHWC.

Module and parameter names mirror torchvision's state_dict keys (``layer1.0.conv1.weight`` is
``params/layer1_0/conv1/kernel``) so that weight conversion is a renaming plus a transpose, and
every padding is explicit because flax's ``'SAME'`` pads asymmetrically for stride 2 and then
no longer computes torchvision's function.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax.models import kernels

Dtype = Any

# torchvision initialises convolutions with kaiming_normal_(mode="fan_out", relu) and Linear
# layers with kaiming_uniform_(a=sqrt(5)) (= U(+-1/sqrt(fan_in))) for the weight and the same
# bound for the bias. Matching the distributions makes ``--init scratch`` runs comparable with
# scratch runs of the PyTorch reference.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
_dense_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _dense_bias_init(fan_in: int) -> Callable:
    bound = 1.0 / fan_in**0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class BatchNorm(nn.Module):
    """torch.nn.BatchNorm2d over the last axis, with an optional per-example mask.

    Differences from ``flax.linen.BatchNorm`` that matter for parity with PyTorch:
    the running variance is updated with the *unbiased* batch variance (times n/(n-1)), as
    torch does, while the batch itself is normalised with the biased one. Statistics are always
    reduced in float32, whatever the compute dtype. ``mask`` (shape ``[batch]``) excludes padded
    examples from the batch statistics, so a padded last batch behaves like torch's smaller
    last batch. Under ``jax.jit`` with a batch sharded over devices the reductions are global:
    no ``axis_name`` is needed.

    One value per channel (``count``, real examples times positions, is 1: a last batch with one
    real example reaching a 1x1 map, as layer4 at 32 px), where torch raises "Expected more
    than 1 value per channel when training", is defined here as follows:

    - the real example is normalised with its batch statistics as usual (torch's formula), so
      its output is exactly ``bias``, whatever its input;
    - the running mean is updated from the one value; the running variance is left as it is,
      as its unbiased estimate is 0/0 (folding in the biased 0 would shrink it);
    - the padded rows are scaled with the running variance instead of the batch's 0, which
      would multiply them by ``1/sqrt(epsilon)`` per such layer until their squares overflow
      in a later layer's masked variance and ``0 * inf`` makes every output NaN, the real
      example's too.

    With no real example (``count`` 0) both running statistics are left as they are. Batches
    with two values or more per channel are computed exactly as before, bit for bit.

    ``momentum`` follows flax's convention: ``running = momentum * running + (1 - momentum) *
    batch``; flax's 0.9 is torch's ``momentum=0.1``.
    """

    use_running_average: bool
    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)

        if self.use_running_average:
            return kernels.normalize(x, ra_mean.value, ra_var.value, scale, bias, self.epsilon, self.dtype)
        per_example = 1
        for d in x.shape[1:-1]:
            per_example *= d
        m = jnp.ones(x.shape[:1], jnp.float32) if mask is None else mask.astype(jnp.float32)
        values = jnp.sum(m) * per_example  # per channel
        count = jnp.maximum(values, 1.0)
        y, mean, var = kernels.batch_norm_train(
            x, scale, bias, m / count, self.epsilon, self.dtype, fallback_var=ra_var.value
        )
        if not self.is_initializing():
            unbiased = var * count / jnp.maximum(count - 1.0, 1.0)
            new_mean = self.momentum * ra_mean.value + (1.0 - self.momentum) * mean
            new_var = self.momentum * ra_var.value + (1.0 - self.momentum) * unbiased
            ra_mean.value = jnp.where(values >= 1.0, new_mean, ra_mean.value)
            ra_var.value = jnp.where(values >= 2.0, new_var, ra_var.value)
        return y


def _conv(features: int, kernel: int, stride: int, padding: int, name: str, dtype: Dtype,
          groups: int = 1):
    return nn.Conv(
        features,
        (kernel, kernel),
        (stride, stride),
        padding=((padding, padding), (padding, padding)),
        use_bias=False,
        feature_group_count=groups,
        kernel_init=_conv_init,
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


def _head(num_classes: int, fan_in: int, dtype: Dtype, **kwargs) -> nn.Dense:
    return nn.Dense(
        num_classes,
        kernel_init=_dense_kernel_init,
        bias_init=_dense_bias_init(fan_in),
        dtype=dtype,
        param_dtype=jnp.float32,
        **kwargs,
    )


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
        ``layer1..layer4`` (NHWC, compute dtype) and the pooled pre-logit ``pool`` (float32)."""
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
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        features["pool"] = x
        if self.head:
            x = _head(self.num_classes, x.shape[-1], self.dtype, name="fc")(x).astype(jnp.float32)
        return (x, features) if taps else x


def without_head(model: ResNet) -> ResNet:
    """``model`` stopping at its pooled features (the registry's ``backbone``)."""
    return model.clone(head=False)


def classify(model: ResNet, fc_params, features: jax.Array) -> jax.Array:
    """``model``'s ``fc`` layer on its pooled ``features`` (``head=False`` output): float32
    logits, the same function ``model`` applies after pooling."""
    head = _head(model.num_classes, features.shape[-1], model.dtype, parent=None)
    return head.apply({"params": fc_params}, features).astype(jnp.float32)


def init_variables(model: nn.Module, key: jax.Array, image_size: int = 224) -> dict:
    """Fresh ``{'params', 'batch_stats'}`` with torchvision's initialisation distributions."""
    return dict(_init(model, key, image_size))


# Module-level so that every run of a sweep reuses one compiled initialiser (a jit of a fresh
# lambda per call recompiles a ResNet init each time: ~15 s on 2 CPU cores).
@functools.partial(jax.jit, static_argnums=(0, 2))
def _init(model: nn.Module, key: jax.Array, image_size: int):
    return model.init(key, jnp.zeros((1, image_size, image_size, 3), jnp.float32), train=False)


@functools.lru_cache(maxsize=32)
def abstract_variables(model: nn.Module, image_size: int = 224) -> dict:
    """Shapes and dtypes of ``init_variables`` without computing anything (memoised: checks of
    saved and loaded model directories ask for the same shapes again and again)."""
    dummy = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    return dict(jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), dummy))


def fresh_head(key: jax.Array, fan_in: int, num_classes: int) -> dict:
    """A new ``fc`` layer ``{'kernel', 'bias'}`` drawn as torch.nn.Linear initialises one (the
    student's replaced ``Linear(512, num_classes)``), with the same initialisers as ``ResNet``."""
    k_kernel, k_bias = jax.random.split(key)
    return {
        "kernel": _dense_kernel_init(k_kernel, (fan_in, num_classes), jnp.float32),
        "bias": _dense_bias_init(fan_in)(k_bias, (num_classes,), jnp.float32),
    }


def count_params(params) -> int:
    return sum(int(p.size) for p in jax.tree_util.tree_leaves(params))
