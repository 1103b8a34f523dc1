"""The distillation engine: pure jit-compiled steps over a run axis, one setup, one epoch loop.

A single run and a sweep of runs are one program shape. ``train_runs`` places the data, the
teacher, the validation views and the teacher's validation outputs once, restores or creates every
run's state, and trains the runs in groups; a group's train states carry a leading run axis
``[K]``. How a group's step treats that axis is one static choice (``GroupMode``):

- ``single``: one run, the plain step (the axis squeezed inside the program);
- ``vmap``: K runs of one recipe at once, differing only in traced values (seed, alpha, the
  loss's hyper-parameters). Runs that share a seed share its augmented batch and the teacher's
  pass on it: 3 alphas x 4 seeds need 4 teacher passes per step, not 12;
- ``shared``: ``vmap`` for frozen backbones (``fc``/``fc_frozen_bn``): runs that start from the
  same backbone on the same batches keep identical backbones and BatchNorm statistics, so the
  backbone runs once per group of them and only the heads are vectorised.

Student modes (``DistillConfig.student_train``):

- ``fc``: the seed's behaviour. Only the head is optimised, but the student runs in train mode,
  so BatchNorm normalises with batch statistics and keeps updating its running averages.
- ``fc_frozen_bn``: a truly frozen backbone: eval-mode BatchNorm, only the head is optimised.
- ``all``: full fine-tuning (also what supervised teacher fine-tuning uses).

The teacher is data: its variables enter every step as an argument (replicated, never donated,
never optimised, never checkpointed; its fingerprint is recorded instead). Several teachers
(``ensemble``) are one argument too: per architecture their variables stacked, one vmapped pass.
A teacher cache (``kdjax.teacher_cache``) replaces the teacher's pass by its stored logits.

The loss is ``losses.total`` over the run's terms (``StepSpec.objective``), every weight and
hyper-parameter traced. The adapters a feature term trains (FitNets' regressors, projectors) are
``TrainState.aux``: optimised with the student, checkpointed with it, never exported. An epoch is either
one scanned program (accelerators) or a host loop over jitted steps (the CPU default, as fast
there and quicker to compile); both keep the data on the device. Every run keeps its own work
directory (epoch checkpoints, ``best/``, ``metrics.json``, ``train.log``) whichever way it was
trained, so runs resume, report and predict alike.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pathlib
import time
from typing import Any, Callable, Literal, Mapping, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import struct

from kdjax import checkpoint, console, data, distributed, losses, models, optim, sharding, teacher_cache
from kdjax.config import OptimConfig, TrainConfig, steps_per_epoch
from kdjax.data import augment, stream

GroupMode = Literal["single", "vmap", "shared"]


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the message names epoch and step."""


class ResumeMismatchError(ValueError):
    """A work directory holds a run with another configuration or teacher."""


class TrainState(struct.PyTreeNode):
    """Everything that changes during training (the teacher is not here, by design)."""

    step: jax.Array  # optimiser steps taken
    params: Any
    batch_stats: Any
    opt_state: Any
    # the loss's trained adapters (FitNets' regressors, projectors): ``{"params", "batch_stats"}``
    # keyed by term and pair, ``{}`` when it has none; checkpointed, never exported with the student
    aux: Any = struct.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class TeacherGroup:
    """The teachers of one architecture among several: their module, view and how many."""

    arch: str
    model: nn.Module
    view: augment.View | None
    count: int


TEACHER_COMBINES = ("mean", "sum")


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

    @property
    def tx(self) -> optax.GradientTransformation:
        return make_optimizer(self.optim, self.steps_per_epoch)

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


def trainable_params(params: Mapping, spec: StepSpec) -> dict:
    """The subset the optimiser sees: the head in ``fc``/``fc_frozen_bn`` modes, else all."""
    if spec.student_train == "all":
        return dict(params)
    return models.head_params(spec.student_arch, params)


def make_optimizer(o: OptimConfig, num_steps_per_epoch: int) -> optax.GradientTransformation:
    """SGD + StepLR (epochs converted to optimiser steps with ``num_steps_per_epoch``)."""
    return optim.sgd(optim.step_lr(o.lr, o.step_size, o.gamma, num_steps_per_epoch), o.momentum, o.weight_decay)


# The optimiser's tree holds the adapters' parameters under this key, beside the student's.
AUX_KEY = "distill_adapters"


def _optimised(params: Mapping, aux: Mapping, spec: StepSpec) -> dict:
    """What the optimiser updates: the student's trainable parameters and the adapters'."""
    trainable = trainable_params(params, spec)
    return {**trainable, AUX_KEY: aux["params"]} if aux else trainable


def create_train_state(variables: Mapping, spec: StepSpec, aux: Mapping | None = None) -> TrainState:
    params = dict(variables["params"])
    aux = dict(aux or {})
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=dict(variables["batch_stats"]),
        opt_state=spec.tx.init(_optimised(params, aux, spec)),
        aux=aux,
    )


def hparams_for(config: TrainConfig) -> dict[str, jax.Array]:
    """The traced scalars of a step: every term's weight and hyper-parameters (one compilation
    for every value of each)."""
    d = config.distill
    if d is None:
        return {losses.weight_key("ce"): jnp.float32(1.0), "label_smoothing": jnp.float32(0.0)}
    return {**{losses.weight_key(k): jnp.float32(w) for k, w in d.weights.items()},
            **{k: jnp.float32(v) for k, v in d.hparams.items()}}


# The adapters' initialisation stream, apart from the student's and the augmentation's.
_ADAPTER_STREAM = 0x41444150


def adapter_modules(spec: StepSpec, student_features: Mapping, teacher_features: Mapping) -> dict:
    """``{term: (module per pair)}`` for the objective's adapted terms, sized from the taps."""
    obj = spec.objective
    return {name: tuple(losses.LOSSES[name].adapter(student_features[s].shape, teacher_features[t].shape)
                        for s, t in obj.pairs_of(name)) for name in obj.adapted}


