"""The study's protocol: fine-tune the teacher, distil n runs per alpha, summarise.

``experiments.teacher`` and ``experiments.paper`` are thin command lines over ``fine_tune_teacher``
and ``run_paper``. Everything lands under one output directory and every piece resumes: a
finished run is read back, an interrupted one continues from its last epoch checkpoint.

    OUT/teacher/            the teacher's fine-tuning run; OUT/teacher/best is its model dir
    OUT/alpha_<a>/run_<r>/  one distillation run: metrics.json, checkpoints/, best/ (student)
    OUT/tensorboard/alpha_<a>/run_<r>/   its TensorBoard events, written as each epoch ends
    OUT/summary.md, OUT/summary.json, OUT/plots/*.png

A teacher run in W writes its events into ``W/tensorboard/`` as each epoch ends
(``fine_tune_teacher``'s ``tensorboard_dir``; ``OUT/tensorboard/teacher`` puts the study's
teacher beside its students under one ``tensorboard --logdir OUT/tensorboard``). The events of
a resumed run continue its earlier ones without repeating an epoch (``kdjax.events.EpochEvents``).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax

from kdjax import data, distributed, events, models, report, weights
from kdjax.config import TrainConfig
from kdjax.engine import EngineOptions, Run, RunResult, Teacher, loop, teachers

TEACHER_ARCH = teachers.DEFAULT_ARCH  # the seed's pair; any two registered architectures work
STUDENT_ARCH = "resnet18"


@dataclasses.dataclass(frozen=True)
class PaperConfig:
    """The whole study: ``n_exp`` runs for each alpha, run r seeded ``train.seed + r``.

    The same seeds are used for every alpha, so alphas are compared on the same initial heads
    and the same augmented views (a paired design).
    """

    alphas: tuple[float, ...] = (0.0, 0.5, 1.0)
    n_exp: int = 4
    train: TrainConfig = TrainConfig()
    init: str = "imagenet"  # the student's starting weights: imagenet | scratch | PATH
    student_arch: str = STUDENT_ARCH

    def __post_init__(self):
        models.get(self.student_arch)  # a clear error for an unknown --student_arch
        if not self.alphas:
            raise ValueError("--alpha needs at least one value")
        if len(set(self.alphas)) != len(self.alphas):
            raise ValueError(f"--alpha has repeated values: {list(self.alphas)}")
        if self.n_exp < 1:
            raise ValueError(f"--n_exp must be >= 1, got {self.n_exp}")
        if self.train.distill is None:
            raise ValueError("PaperConfig.train needs a DistillConfig")
        d = self.train.distill
        if d.weighted and self.alphas != (d.alpha,):
            raise ValueError(f"--alpha is the CE weight of the shorthand --loss TERM; --loss {d.loss} gives "
                             f"every weight (its CE weight is {d.alpha:g}): leave --alpha out")

    def run_config(self, alpha: float, run: int) -> TrainConfig:
        distill = dataclasses.replace(self.train.distill, alpha=float(alpha))
        return dataclasses.replace(self.train, distill=distill, seed=self.train.seed + run)


def alpha_dir(alpha: float) -> str:
    return f"alpha_{report.alpha_label(alpha)}"


def fine_tune_teacher(
    dataset: data.Dataset, config: TrainConfig, init: str, workdir: str | pathlib.Path,
    arch: str = TEACHER_ARCH, *, options: EngineOptions = EngineOptions(),
    tensorboard_dir: str | pathlib.Path | None = None,
) -> RunResult:
    """Supervised fine-tuning of the teacher ``arch`` (all layers); ``workdir/best`` is the
    teacher's model directory. Its TensorBoard events go to ``tensorboard_dir`` (by default
    ``workdir/tensorboard``) as each epoch ends."""
    config = dataclasses.replace(config, distill=None)
    variables, provenance = weights.initial_variables(
        init, arch, len(dataset.class_names), jax.random.key(config.seed),
        image_size=config.image_size,
    )
    workdir = pathlib.Path(workdir)
    run = Run(config, workdir, variables, {"role": "teacher", **provenance})
    logdir = workdir / "tensorboard" if tensorboard_dir is None else pathlib.Path(tensorboard_dir)
    return _train_with_events([run], [logdir], dataset, student_arch=arch, options=options)[0]


def _history(workdir: pathlib.Path) -> list[dict]:
    """The epoch records of a run's ``metrics.json`` (none before its first epoch)."""
    path = workdir / "metrics.json"
    return json.loads(path.read_text())["history"] if path.is_file() else []


