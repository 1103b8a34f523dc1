"""The study end to end: teacher, n distillation runs per alpha, the seed's table and an honest one.

    kdjax distill --alpha 0.5                 (also: python -m experiments.paper --alpha 0.5)
    kdjax distill --init scratch --data_dir ../shared/data/hymenoptera_data \
        --image_size 112 --out runs/paper112
    kdjax distill --config runs/paper112/recipe.toml --out runs/paper112_again

Flags and defaults are the seed's (``--alpha --n_exp --data_dir --teacher_file --num_epochs
--batch_size --lr --momentum --s_lr_step_size --s_rl_gamma``), with its defects fixed: every
alpha given is used, ``--n_exp 4`` runs 4 experiments, and ``--s_rl_gamma`` defaults to 0.1 (the
seed's text) rather than its published command's 0, which freezes the learning rate at 0 after
epoch 7. Without ``--teacher_file`` the teacher is fine-tuned first into ``OUT/teacher`` (or
reused from there). Re-running with the same ``--out`` resumes unfinished runs. With ``--init
imagenet`` (the default) a missing torchvision file is downloaded by the run, checksummed.
``OUT/recipe.toml`` holds every flag as resolved; ``--config`` reads such a file.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from kdjax.cli import flags as cli
from kdjax.config import STUDENT_TRAIN_MODES

COMMAND = "distill"


def build_parser(prog: str = "kdjax distill") -> argparse.ArgumentParser:
    """Every flag of the command (its own, then the shared ones of ``kdjax.cli.flags``)."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    g = parser.add_argument_group("study")
    g.add_argument("--alpha", type=float, nargs="+", default=None,
                   help="CE weight(s) of the shorthand --loss TERM: alpha*CE + (1-alpha)*TERM "
                        "(default 0 0.5 1); not with weighted terms (--loss ce:1 kd:1)")
    g.add_argument("--n_exp", type=int, default=4, help="independent runs per alpha (seeds seed..seed+n-1)")
    g.add_argument("--teacher_file", nargs="+", default=None,
                   help="the teacher(s): a model directory (its meta.json names the architecture), a "
                        "training run's directory (its best/), or a PyTorch file of --teacher_arch "
                        "(state_dict or whole model); several: an ensemble (--teacher_combine); "
                        "default: fine-tune one into OUT/teacher")
    g.add_argument("--teacher_arch", nargs="+", type=cli.arch_name, choices=cli.arch_choices(), default=None,
                   help="the teacher's architecture, or one per --teacher_file (default: a model "
                        "directory's own, else resnet50)")
    g.add_argument("--teacher_combine", choices=("mean", "sum"), default="mean",
                   help="several teachers: distil towards their mean probabilities (mean), or sum "
                        "each teacher's distillation terms (sum, as big_vision)")
    g.add_argument("--student_arch", type=cli.arch_name, choices=cli.arch_choices(), default="resnet18")
    g.add_argument("--student_train", choices=STUDENT_TRAIN_MODES, default="fc",
                   help="fc: the seed (head only, BatchNorm statistics still update); "
                        "fc_frozen_bn: frozen backbone; all: full fine-tuning")
    cli.add_loss_flags(parser)
    g.add_argument("--init", default="imagenet",
                   help="starting weights of student and teacher: imagenet (torchvision), scratch, or for the "
                        "student timm:NAME (timm's weights, e.g. timm:resnet18.a1_in1k) or a file")
    g.add_argument("--out", default="runs/paper", help="output directory (resumed if present)")
    g.add_argument("--teacher_cache", default=None, metavar="DIR",
                   help="store the teacher's logits on the training views in DIR on first use and read "
                        "them afterwards: a later study over the same seeds (another alpha or loss) skips "
                        "the teacher's pass and trains identically (logit losses only)")
    g.add_argument("--no_plots", action="store_true", help="skip the PNG figures")
    g.add_argument("--vectorize", choices=("auto", "on", "off"), default="auto",
                   help="train all runs together as one vmapped program (same metrics; one teacher "
                        "pass per seed and step). auto: on for GPU/TPU; on CPU, on where the runs "
                        "share a frozen backbone (--student_train fc/fc_frozen_bn with a logit loss, "
                        "where it is faster: benchmarks/README.md), else off")
    cli.add_shared_flags(parser, gamma=0.1)
    return parser


def main(argv=None, prog: str = "kdjax distill") -> int:
    return cli.run_command(build_parser(prog), argv, COMMAND, _distill)


def _distill(args, parser) -> int:
    with cli.out_lock(args):  # first, before anything is written to --out
        return _study(args, parser)


def _study(args, parser) -> int:
    import pathlib

    from kdjax import protocol, report
    from kdjax.config import DistillConfig
    from kdjax.engine import EngineOptions, groups, teachers

    distill = DistillConfig(alpha=(args.alpha or [0.0])[0], loss=cli.loss_name(args),
                            hparams=cli.loss_hparams(args), student_train=args.student_train,
                            pairs=cli.loss_pairs(args), teacher_combine=args.teacher_combine)
    alphas = args.alpha or ([distill.alpha] if distill.weighted else [0.0, 0.5, 1.0])
    config = protocol.PaperConfig(
        alphas=tuple(alphas),
        n_exp=args.n_exp,
        init=args.init,
        student_arch=args.student_arch,
        train=cli.train_config(args, args.student_arch, distill),
    )
    for alpha in config.alphas:  # validate every alpha before any work
        config.run_config(alpha, 0)
    dataset = cli.recipe_and_data(args, parser, COMMAND, args.student_arch)
    out = pathlib.Path(args.out)
    teacher_paths = args.teacher_file
    teacher_archs = teachers.teacher_archs(args.teacher_arch, len(teacher_paths or [None]))
    engine_options = EngineOptions(scan_epochs=cli.scan_epochs(args))
    if teacher_paths is None:
        teacher_init = "scratch" if args.init == "scratch" else "imagenet"
        teacher_arch = teacher_archs[0] or protocol.TEACHER_ARCH
        # the seed fine-tuned its teacher with the same recipe as the students
        result = protocol.fine_tune_teacher(dataset, config.train, teacher_init, out / "teacher", teacher_arch,
                                            options=engine_options, tensorboard_dir=out / "tensorboard" / "teacher")
        print(f"teacher: best val accuracy {result.best_val_acc:.6f} at epoch {result.best_epoch}", file=sys.stderr)
        teacher_paths = [out / "teacher" / "best"]
    teacher = teachers.ensemble([teachers.load_teacher(path, dataset, arch)
                                 for path, arch in zip(teacher_paths, teacher_archs)])
    vectorize = args.vectorize == "on" or (args.vectorize == "auto" and (
        cli.accelerated() or groups.can_share_backbone(args.student_train, distill.loss)))
    options = dataclasses.replace(engine_options, vectorize=vectorize, teacher_cache_dir=args.teacher_cache)
    summary = protocol.run_paper(config, dataset, teacher, out, plots=not args.no_plots, options=options)
    if cli.is_primary():
        print(report.summary_markdown(summary))
        print(f"\nwritten: {out.absolute() / 'summary.md'}")
    return 0


if __name__ == "__main__":
    cli.exit_with(main, "kdjax distill")
