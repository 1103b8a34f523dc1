"""The building blocks every architecture shares: torch's BatchNorm (with a mask), convolution
and Linear layers with torchvision's initialisers, torchvision's ``Conv2dNormActivation`` and
``SqueezeExcitation``, stochastic depth, and the generic head, initialiser and shape helpers.

Module names follow torchvision's so that weight conversion stays a renaming plus a transpose:
a torch ``Sequential``'s children are the flax modules ``"0"``, ``"1"``, ...
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax.models import kernels

Dtype = Any

# torchvision initialises convolutions with kaiming_normal_(mode="fan_out", relu) and Linear
# layers with kaiming_uniform_(a=sqrt(5)) (= U(+-1/sqrt(fan_in))) for the weight and the same
# bound for the bias. Matching the distributions makes ``--init scratch`` runs comparable with
# scratch runs of the PyTorch reference.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
dense_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def dense_bias_init(fan_in: int) -> Callable:
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


def linear(num_classes: int, fan_in: int, dtype: Dtype, **kwargs) -> nn.Dense:
    """torch.nn.Linear(fan_in, num_classes) as torch initialises it; float32 parameters."""
    return nn.Dense(
        num_classes,
        kernel_init=dense_kernel_init,
        bias_init=dense_bias_init(fan_in),
        dtype=dtype,
        param_dtype=jnp.float32,
        **kwargs,
    )



def conv(features: int, kernel: int, stride: int = 1, padding: int | None = None, *, name: str,
         dtype: Dtype, groups: int = 1, **options) -> nn.Module:
    """torch.nn.Conv2d with explicit padding (torch's ``(kernel - 1) // 2`` unless given): flax's
    ``'SAME'`` pads asymmetrically for stride 2 and no longer computes torch's function.
    ``options``: ``bias`` (default False) and ``kernel_init`` (default torchvision's ``conv_init``).
    A depthwise convolution (``groups == features``) is ``DepthwiseConv``."""
    bias = options.pop("bias", False)
    kernel_init = options.pop("kernel_init", conv_init)
    if options:
        raise TypeError(f"conv() got unexpected options {sorted(options)}")
    pad = (kernel - 1) // 2 if padding is None else padding
    if groups > 1 and groups == features:
        return DepthwiseConv(features, kernel, stride, pad, bias, kernel_init, dtype, name=name)
    return nn.Conv(features, (kernel, kernel), (stride, stride), padding=((pad, pad), (pad, pad)),
                   use_bias=bias, feature_group_count=groups, kernel_init=kernel_init,
                   bias_init=nn.initializers.zeros, dtype=dtype, param_dtype=jnp.float32, name=name)


class DepthwiseConv(nn.Module):
    """torch.nn.Conv2d(c, c, kernel, stride, padding, groups=c): nn.Conv's parameters (``kernel``
    ``[k, k, 1, c]``, ``bias``) computed by ``kernels.depthwise_conv``, which on CPU replaces
    XLA's slow grouped convolution (timings: benchmarks/README.md)."""

    features: int
    kernel_size: int
    stride: int
    padding: int
    use_bias: bool
    kernel_init: Callable
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        if x.shape[-1] != self.features:
            raise ValueError(f"a depthwise convolution of {self.features} channels got {x.shape[-1]}")
        k = self.kernel_size
        kernel = self.param("kernel", self.kernel_init, (k, k, 1, self.features), jnp.float32)
        y = kernels.depthwise_conv(x, kernel, self.stride, self.padding, self.dtype)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32).astype(self.dtype)
        return y


class ConvNormActivation(nn.Module):
    """torchvision.ops.Conv2dNormActivation: ``0`` Conv2d (no bias), ``1`` BatchNorm2d, then
    ``activation`` (None: none)."""

    features: int
    kernel: int = 3
    stride: int = 1
    groups: int = 1
    activation: Callable | None = nn.relu
    bn_epsilon: float = 1e-5
    bn_momentum: float = 0.9  # flax's convention: torch's momentum=0.1
    dtype: Dtype = jnp.float32
    kernel_init: Callable = conv_init

    @nn.compact
    def __call__(self, x, train: bool, mask=None):
        x = conv(self.features, self.kernel, self.stride, name="0", dtype=self.dtype, groups=self.groups,
                 kernel_init=self.kernel_init)(x)
        x = BatchNorm(not train, self.bn_momentum, self.bn_epsilon, self.dtype, name="1")(x, mask)
        return x if self.activation is None else self.activation(x)


