"""``kdjax evaluate`` (also ``python -m kdjax.evaluate``): a saved model on one split of a dataset.

    python -m kdjax.evaluate --checkpoint DIR (--data_dir D | --data SPEC) [--split val]
        [--val_split SPEC ...] [--out DIR] [--teacher_file F [--teacher_arch A]] [--cache_dir C]
        [--batch_size 32]

Writes ``evaluation.json``, ``evaluation.md`` and ``confusion.png`` into ``--out`` (default:
``eval_<split>`` beside the model directory); see :mod:`kdjax.evaluate`. A bad input (model
directory, data folder, split, classes, teacher) stops with one line ``PROG: error: ...`` on
stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from kdjax.cli import flags


def build_parser(prog: str = "python -m kdjax.evaluate") -> argparse.ArgumentParser:
    from kdjax import models
    from kdjax.evaluate import SPLITS

    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, metavar="DIR",
                        help="a kdjax model directory, or a training run's directory (its best/)")
    parser.add_argument("--split", choices=SPLITS, default="val",
                        help="the split evaluated (with --data, its --<split>_split flag says what it reads)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="output folder (default: eval_<split> beside the model directory)")
    parser.add_argument("--teacher_file", default=None, metavar="PATH",
                        help="a teacher to compare with: model directory, run directory or PyTorch file")
    parser.add_argument("--teacher_arch", choices=sorted(models.ARCHS), default=None, metavar="ARCH",
                        help="the architecture of a PyTorch --teacher_file (a model directory names its own): "
                             + ", ".join(sorted(models.ARCHS)))
    flags.add_data_flags(parser, training=False)
    g = parser.add_argument_group("evaluation")
    flags.add_batch_size(g)
    flags.add_dtype(g, "compute dtype (default: the one the model's training run validated in)")
    flags.add_runtime_flags(parser)
    flags.add_console_flags(parser)
    return parser


def eval_config(args: argparse.Namespace):
    """The ``kdjax.evaluate.EvalConfig`` of the parsed flags (also ``kdjax.api.evaluate``'s)."""
    from kdjax import evaluate
    from kdjax.data import sources

    return evaluate.EvalConfig(args.checkpoint, args.data_dir, args.split, args.cache_dir, args.batch_size,
                               args.teacher_file, args.teacher_arch, args.dtype, args.skip_bad_images,
                               data=args.data, source=sources.options_from_flags(args))


def main(argv: Sequence[str] | None = None, prog: str = "python -m kdjax.evaluate") -> int:
    args = flags.parse(build_parser(prog), argv, command="evaluate")
    from kdjax import evaluate

    try:
        record = evaluate.evaluate(eval_config(args))
        paths = evaluate.write_report(record, args.out)
    except (ValueError, OSError, ImportError) as err:  # ModelDirError and DataError are ValueErrors
        return flags.fail(prog, err)
    print(evaluate.summary(record))
    print(f"wrote {', '.join(str(p) for p in paths)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
