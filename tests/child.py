"""A small distillation run in its own process: alone, or one process of a multi-process run (CPU,
gloo). For the kill-and-resume test (tests/test_engine_loop.py) and the multi-process runs
(tests/test_distributed.py); conftest's ``child_command`` and ``child_env`` start it.

    python tests/child.py WORKDIR IMAGES CACHE [--student_train fc|all] [--devices N] [--epochs E]
        [--kill-during-epoch E] [--data_in_memory on|off]
        [--coordinator_address HOST:PORT --num_processes P --process_id I] [--heartbeat_timeout S]

32 px, ResNet-18 student and teacher (random), batch 4, through ``kdjax.distributed`` the way the
entry points use it: ``initialize`` first (nothing without the coordinator flags), the data
prepared by process 0 first, failures of a multi-process run turned into an immediate exit by
``exit_with``. ``--student_train`` picks the recipe: ``fc`` trains the head; ``all`` fine-tunes
everything, so that a resumed run must restore every parameter's momentum and the BatchNorm
statistics. ``--kill-during-epoch E`` sends SIGKILL to this very process shortly after epoch E-1
has been checkpointed, i.e. while epoch E is being computed: the harshest interruption there is
(no exception handler, no atexit, no orbax finalisation).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import threading

# The learning-rate schedule of each --student_train recipe (OptimConfig's fields).
OPTIM = {"fc": dict(lr=0.01, step_size=1, gamma=0.5), "all": dict(lr=0.005, step_size=2, gamma=0.1)}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir")
    parser.add_argument("images")
    parser.add_argument("cache")
    parser.add_argument("--student_train", choices=sorted(OPTIM), default="fc")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--kill-during-epoch", type=int, default=0)
    parser.add_argument("--data_in_memory", choices=("on", "off"), default="on")
    parser.add_argument("--coordinator_address")
    parser.add_argument("--num_processes", type=int)
    parser.add_argument("--process_id", type=int)
    parser.add_argument("--heartbeat_timeout", type=int, default=10)
    args = parser.parse_args()
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from kdjax import xla_cpu

    xla_cpu.apply()  # as conftest: the tests' processes all run what users run

    from kdjax import distributed

    distributed.initialize(args.coordinator_address, args.num_processes, args.process_id,
                           heartbeat_timeout=args.heartbeat_timeout)

    import jax

    from kdjax import checkpoint, data, engine, models
    from kdjax.config import DistillConfig, OptimConfig, TrainConfig

    with distributed.primary_first("child.data"):
        dataset = data.load_splits(args.images, image_size=32, cache_dir=args.cache, in_memory=args.data_in_memory)
    read = []  # the training records this process reads (a streamed split)
    if not dataset.in_memory:
        source = dataset["train"].source

        class Counting:
            def __len__(self):
                return len(source)

            def __getitems__(self, keys):
                read.extend(keys)
                return source.__getitems__(keys)

        train_split = dataclasses.replace(dataset["train"], source=Counting())
        dataset = dataclasses.replace(dataset, splits={**dataset.splits, "train": train_split})
    teacher_model = models.create_model("resnet18", 2)
    teacher_vars = jax.device_get(models.init_variables(teacher_model, jax.random.key(1), 32))
    teacher = engine.Teacher("resnet18", teacher_model, teacher_vars, checkpoint.fingerprint(teacher_vars))
    student_vars = jax.device_get(models.init_variables(models.create_model("resnet18", 2), jax.random.key(2), 32))
    config = TrainConfig(
        optim=OptimConfig(**OPTIM[args.student_train]),
        distill=DistillConfig(alpha=0.5, student_train=args.student_train),
        num_epochs=args.epochs,
        batch_size=4,
        image_size=32,
        seed=3,
    )

    def on_epoch(record: dict) -> None:
        if record["epoch"] == args.kill_during_epoch - 1:
            # Fire while the next epoch's program runs (an epoch here takes seconds).
            threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGKILL)).start()

    engine.train_and_evaluate(engine.Run(config, args.workdir, student_vars), dataset, teacher=teacher,
                              on_epoch=on_epoch)
    if not dataset.in_memory:
        print(f"child: read {len(read)} training records", flush=True)
    return 0


if __name__ == "__main__":
    from kdjax.distributed import exit_with

    exit_with(main, "child")
