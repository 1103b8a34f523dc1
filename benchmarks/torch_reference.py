"""The seed's training loop in plain PyTorch: the baseline that kdjax is timed against.

Same semantics as ../shared/SEED.md: torchvision ImageFolder and transforms, DataLoader (batch
32, shuffled, last partial batch kept), ResNet-50 teacher in eval mode, ResNet-18 student with a
fresh ``Linear(512, num_classes)`` head, ``alpha * CrossEntropyLoss + (1 - alpha) *
MSELoss(student_logits, teacher_logits)``, SGD with momentum over the trainable parameters and
StepLR stepped once per epoch, a train phase then a val phase per epoch.

Student modes: ``fc`` (the seed: only the head trains, but the student runs in train mode, so
BatchNorm uses batch statistics and keeps updating its running averages), ``fc_frozen_bn`` (head
only, eval-mode BatchNorm) and ``all`` (everything trains).

Variants: ``clean`` runs the teacher under ``torch.no_grad()``; ``seed_as_executed`` keeps the
seed's defect: the teacher's parameters keep ``requires_grad=True`` and its logits are not
detached, so every backward also runs through the whole ResNet-50 (same numbers, more time).

Val figures (names as in the seed): ``epoch_loss_l`` (blended loss per val item),
``epoch_acc_l``, ``epoch_acc_teacher_l`` and ``diff_t_s``, the mean |teacher - student| logit
over the WHOLE val set (the seed used its last val batch), as kdjax computes them.

A runner uses ``build(config)`` and then ``Reference.train_step`` on ``synthetic_batch(...)``
(step timing), ``Reference.run_epoch()`` (an epoch with data loading) or ``run_protocol``.
CLI: ``python -m benchmarks.torch_reference --data_dir ... --epochs 1 --image_size 112``
prints one JSON line per epoch (``--bench_step`` times the KD step on a synthetic batch instead).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from typing import Callable, Sequence

import numpy as np
import torch
import torchvision
from torch import nn
from torchvision import transforms

MODES = ("fc", "fc_frozen_bn", "all")
VARIANTS = ("clean", "seed_as_executed")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FIGURES = ("epoch_loss_l", "epoch_acc_l", "epoch_acc_teacher_l", "diff_t_s")
# The classifier of torchvision's other students (ResNets: "fc."): what the head-only modes train.
HEADS = {"mobilenet_v2": "classifier.1.", "mobilenet_v3_small": "classifier.3.",
         "mobilenet_v3_large": "classifier.3.", "efficientnet_b0": "classifier.1.",
         "convnext_tiny": "classifier.2.", "vit_b_16": "heads.head."}


@dataclasses.dataclass(frozen=True)
class ReferenceConfig:
    """One reference run. Defaults are the seed's experiment (gamma 0.1 as its text says)."""

    data_dir: str | None = None  # ImageFolder root with train/ and val/; None: step timing only
    mode: str = "fc"
    variant: str = "clean"
    alpha: float = 0.5
    lr: float = 0.001
    momentum: float = 0.9
    step_size: int = 7
    gamma: float = 0.1
    image_size: int = 224
    batch_size: int = 32
    num_classes: int = 2
    num_workers: int = 0
    persistent_workers: bool = False
    seed: int = 0  # student init, data order and augmentation
    teacher_seed: int = 1234  # random teacher init when no teacher_file is given
    teacher_file: str | None = None  # state_dict of a resnet50 with a num_classes head
    student_file: str | None = None  # state_dict of a resnet18 backbone (its fc is ignored)
    student_arch: str = "resnet18"  # any torchvision classifier of HEADS or a ResNet
    channels_last: bool = False
    threads: int | None = None  # torch.set_num_threads; None leaves torch's default
    device: str = "cpu"
    amp_bf16: bool = False  # bfloat16 autocast for the forwards; loss in float32
    cudnn_benchmark: bool = True  # cuda only

    def __post_init__(self):
        _require(self.mode in MODES, f"--mode must be one of {MODES}, got {self.mode!r}")
        _require(self.variant in VARIANTS, f"--variant must be one of {VARIANTS}, got {self.variant!r}")
        _require(0.0 <= self.alpha <= 1.0, f"--alpha must be in [0, 1], got {self.alpha}")
        _require(self.image_size >= 32, f"--image_size must be >= 32, got {self.image_size}")
        _require(self.batch_size >= 1, f"--batch_size must be >= 1, got {self.batch_size}")
        _require(self.num_workers >= 0, f"--num_workers must be >= 0, got {self.num_workers}")
        _require(
            self.device == "cpu" or self.device.startswith("cuda"),
            f"--device must be 'cpu' or 'cuda[:n]', got {self.device!r}",
        )


