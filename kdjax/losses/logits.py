"""Distillation terms on logits: the seed's logit MSE, Hinton's temperature KL, Decoupled KD
(DKD) and DIST's correlation terms."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kdjax.losses.core import as_float, cross_entropy, masked_mean


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


def _kl_rows(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
    """``sum_c p_c (log p_c - log q_c)`` per row, with ``0 * log 0 = 0`` (torch's ``kl_div``)."""
    p = jnp.exp(log_p)
    return jnp.sum(jnp.where(p > 0, p * (log_p - log_q), 0.0), axis=-1)


def decoupled_kd(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    labels: jax.Array,
    alpha: float | jax.Array,
    beta: float | jax.Array,
    temperature: float | jax.Array,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Decoupled knowledge distillation (Zhao et al., "Decoupled Knowledge Distillation", CVPR
    2022): ``alpha * TCKD + beta * NCKD``.

    With ``p = softmax(t/T)``, ``q = softmax(s/T)`` and ``g`` the label:
    ``TCKD = T^2 * KL([p_g, 1 - p_g] || [q_g, 1 - q_g])``, the binary target-vs-rest split, and
    ``NCKD = T^2 * KL(p' || q')`` over the non-target classes, ``p' = softmax(t/T - 1000 * onehot)``
    (the target pushed out as in the authors' code, mdistiller's ``dkd_loss``); both summed over
    classes and averaged over real examples. The warm-up (the term's weight ramping as
    ``min(epoch / warmup, 1)``) is the registry entry's, not this function's.

    The binary log-probabilities come from log-sum-exps (``log(1 - q_g)`` is the logsumexp over the
    other classes minus the one over all), not from ``log`` of a rounded probability.
    """
    temperature = jnp.asarray(temperature)
    s = as_float(student_logits) / temperature.astype(as_float(student_logits).dtype)
    t = as_float(teacher_logits) / temperature.astype(as_float(teacher_logits).dtype)
    onehot = jax.nn.one_hot(jnp.asarray(labels).astype(jnp.int32), s.shape[-1], dtype=s.dtype)

    def binary(z):
        rest = jnp.where(onehot > 0, -jnp.inf, z)
        total = jax.nn.logsumexp(z, axis=-1)
        return jnp.stack([jnp.sum(z * onehot, -1) - total, jax.nn.logsumexp(rest, axis=-1) - total], -1)

    tckd = _kl_rows(binary(t), binary(s))
    nckd = _kl_rows(jax.nn.log_softmax(t - 1000.0 * onehot, -1), jax.nn.log_softmax(s - 1000.0 * onehot, -1))
    t2 = jnp.square(temperature).astype(s.dtype)
    a, b = jnp.asarray(alpha).astype(s.dtype), jnp.asarray(beta).astype(s.dtype)
    return t2 * masked_mean(a * tckd + b * nckd, mask)


def _pearson_rows(x: jax.Array, y: jax.Array, weights: jax.Array, eps: float) -> jax.Array:
    """The Pearson correlation of each row pair of ``x``/``y`` ``[R, N]`` over the entries with
    ``weights`` 1 (``cos(x - mean x, y - mean y)``, each norm clamped at ``eps`` as torch's
    ``cosine_similarity``)."""
    count = jnp.maximum(jnp.sum(weights, -1, keepdims=True), 1.0)
    xc = (x - jnp.sum(x * weights, -1, keepdims=True) / count) * weights
    yc = (y - jnp.sum(y * weights, -1, keepdims=True) / count) * weights
    # max(sqrt(v), eps) as sqrt(max(v, eps^2)): the same value, and a finite gradient where v = 0
    # (a class column of a one-example batch)
    norms = jnp.sqrt(jnp.maximum(jnp.sum(xc * xc, -1), eps**2)) * jnp.sqrt(jnp.maximum(jnp.sum(yc * yc, -1), eps**2))
    return jnp.sum(xc * yc, -1) / norms


def dist_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    beta: float | jax.Array,
    gamma: float | jax.Array,
    tau: float | jax.Array,
    mask: jax.Array | None = None,
    eps: float = 1e-8,
) -> jax.Array:
    """DIST (Huang et al., "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022):
    ``tau^2 * (beta * inter + gamma * intra)`` on ``y = softmax(z / tau)``.

    ``inter = 1 - mean_i pearson(y_s[i, :], y_t[i, :])`` (each example's class distribution) and
    ``intra = 1 - mean_c pearson(y_s[:, c], y_t[:, c])`` (each class over the batch's real
    examples: padded rows are left out of the column means and sums).
    Reference: torchdistill's ``DISTLoss`` (``eps`` its default 1e-8).
    """
    tau = jnp.asarray(tau)
    s = jax.nn.softmax(as_float(student_logits) / tau.astype(as_float(student_logits).dtype), axis=-1)
    t = jax.nn.softmax(as_float(teacher_logits) / tau.astype(as_float(teacher_logits).dtype), axis=-1)
    m = jnp.ones(s.shape[:1], s.dtype) if mask is None else jnp.asarray(mask).astype(s.dtype)
    inter = 1.0 - masked_mean(_pearson_rows(s, t, jnp.ones_like(s), eps), mask)
    intra = 1.0 - jnp.mean(_pearson_rows(s.T, t.T, jnp.broadcast_to(m, s.T.shape), eps))
    t2 = jnp.square(tau).astype(s.dtype)
    return t2 * (jnp.asarray(beta).astype(s.dtype) * inter + jnp.asarray(gamma).astype(s.dtype) * intra)


# The registry's terms: (student outputs, teacher outputs, labels, mask, hyper-parameters) -> scalar.

def ce_term(student, teacher, labels, mask, hparams) -> jax.Array:
    return cross_entropy(student.logits, labels, mask, hparams["label_smoothing"])


def mse_term(student, teacher, labels, mask, hparams) -> jax.Array:
    return logit_mse(student.logits, teacher.logits, mask)


def kd_term(student, teacher, labels, mask, hparams) -> jax.Array:
    return hinton_kl(student.logits, teacher.logits, hparams["temperature"], mask)


def dkd_term(student, teacher, labels, mask, hparams) -> jax.Array:
    return decoupled_kd(student.logits, teacher.logits, labels, hparams["dkd_alpha"], hparams["dkd_beta"],
                        hparams["temperature"], mask)


def dist_term(student, teacher, labels, mask, hparams) -> jax.Array:
    return dist_loss(student.logits, teacher.logits, hparams["dist_beta"], hparams["dist_gamma"],
                     hparams["dist_tau"], mask)
