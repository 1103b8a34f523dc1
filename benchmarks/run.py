"""Time kdjax against the PyTorch reference in one process, on one device.

Measures (a) the KD train step alone on a fixed synthetic batch (ResNet-18 student, frozen
ResNet-50 teacher, random init), (b) the compile time of the kdjax step (lower and compile
apart), (c) without ``--quick``, one epoch including data on the real set and, with
``--protocol``, (d) the study's whole wall time, compilation included: 3 alphas x
``--protocol_runs`` runs x ``--protocol_epochs`` epochs of distillation from a given teacher
(a random-init ResNet-50 with calibrated BatchNorm statistics: timing needs no trained one; its
construction is timed apart), kdjax through ``kdjax.protocol.run_paper`` against the reference's
``run_protocol`` with its DataLoader. Steps and epochs are timed round by round, interleaved,
so that load from other processes on the shared machine hits both alike; each figure is the
median over the rounds, with ``os.getloadavg()`` alongside. A protocol is timed once per
framework, kdjax first, after ``jax.clear_caches()`` so that its wall time holds every
compilation; it is not part of ``--quick`` (on a 2-core CPU even 3 alphas x 1 run x 1 epoch at
112 px takes well over 10 minutes for both frameworks).

    python -m benchmarks.run [--quick] [--protocol] [--device cpu|gpu] [--dtype bfloat16]
        [--image_size 224] [--batch 32 256] [--mode fc all] [--out FILE.jsonl]

One JSON line per measurement on stdout (and ``--out``), then a markdown table of the
kdjax/PyTorch images-per-second ratios on stderr (for a protocol: train images over wall time,
so the ratio is the reference's wall time over kdjax's).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time
from typing import Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import torch

from benchmarks import torch_reference as tr
from kdjax import checkpoint, config as kconfig, data, engine, models, protocol, sharding, xla_cpu
from kdjax.data import augment
from kdjax.engine import loop, step as engine_step, teachers, trainer as engine_trainer

DEFAULT_DATA_DIR = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "hymenoptera_data"
DEFAULT_THREADS = 2
NUM_CLASSES = 2
TORCH_VARIANTS = tr.VARIANTS  # ("clean", "seed_as_executed")
DEVICES = {"cpu": ("cpu", "cpu"), "gpu": ("cuda", "cuda")}  # --device -> (jax platform, torch device)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
VECTORIZE = ("auto", "on", "off", "both")
RANDOM_TEACHER = "random-init ResNet-50, BatchNorm statistics calibrated on 8 train images"

Timer = Callable[[], float]  # runs one measured unit (a step, an epoch), returns wall seconds


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark point; ``torch_device``, ``threads`` and ``workers`` (DataLoader workers)
    concern the reference only. ``dtype`` is kdjax's compute dtype; with ``bfloat16`` the
    reference runs its forwards under bfloat16 autocast, the nearest like-for-like."""

    mode: str = "fc"
    image_size: int = 112
    batch: int = 32
    student: str = protocol.STUDENT_ARCH
    torch_device: str = "cpu"
    threads: int = DEFAULT_THREADS
    dtype: str = "float32"
    workers: int = 0


@dataclasses.dataclass(frozen=True)
class Protocol:
    """The study's size: every alpha, ``runs`` runs each, ``epochs`` epochs per run."""

    alphas: tuple[float, ...] = (0.0, 0.5, 1.0)
    runs: int = 4
    epochs: int = 25


# --------------------------------------------------------------------------- kdjax side


def _step_spec(case: Case, steps_per_epoch: int) -> engine.StepSpec:
    dtype = DTYPES[case.dtype]
    return engine.StepSpec(
        student_arch=case.student,
        student=models.create_model(case.student, NUM_CLASSES, dtype),
        teacher=models.create_model(protocol.TEACHER_ARCH, NUM_CLASSES, dtype),
        optim=kconfig.OptimConfig(),
        steps_per_epoch=steps_per_epoch,
        student_train=case.mode,
        image_size=case.image_size,
        teacher_view=engine.network_view(protocol.TEACHER_ARCH, case.image_size),
    )


def _fresh_state(spec: engine.StepSpec, case: Case):
    variables = models.init_variables(spec.student, jax.random.key(0), case.image_size)
    teacher_vars = models.init_variables(spec.teacher, jax.random.key(1), case.image_size)
    state = engine_step.create_train_state(variables, spec)
    return state, teacher_vars


