"""Time kdjax against the PyTorch reference in one process, on one device.

Measures (a) the KD train step alone on a fixed synthetic batch (ResNet-18 student, frozen
ResNet-50 teacher, random init), (b) the compile time of the kdjax step (lower and compile
apart) and, without ``--quick``, (c) one epoch including data on the real set. kdjax and torch
are timed round by round, interleaved, so that load from other processes on the shared machine
hits both alike; each figure is the median over the rounds, with ``os.getloadavg()`` alongside.

    python -m benchmarks.run [--quick] [--out FILE.jsonl] [--device cpu|gpu] [--threads 2]

One JSON line per measurement on stdout (and ``--out``), then a markdown table of the
kdjax/PyTorch images-per-second ratios on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import statistics
import sys
import time
from typing import Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import torch

from benchmarks import torch_reference as tr
from kdjax import config as kconfig
from kdjax import data, models, train

DEFAULT_DATA_DIR = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "hymenoptera_data"
DEFAULT_THREADS = 2
NUM_CLASSES = 2
TORCH_VARIANTS = tr.VARIANTS  # ("clean", "seed_as_executed")
DEVICES = {"cpu": ("cpu", "cpu"), "gpu": ("cuda", "cuda")}  # --device -> (jax platform, torch device)

Timer = Callable[[], float]  # runs one measured unit (a step, an epoch), returns wall seconds


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark point; ``torch_device`` and ``threads`` concern the reference only."""

    mode: str = "fc"
    image_size: int = 112
    batch: int = 32
    torch_device: str = "cpu"
    threads: int = DEFAULT_THREADS


# --------------------------------------------------------------------------- kdjax side


def _step_spec(case: Case, steps_per_epoch: int) -> train.StepSpec:
    return train.StepSpec(
        student=models.create_model("resnet18", NUM_CLASSES),
        teacher=models.create_model("resnet50", NUM_CLASSES),
        optim=kconfig.OptimConfig(),
        steps_per_epoch=steps_per_epoch,
        student_train=case.mode,
        image_size=case.image_size,
    )


def _fresh_state(spec: train.StepSpec, case: Case):
    variables = models.init_variables(spec.student, jax.random.key(0), case.image_size)
    teacher_vars = models.init_variables(spec.teacher, jax.random.key(1), case.image_size)
    state = train.create_train_state(variables, spec.tx, case.mode)
    return state, teacher_vars


def _hparams():
    return train.hparams_for(kconfig.TrainConfig())


def kdjax_step_timer(case: Case) -> tuple[Timer, dict[str, float]]:
    """A timer of one jitted KD step (state donated, result awaited) on the synthetic batch of
    the reference, and the seconds spent lowering and compiling it."""
    spec = _step_spec(case, steps_per_epoch=1)
    state, teacher_vars = _fresh_state(spec, case)
    images, labels = tr.synthetic_batch(case.batch, case.image_size, NUM_CLASSES)
    batch = data.Batch(
        jnp.asarray(images.permute(0, 2, 3, 1).numpy()),  # NCHW -> NHWC, same pixels
        jnp.asarray(labels.numpy(), jnp.int32),
        jnp.ones((case.batch,), bool),
    )
    hparams = _hparams()
    jitted = jax.jit(train.train_step, static_argnames="spec", donate_argnums=0)
    t0 = time.perf_counter()
    lowered = jitted.lower(state, teacher_vars, batch, hparams, spec=spec)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    holder = [state]

    def step() -> float:
        start = time.perf_counter()
        holder[0], metrics = compiled(holder[0], teacher_vars, batch, hparams)
        jax.block_until_ready((holder[0], metrics))
        return time.perf_counter() - start

    return step, {"lower": t1 - t0, "compile": t2 - t1}


