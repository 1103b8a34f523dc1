"""Distillation terms on intermediate features: FitNets' hint, attention transfer, pooled-feature
matching; and the trained adapters two of them put between the student's and teacher's taps.

A feature term reads one or more ``(student tap, teacher tap)`` pairs, each a channels-last map
``[B, H, W, C]`` (or a pooled vector ``[B, D]``). Where the two maps of a pair differ in size (a
ResNet-50 teacher at 224 px for a 112 px student, a ViT's 14x14 patch grid) the larger is
average-pooled to the smaller by an integer factor first (``match_spatial``).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax.losses.core import as_float, masked_mean


def match_spatial(s: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``s``, ``t`` ``[B, H, W, C]`` average-pooled to their common (smaller) spatial size: each
    side's size must be an integer multiple of the other's (torch's ``adaptive_avg_pool2d`` to a
    divisor of the size, as mdistiller's AT does)."""
    if s.ndim != 4:
        return s, t
    size = (min(s.shape[1], t.shape[1]), min(s.shape[2], t.shape[2]))

    def pool(x):
        fh, fw = x.shape[1] // size[0], x.shape[2] // size[1]
        if (fh * size[0], fw * size[1]) != x.shape[1:3]:
            raise ValueError(
                f"feature maps of {s.shape[1]}x{s.shape[2]} (student) and {t.shape[1]}x{t.shape[2]} "
                f"(teacher) cannot be pooled to one size: pick taps whose sizes divide each other "
                f"(e.g. equal strides at image sizes that are multiples)")
        if (fh, fw) == (1, 1):
            return x
        y = x.reshape(x.shape[0], size[0], fh, size[1], fw, x.shape[-1])
        return jnp.mean(y, axis=(2, 4))

    return pool(s), pool(t)


def _per_example_mean(x: jax.Array) -> jax.Array:
    return jnp.mean(x.reshape(x.shape[0], -1), axis=-1)


def hint_mse(student: jax.Array, teacher: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """FitNets' hint (Romero et al., ICLR 2015): ``mean (r(s) - t)^2`` over batch x positions x
    channels, ``r(s)`` the regressed student map (``Regressor``) and ``t`` the teacher's.
    Reference: torchdistill's FitNet recipe, ``MSELoss()`` between a ``ConvReg`` output and the
    teacher's module output."""
    s, t = match_spatial(as_float(student), as_float(teacher))
    if s.shape != t.shape:
        raise ValueError(f"a hint pair needs equal shapes after its regressor, got {s.shape} and {t.shape}")
    return masked_mean(_per_example_mean(jnp.square(s - t)), mask)


def attention_map(feature_map: jax.Array) -> jax.Array:
    """Zagoruyko & Komodakis' spatial attention with p = 2 as their code computes it:
    ``normalize(mean_c f^2)`` over the flattened positions (L2, torch's ``normalize`` eps 1e-12)."""
    a = jnp.mean(jnp.square(feature_map), axis=-1).reshape(feature_map.shape[0], -1)
    norm = jnp.sqrt(jnp.maximum(jnp.sum(a * a, axis=-1, keepdims=True), 1e-24))
    return a / norm


def attention_transfer(pairs: Sequence[tuple[jax.Array, jax.Array]], mask: jax.Array | None = None) -> jax.Array:
    """Attention transfer (Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017):
    ``sum_pairs mean_{i, positions} (Q_s - Q_t)^2`` with ``Q = attention_map(f)``.

    Reference: torchdistill's ``ATLoss(mode='code')`` with weight 1 per pair, the authors' code
    (``at_loss``). Their training loss is ``CE + beta / 2 * sum_pairs at_loss`` with beta = 1000,
    i.e. this term at weight 500.
    """
    total = 0.0
    for s, t in pairs:
        s, t = match_spatial(as_float(s), as_float(t))
        diff = jnp.square(attention_map(s) - attention_map(t))
        total = total + masked_mean(jnp.mean(diff, axis=-1), mask)
    return total


def pooled_mse(student: jax.Array, teacher: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Pooled-feature matching (timm's and Keras 3's feature distillation): ``mean (P s - t)^2``
    over batch x teacher features, ``P s`` the student's pooled features through a trained linear
    ``Projector``, ``t`` the teacher's pooled features."""
    s, t = as_float(student), as_float(teacher)
    if s.shape != t.shape:
        raise ValueError(f"pooled features need equal shapes after the projector, got {s.shape} and {t.shape}")
    return masked_mean(_per_example_mean(jnp.square(s - t)), mask)


# The registry's terms: (student outputs, teacher outputs, labels, mask, hyper-parameters) -> scalar;
# a feature term's ``features`` are the tuple of its pairs' maps (the student's after its adapter).

def fitnet_term(student, teacher, labels, mask, hparams) -> jax.Array:
    return sum(hint_mse(s, t, mask) for s, t in zip(student.features, teacher.features))


def at_term(student, teacher, labels, mask, hparams) -> jax.Array:
    return attention_transfer(list(zip(student.features, teacher.features)), mask)


def pooled_term(student, teacher, labels, mask, hparams) -> jax.Array:
    return sum(pooled_mse(s, t, mask) for s, t in zip(student.features, teacher.features))


def regressor(student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> nn.Module:
    if len(student_shape) != 4 or len(teacher_shape) != 4:
        raise ValueError(f"fitnet pairs spatial maps [B, H, W, C]; got taps of shapes {student_shape} and "
                         f"{teacher_shape} (use --loss pooled for pooled features)")
    from kdjax.losses.adapters import Regressor  # the model layers, only where a run trains one

    return Regressor(teacher_shape[-1])


def projector(student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> nn.Module:
    if len(student_shape) != 2 or len(teacher_shape) != 2:
        raise ValueError(f"pooled pairs pooled features [B, D]; got taps of shapes {student_shape} and "
                         f"{teacher_shape}")
    from kdjax.losses.adapters import Projector

    return Projector(teacher_shape[-1])
