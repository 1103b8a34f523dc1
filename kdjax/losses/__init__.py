"""Distillation losses behind one interface: a registry of terms blended with cross-entropy.

Every method is ``loss = alpha * CE(student, labels) + (1 - alpha) * term(student, teacher)``;
``alpha = 1`` is plain supervised training, ``alpha = 0`` pure distillation. A registry entry
(``LossSpec``) declares what its term reads (logits, and the named feature taps of
``kdjax.models``), its hyper-parameters (every one a traced scalar, so a sweep over any of them
compiles once) and its metric (the term, logged before the alpha weighting, next to ``ce``).

    core     masked mean, cross-entropy
    logits   the seed's logit MSE, Hinton's T^2 KL

Adding a method touches its own module, one entry in ``LOSSES`` and a test.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp

from kdjax.losses.core import as_float, cross_entropy, masked_mean  # noqa: F401
from kdjax.losses.logits import hinton_kl, kl_term, logit_mse, mse_term  # noqa: F401


class Outputs(NamedTuple):
    """What a network produced on a batch: logits ``[B, C]`` and the feature taps a loss reads
    (``{}`` when it reads none)."""

    logits: jax.Array
    features: Mapping[str, jax.Array] = {}


@dataclasses.dataclass(frozen=True)
class HParam:
    """A traced hyper-parameter of a term: its default, its flag's help and its valid range."""

    default: float
    help: str
    minimum: float | None = None  # exclusive lower bound

    def check(self, name: str, value: float) -> None:
        if self.minimum is not None and not value > self.minimum:
            raise ValueError(f"--{name} must be > {self.minimum:g}, got {value}")


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """One distillation method: ``term(student, teacher, mask, hparams) -> scalar`` on
    ``Outputs``; ``features`` are the taps it reads from both networks (empty: logits only)."""

    name: str
    term: Callable[[Outputs, Outputs, jax.Array | None, Mapping[str, jax.Array]], jax.Array]
    help: str
    hparams: Mapping[str, HParam] = dataclasses.field(default_factory=dict)
    features: tuple[str, ...] = ()


LOSSES: Mapping[str, LossSpec] = {
    "mse": LossSpec(
        "mse", mse_term,
        "the seed's logit MSE: mean over batch x classes of (s - t)^2 (torch MSELoss)"),
    "kl": LossSpec(
        "kl", kl_term,
        "Hinton's soft targets: T^2 KL(softmax(t/T) || softmax(s/T)) (torch KLDivLoss batchmean)",
        hparams={"temperature": HParam(4.0, "softmax temperature T", minimum=0.0)}),
}

KINDS: tuple[str, ...] = tuple(LOSSES)


def get(name: str) -> LossSpec:
    """The registry entry ``name``; a ValueError lists the known ones."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown distillation loss kind {name!r}; expected one of {KINDS}") from None


def blend(
    spec: LossSpec,
    student: Outputs,
    teacher: Outputs,
    labels: jax.Array,
    hparams: Mapping[str, jax.Array],
    mask: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``alpha * CE + (1 - alpha) * term`` and its unweighted terms ``{"ce": CE, name: term}``.

    Gradients flow into both outputs: the caller stops the teacher's (``lax.stop_gradient``).
    """
    ce = cross_entropy(student.logits, labels, mask)
    soft = spec.term(student, teacher, mask, hparams)
    alpha = jnp.asarray(hparams["alpha"]).astype(ce.dtype)
    return alpha * ce + (1.0 - alpha) * soft, {"ce": ce, spec.name: soft}


def distillation_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    labels: jax.Array,
    alpha: float | jax.Array,
    temperature: float | jax.Array,
    kind: str,
    mask: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``blend`` for a logit-only ``kind`` ("mse": the seed, "kl": Hinton), with its two
    scalars given directly; ``temperature`` is ignored by "mse"."""
    spec = get(kind)
    hparams = {"alpha": alpha, "temperature": temperature}
    return blend(spec, Outputs(student_logits), Outputs(teacher_logits), labels, hparams, mask)