def _hparams():
    return engine.hparams_for(kconfig.TrainConfig())


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
    jitted = jax.jit(engine.train_step, static_argnames="spec", donate_argnums=0)
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


def kdjax_epoch_timer(case: Case, data_dir: pathlib.Path, cache_dir=None) -> tuple[Timer, int]:
    """A timer of one kdjax epoch on device-resident data (augmentation on the device; a scanned
    epoch on accelerators, a host loop of jitted steps on CPU, as ``kdjax.engine.train_runs``
    runs one run) plus the validation pass; the teacher's val logits are computed once per call
    of the engine, so outside the epoch. Returns it and the number of train images."""
    dataset = data.load_splits(data_dir, image_size=case.image_size, cache_dir=cache_dir)
    num_train = dataset["train"].num_examples
    spec = _step_spec(case, kconfig.steps_per_epoch(num_train, case.batch))
    teacher_vars = models.init_variables(spec.teacher, jax.random.key(1), case.image_size)
    teacher = teachers.Teacher(protocol.TEACHER_ARCH, spec.teacher, teacher_vars, "benchmark")
    # the engine's own trainer: data and state replicated, batches split over 'data'
    trainer = engine_trainer.Trainer(spec, dataset, teacher, sharding.data_mesh(), case.batch,
                                     scan=loop.default_scan_epochs())
    config = kconfig.TrainConfig(batch_size=case.batch, image_size=case.image_size)
    variables = models.init_variables(spec.student, jax.random.key(0), case.image_size)
    group, states = trainer.group([config], [trainer.initial_state(variables, 0)], True)
    jax.block_until_ready(trainer.placed["t_val"])
    holder, epoch = [states], [0]

    def run() -> float:
        start = time.perf_counter()
        holder[0], _ = trainer.train_epoch(group, holder[0], epoch[0])
        trainer.validate(group, holder[0], epoch[0])
        epoch[0] += 1
        return time.perf_counter() - start

    return run, num_train


def random_teacher_variables(dataset: data.Dataset, image_size: int, seed: int = 1, n: int = 8) -> dict:
    """A random-init ResNet-50's variables with BatchNorm running statistics those of ``n`` train
    images (eval views). With init statistics 0/1 a random ResNet-50's eval-mode activations
    grow block after block (logits in the hundreds), and a logit MSE against them is unlike a
    real run's; the reference calibrates its random teacher the same way."""
    model = models.create_model(protocol.TEACHER_ARCH, len(dataset.class_names))
    variables = models.init_variables(model, jax.random.key(seed), image_size)
    views = dataset["train"].eval.images
    picks = np.linspace(0, len(views) - 1, min(n, len(views))).round().astype(int)
    apply = jax.jit(lambda v, x: model.apply(v, augment.normalize(x), train=True, mutable=["batch_stats"]))
    _, updates = apply(variables, jnp.asarray(views[picks]))
    # One train-mode pass moves running = m * running + (1 - m) * batch; solve for the batch's.
    m = models.resnet.BatchNorm.momentum
    stats = jax.tree_util.tree_map(lambda new, old: (new - m * old) / (1 - m),
                                   updates["batch_stats"], variables["batch_stats"])
    return jax.device_get({"params": variables["params"], "batch_stats": stats})


def given_teacher(dataset: data.Dataset, image_size: int, workdir: pathlib.Path) -> engine.Teacher:
    """The random teacher handed over as a study gets its teacher: saved as a model directory
    and read back by ``kdjax.engine.load_teacher``, so that it enters ``run_paper`` exactly as a
    real teacher does (which then computes in the run's dtype)."""
    checkpoint.save_model(
        workdir / "teacher", random_teacher_variables(dataset, image_size),
        arch=protocol.TEACHER_ARCH, class_names=dataset.class_names, image_size=image_size,
        provenance={"role": "teacher", "benchmark": RANDOM_TEACHER},
    )
    return engine.load_teacher(workdir / "teacher", dataset)


def supports_vectorize() -> bool:
    """Whether this kdjax's ``protocol.run_paper`` can train a study's runs together (vmap):
    a ``vectorize`` keyword (before the engine package) or ``options`` (``EngineOptions``)."""
    parameters = inspect.signature(protocol.run_paper).parameters
    return "vectorize" in parameters or "options" in parameters