def feature_shapes(spec: StepSpec, image_size: int | None = None) -> tuple[dict, dict]:
    """The student's and teacher's tapped feature shapes on a batch of one (no computation)."""
    size = image_size or spec.image_size
    images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)

    def shapes(model, taps, view, arch_vars):
        return jax.eval_shape(lambda v, x: _apply(model, v, augment.as_view(x, view), taps, train=False)[0].features,
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
    s_shapes, t_shapes = feature_shapes(spec)
    key = jax.random.fold_in(jax.random.key(_ADAPTER_STREAM), seed)
    params, stats = {}, {}
    for name, modules in adapter_modules(spec, s_shapes, t_shapes).items():
        for i, ((s_tap, _), module) in enumerate(zip(spec.objective.pairs_of(name), modules)):
            x = jnp.zeros(s_shapes[s_tap].shape, jnp.float32)
            variables = module.init(jax.random.fold_in(key, len(params) * 64 + i), x, train=False)
            params.setdefault(name, {})[str(i)] = variables["params"]
            stats.setdefault(name, {})[str(i)] = variables.get("batch_stats", {})
    return {"params": params, "batch_stats": stats}


def adapt(spec: StepSpec, aux: Mapping, student: losses.Outputs, teacher: losses.Outputs, train: bool,
          mask=None) -> tuple[dict, Any]:
    """The adapted terms' student maps (``{term: (map per pair)}``) and the adapters' new
    BatchNorm statistics (updated in train mode, over the real examples of ``mask``)."""
    if not aux:
        return {}, aux
    modules = adapter_modules(spec, student.features, teacher.features)
    adapted, stats = {}, {}
    for name, mods in modules.items():
        maps = []
        for i, ((s_tap, _), module) in enumerate(zip(spec.objective.pairs_of(name), mods)):
            variables = {"params": aux["params"][name][str(i)], "batch_stats": aux["batch_stats"][name][str(i)]}
            if train:
                y, updates = module.apply(variables, student.features[s_tap], train=True, mask=mask,
                                          mutable=["batch_stats"])
                stats.setdefault(name, {})[str(i)] = updates.get("batch_stats", {})
            else:
                y = module.apply(variables, student.features[s_tap], train=False)
                stats.setdefault(name, {})[str(i)] = variables["batch_stats"]
            maps.append(y)
        adapted[name] = tuple(maps)
    return adapted, {"params": aux["params"], "batch_stats": stats}


# --------------------------------------------------------------------------- one run's step


def _apply(model: nn.Module, variables, images, taps: tuple[str, ...], **kwargs):
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


def _loss(spec: StepSpec, student: losses.Outputs, teacher: losses.Outputs | None, labels, mask, hparams,
          adapted=None):
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
        logits = [jax.vmap(lambda v, g=group: _apply(g.model, v, augment.as_view(images, g.view), (),
                                                     train=False)[0].logits)(variables)
                  for group, variables in zip(spec.teacher_groups, teacher_vars)]
        return jax.lax.stop_gradient(losses.Outputs(jnp.concatenate(logits, axis=0)))
    out, _ = _apply(spec.teacher, teacher_vars, augment.as_view(images, spec.teacher_view), spec.teacher_taps,
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
        out, _ = _apply(spec.student, variables, images, spec.student_taps, train=False)
        return out, variables["batch_stats"]
    out, updates = _apply(spec.student, variables, images, spec.student_taps, train=True, mask=mask,
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
        adapted, new_aux = adapt(spec, aux, out, t_out, True, mask)
        loss, terms = _loss(spec, out, t_out, labels, mask, hparams, adapted)
        return loss, (terms, out.logits, new_stats, new_aux)

    optimised = _optimised(state.params, state.aux, spec)
    (loss, (terms, logits, new_stats, new_aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(optimised)
    updates, opt_state = spec.tx.update(grads, state.opt_state, optimised)
    optimised = optax.apply_updates(optimised, updates)
    trainable = {k: v for k, v in optimised.items() if k != AUX_KEY}
    new_state = state.replace(
        step=state.step + 1,
        params={**state.params, **trainable},
        batch_stats=new_stats,
        opt_state=opt_state,
        aux={"params": optimised[AUX_KEY], "batch_stats": new_aux["batch_stats"]} if state.aux else state.aux,
    )
    count = jnp.sum(mask)
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


# --------------------------------------------------------------------------- a group's step


class Layout(NamedTuple):
    """Who shares what in a group (int32 index arrays, traced): ``seeds[S]`` the distinct seeds;
    ``run_seed[K]`` run -> its seed's batch; ``run_group[K]`` run -> its backbone group;
    ``group_seed[G]`` group -> seed; ``group_rep[G]`` group -> a member run holding its backbone."""

    seeds: jax.Array
    run_seed: jax.Array
    run_group: jax.Array
    group_seed: jax.Array
    group_rep: jax.Array

    @classmethod
    def single(cls, seed: int) -> "Layout":
        """The layout of one run."""
        zero = np.zeros((1,), np.int32)
        return cls(np.asarray([seed], np.uint32), zero, zero, zero, zero)


def _take(tree, index):
    return jax.tree.map(lambda a: jnp.take(a, index, axis=0), tree)


def _squeeze(tree):
    return jax.tree.map(lambda a: a[0], tree)


def _expand(tree):
    return jax.tree.map(lambda a: a[None], tree)


def _constrain(tree, mesh, batch_axis: int):
    if mesh is None:
        return tree
    return jax.lax.with_sharding_constraint(tree, sharding.batch_sharding_at(mesh, batch_axis))


def group_step(
    states: TrainState,
    teacher_vars,
    train_split: data.TrainArrays,
    indices: jax.Array,
    mask: jax.Array,
    epoch: jax.Array,
    hparams: Mapping,
    layout: Layout,
    spec: StepSpec,
    mesh: jax.sharding.Mesh | None = None,
    mode: GroupMode = "vmap",
    t_given: jax.Array | None = None,
    emit_teacher: bool = False,
    rows: data.TrainArrays | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimiser step of every run of a group.

    ``states`` and ``hparams`` carry a leading run axis ``[K]``; ``indices``/``mask`` are one
    batch ``[S, B]`` per distinct seed ``layout.seeds[S]``: examples whose views are drawn on
    the device from ``(seed, epoch, index)``. With ``mesh`` the batch axis is split over
    ``'data'``. Returns the new states and per-run metrics ``[K]``.

    ``t_given``: the teacher's logits on these views ``[S, ..., B, C]`` (read from a
    ``kdjax.teacher_cache``), so the teacher does not run; ``emit_teacher`` adds the logits it
    computed to the metrics as ``TEACHER_LOGITS`` (to fill one).

    ``rows``: the examples' stored images ``[S, B, ...]`` read on the host (a streamed split,
    ``kdjax.data.stream``; ``train_split`` is then ``None``), else gathered from ``train_split``.
    """
    if rows is None:
        rows = jax.vmap(lambda i: data.take_rows(train_split, i))(indices)

    def views(r, i, m, s, e):
        return data.train_views(r, i, m, s, e, image_size=spec.image_size)

    if mode == "single":
        batch = _constrain(views(_take(rows, 0), indices[0], mask[0], layout.seeds[0], epoch), mesh, 0)
        t = teacher_outputs(spec, teacher_vars, batch.images) if t_given is None else losses.Outputs(t_given[0])
        state, metrics = student_step(_squeeze(states), batch, t, _squeeze(hparams), spec, seed=layout.seeds[0])
        state, metrics = _expand(state), _expand(metrics)
        return state, ({**metrics, TEACHER_LOGITS: t.logits[None]} if emit_teacher else metrics)
    batches = jax.vmap(lambda r, i, m, s: views(r, i, m, s, epoch))(rows, indices, mask, layout.seeds)
    batches = _constrain(batches, mesh, 1)
    if t_given is None:
        t_out = jax.vmap(lambda x: teacher_outputs(spec, teacher_vars, x))(batches.images)
    else:
        t_out = None if spec.teacher is None else losses.Outputs(t_given)
    states, metrics = _student_group_step(states, batches, t_out, hparams, layout, spec, mode)
    return states, ({**metrics, TEACHER_LOGITS: t_out.logits} if emit_teacher else metrics)


# the metrics key of the teacher's logits a group step emits for a teacher cache
TEACHER_LOGITS = "teacher_logits"


def _student_group_step(states, batches, t_out, hparams, layout: Layout, spec: StepSpec, mode: GroupMode):
    """The students' steps of a group (``vmap`` or ``shared``) on the seeds' ``batches``."""
    run_batches, run_t = _take((batches, t_out), layout.run_seed)
    run_seeds = jnp.take(layout.seeds, layout.run_seed)
    if mode == "vmap":
        step = functools.partial(student_step, spec=spec)
        return jax.vmap(lambda *a: step(*a[:4], seed=a[4]))(states, run_batches, run_t, hparams, run_seeds)

    # shared: the backbone (and its BatchNorm update) once per group, then each run's head
    arch = models.get(spec.student_arch)
    backbone = dataclasses.replace(spec, student=arch.backbone(spec.student))

    def features(params, stats, step, batch, seed):
        variables = {"params": params, "batch_stats": stats}
        out, new_stats = student_forward(backbone, variables, batch.images, batch.mask.astype(jnp.float32),
                                         dropout_key(seed, step))
        return out.logits, new_stats

    # a group's runs share their seed and step, so its representative draws every member's masks
    reps = _take((states.params, states.batch_stats, states.step), layout.group_rep)
    feats, group_stats = jax.vmap(features)(*reps, _take(batches, layout.group_seed),
                                            jnp.take(layout.seeds, layout.group_seed))
    run_feats, run_stats = _take((feats, group_stats), layout.run_group)

    def head_step(state, batch, t, h, f, new_stats):
        def forward(trainable):
            logits = arch.classify(spec.student, trainable[arch.head], f)
            return losses.Outputs(logits), new_stats
        return student_step(state, batch, t, h, spec, forward=forward)

    return jax.vmap(head_step)(states, run_batches, run_t, hparams, run_feats, run_stats)


def group_epoch(states, teacher_vars, train_split, order, order_mask, epoch, hparams, layout: Layout,
                spec: StepSpec, mesh=None, mode: GroupMode = "vmap", t_given=None, emit_teacher: bool = False):
    """All steps of one epoch as one ``lax.scan`` of ``group_step``: ``order``/``order_mask`` are
    ``[steps, S, B]`` (``t_given`` ``[steps, S, ..., B, C]``); metrics come back ``[steps, K]``.
    The shape for accelerators."""

    def body(states, xs):
        return group_step(states, teacher_vars, train_split, xs[0], xs[1], epoch, hparams, layout,
                          spec, mesh, mode, xs[2], emit_teacher)

    return jax.lax.scan(body, states, (order, order_mask, t_given))


# --------------------------------------------------------------------------- evaluation


def eval_outputs(model: nn.Module, variables, images: jax.Array, taps: tuple[str, ...] = (),
                 mesh=None, view: augment.View | None = None) -> losses.Outputs:
    """Eval-mode outputs of one batch of uint8 eval views, as the network of ``view`` sees them."""
    x = _constrain(augment.as_view(augment.normalize(images), view), mesh, 0)
    return _apply(model, variables, x, taps, train=False)[0]


def group_eval_outputs(spec: StepSpec, variables, images: jax.Array, layout: Layout, mesh=None,
                       mode: GroupMode = "vmap") -> losses.Outputs:
    """``eval_outputs`` ``[K, B, ...]`` of every run's student ``variables`` ``[K]``; in the
    ``shared`` mode the backbone runs once per backbone group."""
    if mode == "single":
        return _expand(eval_outputs(spec.student, _squeeze(variables), images, spec.student_taps, mesh,
                                    spec.student_view))
    if mode == "vmap":
        return jax.vmap(lambda v: eval_outputs(spec.student, v, images, spec.student_taps, mesh,
                                               spec.student_view))(variables)
    arch = models.get(spec.student_arch)
    backbone = arch.backbone(spec.student)
    reps = _take(variables, layout.group_rep)
    feats = jax.vmap(lambda v: eval_outputs(backbone, v, images, (), mesh, spec.student_view).logits)(reps)
    run_feats = jnp.take(feats, layout.run_group, axis=0)
    head = variables["params"][arch.head]
    return losses.Outputs(jax.vmap(lambda h, f: arch.classify(spec.student, h, f))(head, run_feats))


def map_eval_batches(fn: Callable[[jax.Array], Any], images, batch_size: int, example_axis: int = 0,
                     mesh=None) -> Any:
    """``fn`` over fixed-shape batches of ``images`` (the last one padded, so one compilation),
    its outputs (a pytree) joined along ``example_axis``, the padding cut off.

    ``images``: a device array ``[N, s, s, 3]``, or a streamed ``data.Split`` whose evaluation
    views each process reads on the host (its own rows of each batch, placed over ``mesh``)."""
    if isinstance(images, data.Split):
        n = images.num_examples
        mesh = mesh or sharding.data_mesh()
        out = [fn(b) for b in stream.eval_batches(images, batch_size, sharding.batch_sharding(mesh))]
    else:
        n = images.shape[0]
        steps = math.ceil(n / batch_size)
        pad = steps * batch_size - n
        if pad:
            images = jnp.concatenate([images, jnp.zeros((pad,) + images.shape[1:], images.dtype)])
        out = [fn(images[i * batch_size : (i + 1) * batch_size]) for i in range(steps)]
    joined = jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=example_axis), *out)
    return jax.tree.map(lambda a: jax.lax.slice_in_dim(a, 0, n, axis=example_axis), joined)


def eval_metrics(s_out: losses.Outputs, t_out: losses.Outputs | None, labels, hparams,
                 spec: StepSpec, aux=None) -> dict[str, jax.Array]:
    """Validation figures over the whole set (every example counted exactly once).

    ``diff_t_s`` is the mean |teacher - student| logit difference over all examples and classes
    (the seed took it on its last val batch only). ``agreement`` is teacher-student top-1
    agreement and ``kl_t_s`` the mean KL(softmax(t) || softmax(s)) at T = 1.
    """
    adapted, _ = adapt(spec, aux or {}, s_out, t_out, False)
    loss, terms = _loss(spec, s_out, t_out, labels, None, hparams, adapted)
    s_logits = s_out.logits
    out = {"loss": loss, **terms, "acc": jnp.mean(jnp.argmax(s_logits, -1) == labels)}
    if t_out is not None:
        t_logits = t_out.logits if t_out.logits.ndim == 2 else ensemble_logits(t_out.logits)
        out.update(
            teacher_acc=jnp.mean(jnp.argmax(t_logits, -1) == labels),
            diff_t_s=jnp.mean(jnp.abs(t_logits - s_logits)),
            agreement=jnp.mean(jnp.argmax(t_logits, -1) == jnp.argmax(s_logits, -1)),
            kl_t_s=losses.hinton_kl(s_logits, t_logits, 1.0),
        )
    return out


def group_eval_metrics(s_out, t_out, labels, hparams, spec: StepSpec, mode: GroupMode = "vmap", aux=None):
    """``eval_metrics`` of every run: ``s_out`` ``[K, N, ...]``, ``hparams`` and ``aux`` ``[K]``
    (``hparams`` with the 1-based ``epoch`` of the evaluation)."""
    aux = {} if aux is None else aux
    if mode == "single":
        return _expand(eval_metrics(_squeeze(s_out), t_out, labels, _squeeze(hparams), spec, _squeeze(aux)))
    def metrics(s, t, y, h, a):
        return eval_metrics(s, t, y, h, spec, a)

    return jax.vmap(metrics, in_axes=(0, None, None, 0, 0))(s_out, t_out, labels, hparams, aux)


# Compiled once per process for each distinct (spec, mode, shapes, shardings): every group with
# equal specs reuses the same executables. States are donated; the teacher never is.
_STATIC = ("spec", "mesh", "mode")
_group_step_jit = jax.jit(group_step, static_argnames=(*_STATIC, "emit_teacher"), donate_argnums=0)
_group_epoch_jit = jax.jit(group_epoch, static_argnames=(*_STATIC, "emit_teacher"), donate_argnums=0)
_eval_outputs_jit = jax.jit(eval_outputs, static_argnums=(0, 3, 4, 5))
_group_eval_outputs_jit = jax.jit(group_eval_outputs, static_argnames=_STATIC)
_group_eval_metrics_jit = jax.jit(group_eval_metrics, static_argnames=("spec", "mode"))


def _teacher_eval_outputs(spec: StepSpec, teacher_vars, images: jax.Array, mesh=None) -> losses.Outputs:
    return teacher_outputs(spec, teacher_vars, _constrain(augment.normalize(images), mesh, 0))


_teacher_eval_outputs_jit = jax.jit(_teacher_eval_outputs, static_argnames=("spec", "mesh"))


def teacher_eval_outputs(spec: StepSpec, teacher_vars, images: jax.Array, batch_size: int,
                         mesh=None) -> losses.Outputs:
    """The teacher's (or teachers': logits ``[M, N, C]``) eval-mode outputs on every eval view."""
    if not spec.teacher_groups:
        return all_outputs(spec.teacher, teacher_vars, images, batch_size, spec.teacher_taps, mesh,
                           spec.teacher_view)
    return map_eval_batches(lambda b: _teacher_eval_outputs_jit(spec, teacher_vars, b, mesh=mesh), images,
                            batch_size, example_axis=1, mesh=mesh)


def all_outputs(model, variables, images: jax.Array, batch_size: int, taps=(), mesh=None,
                view: augment.View | None = None) -> losses.Outputs:
    """Eval-mode outputs for every image, in fixed-shape batches (the last one padded)."""
    return map_eval_batches(lambda b: _eval_outputs_jit(model, variables, b, taps, mesh, view), images,
                            batch_size, mesh=mesh)


# --------------------------------------------------------------------------- the host loop


@dataclasses.dataclass(frozen=True)
class Teacher:
    """A frozen teacher: its architecture, module, variables and fingerprint (what checkpoints
    record)."""

    arch: str
    model: nn.Module
    variables: Any
    fingerprint: str
    # an ensemble (``ensemble``): its teachers; ``variables`` then holds each architecture's
    # members stacked, ``arch`` and ``model`` are the first's
    members: tuple[Teacher, ...] = ()

    @property
    def archs(self) -> tuple[str, ...]:
        return tuple(m.arch for m in self.members) if self.members else (self.arch,)


def ensemble(teachers: Sequence[Teacher]) -> Teacher:
    """Several frozen teachers as one: per architecture (in first-appearance order) their
    variables stacked along a new leading axis, so each architecture runs as one vmapped pass.
    One teacher is returned as it is."""
    teachers = list(teachers)
    if len(teachers) == 1:
        return teachers[0]
    by_arch: dict[str, list[Teacher]] = {}
    for t in teachers:
        by_arch.setdefault(t.arch, []).append(t)
    ordered = [t for members in by_arch.values() for t in members]
    variables = tuple(jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *[t.variables for t in members])
                      for members in by_arch.values())
    digest = checkpoint.fingerprint({"teachers": np.frombuffer(
        "|".join(t.fingerprint for t in ordered).encode(), np.uint8)})
    return Teacher(ordered[0].arch, ordered[0].model, variables, digest, tuple(ordered))


def teacher_groups(teacher: Teacher, dtype, image_size: int) -> tuple[TeacherGroup, ...]:
    """The ``StepSpec.teacher_groups`` of an ensemble (empty for one teacher)."""
    if not teacher.members:
        return ()
    groups: dict[str, list[Teacher]] = {}
    for t in teacher.members:
        groups.setdefault(t.arch, []).append(t)
    return tuple(TeacherGroup(arch, members[0].model.clone(dtype=dtype), network_view(arch, image_size),
                              len(members)) for arch, members in groups.items())


@dataclasses.dataclass(frozen=True)
class Run:
    """One run: its config, work directory, initial student variables and provenance (what
    ``best/meta.json`` records; its ``init`` is part of the run's identity)."""

    config: TrainConfig
    workdir: pathlib.Path
    student_variables: Any
    provenance: Mapping | None = None


@dataclasses.dataclass
class RunResult:
    history: list[dict]
    best_val_acc: float
    best_epoch: int
    workdir: pathlib.Path
    # with a test split: the model selected on val scored on test (``score_selected``)
    test: dict | None = None


def _log(label: str, workdir: pathlib.Path, msg: str) -> None:
    """A line of the run in ``workdir``: on the console after its ``label`` (``kdjax.console``:
    above any progress bar, unless quiet), in its train.log as it is (always)."""
    console.line(f"{label}  {msg}")
    with open(workdir / "train.log", "a") as f:
        f.write(msg + "\n")


def summarize_steps(step_metrics: Mapping[str, np.ndarray], epoch: int, workdir: pathlib.Path) -> dict:
    """An epoch's train figures from its per-step sums ``[steps]``; a non-finite step loss stops
    the run (naming epoch and step) before anything of the epoch is saved."""
    step_losses = np.asarray(step_metrics["loss"])
    bad = np.flatnonzero(~np.isfinite(step_losses))
    if bad.size:
        kept = (f"the last good checkpoint is epoch {epoch} in {workdir / 'checkpoints'}" if epoch
                else f"no epoch of this run was saved yet ({workdir})")
        raise NonFiniteLossError(
            f"non-finite training loss {step_losses[bad[0]]} at epoch {epoch + 1} step "
            f"{bad[0] + 1}/{step_losses.size}; nothing of this epoch was saved, {kept}"
        )
    sums = {k: float(np.sum(v)) for k, v in step_metrics.items() if k != "loss"}
    count = sums.pop("count")
    train = {"loss": sums.pop("loss_sum") / count, "acc": sums.pop("correct") / count}
    train.update({k[: -len("_sum")]: v / count for k, v in sums.items()})
    return train


class RunStore:
    """One run's work directory: an orbax checkpoint per epoch (train state + history, atomic),
    ``best/`` (the best-val student as a model directory), ``metrics.json`` and ``train.log``.

    ``run_meta`` identifies the run (config, architectures, initial weights, teacher and data
    fingerprints); resuming a directory that holds another run is refused.
    """

    RESUME_KEYS = ("config", "student_arch", "init", "teacher_fingerprint", "class_names",
                   "data_fingerprint")

    def __init__(self, workdir: str | pathlib.Path, run_meta: Mapping, label: str | None = None):
        self.workdir = pathlib.Path(workdir).absolute()
        self.label = label or self.workdir.name  # names the run's lines on the console
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.run_meta = dict(run_meta)
        options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True, cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.workdir / "checkpoints", options=options)
        self.history: list[dict] = []
        self.best_acc, self.best_epoch, self.start_epoch = -1.0, -1, 0

    def restore(self, abstract_state):
        """The latest saved state (shaped and placed like ``abstract_state``), or None."""
        latest = self.manager.latest_step()
        if latest is None:
            return None
        restored = self.manager.restore(
            latest,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()),
        )
        saved = restored["meta"]
        for key in self.RESUME_KEYS:
            if saved["run"].get(key) != self.run_meta[key]:
                flag = " (--init)" if key == "init" else ""
                raise ResumeMismatchError(
                    f"{self.workdir} holds a run with a different {key}{flag} "
                    f"({saved['run'].get(key)!r} != {self.run_meta[key]!r}); use another --out or delete it"
                )
        self.history, self.best_acc, self.best_epoch = saved["history"], saved["best_val_acc"], saved["best_epoch"]
        self.start_epoch = latest + 1
        num_epochs = self.run_meta["config"]["num_epochs"]
        self.log(f"resuming {self.workdir} after epoch {latest + 1}/{num_epochs}")
        return restored["state"]

    def log(self, msg: str) -> None:
        """A line of this run: on the console after its label, in its train.log as it is."""
        if distributed.is_primary():  # one train.log and one console per run, however many processes
            _log(self.label, self.workdir, msg)

    def end_epoch(self, epoch: int, state: TrainState, record: dict,
                  save_best: Callable[[pathlib.Path, dict], None]) -> None:
        """Record epoch ``epoch`` (0-based): the best model first (``save_best(directory,
        provenance)`` when val accuracy improved), then the checkpoint, then metrics.json, so a
        crash at any point leaves a consistent directory to resume from."""
        self.history.append(record)
        acc = record["val"]["acc"]
        if acc > self.best_acc:  # strict: the first epoch reaching the best accuracy is kept
            self.best_acc, self.best_epoch = acc, epoch + 1
            save_best(self.workdir / "best", {
                "epoch": epoch + 1,
                "val_acc": acc,
                "teacher_fingerprint": self.run_meta["teacher_fingerprint"],
                "config": self.run_meta["config"],
            })
        meta = {"run": self.run_meta, "history": self.history,
                "best_val_acc": self.best_acc, "best_epoch": self.best_epoch}
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self.manager.save(epoch, args=args)
        self.manager.wait_until_finished()
        if distributed.is_primary():  # orbax checkpoints are written by all processes, files by one
            checkpoint.write_text_atomic(self.workdir / "metrics.json", json.dumps(meta, indent=1) + "\n")
        self.log(_epoch_line(record, self.run_meta["config"]["num_epochs"]))
        distributed.barrier("kdjax.train.end_epoch")  # no process reads ahead of process 0's files

    def result(self) -> RunResult:
        return RunResult(history=self.history, best_val_acc=self.best_acc, best_epoch=self.best_epoch,
                         workdir=self.workdir)

    def close(self) -> None:
        self.manager.close()


def run_labels(workdirs: Sequence[pathlib.Path]) -> list[str]:
    """Each run's name on the console: its directory below the runs' common parent, and at
    least its parent's name and its own (``alpha_0.5/run_1`` in a study, ``runs/teacher``)."""
    paths = [pathlib.Path(w).absolute() for w in workdirs]
    common = pathlib.Path(os.path.commonpath(paths)) if len(paths) > 1 else paths[0].parent
    labels = [p.relative_to(common) for p in paths]
    return [str(p.relative_to(common.parent) if len(label.parts) < 2 else label) for p, label in zip(paths, labels)]


def run_meta_for(run: Run, student_arch: str, teacher: Teacher | None, dataset: data.Dataset) -> dict:
    """What identifies a run for resuming (see ``RunStore``)."""
    return {
        "config": run.config.to_json(),
        "student_arch": student_arch,
        "init": None if run.provenance is None else run.provenance.get("init"),
        "teacher_arch": None if teacher is None else "+".join(teacher.archs),
        "teacher_fingerprint": None if teacher is None else teacher.fingerprint,
        "class_names": list(dataset.class_names),
        # a digest of the source files, image size and cache settings (``Dataset.fingerprint``)
        "data_fingerprint": dataset.fingerprint,
    }


def step_spec_for(config: TrainConfig, dataset: data.Dataset, student_arch: str, teacher: Teacher | None) -> StepSpec:
    """The compiled step's static part for ``config`` on ``dataset``."""
    dtype = jnp.bfloat16 if config.compute_dtype == "bfloat16" else jnp.float32
    return StepSpec(
        student_arch=student_arch,
        student=models.create_model(student_arch, len(dataset.class_names), dtype),
        # the teacher computes in the run's dtype too (bfloat16 on accelerators); its variables stay
        # as given (float32), like the student's master weights
        teacher=None if teacher is None else teacher.model.clone(dtype=dtype),
        optim=config.optim,
        steps_per_epoch=steps_per_epoch(dataset["train"].num_examples, config.batch_size),
        student_train=config.student_train,
        loss="mse" if config.distill is None else config.distill.loss,
        image_size=config.image_size,
        student_view=network_view(student_arch, config.image_size),
        teacher_view=None if teacher is None else network_view(teacher.arch, config.image_size),
        pairs=() if teacher is None else losses.objective(
            terms_of(config.distill.loss), config.distill.pairs, models.get(student_arch).taps,
            models.get(teacher.arch).taps).pairs,
        teacher_groups=() if teacher is None else teacher_groups(teacher, dtype, config.image_size),
        teacher_combine="mean" if config.distill is None else config.distill.teacher_combine,
    )


def network_view(arch: str, image_size: int) -> augment.View | None:
    """How ``arch`` sees the canonical ``image_size`` batch: with its own Normalize() statistics
    and, for a network that takes one size only (ViT), resized to that size (a ViT teacher of a
    112 px student, or fine-tuned on the students' data); None where that is the batch as it is."""
    inputs = models.get(arch).input
    size = inputs.crop_size if models.get(arch).fixed_size else image_size
    view = augment.View(size, tuple(inputs.mean), tuple(inputs.std))
    return None if view == augment.View(image_size) else view


def tx_lr(config: TrainConfig, spe: int, epoch: int) -> float:
    """The learning rate used during ``epoch`` (0-based)."""
    o = config.optim
    return float(optim.step_lr(o.lr, o.step_size, o.gamma, spe)(epoch * spe))


def epoch_record(config: TrainConfig, spe: int, epoch: int, train_figures: dict, val: Mapping, seconds: float) -> dict:
    return {
        "epoch": epoch + 1,
        "lr": float(tx_lr(config, spe, epoch)),
        "train": train_figures,
        "val": {k: float(v) for k, v in val.items()},
        "seconds": seconds,
    }


def recipe_key(config: TrainConfig) -> dict:
    """What runs trained together must share: the config without seed, alpha and the loss's
    hyper-parameters (the traced values)."""
    d = config.to_json()
    d.pop("seed")
    if d["distill"] is not None:
        d["distill"].pop("alpha")
        d["distill"].pop("hparams")
        d["distill"]["loss"] = list(terms_of(config.distill.loss))  # the weights are traced
    return d


def _check_runs(runs: Sequence[Run], dataset: data.Dataset, student_arch: str, teacher: Teacher | None, mesh) -> None:
    first = runs[0]
    for r in runs[1:]:
        if recipe_key(r.config) != recipe_key(first.config):
            raise ValueError(
                f"runs trained together must share the recipe apart from seed, alpha and the loss's "
                f"hyper-parameters: {r.workdir} has {recipe_key(r.config)}, {first.workdir} has "
                f"{recipe_key(first.config)}"
            )
    workdirs = [pathlib.Path(r.workdir).absolute() for r in runs]
    if len(set(workdirs)) != len(workdirs):
        raise ValueError("runs trained together need distinct work directories")
    if (teacher is None) != (first.config.distill is None):
        raise ValueError("a distillation config needs a teacher, and supervised training none")
    if teacher is not None and teacher.members:
        feature_terms = [t for t in first.config.distill.terms if losses.get(t).reads == "features"]
        if feature_terms:
            raise ValueError(f"--loss term {feature_terms[0]} reads feature taps, which one teacher has: give one "
                             f"--teacher_file, or logit terms only with {len(teacher.members)} teachers")
    sharding.check_batch_size(first.config.batch_size, mesh)
    if not dataset["train"].augmented:
        raise ValueError("the dataset was loaded without training views for its 'train' split")


@dataclasses.dataclass(frozen=True)
class _Setup:
    """What every group of a call shares, placed on the devices once."""

    spec: StepSpec
    mesh: jax.sharding.Mesh
    train_split: Any
    val_images: jax.Array
    val_labels: jax.Array
    teacher_vars: Any
    t_val: losses.Outputs | None
    student_arch: str
    dataset: data.Dataset
    scan: bool
    cache: teacher_cache.TeacherCache | None = None


def _setup(spec: StepSpec, config: TrainConfig, dataset: data.Dataset, student_arch: str,
           teacher: Teacher | None, mesh, scan: bool) -> _Setup:
    repl = sharding.replicated(mesh)
    # Host data that every process holds alike, copied by each process onto its own devices;
    # a streamed dataset stays on the host, read batch by batch (kdjax.data.stream)
    val_images = distributed.put_replicated(dataset["val"].eval.images, repl) if dataset.in_memory else dataset["val"]
    teacher_vars = None if teacher is None else distributed.put_replicated(teacher.variables, repl)
    t_val = None
    if teacher is not None:  # frozen teacher, fixed val views: once for every run of the call
        # awaited: a multi-device program still in flight when orbax's threads move arrays can
        # leave XLA:CPU's collectives waiting for a device forever (seen on 4 simulated devices)
        t_val = jax.block_until_ready(
            teacher_eval_outputs(spec, teacher_vars, val_images, config.batch_size, mesh))
    return _Setup(
        spec=spec, mesh=mesh,
        train_split=distributed.put_replicated(dataset["train"].train, repl) if dataset.in_memory else dataset["train"],
        val_images=val_images,
        val_labels=distributed.put_replicated(dataset["val"].labels, repl),
        teacher_vars=teacher_vars, t_val=t_val, student_arch=student_arch, dataset=dataset,
        scan=scan and dataset.in_memory,
    )


def _stack(trees: Sequence[Any]) -> Any:
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _unstack(tree: Any, k: int) -> Any:
    return jax.tree.map(lambda a: a[k], tree)


def backbone_key(student_arch: str, variables: Mapping) -> str:
    """A digest of everything but the head: runs with equal keys (and seeds) share a backbone."""
    return checkpoint.fingerprint(distributed.to_host(models.without_head(student_arch, variables)))


def layout_for(runs: Sequence[Run], states: Sequence[TrainState], student_arch: str,
               shared: bool) -> tuple[list[int], Layout]:
    """The distinct seeds and the sharing ``Layout`` of ``runs`` (each its own backbone group
    unless ``shared``)."""
    seeds = sorted({r.config.seed for r in runs})
    run_seed = [seeds.index(r.config.seed) for r in runs]
    keys = [
        (r.config.seed, backbone_key(student_arch, {"params": st.params, "batch_stats": st.batch_stats})
         if shared else k)
        for k, (r, st) in enumerate(zip(runs, states))
    ]
    groups = list(dict.fromkeys(keys))
    run_group = [groups.index(key) for key in keys]
    group_rep = [keys.index(g) for g in groups]
    group_seed = [run_seed[k] for k in group_rep]
    # seeds as uint32: the view keys' type
    return seeds, Layout(np.asarray(seeds, np.uint32), *(np.asarray(a, np.int32) for a in
                                                         (run_seed, run_group, group_seed, group_rep)))


def can_share_backbone(student_train: str, loss: str | None) -> bool:
    """Whether runs of this recipe that start from one backbone can share its forward pass: a
    frozen backbone (``fc``, ``fc_frozen_bn``) and a loss that reads logits only."""
    reads_features = loss is not None and any(losses.get(t).reads == "features" for t in terms_of(loss))
    return student_train in ("fc", "fc_frozen_bn") and not reads_features


def group_mode(spec: StepSpec, num_runs: int, share_frozen: bool) -> GroupMode:
    """``single`` for one run; ``shared`` where frozen backbones can be shared; else ``vmap``."""
    if num_runs == 1:
        return "single"
    loss = None if spec.teacher is None else spec.loss
    return "shared" if share_frozen and can_share_backbone(spec.student_train, loss) else "vmap"


def run_group_epoch(states, teacher_vars, train_split, order: np.ndarray, order_mask: np.ndarray,
                    epoch: int, hparams, layout: Layout, spec: StepSpec, mesh, mode: GroupMode,
                    scan: bool, cache: teacher_cache.TeacherCache | None = None,
                    seeds: Sequence[int] = ()) -> tuple[Any, dict[str, np.ndarray]]:
    """One epoch of a group from its host-side order ``[steps, S, B]``: one scanned program
    (``scan``) or a host loop over jitted steps; both keep the data on the device. Returns the
    states and per-step metrics ``[steps, K]`` on the host.

    With ``cache``, an epoch whose teacher logits are stored for every one of ``seeds`` reads
    them instead of running the teacher; otherwise the teacher's logits are written there.

    ``train_split`` is the device-resident ``TrainArrays`` or a streamed ``data.Split``, whose
    rows each process reads ahead on the host (``kdjax.data.stream``; host loop only)."""
    streamed = isinstance(train_split, data.Split)
    if streamed and scan:
        raise ValueError("a streamed split trains in a host loop of steps: scan=False")
    epoch_ = jnp.int32(epoch)
    t_given, emit = None, False
    if cache is not None:
        stored = [cache.load(s, epoch) for s in seeds]
        distributed.check_same(all(a is not None for a in stored),
                               f"--teacher_cache {cache.directory.parent}: the processes found different entries; "
                               "it must be one directory that every process sees")
        if all(a is not None for a in stored):
            t_given = teacher_cache.gather(stored, order)  # [steps, S, ..., B, C]
        else:
            emit = True
    t_axis = None if t_given is None else t_given.ndim - 2  # the batch axis of [steps, S, ..., B, C]
    # every process holds the whole epoch order but feeds only its own rows of each batch
    if scan:
        t = None if t_given is None else distributed.put_batch(t_given, sharding.batch_sharding_at(mesh, t_axis))
        states, metrics = _group_epoch_jit(
            states, teacher_vars, train_split,
            *distributed.put_batch((order, order_mask), sharding.batch_sharding_at(mesh, 2)),
            epoch_, hparams, layout, spec=spec, mesh=mesh, mode=mode, t_given=t, emit_teacher=emit)
        metrics = distributed.to_host(metrics)
    else:
        steps = []
        at_1 = sharding.batch_sharding_at(mesh, 1)
        feed = stream.train_steps(train_split, order, at_1) if streamed else None
        for i, (indices, mask) in enumerate(zip(order, order_mask)):
            t = None if t_given is None else distributed.put_batch(
                t_given[i], sharding.batch_sharding_at(mesh, t_axis - 1))
            rows = None if feed is None else stream.put_rows(next(feed), at_1, order.shape[2])
            states, m = _group_step_jit(
                states, teacher_vars, None if streamed else train_split,
                *distributed.put_batch((indices, mask), at_1),
                epoch_, hparams, layout, spec=spec, mesh=mesh, mode=mode, t_given=t, emit_teacher=emit, rows=rows)
            steps.append(m)
        steps = distributed.to_host(steps)
        metrics = {k: np.stack([m[k] for m in steps]) for k in steps[0]}
    if emit:
        logits = metrics.pop(TEACHER_LOGITS)
        if distributed.is_primary():
            num_examples = int(order_mask.sum() / order_mask.shape[1])
            for seed, arr in zip(seeds, teacher_cache.scatter(logits, order, order_mask, num_examples)):
                cache.save(seed, epoch, arr)
    return states, metrics


def group_val_outputs(spec: StepSpec, states, val_images, layout: Layout, batch_size: int, mesh,
                      mode: GroupMode) -> losses.Outputs:
    """Every run's student outputs ``[K, N, ...]`` on the validation views."""
    s_vars = {"params": states.params, "batch_stats": states.batch_stats}
    return map_eval_batches(
        lambda b: _group_eval_outputs_jit(spec, s_vars, b, layout, mesh=mesh, mode=mode),
        val_images, batch_size, example_axis=1, mesh=mesh)


def _train_group(setup: _Setup, members: Sequence[tuple[int, Run, RunStore, Any]], start: int,
                 share_frozen: bool, on_epoch) -> None:
    """Epochs ``start..num_epochs`` of runs that all stand at ``start``, trained as one group."""
    runs = [r for _, r, _, _ in members]
    stores = [s for _, _, s, _ in members]
    config, spec, mesh = runs[0].config, setup.spec, setup.mesh
    repl = sharding.replicated(mesh)
    mode = group_mode(spec, len(runs), share_frozen)
    seeds, layout = layout_for(runs, [st for _, _, _, st in members], setup.student_arch, mode == "shared")
    layout = distributed.put_replicated(layout, repl)
    hparams = distributed.put_replicated(_stack([hparams_for(r.config) for r in runs]), repl)
    states = jax.device_put(_stack([st for _, _, _, st in members]), repl)
    k_runs, spe = len(runs), spec.steps_per_epoch
    num_train = setup.dataset["train"].num_examples
    desc = "epochs" if mode == "single" else f"epochs ({k_runs} runs together" + (
        f", {int(layout.group_rep.shape[0])} backbones)" if mode == "shared" else ")")
    bar = console.bar(range(start, config.num_epochs), desc=desc, unit="epoch", initial=start,
                      total=config.num_epochs, leave=False)
    for epoch in bar:
        t0 = time.perf_counter()
        orders = [data.epoch_order(num_train, config.batch_size, s, epoch, shuffle=True) for s in seeds]
        order = np.stack([o for o, _ in orders], axis=1)  # [steps, S, B]
        order_mask = np.stack([m for _, m in orders], axis=1)
        states, step_metrics = run_group_epoch(
            states, setup.teacher_vars, setup.train_split, order, order_mask, epoch, hparams, layout,
            spec, mesh, mode, setup.scan, setup.cache, seeds)
        # every run's figures first: a non-finite loss in any run saves nothing of this epoch
        train_figures = [
            summarize_steps({k: v[:, i] for k, v in step_metrics.items()}, epoch, store.workdir)
            for i, store in enumerate(stores)
        ]
        s_val = group_val_outputs(spec, states, setup.val_images, layout, config.batch_size, mesh, mode)
        s_vars = {"params": states.params, "batch_stats": states.batch_stats}
        eval_hparams = {**hparams, "epoch": distributed.put_replicated(np.full((k_runs,), epoch + 1, np.float32),
                                                                        repl)}
        val = distributed.to_host(_group_eval_metrics_jit(s_val, setup.t_val, setup.val_labels, eval_hparams,
                                                          spec=spec, mode=mode, aux=states.aux))
        seconds = (time.perf_counter() - t0) / k_runs
        for i, (index, run, store, _) in enumerate(members):
            record = epoch_record(run.config, spe, epoch, train_figures[i],
                                  {key: v[i] for key, v in val.items()}, seconds)
            if k_runs > 1:
                record["runs_together"] = k_runs
            saver = best_model_saver(_unstack(s_vars, i), setup, run)
            store.end_epoch(epoch, _unstack(states, i), record, saver)
            if on_epoch is not None:
                on_epoch(index, record)
    bar.close()


def best_model_saver(variables, setup: _Setup, run: Run) -> Callable[[pathlib.Path, dict], None]:
    """``RunStore.end_epoch``'s ``save_best`` for the student ``variables`` (fetched lazily).
    Every process calls it (the fetch may gather across processes); process 0 writes."""

    def save(directory: pathlib.Path, epoch_provenance: dict) -> None:
        host = distributed.to_host(variables)
        if not distributed.is_primary():
            return
        checkpoint.save_model(
            directory, host, arch=setup.student_arch, class_names=setup.dataset.class_names,
            image_size=run.config.image_size,
            provenance={**dict(run.provenance or {}), **epoch_provenance},
        )

    return save


def cache_for(directory, spec: StepSpec, config: TrainConfig, dataset: data.Dataset, teacher: Teacher,
              mesh) -> teacher_cache.TeacherCache:
    """The teacher cache of this call's runs: keyed by what makes the teacher's logits for a view
    (see ``kdjax.teacher_cache``); a loss reading the teacher's features cannot use it."""
    if spec.teacher_taps:
        raise ValueError(f"--teacher_cache holds the teacher's logits; --loss {config.distill.loss} reads its "
                         f"feature taps {spec.teacher_taps}, so the teacher must run: leave --teacher_cache out")
    return teacher_cache.TeacherCache(directory, {
        "teacher_fingerprint": teacher.fingerprint,
        "teacher_archs": list(teacher.archs),
        "data_fingerprint": dataset.fingerprint,
        "image_size": config.image_size,
        "compute_dtype": config.compute_dtype,
        "batch_size": config.batch_size,
        "devices": int(mesh.devices.size),
        "processes": jax.process_count(),
    })


def default_scan_epochs() -> bool:
    """Scanned epochs on accelerators; a host loop of jitted steps on CPU, where it runs as fast
    (benchmarks/README.md) and compiles a smaller program."""
    return jax.default_backend() != "cpu"


def train_runs(
    runs: Sequence[Run],
    dataset: data.Dataset,
    *,
    student_arch: str = "resnet18",
    teacher: Teacher | None = None,
    mesh: jax.sharding.Mesh | None = None,
    on_epoch: Callable[[int, dict], None] | None = None,
    scan_epochs: bool | None = None,
    vectorize: bool = True,
    share_frozen: bool = True,
    teacher_cache_dir: str | pathlib.Path | None = None,
) -> list[RunResult]:
    """Train ``runs`` (one recipe; seeds, alphas and loss hyper-parameters may differ) and return
    their results in order, resuming whatever their directories hold.

    ``vectorize`` trains runs that stand at the same epoch together as one group (see the module
    docstring); otherwise one after another. ``on_epoch(k, record)`` is called for run k after
    each epoch. ``share_frozen=False`` keeps one backbone pass per run even where a frozen
    backbone could be shared. ``teacher_cache_dir`` stores the teacher's logits on the training
    views there on first use and reads them afterwards (``kdjax.teacher_cache``). A non-finite
    loss stops with ``NonFiniteLossError`` before the
    epoch is saved, so the last good checkpoint stays intact.
    """
    if not runs:
        return []
    mesh = mesh or sharding.data_mesh()
    if scan_epochs and not dataset.in_memory:
        raise ValueError("--scan_epochs on scans epochs over data held on the devices, but the dataset is streamed: "
                         "pass --data_in_memory on, or --scan_epochs auto (a streamed run trains in a host loop)")
    _check_runs(runs, dataset, student_arch, teacher, mesh)
    first = runs[0].config
    scan = default_scan_epochs() if scan_epochs is None else scan_epochs
    spec = step_spec_for(first, dataset, student_arch, teacher)
    repl = sharding.replicated(mesh)
    num_train = dataset["train"].num_examples
    stores, states = [], []
    labels = run_labels([r.workdir for r in runs])
    try:
        for r, label in zip(runs, labels):
            store = RunStore(r.workdir, run_meta_for(r, student_arch, teacher, dataset), label=label)
            stores.append(store)
            # Fresh state from host copies: device_put may alias, and the step donates its state.
            host = jax.tree_util.tree_map(np.asarray, dict(r.student_variables))
            state = distributed.put_replicated(create_train_state(host, spec, init_aux(spec, r.config.seed)), repl)
            abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=repl), state)
            restored = store.restore(abstract)
            states.append(state if restored is None else restored)
            if num_train % first.batch_size == 1 and first.batch_size > 1 and store.start_epoch < first.num_epochs:
                store.log(SINGLE_EXAMPLE_NOTE.format(num_train=num_train, batch_size=first.batch_size))

        pending = [k for k, s in enumerate(stores) if s.start_epoch < first.num_epochs]
        if vectorize:
            by_start: dict[int, list[int]] = {}
            for k in pending:
                by_start.setdefault(stores[k].start_epoch, []).append(k)
            groups = [by_start[s] for s in sorted(by_start)]
        else:
            groups = [[k] for k in pending]
        setup = _setup(spec, first, dataset, student_arch, teacher, mesh, scan) if groups else None
        if setup is not None and teacher_cache_dir is not None:
            setup = dataclasses.replace(setup, cache=cache_for(teacher_cache_dir, spec, first, dataset, teacher, mesh))
        bar = None
        if len(groups) > 1 and not vectorize:
            bar = console.bar(total=len(groups), desc="runs", unit="run")
        for members in groups:
            if bar is not None:
                bar.set_postfix_str(runs[members[0]].workdir.name)
            group = [(k, runs[k], stores[k], states[k]) for k in members]
            _train_group(setup, group, stores[members[0]].start_epoch, share_frozen, on_epoch)
            if bar is not None:
                bar.update()
        if bar is not None:
            bar.close()
    finally:
        for store in stores:
            store.close()
    results = [store.result() for store in stores]
    if dataset.test is not None:
        results = score_selected(results, dataset, spec, first.batch_size, mesh)
    return results


