"""``python -m experiments.paper``: the study from a checkout of the repository, the same command
as ``kdjax distill`` (kdjax.cli.distill), whose flags and defaults are the seed's."""

from kdjax.cli import distill, flags

if __name__ == "__main__":
    flags.exit_with(lambda: distill.main(prog="python -m experiments.paper"), "experiments.paper")
