"""Recipes as files: every flag of a training command read from TOML, and the resolved recipe of
each study written under its ``--out``.

    kdjax distill --config runs/paper/recipe.toml --out runs/paper_again

A recipe is a flat TOML table whose keys are the command's flags without the dashes (either
spelling where a flag has two: ``s_lr_step_size`` or ``step_size``), plus ``command``, the
command it belongs to. The file's values are turned into command-line tokens placed *before*
the command line's, so argparse checks them as it checks flags and a flag given on the command
line wins. The written recipe holds every flag's resolved value (the dtype and image size the
run actually used, not "default"), so rerunning it on another machine trains the same program;
it leaves out how a run was launched (the multi-process flags, the compile cache, the
console's verbosity), which is not part of what it computes.
"""

from __future__ import annotations

import argparse
import difflib
import math
import pathlib
import tomllib
from typing import Any, Mapping

RECIPE_FILE = "recipe.toml"
NAMED_DIR = pathlib.Path(__file__).resolve().parents[1] / "recipes"  # kdjax/recipes/*.toml


def named_recipes() -> list[str]:
    """The names of the recipes kdjax ships (``kdjax/recipes/NAME.toml``)."""
    return sorted(p.stem for p in NAMED_DIR.glob("*.toml"))


def named_path(name: str) -> pathlib.Path:
    """The file of the named recipe ``name``; an unknown name lists the known ones."""
    path = NAMED_DIR / f"{name}.toml"
    if not path.is_file():
        close = difflib.get_close_matches(name, named_recipes(), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise RecipeError(f"--recipe {name!r} is not a recipe kdjax ships{hint}; the recipes: "
                          f"{', '.join(named_recipes())} (`kdjax recipes` describes them)")
    return path


def describe(name: str) -> str:
    """The first lines of a named recipe's comment: what it is and where its values come from."""
    lines = []
    for line in named_path(name).read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("# ").rstrip())
    return " ".join(lines)

# How a run is launched, not what it computes: never written, and accepted from a file only
# because a user may keep them there.
LAUNCH_FLAGS = frozenset({
    "config", "recipe", "quiet", "verbose", "compile_cache", "coordinator_address", "num_processes", "process_id",
    "distributed", "local_device_ids", "heartbeat_timeout", "initialization_timeout",
})


