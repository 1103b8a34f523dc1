"""The distillation engine: pure jit-compiled steps, whole epochs on the device, exact resume.

``train_step`` runs the frozen teacher (eval mode, ``stop_gradient``) and the student on the same
augmented batch; ``train_epoch`` scans it over an epoch of device-resident data, so an epoch is
one program with no host round trip; ``evaluate`` counts every validation example once.
``train_and_evaluate`` is the host loop around them: checkpoints every epoch, resume, best-val
model directory, per-epoch metrics.

Student modes (``DistillConfig.student_train``):

- ``fc``: the seed's behaviour. Only the new head is optimised, but the student runs in train
  mode, so BatchNorm normalises with batch statistics and keeps updating its running averages.
- ``fc_frozen_bn``: a truly frozen backbone: eval-mode BatchNorm, only the head is optimised.
- ``all``: full fine-tuning (also what supervised teacher fine-tuning uses).

The teacher is data: its variables enter every step as an argument (replicated, never donated,
never optimised, never checkpointed; its fingerprint is recorded instead).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import sys
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import struct
from tqdm import tqdm

from kdjax import augment, checkpoint, data, distributed, losses, models, optim, sharding
from kdjax.config import OptimConfig, TrainConfig, steps_per_epoch


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


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """The static part of a compiled step: networks, optimiser recipe, student mode, loss kind.

    Hashable and compared by value (flax modules and frozen configs are), so it is a static
    argument of ``jax.jit`` and runs with equal specs share one compilation: the optimiser is
    rebuilt from ``optim`` inside the trace rather than held as an optax object (a new closure
    per run would defeat the cache). Everything a sweep varies (alpha, temperature, the seed)
    is a traced argument instead, so a sweep compiles once.
    """

    student: models.ResNet
    teacher: models.ResNet | None
    optim: OptimConfig
    steps_per_epoch: int
    student_train: str = "fc"
    loss: str = "mse"
    image_size: int = 224

    @property
    def tx(self) -> optax.GradientTransformation:
        return make_optimizer(self.optim, self.steps_per_epoch)


def trainable_params(params: Mapping, student_train: str) -> dict:
    """The subset the optimiser sees: the head in ``fc``/``fc_frozen_bn`` modes, else all."""
    if student_train == "all":
        return dict(params)
    return {"fc": params["fc"]}


def merge_params(params: Mapping, trainable: Mapping) -> dict:
    return {**params, **trainable}


def make_optimizer(o: OptimConfig, num_steps_per_epoch: int) -> optax.GradientTransformation:
    """SGD + StepLR (epochs converted to optimiser steps with ``num_steps_per_epoch``)."""
    return optim.sgd(optim.step_lr(o.lr, o.step_size, o.gamma, num_steps_per_epoch), o.momentum, o.weight_decay)


def create_train_state(variables: Mapping, tx: optax.GradientTransformation, student_train: str) -> TrainState:
    params = dict(variables["params"])
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=dict(variables["batch_stats"]),
        opt_state=tx.init(trainable_params(params, student_train)),
    )


def hparams_for(config: TrainConfig) -> dict[str, jax.Array]:
    """The traced scalars of a step (one compilation for every alpha and temperature)."""
    d = config.distill
    return {
        "alpha": jnp.float32(1.0 if d is None else d.alpha),
        "temperature": jnp.float32(1.0 if d is None else d.temperature),
    }


def _loss(spec: StepSpec, s_logits, t_logits, labels, mask, hparams):
    if spec.teacher is None:
        ce = losses.cross_entropy(s_logits, labels, mask)
        return ce, {"ce": ce}
    return losses.distillation_loss(
        s_logits, t_logits, labels, hparams["alpha"], hparams["temperature"], spec.loss, mask
    )


def teacher_logits(spec: StepSpec, teacher_vars, images: jax.Array) -> jax.Array | None:
    """The frozen teacher's eval-mode logits (no gradient flows into it); None without one."""
    if spec.teacher is None:
        return None
    return jax.lax.stop_gradient(spec.teacher.apply(teacher_vars, images, train=False))


