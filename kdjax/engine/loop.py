"""The host loop: ``train_runs`` trains a list of runs of one recipe, resuming whatever their
directories hold, and ``train_and_evaluate`` one run.

A single run and a sweep of runs are one program shape: one ``Trainer`` for the call (its
programs compiled once), runs that stand at the same epoch trained together as a group
(``kdjax.engine.groups``), each keeping its own work directory (``kdjax.engine.store``), so runs
resume, report and predict alike however they were trained. An epoch is one scanned program
(accelerators) or a host loop over jitted steps (the CPU default: as fast there and quicker to
compile; benchmarks/README.md); both keep the data on the device. A teacher cache
(``kdjax.teacher_cache``) replaces the teacher's pass by its stored logits.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from typing import Callable, Sequence

import jax

from kdjax import console, data, losses, optim, sharding, teacher_cache
from kdjax.config import TrainConfig
from kdjax.engine.step import StepSpec, step_spec_for, terms_of
from kdjax.engine.store import (
    Run,
    RunResult,
    RunStore,
    epoch_record,
    run_labels,
    run_meta_for,
    save_best_model,
    score_selected,
    summarize_steps,
)
from kdjax.engine.trainer import Trainer

SINGLE_EXAMPLE_NOTE = (
    "note: {num_train} training examples at batch size {batch_size} leave one example in the "
    "last batch of every epoch. It trains like any other batch; a BatchNorm layer that sees one "
    "value per channel in it (e.g. 1x1 maps) normalises it with its own statistics, updates its "
    "running mean and keeps its running variance (kdjax.models.layers.BatchNorm)"
)


@dataclasses.dataclass(frozen=True)
class EngineOptions:
    """How ``train_runs`` trains, beside what it trains.

    ``scan_epochs``: one scanned program per epoch (None: on accelerators, off on CPU).
    ``vectorize`` trains runs that stand at the same epoch together as one group; otherwise one
    after another. ``share_frozen=False`` keeps one backbone pass per run even where a frozen
    backbone could be shared. ``teacher_cache_dir`` stores the teacher's logits on the training
    views there on first use and reads them afterwards (``kdjax.teacher_cache``)."""

    scan_epochs: bool | None = None
    vectorize: bool = True
    share_frozen: bool = True
    teacher_cache_dir: str | pathlib.Path | None = None


def recipe_key(config: TrainConfig) -> dict:
    """What runs trained together must share: the config without the traced values (seed, alpha,
    the loss's hyper-parameters, the lr and the weight decay)."""
    d = config.to_json()
    d.pop("seed", None)
    optim_record = dict(d.get("optim", {}))  # the lr and the weight decay are traced; decay or none is not
    optim_record.pop("lr", None)
    optim_record["weight_decay"] = bool(config.optim.weight_decay)
    d["optim"] = optim_record
    if config.ema_decay is not None:  # traced too; an EMA or none is not
        d["ema_decay"] = True
    augment = dict(d.get("augment", {}))  # the mixing alphas are traced; mixing or none is not
    for key in ("mixup_alpha", "cutmix_alpha"):
        if key in augment:
            augment[key] = True
    if augment:
        d["augment"] = augment
    if config.distill is not None:
        distill = dict(d.get("distill", {}))
        distill.pop("alpha", None)
        distill.pop("hparams", None)
        distill["loss"] = list(terms_of(config.distill.loss))  # the weights are traced
        d["distill"] = distill
    return d


def check_runs(runs: Sequence[Run], dataset: data.Dataset, teacher, mesh) -> None:
    """Refuse runs that cannot train in one call, naming why."""
    first = runs[0]
    for r in runs[1:]:
        if recipe_key(r.config) != recipe_key(first.config):
            raise ValueError(
                f"runs trained together must share the recipe apart from seed, alpha, the loss's "
                f"hyper-parameters, lr and weight decay: {r.workdir} has {recipe_key(r.config)}, {first.workdir} has "
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


def cache_for(directory, spec: StepSpec, config: TrainConfig, dataset: data.Dataset, teacher,
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
        **({"augment": config.augment.to_json()} if config.augment.to_json() else {}),  # a view is cached as it is
        "devices": int(mesh.devices.size),
        "processes": jax.process_count(),
    })


def default_scan_epochs() -> bool:
    """Scanned epochs on accelerators; a host loop of jitted steps on CPU, where it runs as fast
    (benchmarks/README.md) and compiles a smaller program."""
    return jax.default_backend() != "cpu"


def _train_group(trainer: Trainer, members: Sequence[tuple[int, Run, RunStore, object]], share_frozen: bool,
                 on_epoch) -> None:
    """Epochs ``start..num_epochs`` of runs that all stand at the same epoch, trained as one group."""
    runs = [r for _, r, _, _ in members]
    stores = [s for _, _, s, _ in members]
    config, start = runs[0].config, stores[0].start_epoch
    group, states = trainer.group([r.config for r in runs], [st for _, _, _, st in members], share_frozen)
    mode = group.program.mode
    spe, num_epochs = trainer.spec.steps_per_epoch, trainer.spec.num_epochs
    optimizers = [optim.build(r.config.optim, spe, num_epochs) for r in runs]  # each run's own lr
    desc = "epochs" if mode == "single" else f"epochs ({group.size} runs together" + (
        f", {int(group.layout.group_rep.shape[0])} backbones)" if mode == "shared" else ")")
    bar = console.bar(range(start, config.num_epochs), desc=desc, unit="epoch", initial=start,
                      total=config.num_epochs, leave=False)
    for epoch in bar:
        t0 = time.perf_counter()
        states, step_metrics = trainer.train_epoch(group, states, epoch)
        # every run's figures first: a non-finite loss in any run saves nothing of this epoch
        train_figures = [summarize_steps({k: v[:, i] for k, v in step_metrics.items()}, epoch, store.workdir)
                         for i, store in enumerate(stores)]
        val = trainer.validate(group, states, epoch)
        val_ema = trainer.validate(group, states, epoch, ema=True) if trainer.spec.ema else None
        seconds = (time.perf_counter() - t0) / group.size
        # the student best/ keeps (--select): the raw one or its EMA
        s_vars = (dict(states.ema) if config.select == "ema"
                  else {"params": states.params, "batch_stats": states.batch_stats})
        for i, (index, run, store, _) in enumerate(members):
            record = epoch_record(optimizers[i], epoch, train_figures[i], {k: v[i] for k, v in val.items()},
                                  seconds)
            if val_ema is not None:
                record["val_ema"] = {k: float(v[i]) for k, v in val_ema.items()}
            if group.size > 1:
                record["runs_together"] = group.size
            variables = trainer.run_of(s_vars, i)

            def save_best(directory, provenance, variables=variables, run=run):
                save_best_model(directory, variables, trainer.spec.student_arch, trainer.dataset, run, provenance)

            store.end_epoch(epoch, trainer.run_of(states, i), record, save_best)
            if on_epoch is not None:
                on_epoch(index, record)
    bar.close()


def train_runs(
    runs: Sequence[Run],
    dataset: data.Dataset,
    *,
    student_arch: str = "resnet18",
    teacher=None,
    mesh: jax.sharding.Mesh | None = None,
    on_epoch: Callable[[int, dict], None] | None = None,
    options: EngineOptions = EngineOptions(),
) -> list[RunResult]:
    """Train ``runs`` (one recipe; seeds, alphas and loss hyper-parameters may differ) and return
    their results in order, resuming whatever their directories hold.

    ``teacher`` is a ``kdjax.engine.teachers.Teacher`` (None: supervised training).
    ``on_epoch(k, record)`` is called for run k after each epoch. A non-finite loss stops with
    ``NonFiniteLossError`` before the epoch is saved, so the last good checkpoint stays intact.
    """
    if not runs:
        return []
    mesh = mesh or sharding.data_mesh()
    if options.scan_epochs and not dataset.in_memory:
        raise ValueError("--scan_epochs on scans epochs over data held on the devices, but the dataset is streamed: "
                         "pass --data_in_memory on, or --scan_epochs auto (a streamed run trains in a host loop)")
    check_runs(runs, dataset, teacher, mesh)
    first = runs[0].config
    spec = step_spec_for(first, dataset, student_arch, teacher)
    cache = None
    if options.teacher_cache_dir is not None:
        cache = cache_for(options.teacher_cache_dir, spec, first, dataset, teacher, mesh)
    scan = default_scan_epochs() if options.scan_epochs is None else options.scan_epochs
    trainer = Trainer(spec, dataset, teacher, mesh, first.batch_size, scan, cache)
    num_train = dataset["train"].num_examples
    stores, states = [], []
    labels = run_labels([r.workdir for r in runs])
    try:
        for r, label in zip(runs, labels):
            store = RunStore(r.workdir, run_meta_for(r, student_arch, teacher, dataset), label=label)
            stores.append(store)
            state = trainer.initial_state(r.student_variables, r.config.seed)
            restored = store.restore(trainer.abstract(state))
            states.append(state if restored is None else restored)
            if num_train % first.batch_size == 1 and first.batch_size > 1 and store.start_epoch < first.num_epochs:
                store.log(SINGLE_EXAMPLE_NOTE.format(num_train=num_train, batch_size=first.batch_size))

        pending = [k for k, s in enumerate(stores) if s.start_epoch < first.num_epochs]
        if options.vectorize:
            by_start: dict[int, list[int]] = {}
            for k in pending:
                by_start.setdefault(stores[k].start_epoch, []).append(k)
            groups = [by_start[s] for s in sorted(by_start)]
        else:
            groups = [[k] for k in pending]
        if groups:
            trainer.place()  # before the first epoch's clock starts
        bar = console.bar(total=len(groups), desc="runs", unit="run") if len(groups) > 1 and not options.vectorize \
            else None
        for members in groups:
            if bar is not None:
                bar.set_postfix_str(runs[members[0]].workdir.name)
            _train_group(trainer, [(k, runs[k], stores[k], states[k]) for k in members], options.share_frozen,
                         on_epoch)
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


def train_and_evaluate(
    run: Run,
    dataset: data.Dataset,
    *,
    student_arch: str = "resnet18",
    teacher=None,
    mesh: jax.sharding.Mesh | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    options: EngineOptions = EngineOptions(),
) -> RunResult:
    """One run for ``run.config.num_epochs`` epochs: ``train_runs`` of a single ``Run``.

    Writes ``workdir/checkpoints/<epoch>`` (orbax: train state + run metadata, every epoch,
    atomically), ``workdir/best`` (the best-val student as a model directory) and
    ``workdir/metrics.json``.
    """
    callback = None if on_epoch is None else (lambda k, record: on_epoch(record))
    return train_runs([run], dataset, student_arch=student_arch, teacher=teacher, mesh=mesh,
                      on_epoch=callback, options=options)[0]