class RecipeError(ValueError):
    """A recipe file that cannot be read, or a key or value it holds that the command refuses."""


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Every long option of ``parser`` without its dashes, and every dest, -> its action."""
    by_name: dict[str, argparse.Action] = {}
    for action in parser._actions:  # argparse has no public listing of its actions
        if not action.option_strings or action.dest == argparse.SUPPRESS or action.dest == "help":
            continue
        by_name.setdefault(action.dest, action)
        for option in action.option_strings:
            if option.startswith("--"):
                by_name.setdefault(option[2:], action)
    return by_name


def _is_flag(action: argparse.Action) -> bool:
    return isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))


def _scalar_token(path, key: str, value: Any, action: argparse.Action) -> str:
    if isinstance(value, (bool, dict, list)):
        kind = "number" if action.type in (int, float) else "string"
        raise RecipeError(f"{path}: {key} = {value!r} must be a {kind}")
    if isinstance(value, float) and action.type is int:
        raise RecipeError(f"{path}: {key} = {value!r} must be an integer")
    token = repr(value) if isinstance(value, float) else str(value)
    try:
        checked = action.type(token) if action.type is not None else token
    except (TypeError, ValueError):
        raise RecipeError(f"{path}: {key} = {value!r} is not a valid {action.type.__name__}") from None
    if action.choices is not None and checked not in action.choices:
        raise RecipeError(f"{path}: {key} = {value!r} is not one of {', '.join(map(str, action.choices))}")
    return token


def to_argv(path: str | pathlib.Path, parser: argparse.ArgumentParser, command: str) -> list[str]:
    """The command-line tokens of the recipe file ``path`` for ``parser`` (the command
    ``command``). An unknown key, a value of the wrong type, a choice the flag does not offer or
    another command's recipe stops here, naming the file and the key."""
    path = pathlib.Path(path)
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except FileNotFoundError:
        raise RecipeError(f"--config {path}: no such file") from None
    except tomllib.TOMLDecodeError as err:
        raise RecipeError(f"--config {path}: not valid TOML ({err})") from None
    table = dict(table)
    written_for = table.pop("command", command)
    if written_for != command:
        raise RecipeError(f"--config {path} is a recipe of `kdjax {written_for}`, not of `kdjax {command}`: "
                          f"run it with `kdjax {written_for} --config {path}`")
    actions = _actions(parser)
    tokens: list[str] = []
    for key, value in table.items():
        action = actions.get(key)
        if action is None:
            close = difflib.get_close_matches(key, list(actions), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise RecipeError(f"{path}: {key} is not a flag of `kdjax {command}`{hint}; see `kdjax {command} --help`")
        if key in ("config", "recipe"):
            raise RecipeError(f"{path}: a recipe cannot name another recipe ({key} = {value!r})")
        option = next(o for o in action.option_strings if o.startswith("--"))
        if _is_flag(action):
            if not isinstance(value, bool):
                raise RecipeError(f"{path}: {key} = {value!r} must be true or false")
            if value != action.default:
                tokens.append(option)
            continue
        if action.nargs in ("+", "*") or isinstance(action.nargs, int):
            values = value if isinstance(value, list) else [value]
            if action.nargs == "+" and not values:
                raise RecipeError(f"{path}: {key} = [] needs at least one value")
            if isinstance(action.nargs, int) and len(values) != action.nargs:
                raise RecipeError(f"{path}: {key} = {value!r} takes {action.nargs} values")
            tokens += [option, *(_scalar_token(path, key, v, action) for v in values)]
            continue
        tokens += [option, _scalar_token(path, key, value, action)]
    return tokens


def resolved(args: argparse.Namespace, parser: argparse.ArgumentParser, **overrides: Any) -> dict[str, Any]:
    """The recipe of a parsed command line: every flag but the launch ones, None (unset) and empty
    lists left out,
    with ``overrides`` (the values the run resolved a default to) in place of the given ones."""
    recipe = {}
    for action in parser._actions:
        dest = action.dest
        if not action.option_strings or dest in (argparse.SUPPRESS, "help") or dest in LAUNCH_FLAGS:
            continue
        value = overrides.get(dest, getattr(args, dest))
        if value is not None and value != () and value != []:  # an empty list is the default's absence
            recipe[_key(action)] = value
    return recipe


def _key(action: argparse.Action) -> str:
    """The flag's spelling in a written recipe: its dest where that is a flag too, else its first."""
    longs = [o[2:] for o in action.option_strings if o.startswith("--")]
    return action.dest if action.dest in longs else longs[0]


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)  # the shortest text that reads back as the same double
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"a recipe holds booleans, numbers, strings and lists of them, not {value!r}")


def dumps(command: str, recipe: Mapping[str, Any]) -> str:
    """``recipe`` as the TOML text :func:`to_argv` reads back (checked: it parses to the same values)."""
    lines = [
        f"# kdjax {command} recipe: `kdjax {command} --config THIS_FILE --out NEW_DIR` reruns it;",
        "# a flag given on the command line wins over the file.",
        f"command = {_toml_value(command)}",
    ]
    lines += [f"{key} = {_toml_value(value)}" for key, value in recipe.items()]
    text = "\n".join(lines) + "\n"
    back = tomllib.loads(text)
    back.pop("command")
    expected = {k: list(v) if isinstance(v, tuple) else v for k, v in recipe.items()}
    if back != expected:
        raise AssertionError(f"the recipe does not read back as written: {back} != {expected}")
    return text


def write(out: str | pathlib.Path, command: str, recipe: Mapping[str, Any]) -> pathlib.Path:
    """``OUT/recipe.toml``, written atomically (a resumed study overwrites it with its own)."""
    from kdjax import checkpoint

    path = pathlib.Path(out) / RECIPE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.write_text_atomic(path, dumps(command, recipe))
    return path
