"""Distillation terms on logits: the seed's logit MSE and Hinton's temperature KL."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kdjax.losses.core import as_float, masked_mean


def logit_mse(
    student_logits: jax.Array, teacher_logits: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
    """Mean squared difference of raw logits over all batch x class entries.

    ``MSE = sum_{i,c} (s_ic - t_ic)^2 / (N * C)`` with ``N`` the number of real examples.
    Reference: ``torch.nn.MSELoss()(student_logits, teacher_logits)`` (reduction ``"mean"``).
    """
    s, t = as_float(student_logits), as_float(teacher_logits)
    per_example = jnp.sum(jnp.square(s - t), axis=-1)
    return masked_mean(per_example, mask, scale=s.shape[-1])


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
    s = as_float(student_logits)
    t = as_float(teacher_logits)
    log_q = jax.nn.log_softmax(s / temperature.astype(s.dtype), axis=-1)
    log_p = jax.nn.log_softmax(t / temperature.astype(t.dtype), axis=-1)
    per_example = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
    return jnp.square(temperature).astype(per_example.dtype) * masked_mean(per_example, mask)


# The registry's terms: (student outputs, teacher outputs, mask, hyper-parameters) -> scalar.

def mse_term(student, teacher, mask, hparams) -> jax.Array:
    return logit_mse(student.logits, teacher.logits, mask)


def kl_term(student, teacher, mask, hparams) -> jax.Array:
    return hinton_kl(student.logits, teacher.logits, hparams["temperature"], mask)
