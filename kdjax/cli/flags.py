"""Flags shared by the training entry points (data, training recipe, runtime, output), the
console's verbosity, and their error exit.

The seed's flag names (``--s_lr_step_size``, ``--s_rl_gamma``) are part of this surface. Every
flag can also come from a recipe file (``--config recipe.toml``, :mod:`kdjax.cli.recipe`); a
flag given on the command line wins over the file.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from typing import Iterator

from kdjax.cli import recipe
from kdjax.config import OptimConfig


def add_data_flags(parser: argparse.ArgumentParser, *, training: bool = True) -> None:
    """The data flags; an evaluation (``training=False``) names data that holds the split it
    reads and takes its image size from the model."""
    from kdjax.data import sources

    g = parser.add_argument_group("data")
    g.add_argument("--data", default=None, metavar="SPEC",
                   help="the dataset (default: " + ("download hymenoptera" if training else "--data_dir") + "): "
                        + "; ".join(f"{name}: {spec.help}" for name, spec in sources.SOURCES.items()))
    if training:
        g.add_argument("--data_dir", default=None,
                       help="ImageFolder root with train/ and val/, the same as --data folder:DIR "
                            "(default: download hymenoptera)")
    else:
        g.add_argument("--data_dir", default=None, metavar="DIR",
                       help="an ImageFolder root holding the split's folder (--data folder:DIR)")
    for role, default in (("train", "train"), ("val", "validation, val, valid or test; a folder: val"),
                          ("test", "test where there is one")):
        g.add_argument(f"--{role}_split", default=None, metavar="SPEC",
                       help=f"what {role} reads, in tfds's split syntax (train[:90%%], train[90%%:], train+validation; "
                            f"default: {default})")
    g.add_argument("--tfds_data_dir", default=None, metavar="DIR",
                   help="where --data tfds:NAME is prepared (default tfds's: $TFDS_DATA_DIR or ~/tensorflow_datasets)")
    g.add_argument("--image_column", default=None, metavar="NAME",
                   help="the image feature or column of a tfds or hf dataset (default: its image / supervised key)")
    g.add_argument("--label_column", default=None, metavar="NAME",
                   help="the integer label feature or column of a tfds or hf dataset (default: its label)")
    g.add_argument("--class_names", default=None, metavar="A,B,C",
                   help="names of the labels 0, 1, ... of a tfds or hf dataset (default: its ClassLabel names, "
                        "else the label values)")
    g.add_argument("--cache_dir", default=None,
                   help="decode cache and downloads (default $KDJAX_CACHE/datasets or ~/.cache/kdjax)")
    if training:
        g.add_argument("--image_size", type=int, default=None,
                       help="crop size (default: the student's, 224 for the ResNets; the eval resize "
                            "keeps the architecture's proportion, 256/224)")
    g.add_argument("--skip_bad_images", action="store_true",
                   help="leave unreadable images out (listed in a warning) instead of stopping")
    g.add_argument("--data_in_memory", choices=("auto", "on", "off"), default="auto",
                   help="hold the decoded splits on every device (on), stream each process's rows of every "
                        "batch from the decode cache (off), or hold them when they take at most 25%% of one "
                        "device's memory (auto; on CPU, of the host's RAM shared by its devices)")
    g.add_argument("--verify_data", action="store_true",
                   help="read every file's bytes to identify the data tree at this start (by default a tree "
                        "seen before is recognised by its names, sizes and modification times)")


def add_recipe_flags(parser: argparse.ArgumentParser, *, gamma: float) -> None:
    g = parser.add_argument_group("training recipe (the seed's defaults)")
    g.add_argument("--num_epochs", type=int, default=25)
    add_batch_size(g)
    g.add_argument("--lr", type=float, default=0.001)
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--s_lr_step_size", "--step_size", dest="step_size", type=int, default=7,
                   help="epochs between learning-rate decays (torch StepLR step_size)")
    g.add_argument("--s_rl_gamma", "--gamma", dest="gamma", type=float, default=gamma,
                   help="learning-rate decay factor (torch StepLR gamma)")
    g.add_argument("--weight_decay", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=0)
    add_dtype(g, "compute dtype (default: bfloat16 on GPU/TPU, float32 on CPU)")
    add_optimizer_flags(parser)


def add_optimizer_flags(parser: argparse.ArgumentParser) -> None:
    """The optimiser, the schedule, clipping, accumulation and the EMA (``kdjax.optim``'s
    registries); every default is the seed's recipe."""
    from kdjax import optim

    g = parser.add_argument_group("optimiser and schedule (kdjax.optim)")
    g.add_argument("--optimizer", choices=tuple(optim.OPTIMIZERS), default="sgd",
                   help="; ".join(f"{name}: {spec.help}" for name, spec in optim.OPTIMIZERS.items()))
    g.add_argument("--nesterov", action="store_true", help="Nesterov momentum (sgd, lars)")
    g.add_argument("--betas", type=float, nargs=2, default=[0.9, 0.999], metavar=("BETA1", "BETA2"),
                   help="adamw and lamb's moment decays")
    g.add_argument("--eps", type=float, default=None,
                   help="adamw/lamb's denominator term, lars' trust-ratio term (default: the optimiser's, "
                        + ", ".join(f"{n} {s.eps:g}" for n, s in optim.OPTIMIZERS.items() if s.eps is not None) + ")")
    g.add_argument("--no_decay_norm_bias", action="store_true",
                   help="no weight decay on 1-D parameters: biases and normalisation scales (timm's rule)")
    g.add_argument("--clip_grad_norm", type=float, default=None, metavar="MAX",
                   help="clip the gradient to this global norm first (torch.nn.utils.clip_grad_norm_)")
    g.add_argument("--accum_steps", type=int, default=1, metavar="K",
                   help="one optimiser update every K batches, from their gradients' example-weighted mean "
                        "(one batch of K x --batch_size; each batch's BatchNorm statistics still update)")
    g.add_argument("--schedule", choices=tuple(optim.SCHEDULES), default="step",
                   help="; ".join(f"{name}: {spec.help}" for name, spec in optim.SCHEDULES.items()))
    g.add_argument("--milestones", type=int, nargs="+", default=(), metavar="EPOCH",
                   help="--schedule multistep's epochs (counted from the end of any warm-up)")
    g.add_argument("--min_lr", type=float, default=0.0, help="--schedule cosine's last lr")
    g.add_argument("--warmup_epochs", type=int, default=0,
                   help="a linear warm-up of this many epochs from --warmup_lr before the schedule")
    g.add_argument("--warmup_lr", type=float, default=0.0, help="the warm-up's first lr")
    g.add_argument("--warmup_prefix", choices=("on", "off"), default="on",
                   help="on: the schedule starts after the warm-up (torch's SequentialLR, timm's warmup_prefix); "
                        "off: the cosine counts from the run's first epoch (timm's default)")
    g.add_argument("--schedule_per", choices=("epoch", "step"), default="epoch",
                   help="move the lr once per epoch (the seed) or at every optimiser step")
    add_augment_flags(parser)
    e = parser.add_argument_group("EMA of the student (timm's ModelEmaV3)")
    e.add_argument("--ema_decay", type=float, default=None, metavar="D",
                   help="keep an exponential moving average of the student, evaluated each epoch beside it")
    e.add_argument("--ema_warmup", choices=("on", "off"), default="on",
                   help="the EMA's decay warm-up, min(D, 1 - (1 + step)^-2/3) (timm's use_warmup)")
    e.add_argument("--select", choices=("raw", "ema"), default="raw",
                   help="which student best/, the test score and export use")