def student_forward(spec: StepSpec, variables, images: jax.Array, mask: jax.Array):
    """The student's training-time forward pass: ``(logits, new batch_stats)``. BatchNorm runs on
    batch statistics (and updates its running averages) except in ``fc_frozen_bn`` mode."""
    if spec.student_train == "fc_frozen_bn":
        return spec.student.apply(variables, images, train=False), variables["batch_stats"]
    logits, updates = spec.student.apply(variables, images, train=True, mask=mask, mutable=["batch_stats"])
    return logits, updates["batch_stats"]


def student_step(
    state: TrainState,
    batch: data.Batch,
    t_logits: jax.Array | None,
    hparams: Mapping,
    spec: StepSpec,
    forward: Callable[[dict], tuple[jax.Array, Any]] | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """The student's optimiser step on ``batch`` given the teacher's logits on the same batch.

    ``forward(trainable) -> (logits, new batch_stats)`` replaces the full forward pass when the
    caller already has the frozen part's output (``kdjax.sweep`` shares it between runs).
    """
    labels = batch.labels
    mask = batch.mask.astype(jnp.float32)
    if forward is None:
        def forward(trainable):
            variables = {"params": merge_params(state.params, trainable), "batch_stats": state.batch_stats}
            return student_forward(spec, variables, batch.images, mask)

    def loss_fn(trainable):
        logits, new_stats = forward(trainable)
        loss, terms = _loss(spec, logits, t_logits, labels, mask, hparams)
        return loss, (terms, logits, new_stats)

    trainable = trainable_params(state.params, spec.student_train)
    (loss, (terms, logits, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    updates, opt_state = spec.tx.update(grads, state.opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    new_state = state.replace(
        step=state.step + 1,
        params=merge_params(state.params, trainable),
        batch_stats=new_stats,
        opt_state=opt_state,
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
    state: TrainState, teacher_vars, batch: data.Batch, hparams: Mapping, spec: StepSpec
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimiser step on a (possibly padded) batch; ``batch.mask`` marks real examples."""
    return student_step(state, batch, teacher_logits(spec, teacher_vars, batch.images), hparams, spec)


def augmented_step(
    state: TrainState,
    teacher_vars,
    train_split: data.TrainArrays,
    indices: jax.Array,
    mask: jax.Array,
    seed: jax.Array,
    epoch: jax.Array,
    hparams: Mapping,
    spec: StepSpec,
    batch_sharding: jax.sharding.Sharding | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """Augment the examples ``indices`` on the device (views from ``(seed, epoch, index)``),
    spread the batch over the ``'data'`` axis and take one ``train_step``."""
    batch = data.train_batch(train_split, indices, mask, seed, epoch, spec.image_size)
    if batch_sharding is not None:
        batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
    return train_step(state, teacher_vars, batch, hparams, spec)


def train_epoch(
    state: TrainState,
    teacher_vars,
    train_split: data.TrainArrays,
    order: jax.Array,
    order_mask: jax.Array,
    seed: jax.Array,
    epoch: jax.Array,
    hparams: Mapping,
    spec: StepSpec,
    batch_sharding: jax.sharding.Sharding | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """All steps of one epoch as one ``lax.scan``: no host round trip between steps.

    ``order``/``order_mask`` are ``[steps, batch]`` example indices and validity (from
    ``data.epoch_order``). Returns the final state and per-step metrics stacked on axis 0.
    The right shape for accelerators; on CPU, XLA runs convolutions inside a loop body more
    than 10x slower than at top level (measured: 2 scanned ResNet-50 steps 132 s against 2 x
    9 s), so the host loop calls ``augmented_step`` there instead.
    """

    def body(state, xs):
        indices, mask = xs
        return augmented_step(
            state, teacher_vars, train_split, indices, mask, seed, epoch, hparams, spec, batch_sharding
        )

    return jax.lax.scan(body, state, (order, order_mask))


def eval_logits(model: models.ResNet, variables, images: jax.Array, sharding_=None) -> jax.Array:
    """Eval-mode logits of one batch of uint8 eval views."""
    x = augment.normalize(images)
    if sharding_ is not None:
        x = jax.lax.with_sharding_constraint(x, sharding_)
    return model.apply(variables, x, train=False)


def map_eval_batches(fn: Callable[[jax.Array], jax.Array], images: jax.Array, batch_size: int) -> jax.Array:
    """``fn`` over fixed-shape batches of ``images`` (the last one padded, so one compilation),
    its ``[..., batch, classes]`` outputs joined along the example axis, the padding cut off."""
    n = images.shape[0]
    steps = math.ceil(n / batch_size)
    pad = steps * batch_size - n
    if pad:
        images = jnp.concatenate([images, jnp.zeros((pad,) + images.shape[1:], images.dtype)])
    out = [fn(images[i * batch_size : (i + 1) * batch_size]) for i in range(steps)]
    return jnp.concatenate(out, axis=-2)[..., :n, :]


def all_logits(model, variables, images: jax.Array, batch_size: int, sharding_=None) -> jax.Array:
    """Eval-mode logits for every image, in fixed-shape batches (the last one padded)."""
    return map_eval_batches(lambda b: _eval_logits_jit(model, variables, b, sharding_), images, batch_size)


def eval_metrics(s_logits, t_logits, labels, hparams, spec: StepSpec) -> dict[str, jax.Array]:
    """Validation figures over the whole set (every example counted exactly once).

    ``diff_t_s`` is the mean |teacher - student| logit difference over all examples and classes
    (the seed took it on its last val batch only). ``agreement`` is teacher-student top-1
    agreement and ``kl_t_s`` the mean KL(softmax(t) || softmax(s)) at T = 1.
    """
    loss, terms = _loss(spec, s_logits, t_logits, labels, None, hparams)
    out = {"loss": loss, **terms, "acc": jnp.mean(jnp.argmax(s_logits, -1) == labels)}
    if t_logits is not None:
        out.update(
            teacher_acc=jnp.mean(jnp.argmax(t_logits, -1) == labels),
            diff_t_s=jnp.mean(jnp.abs(t_logits - s_logits)),
            agreement=jnp.mean(jnp.argmax(t_logits, -1) == jnp.argmax(s_logits, -1)),
            kl_t_s=losses.hinton_kl(s_logits, t_logits, 1.0),
        )
    return out


# Compiled once per process for each distinct (spec, shapes, shardings): every run of a sweep
# with equal specs reuses the same executables. The state is donated; the teacher never is.
_train_epoch_jit = jax.jit(train_epoch, static_argnames=("spec", "batch_sharding"), donate_argnums=0)
_augmented_step_jit = jax.jit(augmented_step, static_argnames=("spec", "batch_sharding"), donate_argnums=0)
_eval_logits_jit = jax.jit(eval_logits, static_argnums=(0, 3))


def run_epoch(state, teacher_vars, train_split, order, order_mask, seed: int, epoch: int, hparams,
              spec: StepSpec, batch_sharding, scan: bool) -> tuple[TrainState, dict[str, np.ndarray]]:
    """One epoch, as one scanned program (``scan``) or as a host loop over jitted steps; both
    keep the data on the device and give per-step metrics ``[steps]``."""
    seed_, epoch_ = jnp.uint32(seed), jnp.int32(epoch)
    # Every process holds the whole epoch order but feeds only its own rows of each batch.
    if scan:
        steps_sharding = sharding.steps_batch_sharding(batch_sharding.mesh)
        state, metrics = _train_epoch_jit(
            state, teacher_vars, train_split, *distributed.put_batch((order, order_mask), steps_sharding),
            seed_, epoch_, hparams, spec=spec, batch_sharding=batch_sharding,
        )
        return state, distributed.to_host(metrics)
    steps = []
    for indices, mask in zip(order, order_mask):
        state, m = _augmented_step_jit(
            state, teacher_vars, train_split, *distributed.put_batch((indices, mask), batch_sharding),
            seed_, epoch_, hparams, spec=spec, batch_sharding=batch_sharding,
        )
        steps.append(m)
    steps = distributed.to_host(steps)
    return state, {k: np.stack([m[k] for m in steps]) for k in steps[0]}
_eval_metrics_jit = jax.jit(eval_metrics, static_argnames="spec")


# --------------------------------------------------------------------------- host loop


@dataclasses.dataclass(frozen=True)
class Teacher:
    """A frozen teacher: its module, variables and fingerprint (what checkpoints record)."""

    model: models.ResNet
    variables: Any
    fingerprint: str


@dataclasses.dataclass
class RunResult:
    history: list[dict]
    best_val_acc: float
    best_epoch: int
    workdir: pathlib.Path


def _log(msg: str, workdir: pathlib.Path | None = None) -> None:
    """One line to stderr (above any progress bar) and, with ``workdir``, to its train.log."""
    tqdm.write(msg, file=sys.stderr)
    if workdir is not None:
        with open(workdir / "train.log", "a") as f:
            f.write(msg + "\n")


def summarize_steps(step_metrics: Mapping[str, np.ndarray], epoch: int, workdir: pathlib.Path) -> dict:
    """An epoch's train figures from its per-step sums ``[steps]``; a non-finite step loss stops
    the run (naming epoch and step) before anything of the epoch is saved."""
    step_losses = np.asarray(step_metrics["loss"])
    bad = np.flatnonzero(~np.isfinite(step_losses))
    if bad.size:
        raise NonFiniteLossError(
            f"non-finite training loss {step_losses[bad[0]]} at epoch {epoch + 1} step "
            f"{bad[0] + 1}/{step_losses.size}; nothing of this epoch was saved, the last good "
            f"checkpoint is epoch {epoch} in {workdir / 'checkpoints'}"
        )
    sums = {k: float(np.sum(v)) for k, v in step_metrics.items() if k != "loss"}
    count = sums.pop("count")
    train = {"loss": sums.pop("loss_sum") / count, "acc": sums.pop("correct") / count}
    train.update({k[: -len("_sum")]: v / count for k, v in sums.items()})
    return train


class RunStore:
    """One run's work directory: an orbax checkpoint per epoch (train state + history, atomic),
    ``best/`` (the best-val student as a model directory), ``metrics.json`` and ``train.log``.

    ``run_meta`` identifies the run (config, architectures, teacher and data fingerprints);
    resuming a directory that holds another run is refused.
    """

    RESUME_KEYS = ("config", "student_arch", "teacher_fingerprint", "class_names", "data_fingerprint")

    def __init__(self, workdir: str | pathlib.Path, run_meta: Mapping):
        self.workdir = pathlib.Path(workdir).absolute()
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
                raise ResumeMismatchError(
                    f"{self.workdir} holds a run with a different {key} "
                    f"({saved['run'].get(key)!r} != {self.run_meta[key]!r}); use another --out or delete it"
                )
        self.history, self.best_acc, self.best_epoch = saved["history"], saved["best_val_acc"], saved["best_epoch"]
        self.start_epoch = latest + 1
        num_epochs = self.run_meta["config"]["num_epochs"]
        self.log(f"resuming {self.workdir} after epoch {latest + 1}/{num_epochs}")
        return restored["state"]

    def log(self, msg: str) -> None:
        if distributed.is_primary():  # one train.log and one console per run, however many processes
            _log(msg, self.workdir)

    def end_epoch(self, epoch: int, state: TrainState, record: dict, save_best: Callable[[pathlib.Path, dict], None]) -> None:
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
        self.manager.save(epoch, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
        self.manager.wait_until_finished()
        if distributed.is_primary():  # orbax checkpoints are written by all processes, files by one
            (self.workdir / "metrics.json").write_text(json.dumps(meta, indent=1) + "\n")
        self.log(_epoch_line(record, self.run_meta["config"]["num_epochs"]))
        distributed.barrier("kdjax.train.end_epoch")  # no process reads ahead of process 0's files

    def result(self) -> RunResult:
        return RunResult(history=self.history, best_val_acc=self.best_acc, best_epoch=self.best_epoch,
                         workdir=self.workdir)

    def close(self) -> None:
        self.manager.close()


def run_meta_for(config: TrainConfig, student_arch: str, teacher: Teacher | None, dataset: data.Dataset) -> dict:
    """What identifies a run for resuming (see ``RunStore``)."""
    return {
        "config": config.to_json(),
        "student_arch": student_arch,
        "teacher_fingerprint": None if teacher is None else teacher.fingerprint,
        "class_names": list(dataset.class_names),
        # the decode cache's key: a digest of the source files, image size and cache settings
        "data_fingerprint": dataset.cache_path.name,
    }


def step_spec_for(config: TrainConfig, dataset: data.Dataset, student_arch: str, teacher: Teacher | None) -> StepSpec:
    """The compiled step's static part for ``config`` on ``dataset``."""
    dtype = jnp.bfloat16 if config.compute_dtype == "bfloat16" else jnp.float32
    return StepSpec(
        student=models.create_model(student_arch, len(dataset.class_names), dtype),
        # the teacher computes in the run's dtype too (bfloat16 on accelerators); its variables stay
        # as given (float32), like the student's master weights
        teacher=None if teacher is None else teacher.model.clone(dtype=dtype),
        optim=config.optim,
        steps_per_epoch=steps_per_epoch(dataset["train"].num_examples, config.batch_size),
        student_train=config.student_train,
        loss="mse" if config.distill is None else config.distill.loss,
        image_size=config.image_size,
    )


def best_model_saver(variables, student_arch: str, dataset: data.Dataset, config: TrainConfig,
                     provenance: Mapping | None) -> Callable[[pathlib.Path, dict], None]:
    """``RunStore.end_epoch``'s ``save_best`` for the student ``variables`` (fetched lazily).
    Every process calls it (the fetch may gather across processes); process 0 writes."""

    def save(directory: pathlib.Path, epoch_provenance: dict) -> None:
        host = distributed.to_host(variables)
        if not distributed.is_primary():
            return
        checkpoint.save_model(
            directory, host, arch=student_arch, class_names=dataset.class_names,
            image_size=config.image_size, provenance={**dict(provenance or {}), **epoch_provenance},
        )

    return save


def epoch_record(config: TrainConfig, spe: int, epoch: int, train_figures: dict, val: Mapping, seconds: float) -> dict:
    return {
        "epoch": epoch + 1,
        "lr": float(tx_lr(config, spe, epoch)),
        "train": train_figures,
        "val": {k: float(v) for k, v in val.items()},
        "seconds": seconds,
    }


def check_run_inputs(config: TrainConfig, dataset: data.Dataset, teacher: Teacher | None, mesh) -> None:
    if (teacher is None) != (config.distill is None):
        raise ValueError("a distillation config needs a teacher, and supervised training none")
    sharding.check_batch_size(config.batch_size, mesh)
    if dataset["train"].train is None:
        raise ValueError("the dataset was loaded without training views for its 'train' split")


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
    """Train for ``config.num_epochs`` epochs (resuming whatever ``workdir`` already holds).

    Writes ``workdir/checkpoints/<epoch>`` (orbax: train state + run metadata, every epoch,
    atomically), ``workdir/best`` (the best-val student as a model directory) and
    ``workdir/metrics.json``. A non-finite loss stops with ``NonFiniteLossError`` before the
    epoch is saved, so the last good checkpoint stays intact.
    """
    if scan_epochs is None:  # see train_epoch: scanned epochs pay off on accelerators only
        scan_epochs = jax.default_backend() != "cpu"
    mesh = mesh or sharding.data_mesh()
    check_run_inputs(config, dataset, teacher, mesh)
    repl, batch_sh = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    num_train = dataset["train"].num_examples
    spec = step_spec_for(config, dataset, student_arch, teacher)
    spe = spec.steps_per_epoch
    # Host data that every process holds alike, copied by each process onto its own devices.
    hparams = distributed.put_replicated(hparams_for(config), repl)
    train_split = distributed.put_replicated(dataset["train"].train, repl)
    val_images = distributed.put_replicated(dataset["val"].eval.images, repl)
    val_labels = distributed.put_replicated(dataset["val"].eval.labels, repl)
    teacher_vars = None if teacher is None else distributed.put_replicated(teacher.variables, repl)

    store = RunStore(workdir, run_meta_for(config, student_arch, teacher, dataset))
    # Fresh state from host copies: device_put may alias, and the step donates its state.
    fresh = create_train_state(jax.tree_util.tree_map(np.asarray, dict(student_variables)), spec.tx, spec.student_train)
    state = distributed.put_replicated(fresh, repl)
    abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=repl), state)
    restored = store.restore(abstract)
    if restored is not None:
        state = restored

    t_val_logits = None
    if teacher is not None:  # the teacher is frozen and val views are fixed: compute once per run
        t_val_logits = all_logits(spec.teacher, teacher_vars, val_images, config.batch_size, batch_sh)

    epochs = tqdm(
        range(store.start_epoch, config.num_epochs), desc="epochs", unit="epoch", file=sys.stderr,
        initial=store.start_epoch, total=config.num_epochs, leave=False, dynamic_ncols=True,
        disable=not distributed.is_primary(),
    )
    for epoch in epochs:
        t0 = time.perf_counter()
        order, order_mask = data.epoch_order(num_train, config.batch_size, config.seed, epoch, shuffle=True)
        state, step_metrics = run_epoch(
            state, teacher_vars, train_split, order, order_mask, config.seed, epoch, hparams,
            spec, batch_sh, scan_epochs,
        )
        train_figures = summarize_steps(step_metrics, epoch, store.workdir)
        s_vars = {"params": state.params, "batch_stats": state.batch_stats}
        s_val_logits = all_logits(spec.student, s_vars, val_images, config.batch_size, batch_sh)
        val = _eval_metrics_jit(s_val_logits, t_val_logits, val_labels, hparams, spec=spec)
        record = epoch_record(config, spe, epoch, train_figures, val, time.perf_counter() - t0)
        store.end_epoch(epoch, state, record, best_model_saver(s_vars, student_arch, dataset, config, provenance))
        if on_epoch is not None:
            on_epoch(record)
    epochs.close()
    store.close()
    return store.result()


def tx_lr(config: TrainConfig, spe: int, epoch: int) -> float:
    """The learning rate used during ``epoch`` (0-based)."""
    o = config.optim
    return float(optim.step_lr(o.lr, o.step_size, o.gamma, spe)(epoch * spe))


def _epoch_line(r: dict, num_epochs: int) -> str:
    v, t = r["val"], r["train"]
    line = (
        f"epoch {r['epoch']:>3}/{num_epochs}  lr {r['lr']:.2e}  train loss {t['loss']:.4f} "
        f"acc {t['acc']:.4f}  val loss {v['loss']:.4f} acc {v['acc']:.4f}"
    )
    if "teacher_acc" in v:
        line += f"  teacher {v['teacher_acc']:.4f}  diff_t_s {v['diff_t_s']:.4f}"
    return line + f"  ({r['seconds']:.1f} s)"
