"""torchvision's ResNet-18 and ResNet-50 (v1.5) in flax.linen, NHWC.

Module and parameter names mirror torchvision's state_dict keys (``layer1.0.conv1.weight`` is
``params/layer1_0/conv1/kernel``) so that weight conversion is a renaming plus a transpose, and
every padding is explicit because flax's ``'SAME'`` pads asymmetrically for stride 2 and then
no longer computes torchvision's function.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn

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
            return _normalize(x, ra_mean.value, ra_var.value, scale, bias, self.epsilon, self.dtype)
        per_example = 1
        for d in x.shape[1:-1]:
            per_example *= d
        m = jnp.ones(x.shape[:1], jnp.float32) if mask is None else mask.astype(jnp.float32)
        count = jnp.maximum(jnp.sum(m) * per_example, 1.0)
        y, mean, var = batch_norm_train(x, scale, bias, m / count, self.epsilon, self.dtype)
        if not self.is_initializing():
            unbiased = var * count / jnp.maximum(count - 1.0, 1.0)
            ra_mean.value = self.momentum * ra_mean.value + (1.0 - self.momentum) * mean
            ra_var.value = self.momentum * ra_var.value + (1.0 - self.momentum) * unbiased
        return y


_HIGHEST = jax.lax.Precision.HIGHEST


def _normalize(x, mean, var, scale, bias, epsilon: float, dtype: Dtype) -> jax.Array:
    inv = jax.lax.rsqrt(var + epsilon) * scale
    y = (x.astype(dtype) - mean.astype(dtype)) * inv.astype(dtype)
    return y + bias.astype(dtype)


def _batch_norm_by_reduce(x, scale, bias, weights, epsilon: float, dtype: Dtype):
    xf = x.astype(jnp.float32)
    axes = tuple(range(x.ndim - 1))
    w = weights.reshape((-1,) + (1,) * (x.ndim - 1))
    mean = jnp.sum(xf * w, axes)
    var = jnp.sum(jnp.square(xf - mean) * w, axes)
    return _normalize(x, mean, var, scale, bias, epsilon, dtype), mean, var


# XLA:CPU emits a reduction over every axis but the minor (channel) one as a slow scalar loop:
# train-mode BatchNorm's statistics took as long as ResNet-18's convolutions, and their
# gradients as long again. As dots (per example over the positions, then over the examples)
# they run as GEMVs: 3-9x faster on this project's CPU, and more accurate (two short float32
# sums instead of one long one: 4e-7 against 5e-6 relative to float64 on a 32x56x56x64 batch).
def _example_sums(v3: jax.Array) -> jax.Array:
    """``[b, positions, c] -> [b, c]``: the sum over positions, as a batched GEMV."""
    ones = jnp.ones(v3.shape[:2], v3.dtype)
    return jax.lax.dot_general(v3, ones, (((1,), (1,)), ((0,), (0,))), precision=_HIGHEST)


def _weighted_sum(v3: jax.Array, weights: jax.Array) -> jax.Array:
    return jnp.dot(weights, _example_sums(v3), precision=_HIGHEST)


def _channels(x: jax.Array) -> jax.Array:
    return x.astype(jnp.float32).reshape(x.shape[0], -1, x.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _batch_norm_by_dot(x, scale, bias, weights, epsilon: float, dtype: Dtype):
    return _batch_norm_by_dot_fwd(x, scale, bias, weights, epsilon, dtype)[0]


def _batch_norm_by_dot_fwd(x, scale, bias, weights, epsilon, dtype):
    x3 = _channels(x)
    mean = _weighted_sum(x3, weights)
    centred = x3 - mean
    var = _weighted_sum(centred * centred, weights)
    y = _normalize(x, mean, var, scale, bias, epsilon, dtype)
    return (y, mean, var), (x, mean, var, scale, weights)


def _batch_norm_by_dot_bwd(epsilon, dtype, residuals, cotangents):
    # The textbook BatchNorm gradient, generalised to per-example weights w (sum w = 1 over
    # the positions): with xhat = (x - mean) * rstd and y = scale * xhat + bias,
    #   dx = scale * rstd * (g - w * (sum g + xhat * sum g*xhat)) + w * (g_mean + 2 (x - mean) g_var)
    # where the sums run over every position (padded examples have g = 0). The weights are the
    # batch's mask, data that is never differentiated: their cotangent is zero.
    x, mean, var, scale, weights = residuals
    g, g_mean, g_var = cotangents
    rstd = jax.lax.rsqrt(var + epsilon)
    x3 = _channels(x)
    xhat = (x3 - mean) * rstd
    g3 = _channels(g)
    ones = jnp.ones(weights.shape, jnp.float32)
    sum_g = _weighted_sum(g3, ones)
    sum_gx = _weighted_sum(g3 * xhat, ones)
    w = weights[:, None, None]
    dx = scale * rstd * (g3 - w * (sum_g + xhat * sum_gx)) + w * (g_mean + 2.0 * (x3 - mean) * g_var)
    return dx.reshape(x.shape).astype(x.dtype), sum_gx, sum_g, jnp.zeros_like(weights)


_batch_norm_by_dot.defvjp(_batch_norm_by_dot_fwd, _batch_norm_by_dot_bwd)


def batch_norm_train(x, scale, bias, weights, epsilon: float = 1e-5, dtype: Dtype = jnp.float32):
    """Train-mode BatchNorm of channels-last ``x``: ``(y, mean, biased var)``, the statistics in
    float32 with example ``i`` weighted by ``weights[i]`` (``mask / count``; they sum to one
    over the positions). Two passes (mean, then the centred second moment), as torch.

    On CPU the reductions, forward and backward, are dots (see ``_example_sums``); elsewhere
    XLA's fused reductions and autodiff are the better choice.
    """
    weights = jax.lax.stop_gradient(weights)
    return jax.lax.platform_dependent(
        x, scale, bias, weights,
        cpu=functools.partial(_batch_norm_by_dot, epsilon=epsilon, dtype=dtype),
        default=functools.partial(_batch_norm_by_reduce, epsilon=epsilon, dtype=dtype),
    )


def _pool_windows(xp: jax.Array, kernel: int, stride: int, out_hw: tuple[int, int]):
    """The ``kernel**2`` strided views of padded ``xp`` whose element ``[i, j]`` is window
    ``(i, j)``'s entry at offset ``(a, b)``, in torch's scan order (row-major)."""
    n, _, _, c = xp.shape
    oh, ow = out_hw
    for a in range(kernel):
        for b in range(kernel):
            end = (n, a + stride * (oh - 1) + 1, b + stride * (ow - 1) + 1, c)
            yield a, b, jax.lax.slice(xp, (0, a, b, 0), end, (1, stride, stride, 1))


def _pool_geometry(x, kernel, stride, padding):
    _, h, w, _ = x.shape
    out_hw = ((h + 2 * padding - kernel) // stride + 1, (w + 2 * padding - kernel) // stride + 1)
    pads = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    return out_hw, pads


def _reduce_window_max(x, kernel: int, stride: int, padding: int):
    pads = ((padding, padding), (padding, padding))
    return nn.max_pool(x, (kernel, kernel), (stride, stride), padding=pads)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool_by_slices(x, kernel: int, stride: int, padding: int):
    # Undifferentiated (the teacher, frozen backbones), XLA's own reduce-window is the fastest
    # forward at 112 px inputs and up. Differentiated, the forward is the maximum of the
    # strided views, which XLA fuses with the gradient below (twice as fast as with a
    # reduce-window forward, measured at 56x56 and 112x112).
    return _reduce_window_max(x, kernel, stride, padding)


def _max_pool_by_slices_fwd(x, kernel, stride, padding):
    out_hw, pads = _pool_geometry(x, kernel, stride, padding)
    xp = jnp.pad(x, pads, constant_values=-jnp.inf)
    y = functools.reduce(jnp.maximum, [v for _, _, v in _pool_windows(xp, kernel, stride, out_hw)])
    return y, (x, y)


def _max_pool_by_slices_bwd(kernel, stride, padding, residuals, g):
    # Each window's gradient goes to its first maximal entry in scan order, as torch's CPU
    # kernel does; an entry of several windows sums theirs. Views are scattered back with
    # interior padding, so the whole gradient is one elementwise fusion instead of XLA:CPU's
    # select-and-scatter (10-20x slower than torch at 112-224 px).
    x, y = residuals
    out_hw, pads = _pool_geometry(x, kernel, stride, padding)
    xp = jnp.pad(x, pads, constant_values=-jnp.inf)
    taken = jnp.zeros(y.shape, bool)
    dxp = jnp.zeros(xp.shape, g.dtype)
    zero = jnp.zeros((), g.dtype)
    for a, b, view in _pool_windows(xp, kernel, stride, out_hw):
        hit = (view == y) & ~taken
        taken = taken | hit
        high_h = xp.shape[1] - a - stride * (out_hw[0] - 1) - 1
        high_w = xp.shape[2] - b - stride * (out_hw[1] - 1) - 1
        config = ((0, 0, 0), (a, high_h, stride - 1), (b, high_w, stride - 1), (0, 0, 0))
        dxp = dxp + jax.lax.pad(jnp.where(hit, g, zero), zero, config)
    h, w = x.shape[1:3]
    return (dxp[:, padding:padding + h, padding:padding + w],)


_max_pool_by_slices.defvjp(_max_pool_by_slices_fwd, _max_pool_by_slices_bwd)


def max_pool(x: jax.Array, kernel: int = 3, stride: int = 2, padding: int = 1) -> jax.Array:
    """torch's ``max_pool2d(x, kernel, stride, padding)`` on NHWC ``x`` (padding is -inf).

    On CPU the gradient is computed from the window's strided views and goes to each window's
    first maximum, as torch's (see ``_max_pool_by_slices_bwd``); elsewhere it is XLA's
    select-and-scatter.
    """
    return jax.lax.platform_dependent(
        x, cpu=lambda x: _max_pool_by_slices(x, kernel, stride, padding),
        default=lambda x: _reduce_window_max(x, kernel, stride, padding))


def _conv(features: int, kernel: int, stride: int, padding: int, name: str, dtype: Dtype):
    return nn.Conv(
        features,
        (kernel, kernel),
        (stride, stride),
        padding=((padding, padding), (padding, padding)),
        use_bias=False,
        kernel_init=_conv_init,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


class BasicBlock(nn.Module):
    """torchvision.models.resnet.BasicBlock (expansion 1)."""

    features: int
    stride: int = 1
    dtype: Dtype = jnp.float32
    expansion = 1

    @nn.compact
    def __call__(self, x, train: bool, mask=None):
        bn = lambda name: BatchNorm(not train, dtype=self.dtype, name=name)  # noqa: E731
        y = _conv(self.features, 3, self.stride, 1, "conv1", self.dtype)(x)
        y = nn.relu(bn("bn1")(y, mask))
        y = _conv(self.features, 3, 1, 1, "conv2", self.dtype)(y)
        y = bn("bn2")(y, mask)
        if self.stride != 1 or x.shape[-1] != self.features:
            x = _conv(self.features, 1, self.stride, 0, "downsample_0", self.dtype)(x)
            x = bn("downsample_1")(x, mask)
        return nn.relu(y + x)


class Bottleneck(nn.Module):
    """torchvision.models.resnet.Bottleneck, v1.5: the stride sits on the 3x3 convolution."""

    features: int
    stride: int = 1
    dtype: Dtype = jnp.float32
    expansion = 4

    @nn.compact
    def __call__(self, x, train: bool, mask=None):
        bn = lambda name: BatchNorm(not train, dtype=self.dtype, name=name)  # noqa: E731
        out = self.features * self.expansion
        y = _conv(self.features, 1, 1, 0, "conv1", self.dtype)(x)
        y = nn.relu(bn("bn1")(y, mask))
        y = _conv(self.features, 3, self.stride, 1, "conv2", self.dtype)(y)
        y = nn.relu(bn("bn2")(y, mask))
        y = _conv(out, 1, 1, 0, "conv3", self.dtype)(y)
        y = bn("bn3")(y, mask)
        if self.stride != 1 or x.shape[-1] != out:
            x = _conv(out, 1, self.stride, 0, "downsample_0", self.dtype)(x)
            x = bn("downsample_1")(x, mask)
        return nn.relu(y + x)


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

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, mask: jax.Array | None = None):
        x = x.astype(self.dtype)
        x = _conv(64, 7, 2, 3, "conv1", self.dtype)(x)
        x = nn.relu(BatchNorm(not train, dtype=self.dtype, name="bn1")(x, mask))
        # torchvision pads the max-pool with -inf (reduce_window's init value here), not zeros.
        x = max_pool(x, 3, 2, 1)
        for i, blocks in enumerate(self.stage_sizes):
            for j in range(blocks):
                stride = 2 if i > 0 and j == 0 else 1
                x = self.block(64 * 2**i, stride, self.dtype, name=f"layer{i + 1}_{j}")(
                    x, train, mask
                )
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        if not self.head:
            return x
        return _head(self.num_classes, x.shape[-1], self.dtype, name="fc")(x).astype(jnp.float32)


def classify(model: ResNet, fc_params, features: jax.Array) -> jax.Array:
    """``model``'s ``fc`` layer on its pooled ``features`` (``head=False`` output): float32
    logits, the same function ``model`` applies after pooling."""
    head = _head(model.num_classes, features.shape[-1], model.dtype, parent=None)
    return head.apply({"params": fc_params}, features).astype(jnp.float32)


ARCHS: dict[str, tuple[Sequence[int], type]] = {
    "resnet18": ((2, 2, 2, 2), BasicBlock),
    "resnet50": ((3, 4, 6, 3), Bottleneck),
}


def create_model(arch: str, num_classes: int, dtype: Dtype = jnp.float32) -> ResNet:
    """The flax module for ``arch`` ('resnet18' or 'resnet50')."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}: expected one of {sorted(ARCHS)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    stages, block = ARCHS[arch]
    return ResNet(stage_sizes=stages, block=block, num_classes=num_classes, dtype=dtype)


def init_variables(model: ResNet, key: jax.Array, image_size: int = 224) -> dict:
    """Fresh ``{'params', 'batch_stats'}`` with torchvision's initialisation distributions."""
    return dict(_init(model, key, image_size))


# Module-level so that every run of a sweep reuses one compiled initialiser (a jit of a fresh
# lambda per call recompiles a ResNet init each time: ~15 s on 2 CPU cores).
@functools.partial(jax.jit, static_argnums=(0, 2))
def _init(model: ResNet, key: jax.Array, image_size: int):
    return model.init(key, jnp.zeros((1, image_size, image_size, 3), jnp.float32), train=False)


def abstract_variables(model: ResNet, image_size: int = 224) -> dict:
    """Shapes and dtypes of ``init_variables`` without computing anything."""
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
