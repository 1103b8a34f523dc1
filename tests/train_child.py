"""A small distillation run in its own process, for the kill-and-resume and sharding tests.

    python tests/train_child.py WORKDIR IMAGES CACHE [--devices N] [--kill-during-epoch E]

``--kill-during-epoch E`` sends SIGKILL to this very process shortly after epoch E-1 has been
checkpointed, i.e. while epoch E is being computed: the harshest interruption there is (no
exception handler, no atexit, no orbax finalisation).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir")
    parser.add_argument("images")
    parser.add_argument("cache")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--kill-during-epoch", type=int, default=0)
    args = parser.parse_args()
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from kdjax import xla_cpu

    xla_cpu.apply()  # as conftest: the tests' processes all run what users run

    import jax

    from kdjax import checkpoint, data, models, train
    from kdjax.config import DistillConfig, OptimConfig, TrainConfig

    dataset = data.load_splits(args.images, image_size=32, cache_dir=args.cache)
    teacher_model = models.create_model("resnet18", 2)
    teacher_vars = models.init_variables(teacher_model, jax.random.key(1), 32)
    teacher = train.Teacher(teacher_model, teacher_vars, checkpoint.fingerprint(teacher_vars))
    student_vars = models.init_variables(models.create_model("resnet18", 2), jax.random.key(2), 32)
    config = TrainConfig(
        optim=OptimConfig(lr=0.005, step_size=2, gamma=0.1),
        distill=DistillConfig(alpha=0.5, student_train="all"),
        num_epochs=args.epochs,
        batch_size=4,
        image_size=32,
        seed=3,
    )

    def on_epoch(record: dict) -> None:
        if record["epoch"] == args.kill_during_epoch - 1:
            # Fire while the next epoch's program runs (an epoch here takes seconds).
            threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGKILL)).start()

    train.train_and_evaluate(config, args.workdir, dataset, student_vars, teacher=teacher, on_epoch=on_epoch)


if __name__ == "__main__":
    sys.exit(main())
