"""Vectorised runs: many runs of one recipe trained together as one compiled program.

A study trains one recipe many times: ``n_exp`` seeds for each alpha. The runs differ only in
traced values: the seed (initial weights, shuffling, views) and the loss's alpha and temperature.
``train_runs`` stacks their train states on a leading run axis and takes each step for all of
them at once with ``jax.vmap``. Runs that share a seed see the same augmented batch, so the views
and the teacher's forward pass are computed once per distinct seed and shared: the paired design
of ``kdjax.protocol`` (3 alphas x 4 seeds = 12 runs) needs 4 teacher passes per step, not 12.
When the backbone is frozen (``fc`` and ``fc_frozen_bn`` modes), runs that start from the same
backbone on the same batches keep identical backbones and BatchNorm statistics forever, so the
backbone's forward pass is shared too (one per seed) and only the heads are vectorised
(``share_frozen``); in the study that makes the 3 alphas of a seed cost about one run.

Every run keeps its own work directory with exactly the files ``train.train_and_evaluate``
writes (epoch checkpoints of its own state, ``best/``, ``metrics.json``, ``train.log``), so a
vectorised study resumes, reports and predicts like an unvectorised one, either way round, and
gives the same metrics (tests/test_sweep.py). A run's ``seconds`` is its share of the shared
epoch's wall time; ``runs_together`` says how many runs shared it.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import sys
import time
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from kdjax import checkpoint, data, distributed, models, sharding, train
from kdjax.config import TrainConfig


@dataclasses.dataclass(frozen=True)
class Run:
    """One run of a sweep: its config (seed, alpha, temperature may differ between runs; the
    rest of the recipe may not), work directory, initial student variables and provenance."""

    config: TrainConfig
    workdir: pathlib.Path
    student_variables: Any
    provenance: Mapping | None = None


def recipe_key(config: TrainConfig) -> dict:
    """What runs trained together must share: the config without seed, alpha and temperature."""
    d = config.to_json()
    d.pop("seed")
    if d["distill"] is not None:
        d["distill"].pop("alpha")
        d["distill"].pop("temperature")
    return d


def sweep_step(
    states: train.TrainState,
    teacher_vars,
    train_split: data.TrainArrays,
    indices: jax.Array,
    mask: jax.Array,
    seeds: jax.Array,
    epoch: jax.Array,
    hparams: Mapping,
    run_seed: jax.Array,
    spec: train.StepSpec,
    batch_sharding: jax.sharding.Sharding | None = None,
) -> tuple[train.TrainState, dict[str, jax.Array]]:
    """One optimiser step of every run.

    ``states`` and ``hparams`` carry a leading run axis ``[K]``; ``indices``/``mask`` are one
    batch ``[S, B]`` per distinct seed ``seeds[S]``; run k trains on the batch of seed
    ``run_seed[k]``. ``batch_sharding`` lays out ``[S, B, ...]`` arrays (the batch axis over
    ``'data'``). Returns the new states and per-run metrics ``[K]``.
    """
    views = functools.partial(data.train_batch, image_size=spec.image_size)
    batches = jax.vmap(lambda i, m, s: views(train_split, i, m, s, epoch))(indices, mask, seeds)
    if batch_sharding is not None:
        batches = jax.lax.with_sharding_constraint(batches, batch_sharding)
    t_logits = jax.vmap(lambda x: train.teacher_logits(spec, teacher_vars, x))(batches.images)
    per_run = jax.tree.map(lambda a: jnp.take(a, run_seed, axis=0), (batches, t_logits))
    step = functools.partial(train.student_step, spec=spec)
    return jax.vmap(step)(states, per_run[0], per_run[1], hparams)


class Layout(NamedTuple):
    """Who shares what (int32 index arrays, traced): ``seeds[S]`` the distinct seeds;
    ``run_seed[K]`` run -> its seed's batch; ``run_group[K]`` run -> its backbone group;
    ``group_seed[G]`` group -> seed; ``group_rep[G]`` group -> a member run holding its backbone."""

    seeds: jax.Array
    run_seed: jax.Array
    run_group: jax.Array
    group_seed: jax.Array
    group_rep: jax.Array


def _take(tree, index):
    return jax.tree.map(lambda a: jnp.take(a, index, axis=0), tree)


def _backbone_spec(spec: train.StepSpec) -> train.StepSpec:
    return dataclasses.replace(spec, student=spec.student.clone(head=False))


def shared_backbone_step(
    states: train.TrainState,
    teacher_vars,
    train_split: data.TrainArrays,
    indices: jax.Array,
    mask: jax.Array,
    epoch: jax.Array,
    hparams: Mapping,
    layout: Layout,
    spec: train.StepSpec,
    batch_sharding: jax.sharding.Sharding | None = None,
) -> tuple[train.TrainState, dict[str, jax.Array]]:
    """``sweep_step`` for frozen backbones: the backbone (and its BatchNorm update) runs once per
    group of runs sharing it, then each run's head takes its own step on the shared features."""
    views = functools.partial(data.train_batch, image_size=spec.image_size)
    batches = jax.vmap(lambda i, m, s: views(train_split, i, m, s, epoch))(indices, mask, layout.seeds)
    if batch_sharding is not None:
        batches = jax.lax.with_sharding_constraint(batches, batch_sharding)
    t_logits = jax.vmap(lambda x: train.teacher_logits(spec, teacher_vars, x))(batches.images)
    backbone = _backbone_spec(spec)

    def features(params, stats, batch):
        variables = {"params": params, "batch_stats": stats}
        return train.student_forward(backbone, variables, batch.images, batch.mask.astype(jnp.float32))

    reps = _take((states.params, states.batch_stats), layout.group_rep)
    feats, group_stats = jax.vmap(features)(*reps, _take(batches, layout.group_seed))
    run_batches, run_t = _take((batches, t_logits), layout.run_seed)
    run_feats, run_stats = _take((feats, group_stats), layout.run_group)

    def head_step(state, batch, t, h, f, new_stats):
        forward = lambda trainable: (models.classify(spec.student, trainable["fc"], f), new_stats)  # noqa: E731
        return train.student_step(state, batch, t, h, spec, forward=forward)

    return jax.vmap(head_step)(states, run_batches, run_t, hparams, run_feats, run_stats)


