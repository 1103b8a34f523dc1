"""Flags shared by the entry points (data, training recipe, output), and their error exit.

Kept here rather than in kdjax: they are the command-line surface of the experiments, and the
seed's flag names (``--s_lr_step_size``, ``--s_rl_gamma``) are part of that surface.
"""

from __future__ import annotations

import argparse
import logging
import sys

from kdjax.config import OptimConfig


def add_data_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("data")
    g.add_argument("--data_dir", default=None,
                   help="ImageFolder root with train/ and val/ (default: download hymenoptera)")
    g.add_argument("--cache_dir", default=None,
                   help="decode cache and downloads (default $KDJAX_CACHE/datasets or ~/.cache/kdjax)")
    g.add_argument("--image_size", type=int, default=224, help="crop size (eval resize keeps 256/224)")
    g.add_argument("--skip_bad_images", action="store_true",
                   help="leave unreadable images out (listed in a warning) instead of stopping")


def add_recipe_flags(parser: argparse.ArgumentParser, *, gamma: float) -> None:
    g = parser.add_argument_group("training recipe (the seed's defaults)")
    g.add_argument("--num_epochs", type=int, default=25)
    g.add_argument("--batch_size", type=int, default=32)
    g.add_argument("--lr", type=float, default=0.001)
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--s_lr_step_size", "--step_size", dest="step_size", type=int, default=7,
                   help="epochs between learning-rate decays (torch StepLR step_size)")
    g.add_argument("--s_rl_gamma", "--gamma", dest="gamma", type=float, default=gamma,
                   help="learning-rate decay factor (torch StepLR gamma)")
    g.add_argument("--weight_decay", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="compute dtype (default: bfloat16 on GPU/TPU, float32 on CPU)")


def optim_config(args: argparse.Namespace) -> OptimConfig:
    return OptimConfig(lr=args.lr, momentum=args.momentum, step_size=args.step_size,
                       gamma=args.gamma, weight_decay=args.weight_decay)


def train_config(args: argparse.Namespace, distill=None):
    """The run configuration of the recipe flags (a supervised run when ``distill`` is None)."""
    from kdjax.config import TrainConfig

    return TrainConfig(
        optim=optim_config(args), distill=distill, num_epochs=args.num_epochs,
        batch_size=args.batch_size, image_size=args.image_size, seed=args.seed,
        compute_dtype=default_dtype(args.dtype),
    )


def load_data(args: argparse.Namespace):
    from kdjax import data

    return data.load_splits(args.data_dir, image_size=args.image_size, cache_dir=args.cache_dir,
                            skip_bad_images=args.skip_bad_images)


def default_dtype(requested: str | None) -> str:
    import jax

    if requested is not None:
        return requested
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def setup_logging() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    # absl (orbax, tfds) is chatty at INFO/WARNING about routine checkpoint waits
    logging.getLogger("absl").setLevel(logging.ERROR)


def fail(prog: str, err: BaseException) -> int:
    print(f"{prog}: error: {' '.join(str(err).split())}", file=sys.stderr)
    return 2


def _user_errors() -> tuple[type[BaseException], ...]:
    from kdjax.fetch import DownloadError

    # Bad flags, files, folders and downloads, and a diverging run: one line, exit 2. Anything
    # else is a bug and keeps its traceback.
    return (ValueError, OSError, DownloadError, FloatingPointError)


USER_ERRORS = _user_errors()
