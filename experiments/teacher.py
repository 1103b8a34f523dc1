"""``python -m experiments.teacher``: the teacher's fine-tuning from a checkout of the repository,
the same command as ``kdjax teacher`` (kdjax.cli.teacher)."""

from kdjax.cli import flags, teacher

if __name__ == "__main__":
    flags.exit_with(lambda: teacher.main(prog="python -m experiments.teacher"), "experiments.teacher")
