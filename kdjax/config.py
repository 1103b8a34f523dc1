"""Typed, frozen run configuration. Epochs become optimiser steps in one place: ``steps_per_epoch``.

Defaults are the seed's experiment (../shared/SEED.md): batch 32, SGD lr 0.001 momentum 0.9,
StepLR every 7 epochs by 0.1, 25 epochs, alpha 0.5, logit-MSE distillation, only the new head
trained while BatchNorm keeps updating its statistics.

A run records its config (``to_json``) without the fields that hold their default, and reads a
record back with ``from_json``, which fills in the defaults. So a field added later (an
optimiser, a schedule, an augmentation) leaves the records of earlier runs equal to the configs
they were trained with, and those runs resume.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal, Mapping

from kdjax import losses

StudentTrain = Literal["fc", "fc_frozen_bn", "all"]
STUDENT_TRAIN_MODES: tuple[str, ...] = ("fc", "fc_frozen_bn", "all")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _sparse(obj, full: bool = False, **values) -> dict:
    """``obj``'s fields (``values`` where given: their JSON form) without those at their default
    (with ``full``, every field)."""
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        default = f.default if f.default is not dataclasses.MISSING else dataclasses.MISSING
        if default is dataclasses.MISSING and f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        if full or value != default:
            out[f.name] = values.get(f.name, value)
    return out


def _known(cls, record: Mapping[str, Any], where: str) -> dict:
    """``record`` (a recorded config) checked for fields ``cls`` does not have."""
    unknown = sorted(set(record) - {f.name for f in dataclasses.fields(cls)})
    _require(not unknown, f"{where}: unknown field(s) {unknown}; it was written by a newer kdjax")
    return dict(record)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """The optimiser and its learning-rate schedule: entries of ``kdjax.optim.OPTIMIZERS`` and
    ``kdjax.optim.SCHEDULES`` (``kdjax.optim.build`` turns this into optax). The defaults are the
    seed's SGD + StepLR; every field is a flag of the same name (``step_size`` and ``gamma``:
    the seed's ``--s_lr_step_size`` and ``--s_rl_gamma``)."""

    lr: float = 0.001
    momentum: float = 0.9
    step_size: int = 7  # epochs between learning-rate decays (torch StepLR)
    gamma: float = 0.1
    weight_decay: float = 0.0
    optimizer: str = "sgd"
    schedule: str = "step"
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float | None = None  # None: the optimiser's own default (OptimizerSpec.eps)
    no_decay_norm_bias: bool = False
    clip_grad_norm: float | None = None
    accum_steps: int = 1
    milestones: tuple[int, ...] = ()
    min_lr: float = 0.0
    warmup_epochs: int = 0
    warmup_lr: float = 0.0
    warmup_prefix: bool = True
    schedule_per: str = "epoch"

    def __post_init__(self):
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        object.__setattr__(self, "milestones", tuple(int(m) for m in self.milestones))
        _require(self.lr >= 0, f"--lr must be >= 0, got {self.lr}")
        _require(0 <= self.momentum < 1, f"--momentum must be in [0, 1), got {self.momentum}")
        _require(self.step_size >= 1, f"--s_lr_step_size must be >= 1, got {self.step_size}")
        _require(self.gamma >= 0, f"--s_rl_gamma must be >= 0, got {self.gamma}")
        _require(self.weight_decay >= 0, f"--weight_decay must be >= 0, got {self.weight_decay}")
        from kdjax import optim  # the registries (optim imports nothing of kdjax)

        _require(self.optimizer in optim.OPTIMIZERS,
                 f"--optimizer {self.optimizer!r}: choose one of {', '.join(optim.OPTIMIZERS)}")
        _require(self.schedule in optim.SCHEDULES,
                 f"--schedule {self.schedule!r}: choose one of {', '.join(optim.SCHEDULES)}")
        _require(not self.nesterov or self.momentum > 0,
                 f"--nesterov needs --momentum > 0, got {self.momentum} (as torch.optim.SGD)")
        _require(not self.nesterov or self.optimizer in ("sgd", "lars"),
                 f"--nesterov is a momentum option of sgd and lars, not of --optimizer {self.optimizer}")
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
                 f"--betas takes two values in [0, 1), got {list(self.betas)}")
        _require(self.eps is None or self.eps > 0, f"--eps must be > 0, got {self.eps}")
        _require(self.eps is None or optim.OPTIMIZERS[self.optimizer].eps is not None,
                 f"--eps is not an option of --optimizer {self.optimizer}")
        _require(self.clip_grad_norm is None or self.clip_grad_norm > 0,
                 f"--clip_grad_norm must be > 0, got {self.clip_grad_norm}")
        _require(self.accum_steps >= 1, f"--accum_steps must be >= 1, got {self.accum_steps}")
        _require(self.min_lr >= 0, f"--min_lr must be >= 0, got {self.min_lr}")
        _require(self.warmup_epochs >= 0, f"--warmup_epochs must be >= 0, got {self.warmup_epochs}")
        _require(self.warmup_lr >= 0, f"--warmup_lr must be >= 0, got {self.warmup_lr}")
        _require(self.schedule_per in ("step", "epoch"),
                 f"--schedule_per must be step or epoch, got {self.schedule_per!r}")
        _require(self.schedule == "multistep" or not self.milestones,
                 f"--milestones {list(self.milestones)} are for --schedule multistep, not {self.schedule}")
        _require(self.schedule != "multistep" or bool(self.milestones),
                 "--schedule multistep needs --milestones (epochs at which the lr is multiplied by --s_rl_gamma)")
        _require(all(m >= 1 for m in self.milestones) and list(self.milestones) == sorted(set(self.milestones)),
                 f"--milestones must be increasing epochs >= 1, got {list(self.milestones)}")

    @property
    def eps_or_default(self) -> float:
        from kdjax import optim

        return self.eps if self.eps is not None else optim.OPTIMIZERS[self.optimizer].eps

    def check_run_length(self, num_epochs: int) -> None:
        """The schedule's epochs must fall inside a run of ``num_epochs``."""
        _require(self.warmup_epochs < num_epochs,
                 f"--warmup_epochs {self.warmup_epochs} is not shorter than the run (--num_epochs {num_epochs})")
        last = max(self.milestones, default=0) + (self.warmup_epochs if self.warmup_prefix else 0)
        _require(last < num_epochs or not self.milestones,
                 f"--milestones {list(self.milestones)}: epoch {last} is past the last epoch (--num_epochs "
                 f"{num_epochs}{', after --warmup_epochs ' + str(self.warmup_epochs) if self.warmup_epochs else ''})")

    def static_part(self) -> "OptimConfig":
        """This config without its traced values (``kdjax.optim.traced_hparams``): what a compiled
        step depends on, so runs that differ only in lr and weight decay share it. Whether there is
        weight decay at all stays (the optimiser state's shape depends on it)."""
        return dataclasses.replace(self, lr=1.0, weight_decay=1.0 if self.weight_decay else 0.0)

    def to_json(self, full: bool = False) -> dict:
        return _sparse(self, full)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "OptimConfig":
        d = _known(cls, d, "recorded optim config")
        for key in ("betas", "milestones"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """How the student learns from the teacher: a weighted sum of ``kdjax.losses.LOSSES`` terms.

    ``loss`` is one distillation term (the seed's shorthand: ``alpha * CE + (1 - alpha) * term``)
    or weighted terms, ``"ce:1 at:500"`` (``alpha`` is then the CE weight, 0 without one).
    ``hparams`` are the terms' hyper-parameters (missing ones take the entries' defaults),
    ``pairs`` a feature term's ``(student tap, teacher tap)`` pairs (missing: its default for the
    two architectures). ``alpha = 1`` with the shorthand ignores the teacher's outputs.
    """

    alpha: float = 0.5
    loss: str = "mse"
    hparams: Mapping[str, float] = dataclasses.field(default_factory=dict)
    student_train: str = "fc"
    pairs: Mapping[str, tuple[tuple[str, str], ...]] = dataclasses.field(default_factory=dict)
    # several teachers: "mean" distils towards their mean probabilities, "sum" sums each one's terms
    teacher_combine: str = "mean"

    def __post_init__(self):
        _require(0.0 <= self.alpha <= 1.0, f"--alpha must be in [0, 1], got {self.alpha}")
        _require(self.teacher_combine in ("mean", "sum"),
                 f"--teacher_combine must be mean or sum, got {self.teacher_combine!r}")
        parsed = losses.parse(self.loss)
        _require(
            self.student_train in STUDENT_TRAIN_MODES,
            f"--student_train must be one of {STUDENT_TRAIN_MODES}, got {self.student_train!r}",
        )
        if parsed[0][1] is None:  # the shorthand
            weights = {"ce": self.alpha, parsed[0][0]: 1.0 - self.alpha}
            loss = parsed[0][0]
        else:
            weights = dict(parsed)
            loss = " ".join(f"{k}:{w:g}" for k, w in parsed)
            object.__setattr__(self, "alpha", float(weights.get("ce", 0.0)))
        object.__setattr__(self, "loss", loss)
        object.__setattr__(self, "weights", weights)
        declared: dict[str, losses.HParam] = {}
        for name in weights:
            declared.update(losses.get(name).hparams)
        unknown = sorted(set(self.hparams) - set(declared))
        _require(not unknown, f"--loss {self.loss} takes no {', '.join('--' + k for k in unknown)}"
                 f" (its hyper-parameters: {sorted(declared) or 'none'})")
        values = {k: float(self.hparams.get(k, h.default)) for k, h in declared.items()}
        for k, v in values.items():
            declared[k].check(k, v)
        # every declared value, in declaration order (treated as immutable: hashed below)
        object.__setattr__(self, "hparams", values)
        pairs = {name: tuple((str(s), str(t)) for s, t in p) for name, p in dict(self.pairs).items()}
        for name in pairs:
            _require(name in weights, f"--{name}_pairs given, but {name} is not a term of --loss {self.loss}")
        object.__setattr__(self, "pairs", pairs)

    @property
    def weighted(self) -> bool:
        """Whether ``loss`` gives every weight (``"ce:1 at:500"``) rather than the alpha shorthand."""
        return ":" in self.loss

    @property
    def terms(self) -> tuple[str, ...]:
        """The objective's terms, in order (``ce`` first for the shorthand)."""
        return tuple(self.weights)

    def __hash__(self):
        return hash((self.alpha, self.loss, tuple(self.hparams.items()), self.student_train,
                     tuple(self.pairs.items()), self.teacher_combine))

    def to_json(self, full: bool = False) -> dict:
        """The fields that differ from their defaults; a hyper-parameter at its term's default
        is left out too (with ``full``, everything)."""
        declared = {k: h.default for name in self.weights for k, h in losses.get(name).hparams.items()}
        hparams = {k: v for k, v in self.hparams.items() if full or v != declared.get(k)}
        pairs = {k: [list(p) for p in v] for k, v in self.pairs.items()}
        d = _sparse(self, full, pairs=pairs)
        d.pop("hparams", None)
        if hparams or full:
            d["hparams"] = hparams
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "DistillConfig":
        d = _known(cls, d, "recorded distill config")
        if "pairs" in d:
            d["pairs"] = {k: tuple(tuple(p) for p in v) for k, v in d["pairs"].items()}
        return cls(**d)


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Strong augmentation on the device beside the crop (``kdjax.data.views``): RandAugment or
    TrivialAugment (``kdjax.data.randaugment.AUGMENTS``), timm's RandomErasing and Mixup/CutMix.
    All off by default (the seed's crop and flip alone); the mixing alphas are traced."""

    augment: str = "none"
    randaugment_ops: int = 2
    randaugment_magnitude: int = 9
    random_erasing: float = 0.0
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_prob: float = 1.0
    mix_switch_prob: float = 0.5
    mix_mode: str = "batch"
    # the crop before them: RandomResizedCrop ("resized", the seed's) or a random crop at the
    # image's own size out of it padded by crop_padding ("pad", CIFAR's); with "pad" evaluation
    # sees the image itself (no Resize + CenterCrop)
    crop: str = "resized"
    crop_padding: int = 4
    # the student's Normalize() statistics, per RGB channel (None: its architecture's input spec):
    # the data's own, e.g. CIFAR-100's for a torchvision network trained on CIFAR; best/'s
    # meta.json records them, so evaluate and predict normalise as training did
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None

    def __post_init__(self):
        from kdjax.data import randaugment  # the registry (it imports nothing of kdjax.config)

        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(float(v) for v in value))
                _require(len(getattr(self, name)) == 3, f"--{name} takes 3 values (R G B), got {list(value)}")
        _require((self.mean is None) == (self.std is None), "--mean and --std go together: give both or neither")
        _require(self.std is None or min(self.std) > 0,
                 f"--std must be > 0 per channel, got {self.std and list(self.std)}")
        _require(self.mean is None or all(0 <= m <= 1 for m in self.mean),
                 f"--mean is of 0..1 pixel values (as torchvision's Normalize), got {self.mean and list(self.mean)}")

        _require(self.augment in randaugment.AUGMENTS,
                 f"--augment {self.augment!r}: choose one of {', '.join(randaugment.AUGMENTS)}")
        _require(self.randaugment_ops >= 1, f"--randaugment_ops must be >= 1, got {self.randaugment_ops}")
        _require(0 <= self.randaugment_magnitude <= 30,
                 f"--randaugment_magnitude must be a bin in [0, 30], got {self.randaugment_magnitude}")
        _require(0 <= self.random_erasing <= 1, f"--random_erasing must be in [0, 1], got {self.random_erasing}")
        _require(self.mixup_alpha >= 0, f"--mixup_alpha must be >= 0, got {self.mixup_alpha}")
        _require(self.cutmix_alpha >= 0, f"--cutmix_alpha must be >= 0, got {self.cutmix_alpha}")
        _require(0 <= self.mix_prob <= 1, f"--mix_prob must be in [0, 1], got {self.mix_prob}")
        _require(0 <= self.mix_switch_prob <= 1, f"--mix_switch_prob must be in [0, 1], got {self.mix_switch_prob}")
        _require(self.mix_mode in ("batch", "pair", "elem"),
                 f"--mix_mode must be batch, pair or elem, got {self.mix_mode!r}")
        _require(self.crop in ("resized", "pad"), f"--crop must be resized or pad, got {self.crop!r}")
        _require(self.crop_padding >= 0, f"--crop_padding must be >= 0, got {self.crop_padding}")

    @property
    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
        """``(mean, std)`` where the flags give them, else None (the network's own)."""
        return None if self.mean is None else (self.mean, self.std)

    @property
    def mixing(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    def pipeline(self, num_classes: int):
        """The static view pipeline (``kdjax.data.views.ViewPipeline``) of this config."""
        from kdjax.data import views

        return views.ViewPipeline(self.augment, self.randaugment_ops, self.randaugment_magnitude,
                                  self.random_erasing, self.mixup_alpha > 0, self.cutmix_alpha > 0, self.mix_prob,
                                  self.mix_switch_prob, self.mix_mode, num_classes, self.crop, self.crop_padding)

    def to_json(self, full: bool = False) -> dict:
        return _sparse(self, full)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "AugmentConfig":
        return cls(**_known(cls, d, "recorded augment config"))


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run (a distillation run, or supervised fine-tuning when ``distill`` is None)."""

    optim: OptimConfig = OptimConfig()
    distill: DistillConfig | None = DistillConfig()
    num_epochs: int = 25
    batch_size: int = 32
    image_size: int = 224
    seed: int = 0
    compute_dtype: str = "float32"  # "bfloat16" on accelerators: params, stats, losses stay f32
    # an exponential moving average of the student (timm's ModelEmaV3; None: none), its warm-up,
    # and which student best/, test scoring and export use
    ema_decay: float | None = None
    ema_warmup: bool = True
    select: str = "raw"
    augment: AugmentConfig = AugmentConfig()

    def __post_init__(self):
        _require(self.num_epochs >= 1, f"--num_epochs must be >= 1, got {self.num_epochs}")
        self.optim.check_run_length(self.num_epochs)
        _require(self.ema_decay is None or 0 < self.ema_decay < 1,
                 f"--ema_decay must be in (0, 1), got {self.ema_decay}")
        _require(self.select in ("raw", "ema"), f"--select must be raw or ema, got {self.select!r}")
        _require(self.select == "raw" or self.ema_decay is not None,
                 "--select ema needs --ema_decay (there is no EMA student to select)")
        if self.augment.mixing and self.distill is not None:
            hard = [t for t in self.distill.terms if t == "dkd"]
            _require(not hard, "--loss dkd reads each example's target class, which mixup/cutmix blend: leave out "
                               "--mixup_alpha/--cutmix_alpha, or use another term")
        _require(self.batch_size >= 1, f"--batch_size must be >= 1, got {self.batch_size}")
        _require(self.image_size >= 32, f"--image_size must be >= 32, got {self.image_size}")
        _require(
            self.compute_dtype in ("float32", "bfloat16"),
            f"--dtype must be float32 or bfloat16, got {self.compute_dtype!r}",
        )

    @property
    def student_train(self) -> str:
        return self.distill.student_train if self.distill is not None else "all"

    def to_json(self, full: bool = False) -> dict:
        """What a run records: the fields that differ from their defaults (``distill`` None, a
        supervised run, is recorded as such); with ``full`` every field, as a summary shows it."""
        return _sparse(self, full, optim=self.optim.to_json(full),
                       distill=None if self.distill is None else self.distill.to_json(full),
                       augment=self.augment.to_json(full))

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "TrainConfig":
        """The config of a record ``to_json`` wrote, by this kdjax or an earlier one (whose
        records hold every field): a missing field takes its default."""
        d = _known(cls, d, "recorded config")
        if "optim" in d:
            d["optim"] = OptimConfig.from_json(d["optim"])
        if "distill" in d and d["distill"] is not None:
            d["distill"] = DistillConfig.from_json(d["distill"])
        if "augment" in d:
            d["augment"] = AugmentConfig.from_json(d["augment"])
        return cls(**d)


def config_differences(recorded: Mapping[str, Any], config: TrainConfig) -> list[str]:
    """The fields in which the recorded config ``recorded`` differs from ``config``, as
    ``"optim.lr: 0.05 != 0.01"`` (recorded first); empty when they are the same run's."""
    try:
        before = TrainConfig.from_json(recorded)
    except (TypeError, ValueError) as err:
        return [f"unreadable ({' '.join(str(err).split())})"]
    out: list[str] = []

    def walk(prefix: str, a, b) -> None:
        if dataclasses.is_dataclass(a) and dataclasses.is_dataclass(b):
            for f in dataclasses.fields(a):
                walk(f"{prefix}{f.name}.", getattr(a, f.name), getattr(b, f.name))
        elif a != b:
            out.append(f"{prefix[:-1]}: {a!r} != {b!r}")

    walk("", before, config)
    return out


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Batches per epoch with the last partial batch kept (padded and masked), as the seed's
    DataLoader does: 244 examples at batch 32 -> 8 steps."""
    return math.ceil(num_examples / batch_size)

