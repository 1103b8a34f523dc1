"""Distillation losses on logits: cross-entropy, logit MSE, Hinton's temperature KL, and the blend.

Every function takes logits of shape ``[batch, classes]`` and an optional per-example ``mask``
of shape ``[batch]`` (1 = real example, 0 = padding). Means are taken over the real examples
only, so a batch padded to a fixed shape gives exactly the loss of the unpadded batch. A batch
with no real example at all gives 0, not NaN (the count in each denominator is at least 1).

Scalars that a sweep varies (``alpha``, ``temperature``) may be traced arrays, so one compiled
step serves a whole sweep; ``kind`` selects code and is a static Python string.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

Kind = Literal["mse", "kl"]
KINDS: tuple[str, ...] = ("mse", "kl")


def _as_float(x: jax.Array) -> jax.Array:
    # Losses are computed in at least float32, even for bfloat16 logits, and stay float64 under
    # x64 (the parity tests run there).
    return jnp.asarray(x).astype(jnp.promote_types(jnp.asarray(x).dtype, jnp.float32))


def _masked_mean(per_example: jax.Array, mask: jax.Array | None, scale: int = 1) -> jax.Array:
    """``sum_i m_i * v_i / (scale * sum_i m_i)``; plain ``mean(v) / scale`` without a mask."""
    if mask is None:
        return jnp.sum(per_example) / (scale * per_example.shape[0])
    m = jnp.asarray(mask).astype(per_example.dtype)
    # The where (not a product) keeps a non-finite value in a padded row out of the sum.
    total = jnp.sum(jnp.where(m > 0, m * per_example, 0.0))
    return total / (scale * jnp.maximum(jnp.sum(m), 1.0))


def cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mean cross-entropy with integer labels.

    ``CE = mean_i [ -log_softmax(z_i)[y_i] ]``, the mean over real examples.
    Reference: ``torch.nn.CrossEntropyLoss()(logits, labels)`` (reduction ``"mean"``).
    """
    logp = jax.nn.log_softmax(_as_float(logits), axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.asarray(labels)[:, None].astype(jnp.int32), axis=-1)[:, 0]
    return _masked_mean(nll, mask)


def logit_mse(
    student_logits: jax.Array, teacher_logits: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
    """Mean squared difference of raw logits over all batch x class entries.

    ``MSE = sum_{i,c} (s_ic - t_ic)^2 / (N * C)`` with ``N`` the number of real examples.
    Reference: ``torch.nn.MSELoss()(student_logits, teacher_logits)`` (reduction ``"mean"``).
    """
    s, t = _as_float(student_logits), _as_float(teacher_logits)
    per_example = jnp.sum(jnp.square(s - t), axis=-1)
    return _masked_mean(per_example, mask, scale=s.shape[-1])


def hinton_kl(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    temperature: float | jax.Array,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Hinton et al.'s soft-target term, ``T^2 * KL(softmax(t/T) || softmax(s/T))``.

    ``KL_i = sum_c p_ic (log p_ic - log q_ic)`` with ``p = softmax(t/T)``, ``q = softmax(s/T)``;
    the loss is ``T^2 * mean_i KL_i`` (summed over classes, mean over real examples).
    Reference: ``T**2 * torch.nn.KLDivLoss(reduction="batchmean")(
    F.log_softmax(s / T, 1), F.softmax(t / T, 1))``.

    The T^2 factor keeps the gradient's scale independent of T (the soft gradients shrink as
    1/T^2). Both log-probabilities come from ``log_softmax``: no ``log(p + eps)``, so the value
    is exact and finite for confident teachers (``p -> 0`` contributes ``0 * finite``).
    """
    temperature = jnp.asarray(temperature)
    s = _as_float(student_logits)
    t = _as_float(teacher_logits)
    log_q = jax.nn.log_softmax(s / temperature.astype(s.dtype), axis=-1)
    log_p = jax.nn.log_softmax(t / temperature.astype(t.dtype), axis=-1)
    per_example = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
    return jnp.square(temperature).astype(per_example.dtype) * _masked_mean(per_example, mask)


def distillation_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    labels: jax.Array,
    alpha: float | jax.Array,
    temperature: float | jax.Array,
    kind: Kind,
    mask: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The blended KD loss and its unweighted terms.

    - ``kind="mse"`` (the seed): ``alpha * CE + (1 - alpha) * MSE(s, t)``; ``temperature`` is
      ignored.
    - ``kind="kl"`` (Hinton): ``alpha * CE + (1 - alpha) * T^2 * KL(softmax(t/T) || softmax(s/T))``.

    Returns ``(loss, terms)`` with ``terms = {"ce": CE, "mse": MSE}`` or
    ``{"ce": CE, "kl": T^2 * KL}`` (each as it enters the blend, before the alpha weighting).
    ``alpha = 1`` is plain supervised training, ``alpha = 0`` pure logit matching. Gradients
    flow into both logit arrays: the caller stops the teacher's (``jax.lax.stop_gradient``).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown distillation loss kind {kind!r}; expected one of {KINDS}")
    ce = cross_entropy(student_logits, labels, mask)
    if kind == "mse":
        soft = logit_mse(student_logits, teacher_logits, mask)
    else:
        soft = hinton_kl(student_logits, teacher_logits, temperature, mask)
    alpha = jnp.asarray(alpha).astype(ce.dtype)
    loss = alpha * ce + (1.0 - alpha) * soft
    return loss, {"ce": ce, kind: soft}