TEST_FILE = "test.json"


def score_selected(results: Sequence[RunResult], dataset: data.Dataset, spec: StepSpec, batch_size: int,
                   mesh) -> list[RunResult]:
    """Each run's selected model (``best/``: its best epoch on val) scored once on the held-out
    test split, written to the run's ``test.json`` and returned in ``RunResult.test``. Selection
    never sees test, so its accuracy is not biased by choosing the epoch on it."""
    test = dataset.test
    images = distributed.put_replicated(test.eval.images, sharding.replicated(mesh)) if dataset.in_memory else test
    labels = test.labels
    scored = []
    for result, label in zip(results, run_labels([r.workdir for r in results])):
        _, variables, meta = checkpoint.load_model(result.workdir / "best", arch=spec.student_arch,
                                                   sharding=sharding.replicated(mesh))
        logits = distributed.to_host(all_outputs(spec.student, variables, images, batch_size, mesh=mesh,
                                                 view=spec.student_view).logits)
        correct = int(np.sum(np.argmax(logits, -1) == labels))
        record = {"split": "test", "num_test": int(labels.size), "acc": correct / labels.size,
                  "correct": correct, "selected_epoch": int(meta.provenance["epoch"]),
                  "selected_val_acc": float(meta.provenance["val_acc"])}
        if distributed.is_primary():
            checkpoint.write_text_atomic(result.workdir / TEST_FILE, json.dumps(record, indent=1) + "\n")
            _log(label, result.workdir, f"test: {record['acc']:.4f} ({correct}/{labels.size}) with the "
                 f"epoch-{record['selected_epoch']} model selected on val")
        scored.append(dataclasses.replace(result, test=record))
    return scored


