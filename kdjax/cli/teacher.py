"""Fine-tune a teacher (the seed's ResNet-50 by default) with the seed's recipe and write its model
directory.

    kdjax teacher --init imagenet --out runs/teacher   (also: python -m experiments.teacher ...)
    kdjax teacher --init scratch --data_dir ../shared/data/hymenoptera_data \
        --image_size 112 --out runs/teacher112

25 epochs, batch 32, SGD lr 0.001 momentum 0.9, StepLR 7 / 0.1, all layers trained; the best
val epoch is kept as ``OUT/best`` (a model directory usable by kdjax.predict and as
``--teacher_file``). Re-running with the same ``--out`` resumes; ``OUT/recipe.toml`` holds every
flag as resolved, and ``--config`` reads such a file.
"""

from __future__ import annotations

import argparse

from kdjax.cli import flags as cli

COMMAND = "teacher"


def build_parser(prog: str = "kdjax teacher") -> argparse.ArgumentParser:
    """Every flag of the command (its own, then the shared ones of ``kdjax.cli.flags``)."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    parser.add_argument("--init", default="imagenet",
                        help="imagenet (torchvision weights), timm:NAME (timm's, e.g. timm:resnet50.a1_in1k), scratch, "
                             "or a model dir / PyTorch file")
    parser.add_argument("--arch", "--teacher_arch", dest="arch", type=cli.arch_name, choices=cli.arch_choices(),
                        default="resnet50", help="the teacher's architecture")
    parser.add_argument("--out", default="runs/teacher", help="work directory (resumed if present)")
    cli.add_shared_flags(parser, gamma=0.1)
    return parser


def main(argv=None, prog: str = "kdjax teacher") -> int:
    return cli.run_command(build_parser(prog), argv, COMMAND, _teacher)


def _teacher(args, parser) -> int:
    with cli.out_lock(args):  # first, before anything is written to --out
        return _fine_tune(args, parser)


def _fine_tune(args, parser) -> int:
    from kdjax import protocol
    from kdjax.engine import EngineOptions

    config = cli.train_config(args, args.arch)
    dataset = cli.recipe_and_data(args, parser, COMMAND, args.arch)
    result = protocol.fine_tune_teacher(dataset, config, args.init, args.out, args.arch,
                                        options=EngineOptions(scan_epochs=cli.scan_epochs(args)))
    if not cli.is_primary():
        return 0
    n = dataset["val"].num_examples
    print(f"teacher: best val accuracy {result.best_val_acc:.6f} = {round(result.best_val_acc * n)}/{n} "
          f"at epoch {result.best_epoch}; model directory {result.workdir / 'best'}")
    return 0


if __name__ == "__main__":
    cli.exit_with(main, "kdjax teacher")