def _any_step(states, teacher_vars, train_split, indices, mask, epoch, hparams, layout: Layout,
              spec: train.StepSpec, batch_sharding, shared: bool):
    if shared:
        return shared_backbone_step(states, teacher_vars, train_split, indices, mask, epoch, hparams,
                                    layout, spec, batch_sharding)
    return sweep_step(states, teacher_vars, train_split, indices, mask, layout.seeds, epoch, hparams,
                      layout.run_seed, spec, batch_sharding)


def sweep_epoch(states, teacher_vars, train_split, order, order_mask, epoch, hparams, layout: Layout,
                spec: train.StepSpec, batch_sharding=None, shared: bool = False):
    """An epoch of steps scanned: ``order``/``order_mask`` are ``[steps, S, B]``; metrics come
    back ``[steps, K]``. For accelerators (see ``train.train_epoch``)."""

    def body(states, xs):
        return _any_step(states, teacher_vars, train_split, xs[0], xs[1], epoch, hparams, layout,
                         spec, batch_sharding, shared)

    return jax.lax.scan(body, states, (order, order_mask))


def sweep_eval_logits(model, variables, images: jax.Array, sharding_=None) -> jax.Array:
    """Eval-mode logits ``[K, B, classes]`` of one batch for every run's ``variables`` ``[K]``."""
    return jax.vmap(lambda v: train.eval_logits(model, v, images, sharding_))(variables)


def shared_eval_logits(model, variables, images: jax.Array, layout: Layout, sharding_=None) -> jax.Array:
    """``sweep_eval_logits`` with the backbone evaluated once per group (frozen backbones)."""
    backbone = model.clone(head=False)
    reps = _take(variables, layout.group_rep)
    feats = jax.vmap(lambda v: train.eval_logits(backbone, v, images, sharding_))(reps)
    run_feats = jnp.take(feats, layout.run_group, axis=0)
    return jax.vmap(lambda fc, f: models.classify(model, fc, f))(variables["params"]["fc"], run_feats)


def sweep_eval_metrics(s_logits, t_logits, labels, hparams, spec: train.StepSpec) -> dict[str, jax.Array]:
    """``train.eval_metrics`` of every run: ``s_logits`` ``[K, N, C]``, ``hparams`` ``[K]``."""
    metrics = functools.partial(train.eval_metrics, spec=spec)
    return jax.vmap(metrics, in_axes=(0, None, None, 0))(s_logits, t_logits, labels, hparams)


_any_step_jit = jax.jit(_any_step, static_argnames=("spec", "batch_sharding", "shared"), donate_argnums=0)
_sweep_epoch_jit = jax.jit(sweep_epoch, static_argnames=("spec", "batch_sharding", "shared"), donate_argnums=0)
_sweep_eval_logits_jit = jax.jit(sweep_eval_logits, static_argnums=(0, 3))
_shared_eval_logits_jit = jax.jit(shared_eval_logits, static_argnums=(0, 4))
_sweep_eval_metrics_jit = jax.jit(sweep_eval_metrics, static_argnames="spec")


def _stack(trees: Sequence[Any]) -> Any:
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _unstack(tree: Any, k: int) -> Any:
    return jax.tree.map(lambda a: a[k], tree)