def add_augment_flags(parser: argparse.ArgumentParser) -> None:
    """Strong augmentation on the device (``kdjax.data.views``): the teacher sees the view the
    student sees, mixed images included."""
    from kdjax.data import randaugment

    g = parser.add_argument_group("augmentation on the device (the teacher sees the same views)")
    g.add_argument("--augment", choices=tuple(randaugment.AUGMENTS), default="none",
                   help="; ".join(f"{name}: {spec.help}" for name, spec in randaugment.AUGMENTS.items()))
    g.add_argument("--randaugment_ops", type=int, default=2, help="RandAugment's ops per image (torchvision's N)")
    g.add_argument("--randaugment_magnitude", type=int, default=9,
                   help="RandAugment's magnitude bin of 31 (torchvision's M)")
    g.add_argument("--random_erasing", type=float, default=0.0, metavar="P",
                   help="timm's RandomErasing probability (pixel mode, after Normalize)")
    g.add_argument("--mixup_alpha", type=float, default=0.0, help="timm's Mixup: mixup's Beta alpha (0: off)")
    g.add_argument("--cutmix_alpha", type=float, default=0.0, help="timm's Mixup: cutmix's Beta alpha (0: off)")
    g.add_argument("--mix_prob", type=float, default=1.0, help="the probability that a batch (or pair, element) mixes")
    g.add_argument("--mix_switch_prob", type=float, default=0.5,
                   help="with both alphas on, the probability of cutmix rather than mixup")
    g.add_argument("--mix_mode", choices=("batch", "pair", "elem"), default="batch",
                   help="one draw per batch, per pair of examples or per example (timm's mode)")
    g.add_argument("--crop", choices=("resized", "pad"), default="resized",
                   help="resized: RandomResizedCrop + flip (the seed's); pad: pad by --crop_padding, a random "
                        "crop at --image_size + flip, and evaluation on the image itself (CIFAR's)")
    g.add_argument("--crop_padding", type=int, default=4, help="--crop pad's zero padding on every side, px")
    g.add_argument("--mean", type=float, nargs=3, default=None, metavar=("R", "G", "B"),
                   help="the student's Normalize() mean, 0..1 (default: its architecture's; e.g. the data's own "
                        "statistics); with --std; recorded in best/meta.json for evaluate and predict")
    g.add_argument("--std", type=float, nargs=3, default=None, metavar=("R", "G", "B"),
                   help="the student's Normalize() std (with --mean)")


