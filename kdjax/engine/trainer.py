"""The trainer: built once per call of the engine, it holds the step's spec, the mesh and its
shardings, the data and the teacher placed on the devices, and the compiled step, epoch and eval
programs. The loop hands it a group and an epoch; everything that crosses the host boundary
(placing data, feeding a stream, fetching results) goes through its few methods.

Shardings are the ones of ``kdjax.sharding``, declared once here: a ``('data',)`` mesh, batches
split over it along their batch axis, states, data and teacher replicated. The step's programs
are module-level ``jax.jit``s with the static part (``GroupProgram``) as a static argument, so
every trainer of a process with an equal program reuses one compilation; states are donated,
the teacher never is.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import numpy as np

from kdjax import data, distributed, losses, sharding, teacher_cache
from kdjax.data import stream
from kdjax.engine import evaluation
from kdjax.engine.groups import (
    TEACHER_LOGITS,
    GroupContext,
    GroupProgram,
    Layout,
    StepData,
    group_epoch,
    group_mode,
    group_step,
    layout_for,
)
from kdjax.engine.step import StepSpec, TrainState, create_train_state, hparams_for, init_aux

_group_step_jit = jax.jit(group_step, static_argnames="program", donate_argnums=0)
# a tree's leaves stacked, or one run's slice taken, as one program each (leaf by leaf, a state
# of a few hundred arrays is as many dispatches)
_stack = jax.jit(lambda *trees: jax.tree.map(lambda *xs: jax.numpy.stack(xs), *trees))
_run_slice = jax.jit(lambda tree, k: jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, k, keepdims=False), tree))
_group_epoch_jit = jax.jit(group_epoch, static_argnames="program", donate_argnums=0)


@dataclasses.dataclass(frozen=True)
class Group:
    """Runs trained together: their compiled program, distinct seeds and the placed layout and
    hyper-parameters ``[K]``."""

    program: GroupProgram
    seeds: tuple  # each view group's seed, or (seed, mixup_alpha, cutmix_alpha) with mixing
    layout: Layout
    hparams: dict
    size: int

    def context(self, epoch: int) -> GroupContext:
        return GroupContext(np.int32(epoch), self.hparams, self.layout)


def _seed(view) -> int:
    """A view group's seed (its key is the seed, or (seed, mixup_alpha, cutmix_alpha))."""
    return view[0] if isinstance(view, tuple) else view


def _view_tag(view) -> str:
    """What tells a view group's teacher-cache entries apart beside its seed: its mixing alphas."""
    return f"_mix{view[1]:g}_cut{view[2]:g}" if isinstance(view, tuple) else ""


