"""Where a study's time outside its epochs goes, phase by phase, over whole processes.

    python -m benchmarks.startup --runs 5 --out /tmp/startup.jsonl -- \\
        --alpha 0.5 --n_exp 1 --num_epochs 3 --image_size 112 --init scratch \\
        --teacher_file T --data_dir ../shared/data/hymenoptera_data --out /tmp/study

Each run starts ``python -m experiments.paper FLAGS`` in a fresh process (after one warm-up run
that fills the decode and compile caches; the study's ``--out`` is removed before every run, so
each trains from scratch) with timers wrapped around the functions each phase calls. A phase
that this checkout does not have (an older or newer kdjax) is left out, so the same script
measures two trees: run it with ``--tree DIR`` to import kdjax from another checkout. Phases:

- ``launch``: from the parent's spawn to the first line of the child's Python;
- ``imports``: importing the command and the library it uses;
- ``data``, ``teacher_load``, ``student_init``, ``teacher_val``: loading the data, the teacher,
  the student's initial weights, and the teacher's pass over the validation views;
- ``setup``: the step's spec and placing data and teacher on the devices (the teacher's pass
  inside it is ``teacher_val``); ``states``: the runs' initial train states and groups;
- ``restore``: opening each run's checkpoints (none to restore in a fresh study);
- ``checkpoint``: orbax's epoch saves and waits; ``best_model``: best-model saves;
- ``events``, ``summary``, ``plots``, ``recipe``: TensorBoard files, tables, figures, recipe.toml;
- ``epochs``: the runs' epochs as their records time them (``seconds`` x ``runs_together``);
- ``other``: the rest of the child's time; ``exit``: from the child's last line to its exit.

``fixed`` is everything but ``epochs``. Medians over the runs are printed as a table.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import time

# (phase, module, attribute path): the first that exists in the checkout is wrapped
WRAPS = (
    ("data", "kdjax.data.batches", "load_splits"),
    ("teacher_load", "kdjax.engine.teachers", "load_teacher"),
    ("teacher_load", "kdjax.protocol", "load_teacher"),
    ("student_init", "kdjax.weights", "initial_variables"),
    ("teacher_val", "kdjax.engine.evaluation", "teacher_eval_outputs"),
    ("teacher_val", "kdjax.train", "teacher_eval_outputs"),
    ("setup", "kdjax.engine.trainer", "Trainer.place"),
    ("setup", "kdjax.train", "_setup"),
    ("setup", "kdjax.engine.step", "step_spec_for"),
    ("setup", "kdjax.train", "step_spec_for"),
    ("states", "kdjax.engine.trainer", "Trainer.initial_state"),
    ("states", "kdjax.train", "create_train_state"),
    ("states", "kdjax.engine.trainer", "Trainer.group"),
    ("states", "kdjax.train", "layout_for"),
    ("restore", "kdjax.engine.store", "RunStore.__init__"),
    ("restore", "kdjax.engine.store", "RunStore.restore"),
    ("restore", "kdjax.train", "RunStore.__init__"),
    ("restore", "kdjax.train", "RunStore.restore"),
    ("checkpoint", "orbax.checkpoint", "CheckpointManager.save"),
    ("checkpoint", "orbax.checkpoint", "CheckpointManager.wait_until_finished"),
    ("checkpoint", "orbax.checkpoint", "CheckpointManager.close"),
    ("best_model", "kdjax.checkpoint", "save_model"),
    ("events", "kdjax.events", "EpochEvents.write"),
    ("events", "kdjax.report", "EpochEvents.write"),
    ("summary", "kdjax.report", "write_summary"),
    ("plots", "kdjax.report", "plot_curves"),
    ("recipe", "kdjax.cli.recipe", "write"),
)
IMPORTS = ("kdjax.cli.distill", "kdjax.protocol", "kdjax.report", "kdjax.engine", "kdjax.train")


_STACK: list[list[float]] = []  # per open timed call: [start, time spent in timed calls inside it]


def _wrap(totals: dict, phase: str, owner, name: str) -> None:
    """Time ``owner.name`` into ``totals[phase]``, exclusively: a timed call inside another
    counts for its own phase only (the teacher's pass inside the setup is ``teacher_val``)."""
    original = getattr(owner, name)

    @functools.wraps(original)
    def timed(*args, **kwargs):
        frame = [time.perf_counter(), 0.0]
        _STACK.append(frame)
        try:
            return original(*args, **kwargs)
        finally:
            _STACK.pop()
            elapsed = time.perf_counter() - frame[0]
            totals[phase] = totals.get(phase, 0.0) + elapsed - frame[1]
            if _STACK:
                _STACK[-1][1] += elapsed

    setattr(owner, name, timed)


def child(report: pathlib.Path, argv: list[str]) -> None:
    """Run the study in this process with the phase timers; write the phases to ``report``."""
    start_wall, start = time.time(), time.perf_counter()
    totals: dict[str, float] = {}
    for module in IMPORTS:
        try:
            importlib.import_module(module)
        except ImportError:
            pass
    totals["imports"] = time.perf_counter() - start
    wrapped = set()
    for phase, module, path in WRAPS:
        try:
            owner = importlib.import_module(module)
        except ImportError:
            continue
        *parents, name = path.split(".")
        for parent in parents:
            owner = getattr(owner, parent, None)
        if owner is None or not hasattr(owner, name) or (id(owner), name) in wrapped:
            continue
        wrapped.add((id(owner), name))
        _wrap(totals, phase, owner, name)
    from kdjax.cli import distill, flags

    code = distill.main(argv, prog="python -m experiments.paper")
    totals["child"] = time.perf_counter() - start
    report.write_text(json.dumps({"phases": totals, "start_wall": start_wall, "end_wall": time.time(),
                                  "code": code}))
    # leave as the command does (``kdjax.distributed.exit_with``): what that costs is ``exit``
    flags.exit_with(lambda: code, "experiments.paper")


def _epochs(out: pathlib.Path) -> float:
    """The epochs' time of every run under ``out``, from their records."""
    total = 0.0
    for path in out.rglob("metrics.json"):
        # a record's seconds are its epoch's wall divided among the runs trained together
        total += sum(record["seconds"] for record in json.loads(path.read_text())["history"])
    return total


def one_run(tree: pathlib.Path, study_out: pathlib.Path, argv: list[str], scratch: pathlib.Path) -> dict:
    shutil.rmtree(study_out, ignore_errors=True)
    report = scratch / f"phases-{os.getpid()}-{time.time_ns()}.json"
    env = {**os.environ, "PYTHONPATH": str(tree)}
    spawn = time.time()
    # run as a script: its folder, then PYTHONPATH's tree, come before the installed kdjax
    proc = subprocess.run([sys.executable, __file__, "--child", str(report), "--", *argv], cwd=tree, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    end = time.time()
    if proc.returncode != 0 or not report.is_file():
        raise RuntimeError(f"the study failed ({proc.returncode}): {proc.stderr[-2000:]}")
    got = json.loads(report.read_text())
    phases = dict(got["phases"])
    child_total = phases.pop("child")
    phases["launch"] = got["start_wall"] - spawn
    phases["exit"] = end - got["end_wall"]
    phases["epochs"] = _epochs(study_out)
    counted = sum(v for k, v in phases.items() if k not in ("launch", "exit"))
    phases["other"] = child_total - counted
    phases["wall"] = end - spawn
    phases["fixed"] = phases["wall"] - phases["epochs"]
    return phases


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        rest = argv[3:] if argv[2:3] == ["--"] else argv[2:]
        child(pathlib.Path(argv[1]), rest)
        return
    split = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(prog="python -m benchmarks.startup", description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--tree", type=pathlib.Path, default=pathlib.Path(__file__).resolve().parents[1],
                   help="the checkout whose kdjax is measured (default: this one)")
    p.add_argument("--out", type=pathlib.Path, default=None, help="append each run's phases as a JSON line")
    args = p.parse_args(argv[:split])
    study = argv[split + 1:]
    if "--out" not in study:
        raise SystemExit("give the study's --out after --")
    study_out = pathlib.Path(study[study.index("--out") + 1])
    scratch = pathlib.Path(os.environ.get("TMPDIR", "/tmp"))
    one_run(args.tree, study_out, study, scratch)  # warm-up: decode and compile caches
    runs = []
    for i in range(args.runs):
        runs.append(one_run(args.tree, study_out, study, scratch))
        if args.out is not None:
            with open(args.out, "a") as f:
                f.write(json.dumps({"tree": str(args.tree), "run": i, **runs[-1]}) + "\n")
    keys = [k for k in ("launch", "imports", "data", "teacher_load", "student_init", "teacher_val", "setup", "states",
                        "restore",
                        "checkpoint", "best_model", "events", "summary", "plots", "recipe", "other", "exit",
                        "fixed", "epochs", "wall") if any(k in r for r in runs)]
    print(f"| phase (median of {len(runs)}, s) | {args.tree} |\n|:---|---:|")
    for k in keys:
        values = [r.get(k, 0.0) for r in runs]
        print(f"| {k} | {statistics.median(values):.2f} (min {min(values):.2f}, max {max(values):.2f}) |")


if __name__ == "__main__":
    main()
