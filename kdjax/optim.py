"""The optimiser seam: a registry of optimisers and a registry of learning-rate schedules, and the
one function that builds a run's optax transformation and its schedule from the config.

Every consumer of the learning rate asks ``build``: the step (``Optimizer.tx``), the epoch
record and TensorBoard (``Optimizer.epoch_lr``). Adding an optimiser or a schedule is one entry
here (its builder and help text) and a test; the config names it and the command line offers it
from these dicts.

Optimisers, each as its PyTorch reference computes it (tests/test_optim.py, test_optimizers.py):

- ``sgd``: torch.optim.SGD (momentum, ``nesterov``, weight decay coupled: L2 on the gradient);
- ``adamw``: torch.optim.AdamW (``betas``, ``eps``, weight decay decoupled, scaled by the lr);
- ``lamb``: timm's ``Lamb`` (NVIDIA's FusedLAMB variant: the gradient clipped to global norm 1
  first, Adam moments with bias correction, decay added to the update, the layer's trust ratio
  ||w|| / ||update|| applied where weight decay is);
- ``lars``: timm's ``Lars`` (the trust ratio ``0.001 ||w|| / (||g|| + wd ||w|| + eps)`` scaling
  the decayed gradient where weight decay is, then SGD momentum).

optax's own ``lamb`` and ``lars`` differ from timm's: optax.lamb neither clips the gradient's
global norm nor skips the trust ratio of undecayed parameters, and optax.lars puts its trust
ratio after the momentum rather than before it and leaves ``eps`` at 0. Hence the
transformations here.

Schedules (epochs counted from 0; ``schedule_per`` says whether the lr moves every optimiser
step or once per epoch, as torch's schedulers are stepped per iteration or per epoch):

- ``step``: torch's StepLR (x ``gamma`` every ``step_size`` epochs);
- ``multistep``: torch's MultiStepLR (x ``gamma`` at each of ``milestones``);
- ``cosine``: torch's CosineAnnealingLR down to ``min_lr`` at the end of the run.

A warm-up (``warmup_epochs`` > 0) ramps linearly from ``warmup_lr`` to the lr, as torch's LinearLR
followed by the schedule through SequentialLR (the schedule then counts its epochs from the end
of the warm-up: ``warmup_prefix``, as timm's CosineLRScheduler with ``warmup_prefix=True``); with
``warmup_prefix`` off, the cosine counts from the run's start over all its epochs, timm's default.

The learning rate and the weight decay are traced (``traced_hparams``): runs that differ only in
them share one compiled step. Which parameters are decayed (``no_decay_norm_bias``: none of the
1-D ones, biases and normalisation scales, timm's rule) and whether there is decay at all are
static.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax

if TYPE_CHECKING:  # the config imports nothing from here; only its type is named
    from kdjax.config import OptimConfig

# the traced hyper-parameters of an optimiser step, in a step's hparams
LR_KEY, WEIGHT_DECAY_KEY = "optim/lr", "optim/weight_decay"


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
    return _sgd_chain(schedule, momentum, weight_decay, nesterov, None)


def _sgd_chain(schedule, momentum, weight_decay, nesterov, mask) -> optax.GradientTransformation:
    parts = []
    if _nonzero(weight_decay):
        parts.append(optax.add_decayed_weights(weight_decay, mask))
    if momentum:
        parts.append(optax.trace(decay=momentum, nesterov=nesterov))
    elif nesterov:
        raise ValueError("nesterov momentum requires momentum > 0 (as torch.optim.SGD)")
    parts.append(optax.scale_by_learning_rate(schedule))
    return optax.chain(*parts)


def _nonzero(value) -> bool:
    """Whether a weight decay is on: a traced one always is (its zero-ness was decided statically)."""
    return not isinstance(value, (int, float)) or value != 0


# --------------------------------------------------------------------------- transformations


def decay_mask(params) -> Any:
    """timm's rule for ``no_decay_norm_bias``: no weight decay on 1-D parameters (biases,
    normalisation scales and shifts)."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


class _AdamState(NamedTuple):
    count: jax.Array
    mu: Any
    nu: Any


