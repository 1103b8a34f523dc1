"""One run's optimiser step: the static spec, the train state, the forward passes of the student
and the frozen teacher(s), and the loss.

``student_step`` and ``train_step`` are pure module-level functions: ``jax.jit`` is applied where
they are used (``kdjax.engine.trainer``), with ``StepSpec`` static. Everything a sweep varies
(alpha, the loss's hyper-parameters, the seed) is a traced argument, so a sweep compiles once.

Student modes (``DistillConfig.student_train``):

- ``fc``: the seed's behaviour. Only the head is optimised, but the student runs in train mode,
  so BatchNorm normalises with batch statistics and keeps updating its running averages.
- ``fc_frozen_bn``: a truly frozen backbone: eval-mode BatchNorm, only the head is optimised.
- ``all``: full fine-tuning (also what supervised teacher fine-tuning uses).

The teacher is data: its variables enter every step as an argument (replicated, never donated,
never optimised, never checkpointed; its fingerprint is recorded instead). Several teachers are
one argument too: per architecture their variables stacked, one vmapped pass each.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from kdjax import data, losses, models, optim
from kdjax.config import OptimConfig, TrainConfig, steps_per_epoch
from kdjax.data import augment
from kdjax.data.views import ViewPipeline
from kdjax.engine import adapters


class TrainState(struct.PyTreeNode):
    """Everything that changes during training (the teacher is not here, by design)."""

    step: jax.Array  # optimiser steps taken
    params: Any
    batch_stats: Any
    opt_state: Any
    # the loss's trained adapters (FitNets' regressors, projectors): ``{"params", "batch_stats"}``
    # keyed by term and pair, ``{}`` when it has none; checkpointed, never exported with the student
    aux: Any = struct.field(default_factory=dict)
    # the student's exponential moving average ``{"params", "batch_stats"}`` (``--ema_decay``),
    # ``{}`` without one; checkpointed, so a resumed run continues it exactly
    ema: Any = struct.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class TeacherGroup:
    """The teachers of one architecture among several: their module, view and how many."""

    arch: str
    model: nn.Module
    view: augment.View | None
    count: int


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """The static part of a compiled step: networks, optimiser recipe, student mode, loss name.

    Hashable and compared by value (flax modules and frozen configs are), so it is a static
    argument of ``jax.jit`` and runs with equal specs share one compilation: the optimiser is
    rebuilt from ``optim`` inside the trace rather than held as an optax object (a new closure
    per run would defeat the cache). Everything a sweep varies (alpha, the loss's
    hyper-parameters, the seed) is a traced argument instead, so a sweep compiles once.
    """

    student_arch: str
    student: nn.Module
    teacher: nn.Module | None
    optim: OptimConfig
    steps_per_epoch: int
    student_train: str = "fc"
    loss: str = "mse"  # DistillConfig.loss: a term (the alpha shorthand) or weighted terms
    image_size: int = 224
    # how each network sees the canonical batch (None: as it is; see augment.as_view)
    student_view: augment.View | None = None
    teacher_view: augment.View | None = None
    # each feature term's (student tap, teacher tap) pairs, resolved for the two architectures
    pairs: tuple[tuple[str, losses.Pairs], ...] = ()
    # several teachers: one group per architecture (its members' variables stacked, one vmapped
    # pass), and how their logits combine (``teacher`` is then the first group's module)
    teacher_groups: tuple[TeacherGroup, ...] = ()
    teacher_combine: str = "mean"
    num_epochs: int = 1  # what a schedule over the whole run (cosine) needs
    ema: bool = False  # keep an EMA of the student (its decay is traced: EMA_DECAY_KEY)
    ema_warmup: bool = True
    # the views' strong augmentation beside the crop (kdjax.data.views; its mixing alphas traced)
    views: ViewPipeline = ViewPipeline()

    def optimizer(self, hparams: Mapping | None = None) -> optim.Optimizer:
        """The optax transformation and schedule of ``optim`` (``kdjax.optim.build``), with the
        traced lr and weight decay of ``hparams`` inside a step (their structure only without)."""
        return optim.build(self.optim, self.steps_per_epoch, self.num_epochs, hparams)

    @property
    def tx(self) -> optax.GradientTransformation:
        """The transformation's structure (what ``init`` needs; a step uses ``optimizer(hparams)``)."""
        return self.optimizer().tx

    @property
    def objective(self) -> losses.Objective:
        """The loss's terms and tap pairs (cross-entropy alone for supervised runs)."""
        if self.teacher is None:
            return losses.Objective(("ce",))
        return losses.Objective(terms_of(self.loss), self.pairs)

    @property
    def student_taps(self) -> tuple[str, ...]:
        """The feature taps the loss reads from the student (none for supervised runs)."""
        return self.objective.student_taps

    @property
    def teacher_taps(self) -> tuple[str, ...]:
        return self.objective.teacher_taps


