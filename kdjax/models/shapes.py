"""A cache on disk of the networks' variable shapes, so that a warm start need not trace a
network's initialiser to know what its variables look like.

``layers.abstract_variables`` (what restoring and checking a model directory asks for) traces
the network's ``init`` under ``jax.eval_shape``: for a ResNet-50 a few tenths of a second of
Python in every process that loads one (benchmarks/README.md, start-up). The result depends only
on the module (its fields, its code) and the input size, so it is kept in
``$KDJAX_CACHE/shapes/`` (default ``~/.cache/kdjax/shapes``), keyed by the module's repr, the
image size, the versions of kdjax, flax and jax and a digest of kdjax's network sources. Only
kdjax's own networks are cached: a user's module may change its code without changing its repr.
A cache that cannot be read or written is left alone: the shapes are then traced as before.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import pathlib
from typing import Callable

import flax
import flax.linen as nn
import jax
import numpy as np

log = logging.getLogger(__name__)
FORMAT = 1


def cache_dir() -> pathlib.Path:
    root = os.environ.get("KDJAX_CACHE") or os.path.join("~", ".cache", "kdjax")
    return pathlib.Path(root).expanduser() / "shapes"


@functools.lru_cache(maxsize=1)
def _sources_digest() -> str:
    """The bytes of kdjax's network modules: a change of any network's code changes every key."""
    digest = hashlib.sha256()
    for path in sorted(pathlib.Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _key(model: nn.Module, image_size: int) -> str | None:
    if not type(model).__module__.startswith("kdjax.models.") or type(model).__module__ == "kdjax.models.user":
        return None  # a user's network: its code is not among the sources digested here
    from kdjax import __version__

    payload = json.dumps([FORMAT, repr(model), image_size, __version__, flax.__version__, jax.__version__,
                          _sources_digest()])
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def _encode(tree) -> list:
    return [[jax.tree_util.keystr(path), list(leaf.shape), str(leaf.dtype)]
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)]


def _nested(entries: list) -> dict:
    """A nested dict of ``jax.ShapeDtypeStruct`` from ``_encode``'s ``['key']['path']`` entries."""
    out: dict = {}
    for path, shape, dtype in entries:
        keys = [k.strip("'") for k in path.strip("[]").split("][")]
        node = out
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = jax.ShapeDtypeStruct(tuple(shape), np.dtype(dtype))
    return out


def cached(model: nn.Module, image_size: int, trace: Callable[[], dict]) -> dict:
    """``trace()`` (the network's abstract variables at ``image_size``), read from the disk cache
    when an earlier process stored it there, and stored there otherwise."""
    key = _key(model, image_size)
    if key is None:
        return trace()
    path = cache_dir() / f"{key}.json"
    try:
        stored = json.loads(path.read_text())
        variables = {"batch_stats": {}, "params": {}, **_nested(stored["leaves"])}
        if stored["empty"]:
            for name in stored["empty"]:
                variables.setdefault(name, {})
        return variables
    except (OSError, ValueError, KeyError, TypeError):
        pass
    variables = trace()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps({"leaves": _encode(variables), "empty": [k for k, v in variables.items() if not v]}))
        os.replace(tmp, path)
    except OSError as err:
        log.debug("shape cache %s not written: %s", path, err)
    return variables
