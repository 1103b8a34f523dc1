"""The CPU-tuned kernels of the networks: train-mode BatchNorm statistics and max-pooling.

Each has one definition of its function and two implementations behind one
``lax.platform_dependent``: XLA's own ops on accelerators, and on CPU formulations that XLA:CPU
runs well (dots for reductions, strided views for the max-pool gradient). Both compute
torchvision's function; the tests hold them to torch.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

_HIGHEST = jax.lax.Precision.HIGHEST


def normalize(x, mean, var, scale, bias, epsilon: float, dtype: Dtype) -> jax.Array:
    inv = jax.lax.rsqrt(var + epsilon) * scale
    y = (x.astype(dtype) - mean.astype(dtype)) * inv.astype(dtype)
    return y + bias.astype(dtype)


def _fewer_than_two_values(weights: jax.Array) -> jax.Array:
    """Whether ``weights`` (``mask / count``) leave fewer than two values per channel, where the
    batch variance is undefined: one value has the weight 1, none leaves every weight 0, and
    every count >= 2 gives weights <= 1/2."""
    top = jnp.max(weights)
    return (top > 0.5) | (top <= 0.0)


def _normalizing_var(var, weights, fallback_var):
    """The variance that scales ``y``: the batch's, or ``fallback_var`` (a constant) where the
    batch has fewer than two values per channel. Without a fallback, always the batch's."""
    if fallback_var is None:
        return var
    return jnp.where(_fewer_than_two_values(weights), fallback_var, var)


def _batch_norm_by_reduce(x, scale, bias, weights, epsilon: float, dtype: Dtype, fallback_var=None):
    xf = x.astype(jnp.float32)
    axes = tuple(range(x.ndim - 1))
    w = weights.reshape((-1,) + (1,) * (x.ndim - 1))
    mean = jnp.sum(xf * w, axes)
    var = jnp.sum(jnp.square(xf - mean) * w, axes)
    norm_var = _normalizing_var(var, weights, fallback_var)
    return normalize(x, mean, norm_var, scale, bias, epsilon, dtype), mean, var


# XLA:CPU emits a reduction over every axis but the minor (channel) one as a slow scalar loop,
# which made train-mode BatchNorm's statistics, forward and backward, a large share of a CPU
# training step. As dots (per example over the positions, then over the examples) they run as
# GEMVs, and are more accurate: two short float32 sums instead of one long one (4e-7 against
# 5e-6 relative to float64 on a 32x56x56x64 batch). The timings: benchmarks/README.md, "On this
# CPU".
def _example_sums(v3: jax.Array) -> jax.Array:
    """``[b, positions, c] -> [b, c]``: the sum over positions, as a batched GEMV."""
    ones = jnp.ones(v3.shape[:2], v3.dtype)
    return jax.lax.dot_general(v3, ones, (((1,), (1,)), ((0,), (0,))), precision=_HIGHEST)


def _weighted_sum(v3: jax.Array, weights: jax.Array) -> jax.Array:
    return jnp.dot(weights, _example_sums(v3), precision=_HIGHEST)