@functools.lru_cache(maxsize=64)
def terms_of(loss: str) -> tuple[str, ...]:
    """The terms of a ``DistillConfig.loss`` in order, ``ce`` first for the alpha shorthand."""
    parsed = losses.parse(loss)
    return ("ce", parsed[0][0]) if parsed[0][1] is None else tuple(name for name, _ in parsed)


def network_view(arch: str, image_size: int, normalization=None) -> augment.View | None:
    """How ``arch`` sees the canonical ``image_size`` batch: with its own Normalize() statistics
    (``normalization``, a ``(mean, std)`` pair, where a model directory or the flags give others)
    and, for a network that takes one size only (ViT), resized to that size (a ViT teacher of a
    112 px student, or fine-tuned on the students' data); None where that is the batch as it is."""
    inputs = models.get(arch).input
    size = inputs.crop_size if models.get(arch).fixed_size else image_size
    mean, std = normalization or (inputs.mean, inputs.std)
    view = augment.View(size, tuple(mean), tuple(std))
    return None if view == augment.View(image_size) else view


def compute_dtype(config: TrainConfig):
    return jnp.bfloat16 if config.compute_dtype == "bfloat16" else jnp.float32


def step_spec_for(config: TrainConfig, dataset: data.Dataset, student_arch: str, teacher=None) -> StepSpec:
    """The compiled step's static part for ``config`` on ``dataset``; ``teacher`` is a
    ``kdjax.engine.teachers.Teacher`` (None for supervised training)."""
    from kdjax.engine import teachers  # the teacher's grouping; teachers imports this module

    dtype = compute_dtype(config)
    return StepSpec(
        student_arch=student_arch,
        student=models.create_model(student_arch, len(dataset.class_names), dtype),
        # the teacher computes in the run's dtype too (bfloat16 on accelerators); its variables stay
        # as given (float32), like the student's master weights
        teacher=None if teacher is None else teacher.model.clone(dtype=dtype),
        optim=config.optim.static_part(),
        steps_per_epoch=steps_per_epoch(dataset["train"].num_examples, config.batch_size),
        num_epochs=config.num_epochs,
        ema=config.ema_decay is not None,
        ema_warmup=config.ema_warmup,
        views=config.augment.pipeline(len(dataset.class_names)),
        student_train=config.student_train,
        loss="mse" if config.distill is None else config.distill.loss,
        image_size=config.image_size,
        student_view=network_view(student_arch, config.image_size, config.augment.normalization),
        teacher_view=None if teacher is None else network_view(teacher.arch, config.image_size,
                                                               teacher.normalization),
        pairs=() if teacher is None else losses.objective(
            terms_of(config.distill.loss), config.distill.pairs, models.get(student_arch).taps,
            models.get(teacher.arch).taps).pairs,
        teacher_groups=() if teacher is None else teachers.step_groups(teacher, dtype, config.image_size),
        teacher_combine="mean" if config.distill is None else config.distill.teacher_combine,
    )


def trainable_params(params: Mapping, spec: StepSpec) -> dict:
    """The subset the optimiser sees: the head in ``fc``/``fc_frozen_bn`` modes, else all."""
    if spec.student_train == "all":
        return dict(params)
    return models.head_params(spec.student_arch, params)