class Trainer:
    """The compiled programs and placed data of one engine call over ``dataset``.

    ``teacher`` (a ``kdjax.engine.teachers.Teacher`` or None) and the data are placed on the
    devices by ``place`` (the loop calls it before the first epoch, so no epoch's time holds
    it; a call whose runs have all finished places nothing).
    ``scan`` runs an epoch as one scanned program (resident data only); ``cache`` is a
    ``kdjax.teacher_cache.TeacherCache`` that replaces the teacher's pass where it holds an
    epoch's logits.
    """

    def __init__(self, spec: StepSpec, dataset: data.Dataset, teacher, mesh: jax.sharding.Mesh, batch_size: int,
                 scan: bool, cache: teacher_cache.TeacherCache | None = None):
        self.spec, self.dataset, self.teacher, self.mesh = spec, dataset, teacher, mesh
        self.batch_size = batch_size
        self.scan = scan and dataset.in_memory
        self.cache = cache
        self.replicated = sharding.replicated(mesh)
        self._placed: dict[str, Any] | None = None

    # ------------------------------------------------------------------ the host boundary

    def replicate(self, tree):
        """Host data that every process holds alike, copied by each onto its own devices."""
        return distributed.put_replicated(tree, self.replicated)

    def put_batch(self, tree, batch_axis: int):
        """A global batch (each process feeds its own rows) split over ``'data'`` at ``batch_axis``."""
        return distributed.put_batch(tree, sharding.batch_sharding_at(self.mesh, batch_axis))

    @staticmethod
    def fetch(tree):
        return distributed.to_host(tree)

    @property
    def placed(self) -> dict[str, Any]:
        """What ``place`` put on the devices (placed now if it was not yet)."""
        if self._placed is None:
            self.place()
        return self._placed

    def place(self) -> None:
        """The data and the teacher on the devices, and the teacher's outputs on the validation
        views (fixed views of a frozen teacher: once for every run of the call). A streamed
        dataset stays on the host, read batch by batch (``kdjax.data.stream``)."""
        ds = self.dataset
        placed = {
            "train": self.replicate(ds["train"].train) if ds.in_memory else ds["train"],
            "val_images": self.replicate(ds["val"].eval.images) if ds.in_memory else ds["val"],
            "val_labels": self.replicate(ds["val"].labels),
            "teacher": None if self.teacher is None else self.replicate(self.teacher.variables),
            "t_val": None,
        }
        if self.teacher is not None:
            store = teacher_cache.val_outputs_store(self._val_key()) if self._val_cacheable() else None
            stored = None if store is None else store.load_outputs()
            if stored is not None:
                placed["t_val"] = losses.Outputs(self.replicate(stored))
            else:
                # awaited: a multi-device program still in flight when orbax's threads move arrays can
                # leave XLA:CPU's collectives waiting for a device forever (seen on 4 simulated devices)
                placed["t_val"] = jax.block_until_ready(evaluation.teacher_eval_outputs(
                    self.spec, placed["teacher"], placed["val_images"], self.batch_size, self.mesh))
                if store is not None:
                    store.save_outputs(self.fetch(placed["t_val"].logits))
        self._placed = placed

    def _val_cacheable(self) -> bool:
        """Whether the teacher's validation logits are kept on disk: one process, logits only (a
        feature loss reads the teacher's taps too), small enough (``teacher_cache.VAL_MAX_BYTES``)."""
        n, classes = self.dataset["val"].num_examples, len(self.dataset.class_names)
        members = max(1, len(self.teacher.members))
        return (jax.process_count() == 1 and not self.spec.teacher_taps
                and n * classes * members * 4 <= teacher_cache.VAL_MAX_BYTES)

    def _val_key(self) -> dict:
        """What the teacher's logits on the validation views depend on (all of it: a hit is the
        same arrays, bit for bit)."""
        spec = self.spec
        return {"teacher_fingerprint": self.teacher.fingerprint, "data_fingerprint": self.dataset.fingerprint,
                "teacher": repr(spec.teacher), "teacher_view": repr(spec.teacher_view),
                "teacher_groups": repr(spec.teacher_groups), "image_size": spec.image_size,
                "batch_size": self.batch_size, "devices": int(self.mesh.devices.size),
                "backend": jax.default_backend(), "jax": jax.__version__}

    # ------------------------------------------------------------------ states and groups

    def initial_state(self, variables, seed: int) -> TrainState:
        """A fresh train state of the student ``variables`` (and the adapters of a run of
        ``seed``), replicated; built from host copies, since the step donates its state."""
        host = jax.tree_util.tree_map(np.asarray, dict(variables))
        return self.replicate(create_train_state(host, self.spec, init_aux(self.spec, seed)))

    def abstract(self, state: TrainState):
        """``state``'s shapes, dtypes and placement: what a checkpoint restores onto."""
        return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=self.replicated),
                                      state)

    def group(self, configs: Sequence, states: Sequence[TrainState], share_frozen: bool) -> tuple[Group, TrainState]:
        """The group of runs of ``configs`` standing at ``states``, and their states stacked."""
        mode = group_mode(self.spec, len(configs), share_frozen)
        view_keys = [(c.seed, c.augment.mixup_alpha, c.augment.cutmix_alpha) if self.spec.views.mixing else c.seed
                     for c in configs]
        seeds, layout = layout_for(view_keys, states, self.spec.student_arch, mode == "shared")
        hparams = self.replicate(jax.tree.map(lambda *xs: np.stack(xs), *[hparams_for(c) for c in configs]))
        group = Group(GroupProgram(self.spec, mode, self.mesh), tuple(seeds), self.replicate(layout), hparams,
                      len(configs))
        stacked = jax.device_put(_stack(*states), self.replicated)
        return group, stacked

    # ------------------------------------------------------------------ an epoch

    def _teacher_logits(self, group: Group, epoch: int, order: np.ndarray) -> np.ndarray | None:
        """The cached teacher logits ``[steps, S, ..., B, C]`` of this epoch for every seed of
        ``group``, or None (the teacher runs, and fills the cache when there is one)."""
        if self.cache is None:
            return None
        stored = [self.cache.load(_seed(v), epoch, _view_tag(v)) for v in group.seeds]
        distributed.check_same(all(a is not None for a in stored),
                               f"--teacher_cache {self.cache.directory.parent}: the processes found different "
                               "entries; it must be one directory that every process sees")
        return teacher_cache.gather(stored, order) if all(a is not None for a in stored) else None

    def epoch_order(self, group: Group, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Epoch ``epoch``'s example indices ``[steps, S, B]`` for every seed of ``group`` and
        their mask (``kdjax.data.epoch_order``: from ``(seed, epoch)`` alone)."""
        num_train = self.dataset["train"].num_examples
        orders = [data.epoch_order(num_train, self.batch_size, _seed(v), epoch, shuffle=True) for v in group.seeds]
        return np.stack([o for o, _ in orders], axis=1), np.stack([m for _, m in orders], axis=1)

    def train_epoch(self, group: Group, states: TrainState, epoch: int) -> tuple[TrainState, dict[str, np.ndarray]]:
        """Epoch ``epoch`` (0-based) of ``group``: the states after it and per-step metrics
        ``[steps, K]`` on the host. With a teacher cache, an epoch whose logits it holds for
        every seed reads them instead of running the teacher; otherwise they are written there."""
        order, order_mask = self.epoch_order(group, epoch)
        t_given = self._teacher_logits(group, epoch, order)
        emit = self.cache is not None and t_given is None
        states, metrics = self.run_steps(group, states, epoch, (order, order_mask, t_given), emit)
        if emit:
            logits = metrics.pop(TEACHER_LOGITS)
            if distributed.is_primary():
                num_train = self.dataset["train"].num_examples
                for view, arr in zip(group.seeds, teacher_cache.scatter(logits, order, order_mask, num_train)):
                    self.cache.save(_seed(view), epoch, arr, _view_tag(view))
        return states, metrics

    def run_steps(self, group: Group, states: TrainState, epoch: int, steps: tuple, emit: bool = False):
        """The steps ``(order, order_mask, t_given)`` (``[steps, S, B]``, ``t_given`` None or
        ``[steps, S, ..., B, C]``) of epoch ``epoch``: one scanned program (``scan``) or a host
        loop over jitted steps; both keep the data on the device. Every process holds the whole
        order but feeds only its own rows of each batch. Returns the states and the per-step
        metrics ``[steps, K]`` on the host."""
        order, order_mask, t_given = steps
        program = dataclasses.replace(group.program, emit_teacher=emit)
        t_axis = None if t_given is None else t_given.ndim - 2  # the batch axis of [steps, S, ..., B, C]
        context, split = group.context(epoch), self.placed["train"]
        teacher_vars = self.placed["teacher"]
        if self.scan:
            data_ = StepData(*self.put_batch((order, order_mask), 2),
                             None if t_given is None else self.put_batch(t_given, t_axis))
            states, metrics = _group_epoch_jit(states, teacher_vars, split, data_, context, program=program)
            return states, self.fetch(metrics)
        streamed = isinstance(split, data.Split)
        at_1 = sharding.batch_sharding_at(self.mesh, 1)
        feed = stream.train_steps(split, order, at_1) if streamed else None
        out = []
        for i, (indices, mask) in enumerate(zip(order, order_mask)):
            data_ = StepData(*self.put_batch((indices, mask), 1),
                             None if t_given is None else self.put_batch(t_given[i], t_axis - 1),
                             None if feed is None else stream.put_rows(next(feed), at_1, order.shape[2]))
            states, m = _group_step_jit(states, teacher_vars, None if streamed else split, data_, context,
                                        program=program)
            out.append(m)
        out = self.fetch(out)
        return states, {k: np.stack([m[k] for m in out]) for k in out[0]}

    def validate(self, group: Group, states: TrainState, epoch: int, ema: bool = False) -> dict[str, np.ndarray]:
        """Every run's validation figures ``[K]`` after epoch ``epoch`` (0-based), on the host; with
        ``ema``, of the students' exponential moving averages."""
        spec, mode, placed = self.spec, group.program.mode, self.placed
        if ema:
            states = states.replace(params=states.ema["params"], batch_stats=states.ema["batch_stats"])
        s_val = evaluation.group_val_outputs(spec, states, placed["val_images"], group.layout, self.batch_size,
                                             self.mesh, mode)
        eval_hparams = {**group.hparams, "epoch": self.replicate(np.full((group.size,), epoch + 1, np.float32))}
        return self.fetch(evaluation.group_eval_metrics_jit(s_val, placed["t_val"], placed["val_labels"],
                                                            eval_hparams, spec=spec, mode=mode, aux=states.aux))

    @staticmethod
    def run_of(tree, k: int):
        """Run ``k``'s slice of a group's stacked ``tree``."""
        return _run_slice(tree, np.int32(k))