def kdjax_epoch_timer(case: Case, data_dir: pathlib.Path) -> tuple[Timer, int]:
    """A timer of one kdjax epoch on device-resident data (augmentation on the device, a host
    loop of jitted steps as ``train_and_evaluate`` runs on CPU) plus the student's val logits;
    the teacher's val logits are per run in kdjax, so outside the epoch. Returns it and the
    number of train images."""
    dataset = data.load_splits(data_dir, image_size=case.image_size)
    train_split = jax.device_put(dataset["train"].train)
    val_images = jax.device_put(dataset["val"].eval.images)
    num_train = dataset["train"].num_examples
    spec = _step_spec(case, kconfig.steps_per_epoch(num_train, case.batch))
    state, teacher_vars = _fresh_state(spec, case)
    hparams = _hparams()
    holder, epoch = [state], [0]

    def run() -> float:
        start = time.perf_counter()
        order, mask = data.epoch_order(num_train, case.batch, 0, epoch[0])
        holder[0], metrics = train.run_epoch(
            holder[0], teacher_vars, train_split, order, mask, 0, epoch[0], hparams,
            spec, None, scan=False,
        )
        s_vars = {"params": holder[0].params, "batch_stats": holder[0].batch_stats}
        jax.block_until_ready(train.all_logits(spec.student, s_vars, val_images, case.batch))
        epoch[0] += 1
        return time.perf_counter() - start

    return run, num_train


# --------------------------------------------------------------------------- torch side


def _reference_config(case: Case, variant: str, data_dir=None) -> tr.ReferenceConfig:
    return tr.ReferenceConfig(
        data_dir=None if data_dir is None else str(data_dir),
        mode=case.mode,
        variant=variant,
        image_size=case.image_size,
        batch_size=case.batch,
        num_classes=NUM_CLASSES,
        threads=case.threads,
        device=case.torch_device,
    )


def torch_step_timer(case: Case, variant: str) -> Timer:
    """A timer of one reference KD step. Each variant gets its own teacher: ``build`` sets the
    teacher's ``requires_grad`` by variant, so a shared one would make them alike."""
    ref = tr.build(_reference_config(case, variant))
    images, labels = tr.synthetic_batch(case.batch, case.image_size, NUM_CLASSES)
    return lambda: tr.time_train_step(ref, images, labels, warmup=0, steps=1)[0]


def torch_epoch_timer(case: Case, variant: str, data_dir: pathlib.Path) -> Timer:
    """A timer of one reference epoch (DataLoader, train phase, val phase)."""
    ref = tr.build(_reference_config(case, variant, data_dir))
    return lambda: ref.run_epoch()["epoch_s"]


# --------------------------------------------------------------------------- protocol


def interleave(timers: Mapping[str, Timer], rounds: int, warmup: int) -> dict[str, list[tuple[float, float]]]:
    """Run every timer ``warmup`` times untimed, then ``rounds`` times, one of each per round.
    Returns per timer ``(seconds, 1-minute load average)`` for each round."""
    for _ in range(warmup):
        for timer in timers.values():
            timer()
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in timers}
    for _ in range(rounds):
        for name, timer in timers.items():
            seconds = timer()
            results[name].append((seconds, os.getloadavg()[0]))
    return results


def record(name: str, framework: str, variant: str, case: Case, images: int | None,
           samples: Sequence[tuple[float, float]]) -> dict:
    """One JSON-ready measurement; ``images`` is what one timed unit processes (None: no
    throughput, as for compile times)."""
    times = [s for s, _ in samples]
    median = statistics.median(times)
    return {
        "name": name,
        "framework": framework,
        "variant": variant,
        "mode": case.mode,
        "image_size": case.image_size,
        "batch": case.batch,
        "median_s": median,
        "images_per_s": images / median if images and median > 0 else None,
        "rounds": len(times),
        "times_s": times,
        "load_avg": [load for _, load in samples],
        "threads": case.threads if framework == "torch" else None,
        "device": case.torch_device if framework == "torch" else jax.default_backend(),
    }


def measure_step(case: Case, rounds: int = 5, warmup: int = 2) -> list[dict]:
    """The KD step, kdjax against both reference variants, and the kdjax compile time."""
    kd_step, compile_s = kdjax_step_timer(case)
    timers = {"kdjax": kd_step, **{v: torch_step_timer(case, v) for v in TORCH_VARIANTS}}
    results = interleave(timers, rounds, warmup)
    load = os.getloadavg()[0]
    records = [
        record("compile", "kdjax", phase, case, None, [(seconds, load)])
        for phase, seconds in compile_s.items()
    ]
    records.append(record("train_step", "kdjax", "jit", case, case.batch, results["kdjax"]))
    records += [record("train_step", "torch", v, case, case.batch, results[v]) for v in TORCH_VARIANTS]
    return records


