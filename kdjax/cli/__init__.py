"""The ``kdjax`` command: one console script over the entry points, each with its own flags.

    kdjax distill ...    the study: teacher, distillation runs, tables (kdjax.cli.distill)
    kdjax teacher ...    fine-tune a teacher (kdjax.cli.teacher)
    kdjax predict ...    classify image files with a model directory (kdjax.cli.predict)
    kdjax evaluate ...   accuracy, per-class figures, confusion matrix on a folder (kdjax.cli.evaluate)
    kdjax convert ...    a torchvision .pth/.pt -> a kdjax model directory (kdjax.cli.weights convert)
    kdjax export ...     a kdjax model directory -> a torchvision state_dict (kdjax.cli.weights export)
    kdjax fetch ...      download torchvision's ImageNet file of an architecture (kdjax.cli.weights fetch)

``kdjax COMMAND --help`` lists a command's flags. Each command is the same program as its
``python -m`` module (``experiments.paper`` and ``experiments.teacher`` in a checkout); only the
name in its messages differs.
"""

from __future__ import annotations

import sys
from typing import Callable, Sequence


def _distill(argv, prog):
    from kdjax.cli import distill

    return distill.main(argv, prog=prog)


def _teacher(argv, prog):
    from kdjax.cli import teacher

    return teacher.main(argv, prog=prog)


def _predict(argv, prog):
    from kdjax.cli import predict

    return predict.main(argv, prog=prog)


def _evaluate(argv, prog):
    from kdjax.cli import evaluate

    return evaluate.main(argv, prog=prog)


def _weights(subcommand: str):
    def run(argv, prog):
        from kdjax.cli import weights

        return weights.main([subcommand, *argv], prog="kdjax")

    return run


def _recipes(argv, prog):
    """``kdjax recipes``: the named recipes, each with what it is and where its values come from."""
    import textwrap

    from kdjax.cli import recipe

    if argv:
        print(f"{prog}: error: takes no arguments (got {' '.join(argv)})", file=sys.stderr)
        return 2
    for name in recipe.named_recipes():
        print(f"{name}  ({recipe.named_path(name)})")
        print(textwrap.indent(textwrap.fill(recipe.describe(name), 96), "    "))
    print("\nuse one with `kdjax distill --recipe NAME`; flags given on the command line win over it")
    return 0


# command -> (what `kdjax --help` says of it, its main(argv, prog) -> exit status)
COMMANDS: dict[str, tuple[str, Callable[[list[str], str], int]]] = {
    "distill": ("the study: teacher, distillation runs per alpha, tables and plots", _distill),
    "teacher": ("fine-tune a teacher with the seed's recipe", _teacher),
    "predict": ("classify image files with a model directory (JSON lines)", _predict),
    "evaluate": ("accuracy, per-class precision/recall, confusion matrix of a model on a folder", _evaluate),
    "convert": ("a torchvision .pth/.pt -> a kdjax model directory", _weights("convert")),
    "export": ("a kdjax model directory -> a torchvision state_dict .pth", _weights("export")),
    "fetch": ("download torchvision's ImageNet weights of an architecture", _weights("fetch")),
    "recipes": ("the named training recipes (--recipe NAME) and where their values come from", _recipes),
}

# the commands that may join a multi-process run: they exit through kdjax.distributed
_TRAINING = ("distill", "teacher")


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: kdjax COMMAND [flags]   (kdjax COMMAND --help: its flags)", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (help_, _) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``kdjax COMMAND ...``; returns the command's exit status (2 for an unknown command)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from kdjax import __version__

        print(f"kdjax {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"kdjax: error: unknown command {name!r}; one of {', '.join(COMMANDS)}\n\n{_usage()}", file=sys.stderr)
        return 2
    return COMMANDS[name][1](rest, f"kdjax {name}")


def console_main() -> None:
    """The console script's entry (pyproject ``[project.scripts]``)."""
    argv = sys.argv[1:]
    if argv and argv[0] in _TRAINING:
        from kdjax.cli import flags

        # a failed process of a multi-process run must take its peers down (kdjax.distributed)
        flags.exit_with(lambda: main(argv), f"kdjax {argv[0]}")
    sys.exit(main(argv))
