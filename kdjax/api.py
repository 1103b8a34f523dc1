"""kdjax as one call: ``kdjax.distill(...)`` runs a study and ``kdjax.evaluate(...)`` scores a model,
each on the command line's own code path (its parser, recipe reading, checks, engine and writes),
with keywords for flags, so that a notebook and a shell get the same runs.

    study = kdjax.distill(data="images", teacher="models/teacher", student="resnet18", out="runs/x",
                          recipe="timm_kd", alpha=0.5, n_exp=2, num_epochs=30)
    study.runs[0].metrics["best_val_acc"], study.runs[0].best    # per run: metrics.json, best/

A keyword is a flag without its dashes (``num_epochs=30``, ``loss=["ce:1", "kd:1"]``); True
turns a switch on, False and None leave a flag out. A bad value raises ValueError with the
command's message instead of exiting.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import pathlib
from typing import Any, Mapping, Sequence


@dataclasses.dataclass(frozen=True)
class RunResult:
    """One run of a study: its directory, its model directory ``best`` and its metrics.json."""

    path: pathlib.Path
    best: pathlib.Path
    metrics: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class StudyResult:
    """What ``distill`` wrote: ``out``, the study's summary.json and every run."""

    out: pathlib.Path
    summary: Mapping[str, Any]
    runs: tuple[RunResult, ...]


def _raise(message: str):
    raise ValueError(message)


def _argv(parser: argparse.ArgumentParser, options: Mapping[str, Any]) -> list[str]:
    actions = {a.dest: a for a in parser._actions if a.option_strings}
    argv: list[str] = []
    for key, value in options.items():
        if value is None or value is False:
            continue
        action = actions.get(key)
        if action is None:
            close = difflib.get_close_matches(key, actions, n=1)
            raise ValueError(f"{parser.prog}: no flag --{key}" + (f" (did you mean {close[0]}?)" if close else ""))
        flag = max(action.option_strings, key=len)
        if action.nargs == 0:  # a switch
            if value is not True:
                raise ValueError(f"{parser.prog}: --{key} is a switch: give True or False, got {value!r}")
            argv.append(flag)
        elif isinstance(value, (list, tuple)):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, os.fspath(value) if isinstance(value, os.PathLike) else str(value)]
    return argv


def _data(data) -> dict:
    """``data`` as its flag: a ``KIND:LOCATION`` spec is ``--data``, a plain path ``--data_dir``."""
    if data is None:
        return {}
    if isinstance(data, os.PathLike) or ":" not in str(data):
        return {"data_dir": os.fspath(data)}
    return {"data": str(data)}


def _parse(parser: argparse.ArgumentParser, options: Mapping[str, Any], command: str) -> argparse.Namespace:
    from kdjax.cli import flags

    parser.error = _raise  # a library call raises instead of exiting
    return flags.parse(parser, _argv(parser, options), command=command)


def distill(*, data: Any = None, out: os.PathLike | str, teacher: os.PathLike | str | Sequence | None = None,
            student: str = "resnet18", recipe: str | None = None, config: os.PathLike | str | None = None,
            **flags_: Any) -> StudyResult:
    """Run ``kdjax distill`` with these flags and return what it wrote. ``data`` is a ``--data``
    spec (``folder:PATH``, ``tfds:NAME``, ``hf:DIR``; a plain path is a folder; None: hymenoptera),
    ``teacher`` the ``--teacher_file`` (one or several; None: fine-tune one), ``student`` an
    architecture name (kdjax's, a registered one, or ``MODULE:ATTRIBUTE``), ``recipe`` a named
    recipe and ``config`` a recipe file; ``flags_`` any other flag of ``kdjax distill --help``."""
    from kdjax.cli import distill as command, flags

    teachers = [teacher] if isinstance(teacher, (str, os.PathLike)) else teacher
    options = {**_data(data), "out": out, "teacher_file": teachers,
               "student_arch": student, "recipe": recipe, "config": config, **flags_}
    parser = command.build_parser("kdjax.distill")
    args = _parse(parser, options, command.COMMAND)
    flags.init_distributed(args)
    status = command._distill(args, parser)
    if status != 0:
        raise RuntimeError(f"kdjax.distill: the study ended with status {status} (see {args.out}/*/train.log)")
    root = pathlib.Path(args.out)
    runs = tuple(RunResult(path.parent, path.parent / "best", json.loads(path.read_text()))
                 for path in sorted(root.glob("alpha_*/run_*/metrics.json")))
    summary = root / "summary.json"
    return StudyResult(root, json.loads(summary.read_text()) if summary.is_file() else {}, runs)


def evaluate(*, checkpoint: os.PathLike | str, data: Any = None, out: os.PathLike | str | None = None,
             **flags_: Any) -> dict:
    """Run ``kdjax evaluate`` on a model or run directory and return its record (what it writes
    to ``out``/evaluation.json when ``out`` is given): accuracy, per-class figures, confusion
    matrix, agreement with a teacher where one is named."""
    from kdjax import evaluate as module
    from kdjax.cli import evaluate as command

    options = {"checkpoint": checkpoint, **_data(data), **flags_}
    record = module.evaluate(command.eval_config(_parse(command.build_parser("kdjax.evaluate"), options, "evaluate")))
    if out is not None:
        module.write_report(record, out)
    return record