def adamw(schedule: optax.Schedule, betas: tuple[float, float], eps: float, weight_decay, mask=None
          ) -> optax.GradientTransformation:
    """torch.optim.AdamW as torch computes it, step ``t`` from 1:

        p <- p * (1 - lr * wd)                                   (decoupled decay)
        m <- b1 m + (1 - b1) g;   v <- b2 v + (1 - b2) g^2
        p <- p - (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

    The update returned is the difference to the new ``p``, in torch's order of operations."""
    b1, b2 = betas

    def init(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        return _AdamState(jnp.zeros((), jnp.int32), zeros, zeros)

    def update(grads, state, params):
        t = state.count + 1
        lr = jnp.asarray(schedule(state.count), jnp.float32)
        mu = jax.tree.map(lambda m, g: m + (g - m) * (1 - b1), state.mu, grads)  # torch's lerp_
        nu = jax.tree.map(lambda v, g: v * b2 + (1 - b2) * g * g, state.nu, grads)
        bias1 = _bias_correction(b1, t)
        bias2_sqrt = jnp.sqrt(_bias_correction(b2, t))
        step_size = lr / bias1
        decays = jax.tree.map(lambda _: _nonzero(weight_decay), params) if mask is None else mask(params)

        def new(p, m, v, decayed):
            p1 = p * (1 - lr * weight_decay) if decayed else p
            return p1 - step_size * (m / (jnp.sqrt(v) / bias2_sqrt + eps))

        updates = jax.tree.map(lambda p, m, v, d: new(p, m, v, d) - p, params, mu, nu, decays)
        return updates, _AdamState(t, mu, nu)

    return optax.GradientTransformation(init, update)


def _bias_correction(beta: float, t) -> jax.Array:
    """``1 - beta ** t`` in float32 without its cancellation: ``1 - f32(0.999)`` is off by 1.3e-5
    relative, which torch (float64) is not; ``-expm1(t log beta)`` is accurate to an ulp."""
    return -jnp.expm1(t.astype(jnp.float32) * jnp.float32(math.log(beta)))


def _global_norm(tree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def _trust(w_norm, u_norm, ratio) -> jax.Array:
    """timm's guard: the ratio where both norms are positive, else 1 (no change)."""
    return jnp.where(w_norm > 0, jnp.where(u_norm > 0, ratio, 1.0), 1.0)


def lamb(schedule: optax.Schedule, betas: tuple[float, float], eps: float, weight_decay, mask=None,
         max_grad_norm: float = 1.0) -> optax.GradientTransformation:
    """timm's ``Lamb`` (defaults: bias correction, grad averaging, ``max_grad_norm`` 1, no trust
    clip, ``always_adapt`` off): the gradient divided by ``max(||g||_global / max_grad_norm, 1)``;
    Adam's moments; ``u = (m / bc1) / (sqrt(v) / sqrt(bc2) + eps)``; where decayed
    ``u += wd p`` and ``u *= ||p|| / ||u||``; ``p -= lr u``."""
    b1, b2 = betas

    def init(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        return _AdamState(jnp.zeros((), jnp.int32), zeros, zeros)

    def update(grads, state, params):
        t = state.count + 1
        lr = jnp.asarray(schedule(state.count), jnp.float32)
        clip = jnp.maximum(_global_norm(grads) / max_grad_norm, 1.0)
        grads = jax.tree.map(lambda g: g / clip, grads)
        mu = jax.tree.map(lambda m, g: m + (g - m) * (1 - b1), state.mu, grads)
        nu = jax.tree.map(lambda v, g: v * b2 + (1 - b2) * g * g, state.nu, grads)
        bias1 = _bias_correction(b1, t)
        bias2_sqrt = jnp.sqrt(_bias_correction(b2, t))
        decays = jax.tree.map(lambda _: _nonzero(weight_decay), params) if mask is None else mask(params)

        def step(p, m, v, decayed):
            u = (m / bias1) / (jnp.sqrt(v) / bias2_sqrt + eps)
            if decayed:
                u = u + weight_decay * p
                u = u * _trust(jnp.linalg.norm(p), jnp.linalg.norm(u), jnp.linalg.norm(p) / jnp.linalg.norm(u))
            return -lr * u

        return jax.tree.map(step, params, mu, nu, decays), _AdamState(t, mu, nu)

    return optax.GradientTransformation(init, update)


class _LarsState(NamedTuple):
    count: jax.Array
    buffer: Any


def lars(schedule: optax.Schedule, momentum: float, weight_decay, mask=None, nesterov: bool = False,
         trust_coeff: float = 0.001, eps: float = 1e-8) -> optax.GradientTransformation:
    """timm's ``Lars`` (no dampening, no trust clip, ``always_adapt`` off): where decayed,
    ``g <- (g + wd p) * trust_coeff ||p|| / (||g|| + wd ||p|| + eps)``; then torch's SGD
    momentum (the first buffer is the gradient itself) and ``p -= lr d``."""

    def init(params):
        return _LarsState(jnp.zeros((), jnp.int32), jax.tree.map(jnp.zeros_like, params))

    def update(grads, state, params):
        lr = jnp.asarray(schedule(state.count), jnp.float32)
        decays = jax.tree.map(lambda _: _nonzero(weight_decay), params) if mask is None else mask(params)

        def scaled(g, p, decayed):
            if not decayed:
                return g
            w_norm, g_norm = jnp.linalg.norm(p), jnp.linalg.norm(g)
            ratio = _trust(w_norm, g_norm, trust_coeff * w_norm / (g_norm + w_norm * weight_decay + eps))
            return (g + weight_decay * p) * ratio

        grads = jax.tree.map(scaled, grads, params, decays)
        first = state.count == 0
        buffer = jax.tree.map(lambda b, g: jnp.where(first, g, b * momentum + g), state.buffer, grads)
        direction = jax.tree.map(lambda g, b: g + momentum * b, grads, buffer) if nesterov else buffer
        return jax.tree.map(lambda d: -lr * d, direction), _LarsState(state.count + 1, buffer)

    return optax.GradientTransformation(init, update)


def clip_by_global_norm_torch(max_norm: float) -> optax.GradientTransformation:
    """torch.nn.utils.clip_grad_norm_: ``g *= min(max_norm / (||g||_global + 1e-6), 1)``."""

    def update(grads, state, params=None):
        coef = jnp.minimum(max_norm / (_global_norm(grads) + 1e-6), 1.0)
        return jax.tree.map(lambda g: g * coef, grads), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


# --------------------------------------------------------------------------- schedules


def _epoch_position(count, steps_per_epoch: int, per_step: bool) -> jax.Array:
    """Where optimiser step ``count`` stands in epochs: fractional when the lr moves every step,
    the epoch index when it moves once per epoch."""
    count = jnp.asarray(count, jnp.int32)
    if per_step:
        return count.astype(jnp.float32) / steps_per_epoch
    return (count // steps_per_epoch).astype(jnp.float32)


def warmed(o: "OptimConfig", steps_per_epoch: int, main: Callable, base_lr) -> optax.Schedule:
    """``main(epochs since the schedule began, base_lr)`` after a linear warm-up of
    ``o.warmup_epochs`` from ``o.warmup_lr`` (none when 0)."""
    per_step = o.schedule_per == "step"
    warmup = o.warmup_epochs

    def schedule(count):
        t = _epoch_position(count, steps_per_epoch, per_step)
        if not warmup:
            return main(t, base_lr)
        ramp = o.warmup_lr + t * (base_lr - o.warmup_lr) / warmup
        return jnp.where(t < warmup, ramp, main(t - warmup if o.warmup_prefix else t, base_lr))

    return schedule


def _step_schedule(o, steps_per_epoch: int, base_lr) -> optax.Schedule:
    if not o.warmup_epochs and o.schedule_per == "epoch":
        return step_lr(base_lr, o.step_size, o.gamma, steps_per_epoch)  # the seed's, as it always was
    return warmed(o, steps_per_epoch, lambda t, lr: lr * jnp.power(jnp.asarray(o.gamma),
                                                                   jnp.floor(t / o.step_size).astype(jnp.int32)),
                  base_lr)


def _multistep_schedule(o, steps_per_epoch: int, base_lr) -> optax.Schedule:
    milestones = jnp.asarray(sorted(o.milestones), jnp.float32)

    def main(t, lr):
        return lr * jnp.power(jnp.asarray(o.gamma), jnp.sum(t >= milestones).astype(jnp.int32))

    return warmed(o, steps_per_epoch, main, base_lr)


def _cosine_schedule(o, steps_per_epoch: int, base_lr, num_epochs: int) -> optax.Schedule:
    span = num_epochs - o.warmup_epochs if o.warmup_prefix else num_epochs

    def main(t, lr):
        return o.min_lr + 0.5 * (lr - o.min_lr) * (1 + jnp.cos(math.pi * jnp.minimum(t, span) / span))

    return warmed(o, steps_per_epoch, main, base_lr)


# --------------------------------------------------------------------------- the registries


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    """An optimiser: ``build(config, schedule, weight_decay, mask)`` -> the optax transformation
    that scales its update by ``schedule(step)``; ``weight_decay`` may be traced, ``mask`` is
    None (decay everything the optimiser sees) or a function of the parameters -> bools."""

    build: Callable[["OptimConfig", optax.Schedule, Any, Any], optax.GradientTransformation]
    help: str
    eps: float | None = None  # the default of ``--eps`` for it (None: it takes none)


@dataclasses.dataclass(frozen=True)
class ScheduleSpec:
    """A learning-rate schedule: ``build(config, steps_per_epoch, base_lr, num_epochs)`` -> lr as
    a function of the optimiser step (``base_lr`` may be traced)."""

    build: Callable[["OptimConfig", int, Any, int], optax.Schedule]
    help: str


OPTIMIZERS: Mapping[str, OptimizerSpec] = {
    "sgd": OptimizerSpec(
        build=lambda o, schedule, wd, mask: _sgd_chain(schedule, o.momentum, wd, o.nesterov, mask),
        help="torch.optim.SGD: --momentum, --nesterov, --weight_decay coupled (L2 on the gradient)"),
    "adamw": OptimizerSpec(
        build=lambda o, schedule, wd, mask: adamw(schedule, o.betas, o.eps_or_default, wd, mask),
        help="torch.optim.AdamW: --betas, --eps, --weight_decay decoupled", eps=1e-8),
    "lamb": OptimizerSpec(
        build=lambda o, schedule, wd, mask: lamb(schedule, o.betas, o.eps_or_default, wd, mask),
        help="timm's Lamb: --betas, --eps, --weight_decay; the gradient clipped to global norm 1", eps=1e-6),
    "lars": OptimizerSpec(
        build=lambda o, schedule, wd, mask: lars(schedule, o.momentum, wd, mask, o.nesterov,
                                                 eps=o.eps_or_default),
        help="timm's Lars: --momentum, --nesterov, --weight_decay, trust coefficient 0.001", eps=1e-8),
}

SCHEDULES: Mapping[str, ScheduleSpec] = {
    "step": ScheduleSpec(
        build=lambda o, spe, lr, epochs: _step_schedule(o, spe, lr),
        help="torch's StepLR: x --s_rl_gamma every --s_lr_step_size epochs"),
    "multistep": ScheduleSpec(
        build=lambda o, spe, lr, epochs: _multistep_schedule(o, spe, lr),
        help="torch's MultiStepLR: x --s_rl_gamma at each of --milestones"),
    "cosine": ScheduleSpec(
        build=lambda o, spe, lr, epochs: _cosine_schedule(o, spe, lr, epochs),
        help="torch's CosineAnnealingLR: down to --min_lr at the last epoch"),
}


def entry(registry: Mapping, name: str, flag: str):
    try:
        return registry[name]
    except KeyError:
        raise ValueError(f"{flag} {name!r}: choose one of {', '.join(registry)}") from None


class AccumState(NamedTuple):
    """Gradient accumulation's state: the inner optimiser's, the example-weighted gradient sum of
    the micro-batches since the last update, their examples, and the micro-steps taken."""

    inner: Any
    grads: Any
    weight: jax.Array
    micro: jax.Array
    updates: jax.Array  # optimiser updates applied


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """A run's optimiser: the optax transformation, its schedule and the optimiser updates of an
    epoch; with ``accum_steps`` K > 1, an update every K micro-batches (and at the end of each
    epoch of ``micro_steps_per_epoch``), from their gradients' example-weighted mean: the gradient
    one batch of all their examples would give."""

    tx: optax.GradientTransformation
    schedule: optax.Schedule
    steps_per_epoch: int  # optimiser updates per epoch
    accum_steps: int = 1
    micro_steps_per_epoch: int = 0

    def epoch_lr(self, epoch: int) -> float:
        """The learning rate of the first step of ``epoch`` (0-based): what an epoch records."""
        return float(self.schedule(epoch * self.steps_per_epoch))

    def init(self, params):
        if self.accum_steps == 1:
            return self.tx.init(params)
        zeros = jax.tree.map(jnp.zeros_like, params)
        count = jnp.zeros((), jnp.int32)
        return AccumState(self.tx.init(params), zeros, jnp.zeros((), jnp.float32), count, count)

    def update(self, grads, state, params, weight):
        """``(updates, state, applied)`` for a micro-batch of ``weight`` real examples; ``applied``
        is whether the parameters move at this step (True, a Python bool, without accumulation)."""
        if self.accum_steps == 1:
            updates, state = self.tx.update(grads, state, params)
            return updates, state, True
        summed = jax.tree.map(lambda a, g: a + g * weight, state.grads, grads)
        total = state.weight + weight
        position = state.micro % self.micro_steps_per_epoch
        applied = ((position + 1) % self.accum_steps == 0) | (position == self.micro_steps_per_epoch - 1)
        mean = jax.tree.map(lambda a: a / jnp.maximum(total, 1.0), summed)
        updates, inner = self.tx.update(mean, state.inner, params)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(applied, n, o), new, old)  # noqa: E731
        updates = jax.tree.map(lambda u: jnp.where(applied, u, jnp.zeros_like(u)), updates)
        zero = jax.tree.map(jnp.zeros_like, summed)
        new_state = AccumState(keep(inner, state.inner), keep(zero, summed),
                               jnp.where(applied, 0.0, total), state.micro + 1,
                               state.updates + applied.astype(jnp.int32))
        return updates, new_state, applied

    def updates_done(self, state, step) -> jax.Array:
        """The optimiser updates applied once ``state`` (after micro-step ``step``, 1-based) holds."""
        return state.updates if self.accum_steps > 1 else step


def traced_hparams(config: "OptimConfig") -> dict[str, jax.Array]:
    """The optimiser's traced scalars of a run (its lr and weight decay), for a step's hparams."""
    return {LR_KEY: jnp.float32(config.lr), WEIGHT_DECAY_KEY: jnp.float32(config.weight_decay)}


def build(config: "OptimConfig", steps_per_epoch: int, num_epochs: int = 1,
          hparams: Mapping[str, jax.Array] | None = None) -> Optimizer:
    """The optimiser and schedule ``config`` names (``OptimConfig.optimizer``/``.schedule``).

    ``hparams`` (a step's traced scalars, ``traced_hparams``) give the lr and the weight decay
    inside a compiled step; without them the config's own values are used (state init, records).
    ``steps_per_epoch`` counts the epoch's batches; with ``accum_steps`` K the schedule counts
    updates, ``ceil(steps_per_epoch / K)`` an epoch."""
    micro = steps_per_epoch
    steps_per_epoch = -(-micro // config.accum_steps)
    lr = config.lr if hparams is None else hparams[LR_KEY]
    weight_decay = config.weight_decay if hparams is None else hparams[WEIGHT_DECAY_KEY]
    if config.weight_decay == 0:
        weight_decay = 0.0  # no decay is a static choice (the optimiser state's shape depends on it)
    schedule = entry(SCHEDULES, config.schedule, "--schedule").build(config, steps_per_epoch, lr, num_epochs)
    mask = decay_mask if config.no_decay_norm_bias else None
    tx = entry(OPTIMIZERS, config.optimizer, "--optimizer").build(config, schedule, weight_decay, mask)
    if config.clip_grad_norm is not None:
        tx = optax.chain(clip_by_global_norm_torch(config.clip_grad_norm), tx)
    return Optimizer(tx, schedule, steps_per_epoch, config.accum_steps, micro)
