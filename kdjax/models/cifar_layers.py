"""What the CIFAR networks of the KD literature share (``cifar_resnet``, ``cifar_vgg``,
``cifar_mobile``): the zero-bias Linear heads some of them initialise, the global pool and head
that ends every one of them, the taps named by stride, ShuffleNet's channel shuffle and
torch's zero-padded average pool.

Every network of these modules names its flax modules after torch's with each ``.`` written
``_`` (``blocks.0.0.conv.3`` is the flax module ``blocks_0_0/conv_3``; no torch module name of
these networks holds an underscore), so ``torch_name`` turns each ``_`` back into a dot.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax.models import layers

Dtype = Any


def torch_name(path: Sequence[str]) -> str:
    """torch's module name of a flax module path of these networks (``layer1_0/downsample_1``
    is ``layer1.0.downsample.1``)."""
    return ".".join(name.replace("_", ".") for name in path)


def zero_bias_linear(features: int, dtype: Dtype, name: str, weight_std: float | None = None) -> nn.Dense:
    """torch.nn.Linear with a zero bias and either torch's default weight (``weight_std`` None:
    the Wide ResNets) or an N(0, ``weight_std``) one (0.01: the VGGs, MobileNetV2)."""
    kernel_init = layers.dense_kernel_init if weight_std is None else nn.initializers.normal(weight_std)
    return nn.Dense(features, kernel_init=kernel_init, bias_init=nn.initializers.zeros, dtype=dtype,
                    param_dtype=jnp.float32, name=name)


def pooled_logits(net: nn.Module, x: jax.Array, features: dict, head: Callable[[int], nn.Module]) -> jax.Array:
    """The end every CIFAR network shares, inside ``net``'s compact ``__call__``: the global
    average pool (float32, or wider: ``layers.widened``) recorded as the ``pool`` tap, then with
    ``net.head`` the classifier ``head(input width)`` (``layers.linear`` for torch's default
    Linear, whose bias bound needs the width, or ``zero_bias_linear``). Returns the logits (with
    ``head=False`` the pooled features).

    At 32 px this pool is each codebase's own, one window over the whole last map
    (``AvgPool2d(8)`` on the ResNets' 8x8 map, ``avg_pool2d(4)`` on the ShuffleNets' 4x4,
    ``AvgPool2d(2)`` on MobileNetV2's 2x2, VGG's ``AdaptiveAvgPool2d(1)``). At other sizes the
    fixed-window pools cover part of the map or leave several positions (a Linear input the torch
    networks cannot take), where this one stays the mean over the whole map."""
    x = jnp.mean(layers.widened(x), axis=(1, 2))
    features["pool"] = x.astype(jnp.float32)
    if net.head:
        x = head(x.shape[-1])(x)
    return layers.widened(x)


def stride_taps(by_stride: dict[int, jax.Array], strides: Sequence[int]) -> dict[str, jax.Array]:
    """``{"stride<s>": the output of the last block at total stride s}`` for each of ``strides``."""
    return {f"stride{s}": by_stride[s] for s in strides}


def channel_shuffle(x: jax.Array, groups: int) -> jax.Array:
    """ShuffleNet's ``ShuffleBlock`` on NHWC ``x``: torch's ``[N, g, C/g, H, W] -> [N, C/g, g, H,
    W]`` on the channel axis."""
    n, h, w, c = x.shape
    return x.reshape(n, h, w, groups, c // groups).swapaxes(3, 4).reshape(n, h, w, c)


def avg_pool_3x3_stride2(x: jax.Array) -> jax.Array:
    """torch's ``AvgPool2d(3, stride=2, padding=1)`` on NHWC ``x``: zero padding counted in every
    window (``count_include_pad=True``, torch's default), so each sum is divided by 9."""
    pads = ((0, 0), (1, 1), (1, 1), (0, 0))
    summed = jax.lax.reduce_window(x, jnp.zeros((), x.dtype), jax.lax.add, (1, 3, 3, 1), (1, 2, 2, 1), pads)
    return summed / 9