# The optimiser's tree holds the adapters' parameters under this key, beside the student's.
AUX_KEY = "distill_adapters"


def _optimised(params: Mapping, aux: Mapping, spec: StepSpec) -> dict:
    """What the optimiser updates: the student's trainable parameters and the adapters'."""
    trainable = trainable_params(params, spec)
    return {**trainable, AUX_KEY: aux["params"]} if aux else trainable


def create_train_state(variables: Mapping, spec: StepSpec, aux: Mapping | None = None) -> TrainState:
    params = dict(variables["params"])
    aux = dict(aux or {})
    stats = dict(variables["batch_stats"])
    ema = {"params": params, "batch_stats": stats} if spec.ema else {}
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=stats,
        opt_state=spec.optimizer().init(_optimised(params, aux, spec)),
        aux=aux,
        ema=jax.tree.map(jnp.array, ema),
    )


EMA_DECAY_KEY = "ema/decay"


def ema_decay(decay, step, warmup: bool) -> jax.Array:
    """timm's ModelEmaV3 decay at optimiser update ``step`` (1-based): 0 at the first (the EMA
    starts as the model), then ``decay``, or with ``warmup`` ``min(decay, 1 - (1 + (step - 1))
    ** -2/3)`` (its ``use_warmup``, gamma 1, power 2/3)."""
    t = jnp.maximum(step - 1, 0).astype(jnp.float32)
    d = jnp.minimum(decay, 1 - (1 + t) ** (-2.0 / 3.0)) if warmup else jnp.asarray(decay, jnp.float32)
    return jnp.where(t <= 0, 0.0, d)


def update_ema(ema: Mapping, params, batch_stats, decay) -> dict:
    """``ema + (1 - decay) (model - ema)`` for every parameter and BatchNorm statistic (torch's
    ``lerp_``, what ModelEmaV3 applies to the whole state_dict)."""
    model = {"params": params, "batch_stats": batch_stats}
    return jax.tree.map(lambda e, m: e + (1 - decay) * (m - e), dict(ema), model)


def hparams_for(config: TrainConfig) -> dict[str, jax.Array]:
    """The traced scalars of a step: every term's weight and hyper-parameters, the optimiser's lr
    and weight decay (one compilation for every value of each)."""
    d = config.distill
    traced = optim.traced_hparams(config.optim)
    if config.ema_decay is not None:
        traced[EMA_DECAY_KEY] = jnp.float32(config.ema_decay)
    if d is None:
        return {losses.weight_key("ce"): jnp.float32(1.0), "label_smoothing": jnp.float32(0.0), **traced}
    return {**{losses.weight_key(k): jnp.float32(w) for k, w in d.weights.items()},
            **{k: jnp.float32(v) for k, v in d.hparams.items()}, **traced}


# The adapters' initialisation stream, apart from the student's and the augmentation's.
_ADAPTER_STREAM = 0x41444150


def feature_shapes(spec: StepSpec, image_size: int | None = None) -> tuple[dict, dict]:
    """The student's and teacher's tapped feature shapes on a batch of one (no computation)."""
    size = image_size or spec.image_size
    images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)

    def shapes(model, taps, view, arch_vars):
        return jax.eval_shape(
            lambda v, x: apply_model(model, v, augment.as_view(x, view), taps, train=False)[0].features,
            arch_vars, images)

    s_vars = models.abstract_variables(spec.student, _view_size(spec.student_view, size))
    t_vars = models.abstract_variables(spec.teacher, _view_size(spec.teacher_view, size))
    return (shapes(spec.student, spec.student_taps, spec.student_view, s_vars),
            shapes(spec.teacher, spec.teacher_taps, spec.teacher_view, t_vars))


def _view_size(view: augment.View | None, size: int) -> int:
    return size if view is None else view.size


def init_aux(spec: StepSpec, seed: int) -> dict:
    """The adapters' fresh variables for a run of ``seed`` (``{}`` when the loss has none)."""
    if spec.teacher is None or not spec.objective.adapted:
        return {}
    return adapters.init(spec.objective, *feature_shapes(spec), jax.random.fold_in(jax.random.key(_ADAPTER_STREAM),
                                                                                 seed))


