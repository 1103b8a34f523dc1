"""What the modern recipes' pieces add to the training step: strong augmentation with mixing and
erasing, and the EMA of the student, on the device.

    python -m benchmarks.recipes_speed --image_size 112 --mode all --steps 4 --rounds 5

Each variant is one engine trainer (``kdjax.engine.trainer.Trainer``) over the real hymenoptera
train split, ResNet-18 student, random ResNet-50 teacher, batch 32, float32: ``base`` (the seed's
crop and flip), ``strong`` (RandAugment N2 M9 + random erasing 0.25 + mixup 0.8 / cutmix 1.0,
timm_kd's), ``ema`` (an EMA of the student, decay 0.9998) and ``both``. A round times ``--steps``
optimiser steps of every variant in turn (interleaved, so the machine's drift hits all alike);
the medians and each variant's ratio to ``base`` are printed as a table, the rounds as JSON.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

DEFAULT_DATA_DIR = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "hymenoptera_data"


def _trainer(dataset, config, teacher):
    import jax

    from kdjax import engine, models, sharding
    from kdjax.engine import trainer as engine_trainer

    spec = engine.step.step_spec_for(config, dataset, "resnet18", teacher)
    trainer = engine_trainer.Trainer(spec, dataset, teacher, sharding.data_mesh(), config.batch_size, scan=False)
    variables = models.init_variables(spec.student, jax.random.key(0), config.image_size)
    group, states = trainer.group([config], [trainer.initial_state(variables, 0)], True)
    trainer.place()
    return trainer, group, states


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.recipes_speed", description=__doc__.split("\n")[0])
    p.add_argument("--image_size", type=int, default=112)
    p.add_argument("--mode", choices=("fc", "all"), default="all")
    p.add_argument("--steps", type=int, default=4, help="optimiser steps per variant per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--data_dir", type=pathlib.Path, default=DEFAULT_DATA_DIR)
    args = p.parse_args(argv)

    from kdjax import xla_cpu

    xla_cpu.apply()
    import dataclasses

    import jax

    from kdjax import data, engine, models
    from kdjax.config import AugmentConfig, DistillConfig, TrainConfig

    dataset = data.load_splits(args.data_dir, image_size=args.image_size)
    t_model = models.create_model("resnet50", 2)
    teacher = engine.teachers.from_variables("resnet50", models.init_variables(t_model, jax.random.key(1),
                                                                               args.image_size))
    base = TrainConfig(distill=DistillConfig(loss="ce:1 kd:1", student_train=args.mode), image_size=args.image_size)
    strong = AugmentConfig(augment="randaugment", random_erasing=0.25, mixup_alpha=0.8, cutmix_alpha=1.0)
    variants = {
        "base": base,
        "strong": dataclasses.replace(base, augment=strong),
        "ema": dataclasses.replace(base, ema_decay=0.9998),
        "both": dataclasses.replace(base, augment=strong, ema_decay=0.9998),
    }
    built = {name: _trainer(dataset, config, teacher) for name, config in variants.items()}
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(args.rounds + 1):  # round 0 compiles
        for name, (trainer, group, states) in built.items():
            order, mask = trainer.epoch_order(group, r)
            t0 = time.perf_counter()
            states, metrics = trainer.run_steps(group, states, r, (order[:args.steps], mask[:args.steps], None))
            jax.block_until_ready(states)
            if r:
                seconds[name].append(time.perf_counter() - t0)
            built[name] = (trainer, group, states)
    import os

    record = {"image_size": args.image_size, "mode": args.mode, "steps": args.steps, "batch": base.batch_size,
              "rounds": seconds, "loadavg": os.getloadavg()}
    print(json.dumps(record))
    base_s = statistics.median(seconds["base"])
    print(f"\n| variant ({args.mode}, {args.image_size} px, batch {base.batch_size}, {args.steps} steps) | median s "
          f"| img/s | / base |\n|:---|---:|---:|---:|", file=sys.stderr)
    for name, s in seconds.items():
        m = statistics.median(s)
        print(f"| {name} | {m:.3f} | {args.steps * base.batch_size / m:.1f} | {m / base_s:.3f} |", file=sys.stderr)


if __name__ == "__main__":
    main()
