"""The CIFAR-100 distillation table as mdistiller publishes it: six teacher -> student pairs, KD
and DKD, each over N seeds trained together (vectorised), kdjax's figures beside the published.

    python -m benchmarks.cifar100_table --teachers download_ckpts/cifar_teachers \\
        --data tfds:cifar100 --seeds 3 --out runs/cifar100

``--teachers`` is mdistiller's ``cifar_teachers.tar`` unpacked: ``<arch>_vanilla/ckpt_epoch_240.pth``
for resnet56, resnet110, resnet32x4, wrn_40_2 and vgg13 (RepDistiller's training-loop dicts; kdjax
reads them without torch). Each is converted once into ``OUT/teachers/<arch>`` with the data's class
names. ``--data`` is any ``--data`` spec; tfds's ``cifar100`` (prepared with ``tfds build cifar100``)
has no validation split, so its ``test`` split is the one scored, as mdistiller scores it.

Every study is ``kdjax.distill(..., recipe="mdistiller_cifar")``: SGD 0.05, 240 epochs, x0.1 at
150/180/210, batch 64, wd 5e-4, pad-4 crops. KD is CE 0.1 + KD 0.9 at T 4 (the recipe's loss); DKD
is CE 1 + DKD (alpha 1, beta per pair as mdistiller's configs/cifar100/dkd/*.yaml give it, T 4,
warm-up 20). The figure is each run's best val accuracy (mdistiller's "best_acc": the best test
top-1 over the epochs), as mean +/- standard deviation over the seeds. ``OUT/table.md`` and
``OUT/table.json`` hold the table; a study already finished in ``OUT`` is read, not rerun (an
interrupted one resumes). ``--num_epochs`` shortens the schedule (the milestones must stay inside
it: pass ``--milestones`` too) for a smoke run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import statistics
import sys
import time


@dataclasses.dataclass(frozen=True)
class Pair:
    teacher: str
    student: str
    dkd_beta: float  # mdistiller's configs/cifar100/dkd/<pair>.yaml (8, its default, where none is given)


PAIRS = (
    Pair("resnet56", "resnet20", 2.0),
    Pair("resnet110", "resnet32", 2.0),
    Pair("resnet32x4", "resnet8x4", 8.0),
    Pair("wrn_40_2", "wrn_16_2", 6.0),
    Pair("wrn_40_2", "wrn_40_1", 6.0),
    Pair("vgg13", "vgg8", 6.0),
)
# mdistiller's README (CIFAR-100 top-1, mean of its runs)
PUBLISHED = {
    "kd": (70.66, 73.08, 73.33, 74.92, 73.54, 72.98),
    "dkd": (71.97, 74.11, 76.32, 76.23, 74.81, 74.68),
}
METHODS = ("kd", "dkd")


def method_flags(method: str, pair: Pair) -> dict:
    """The loss flags of ``method`` on top of the mdistiller_cifar recipe (whose loss is KD's)."""
    if method == "kd":
        return {}
    return {"loss": ["ce:1", "dkd:1"], "dkd_alpha": 1.0, "dkd_beta": pair.dkd_beta, "temperature": 4.0,
            "warmup": 20.0}


def teacher_dir(teachers: pathlib.Path, arch: str, out: pathlib.Path, class_names) -> pathlib.Path:
    """mdistiller's checkpoint of ``arch`` as a kdjax model directory (converted once)."""
    from kdjax import weights

    target = out / "teachers" / arch
    if not (target / "meta.json").is_file():
        src = teachers / f"{arch}_vanilla" / "ckpt_epoch_240.pth"
        if not src.is_file():
            raise SystemExit(f"cifar100_table: no teacher {src} (--teachers is mdistiller's cifar_teachers.tar "
                             f"unpacked: <arch>_vanilla/ckpt_epoch_240.pth)")
        weights.convert(src, target, arch=arch, class_names=class_names)
    return target


def run_study(args, pair: Pair, method: str, teacher: pathlib.Path) -> dict:
    """One pair and method over ``args.seeds`` seeds: its accuracies (percent) and wall time."""
    import kdjax

    out = args.out / f"{pair.teacher}-{pair.student}" / method
    done = out / "table_row.json"
    if done.is_file():
        return json.loads(done.read_text())
    flags = {"n_exp": args.seeds, **method_flags(method, pair), **args.overrides}
    start = time.perf_counter()
    study = kdjax.distill(data=args.data, teacher=teacher, student=pair.student, out=out,
                          recipe="mdistiller_cifar", init="scratch", **flags)
    row = {"teacher": pair.teacher, "student": pair.student, "method": method,
           "accuracy": [100.0 * r.metrics["best_val_acc"] for r in study.runs],
           "seconds": round(time.perf_counter() - start, 1), "flags": {k: str(v) for k, v in flags.items()}}
    done.write_text(json.dumps(row, indent=1))
    return row


def cell(values) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} +/- {statistics.stdev(values):.2f}"