SINGLE_EXAMPLE_NOTE = (
    "note: {num_train} training examples at batch size {batch_size} leave one example in the "
    "last batch of every epoch. It trains like any other batch; a BatchNorm layer that sees one "
    "value per channel in it (e.g. 1x1 maps) normalises it with its own statistics, updates its "
    "running mean and keeps its running variance (kdjax.models.resnet.BatchNorm)"
)


def train_and_evaluate(
    config: TrainConfig,
    workdir: str | pathlib.Path,
    dataset: data.Dataset,
    student_variables: Mapping,
    *,
    student_arch: str = "resnet18",
    teacher: Teacher | None = None,
    provenance: Mapping | None = None,
    mesh: jax.sharding.Mesh | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    scan_epochs: bool | None = None,
) -> RunResult:
    """One run for ``config.num_epochs`` epochs: ``train_runs`` of a single ``Run``.

    Writes ``workdir/checkpoints/<epoch>`` (orbax: train state + run metadata, every epoch,
    atomically), ``workdir/best`` (the best-val student as a model directory) and
    ``workdir/metrics.json``.
    """
    run = Run(config, pathlib.Path(workdir), student_variables, provenance)
    callback = None if on_epoch is None else (lambda k, record: on_epoch(record))
    return train_runs([run], dataset, student_arch=student_arch, teacher=teacher, mesh=mesh,
                      on_epoch=callback, scan_epochs=scan_epochs)[0]


def _epoch_line(r: dict, num_epochs: int) -> str:
    v, t = r["val"], r["train"]
    line = (
        f"epoch {r['epoch']:>3}/{num_epochs}  lr {r['lr']:.2e}  train loss {t['loss']:.4f} "
        f"acc {t['acc']:.4f}  val loss {v['loss']:.4f} acc {v['acc']:.4f}"
    )
    if "teacher_acc" in v:
        line += f"  teacher {v['teacher_acc']:.4f}  diff_t_s {v['diff_t_s']:.4f}"
    return line + f"  ({r['seconds']:.1f} s)"