def vectorize_choices(requested: str, supported: bool) -> list[bool | None]:
    """The ``run_paper`` paths to time for ``--vectorize``: True/False for its ``vectorize``
    keyword, None for a ``run_paper`` without one. ``auto`` is both where both exist."""
    if requested not in VECTORIZE:
        raise ValueError(f"--vectorize must be one of {VECTORIZE}, got {requested!r}")
    if not supported:
        if requested in ("on", "both"):
            raise ValueError(f"--vectorize {requested}: kdjax.protocol.run_paper has no 'vectorize' keyword")
        return [None]
    return {"auto": [False, True], "both": [False, True], "on": [True], "off": [False]}[requested]


def kdjax_protocol(case: Case, proto: Protocol, data_dir: pathlib.Path, vectorize: bool | None,
                   workdir: pathlib.Path, cache_dir=None) -> dict:
    """One whole study through ``run_paper`` (scratch students, the random teacher, checkpoints
    every epoch; no plots and no TensorBoard files, which the reference does not write either).
    Returns wall seconds per phase (``wall_s``: data + training; the teacher is given, so
    building it is timed apart), and the image counts."""
    t0 = time.perf_counter()
    dataset = data.load_splits(data_dir, image_size=case.image_size, cache_dir=cache_dir)
    t1 = time.perf_counter()
    teacher = given_teacher(dataset, case.image_size, workdir)
    t2 = time.perf_counter()
    config = protocol.PaperConfig(
        alphas=proto.alphas,
        n_exp=proto.runs,
        init="scratch",
        train=kconfig.TrainConfig(
            distill=kconfig.DistillConfig(student_train=case.mode),
            num_epochs=proto.epochs,
            batch_size=case.batch,
            image_size=case.image_size,
            compute_dtype=case.dtype,
        ),
    )
    extra = {} if vectorize is None else {"options": loop.EngineOptions(vectorize=vectorize)}
    protocol.run_paper(config, dataset, teacher, workdir / "study", plots=False, tensorboard=False, **extra)
    t3 = time.perf_counter()
    return {
        "wall_s": (t1 - t0) + (t3 - t2), "data_s": t1 - t0, "teacher_s": t2 - t1, "train_s": t3 - t2,
        "num_train": dataset["train"].num_examples, "decoded": dataset.decoded,
    }


# --------------------------------------------------------------------------- torch side


def _reference_config(case: Case, variant: str, data_dir=None) -> tr.ReferenceConfig:
    return tr.ReferenceConfig(
        data_dir=None if data_dir is None else str(data_dir),
        mode=case.mode,
        variant=variant,
        student_arch=case.student,
        image_size=case.image_size,
        batch_size=case.batch,
        num_classes=NUM_CLASSES,
        threads=case.threads,
        device=case.torch_device,
        amp_bf16=case.dtype == "bfloat16",
        num_workers=case.workers,
        persistent_workers=case.workers > 0,
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


def torch_protocol(case: Case, proto: Protocol, data_dir: pathlib.Path, variant: str = "clean") -> dict:
    """The same study in the reference (random students, a random calibrated teacher); its
    data loading happens inside training, in the DataLoader. ``wall_s`` leaves the teacher's
    construction out, as kdjax's does."""
    result = tr.run_protocol(_reference_config(case, variant, data_dir), proto.alphas, proto.runs, proto.epochs)
    train_s = result["wall_s"] - result["teacher_s"]
    return {"wall_s": train_s, "teacher_s": result["teacher_s"], "train_s": train_s}


# --------------------------------------------------------------------------- measurements


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
        "student": case.student,
        "image_size": case.image_size,
        "batch": case.batch,
        "dtype": case.dtype,
        "median_s": median,
        "images_per_s": images / median if images and median > 0 else None,
        "rounds": len(times),
        "times_s": times,
        "load_avg": [load for _, load in samples],
        "threads": case.threads if framework == "torch" else None,
        "device": case.torch_device if framework == "torch" else jax.default_backend(),
        "xla_flags": os.environ.get("XLA_FLAGS", "") if framework == "kdjax" else None,
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
                  variants: Sequence[str] = ("clean",), cache_dir=None) -> list[dict]:
    """One epoch including data on the real set, kdjax against the reference's ``variants``."""
    kd_epoch, num_train = kdjax_epoch_timer(case, data_dir, cache_dir)
    timers = {"kdjax": kd_epoch, **{v: torch_epoch_timer(case, v, data_dir) for v in variants}}
    results = interleave(timers, rounds, warmup)
    kd_variant = "scan" if loop.default_scan_epochs() else "host_loop"
    records = [record("epoch", "kdjax", kd_variant, case, num_train, results["kdjax"])]
    records += [record("epoch", "torch", v, case, num_train, results[v]) for v in variants]
    return records