# --------------------------------------------------------------------------- models and data


def make_teacher(config: ReferenceConfig) -> nn.Module:
    """ResNet-50 with a ``num_classes`` head: loaded from ``teacher_file`` or randomly initialised
    (seeded, BatchNorm statistics calibrated), on the config's device and memory format."""
    torch.manual_seed(config.teacher_seed)
    net = torchvision.models.resnet50(weights=None)
    net.fc = nn.Linear(net.fc.in_features, config.num_classes)
    if config.teacher_file:
        state = torch.load(config.teacher_file, map_location="cpu", weights_only=True)
        _require(isinstance(state, dict), f"--teacher_file {config.teacher_file}: expected a state_dict")
        net.load_state_dict(state)
    else:
        _calibrate_bn(net, config, config.teacher_seed)
    return _place(net, config).eval()


def make_student(config: ReferenceConfig) -> nn.Module:
    """ResNet-18 (from ``student_file`` or seeded random init) with a fresh ``Linear(512, C)``;
    another ``student_arch``: torchvision's, random, with a ``num_classes`` head."""
    torch.manual_seed(config.seed)
    if config.student_arch != "resnet18":
        _require(config.student_file is None, "--student_file: a resnet18 state_dict only")
        builder = getattr(torchvision.models, config.student_arch)
        if config.student_arch.startswith(("resnet", "resnext", "wide_resnet")):
            net = builder(weights=None)
            net.fc = nn.Linear(net.fc.in_features, config.num_classes)
        else:
            net = builder(weights=None, num_classes=config.num_classes)
        if any(isinstance(m, nn.BatchNorm2d) for m in net.modules()):
            _calibrate_bn(net, config, config.seed)
        return _place(net, config)
    net = torchvision.models.resnet18(weights=None)
    if config.student_file:
        state = torch.load(config.student_file, map_location="cpu", weights_only=True)
        _require(isinstance(state, dict), f"--student_file {config.student_file}: expected a state_dict")
        backbone = {k: v for k, v in state.items() if not k.startswith("fc.")}
        result = net.load_state_dict(backbone, strict=False)
        _require(
            not result.unexpected_keys and all(k.startswith("fc.") for k in result.missing_keys),
            f"--student_file {config.student_file}: not a resnet18 state_dict "
            f"(missing {result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]})",
        )
    else:
        _calibrate_bn(net, config, config.seed)
    net.fc = nn.Linear(net.fc.in_features, config.num_classes)
    return _place(net, config)


def _calibrate_bn(net: nn.Module, config: ReferenceConfig, seed: int) -> None:
    # A random torchvision ResNet in eval mode has running statistics 0/1, which lets activations
    # grow block after block (a random ResNet-50 reaches logits ~400, and an MSE loss on them
    # says nothing about a real network). One pass over calibration images fixes that.
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        m.momentum = None
    net.train()
    with torch.no_grad():
        net(calibration_images(config, seed))
    for m in bns:
        m.momentum = 0.1
        m.num_batches_tracked.zero_()


