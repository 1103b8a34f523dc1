"""The trained adapters of the feature terms: FitNets' regressor and the pooled-feature
projector. Built from kdjax.models' layers (torch's BatchNorm and Linear init), so they live apart
from the terms: ``import kdjax.losses`` loads no model module, and a run that trains an adapter
imports this one through the registry's ``adapter`` builders."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax.models import layers


class Regressor(nn.Module):
    """FitNets' regressor as torchdistill's ``ConvReg`` without its ReLU: a 1x1 ``Conv2d`` (with
    bias, torch's default init) to the teacher's channels, then ``BatchNorm2d``."""

    features: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool, mask: jax.Array | None = None) -> jax.Array:
        fan_in = x.shape[-1]
        x = nn.Conv(self.features, (1, 1), use_bias=True, dtype=x.dtype, param_dtype=jnp.float32,
                    kernel_init=layers.dense_kernel_init, bias_init=layers.dense_bias_init(fan_in),
                    name="conv")(x)
        return layers.BatchNorm(not train, dtype=x.dtype, name="bn")(x, mask)


class Projector(nn.Module):
    """A trained ``Linear`` from the student's pooled width to the teacher's (torch's init)."""

    features: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool, mask: jax.Array | None = None) -> jax.Array:
        del train, mask
        return layers.linear(self.features, x.shape[-1], x.dtype, name="linear")(x)