def protocol_record(framework: str, variant: str, case: Case, proto: Protocol, timing: Mapping,
                    num_train: int) -> dict:
    """A protocol measurement: one timed unit (the whole study from a given teacher: data and
    training, compilation included; ``teacher_s``, building the random teacher, is outside it),
    its phases and its size; throughput counts train images (alphas x runs x epochs x train set)
    over the wall time."""
    images = len(proto.alphas) * proto.runs * proto.epochs * num_train
    r = record("protocol", framework, variant, case, images, [(timing["wall_s"], os.getloadavg()[0])])
    r.update({
        "alphas": list(proto.alphas), "runs": proto.runs, "epochs": proto.epochs,
        "teacher": RANDOM_TEACHER, "student_init": "scratch (random)",
        **{k: v for k, v in timing.items() if k.endswith("_s")},
    })
    if framework == "torch":
        r["workers"] = case.workers
    return r


def measure_protocol(case: Case, proto: Protocol, data_dir: pathlib.Path, vectorize: str = "auto",
                     torch_variants: Sequence[str] = ("clean",), cache_dir=None,
                     emit: Callable[[dict], None] | None = None) -> list[dict]:
    """The whole study's wall time, kdjax (each ``vectorize`` path, caches cleared first) and
    then the reference (``torch_variants``; the seed's defect would double its time)."""
    records, num_train = [], None
    for vec in vectorize_choices(vectorize, supports_vectorize()):
        jax.clear_caches()  # the wall time must hold every compilation, as in a fresh process
        with tempfile.TemporaryDirectory(prefix="kdjax-protocol-") as workdir:
            timing = kdjax_protocol(case, proto, data_dir, vec, pathlib.Path(workdir), cache_dir)
        num_train = timing["num_train"]
        variant = "vectorized" if vec else "sequential"
        records.append(protocol_record("kdjax", variant, case, proto, timing, num_train))
        # a persistent compilation cache (JAX_COMPILATION_CACHE_DIR) would hide compile time
        records[-1].update(data_decoded=timing["decoded"],
                           compile_cache=jax.config.jax_compilation_cache_dir or None)
        if emit is not None:
            emit(records[-1])
    for v in torch_variants:
        records.append(protocol_record("torch", v, case, proto, torch_protocol(case, proto, data_dir, v), num_train))
        if emit is not None:
            emit(records[-1])
    return records


# --------------------------------------------------------------------------- report


def _point(r: Mapping) -> tuple:
    """What makes two records comparable: the measurement, its case and, for a protocol, its size."""
    alphas = r.get("alphas")
    return (r["name"], r["mode"], r.get("student", protocol.STUDENT_ARCH), r["image_size"], r["batch"], r.get("dtype"),
            None if alphas is None else tuple(alphas), r.get("runs"), r.get("epochs"))


def ratios(records: Iterable[dict]) -> list[dict]:
    """kdjax images/s over the reference's, per measurement point, kdjax path and reference
    variant."""
    records = list(records)
    out = []
    for mine in records:
        if mine["framework"] != "kdjax" or not mine["images_per_s"]:
            continue
        for r in records:
            if r["framework"] == "torch" and _point(r) == _point(mine) and r["images_per_s"]:
                out.append({
                    "name": r["name"], "mode": r["mode"], "student": r.get("student", protocol.STUDENT_ARCH),
                    "image_size": r["image_size"],
                    "batch": r["batch"], "dtype": r.get("dtype"), "alphas": r.get("alphas"), "runs": r.get("runs"),
                    "epochs": r.get("epochs"), "kdjax_variant": mine["variant"], "variant": r["variant"],
                    "kdjax_images_per_s": mine["images_per_s"], "torch_images_per_s": r["images_per_s"],
                    "ratio": mine["images_per_s"] / r["images_per_s"],
                })
    return out