def calibration_images(config: ReferenceConfig, seed: int, n: int = 8) -> torch.Tensor:
    """``n`` train images spread over the folder (val transform), or Gaussian noise without a
    ``data_dir``. Statistics from noise are off by ~20x on real images (which are smooth), and
    statistics taken at another image size are off too (the border share of each map differs)."""
    if config.data_dir is None:
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(n, 3, config.image_size, config.image_size, generator=gen)
    dataset = torchvision.datasets.ImageFolder(
        f"{config.data_dir}/train", data_transforms(config.image_size)["val"]
    )
    picks = np.linspace(0, len(dataset) - 1, min(n, len(dataset))).round().astype(int)
    return torch.stack([dataset[int(i)][0] for i in picks])


def _place(net: nn.Module, config: ReferenceConfig) -> nn.Module:
    net = net.to(config.device)
    return net.to(memory_format=torch.channels_last) if config.channels_last else net


def data_transforms(image_size: int) -> dict[str, transforms.Compose]:
    """The seed's torchvision transforms, scaled to ``image_size`` (Resize is 256/224 of it)."""
    normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    return {
        "train": transforms.Compose([
            transforms.RandomResizedCrop(image_size),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            normalize,
        ]),
        "val": transforms.Compose([
            transforms.Resize(image_size * 256 // 224),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            normalize,
        ]),
    }


def data_loaders(config: ReferenceConfig) -> dict[str, torch.utils.data.DataLoader]:
    """ImageFolder loaders for ``train`` and ``val``: shuffled (val too, as in the seed), last
    partial batch kept, order seeded by ``config.seed``."""
    _require(config.data_dir is not None, "--data_dir is required to run epochs")
    tfs = data_transforms(config.image_size)
    loaders = {}
    for i, split in enumerate(("train", "val")):
        dataset = torchvision.datasets.ImageFolder(f"{config.data_dir}/{split}", tfs[split])
        _require(
            len(dataset.classes) == config.num_classes,
            f"{config.data_dir}/{split} has classes {dataset.classes}, "
            f"but --num_classes is {config.num_classes}",
        )
        loaders[split] = torch.utils.data.DataLoader(
            dataset,
            batch_size=config.batch_size,
            shuffle=True,
            drop_last=False,
            num_workers=config.num_workers,
            persistent_workers=config.persistent_workers and config.num_workers > 0,
            pin_memory=config.device.startswith("cuda"),
            generator=torch.Generator().manual_seed(config.seed * 2 + i),
        )
    return loaders


def synthetic_batch(batch_size: int = 32, image_size: int = 224, num_classes: int = 2, seed: int = 0):
    """A fixed normalised-image-like batch for step timing: (float32 NCHW images, int64 labels)."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, image_size, image_size, generator=gen)
    labels = torch.randint(0, num_classes, (batch_size,), generator=gen)
    return images, labels


# --------------------------------------------------------------------------- the loop


def kd_loss(s_logits: torch.Tensor, t_logits: torch.Tensor, labels: torch.Tensor, alpha: float):
    """``alpha * CE(s, labels) + (1 - alpha) * MSE(s, t)``, both reductions mean (SEED.md)."""
    ce = nn.functional.cross_entropy(s_logits, labels)
    return alpha * ce + (1 - alpha) * nn.functional.mse_loss(s_logits, t_logits)


class Reference:
    """A student, a teacher, SGD + StepLR and (with ``data_dir``) the two loaders."""

    def __init__(self, config: ReferenceConfig, teacher: nn.Module | None = None):
        if config.threads:
            torch.set_num_threads(config.threads)
        if config.device.startswith("cuda"):
            _require(torch.cuda.is_available(), f"--device {config.device}: CUDA is not available")
            torch.backends.cudnn.benchmark = config.cudnn_benchmark
        self.config = config
        self.device = torch.device(config.device)
        self.teacher = teacher if teacher is not None else make_teacher(config)
        # The defect: the teacher's parameters keep requires_grad=True, so autograd records its
        # forward and every backward runs through it (its .grad accumulates and is never used).
        for p in self.teacher.parameters():
            p.requires_grad_(config.variant == "seed_as_executed")
        self.teacher.eval()
        self.student = make_student(config)
        if config.mode != "all":
            head = HEADS.get(config.student_arch, "fc.")
            for name, p in self.student.named_parameters():
                p.requires_grad_(name.startswith(head))
        self.trainable = [p for p in self.student.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(self.trainable, lr=config.lr, momentum=config.momentum)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, config.step_size, config.gamma)
        self.loaders = data_loaders(config) if config.data_dir is not None else None
        self.epoch = 0
        torch.manual_seed(config.seed)  # augmentation stream (main process)

    def _inputs(self, images: torch.Tensor, labels: torch.Tensor):
        images = images.to(self.device, non_blocking=True)
        if self.config.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, labels.to(self.device, non_blocking=True)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.amp_bf16)

    def _train_mode(self) -> None:
        self.student.train(self.config.mode != "fc_frozen_bn")

    def _step(self, images: torch.Tensor, labels: torch.Tensor):
        images, labels = self._inputs(images, labels)
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            if self.config.variant == "clean":
                with torch.no_grad():
                    t_logits = self.teacher(images)
            else:
                t_logits = self.teacher(images)
            s_logits = self.student(images)
        loss = kd_loss(s_logits.float(), t_logits.float(), labels, self.config.alpha)
        loss.backward()
        self.optimizer.step()
        return loss, s_logits

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        """One KD step on a given batch (student in its training mode); returns the loss. The
        ``.item()`` synchronises, so wall-clocking this call times the whole step."""
        self._train_mode()
        return self._step(images, labels)[0].item()

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The seed's val figures over the whole val set, student and teacher in eval mode."""
        self.student.eval()
        n, loss_sum, correct, t_correct, abs_diff = 0, 0.0, 0, 0, 0.0
        for images, labels in self.loaders["val"]:
            images, labels = self._inputs(images, labels)
            with self._autocast():
                t_logits = self.teacher(images).float()
                s_logits = self.student(images).float()
            b = labels.shape[0]
            n += b
            loss_sum += kd_loss(s_logits, t_logits, labels, self.config.alpha).item() * b
            correct += (s_logits.argmax(1) == labels).sum().item()
            t_correct += (t_logits.argmax(1) == labels).sum().item()
            abs_diff += (t_logits - s_logits).abs().sum().item()
        return {
            "epoch_loss_l": loss_sum / n,
            "epoch_acc_l": correct / n,
            "epoch_acc_teacher_l": t_correct / n,
            "diff_t_s": abs_diff / (n * self.config.num_classes),
        }

    def run_epoch(self) -> dict:
        """A train phase over the train loader (data loading included), StepLR's step, then the
        val phase. Returns the val figures plus train loss/accuracy and phase times."""
        _require(self.loaders is not None, "run_epoch needs --data_dir")
        lr = self.optimizer.param_groups[0]["lr"]
        t0 = time.perf_counter()
        self._train_mode()
        n, loss_sum, correct = 0, 0.0, 0
        for images, labels in self.loaders["train"]:
            loss, s_logits = self._step(images, labels)
            b = labels.shape[0]
            n += b
            loss_sum += loss.item() * b
            correct += (s_logits.argmax(1).cpu() == labels).sum().item()
        self.scheduler.step()
        t1 = time.perf_counter()
        figures = self.evaluate()
        t2 = time.perf_counter()
        self.epoch += 1
        return {
            "epoch": self.epoch,
            "lr": lr,
            "train_loss": loss_sum / n,
            "train_acc": correct / n,
            **figures,
            "train_s": t1 - t0,
            "val_s": t2 - t1,
            "epoch_s": t2 - t0,
        }


def build(config: ReferenceConfig, teacher: nn.Module | None = None) -> Reference:
    """A ready reference; pass ``teacher`` to share one frozen teacher between runs."""
    return Reference(config, teacher)


def time_train_step(ref: Reference, images, labels, warmup: int = 2, steps: int = 3) -> list[float]:
    """Wall seconds of ``steps`` timed KD steps after ``warmup`` untimed ones (same batch)."""
    for _ in range(warmup):
        ref.train_step(images, labels)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        ref.train_step(images, labels)
        times.append(time.perf_counter() - t0)
    return times


def run_protocol(
    config: ReferenceConfig,
    alphas: Sequence[float] = (0.0, 0.5, 1.0),
    n_runs: int = 4,
    epochs: int = 25,
    on_epoch: Callable[[dict], None] | None = None,
) -> dict:
    """The seed's experiment: for each alpha, ``n_runs`` runs (seeds ``config.seed + run``; all
    of them, unlike the seed's off-by-one) of ``epochs`` epochs, one teacher shared by all.
    Returns every epoch record, the summary (mean and population std over all epochs of all
    runs, like the published table), the wall time including model construction and, within
    it, the seconds spent building (and calibrating) the teacher."""
    t0 = time.perf_counter()
    teacher = make_teacher(config)
    teacher_s = time.perf_counter() - t0
    records = []
    for alpha in alphas:
        for run in range(n_runs):
            ref = build(dataclasses.replace(config, alpha=alpha, seed=config.seed + run), teacher)
            for _ in range(epochs):
                record = {"alpha": alpha, "run": run, **ref.run_epoch()}
                records.append(record)
                if on_epoch is not None:
                    on_epoch(record)
    summary = {}
    for alpha in alphas:
        rows = [r for r in records if r["alpha"] == alpha]
        summary[str(alpha)] = {
            f: {"mean": float(np.mean([r[f] for r in rows])), "std": float(np.std([r[f] for r in rows]))}
            for f in FIGURES
        }
    return {"records": records, "summary": summary, "wall_s": time.perf_counter() - t0, "teacher_s": teacher_s}


# --------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    d = ReferenceConfig()
    p = argparse.ArgumentParser(prog="python -m benchmarks.torch_reference", description=__doc__)
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--data_dir")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--alphas", type=float, nargs="+", default=[d.alpha])
    p.add_argument("--n_runs", type=int, default=1)
    p.add_argument("--mode", choices=MODES, default=d.mode)
    p.add_argument("--variant", choices=VARIANTS, default=d.variant)
    for name in ("lr", "momentum", "gamma"):
        p.add_argument(f"--{name}", type=float, default=getattr(d, name))
    for name in ("step_size", "image_size", "batch_size", "num_classes", "num_workers", "seed", "threads"):
        p.add_argument(f"--{name}", type=int, default=getattr(d, name))
    p.add_argument("--teacher_file")
    p.add_argument("--student_file")
    p.add_argument("--device", default=d.device)
    p.add_argument("--channels_last", action="store_true")
    p.add_argument("--amp_bf16", action="store_true")
    p.add_argument("--bench_step", action="store_true", help="time the KD step on a synthetic batch")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    fields = {f.name for f in dataclasses.fields(ReferenceConfig)}
    config = ReferenceConfig(**{k: v for k, v in vars(args).items() if k in fields})
    meta = {"variant": config.variant, "mode": config.mode, "image_size": config.image_size,
            "batch_size": config.batch_size, "channels_last": config.channels_last,
            "threads": torch.get_num_threads() if config.threads is None else config.threads,
            "device": config.device}
    if args.bench_step:
        ref = build(dataclasses.replace(config, data_dir=None, alpha=args.alphas[0]))
        images, labels = synthetic_batch(config.batch_size, config.image_size, config.num_classes)
        times = time_train_step(ref, images, labels, args.warmup, args.steps)
        median = statistics.median(times)
        print(json.dumps({"measure": "train_step", **meta, "times_s": times, "median_s": median,
                          "images_per_s": config.batch_size / median}), flush=True)
        return
    _require(config.data_dir is not None, "--data_dir is required (or pass --bench_step)")
    result = run_protocol(config, args.alphas, args.n_runs, args.epochs,
                          on_epoch=lambda r: print(json.dumps({**meta, **r}), flush=True))
    print(json.dumps({"measure": "protocol", **meta, "wall_s": result["wall_s"],
                      "teacher_s": result["teacher_s"], "summary": result["summary"]}), flush=True)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


if __name__ == "__main__":
    main(sys.argv[1:])
