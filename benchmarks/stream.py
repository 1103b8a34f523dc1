"""Streaming input at scale: bounded memory, restart times, and throughput against the resident path.

Three measurements, each size in fresh processes so that peaks are their own:

(a) ``prepare``: on generated ImageFolder trees of ``--sizes`` training images (320x240 JPEGs, two
    classes, a tenth as many in val), the cold prepare (content digest + decode into the cache),
    the warm start (the fingerprint: one ``stat`` per file) and a ``--verify_data`` start (every
    byte read again), each ``load_splits`` call timed in its own process;
(b) ``memory``: in streaming mode, the teacher's val outputs, ``--steps`` KD steps (ResNet-18
    student, random ResNet-50 teacher, ``--image_size``, batch 32) through the engine's streaming
    epoch (``Trainer.run_steps`` over the first steps of an epoch order) and the student's val
    outputs: peak host RSS (``ru_maxrss``) and peak bytes of live device arrays (sampled after
    every step; on a GPU also the allocator's ``peak_bytes_in_use``);
(c) ``throughput``: on hymenoptera at ``--image_size``, whole epochs (train + val) held on the
    device against streamed, interleaved round by round, images/s of the medians.

    python -m benchmarks.stream [--sizes 5000 20000] [--steps 40] [--image_size 112]
        [--workdir DIR] [--rounds 3] [--out FILE.jsonl] [--skip prepare memory throughput]

One JSON line per measurement on stdout (and ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPO.parent / "shared" / "data" / "hymenoptera_data"
IMAGE_SIZE = (320, 240)


def generate(root: pathlib.Path, num_train: int, seed: int = 0) -> pathlib.Path:
    """An ImageFolder tree ``root/{train,val}/{a,b}/NNNNNN.jpg`` of 320x240 JPEGs (quality 90):
    smooth random colour fields with noise, so they compress like photos rather than like flat
    colour. Written once; a tree already complete is reused."""
    from PIL import Image

    done = root / ".complete"
    if done.exists():
        return root
    rng = np.random.default_rng(seed)
    w, h = IMAGE_SIZE
    for split, n in (("train", num_train), ("val", max(num_train // 10, 2))):
        for i in range(n):
            cls = "ab"[i % 2]
            path = root / split / cls / f"{i:06d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
            field = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), np.int16)
            noisy = np.clip(field + rng.integers(-12, 13, (h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(noisy).save(path, quality=90)
    done.touch()
    return root


def _child(args: list[str]) -> dict:
    """Run this module's ``--child`` mode in a fresh process; its last stdout line is the result."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "benchmarks.stream", "--child", *args], capture_output=True,
                         text=True, env=env, cwd=REPO)
    if out.returncode != 0:
        raise RuntimeError(f"benchmarks.stream --child {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def child_load(root: str, cache: str, image_size: int, verify: bool) -> dict:
    from kdjax import data

    t0 = time.perf_counter()
    ds = data.load_splits(root, image_size=image_size, cache_dir=cache, in_memory="off", verify_data=verify)
    return {"seconds": time.perf_counter() - t0, "decoded": ds.decoded, "digested": ds.digested,
            "num_train": ds["train"].num_examples, "peak_rss_mb": _peak_rss_mb()}


def _engine(dataset, image_size: int, batch: int):
    """What ``kdjax.engine.train_runs`` builds for one KD run (fc, alpha 0.5): its trainer, the
    run's group and stacked state."""
    import jax

    from kdjax import config as kconfig, engine, models, protocol, sharding
    from kdjax.engine import trainer as engine_trainer

    spe = kconfig.steps_per_epoch(dataset["train"].num_examples, batch)
    spec = engine.StepSpec(
        student_arch=protocol.STUDENT_ARCH,
        student=models.create_model(protocol.STUDENT_ARCH, 2),
        teacher=models.create_model(protocol.TEACHER_ARCH, 2),
        optim=kconfig.OptimConfig(), steps_per_epoch=spe, student_train="fc", image_size=image_size,
        teacher_view=engine.network_view(protocol.TEACHER_ARCH, image_size),
    )
    teacher = engine.Teacher(protocol.TEACHER_ARCH, spec.teacher,
                             models.init_variables(spec.teacher, jax.random.key(1), image_size), "benchmark")
    trainer = engine_trainer.Trainer(spec, dataset, teacher, sharding.data_mesh(), batch, scan=False)
    variables = models.init_variables(spec.student, jax.random.key(0), image_size)
    config = kconfig.TrainConfig(batch_size=batch, image_size=image_size)
    group, states = trainer.group([config], [trainer.initial_state(variables, 0)], True)
    return trainer, group, states


def _live_device_bytes() -> int:
    import jax

    return sum(a.nbytes for a in jax.live_arrays())


def child_memory(root: str, cache: str, image_size: int, steps: int, batch: int = 32) -> dict:
    import jax

    from kdjax import data

    dataset = data.load_splits(root, image_size=image_size, cache_dir=cache, in_memory="off")
    trainer, group, states = _engine(dataset, image_size, batch)
    t0 = time.perf_counter()
    t_val = jax.block_until_ready(trainer.placed["t_val"])
    peak_live = _live_device_bytes()
    order, mask = trainer.epoch_order(group, 0)
    chunk = 5
    for start in range(0, steps, chunk):  # the engine's streaming epoch, over a few steps at a time
        states, _ = trainer.run_steps(group, states, 0, (order[start:start + chunk], mask[start:start + chunk], None))
        jax.block_until_ready(states)
        peak_live = max(peak_live, _live_device_bytes())
    val = trainer.validate(group, states, 0)
    peak_live = max(peak_live, _live_device_bytes())
    stats = jax.local_devices()[0].memory_stats() or {}
    return {"num_train": dataset["train"].num_examples, "num_val": dataset["val"].num_examples,
            "steps": steps, "seconds": time.perf_counter() - t0, "peak_rss_mb": _peak_rss_mb(),
            "peak_live_device_mb": peak_live / 2**20,
            "device_peak_bytes_in_use_mb": stats["peak_bytes_in_use"] / 2**20 if "peak_bytes_in_use" in stats else None,
            "val_outputs": [int(t_val.logits.shape[0]), int(np.size(val["acc"]))]}


def held_against_streamed(load, image_size: int, rounds: int, batch: int = 32) -> tuple[dict, dict]:
    """Whole epochs (train + the student's val outputs) of ``load("on")`` against ``load("off")``
    (a dataset held on the device, the same streamed), interleaved, round 0 compiling; returns
    the medians and the ratio, and each path's ``[dataset, trainer, group, states]``."""
    import jax

    paths = {}
    for name, in_memory in (("in_memory", "on"), ("streamed", "off")):
        dataset = load(in_memory)
        trainer, group, states = _engine(dataset, image_size, batch)
        jax.block_until_ready(trainer.placed["t_val"])
        paths[name] = [dataset, trainer, group, states]
    seconds: dict[str, list[float]] = {name: [] for name in paths}
    for r in range(rounds + 1):  # round 0 compiles
        for name, p in paths.items():
            dataset, trainer, group, states = p
            t0 = time.perf_counter()
            states, _ = trainer.train_epoch(group, states, r)
            trainer.validate(group, states, r)
            p[3] = states
            if r:
                seconds[name].append(time.perf_counter() - t0)
    n = paths["in_memory"][0]["train"].num_examples
    out = {name: {"epoch_s": statistics.median(s), "images_per_s": n / statistics.median(s), "rounds": s}
           for name, s in seconds.items()}
    out["ratio_streamed_over_in_memory"] = out["streamed"]["images_per_s"] / out["in_memory"]["images_per_s"]
    out["loadavg"] = os.getloadavg()
    return out, paths


def child_throughput(root: str, cache: str, image_size: int, rounds: int, batch: int = 32) -> dict:
    from kdjax import data

    out, paths = held_against_streamed(
        lambda in_memory: data.load_splits(root, image_size=image_size, cache_dir=cache, in_memory=in_memory),
        image_size, rounds, batch)
    out["host_crop_ms_per_image"] = host_crop_ms(paths["in_memory"][0]["train"], image_size)
    return out


def host_crop_ms(split, image_size: int, seed: int = 0) -> float:
    """What cropping on host workers would cost: PIL's crop + bilinear resize (torchvision's
    ``resized_crop``) and flip of every stored training image, one thread, ms per image."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = [Image.fromarray(np.ascontiguousarray(c[:h, :w])) for c, (h, w) in zip(split.train.canvas,
                                                                                     split.train.sizes)]
    t0 = time.perf_counter()
    for img in images:
        w, h = img.size
        cw, ch = int(w * rng.uniform(0.3, 1.0)), int(h * rng.uniform(0.3, 1.0))
        left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        view = img.resize((image_size, image_size), Image.BILINEAR, box=(left, top, left + cw, top + ch))
        np.asarray(view.transpose(Image.FLIP_LEFT_RIGHT), np.float32)
    return (time.perf_counter() - t0) / len(images) * 1e3


def _emit(record: dict, out) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    if out is not None:
        out.write(line + "\n")
        out.flush()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.stream", description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--image_size", type=int, default=112)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", type=pathlib.Path, default=pathlib.Path("/tmp/kdjax-stream-bench"))
    parser.add_argument("--data_dir", type=pathlib.Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--skip", nargs="*", default=[], choices=("prepare", "memory", "throughput"))
    parser.add_argument("--out", type=pathlib.Path)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        from kdjax import xla_cpu

        xla_cpu.apply()  # as the entry points do, before JAX starts
        kind, *rest = args.child
        if kind == "load":
            result = child_load(rest[0], rest[1], int(rest[2]), rest[3] == "1")
        elif kind == "memory":
            result = child_memory(rest[0], rest[1], int(rest[2]), int(rest[3]))
        else:
            result = child_throughput(rest[0], rest[1], int(rest[2]), int(rest[3]))
        print(json.dumps(result))
        return 0

    out = open(args.out, "a") if args.out else None
    size = str(args.image_size)
    for n in args.sizes:
        root = args.workdir / f"tree_{n}"
        cache = args.workdir / f"cache_{n}"
        t0 = time.perf_counter()
        fresh = not (root / ".complete").exists()
        generate(root, n)
        if fresh:
            _emit({"what": "generate", "num_train": n, "seconds": time.perf_counter() - t0}, out)
        if "prepare" not in args.skip:
            subprocess.run(["rm", "-rf", str(cache)], check=True)
            for kind, verify in (("cold", "0"), ("warm", "0"), ("verify_data", "1")):
                _emit({"what": "prepare", "start": kind, "num_train": n,
                       **_child(["load", str(root), str(cache), size, verify])}, out)
        if "memory" not in args.skip:
            _emit({"what": "memory", "mode": "streamed", **_child(["memory", str(root), str(cache), size,
                                                                      str(args.steps)])}, out)
    if "throughput" not in args.skip:
        _emit({"what": "throughput", "data": str(args.data_dir), "image_size": args.image_size,
               **_child(["throughput", str(args.data_dir), str(args.workdir / "cache_hymenoptera"), size,
                         str(args.rounds)])}, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