def augment_config(args: argparse.Namespace):
    from kdjax.config import AugmentConfig

    return AugmentConfig(augment=args.augment, randaugment_ops=args.randaugment_ops,
                         randaugment_magnitude=args.randaugment_magnitude, random_erasing=args.random_erasing,
                         mixup_alpha=args.mixup_alpha, cutmix_alpha=args.cutmix_alpha, mix_prob=args.mix_prob,
                         mix_switch_prob=args.mix_switch_prob, mix_mode=args.mix_mode, crop=args.crop,
                         crop_padding=args.crop_padding, mean=args.mean, std=args.std)


def add_batch_size(group) -> None:
    group.add_argument("--batch_size", type=int, default=32)


def add_dtype(group, help: str) -> None:
    group.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help=help)


def add_runtime_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("runtime")
    g.add_argument("--xla_cpu_tuning", choices=("on", "off"), default="on",
                   help="on: XLA:CPU runs convolutions and dots with its own kernels rather "
                        "than YNNPACK (faster on CPUs; kdjax.xla_cpu, benchmarks/README.md); "
                        "off: XLA's defaults. A flag already in XLA_FLAGS wins")
    g.add_argument("--compile_cache", default=None,
                   help="JAX's persistent compilation cache: a directory, or 'none' (default: "
                        "$JAX_COMPILATION_CACHE_DIR, else $KDJAX_CACHE/jax or ~/.cache/kdjax/jax)")


