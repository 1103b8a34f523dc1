"""Run groups: the optimiser step of several runs at once, over a leading run axis ``[K]``.

How a group's step treats that axis is one static choice (``GroupMode``):

- ``single``: one run, the plain step (the axis squeezed inside the program);
- ``vmap``: K runs of one recipe at once, differing only in traced values (seed, alpha, the
  loss's hyper-parameters). Runs that share a seed share its augmented batch and the teacher's
  pass on it: 3 alphas x 4 seeds need 4 teacher passes per step, not 12;
- ``shared``: ``vmap`` for frozen backbones (``fc``/``fc_frozen_bn``): runs that start from the
  same backbone on the same batches keep identical backbones and BatchNorm statistics, so the
  backbone runs once per group of them and only the heads are vectorised.

``Layout`` says who shares what (traced index arrays); ``GroupProgram`` is the static part of a
group's compiled programs (step spec, mode, mesh, whether the teacher's logits are emitted).
A step's inputs besides the states are two small pytrees: ``StepData`` (this step's examples,
and the teacher's logits or the streamed rows where given) and ``GroupContext`` (the epoch, the
runs' traced hyper-parameters and the layout).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kdjax import checkpoint, data, distributed, losses, models, sharding
from kdjax.data.views import MixAlphas, ViewKey, train_views
from kdjax.engine.step import (
    StepSpec,
    TrainState,
    dropout_key,
    student_forward,
    student_step,
    teacher_outputs,
    terms_of,
)

GroupMode = Literal["single", "vmap", "shared"]

# the metrics key of the teacher's logits a group step emits for a teacher cache
TEACHER_LOGITS = "teacher_logits"


class Layout(NamedTuple):
    """Who shares what in a group (int32 index arrays, traced): ``seeds[S]`` the distinct seeds;
    ``run_seed[K]`` run -> its seed's batch; ``run_group[K]`` run -> its backbone group;
    ``group_seed[G]`` group -> seed; ``group_rep[G]`` group -> a member run holding its backbone."""

    seeds: jax.Array
    run_seed: jax.Array
    run_group: jax.Array
    group_seed: jax.Array
    group_rep: jax.Array
    # each view group's mixing alphas [S, 2] (mixup, cutmix): runs of one seed but other alphas
    # see other views; None without mixing
    alphas: jax.Array | None = None

    @classmethod
    def single(cls, seed: int) -> "Layout":
        """The layout of one run."""
        zero = np.zeros((1,), np.int32)
        return cls(np.asarray([seed], np.uint32), zero, zero, zero, zero)


@dataclasses.dataclass(frozen=True)
class GroupProgram:
    """The static part of a group's programs: hashable, so equal programs share compilations.
    With ``mesh`` the batch axes are constrained to ``'data'``; ``emit_teacher`` adds the
    teacher's logits to a step's metrics as ``TEACHER_LOGITS`` (to fill a teacher cache)."""

    spec: StepSpec
    mode: GroupMode = "vmap"
    mesh: jax.sharding.Mesh | None = None
    emit_teacher: bool = False


class StepData(NamedTuple):
    """One step's inputs (a leading ``[steps]`` axis in a scanned epoch).

    ``indices``/``mask`` ``[S, B]``: one batch per distinct seed, examples whose views are drawn
    on the device from ``(seed, epoch, index)``. ``t_given``: the teacher's logits on those views
    ``[S, ..., B, C]`` (read from a teacher cache), so the teacher does not run. ``rows``: the
    examples' stored images ``[S, B, ...]`` read on the host (a streamed split), else they are
    gathered from the resident split."""

    indices: jax.Array
    mask: jax.Array
    t_given: jax.Array | None = None
    rows: data.TrainArrays | None = None


class GroupContext(NamedTuple):
    """What every step of a group's epoch shares: the epoch (0-based), the runs' traced
    hyper-parameters ``[K]`` and the ``Layout``."""

    epoch: jax.Array
    hparams: dict
    layout: Layout


def take(tree, index):
    return jax.tree.map(lambda a: jnp.take(a, index, axis=0), tree)


def squeeze(tree):
    return jax.tree.map(lambda a: a[0], tree)


def expand(tree):
    return jax.tree.map(lambda a: a[None], tree)


def constrain(tree, mesh, batch_axis: int):
    """``tree``'s axis ``batch_axis`` split over the mesh's ``'data'`` axis (no mesh: as it is)."""
    if mesh is None:
        return tree
    return jax.lax.with_sharding_constraint(tree, sharding.batch_sharding_at(mesh, batch_axis))


def group_step(states: TrainState, teacher_vars, train_split: data.TrainArrays | None, step: StepData,
               context: GroupContext, program: GroupProgram) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimiser step of every run of a group: ``states`` and ``context.hparams`` carry a
    leading run axis ``[K]``; returns the new states and per-run metrics ``[K]``.

    ``train_split`` is the device-resident split the step's rows are gathered from (None when
    ``step.rows`` holds them)."""
    spec, mesh, layout = program.spec, program.mesh, context.layout
    rows = step.rows
    if rows is None:
        rows = jax.vmap(lambda i: data.take_rows(train_split, i))(step.indices)

    alphas = jnp.zeros((layout.seeds.shape[0], 2), jnp.float32) if layout.alphas is None else layout.alphas

    def views(r, i, m, s, a):
        key = ViewKey(s, context.epoch, MixAlphas(a[0], a[1]))
        return train_views(r, i, m, key, spec.image_size, spec.views)

    if program.mode == "single":
        batch = constrain(views(take(rows, 0), step.indices[0], step.mask[0], layout.seeds[0], alphas[0]), mesh, 0)
        t = (teacher_outputs(spec, teacher_vars, batch.images) if step.t_given is None
             else losses.Outputs(step.t_given[0]))
        state, metrics = student_step(squeeze(states), batch, t, squeeze(context.hparams), spec, seed=layout.seeds[0])
        state, metrics = expand(state), expand(metrics)
        return state, ({**metrics, TEACHER_LOGITS: t.logits[None]} if program.emit_teacher else metrics)
    batches = constrain(jax.vmap(views)(rows, step.indices, step.mask, layout.seeds, alphas), mesh, 1)
    if step.t_given is None:
        t_out = jax.vmap(lambda x: teacher_outputs(spec, teacher_vars, x))(batches.images)
    else:
        t_out = None if spec.teacher is None else losses.Outputs(step.t_given)
    states, metrics = _student_group_step(states, batches, t_out, context, program)
    return states, ({**metrics, TEACHER_LOGITS: t_out.logits} if program.emit_teacher else metrics)


