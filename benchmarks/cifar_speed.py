"""A CIFAR-100 KD epoch, kdjax against a plain PyTorch loop, on the same networks in the same run.

    python -m benchmarks.cifar_speed --teacher resnet32x4 --student resnet8x4 --train 2048 --val 512 \\
        --epochs 3 --work /tmp/cifar_speed

The data are random 32x32 images of CIFAR-100's shape (100 classes), written once as PNG files, so
both sides read the same pixels. Both train mdistiller's recipe for KD: the teacher in eval mode,
the student whole, SGD 0.05 (momentum 0.9, wd 5e-4), batch 64, CE 0.1 + KD 0.9 at T 4, a 4 px
padded random crop and a flip, then the student scored on the val images.

- kdjax: ``kdjax.distill(..., recipe="mdistiller_cifar", n_exp=1)`` (the crops on the device, the
  decode cache held in memory); an epoch is metrics.json's ``seconds`` (train + val).
- PyTorch: mdistiller's loop as its trainer runs it: torchvision's ``RandomCrop(32, padding=4)``,
  ``RandomHorizontalFlip``, ``ToTensor``, ``Normalize`` per image in a ``DataLoader`` (shuffled,
  ``--workers`` processes), the teacher under ``torch.no_grad()``, ``F.kl_div`` KD as
  mdistiller's ``kd_loss``; an epoch is the wall time of its train and val passes.

The teacher's weights are random (the same for both: the torch rendering's, converted): speed does
not depend on them. Each side runs in a fresh process of its own, one after the other (in one
process, the PyTorch thread pool left from building the networks slowed kdjax's epochs by half). The
first epoch of each side compiles or warms up and is reported apart; the figure is the median of
the later epochs, images/s over the train split, and the ratio kdjax / PyTorch. The PyTorch loop
runs on ``torch.get_num_threads()`` threads (``--threads``).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import subprocess
import sys
import time

import numpy as np

MEAN, STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)  # mdistiller's CIFAR-100 statistics


def write_images(root: pathlib.Path, train: int, val: int, classes: int, seed: int = 0) -> pathlib.Path:
    """An ImageFolder tree of random 32x32 PNGs (``root``/images), written once."""
    from PIL import Image

    images = root / "images"
    if (images / "done").is_file():
        return images
    rng = np.random.default_rng(seed)
    for split, n in (("train", train), ("val", val)):
        for i in range(n):
            folder = images / split / f"c{i % classes:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (images / "done").write_text("")
    return images


def teacher_dir(root: pathlib.Path, net, arch: str, class_names) -> pathlib.Path:
    """The torch teacher as a kdjax model directory (its state_dict converted)."""
    import torch

    from kdjax import weights

    target = root / "teacher"
    if not (target / "meta.json").is_file():
        torch.save(net.state_dict(), root / "teacher.pth")
        weights.convert(root / "teacher.pth", target, arch=arch, class_names=class_names)
    return target


def kdjax_epochs(args, images: pathlib.Path, teacher: pathlib.Path) -> list[float]:
    import shutil

    import kdjax

    out = args.work / "kdjax_run"
    shutil.rmtree(out, ignore_errors=True)
    study = kdjax.distill(data=f"folder:{images}", teacher=teacher, student=args.student, out=out,
                          recipe="mdistiller_cifar", init="scratch", n_exp=1, num_epochs=args.epochs,
                          milestones=[args.epochs - 1], cache_dir=args.work / "cache", data_in_memory="on",
                          quiet=True, no_plots=True)
    return [e["seconds"] for e in study.runs[0].metrics["history"]]


def torch_epochs(args, images: pathlib.Path) -> list[float]:
    import torch
    import torch.nn.functional as F
    from torchvision import datasets, transforms

    from benchmarks.cifar_torch_reference import rendering, torch_cifar

    teacher_net = rendering(args.teacher, 100)
    teacher_net.load_state_dict(torch.load(args.work / "teacher.pth"))
    student_net = torch_cifar(args.student, seed=2, num_classes=100)

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    train_tf = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                   transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    val_tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    train = torch.utils.data.DataLoader(datasets.ImageFolder(images / "train", train_tf), batch_size=64,
                                        shuffle=True, num_workers=args.workers)
    val = torch.utils.data.DataLoader(datasets.ImageFolder(images / "val", val_tf), batch_size=64,
                                      num_workers=args.workers)
    optimizer = torch.optim.SGD(student_net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    teacher_net.eval()
    times = []
    for _ in range(args.epochs):
        t0 = time.perf_counter()
        student_net.train()
        for x, y in train:
            logits, _ = student_net(x)
            with torch.no_grad():
                t_logits, _ = teacher_net(x)
            kd = F.kl_div(F.log_softmax(logits / 4.0, dim=1), F.softmax(t_logits / 4.0, dim=1),
                          reduction="none").sum(1).mean() * 16.0
            loss = 0.1 * F.cross_entropy(logits, y) + 0.9 * kd
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        student_net.eval()
        with torch.no_grad():
            for x, y in val:
                student_net(x)
        times.append(time.perf_counter() - t0)
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cifar_speed", description=__doc__.split("\n")[0])
    p.add_argument("--teacher", default="resnet32x4")
    p.add_argument("--student", default="resnet8x4")
    p.add_argument("--train", type=int, default=2048, help="train images (a CIFAR-100 epoch is 50,000)")
    p.add_argument("--val", type=int, default=512)
    p.add_argument("--epochs", type=int, default=3, help="per side; the first is reported apart")
    p.add_argument("--workers", type=int, default=0, help="the PyTorch DataLoader's worker processes")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--work", type=pathlib.Path, required=True)
    p.add_argument("--out", type=pathlib.Path, default=None, help="a JSON file for the figures")
    p.add_argument("--side", choices=("kdjax", "pytorch"), default=None, help=argparse.SUPPRESS)
    raw = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(raw)
    if args.epochs < 2:
        p.error(f"--epochs {args.epochs}: at least 2 (the first one compiles)")
    if min(args.train, args.val) < 100:
        p.error(f"--train {args.train} --val {args.val}: at least 100 each (an image of every class in each split)")
    images = args.work / "images"
    if args.side == "kdjax":
        print(json.dumps(kdjax_epochs(args, images, args.work / "teacher")))
        return 0
    if args.side == "pytorch":
        print(json.dumps(torch_epochs(args, images)))
        return 0

    from benchmarks.cifar_torch_reference import torch_cifar

    args.work.mkdir(parents=True, exist_ok=True)
    images = write_images(args.work, args.train, args.val, 100)
    class_names = sorted(q.name for q in (images / "train").iterdir())
    teacher_dir(args.work, torch_cifar(args.teacher, seed=1, num_classes=100), args.teacher, class_names)
    sides = {}
    for side in ("kdjax", "pytorch"):
        out = subprocess.run([sys.executable, "-m", "benchmarks.cifar_speed", *raw, "--side", side],
                             capture_output=True, text=True)
        if out.returncode:
            sys.stderr.write(out.stderr)
            raise SystemExit(f"cifar_speed: the {side} side failed (exit {out.returncode})")
        sides[side] = json.loads(out.stdout.strip().splitlines()[-1])
    import torch

    record = {"teacher": args.teacher, "student": args.student, "train": args.train, "val": args.val,
              "torch_threads": args.threads or torch.get_num_threads(), "workers": args.workers}
    for side, times in sides.items():
        steady = statistics.median(times[1:])
        record[side] = {"first_epoch_s": round(times[0], 2), "epoch_s": round(steady, 3),
                        "epochs_s": [round(t, 2) for t in times], "train_img_s": round(args.train / steady, 1)}
    record["kdjax_speedup"] = round(record["pytorch"]["epoch_s"] / record["kdjax"]["epoch_s"], 3)
    print(json.dumps(record))
    if args.out:
        args.out.write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