def add_loss_flags(parser: argparse.ArgumentParser) -> None:
    """``--loss``, one flag per hyper-parameter and ``--TERM_pairs`` per feature term, all from
    ``kdjax.losses.LOSSES``."""
    from kdjax import losses

    g = parser.add_argument_group("distillation loss: alpha*CE + (1-alpha)*TERM, or weighted terms")
    g.add_argument("--loss", nargs="+", default=["mse"], metavar="TERM[:WEIGHT]",
                   help="one term (weighted by --alpha: alpha*CE + (1-alpha)*TERM) or a weighted sum such "
                        "as 'ce:0.5 kd:0.5' or 'ce:1 at:500'. Terms: " + "; ".join(
                            f"{name}: {spec.help}" for name, spec in losses.LOSSES.items()))
    users: dict[str, list[str]] = {}
    for name, spec in losses.LOSSES.items():
        for hp in spec.hparams:
            users.setdefault(hp, []).append(name)
    for hp, names in users.items():
        first = losses.LOSSES[names[0]].hparams[hp]
        g.add_argument(f"--{hp}", type=float, default=None,
                       help=f"{first.help} for --loss {'/'.join(names)} (default {first.default:g})")
    for name, spec in losses.LOSSES.items():
        if spec.reads == "features":
            g.add_argument(f"--{name}_pairs", nargs="+", default=None, metavar="STUDENT_TAP:TEACHER_TAP",
                           help=f"the feature taps {name} compares (default: its choice for the two "
                                f"architectures; taps are listed by kdjax.models' registry)")


def loss_name(args: argparse.Namespace) -> str:
    """``--loss`` as ``DistillConfig.loss`` (its tokens joined; checked there)."""
    return " ".join(args.loss)


def loss_hparams(args: argparse.Namespace) -> dict[str, float]:
    """The hyper-parameter flags given for ``--loss`` (a flag of a term not in it is an error)."""
    from kdjax import losses

    declared = {hp for name, _ in losses.parse(args.loss) for hp in losses.get(name).hparams}
    if len(losses.parse(args.loss)) == 1:
        declared |= set(losses.get("ce").hparams)  # the shorthand's cross-entropy
    given = {hp: getattr(args, hp) for spec in losses.LOSSES.values() for hp in spec.hparams
             if getattr(args, hp) is not None}
    stray = sorted(set(given) - declared)
    if stray:
        raise ValueError(f"--loss {loss_name(args)} takes no {', '.join('--' + k for k in stray)}")
    return given


def loss_pairs(args: argparse.Namespace) -> dict[str, tuple[tuple[str, str], ...]]:
    """The ``--TERM_pairs`` given, as ``{term: ((student tap, teacher tap), ...)}``."""
    from kdjax import losses

    out = {}
    for name, spec in losses.LOSSES.items():
        given = getattr(args, f"{name}_pairs", None) if spec.reads == "features" else None
        if not given:
            continue
        pairs = []
        for token in given:
            s_tap, sep, t_tap = token.partition(":")
            if not sep or not s_tap or not t_tap:
                raise ValueError(f"--{name}_pairs: {token!r} is not STUDENT_TAP:TEACHER_TAP (e.g. stride16:stride16)")
            pairs.append((s_tap, t_tap))
        out[name] = tuple(pairs)
    return out


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("engine")
    g.add_argument("--scan_epochs", choices=("auto", "on", "off"), default="auto",
                   help="on: each epoch is one scanned program; off: a host loop of jitted steps; "
                        "auto: on for GPU/TPU, off on CPU (as fast there, and it compiles a "
                        "smaller program; benchmarks/README.md)")


def scan_epochs(args: argparse.Namespace) -> bool | None:
    return {"auto": None, "on": True, "off": False}[args.scan_epochs]


class _ArchChoices(list):
    """kdjax's architectures for argparse's ``choices``, which also admit a user's network: one
    registered in this process (``kdjax.models.register``) or named ``MODULE:ATTRIBUTE``
    (``arch_name``, the flags' type, has imported it by then)."""

    def __contains__(self, name) -> bool:
        from kdjax import models

        return list.__contains__(self, name) or name in models.ARCHS or (isinstance(name, str) and ":" in name)


def arch_choices() -> list[str]:
    from kdjax import models

    return _ArchChoices(sorted(models.BUILTIN))


def arch_name(value: str) -> str:
    """An architecture flag's value: kdjax's name, or ``MODULE:ATTRIBUTE`` imported now, so that a
    network that cannot be imported stops at the flag with the reason."""
    if ":" in value:
        from kdjax import models

        try:
            models.get(value)
        except (ValueError, TypeError) as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    return value