def _student_group_step(states, batches, t_out, context: GroupContext, program: GroupProgram):
    """The students' steps of a group (``vmap`` or ``shared``) on the seeds' ``batches``."""
    spec, layout, hparams = program.spec, context.layout, context.hparams
    run_batches, run_t = take((batches, t_out), layout.run_seed)
    run_seeds = jnp.take(layout.seeds, layout.run_seed)
    if program.mode == "vmap":
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
    reps = take((states.params, states.batch_stats, states.step), layout.group_rep)
    feats, group_stats = jax.vmap(features)(*reps, take(batches, layout.group_seed),
                                            jnp.take(layout.seeds, layout.group_seed))
    run_feats, run_stats = take((feats, group_stats), layout.run_group)

    def head_step(state, batch, t, h, f, new_stats):
        def forward(trainable):
            logits = arch.classify(spec.student, trainable[arch.head], f)
            return losses.Outputs(logits), new_stats
        return student_step(state, batch, t, h, spec, forward=forward)

    return jax.vmap(head_step)(states, run_batches, run_t, hparams, run_feats, run_stats)


def group_epoch(states: TrainState, teacher_vars, train_split: data.TrainArrays, steps: StepData,
                context: GroupContext, program: GroupProgram):
    """All steps of one epoch as one ``lax.scan`` of ``group_step`` over ``steps`` (each field
    with a leading ``[steps]`` axis); metrics come back ``[steps, K]``. The shape for
    accelerators; a streamed split trains in a host loop of steps instead."""

    def body(states, step):
        return group_step(states, teacher_vars, train_split, step, context, program)

    return jax.lax.scan(body, states, steps)


def backbone_key(student_arch: str, variables) -> str:
    """A digest of everything but the head: runs with equal keys (and seeds) share a backbone."""
    return checkpoint.fingerprint(distributed.to_host(models.without_head(student_arch, variables)))


def layout_for(views_of_runs: Sequence, states: Sequence[TrainState], student_arch: str,
               shared: bool) -> tuple[list, Layout]:
    """The distinct view groups and the sharing ``Layout`` of runs from ``states`` (each its own
    backbone group unless ``shared``). A run's views are keyed by its seed, or by ``(seed,
    mixup_alpha, cutmix_alpha)`` with mixing on; runs with equal keys share their batch."""
    views_of_runs = [v if isinstance(v, tuple) else (v,) for v in views_of_runs]
    seeds = sorted(set(views_of_runs))
    run_seed = [seeds.index(v) for v in views_of_runs]
    keys = [
        (view, backbone_key(student_arch, {"params": st.params, "batch_stats": st.batch_stats}) if shared else k)
        for k, (view, st) in enumerate(zip(views_of_runs, states))
    ]
    groups = list(dict.fromkeys(keys))
    run_group = [groups.index(key) for key in keys]
    group_rep = [keys.index(g) for g in groups]
    group_seed = [run_seed[k] for k in group_rep]
    # seeds as uint32: the view keys' type
    alphas = np.asarray([v[1:] for v in seeds], np.float32) if len(seeds[0]) > 1 else None
    layout = Layout(np.asarray([v[0] for v in seeds], np.uint32), *(np.asarray(a, np.int32) for a in
                                                                    (run_seed, run_group, group_seed, group_rep)),
                    alphas)
    return [v if len(v) > 1 else v[0] for v in seeds], layout


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
    separable = models.get(spec.student_arch).backbone is not None  # a user's network is not
    return "shared" if share_frozen and separable and can_share_backbone(spec.student_train, loss) else "vmap"