def run_sweep_epoch(states, teacher_vars, train_split, seeds: Sequence[int], layout: Layout, epoch: int,
                    num_train: int, batch_size: int, hparams, spec: train.StepSpec, batch_sharding,
                    scan: bool, shared: bool) -> tuple[Any, dict[str, np.ndarray]]:
    """One epoch of every run (scanned, or a host loop over jitted steps as on CPU); metrics
    ``[steps, K]``. Each seed's batches are ``data.epoch_order``'s, as in an unvectorised run."""
    orders = [data.epoch_order(num_train, batch_size, s, epoch, shuffle=True) for s in seeds]
    order = np.stack([o for o, _ in orders], axis=1)  # [steps, S, B]
    order_mask = np.stack([m for _, m in orders], axis=1)
    epoch_ = jnp.int32(epoch)
    # every process holds the whole epoch order but feeds only its own rows of each batch
    if scan:
        steps_sharding = sharding.batch_sharding_at(batch_sharding.mesh, 2)  # [steps, S, B]
        states, metrics = _sweep_epoch_jit(
            states, teacher_vars, train_split, *distributed.put_batch((order, order_mask), steps_sharding),
            epoch_, hparams, layout, spec=spec, batch_sharding=batch_sharding, shared=shared,
        )
        return states, distributed.to_host(metrics)
    steps = []
    for indices, mask in zip(order, order_mask):
        states, m = _any_step_jit(
            states, teacher_vars, train_split, *distributed.put_batch((indices, mask), batch_sharding),
            epoch_, hparams, layout, spec=spec, batch_sharding=batch_sharding, shared=shared,
        )
        steps.append(m)
    steps = distributed.to_host(steps)
    return states, {k: np.stack([m[k] for m in steps]) for k in steps[0]}


def backbone_key(variables: Mapping) -> str:
    """A digest of everything but the head: runs with equal keys (and seeds) share a backbone."""
    frozen = {"params": {k: v for k, v in variables["params"].items() if k != "fc"},
              "batch_stats": variables["batch_stats"]}
    return checkpoint.fingerprint(distributed.to_host(frozen))


def layout_for(runs: Sequence[Run], states: Sequence[train.TrainState], shared: bool) -> tuple[list[int], Layout]:
    """The distinct seeds and the sharing ``Layout`` of ``runs`` (each its own group unless
    ``shared``)."""
    seeds = sorted({r.config.seed for r in runs})
    run_seed = [seeds.index(r.config.seed) for r in runs]
    keys = [
        (r.config.seed, backbone_key({"params": st.params, "batch_stats": st.batch_stats}) if shared else k)
        for k, (r, st) in enumerate(zip(runs, states))
    ]
    groups = list(dict.fromkeys(keys))
    run_group = [groups.index(key) for key in keys]
    group_rep = [keys.index(g) for g in groups]
    group_seed = [run_seed[k] for k in group_rep]
    # seeds as uint32, as train.run_epoch passes them to the view keys
    return seeds, Layout(np.asarray(seeds, np.uint32), *(np.asarray(a, np.int32) for a in
                                                         (run_seed, run_group, group_seed, group_rep)))


