"""The shape of the package, as STYLE.md and the engine issue set it: no kdjax module over 600
lines, no kdjax function with more than 8 parameters, and no library module importing the
command line (``kdjax.cli``), except where it runs as ``python -m kdjax.X``."""

from __future__ import annotations

import ast
import pathlib

KDJAX = pathlib.Path(__file__).resolve().parents[1] / "kdjax"
MAX_LINES = 600
MAX_PARAMETERS = 8


def _modules():
    return sorted(KDJAX.rglob("*.py"))


def test_no_module_is_over_600_lines():
    long = {str(p.relative_to(KDJAX)): n for p in _modules() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these modules, each holds two ideas: {long}"


def _parameters(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    a = node.args
    names = [x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs)]
    count = len(names) + (a.vararg is not None) + (a.kwarg is not None)
    return count - (names[:1] in (["self"], ["cls"]))


def test_no_function_takes_more_than_8_parameters():
    wide = [f"{p.relative_to(KDJAX)}:{node.lineno} {node.name} ({_parameters(node)})"
            for p in _modules() for node in ast.walk(ast.parse(p.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _parameters(node) > MAX_PARAMETERS]
    assert not wide, f"use a frozen config or dataclass: {wide}"


def _under_main_guard(tree: ast.Module) -> set[int]:
    lines = set()
    for node in tree.body:
        if (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
                and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__"):
            lines |= {n.lineno for n in ast.walk(node) if hasattr(n, "lineno")}
    return lines


def test_library_modules_import_nothing_from_the_command_line():
    upward = []
    for p in _modules():
        # api.py is the commands' face in Python (kdjax.distill runs kdjax distill's parser)
        if p.relative_to(KDJAX).parts[0] in ("cli", "__main__.py", "api.py"):
            continue
        tree = ast.parse(p.read_text())
        guarded = _under_main_guard(tree)
        for node in ast.walk(tree):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            if node.lineno not in guarded if names else False:
                if any(n == "kdjax.cli" or n.startswith("kdjax.cli.") for n in names):
                    upward.append(f"{p.relative_to(KDJAX)}:{node.lineno}")
    assert not upward, f"library modules importing kdjax.cli: {upward}"