def _train_with_events(runs: list[Run], logdirs: list[pathlib.Path] | None, dataset: data.Dataset,
                       **kwargs) -> list[RunResult]:
    """``kdjax.engine.train_runs`` writing run k's TensorBoard events under ``logdirs[k]`` as each of its
    epochs ends (process 0 only; no events with ``logdirs`` None).

    A run's writer opens at its first new epoch: a resumed run's earlier records (its
    metrics.json, written before the callback) and earlier event files go to
    ``kdjax.events.EpochEvents.write``, which continues them without repeating an epoch. A run that had
    finished before this call gets its events written only if its files lack epochs. The
    writers are closed however training ends, so an interrupted run keeps its events.
    """
    if logdirs is None or not distributed.is_primary():
        return loop.train_runs(runs, dataset, **kwargs)
    histories: dict[int, list[dict]] = {}

    def on_epoch(k: int, record: dict) -> None:
        if k not in histories:
            histories[k] = [r for r in _history(runs[k].workdir) if r["epoch"] < record["epoch"]]
        histories[k].append(record)
        writers.write(logdirs[k], histories[k])

    with events.EpochEvents() as writers:
        results = loop.train_runs(runs, dataset, on_epoch=on_epoch, **kwargs)
        for logdir, result in zip(logdirs, results):
            writers.write(logdir, result.history)
    return results


def _student_run(config: PaperConfig, dataset: data.Dataset, out: pathlib.Path, alpha: float, run: int) -> Run:
    """Run ``run`` of ``alpha``: its config, directory and initial student (drawn from its seed, so
    the alphas of one run start from the same student)."""
    run_config = config.run_config(alpha, run)
    student, provenance = weights.initial_variables(
        config.init, config.student_arch, len(dataset.class_names), jax.random.key(run_config.seed),
        image_size=run_config.image_size,
    )
    return Run(run_config, out / alpha_dir(alpha) / f"run_{run}", student,
                     {"role": "student", "alpha": alpha, "run": run, **provenance})


def run_paper(
    config: PaperConfig,
    dataset: data.Dataset,
    teacher: Teacher,
    out: str | pathlib.Path,
    *,
    plots: bool = True,
    tensorboard: bool = True,
    options: EngineOptions = EngineOptions(vectorize=False),
) -> dict | None:
    """Every (alpha, run) of the study with its event files written as each epoch ends, then
    ``summary.{md,json}`` and plots.

    ``options.vectorize`` trains the runs together (``kdjax.engine``'s groups: same metrics, one
    teacher pass per seed and step); otherwise one after another. Either way resumes the other's
    directories. Returns the summary (as written to ``summary.json``); in a multi-process run
    process 0 alone writes summary, plots and event files, and the others return None.
    """
    out = pathlib.Path(out).absolute()
    if plots and distributed.is_primary():
        report.preload_plotting()  # matplotlib's import, on a thread while the runs train
    jobs = [(a, r) for a in config.alphas for r in range(config.n_exp)]
    runs = [_student_run(config, dataset, out, alpha, run) for alpha, run in jobs]
    logdirs = [out / "tensorboard" / alpha_dir(alpha) / f"run_{run}" for alpha, run in jobs] if tensorboard else None
    results = _train_with_events(runs, logdirs, dataset, student_arch=config.student_arch, teacher=teacher,
                                 options=options)
    runs_by_alpha: dict[float, list[list[dict]]] = {}
    tests_by_alpha: dict[float, list[dict]] = {}
    for (alpha, run), result in zip(jobs, results):
        runs_by_alpha.setdefault(alpha, []).append(result.history)
        if result.test is not None:
            tests_by_alpha.setdefault(alpha, []).append(result.test)

    num_val = dataset["val"].num_examples
    extra = {
        "teacher_arch": "+".join(teacher.archs),
        "teacher_fingerprint": teacher.fingerprint,
        "student_arch": config.student_arch,
        "student_init": config.init,
        "config": config.train.to_json(full=True),
        "alphas": list(config.alphas),
        "n_exp": config.n_exp,
        "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "processes": jax.process_count(),
    }
    if not distributed.is_primary():
        return None
    summary = report.write_summary(out, runs_by_alpha, num_val, extra=extra, tests_by_alpha=tests_by_alpha or None)
    if plots:
        report.plot_curves(out / "plots", runs_by_alpha)
    return summary