def image_size(args: argparse.Namespace, arch: str) -> int:
    """``--image_size``, or the crop size ``arch`` was trained at."""
    from kdjax import models

    return args.image_size if args.image_size is not None else models.get(arch).input.crop_size


def add_shared_flags(parser: argparse.ArgumentParser, *, gamma: float) -> None:
    """The flags every training command shares: data, recipe, engine, runtime, console,
    multi-process, and ``--config``."""
    add_data_flags(parser)
    add_recipe_flags(parser, gamma=gamma)
    add_engine_flags(parser)
    add_runtime_flags(parser)
    add_console_flags(parser)
    add_distributed_flags(parser)
    parser.add_argument("--config", default=None, metavar="RECIPE.toml",
                        help="read every flag from a recipe file (what each study writes as OUT/recipe.toml); "
                             "flags given here win over the file's")
    parser.add_argument("--recipe", default=None, metavar="NAME",
                        help="a named recipe kdjax ships (`kdjax recipes` lists them: "
                             + ", ".join(recipe.named_recipes()) + "); --config and flags given here win over it")


def parse(parser: argparse.ArgumentParser, argv, *, command: str) -> argparse.Namespace:
    """Parse ``argv`` after the tokens of its ``--recipe`` and ``--config`` (so the command line wins),
    and apply the runtime settings before anything starts JAX's backend. A bad recipe file exits
    like a bad flag: usage and the file's problem, status 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", default=None)
    pre.add_argument("--recipe", default=None)
    known = pre.parse_known_args(argv)[0]
    try:  # the named recipe first, then the file, then the command line: each later one wins
        if known.config is not None:
            argv = recipe.to_argv(known.config, parser, command) + argv
        if known.recipe is not None:
            argv = recipe.to_argv(recipe.named_path(known.recipe), parser, command) + argv
    except recipe.RecipeError as err:
        parser.error(str(err))
    args = parser.parse_args(argv)
    setup_logging(verbosity(args))
    tune_xla_cpu(args.xla_cpu_tuning)
    enable_compile_cache(args.compile_cache)
    return args


def add_console_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("console").add_mutually_exclusive_group()
    g.add_argument("--quiet", action="store_true",
                   help="warnings, errors and the final table only: no per-epoch lines, no progress bars")
    g.add_argument("--verbose", action="store_true",
                   help="also kdjax's decisions (data placement, caches) and the libraries' own notices")


def verbosity(args: argparse.Namespace) -> str:
    return "quiet" if args.quiet else "verbose" if args.verbose else "normal"


def write_recipe(args: argparse.Namespace, parser: argparse.ArgumentParser, command: str, arch: str):
    """Write the study's resolved recipe to ``--out`` (process 0): the dtype and image size the
    run uses in place of their defaults, so a rerun elsewhere computes the same thing."""
    if not is_primary():
        return None
    return recipe.write(args.out, command, recipe.resolved(args, parser, dtype=default_dtype(args.dtype),
                                                           image_size=image_size(args, arch)))


def run_command(parser: argparse.ArgumentParser, argv, command: str, body) -> int:
    """The prologue and error exit every training command shares: parse ``argv`` (after its
    recipe), join a multi-process run before anything touches the JAX backend, then
    ``body(args, parser)``; a user error (bad flag value, file, folder, download, a diverging run) ends
    in one line and status 2."""
    args = parse(parser, argv, command=command)
    try:
        init_distributed(args)
        return body(args, parser)
    except USER_ERRORS as err:
        return fail(parser.prog, err)


@contextlib.contextmanager
def out_lock(args: argparse.Namespace) -> Iterator[None]:
    """Hold ``--out``'s lock (``OUT/.kdjax.lock``, ``kdjax.engine.lock``) while the command
    runs: a second study writing the same folder stops at once, naming this one. Process 0 of a
    multi-process run holds it; the others write what process 0 tells them to."""
    if not is_primary():
        yield
        return
    from kdjax.engine import lock

    with lock.hold(args.out, "--out"):
        yield


def recipe_and_data(args: argparse.Namespace, parser: argparse.ArgumentParser, command: str, arch: str):
    """Write the run's resolved recipe to ``--out`` and load its data (what both training
    commands do once their config is checked)."""
    write_recipe(args, parser, command, arch)
    # --crop pad trains on padded crops of the images as they are: evaluation resizes to the size
    return load_data(args, arch, resize_size=image_size(args, arch) if args.crop == "pad" else None)


def tune_xla_cpu(setting: str) -> list[str]:
    """Apply ``kdjax.xla_cpu``'s flags unless ``setting`` is 'off' (entry points: first thing,
    before JAX starts its backend). Returns the flags added."""
    from kdjax import xla_cpu

    return xla_cpu.apply() if setting == "on" else []


def enable_compile_cache(directory: str | None) -> str | None:
    """Turn on JAX's persistent compilation cache (global JAX configuration: entry points only).

    A ResNet KD step takes seconds to compile on a CPU and more on a GPU; with the cache a rerun
    or a resumed run loads its executables instead. Returns the directory used (None: off).
    """
    import os

    import jax

    if directory is not None and directory.lower() == "none":
        return None
    if directory is None and jax.config.jax_compilation_cache_dir:
        return jax.config.jax_compilation_cache_dir  # already set (JAX_COMPILATION_CACHE_DIR, tests)
    if directory is None:
        root = os.environ.get("KDJAX_CACHE") or os.path.join("~", ".cache", "kdjax")
        directory = os.path.join(root, "jax")
    directory = os.path.abspath(os.path.expanduser(directory))
    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)
    # cache every ResNet-sized program, not only those over jax's default 1 s compile time
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return directory


def add_distributed_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group(
        "multi-process (one process per host, JAX's distributed runtime; see README)")
    g.add_argument("--coordinator_address", default=None, metavar="HOST:PORT",
                   help="process 0's address and a free port, the same on every process")
    g.add_argument("--num_processes", type=int, default=None, help="processes in the run")
    g.add_argument("--process_id", type=int, default=None, help="this process, 0..num_processes-1")
    g.add_argument("--distributed", action="store_true",
                   help="join a multi-process run, reading what the three flags above leave unset "
                        "from the cluster environment (SLURM, Open MPI, Cloud TPU)")
    g.add_argument("--local_device_ids", default=None, metavar="IDS",
                   help="comma-separated accelerator ids this process uses (default: all visible)")
    g.add_argument("--heartbeat_timeout", type=int, default=None, metavar="SECONDS",
                   help="a process silent this long counts as dead and every other process stops "
                        "(default 100)")
    g.add_argument("--initialization_timeout", type=int, default=None, metavar="SECONDS",
                   help="how long to wait for every process to join (default 300)")


def init_distributed(args: argparse.Namespace) -> bool:
    """Join the multi-process run the flags describe (before anything touches the JAX backend);
    False for a plain single-process run."""
    from kdjax import distributed

    ids = None
    if args.local_device_ids is not None:
        try:
            ids = [int(i) for i in args.local_device_ids.split(",")]
        except ValueError:
            raise distributed.DistributedConfigError(
                f"--local_device_ids {args.local_device_ids!r} must be comma-separated integers") from None
    timeouts = {k: v for k, v in (("heartbeat_timeout", args.heartbeat_timeout),
                                  ("initialization_timeout", args.initialization_timeout)) if v is not None}
    return distributed.initialize(args.coordinator_address, args.num_processes, args.process_id, ids,
                                  auto=args.distributed, **timeouts)


def optim_config(args: argparse.Namespace) -> OptimConfig:
    return OptimConfig(lr=args.lr, momentum=args.momentum, step_size=args.step_size,
                       gamma=args.gamma, weight_decay=args.weight_decay, optimizer=args.optimizer,
                       schedule=args.schedule, nesterov=args.nesterov, betas=tuple(args.betas), eps=args.eps,
                       no_decay_norm_bias=args.no_decay_norm_bias, clip_grad_norm=args.clip_grad_norm,
                       accum_steps=args.accum_steps, milestones=tuple(args.milestones), min_lr=args.min_lr,
                       warmup_epochs=args.warmup_epochs, warmup_lr=args.warmup_lr,
                       warmup_prefix=args.warmup_prefix == "on", schedule_per=args.schedule_per)


def train_config(args: argparse.Namespace, arch: str, distill=None):
    """The run configuration of the recipe flags for a student ``arch`` (a supervised run when
    ``distill`` is None)."""
    from kdjax.config import TrainConfig

    return TrainConfig(
        optim=optim_config(args), distill=distill, num_epochs=args.num_epochs,
        batch_size=args.batch_size, image_size=image_size(args, arch), seed=args.seed,
        compute_dtype=default_dtype(args.dtype), ema_decay=args.ema_decay, ema_warmup=args.ema_warmup == "on",
        select=args.select, augment=augment_config(args),
    )


def load_data(args: argparse.Namespace, arch: str, resize_size: int | None = None):
    """The splits of the data flags (``add_data_flags``) at ``arch``'s image size; ``resize_size``
    is the evaluation resize (None: the recipe's 256/224 ratio)."""
    from kdjax import data, distributed
    from kdjax.data import sources

    spec, options = sources.data_spec(args.data, args.data_dir), sources.options_from_flags(args)
    # process 0 downloads and decodes first: the others then find the shared cache filled
    with distributed.primary_first("kdjax.cli.load_data"):
        source = sources.open_data(spec, args.cache_dir, options)
        size = image_size(args, arch)
        return data.load_splits(source, image_size=size, cache_dir=args.cache_dir,
                                skip_bad_images=args.skip_bad_images, in_memory=args.data_in_memory,
                                verify_data=args.verify_data, resize_size=resize_size)


def accelerated() -> bool:
    """Whether JAX runs on a GPU or TPU (what the speed defaults depend on)."""
    import jax

    return jax.default_backend() != "cpu"


def default_dtype(requested: str | None) -> str:
    if requested is not None:
        return requested
    return "bfloat16" if accelerated() else "float32"


def setup_logging(level: str = "normal") -> None:
    """The console of a training command: kdjax's per-epoch lines and warnings (``normal``),
    warnings only (``quiet``), or kdjax's decisions and the libraries' notices too (``verbose``).

    absl (orbax's and tfds' logger) speaks only at ERROR unless ``verbose``: its routine notices
    (checkpoint waits, dataset builder steps) say nothing a user acts on. JAX's own warnings (a
    GPU present without a CUDA jaxlib) stay: they do."""
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    kdjax_level = {"quiet": logging.WARNING, "normal": logging.INFO, "verbose": logging.DEBUG}[level]
    logging.getLogger("kdjax").setLevel(kdjax_level)
    logging.getLogger("absl").setLevel(logging.INFO if level == "verbose" else logging.ERROR)


def fail(prog: str, err: BaseException) -> int:
    print(f"{prog}: error: {' '.join(str(err).split())}", file=sys.stderr)
    return 2


def is_primary() -> bool:
    """Whether this process prints the results (process 0 of a multi-process run)."""
    from kdjax import distributed

    return distributed.is_primary()


def exit_with(main, prog: str):
    """Exit with ``main()``'s status; in a multi-process run a failed process takes the others
    down with it instead of leaving them waiting (``kdjax.distributed.exit_with``)."""
    from kdjax import distributed

    distributed.exit_with(main, prog)


def _user_errors() -> tuple[type[BaseException], ...]:
    from kdjax.fetch import DownloadError

    # Bad flags, files, folders and downloads, and a diverging run: one line, exit 2. So are the
    # run store's OSErrors: a failed write into --out (kdjax.engine.store.StoreWriteError: no
    # space, no permission), checkpoints that are all damaged (DamagedCheckpointError), another
    # process writing --out (kdjax.engine.lock.DirectoryLockedError); named by their base class
    # so that the command line starts without importing the engine. Anything else is a bug and
    # keeps its traceback.
    return (ValueError, OSError, DownloadError, FloatingPointError)


USER_ERRORS = _user_errors()