class SqueezeExcitation(nn.Module):
    """torchvision.ops.SqueezeExcitation: global average pool, ``fc1`` (1x1 Conv2d),
    ``activation``, ``fc2``, ``scale_activation``; the input scaled channel-wise."""

    squeeze: int
    activation: Callable = nn.relu
    scale_activation: Callable = nn.sigmoid
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        s = jnp.mean(widened(x), axis=(1, 2), keepdims=True).astype(self.dtype)
        s = self.activation(conv(self.squeeze, 1, name="fc1", dtype=self.dtype, bias=True)(s))
        s = self.scale_activation(conv(x.shape[-1], 1, name="fc2", dtype=self.dtype, bias=True)(s))
        return x * s


def widened(x: jax.Array) -> jax.Array:
    """``x`` in float32, or wider where the network computes wider: global pools and logits stay
    float32 under bfloat16 compute and float64 in the tests' float64 certificates (whose random
    logits, up to ~10^2, would lose the certificate's 1e-6 in float32)."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """torchvision's ``_make_divisible``: ``v`` rounded to a multiple of ``divisor``, never more
    than 10% below ``v``."""
    min_value = divisor if min_value is None else min_value
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


def stochastic_depth(module: nn.Module, x: jax.Array, p: float, train: bool) -> jax.Array:
    """torchvision.ops.stochastic_depth, mode ``"row"``: in train mode each example's residual
    branch ``x`` is dropped with probability ``p`` and the kept ones scaled by ``1 / (1 - p)``;
    draws from ``module``'s ``'dropout'`` rng."""
    if not train or p == 0.0:
        return x
    keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - p, (x.shape[0],) + (1,) * (x.ndim - 1))
    return x * keep.astype(x.dtype) / (1.0 - p)


def dropout(module: nn.Module, x: jax.Array, p: float, train: bool) -> jax.Array:
    """torch.nn.Dropout(p) in train mode (identity in eval mode or at ``p == 0``)."""
    if not train or p == 0.0:
        return x
    keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - p, x.shape)
    return jnp.where(keep, x / (1.0 - p), 0).astype(x.dtype)


def without_head(model: nn.Module) -> nn.Module:
    """``model`` stopping at its pre-logit features (the registry's ``backbone``): every network
    of kdjax has a ``head`` field."""
    return model.clone(head=False)


def classify(model: nn.Module, head_params, features: jax.Array) -> jax.Array:
    """``model``'s head (a Linear) on its pre-logit ``features`` (``head=False`` output): float32
    logits, the same function ``model`` applies."""
    head = linear(model.num_classes, features.shape[-1], model.dtype, parent=None)
    return head.apply({"params": head_params}, features).astype(jnp.float32)


def init_variables(model: nn.Module, key: jax.Array, image_size: int = 224) -> dict:
    """Fresh ``{'params', 'batch_stats'}`` with torchvision's initialisation distributions
    (``batch_stats`` empty in a network without BatchNorm: ConvNeXt, ViT)."""
    return {"batch_stats": {}, **_init(model, key, image_size)}


# Module-level so that every run of a sweep reuses one compiled initialiser (a jit of a fresh
# lambda per call would recompile the network's init for every run).
@functools.partial(jax.jit, static_argnums=(0, 2))
def _init(model: nn.Module, key: jax.Array, image_size: int):
    return model.init(_init_rngs(key), jnp.zeros((1, image_size, image_size, 3), jnp.float32), train=False)


def _init_rngs(key: jax.Array) -> dict:
    """``{'params': key}`` (what a bare key means to flax, so kdjax's networks draw the same
    parameters), plus a ``dropout`` stream: an NNX module's ``nnx.Dropout`` takes one when it is
    built, and flax's bridge builds it inside ``init``."""
    return {"params": key, "dropout": jax.random.fold_in(key, 1)}


@functools.lru_cache(maxsize=32)
def abstract_variables(model: nn.Module, image_size: int = 224) -> dict:
    """Shapes and dtypes of ``init_variables`` without computing anything (memoised: checks of
    saved and loaded model directories ask for the same shapes again and again; and kept on disk
    across processes for kdjax's own networks, ``kdjax.models.shapes``)."""
    from kdjax.models import shapes

    def trace() -> dict:
        dummy = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
        return {"batch_stats": {}, **jax.eval_shape(lambda x: model.init(_init_rngs(jax.random.key(0)), x, train=False),
                                                     dummy)}

    return shapes.cached(model, image_size, trace)


def fresh_head(key: jax.Array, fan_in: int, num_classes: int) -> dict:
    """A new ``fc`` layer ``{'kernel', 'bias'}`` drawn as torch.nn.Linear initialises one (the
    student's replaced ``Linear(512, num_classes)``), with the initialisers of ``linear``."""
    k_kernel, k_bias = jax.random.split(key)
    return {
        "kernel": dense_kernel_init(k_kernel, (fan_in, num_classes), jnp.float32),
        "bias": dense_bias_init(fan_in)(k_bias, (num_classes,), jnp.float32),
    }


def count_params(params) -> int:
    return sum(int(p.size) for p in jax.tree_util.tree_leaves(params))