def apply_model(model: nn.Module, variables, images, taps: tuple[str, ...], **kwargs):
    """``model.apply`` as ``(Outputs, mutated)``: the logits and the feature taps ``taps``."""
    out = model.apply(variables, images, taps=bool(taps), **kwargs)
    out, mutated = out if "mutable" in kwargs else (out, None)
    logits, features = out if taps else (out, {})
    return losses.Outputs(logits, {k: features[k] for k in taps}), mutated


def ensemble_logits(logits: jax.Array) -> jax.Array:
    """Several teachers' logits ``[M, B, C]`` as one teacher's: ``log mean_m softmax(z_m)``, whose
    softmax is the teachers' mean probabilities."""
    logp = jax.nn.log_softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), axis=-1)
    return jax.nn.logsumexp(logp, axis=0) - jnp.log(jnp.asarray(logits.shape[0], logp.dtype))


def objective_loss(spec: StepSpec, student: losses.Outputs, teacher: losses.Outputs | None, labels, mask, hparams,
                   adapted=None):
    """``(loss, {term: value})`` of the run's objective; several teachers' logits ``[M, B, C]``
    combine as ``spec.teacher_combine`` says."""
    if teacher is None or teacher.logits.ndim == 2:
        return losses.total(spec.objective, student, teacher, labels, hparams, mask, adapted)
    if spec.teacher_combine == "mean":  # several teachers: their mean probabilities as the target
        return losses.total(spec.objective, student, losses.Outputs(ensemble_logits(teacher.logits)), labels,
                            hparams, mask, adapted)
    # "sum": each teacher's distillation terms, summed (big_vision's several-teacher loss); CE once
    per_teacher = [losses.total(spec.objective, student, losses.Outputs(t), labels, hparams, mask, adapted)
                   for t in teacher.logits]
    ce = per_teacher[0][1].get("ce")
    terms = {k: sum(p[1][k] for p in per_teacher) for k in per_teacher[0][1] if k != "ce"}
    loss = sum(p[0] for p in per_teacher)
    if ce is not None:  # counted once, not once per teacher
        loss = loss - (len(per_teacher) - 1) * jnp.asarray(hparams[losses.weight_key("ce")]).astype(ce.dtype) * ce
        terms = {"ce": ce, **terms}
    return loss, terms