def _channels(x: jax.Array) -> jax.Array:
    return x.astype(jnp.float32).reshape(x.shape[0], -1, x.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _batch_norm_by_dot(x, scale, bias, weights, epsilon: float, dtype: Dtype, fallback_var=None):
    return _batch_norm_by_dot_fwd(x, scale, bias, weights, epsilon, dtype, fallback_var)[0]


def _batch_norm_by_dot_fwd(x, scale, bias, weights, epsilon, dtype, fallback_var=None):
    x3 = _channels(x)
    mean = _weighted_sum(x3, weights)
    centred = x3 - mean
    var = _weighted_sum(centred * centred, weights)
    norm_var = _normalizing_var(var, weights, fallback_var)
    y = normalize(x, mean, norm_var, scale, bias, epsilon, dtype)
    return (y, mean, var), (x, mean, norm_var, scale, weights, fallback_var)


def _batch_norm_by_dot_bwd(epsilon, dtype, residuals, cotangents):
    # The textbook BatchNorm gradient, generalised to per-example weights w (sum w = 1 over
    # the positions): with xhat = (x - mean) * rstd and y = scale * xhat + bias,
    #   dx = scale * rstd * (g - w * (sum g + xhat * sum g*xhat)) + w * (g_mean + 2 (x - mean) g_var)
    # where the sums run over every position (padded examples have g = 0). The weights are the
    # batch's mask, data that is never differentiated: their cotangent is zero, as is that of
    # the fallback variance (running statistics). With fewer than two values per channel, rstd
    # is the fallback's and var no function of x, which drops the xhat * sum g*xhat term; the
    # formula still holds, as that term vanishes there: xhat = 0 on the one real value (it is
    # its own mean, exactly) and w = 0 elsewhere.
    x, mean, var, scale, weights, fallback_var = residuals
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
    d_fallback = None if fallback_var is None else jnp.zeros_like(fallback_var)
    return dx.reshape(x.shape).astype(x.dtype), sum_gx, sum_g, jnp.zeros_like(weights), d_fallback


_batch_norm_by_dot.defvjp(_batch_norm_by_dot_fwd, _batch_norm_by_dot_bwd)


def batch_norm_train(x, scale, bias, weights, epsilon: float = 1e-5, dtype: Dtype = jnp.float32,
                     fallback_var: jax.Array | None = None):
    """Train-mode BatchNorm of channels-last ``x``: ``(y, mean, biased var)``, the statistics in
    float32 with example ``i`` weighted by ``weights[i]`` (``mask / count``; they sum to one
    over the positions). Two passes (mean, then the centred second moment), as torch.

    ``fallback_var`` (``[channels]``, not differentiated) scales ``y`` instead of the batch
    variance when the batch has fewer than two values per channel (``count`` <= 1), where that
    variance is 0 and would scale every padded row by ``1/sqrt(epsilon)``; the real value's
    output, ``bias``, is the same either way. ``BatchNorm`` passes its running variance; without
    one the batch variance always scales, as torch (which refuses such batches).

    On CPU the reductions, forward and backward, are dots (see ``_example_sums``); elsewhere
    XLA's fused reductions and autodiff are the better choice.
    """
    weights = jax.lax.stop_gradient(weights)
    if fallback_var is not None:
        fallback_var = jax.lax.stop_gradient(fallback_var)
    return jax.lax.platform_dependent(
        x, scale, bias, weights, fallback_var,
        cpu=lambda x, s, b, w, f: _batch_norm_by_dot(x, s, b, w, epsilon, dtype, f),
        default=lambda x, s, b, w, f: _batch_norm_by_reduce(x, s, b, w, epsilon, dtype, f),
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
    # Undifferentiated (the teacher, frozen backbones), the forward is XLA's own reduce-window,
    # the faster one where no gradient follows. Differentiated, it is the maximum of the strided
    # views, which XLA fuses with the gradient below: the pair is faster than a reduce-window
    # forward with the same gradient (benchmarks/README.md, "On this CPU").
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
    # select-and-scatter, which trails torch's kernel by far (benchmarks/README.md, "On this CPU").
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


# XLA:CPU runs a grouped convolution with one channel per group (MobileNet's, EfficientNet's and
# ConvNeXt's depthwise convolutions) as a generic loop, far slower than torch's. As k*k shifted
# views times a per-channel weight it is fused elementwise work on the channel axis; its input
# gradient is the same kind of work (autodiff of the views), and its weight gradient per tap a
# GEMV over the positions (autodiff's reduction over the batch and spatial axes is the slow
# scalar loop that ``_example_sums`` avoids). The timings, of one layer and of whole networks:
# benchmarks/README.md, "Every student architecture".
def _depthwise_taps(x, kernel, stride: int, padding: int, dtype: Dtype):
    """``(sum over taps of view * kernel[i, j], views)``: the views of zero-padded ``x``."""
    k, _, _, c = kernel.shape
    n, h, w, _ = x.shape
    ho, wo = (h + 2 * padding - k) // stride + 1, (w + 2 * padding - k) // stride + 1
    xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    views = [[xp[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride, :] for j in range(k)]
             for i in range(k)]
    kernel = kernel.astype(dtype)
    out = sum(views[i][j] * kernel[i, j, 0] for i in range(k) for j in range(k))
    return out, views


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _depthwise_by_taps(x, kernel, stride: int, padding: int, dtype: Dtype):
    return _depthwise_taps(x, kernel, stride, padding, dtype)[0]


def _depthwise_by_taps_fwd(x, kernel, stride, padding, dtype):
    return _depthwise_taps(x, kernel, stride, padding, dtype)[0], (x, kernel)


def _depthwise_by_taps_bwd(stride, padding, dtype, residuals, g):
    x, kernel = residuals
    _, pullback = jax.vjp(lambda x: _depthwise_taps(x, kernel, stride, padding, dtype)[0], x)
    (dx,) = pullback(g)
    _, views = _depthwise_taps(x, kernel, stride, padding, dtype)
    k, c = kernel.shape[0], kernel.shape[-1]
    ones = jnp.ones((g.shape[0],), jnp.float32)
    dk = jnp.stack([jnp.stack([jnp.dot(ones, _example_sums(_channels(views[i][j] * g)), precision=_HIGHEST)
                               for j in range(k)]) for i in range(k)])
    return dx, dk.reshape(k, k, 1, c).astype(kernel.dtype)


_depthwise_by_taps.defvjp(_depthwise_by_taps_fwd, _depthwise_by_taps_bwd)


def _depthwise_by_conv(x, kernel, stride: int, padding: int, dtype: Dtype):
    return jax.lax.conv_general_dilated(
        x.astype(dtype), kernel.astype(dtype), (stride, stride), ((padding, padding), (padding, padding)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1])


def depthwise_conv(x: jax.Array, kernel: jax.Array, stride: int, padding: int, dtype: Dtype = jnp.float32):
    """torch's ``conv2d(x, kernel, stride, padding, groups=channels)`` on NHWC ``x`` with an
    HWIO ``kernel`` ``[k, k, 1, channels]`` (no bias), computing in ``dtype``.

    On CPU as shifted views times the weights (see ``_depthwise_taps``); elsewhere XLA's
    grouped convolution.
    """
    x = x.astype(dtype)
    return jax.lax.platform_dependent(
        x, kernel, cpu=lambda x, w: _depthwise_by_taps(x, w, stride, padding, dtype),
        default=lambda x, w: _depthwise_by_conv(x, w, stride, padding, dtype))
