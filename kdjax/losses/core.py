"""The supervised term and the masked mean every loss uses.

Every function takes logits ``[batch, classes]`` and an optional per-example ``mask`` ``[batch]``
(1 = real example, 0 = padding). Means are over the real examples only, so a batch padded to a
fixed shape gives exactly the loss of the unpadded batch; a batch with no real example gives 0,
not NaN (each denominator's count is at least 1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def as_float(x: jax.Array) -> jax.Array:
    # Losses are computed in at least float32, even for bfloat16 logits, and stay float64 under
    # x64 (the parity tests run there).
    return jnp.asarray(x).astype(jnp.promote_types(jnp.asarray(x).dtype, jnp.float32))


def masked_mean(per_example: jax.Array, mask: jax.Array | None, scale: int = 1) -> jax.Array:
    """``sum_i m_i * v_i / (scale * sum_i m_i)``; plain ``mean(v) / scale`` without a mask."""
    if mask is None:
        return jnp.sum(per_example) / (scale * per_example.shape[0])
    m = jnp.asarray(mask).astype(per_example.dtype)
    # The where (not a product) keeps a non-finite value in a padded row out of the sum.
    total = jnp.sum(jnp.where(m > 0, m * per_example, 0.0))
    return total / (scale * jnp.maximum(jnp.sum(m), 1.0))


def cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None,
                  label_smoothing: float | jax.Array = 0.0) -> jax.Array:
    """Mean cross-entropy with integer labels, optionally against smoothed targets.

    ``CE = mean_i [ (1 - eps) * -log_softmax(z_i)[y_i] + eps * mean_c -log_softmax(z_i)[c] ]``,
    the mean over real examples (``eps = label_smoothing``; 0 is the plain cross-entropy).
    Reference: ``torch.nn.CrossEntropyLoss(label_smoothing=eps)(logits, labels)`` (Szegedy et al.,
    2016: the target is ``(1 - eps) * onehot + eps / C``).

    ``labels`` may also be soft targets ``[B, C]`` (mixup/cutmix's mixed one-hots): the target is
    then ``(1 - eps) * t + eps / C``, timm's ``SoftTargetCrossEntropy`` of its smoothed mixed
    targets (smoothing is linear, so smoothing the mix is mixing the smoothed one-hots).
    """
    logp = jax.nn.log_softmax(as_float(logits), axis=-1)
    labels = jnp.asarray(labels)
    if labels.ndim == logp.ndim:
        nll = -jnp.sum(labels.astype(logp.dtype) * logp, axis=-1)
    else:
        nll = -jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]
    eps = jnp.asarray(label_smoothing).astype(logp.dtype)
    per_example = (1.0 - eps) * nll + eps * -jnp.mean(logp, axis=-1)
    return masked_mean(per_example, mask)
