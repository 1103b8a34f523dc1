"""One process of a small distillation run, alone or as part of a multi-process run (CPU, gloo).

    python tests/dist_child.py WORKDIR IMAGES CACHE [--devices N] [--epochs E]
        [--coordinator_address HOST:PORT --num_processes P --process_id I] [--heartbeat_timeout S]
        [--kill-during-epoch E]

The same run as tests/train_child.py's in spirit (32 px, ResNet-18 student and teacher, batch 4),
through ``kdjax.distributed`` the way the entry points use it: ``initialize`` first, the data
prepared by process 0 first, failures turned into an immediate exit by ``exit_with``.
``--kill-during-epoch E`` sends SIGKILL to this very process shortly after epoch E-1 has been
checkpointed, i.e. while epoch E is being computed.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir")
    parser.add_argument("images")
    parser.add_argument("cache")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--coordinator_address")
    parser.add_argument("--num_processes", type=int)
    parser.add_argument("--process_id", type=int)
    parser.add_argument("--heartbeat_timeout", type=int, default=10)
    parser.add_argument("--kill-during-epoch", type=int, default=0)
    args = parser.parse_args()
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from kdjax import xla_cpu

    xla_cpu.apply()  # as conftest: the tests' processes all run what users run

    from kdjax import distributed

    distributed.initialize(args.coordinator_address, args.num_processes, args.process_id,
                           heartbeat_timeout=args.heartbeat_timeout)

    import jax

    from kdjax import checkpoint, data, models, train
    from kdjax.config import DistillConfig, OptimConfig, TrainConfig

    with distributed.primary_first("dist_child.data"):
        dataset = data.load_splits(args.images, image_size=32, cache_dir=args.cache)
    teacher_model = models.create_model("resnet18", 2)
    teacher_vars = jax.device_get(models.init_variables(teacher_model, jax.random.key(1), 32))
    teacher = train.Teacher(teacher_model, teacher_vars, checkpoint.fingerprint(teacher_vars))
    student_vars = jax.device_get(models.init_variables(models.create_model("resnet18", 2), jax.random.key(2), 32))
    config = TrainConfig(
        optim=OptimConfig(lr=0.01, step_size=1, gamma=0.5),
        distill=DistillConfig(alpha=0.5, student_train="fc"),
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
    return 0


if __name__ == "__main__":
    from kdjax.distributed import exit_with

    exit_with(main, "dist_child")
