"""torchvision's Vision Transformer (ViT-B/16) in flax.linen, NHWC.

Module and parameter names mirror torchvision's state_dict keys (``encoder.layers.encoder_layer_0
.self_attention.in_proj_weight`` is ``params/encoder/layers/encoder_layer_0/self_attention/
in_proj_weight``). The raw parameters ``class_token``, ``pos_embedding`` and the attention's
``in_proj_weight`` / ``in_proj_bias`` keep torch's names and layouts, so conversion copies them
unchanged. The classifier ``heads.head`` is the top-level ``heads_head``, where the engine finds
and replaces a head.

The position embedding fixes the input size: the network takes ``image_size`` (224) only, as
torchvision does. There is no BatchNorm, so ``mask`` is accepted for the common interface and
unused, and ``batch_stats`` is empty.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax.models import layers
from kdjax.models.spec import InputSpec, ModelSpec, renaming

Dtype = Any

# torchvision's initialisers (``--init scratch``): the MLP's Linears xavier_uniform with
# N(0, 1e-6) biases (MLPBlock), the class token zeros, the position embedding N(0, 0.02), the
# head zeros (VisionTransformer.__init__).
_mlp_bias_init = nn.initializers.normal(1e-6)
_pos_embedding_init = nn.initializers.normal(0.02)


def _patch_init(key, shape, dtype=jnp.float32):
    """torchvision's ``conv_proj``: trunc_normal_(std=sqrt(1 / fan_in)), whose bounds +-2 are
    absolute (not in units of std as flax's ``lower`` / ``upper``)."""
    std = math.sqrt(1.0 / math.prod(shape[:-1]))  # HWIO: fan_in = H * W * I
    return std * jax.random.truncated_normal(key, -2.0 / std, 2.0 / std, shape, dtype)


def _layer_norm(name: str, dtype: Dtype) -> nn.LayerNorm:
    """torchvision's ``partial(nn.LayerNorm, eps=1e-6)``; statistics in at least float32."""
    return nn.LayerNorm(epsilon=1e-6, dtype=dtype, param_dtype=jnp.float32, use_fast_variance=False,
                        name=name)


class MultiheadAttention(nn.Module):
    """torch.nn.MultiheadAttention(hidden_dim, num_heads, dropout, batch_first=True) as
    self-attention: the packed ``in_proj_weight`` ``[3 * hidden, hidden]`` (q, k, v rows) and
    ``in_proj_bias`` in torch's layout, ``out_proj`` a Linear; softmax in at least float32;
    ``dropout`` on the attention weights in train mode."""

    num_heads: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        batch, length, hidden = x.shape
        head_dim = hidden // self.num_heads
        # torch: xavier_uniform_ over the packed matrix, zero biases; out_proj's weight keeps
        # nn.Linear's default
        w = self.param("in_proj_weight", nn.initializers.xavier_uniform(), (3 * hidden, hidden), jnp.float32)
        b = self.param("in_proj_bias", nn.initializers.zeros, (3 * hidden,), jnp.float32)
        qkv = jnp.einsum("bse,fe->bsf", x, w.astype(self.dtype)) + b.astype(self.dtype)
        # [batch, length, heads, head_dim] each
        q, k, v = jnp.unstack(qkv.reshape(batch, length, 3, self.num_heads, head_dim), axis=2)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q * (1.0 / math.sqrt(head_dim)), k)
        weights = jax.nn.softmax(logits.astype(jnp.promote_types(self.dtype, jnp.float32)), axis=-1)
        weights = layers.dropout(self, weights.astype(self.dtype), self.dropout, train)
        y = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, length, hidden)
        return nn.Dense(hidden, kernel_init=layers.dense_kernel_init, bias_init=nn.initializers.zeros,
                        dtype=self.dtype, param_dtype=jnp.float32, name="out_proj")(y)


class MLPBlock(nn.Module):
    """torchvision's MLPBlock: ``0`` Linear, exact GELU, Dropout, ``3`` Linear, Dropout."""

    mlp_dim: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        dense = functools.partial(nn.Dense, kernel_init=nn.initializers.xavier_uniform(), bias_init=_mlp_bias_init,
                                  dtype=self.dtype, param_dtype=jnp.float32)
        y = jax.nn.gelu(dense(self.mlp_dim, name="0")(x), approximate=False)
        y = layers.dropout(self, y, self.dropout, train)
        y = dense(x.shape[-1], name="3")(y)
        return layers.dropout(self, y, self.dropout, train)


class EncoderBlock(nn.Module):
    """torchvision's EncoderBlock (pre-norm): ``x + dropout(attention(ln_1(x)))``, then
    ``+ mlp(ln_2(.))``."""

    num_heads: int
    mlp_dim: int
    dropout: float = 0.0
    attention_dropout: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        y = _layer_norm("ln_1", self.dtype)(x)
        y = MultiheadAttention(self.num_heads, self.attention_dropout, self.dtype, name="self_attention")(y, train)
        x = x + layers.dropout(self, y, self.dropout, train)
        y = _layer_norm("ln_2", self.dtype)(x)
        return x + MLPBlock(self.mlp_dim, self.dropout, self.dtype, name="mlp")(y, train)


