"""The run store: each run's work directory, its records and checkpoints, its best model and its
test score.

    WORKDIR/checkpoints/<epoch>/   orbax: the train state and the run's metadata, every epoch
    WORKDIR/best/                  the best-val student as a model directory (kdjax.checkpoint)
    WORKDIR/metrics.json           the run's identity and every epoch's record
    WORKDIR/train.log              the run's console lines
    WORKDIR/test.json              with a test split: the selected model scored once on it

A run's identity (``run_meta_for``: config, architectures, initial weights, teacher and data
fingerprints) is recorded with every checkpoint; resuming a directory that holds another run is
refused, naming what differs. Configs are compared as configs (``config_differences``), so a run
recorded before a field existed resumes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import orbax.checkpoint as ocp

from kdjax import checkpoint, console, data, distributed, optim, sharding
from kdjax.config import TrainConfig, config_differences


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the message names epoch and step."""


class ResumeMismatchError(ValueError):
    """A work directory holds a run with another configuration or teacher."""


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


def log_line(label: str, workdir: pathlib.Path, msg: str) -> None:
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


def epoch_record(optimizer: optim.Optimizer, epoch: int, train_figures: dict, val: Mapping, seconds: float) -> dict:
    """The record of epoch ``epoch`` (0-based) that metrics.json and TensorBoard hold; its ``lr``
    is the optimiser's schedule at the epoch's first step."""
    return {
        "epoch": epoch + 1,
        "lr": optimizer.epoch_lr(epoch),
        "train": train_figures,
        "val": {k: float(v) for k, v in val.items()},
        "seconds": seconds,
    }


def epoch_line(r: dict, num_epochs: int) -> str:
    v, t = r["val"], r["train"]
    line = (
        f"epoch {r['epoch']:>3}/{num_epochs}  lr {r['lr']:.2e}  train loss {t['loss']:.4f} "
        f"acc {t['acc']:.4f}  val loss {v['loss']:.4f} acc {v['acc']:.4f}"
    )
    if "teacher_acc" in v:
        line += f"  teacher {v['teacher_acc']:.4f}  diff_t_s {v['diff_t_s']:.4f}"
    return line + f"  ({r['seconds']:.1f} s)"


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
        self.config = TrainConfig.from_json(self.run_meta["config"])
        options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True, cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.workdir / "checkpoints", options=options)
        self.history: list[dict] = []
        self.best_acc, self.best_epoch, self.start_epoch = -1.0, -1, 0

    def _check_identity(self, saved: Mapping) -> None:
        for key in self.RESUME_KEYS:
            if key == "config":
                differ = config_differences(saved.get("config", {}), self.config)
                if differ:
                    raise ResumeMismatchError(
                        f"{self.workdir} holds a run with a different config ({'; '.join(differ)}); "
                        "use another --out or delete it")
            elif saved.get(key) != self.run_meta[key]:
                flag = " (--init)" if key == "init" else ""
                raise ResumeMismatchError(
                    f"{self.workdir} holds a run with a different {key}{flag} "
                    f"({saved.get(key)!r} != {self.run_meta[key]!r}); use another --out or delete it"
                )

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
        self._check_identity(saved["run"])
        self.history, self.best_acc, self.best_epoch = saved["history"], saved["best_val_acc"], saved["best_epoch"]
        self.start_epoch = latest + 1
        self.log(f"resuming {self.workdir} after epoch {latest + 1}/{self.config.num_epochs}")
        return restored["state"]

    def log(self, msg: str) -> None:
        """A line of this run: on the console after its label, in its train.log as it is."""
        if distributed.is_primary():  # one train.log and one console per run, however many processes
            log_line(self.label, self.workdir, msg)

    def end_epoch(self, epoch: int, state, record: dict, save_best: Callable[[pathlib.Path, dict], None]) -> None:
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
        self.log(epoch_line(record, self.config.num_epochs))
        distributed.barrier("kdjax.engine.store.end_epoch")  # no process reads ahead of process 0's files

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


def run_meta_for(run: Run, student_arch: str, teacher, dataset: data.Dataset) -> dict:
    """What identifies a run for resuming (see ``RunStore``); ``teacher`` a
    ``kdjax.engine.teachers.Teacher`` or None."""
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


def save_best_model(directory: pathlib.Path, variables, student_arch: str, dataset: data.Dataset, run: Run,
                    epoch_provenance: dict) -> None:
    """``RunStore.end_epoch``'s best model: the student ``variables`` as a model directory. Every
    process calls it (the fetch may gather across processes); process 0 writes."""
    host = distributed.to_host(variables)
    if not distributed.is_primary():
        return
    checkpoint.save_model(
        directory, host, arch=student_arch, class_names=dataset.class_names, image_size=run.config.image_size,
        provenance={**dict(run.provenance or {}), **epoch_provenance},
    )


TEST_FILE = "test.json"


def score_selected(results: Sequence[RunResult], dataset: data.Dataset, spec, batch_size: int,
                   mesh) -> list[RunResult]:
    """Each run's selected model (``best/``: its best epoch on val) scored once on the held-out
    test split, written to the run's ``test.json`` and returned in ``RunResult.test``. Selection
    never sees test, so its accuracy is not biased by choosing the epoch on it."""
    from kdjax.engine import evaluation

    test = dataset.test
    images = distributed.put_replicated(test.eval.images, sharding.replicated(mesh)) if dataset.in_memory else test
    labels = test.labels
    scored = []
    for result, label in zip(results, run_labels([r.workdir for r in results])):
        _, variables, meta = checkpoint.load_model(result.workdir / "best", arch=spec.student_arch,
                                                   sharding=sharding.replicated(mesh))
        logits = distributed.to_host(evaluation.all_outputs(spec.student, variables, images, batch_size, mesh=mesh,
                                                            view=spec.student_view).logits)
        correct = int(np.sum(np.argmax(logits, -1) == labels))
        record = {"split": "test", "num_test": int(labels.size), "acc": correct / labels.size,
                  "correct": correct, "selected_epoch": int(meta.provenance["epoch"]),
                  "selected_val_acc": float(meta.provenance["val_acc"])}
        if distributed.is_primary():
            checkpoint.write_text_atomic(result.workdir / TEST_FILE, json.dumps(record, indent=1) + "\n")
            log_line(label, result.workdir, f"test: {record['acc']:.4f} ({correct}/{labels.size}) with the "
                     f"epoch-{record['selected_epoch']} model selected on val")
        scored.append(dataclasses.replace(result, test=record))
    return scored
