"""Typed, frozen run configuration. Epochs become optimiser steps in one place: ``steps_per_epoch``.

Defaults are the seed's experiment (../shared/SEED.md): batch 32, SGD lr 0.001 momentum 0.9,
StepLR every 7 epochs by 0.1, 25 epochs, alpha 0.5, logit-MSE distillation, only the new head
trained while BatchNorm keeps updating its statistics.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, Mapping

from kdjax import losses

StudentTrain = Literal["fc", "fc_frozen_bn", "all"]
STUDENT_TRAIN_MODES: tuple[str, ...] = ("fc", "fc_frozen_bn", "all")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 0.001
    momentum: float = 0.9
    step_size: int = 7  # epochs between learning-rate decays (torch StepLR)
    gamma: float = 0.1
    weight_decay: float = 0.0

    def __post_init__(self):
        _require(self.lr >= 0, f"--lr must be >= 0, got {self.lr}")
        _require(0 <= self.momentum < 1, f"--momentum must be in [0, 1), got {self.momentum}")
        _require(self.step_size >= 1, f"--s_lr_step_size must be >= 1, got {self.step_size}")
        _require(self.gamma >= 0, f"--s_rl_gamma must be >= 0, got {self.gamma}")
        _require(self.weight_decay >= 0, f"--weight_decay must be >= 0, got {self.weight_decay}")


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

    def to_json(self) -> dict:
        hparams = dict(self.hparams)
        if hparams.get("label_smoothing") == 0.0:  # the default: records of earlier runs stay equal
            del hparams["label_smoothing"]
        d = {"alpha": self.alpha, "loss": self.loss, "hparams": hparams, "student_train": self.student_train}
        if self.pairs:  # absent by default: earlier runs' records stay equal
            d["pairs"] = {k: [list(p) for p in v] for k, v in self.pairs.items()}
        if self.teacher_combine != "mean":
            d["teacher_combine"] = self.teacher_combine
        return d


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

    def __post_init__(self):
        _require(self.num_epochs >= 1, f"--num_epochs must be >= 1, got {self.num_epochs}")
        _require(self.batch_size >= 1, f"--batch_size must be >= 1, got {self.batch_size}")
        _require(self.image_size >= 32, f"--image_size must be >= 32, got {self.image_size}")
        _require(
            self.compute_dtype in ("float32", "bfloat16"),
            f"--dtype must be float32 or bfloat16, got {self.compute_dtype!r}",
        )

    @property
    def student_train(self) -> str:
        return self.distill.student_train if self.distill is not None else "all"

    def to_json(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["optim"] = dataclasses.asdict(self.optim)
        d["distill"] = None if self.distill is None else self.distill.to_json()
        return d


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Batches per epoch with the last partial batch kept (padded and masked), as the seed's
    DataLoader does: 244 examples at batch 32 -> 8 steps."""
    return math.ceil(num_examples / batch_size)