class EncoderLayers(nn.Module):
    """torchvision's ``encoder.layers`` Sequential: ``encoder_layer_0`` ... in order."""

    num_layers: int
    num_heads: int
    mlp_dim: int
    dropout: float = 0.0
    attention_dropout: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        for i in range(self.num_layers):
            x = EncoderBlock(self.num_heads, self.mlp_dim, self.dropout, self.attention_dropout, self.dtype,
                             name=f"encoder_layer_{i}")(x, train)
        return x


class Encoder(nn.Module):
    """torchvision's Encoder: ``pos_embedding`` added, dropout, the layers, then ``ln``."""

    num_layers: int
    num_heads: int
    mlp_dim: int
    dropout: float = 0.0
    attention_dropout: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        pos = self.param("pos_embedding", _pos_embedding_init, (1, *x.shape[1:]), jnp.float32)
        x = layers.dropout(self, x + pos.astype(self.dtype), self.dropout, train)
        x = EncoderLayers(self.num_layers, self.num_heads, self.mlp_dim, self.dropout, self.attention_dropout,
                          self.dtype, name="layers")(x, train)
        return _layer_norm("ln", self.dtype)(x)


class VisionTransformer(nn.Module):
    """torchvision's VisionTransformer over NHWC float ``[batch, image_size, image_size, 3]``;
    returns float32 logits ``[batch, num_classes]``.

    ``dtype`` is the compute dtype; parameters stay float32, softmax and LayerNorm statistics
    at least float32, the logits float32. ``dropout`` and ``attention_dropout`` are torchvision's
    (default off); in train mode with either above 0 the module takes a ``'dropout'`` rng.
    ``head=False`` stops at the class token after ``encoder.ln`` (float32, ``[batch,
    hidden_dim]``); ``classify(model, params['heads_head'], features)`` completes the function.
    """

    patch_size: int
    num_layers: int
    num_heads: int
    hidden_dim: int
    mlp_dim: int
    image_size: int = 224
    num_classes: int = 1000
    dtype: Dtype = jnp.float32
    head: bool = True
    dropout: float = 0.0
    attention_dropout: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, mask: jax.Array | None = None,
                 taps: bool = False):
        """Logits, or with ``taps`` ``(logits, features)``: ``tokens``, the encoder's output
        ``[batch, 1 + patches, hidden_dim]`` (compute dtype), ``stride16``, its patch tokens as the
        ``[batch, grid, grid, hidden_dim]`` map a CNN's stride-16 tap is (for feature losses with CNN
        partners; named for ViT-B/16's patch size), and ``pool``, its class token
        (float32, the head's input). ``mask`` is unused: no layer reads batch statistics."""
        del mask
        if x.shape[1:3] != (self.image_size, self.image_size):
            raise ValueError(f"ViT takes {self.image_size}x{self.image_size} images (its position embedding "
                             f"is fixed), got {x.shape[1]}x{x.shape[2]}: resize or crop to {self.image_size}")
        batch = x.shape[0]
        x = layers.conv(self.hidden_dim, self.patch_size, self.patch_size, 0, name="conv_proj", dtype=self.dtype,
                        bias=True, kernel_init=_patch_init)(x.astype(self.dtype))
        x = x.reshape(batch, -1, self.hidden_dim)  # row-major patches, as torch's reshape + permute
        token = self.param("class_token", nn.initializers.zeros, (1, 1, self.hidden_dim), jnp.float32)
        x = jnp.concatenate([jnp.broadcast_to(token.astype(self.dtype), (batch, 1, self.hidden_dim)), x], axis=1)
        x = Encoder(self.num_layers, self.num_heads, self.mlp_dim, self.dropout, self.attention_dropout,
                    self.dtype, name="encoder")(x, train)
        grid = self.image_size // self.patch_size
        features = {"tokens": x, "stride16": x[:, 1:].reshape(batch, grid, grid, self.hidden_dim),
                    "pool": x[:, 0].astype(jnp.float32)}
        if self.head:
            # from the class token in the compute dtype, so that float64 logits keep float64
            # precision; up to float32 the same function as ``classify`` on ``pool``
            x = nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros, bias_init=nn.initializers.zeros,
                         dtype=self.dtype, param_dtype=jnp.float32, name="heads_head")(x[:, 0]).astype(jnp.float32)
        else:
            x = features["pool"]
        return (x, features) if taps else x


SPECS = {
    "vit_b_16": ModelSpec(
        name="vit_b_16",
        build=functools.partial(VisionTransformer, patch_size=16, num_layers=12, num_heads=12, hidden_dim=768,
                                mlp_dim=3072),
        head="heads_head",
        head_width=768,
        input=InputSpec(crop_size=224, resize_size=256, interpolation="bilinear"),  # IMAGENET1K_V1
        taps=("tokens", "stride16", "pool"),
        backbone=layers.without_head,
        classify=layers.classify,
        torchvision="vit_b_16",
        torch_name=renaming({"heads_head": "heads.head"}),
        fixed_size=True,
    ),
}