def measure_epoch(case: Case, data_dir: pathlib.Path, rounds: int = 3, warmup: int = 1,
                  variants: Sequence[str] = ("clean",)) -> list[dict]:
    """One epoch including data on the real set, kdjax against the reference's ``variants``."""
    kd_epoch, num_train = kdjax_epoch_timer(case, data_dir)
    timers = {"kdjax": kd_epoch, **{v: torch_epoch_timer(case, v, data_dir) for v in variants}}
    results = interleave(timers, rounds, warmup)
    records = [record("epoch", "kdjax", "host_loop", case, num_train, results["kdjax"])]
    records += [record("epoch", "torch", v, case, num_train, results[v]) for v in variants]
    return records


def ratios(records: Iterable[dict]) -> list[dict]:
    """kdjax images/s over the reference's, per measurement point and reference variant."""
    records = list(records)
    key = lambda r: (r["name"], r["mode"], r["image_size"], r["batch"])  # noqa: E731
    kdjax = {key(r): r for r in records if r["framework"] == "kdjax" and r["images_per_s"]}
    out = []
    for r in records:
        mine = kdjax.get(key(r))
        if r["framework"] == "torch" and mine is not None:
            out.append({
                "name": r["name"], "mode": r["mode"], "image_size": r["image_size"],
                "batch": r["batch"], "variant": r["variant"],
                "kdjax_images_per_s": mine["images_per_s"], "torch_images_per_s": r["images_per_s"],
                "ratio": mine["images_per_s"] / r["images_per_s"],
            })
    return out


def markdown_table(records: Iterable[dict]) -> str:
    """The ratio table, plus the compile times."""
    records = list(records)
    lines = [
        "| measurement | mode | px | batch | kdjax img/s | torch variant | torch img/s | kdjax/torch |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in ratios(records):
        lines.append(
            f"| {r['name']} | {r['mode']} | {r['image_size']} | {r['batch']} | "
            f"{r['kdjax_images_per_s']:.1f} | {r['variant']} | {r['torch_images_per_s']:.1f} | "
            f"{r['ratio']:.2f} |"
        )
    compiles = [r for r in records if r["name"] == "compile"]
    if compiles:
        lines.append("")
    for r in compiles:
        lines.append(f"kdjax {r['variant']} ({r['mode']}, {r['image_size']} px, batch "
                     f"{r['batch']}): {r['median_s']:.1f} s")
    return "\n".join(lines)


def plan(quick: bool, torch_device: str, threads: int) -> tuple[list[Case], list[Case]]:
    """The step cases and epoch cases to run."""
    base = Case(torch_device=torch_device, threads=threads)
    if quick:
        return [dataclasses.replace(base, mode="fc", image_size=112, batch=32)], []
    steps = [
        dataclasses.replace(base, mode=m, image_size=s, batch=b)
        for s in (112, 224) for b in (32, 256) for m in ("fc", "all")
    ]
    epochs = [dataclasses.replace(base, mode="fc", image_size=s, batch=32) for s in (112, 224)]
    return steps, epochs


def run(quick: bool, torch_device: str, threads: int, data_dir: pathlib.Path,
        emit: Callable[[dict], None]) -> list[dict]:
    """Every measurement of the plan, each record passed to ``emit`` as soon as it exists."""
    step_cases, epoch_cases = plan(quick, torch_device, threads)
    records = []
    for case in step_cases:
        for r in measure_step(case, rounds=5):
            emit(r)
            records.append(r)
    for case in epoch_cases:
        for r in measure_epoch(case, data_dir, variants=TORCH_VARIANTS):
            emit(r)
            records.append(r)
    return records


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--quick", action="store_true", help="112 px, batch 32, fc mode, step + compile")
    p.add_argument("--out", help="also append the JSON lines to this file")
    p.add_argument("--device", choices=sorted(DEVICES), default="cpu")
    p.add_argument("--threads", type=int, default=DEFAULT_THREADS, help="torch.set_num_threads")
    p.add_argument("--data_dir", type=pathlib.Path, default=DEFAULT_DATA_DIR)
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    jax_platform, torch_device = DEVICES[args.device]
    jax.config.update("jax_platforms", jax_platform)
    torch.set_num_threads(args.threads)
    out = open(args.out, "a") if args.out else None

    def emit(r: dict) -> None:
        line = json.dumps(r)
        print(line, flush=True)
        if out is not None:
            out.write(line + "\n")
            out.flush()

    t0 = time.perf_counter()
    records = run(args.quick, torch_device, args.threads, args.data_dir, emit)
    if out is not None:
        out.close()
    print(markdown_table(records), file=sys.stderr)
    print(f"\ntotal wall time {time.perf_counter() - t0:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:])