def train_runs(
    runs: Sequence[Run],
    dataset: data.Dataset,
    *,
    student_arch: str = "resnet18",
    teacher: train.Teacher | None = None,
    mesh: jax.sharding.Mesh | None = None,
    on_epoch: Callable[[int, dict], None] | None = None,
    scan_epochs: bool | None = None,
    share_frozen: bool = True,
) -> list[train.RunResult]:
    """Train ``runs`` together (see the module docstring); returns their results in order.

    Runs resume from their own directories; runs that stand at different epochs (an interrupted
    save, or runs finished earlier one by one) are trained in groups of equal start epoch.
    ``on_epoch(k, record)`` is called for run k after each epoch. ``share_frozen=False`` keeps
    one backbone pass per run even where a frozen backbone could be shared.
    """
    if not runs:
        return []
    first = runs[0].config
    for r in runs[1:]:
        if recipe_key(r.config) != recipe_key(first):
            raise ValueError(
                f"runs trained together must share the recipe apart from seed, alpha and temperature: "
                f"{r.workdir} has {recipe_key(r.config)}, {runs[0].workdir} has {recipe_key(first)}"
            )
    workdirs = [pathlib.Path(r.workdir).absolute() for r in runs]
    if len(set(workdirs)) != len(workdirs):
        raise ValueError("runs trained together need distinct work directories")
    if scan_epochs is None:  # see train.train_epoch: scanned epochs pay off on accelerators only
        scan_epochs = jax.default_backend() != "cpu"
    mesh = mesh or sharding.data_mesh()
    train.check_run_inputs(first, dataset, teacher, mesh)
    repl, batch_sh = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    stacked_sh = sharding.batch_sharding_at(mesh, 1)  # [S, B, ...]: one batch per seed
    spec = train.step_spec_for(first, dataset, student_arch, teacher)
    train_split = distributed.put_replicated(dataset["train"].train, repl)
    val_images = distributed.put_replicated(dataset["val"].eval.images, repl)
    val_labels = distributed.put_replicated(dataset["val"].eval.labels, repl)
    teacher_vars = None if teacher is None else distributed.put_replicated(teacher.variables, repl)
    t_val_logits = None
    if teacher is not None:  # frozen teacher, fixed val views: once for the whole sweep
        t_val_logits = train.all_logits(spec.teacher, teacher_vars, val_images, first.batch_size, batch_sh)

    stores, states = [], []
    for r, workdir in zip(runs, workdirs):
        store = train.RunStore(workdir, train.run_meta_for(r.config, student_arch, teacher, dataset))
        host = jax.tree_util.tree_map(np.asarray, dict(r.student_variables))
        state = distributed.put_replicated(train.create_train_state(host, spec.tx, spec.student_train), repl)
        abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=repl), state)
        restored = store.restore(abstract)
        stores.append(store)
        states.append(state if restored is None else restored)

    by_start: dict[int, list[int]] = {}
    for k, store in enumerate(stores):
        if store.start_epoch < first.num_epochs:
            by_start.setdefault(store.start_epoch, []).append(k)
    for start, members in sorted(by_start.items()):
        _train_group(
            [runs[k] for k in members], [stores[k] for k in members], [states[k] for k in members],
            start, members, spec, dataset, student_arch, teacher_vars, train_split, val_images,
            val_labels, t_val_logits, repl, batch_sh, stacked_sh, scan_epochs, on_epoch,
            share_frozen and spec.student_train in ("fc", "fc_frozen_bn"),
        )
    for store in stores:
        store.close()
    return [store.result() for store in stores]


def _train_group(runs, stores, states, start, members, spec, dataset, student_arch, teacher_vars,
                 train_split, val_images, val_labels, t_val_logits, repl, batch_sh, stacked_sh,
                 scan_epochs, on_epoch, shared: bool) -> None:
    """Epochs ``start..num_epochs`` of runs that all stand at ``start``, trained as one."""
    config = runs[0].config
    seeds, layout = layout_for(runs, states, shared)
    layout = distributed.put_replicated(layout, repl)
    hparams = distributed.put_replicated(_stack([train.hparams_for(r.config) for r in runs]), repl)
    states = jax.device_put(_stack(states), repl)
    spe, k_runs = spec.steps_per_epoch, len(runs)
    n_groups = int(layout.group_rep.shape[0])
    desc = f"epochs ({k_runs} runs together" + (f", {n_groups} backbones)" if shared else ")")
    bar = tqdm(range(start, config.num_epochs), desc=desc, unit="epoch",
               file=sys.stderr, initial=start, total=config.num_epochs, leave=False, dynamic_ncols=True,
               disable=not distributed.is_primary())
    for epoch in bar:
        t0 = time.perf_counter()
        states, step_metrics = run_sweep_epoch(
            states, teacher_vars, train_split, seeds, layout, epoch, dataset["train"].num_examples,
            config.batch_size, hparams, spec, stacked_sh, scan_epochs, shared,
        )
        # every run's figures first: a non-finite loss in any run saves nothing of this epoch
        train_figures = [
            train.summarize_steps({k: v[:, i] for k, v in step_metrics.items()}, epoch, store.workdir)
            for i, store in enumerate(stores)
        ]
        s_vars = {"params": states.params, "batch_stats": states.batch_stats}
        if shared:
            logits_of = lambda b: _shared_eval_logits_jit(spec.student, s_vars, b, layout, batch_sh)  # noqa: E731
        else:
            logits_of = lambda b: _sweep_eval_logits_jit(spec.student, s_vars, b, batch_sh)  # noqa: E731
        s_val_logits = train.map_eval_batches(logits_of, val_images, config.batch_size)
        val = distributed.to_host(_sweep_eval_metrics_jit(s_val_logits, t_val_logits, val_labels, hparams, spec=spec))
        seconds = (time.perf_counter() - t0) / k_runs
        for i, (r, store) in enumerate(zip(runs, stores)):
            record = train.epoch_record(r.config, spe, epoch, train_figures[i],
                                        {key: v[i] for key, v in val.items()}, seconds)
            record["runs_together"] = k_runs
            saver = train.best_model_saver(_unstack(s_vars, i), student_arch, dataset, r.config, r.provenance)
            store.end_epoch(epoch, _unstack(states, i), record, saver)
            if on_epoch is not None:
                on_epoch(members[i], record)
    bar.close()