def markdown_table(records: Iterable[dict]) -> str:
    """The ratio table, then the protocols' wall times and the compile times."""
    records = list(records)
    lines = [
        "| measurement | student | mode | px | batch | dtype | kdjax | kdjax img/s | torch variant | torch img/s "
        "| kdjax/torch |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in ratios(records):
        name = r["name"] if r["runs"] is None else f"{r['name']} {len(r['alphas'])}x{r['runs']}x{r['epochs']}"
        lines.append(
            f"| {name} | {r['student']} | {r['mode']} | {r['image_size']} | {r['batch']} | {r['dtype']} | "
            f"{r['kdjax_variant']} | {r['kdjax_images_per_s']:.1f} | {r['variant']} | "
            f"{r['torch_images_per_s']:.1f} | {r['ratio']:.2f} |"
        )
    protocols = [r for r in records if r["name"] == "protocol"]
    compiles = [r for r in records if r["name"] == "compile"]
    if protocols or compiles:
        lines.append("")
    for r in protocols:
        phases = ", ".join(f"{k[:-2]} {r[k]:.1f} s" for k in ("data_s", "train_s") if k in r)
        lines.append(
            f"protocol {r['framework']} {r['variant']} ({len(r['alphas'])} alphas x {r['runs']} runs x "
            f"{r['epochs']} epochs, {r['mode']}, {r['image_size']} px, {r['dtype']}): "
            f"{r['median_s']:.1f} s wall ({phases}; building the random teacher, apart: "
            f"{r.get('teacher_s', float('nan')):.1f} s)"
        )
    for r in compiles:
        lines.append(f"kdjax {r['variant']} ({r.get('student', protocol.STUDENT_ARCH)}, {r['mode']}, "
                     f"{r['image_size']} px, batch "
                     f"{r['batch']}, {r['dtype']}): {r['median_s']:.1f} s")
    return "\n".join(lines)


# --------------------------------------------------------------------------- plan and CLI


@dataclasses.dataclass(frozen=True)
class Plan:
    steps: tuple[Case, ...]
    epochs: tuple[Case, ...]
    protocols: tuple[Case, ...]
    protocol: Protocol = Protocol()


def plan(quick: bool, torch_device: str, threads: int, *, dtype: str = "float32", workers: int = 0,
         image_sizes: Sequence[int] | None = None, batches: Sequence[int] | None = None,
         modes: Sequence[str] | None = None, protocol: bool = False, protocol_runs: int | None = None,
         protocol_epochs: int | None = None, skip: Sequence[str] = (),
         students: Sequence[str] = (protocol.STUDENT_ARCH,)) -> Plan:
    """The cases to run. Steps vary size x batch x mode; epochs and protocols run at the seed's
    batch 32 in its ``fc`` mode. ``image_sizes``, ``batches`` and ``modes`` replace the defaults
    (``image_sizes`` for every measurement); the steps run for each of ``students`` (a network
    of one input size, ViT, at that size). A quick protocol is 1 run x 1 epoch at 112 px
    unless told otherwise; a full one is the study's 4 runs x 25 epochs at 224 px."""
    base = Case(torch_device=torch_device, threads=threads, dtype=dtype, workers=workers)
    sizes = tuple(image_sizes or ((112,) if quick else (112, 224)))
    batches = tuple(batches or ((32,) if quick else (32, 256)))
    modes = tuple(modes or (("fc",) if quick else ("fc", "all")))
    steps = tuple(dataclasses.replace(base, mode=m, image_size=_size_for(a, s), batch=b, student=a)
                  for a in students for s in sizes for b in batches for m in modes)
    steps = tuple(dict.fromkeys(steps))  # a fixed-size student's sizes collapse into one
    epochs = () if quick else tuple(dataclasses.replace(base, image_size=s) for s in sizes)
    protocols = ()
    if protocol:
        protocols = tuple(dataclasses.replace(base, image_size=s)
                          for s in (image_sizes or ((112,) if quick else (224,))))
    proto = Protocol(runs=protocol_runs or (1 if quick else 4), epochs=protocol_epochs or (1 if quick else 25))
    return Plan(steps=() if "step" in skip else steps, epochs=() if "epoch" in skip else epochs,
                protocols=protocols, protocol=proto)


def _size_for(arch: str, size: int) -> int:
    spec = models.get(arch)
    return spec.input.crop_size if spec.fixed_size else size


def run(the_plan: Plan, data_dir: pathlib.Path, emit: Callable[[dict], None], *, rounds: int = 5,
        epoch_rounds: int = 3, vectorize: str = "auto", cache_dir=None) -> list[dict]:
    """Every measurement of the plan, protocols first (their wall time must include cold
    compilations, and on a leased GPU they matter most), each record passed to ``emit`` as soon
    as it exists."""
    records = []

    def keep(r: dict) -> None:
        emit(r)
        records.append(r)

    for case in the_plan.protocols:
        measure_protocol(case, the_plan.protocol, data_dir, vectorize, cache_dir=cache_dir, emit=keep)
    for case in the_plan.steps:
        for r in measure_step(case, rounds=rounds):
            keep(r)
    for case in the_plan.epochs:
        for r in measure_epoch(case, data_dir, rounds=epoch_rounds, variants=TORCH_VARIANTS,
                               cache_dir=cache_dir):
            keep(r)
    return records


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--quick", action="store_true",
                   help="112 px, batch 32, fc mode, step + compile (a protocol: 1 run x 1 epoch)")
    p.add_argument("--protocol", action="store_true", help="also time the whole study (see above)")
    p.add_argument("--protocol_runs", type=int, default=None, help="runs per alpha (default 4; quick 1)")
    p.add_argument("--protocol_epochs", type=int, default=None, help="epochs per run (default 25; quick 1)")
    p.add_argument("--vectorize", choices=VECTORIZE, default="auto",
                   help="run_paper paths to time: auto = both where run_paper has 'vectorize'")
    p.add_argument("--image_size", type=int, nargs="+", default=None, help="replaces every size")
    p.add_argument("--batch", type=int, nargs="+", default=None, help="replaces the step batches")
    p.add_argument("--mode", choices=kconfig.STUDENT_TRAIN_MODES, nargs="+", default=None,
                   help="replaces the step modes")
    p.add_argument("--student", choices=sorted(models.ARCHS), nargs="+", default=[protocol.STUDENT_ARCH],
                   help="the step's student architectures (teacher ResNet-50); default resnet18")
    p.add_argument("--skip", choices=("step", "epoch"), nargs="+", default=(), help="measurements to leave out")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds of each step case")
    p.add_argument("--epoch_rounds", type=int, default=3, help="timed rounds of each epoch case")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="kdjax compute dtype (bfloat16 on GPU; the reference then autocasts to bfloat16)")
    p.add_argument("--out", help="also append the JSON lines to this file")
    p.add_argument("--device", choices=sorted(DEVICES), default="cpu")
    p.add_argument("--threads", type=int, default=DEFAULT_THREADS, help="torch.set_num_threads")
    p.add_argument("--workers", type=int, default=0, help="the reference's DataLoader workers")
    p.add_argument("--data_dir", type=pathlib.Path, default=DEFAULT_DATA_DIR)
    p.add_argument("--cache_dir", type=pathlib.Path, default=None, help="kdjax's decode cache")
    p.add_argument("--xla_cpu_tuning", choices=("on", "off"), default="on",
                   help="kdjax.xla_cpu's flags, as the entry points apply them (off: XLA's defaults)")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.xla_cpu_tuning == "on":
        xla_cpu.apply()  # before the backend starts, as in experiments.paper
    jax_platform, torch_device = DEVICES[args.device]
    jax.config.update("jax_platforms", jax_platform)
    torch.set_num_threads(args.threads)
    the_plan = plan(
        args.quick, torch_device, args.threads, dtype=args.dtype, workers=args.workers,
        image_sizes=args.image_size, batches=args.batch, modes=args.mode, protocol=args.protocol,
        protocol_runs=args.protocol_runs, protocol_epochs=args.protocol_epochs, skip=args.skip,
        students=args.student,
    )
    vectorize_choices(args.vectorize, supports_vectorize())  # a bad --vectorize fails before any work
    out = open(args.out, "a") if args.out else None

    def emit(r: dict) -> None:
        line = json.dumps(r)
        print(line, flush=True)
        if out is not None:
            out.write(line + "\n")
            out.flush()

    t0 = time.perf_counter()
    records = run(the_plan, args.data_dir, emit, rounds=args.rounds, epoch_rounds=args.epoch_rounds,
                  vectorize=args.vectorize, cache_dir=args.cache_dir)
    if out is not None:
        out.close()
    print(markdown_table(records), file=sys.stderr)
    print(f"\ntotal wall time {time.perf_counter() - t0:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:])