def epoch_of(step, steps_per_epoch: int) -> jax.Array:
    """The 1-based epoch (a float) of optimiser step ``step``: what a warm-up reads."""
    return (jnp.asarray(step) // steps_per_epoch + 1).astype(jnp.float32)


def teacher_outputs(spec: StepSpec, teacher_vars, images: jax.Array) -> losses.Outputs | None:
    """The frozen teacher's eval-mode outputs (no gradient flows into it); None without one."""
    if spec.teacher is None:
        return None
    if spec.teacher_groups:  # several teachers: logits [M, B, C], one vmapped pass per architecture
        logits = [jax.vmap(lambda v, g=group: apply_model(g.model, v, augment.as_view(images, g.view), (),
                                                          train=False)[0].logits)(variables)
                  for group, variables in zip(spec.teacher_groups, teacher_vars)]
        return jax.lax.stop_gradient(losses.Outputs(jnp.concatenate(logits, axis=0)))
    out, _ = apply_model(spec.teacher, teacher_vars, augment.as_view(images, spec.teacher_view), spec.teacher_taps,
                         train=False)
    return jax.lax.stop_gradient(out)


# The 'dropout' rng stream (dropout, stochastic depth) apart from the augmentation's.
_DROPOUT_STREAM = 0x44524F50


def dropout_key(seed, step) -> jax.Array:
    """The 'dropout' rng of a run's optimiser step, from ``(seed, step)`` alone: a resumed run
    and runs trained together draw the masks they would draw alone."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(_DROPOUT_STREAM), seed), step)


def student_forward(spec: StepSpec, variables, images: jax.Array, mask: jax.Array, key: jax.Array):
    """The student's training-time forward pass: ``(Outputs, new batch_stats)``. The network is
    in train mode (dropout and stochastic depth drawn from ``key``; BatchNorm on batch statistics,
    updating its running averages) except in ``fc_frozen_bn`` mode, where the frozen backbone
    runs as in evaluation, as torch's ``model.eval()`` backbone would."""
    images = augment.as_view(images, spec.student_view)
    if spec.student_train == "fc_frozen_bn":
        out, _ = apply_model(spec.student, variables, images, spec.student_taps, train=False)
        return out, variables["batch_stats"]
    out, updates = apply_model(spec.student, variables, images, spec.student_taps, train=True, mask=mask,
                               mutable=["batch_stats"], rngs={"dropout": key})
    return out, updates["batch_stats"]


def student_step(
    state: TrainState,
    batch: data.Batch,
    t_out: losses.Outputs | None,
    hparams: Mapping,
    spec: StepSpec,
    forward: Callable[[dict], tuple[losses.Outputs, Any]] | None = None,
    seed=0,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """The student's optimiser step on ``batch`` given the teacher's outputs on the same batch;
    ``seed`` is the run's (its dropout masks come from ``dropout_key(seed, step)``).

    ``forward(trainable) -> (Outputs, new batch_stats)`` replaces the full forward pass when the
    caller already has the frozen part's output (the ``shared`` group mode).
    """
    labels = batch.labels
    targets = labels if batch.targets is None else batch.targets  # mixup/cutmix's soft targets
    mask = batch.mask.astype(jnp.float32)
    if forward is None:
        def forward(trainable):
            variables = {"params": {**state.params, **trainable}, "batch_stats": state.batch_stats}
            return student_forward(spec, variables, batch.images, mask, dropout_key(seed, state.step))

    hparams = {**hparams, "epoch": epoch_of(state.step, spec.steps_per_epoch)}

    def loss_fn(optimised):
        trainable = {k: v for k, v in optimised.items() if k != AUX_KEY}
        out, new_stats = forward(trainable)
        aux = {**state.aux, "params": optimised[AUX_KEY]} if state.aux else state.aux
        adapted, new_aux = adapters.adapt(spec.objective, aux, out, t_out, True, mask)
        loss, terms = objective_loss(spec, out, t_out, targets, mask, hparams, adapted)
        return loss, (terms, out.logits, new_stats, new_aux)

    optimised = _optimised(state.params, state.aux, spec)
    (loss, (terms, logits, new_stats, new_aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(optimised)
    count = jnp.sum(mask)
    optimizer = spec.optimizer(hparams)
    updates, opt_state, applied = optimizer.update(grads, state.opt_state, optimised, count)
    optimised = optax.apply_updates(optimised, updates)
    trainable = {k: v for k, v in optimised.items() if k != AUX_KEY}
    new_state = state.replace(
        step=state.step + 1,
        params={**state.params, **trainable},
        batch_stats=new_stats,
        opt_state=opt_state,
        aux={"params": optimised[AUX_KEY], "batch_stats": new_aux["batch_stats"]} if state.aux else state.aux,
    )
    if state.ema:  # after each optimiser update, counted in updates
        ema = update_ema(state.ema, new_state.params, new_state.batch_stats,
                         ema_decay(hparams[EMA_DECAY_KEY], optimizer.updates_done(opt_state, new_state.step),
                                   spec.ema_warmup))
        new_state = new_state.replace(ema=ema if applied is True else jax.tree.map(
            lambda n, o: jnp.where(applied, n, o), ema, state.ema))
    metrics = {
        "loss": loss,
        "loss_sum": loss * count,
        **{f"{k}_sum": v * count for k, v in terms.items()},
        "correct": jnp.sum((jnp.argmax(logits, -1) == labels) * mask),
        "count": count,
    }
    return new_state, metrics


def train_step(
    state: TrainState, teacher_vars, batch: data.Batch, hparams: Mapping, spec: StepSpec, seed=0
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimiser step on a (possibly padded) batch; ``batch.mask`` marks real examples."""
    return student_step(state, batch, teacher_outputs(spec, teacher_vars, batch.images), hparams, spec,
                        seed=seed)