def table(rows, pairs) -> str:
    """Markdown: a row per method, kdjax's mean +/- std and the published figure per pair."""
    head = "| method | " + " | ".join(f"{p.teacher}->{p.student}" for p in pairs) + " |"
    lines = [head, "|---|" + "---|" * len(pairs)]
    for method in METHODS:
        found = {(r["teacher"], r["student"]): r for r in rows if r["method"] == method}
        if not any((p.teacher, p.student) in found for p in pairs):
            continue
        ours = [cell(found[(p.teacher, p.student)]["accuracy"]) if (p.teacher, p.student) in found else "-"
                for p in pairs]
        published = [f"{PUBLISHED[method][PAIRS.index(p)]:.2f}" for p in pairs]
        lines.append(f"| {method.upper()} (kdjax) | " + " | ".join(ours) + " |")
        lines.append(f"| {method.upper()} (mdistiller) | " + " | ".join(published) + " |")
    return "\n".join(lines)


def parse_pairs(text: str) -> tuple[Pair, ...]:
    known = {f"{p.teacher}:{p.student}": p for p in PAIRS}
    chosen = []
    for name in text.split(","):
        if name not in known:
            raise SystemExit(f"cifar100_table: --pairs {name!r} is not one of the table's: {', '.join(known)}")
        chosen.append(known[name])
    return tuple(chosen)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teachers", type=pathlib.Path, required=True,
                        help="mdistiller's cifar_teachers folder (<arch>_vanilla/ckpt_epoch_240.pth)")
    parser.add_argument("--data", default="tfds:cifar100", help="a --data spec (default tfds:cifar100)")
    parser.add_argument("--tfds_data_dir", default=None, help="where tfds's prepared datasets are")
    parser.add_argument("--pairs", type=parse_pairs, default=PAIRS,
                        help="TEACHER:STUDENT,... (default: the six of the table)")
    parser.add_argument("--methods", type=lambda s: tuple(s.split(",")), default=METHODS, help="kd,dkd")
    parser.add_argument("--seeds", type=int, default=3, help="runs per pair and method, trained together")
    parser.add_argument("--out", type=pathlib.Path, required=True)
    parser.add_argument("--num_epochs", type=int, default=None, help="default: the recipe's 240")
    parser.add_argument("--milestones", type=lambda s: [int(v) for v in s.split(",")], default=None)
    parser.add_argument("--batch_size", type=int, default=None, help="default: the recipe's 64")
    parser.add_argument("--cache_dir", default=None)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if set(args.methods) - set(METHODS):
        parser.error(f"--methods {','.join(args.methods)}: choose from {','.join(METHODS)}")
    if args.seeds < 1:
        parser.error(f"--seeds {args.seeds}: at least 1")
    given = {"num_epochs": args.num_epochs, "milestones": args.milestones, "batch_size": args.batch_size,
             "cache_dir": args.cache_dir, "tfds_data_dir": args.tfds_data_dir}
    args.overrides = {k: v for k, v in given.items() if v is not None}
    if args.quiet:
        args.overrides.update(quiet=True, no_plots=True)
    return args


def main(argv=None) -> int:
    from kdjax.data import sources

    args = parse_args(sys.argv[1:] if argv is None else argv)
    args.out.mkdir(parents=True, exist_ok=True)
    options = sources.SourceOptions(tfds_data_dir=args.tfds_data_dir)
    class_names = list(sources.open_data(sources.data_spec(args.data, None), args.cache_dir, options).class_names)
    rows = []
    for pair in args.pairs:
        teacher = teacher_dir(args.teachers, pair.teacher, args.out, class_names)
        for method in args.methods:
            print(f"cifar100_table: {pair.teacher} -> {pair.student}, {method}, {args.seeds} seed(s)",
                  file=sys.stderr, flush=True)
            rows.append(run_study(args, pair, method, teacher))
    text = table(rows, args.pairs)
    (args.out / "table.md").write_text(text + "\n")
    (args.out / "table.json").write_text(json.dumps(rows, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
