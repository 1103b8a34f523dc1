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

A failed write (no space, no permission, a read-only disk) is one ``StoreWriteError`` naming the
path, the cause and the epoch a re-run resumes from, without orbax's own reports of it
(``orbax_quiet``). A second process writing the directory is refused (``kdjax.engine.lock``).
Each checkpoint records its state's fingerprint, checked on restore: one that cannot be read or
reads back other values is set aside as ``checkpoints/<step>.damaged-<time>`` (out of orbax's
step names, never deleted) and the run resumes from the newest intact one, or stops
(``DamagedCheckpointError``). An older kdjax's checkpoint, without a fingerprint, is read only.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp

from kdjax import checkpoint, console, data, distributed, models, optim, sharding
from kdjax.config import TrainConfig, config_differences
from kdjax.engine import lock
from kdjax.engine.writes import StoreWriteError, brief, orbax_quiet, write_errno, writing  # noqa: F401 (StoreWriteError: the store's error)


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the message names epoch and step."""


class ResumeMismatchError(ValueError):
    """A work directory holds a run with another configuration or teacher."""


class DamagedCheckpointError(OSError):
    """No checkpoint of a run can be read back intact; the message names them and what to do."""


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
    if "val_ema" in r:
        line += f"  ema acc {r['val_ema']['acc']:.4f}"
    return line + f"  ({r['seconds']:.1f} s)"


class RunStore:
    """One run's work directory: an orbax checkpoint per epoch (train state + history, atomic),
    ``best/`` (the best-val student as a model directory), ``metrics.json`` and ``train.log``.

    ``run_meta`` identifies the run (config, architectures, initial weights, teacher and data
    fingerprints); resuming a directory that holds another run is refused. The primary process
    holds the directory's lock (``kdjax.engine.lock``) from here until ``close``.
    """

    RESUME_KEYS = ("config", "student_arch", "init", "teacher_fingerprint", "class_names",
                   "data_fingerprint")

    def __init__(self, workdir: str | pathlib.Path, run_meta: Mapping, label: str | None = None):
        self.workdir = pathlib.Path(workdir).absolute()
        self.label = label or self.workdir.name  # names the run's lines on the console
        self.run_meta = dict(run_meta)
        self.config = TrainConfig.from_json(self.run_meta["config"])
        self.history: list[dict] = []
        self.best_acc, self.best_epoch, self.start_epoch = -1.0, -1, 0
        self._lock = None
        with writing("the run's work directory", self.workdir, self._resume_phrase):
            if distributed.is_primary():  # one writer per run directory: the primary process holds it
                self._lock = lock.hold(self.workdir, "the run")
            try:
                self.manager = self._open_manager()
            except BaseException:
                self._release_lock()
                raise

    @property
    def checkpoints(self) -> pathlib.Path:
        return self.workdir / "checkpoints"

    def _open_manager(self) -> ocp.CheckpointManager:
        options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True, cleanup_tmp_directories=True)
        return ocp.CheckpointManager(self.checkpoints, options=options)

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

    def _resume_phrase(self) -> str:
        """What re-running does, from the checkpoints on disk now (a failed save leaves only
        orbax's temporary directory, which is not a step)."""
        steps = sorted(int(p.name) for p in self.checkpoints.glob("*") if p.name.isdigit() and p.is_dir()) \
            if self.checkpoints.is_dir() else []
        if not steps:
            return "re-running the command starts this run again (no epoch of it was saved yet)"
        return (f"re-running the command resumes from the last good checkpoint, epoch {steps[-1] + 1} "
                f"({self.checkpoints / str(steps[-1])})")

    def _read(self, step: int, abstract_state) -> tuple[Any, dict | None, str | None]:
        """Checkpoint ``step`` read back as ``(state, meta, None)``, or ``(None, None, cause)``
        when it cannot be read or its state is not what was saved (its recorded fingerprint;
        checkpoints of an older kdjax have none). A readable checkpoint of another run raises
        ``ResumeMismatchError``: that is not damage."""
        try:
            with orbax_quiet():
                meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            run = meta["run"]
        except Exception as err:  # noqa: BLE001 -- any failure to read it is what is reported
            return None, None, f"its metadata cannot be read: {brief(err)}"
        self._check_identity(run)
        try:
            with orbax_quiet():
                target, absent = _restore_target(abstract_state, self.checkpoints / str(step) / "state")
                state = self.manager.restore(
                    step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
                if dataclasses.is_dataclass(abstract_state):
                    state = dataclasses.replace(abstract_state, **state, **{k: {} for k in absent})
        except Exception as err:  # noqa: BLE001 -- orbax and TensorStore raise many types for damaged files
            if "tree structures do not match" in str(err):  # orbax's words: readable, laid out otherwise
                raise ResumeMismatchError(
                    f"{self.checkpoints / str(step)} holds a train state laid out otherwise than this kdjax's "
                    f"({brief(err)}); resume it with the kdjax that wrote it, or use another --out") from err
            return None, None, f"its state cannot be read: {brief(err)}"
        want = meta.get("state_fingerprint")
        if want is not None and checkpoint.fingerprint(distributed.to_host(state)) != want:
            return None, None, "its state reads back other values than were saved (fingerprint differs)"
        return state, meta, None

    def _set_aside(self, damaged: Sequence[tuple[int, str]], resume_epoch: int) -> None:
        """Rename each damaged checkpoint out of orbax's step names (``3`` -> ``3.damaged-<time>``:
        never listed, cleaned up or counted against ``max_to_keep``), saying so in one line each."""
        if distributed.is_primary():
            stamp = time.strftime("%Y%m%d-%H%M%S")
            for step, cause in damaged:
                source = self.checkpoints / str(step)
                target = source.with_name(f"{step}.damaged-{stamp}")
                n = 1
                while target.exists():
                    target, n = source.with_name(f"{step}.damaged-{stamp}-{n}"), n + 1
                with writing("(renaming a damaged checkpoint)", source, self._resume_phrase):
                    source.rename(target)
                self.log(f"checkpoint {source} (epoch {step + 1}) is damaged, {cause}; set aside as {target.name}, "
                         f"resuming from epoch {resume_epoch}'s checkpoint")
        distributed.barrier("kdjax.engine.store.set_aside")
        self.manager.reload()

    def restore(self, abstract_state):
        """The newest intact saved state (shaped and placed like ``abstract_state``), or None
        when the run has no checkpoint yet. Damaged newer checkpoints are set aside
        (``_set_aside``); with no intact one, ``DamagedCheckpointError`` and nothing moved."""
        damaged: list[tuple[int, str]] = []
        state = saved = None
        for step in sorted(self.manager.all_steps(), reverse=True):
            state, saved, cause = self._read(step, abstract_state)
            distributed.check_same(cause is None, f"the processes disagree whether {self.checkpoints / str(step)} "
                                                  "is readable: do they all see the same files?")
            if cause is None:
                break
            damaged.append((step, cause))
        if saved is None:
            if not damaged:
                return None
            listed = "; ".join(f"{self.checkpoints / str(s)} (epoch {s + 1}): {c}" for s, c in damaged)
            raise DamagedCheckpointError(
                f"no checkpoint of {self.workdir} can be read back intact: {listed}. Nothing was moved. To train "
                f"this run again from epoch 1, move these checkpoints out of {self.checkpoints} (keep them to "
                f"inspect) and re-run the command")
        self.start_epoch = step + 1
        if damaged:
            self._set_aside(damaged, self.start_epoch)
        self.history, self.best_acc, self.best_epoch = saved["history"], saved["best_val_acc"], saved["best_epoch"]
        self._write_metrics_if_behind()
        with writing("train.log", self.workdir / "train.log", self._resume_phrase):
            self.log(f"resuming {self.workdir} after epoch {self.start_epoch}/{self.config.num_epochs}")
        return state

    def _metrics(self) -> dict:
        return {"run": self.run_meta, "history": self.history,
                "best_val_acc": self.best_acc, "best_epoch": self.best_epoch}

    def _write_metrics(self) -> None:
        path = self.workdir / "metrics.json"
        if distributed.is_primary():  # orbax checkpoints are written by all processes, files by one
            with writing("metrics.json", path, self._resume_phrase):
                checkpoint.write_text_atomic(path, json.dumps(self._metrics(), indent=1) + "\n")

    def _write_metrics_if_behind(self) -> None:
        """Rewrite metrics.json from the restored checkpoint when it holds other epochs (its write
        failed after the checkpoint's, or the newest checkpoint was set aside)."""
        try:
            written = json.loads((self.workdir / "metrics.json").read_text())["history"]
        except (OSError, ValueError, KeyError, TypeError):
            written = None
        if written != self.history:
            self._write_metrics()

    def log(self, msg: str) -> None:
        """A line of this run: on the console after its label, in its train.log as it is."""
        if distributed.is_primary():  # one train.log and one console per run, however many processes
            log_line(self.label, self.workdir, msg)

    def end_epoch(self, epoch: int, state, record: dict, save_best: Callable[[pathlib.Path, dict], None]) -> None:
        """Record epoch ``epoch`` (0-based): the best model first (``save_best(directory,
        provenance)`` when val accuracy improved), then the checkpoint with its state's
        fingerprint, then metrics.json, so a crash at any point leaves a consistent directory to
        resume from; a failed write raises ``StoreWriteError``."""
        self.history.append(record)
        acc = record["val_ema" if self.config.select == "ema" else "val"]["acc"]  # --select
        if acc > self.best_acc:  # strict: the first epoch reaching the best accuracy is kept
            self.best_acc, self.best_epoch = acc, epoch + 1
            with writing(f"epoch {epoch + 1}'s best model", self.workdir / "best", self._resume_phrase):
                save_best(self.workdir / "best", {
                    "epoch": epoch + 1,
                    "val_acc": acc,
                    "teacher_fingerprint": self.run_meta["teacher_fingerprint"],
                    "config": self.run_meta["config"],
                })
        meta = {**self._metrics(), "state_fingerprint": checkpoint.fingerprint(distributed.to_host(state))}
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        with writing(f"epoch {epoch + 1}'s checkpoint", self.checkpoints / str(epoch), self._resume_phrase):
            self.manager.save(epoch, args=args)
            self.manager.wait_until_finished()
        self._write_metrics()
        with writing("train.log", self.workdir / "train.log", self._resume_phrase):
            self.log(epoch_line(record, self.config.num_epochs))
        distributed.barrier("kdjax.engine.store.end_epoch")  # no process reads ahead of process 0's files

    def result(self) -> RunResult:
        return RunResult(history=self.history, best_val_acc=self.best_acc, best_epoch=self.best_epoch,
                         workdir=self.workdir)

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def close(self) -> None:
        """Finish orbax's work and give the directory's lock back. After a failed save orbax
        raises the save's disk error again here; the write that failed has reported it."""
        try:
            with orbax_quiet():
                self.manager.close()
        except Exception as err:
            if write_errno(err) is None:
                raise
        finally:
            self._release_lock()


def _restore_target(abstract_state, path: pathlib.Path) -> tuple[dict, list[str]]:
    """What to restore ``path`` (a checkpoint's state) into: ``abstract_state``'s fields as a
    dict, less the fields it does not hold on disk (a field added after it was written, such as
    the EMA). Those must be empty in ``abstract_state`` (nothing to restore), and come back as
    ``{}``; a missing field with values is another layout, which orbax then refuses. A state that
    is not a dataclass is restored as it is."""
    if not dataclasses.is_dataclass(abstract_state):
        return abstract_state, []
    fields = {f.name: getattr(abstract_state, f.name) for f in dataclasses.fields(abstract_state)}
    try:
        on_disk = set(ocp.StandardCheckpointer().metadata(path).item_metadata.keys())
    except Exception:  # noqa: BLE001 -- unreadable metadata: the restore itself says what is wrong
        return fields, []
    absent = [k for k in fields if k not in on_disk and not jax.tree.leaves(fields[k])]
    return {k: v for k, v in fields.items() if k not in absent}, absent


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
    size = run.config.image_size
    # a padded crop's student was evaluated on its images as they are: its model directory says so
    augment = run.config.augment
    inputs = None if augment.crop == "resized" else dataclasses.replace(
        models.get(student_arch).input, crop_size=size, resize_size=size)
    if augment.normalization is not None:  # --mean/--std: evaluate and predict normalise as training did
        inputs = dataclasses.replace(inputs or models.get(student_arch).input, mean=augment.mean, std=augment.std)
    checkpoint.save_model(
        directory, host, arch=student_arch, class_names=dataset.class_names, image_size=size, inputs=inputs,
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
            with writing("the test score", result.workdir / TEST_FILE,
                         lambda: "re-running the command scores the trained run again"):
                checkpoint.write_text_atomic(result.workdir / TEST_FILE, json.dumps(record, indent=1) + "\n")
                log_line(label, result.workdir, f"test: {record['acc']:.4f} ({correct}/{labels.size}) with the "
                         f"epoch-{record['selected_epoch']} model selected on val")
        scored.append(dataclasses.replace(result, test=record))
    return scored
