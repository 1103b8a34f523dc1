"""The optimiser seam: a registry of optimisers and a registry of learning-rate schedules, and the
one function that builds a run's optax transformation and its schedule from the config.

Every consumer of the learning rate asks ``build``: the step (``Optimizer.tx``), the epoch
record and TensorBoard (``Optimizer.epoch_lr``). Adding an optimiser or a schedule is one entry
here (its builder and help text) and a test; the config names it and the command line offers it
from these dicts.

The members so far are the seed's: torch.optim.SGD and torch's StepLR stepped once per epoch.
optax schedules see optimiser steps, so a schedule is built with ``steps_per_epoch`` and
converts epochs to steps itself; nothing else does.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

if TYPE_CHECKING:  # the config imports nothing from here; only its type is named
    from kdjax.config import OptimConfig


def step_lr(
    base_lr: float, step_size_epochs: int, gamma: float, steps_per_epoch: int
) -> optax.Schedule:
    """torch's ``StepLR(step_size, gamma)`` stepped per epoch, as a function of the optimiser step.

    ``lr(step) = base_lr * gamma ** (epoch // step_size_epochs)`` with
    ``epoch = step // steps_per_epoch``.

    ``gamma = 0`` is valid (the seed's published command uses it): the first
    ``step_size_epochs`` epochs run at ``base_lr`` (``0 ** 0 = 1``) and every later step at
    exactly 0. The exponent is an integer, so the power is an exact product, never
    ``exp(k * log(gamma))`` (which would give NaN for gamma 0 in the first epochs).
    """
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    if step_size_epochs < 1:
        raise ValueError(
            f"step_size_epochs (--s_lr_step_size) must be >= 1, got {step_size_epochs}"
        )
    if gamma < 0:
        raise ValueError(f"gamma (--s_rl_gamma) must be >= 0, got {gamma}")

    def schedule(count: jax.Array) -> jax.Array:
        epoch = jnp.asarray(count, jnp.int32) // steps_per_epoch
        decays = epoch // step_size_epochs
        # An integer exponent lowers to repeated multiplication: 0.0 ** 0 == 1, 0.0 ** k == 0.
        # jnp.asarray(float) takes the default float dtype (float64 under x64).
        return base_lr * jnp.power(jnp.asarray(gamma), decays)

    return schedule


def sgd(
    schedule: float | optax.Schedule,
    momentum: float,
    weight_decay: float = 0.0,
    nesterov: bool = False,
) -> optax.GradientTransformation:
    """torch.optim.SGD(lr, momentum, dampening=0, weight_decay, nesterov) in optax.

    With ``g`` the gradient, ``p`` the parameter and ``b`` the momentum buffer, torch computes

        g <- g + weight_decay * p          (L2 on the gradient, before momentum)
        b <- momentum * b + g              (first step: b = g, since the buffer starts at 0)
        d <- g + momentum * b if nesterov else b
        p <- p - lr * d

    ``optax.add_decayed_weights`` -> ``optax.trace`` -> ``optax.scale_by_learning_rate`` is the
    same chain. The learning rate multiplies after the buffer, so a StepLR decay does not
    rescale the momentum already accumulated (as in torch, and unlike schemes that fold lr into
    the buffer). Weight decay applies to every parameter it sees, biases and BatchNorm
    scales included, as torch's default single parameter group does; parameters that torch
    would freeze must be masked by the caller.
    """
    parts = []
    if weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay))
    if momentum:
        parts.append(optax.trace(decay=momentum, nesterov=nesterov))
    elif nesterov:
        raise ValueError("nesterov momentum requires momentum > 0 (as torch.optim.SGD)")
    parts.append(optax.scale_by_learning_rate(schedule))
    return optax.chain(*parts)


# --------------------------------------------------------------------------- the registries


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    """An optimiser: ``build(config, schedule)`` -> the optax transformation that scales its
    update by ``schedule(step)``."""

    build: Callable[["OptimConfig", optax.Schedule], optax.GradientTransformation]
    help: str


@dataclasses.dataclass(frozen=True)
class ScheduleSpec:
    """A learning-rate schedule: ``build(config, steps_per_epoch)`` -> lr as a function of the
    optimiser step."""

    build: Callable[["OptimConfig", int], optax.Schedule]
    help: str


OPTIMIZERS: Mapping[str, OptimizerSpec] = {
    "sgd": OptimizerSpec(
        build=lambda o, schedule: sgd(schedule, o.momentum, o.weight_decay),
        help="torch.optim.SGD: --momentum, --weight_decay coupled (L2 on the gradient)"),
}

SCHEDULES: Mapping[str, ScheduleSpec] = {
    "step": ScheduleSpec(
        build=lambda o, steps_per_epoch: step_lr(o.lr, o.step_size, o.gamma, steps_per_epoch),
        help="torch's StepLR stepped per epoch: x --s_rl_gamma every --s_lr_step_size epochs"),
}


def _entry(registry: Mapping, name: str, flag: str):
    try:
        return registry[name]
    except KeyError:
        raise ValueError(f"{flag} {name!r}: choose one of {', '.join(registry)}") from None


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """A run's optimiser: the optax transformation, its schedule and the steps of an epoch."""

    tx: optax.GradientTransformation
    schedule: optax.Schedule
    steps_per_epoch: int

    def epoch_lr(self, epoch: int) -> float:
        """The learning rate of the first step of ``epoch`` (0-based): what an epoch records."""
        return float(self.schedule(epoch * self.steps_per_epoch))


def build(config: "OptimConfig", steps_per_epoch: int) -> Optimizer:
    """The optimiser and schedule ``config`` names (``OptimConfig.optimizer``/``.schedule``)."""
    schedule = _entry(SCHEDULES, config.schedule, "--schedule").build(config, steps_per_epoch)
    tx = _entry(OPTIMIZERS, config.optimizer, "--optimizer").build(config, schedule)
    return Optimizer(tx, schedule, steps_per_epoch)
