"""torchvision's state_dict <-> kdjax's flax variables, and torchvision's ImageNet files.

The mapping is derived from the flax model itself (each entry's ``torch_name`` gives a flax
module's torch name: ``layer1_0`` is torch's ``layer1.0``, ``features/0/1`` is ``features.0.1``)
and is strict: every key of the file must land on a flax variable of the same shape and every
flax variable must be filled, so a wrong architecture or a truncated file fails by key name
instead of yielding a half-random network.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
from typing import Callable, Sequence

import jax
import numpy as np

from kdjax.fetch import DownloadError, download, sha256_file, verify_sha256
from kdjax.models import imagenet, layers, registry
from kdjax.models.torchfile import load_state_dict

DEFAULT_DIR = pathlib.Path("third_party_weights")  # relative to the working directory (repo root)
IMAGENET_CLASSES = 1000


class WeightMappingError(ValueError):
    """A state_dict does not fit the flax model; the message names every offending key."""


class WeightsNotFoundError(FileNotFoundError):
    """The ImageNet file is not on disk; the message gives the command that fetches it."""


# The file each architecture's ``--init imagenet`` loads: torchvision's IMAGENET1K_V1 (the
# seed study's, and the one every architecture has); ``imagenet.WEIGHTS`` lists every file.
IMAGENET_WEIGHTS: dict[str, imagenet.Weights] = {arch: imagenet.get(arch, name) for arch, name in
                                                 imagenet.DEFAULT.items()}


# ----------------------------------------------------------------------------- name mapping

@dataclasses.dataclass(frozen=True)
class _Target:
    """Where one torchvision key goes: ``variables[collection][*path]`` after ``layout``."""

    collection: str  # "params", "batch_stats" or "" for keys that are consumed but dropped
    path: tuple[str, ...]
    torch_shape: tuple[int, ...] | None
    layout: Callable[[np.ndarray], np.ndarray]


def _identity(a: np.ndarray) -> np.ndarray:
    return a


def _oihw_to_hwio(a: np.ndarray) -> np.ndarray:
    return a.transpose(2, 3, 1, 0)


def _linear_to_dense(a: np.ndarray) -> np.ndarray:
    return a.T  # torch Linear stores (out, in); flax Dense (in, out)


# flax leaf -> torch's; any other leaf (ConvNeXt's layer_scale, ViT's class_token and
# in_proj_weight) is a raw parameter kept in torch's name and layout.
_TORCH_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias",
               "mean": "running_mean", "var": "running_var"}


@functools.lru_cache(maxsize=None)
def _targets(arch: str, num_classes: int) -> dict[str, _Target]:
    """Every torchvision key of ``arch`` and where it goes, derived from the flax model itself."""
    spec = registry.get(arch)
    model = registry.create_model(arch, num_classes)
    abstract = layers.abstract_variables(model, spec.input.crop_size)
    table: dict[str, _Target] = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(abstract):
        collection, *mods, name = (p.key for p in path)
        module = spec.torch_name(mods) if mods else ""
        shape = tuple(leaf.shape)
        if name == "kernel" and len(shape) == 4:
            layout, torch_shape = _oihw_to_hwio, (shape[3], shape[2], shape[0], shape[1])
        elif name == "kernel" and len(shape) == 2:
            layout, torch_shape = _linear_to_dense, (shape[1], shape[0])
        else:
            layout, torch_shape = _identity, shape
        leaf_name = _TORCH_LEAF.get(name, name)  # a top-level raw parameter (ViT's class_token) has no module
        table[f"{module}.{leaf_name}" if mods else leaf_name] = _Target(
            collection, (*mods, name), torch_shape, layout)
        if name == "mean":  # a BatchNorm: torch also saves a step counter that flax has no use for
            table[f"{module}.num_batches_tracked"] = _Target("", (), None, _identity)
    return table


def head_key(arch: str) -> str:
    """The torch key of ``arch``'s classifier weight (``fc.weight``, ``classifier.3.weight``)."""
    spec = registry.get(arch)
    return f"{spec.torch_name([spec.head])}.weight"


_TO_TORCH = {_oihw_to_hwio: lambda a: a.transpose(3, 2, 0, 1), _linear_to_dense: lambda a: a.T,
             _identity: _identity}


def from_flax(variables: dict, arch: str) -> dict[str, np.ndarray]:
    """torchvision's state_dict of ``arch`` from kdjax ``{'params', 'batch_stats'}``: every key
    ``torchvision.models.<arch>(num_classes=n).load_state_dict(..., strict=True)`` expects, in
    torch's layouts, float32; ``num_batches_tracked`` (which kdjax does not keep) is 0."""
    num_classes = registry.num_outputs(arch, variables)
    out: dict[str, np.ndarray] = {}
    for key, target in _targets(arch, num_classes).items():
        if not target.collection:
            out[key] = np.zeros((), np.int64)
            continue
        node = variables[target.collection]
        for name in target.path:
            node = node[name]
        out[key] = np.ascontiguousarray(_TO_TORCH[target.layout](np.asarray(node, np.float32)))
    return out


def _listing(items: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... (+{len(items) - limit} more)" if len(items) > limit else "")


def to_flax(state_dict: dict[str, np.ndarray], arch: str, *, source: str = "state_dict",
            dtype=np.float32) -> dict:
    """``{'params', 'batch_stats'}`` (nested dicts of ``dtype`` numpy arrays: float32, or
    float64 for the architecture certificates of the tests) for ``arch``.

    ``num_classes`` is read from the head's weight (``fc.weight`` in a ResNet). Raises
    :class:`WeightMappingError` naming every missing, unexpected or misshaped key (shapes in
    torch's layout); ``source`` names the file.
    """
    if arch not in registry.ARCHS:
        raise WeightMappingError(f"unknown arch {arch!r}: expected one of {sorted(registry.ARCHS)}")
    key = head_key(arch)
    fc = state_dict.get(key)
    if fc is None or np.ndim(fc) != 2:
        got = "missing" if fc is None else f"of shape {np.shape(fc)}"
        raise WeightMappingError(
            f"{source}: {key} is {got}; a torchvision {arch} state_dict has a 2-D {key}, "
            "which also gives the number of classes")
    num_classes = int(np.shape(fc)[0])
    table = _targets(arch, num_classes)

    unexpected = [k for k in state_dict if k not in table]
    missing = [k for k, t in table.items() if t.collection and k not in state_dict]
    misshaped = [
        f"{k} is {tuple(np.shape(v))}, expected {table[k].torch_shape}"
        for k, v in state_dict.items()
        if k in table and table[k].collection and tuple(np.shape(v)) != table[k].torch_shape
    ]
    if unexpected or missing or misshaped:
        found = (("missing", missing), ("unexpected", unexpected), ("misshaped", misshaped))
        parts = [f"{len(keys)} {kind} key(s): {_listing(keys)}" for kind, keys in found if keys]
        raise WeightMappingError(
            f"{source} does not fit a torchvision {arch} with {num_classes} classes: "
            + "; ".join(parts)
            + f". Check that the file holds a torchvision {arch}.")

    variables: dict = {"params": {}, "batch_stats": {}}
    for key, value in state_dict.items():
        target = table[key]
        if not target.collection:
            continue
        node = variables[target.collection]
        for name in target.path[:-1]:
            node = node.setdefault(name, {})
        node[target.path[-1]] = np.ascontiguousarray(target.layout(np.asarray(value)),
                                                     dtype=dtype)
    return variables


# ----------------------------------------------------------------------------- ImageNet files

def _weights(arch: str, name: str | None) -> imagenet.Weights:
    if name is None:
        if arch not in IMAGENET_WEIGHTS:
            raise ValueError(f"no ImageNet weights for arch {arch!r}: expected one of {sorted(IMAGENET_WEIGHTS)}")
        return IMAGENET_WEIGHTS[arch]
    return imagenet.get(arch, name)


def _verify(path: pathlib.Path, w: imagenet.Weights) -> None:
    """The full SHA-256 where it is known, else torchvision's hash prefix (as torch.hub does)."""
    if imagenet.verification(w) == "sha256":
        verify_sha256(path, w.sha256)
        return
    actual = sha256_file(path)
    if not actual.startswith(w.hash_prefix):
        raise DownloadError(
            f"{path}: SHA-256 is {actual}, which does not start with {w.hash_prefix} as torchvision's "
            "file name says. The file is corrupt or not the published one; delete it and fetch it again.")


def fetch(arch: str, dest_dir: os.PathLike = DEFAULT_DIR, name: str | None = None) -> pathlib.Path:
    """Download torchvision's ImageNet file ``name`` (default IMAGENET1K_V1) for ``arch``
    (checksummed); return its path.

    A file already in ``dest_dir`` is verified, not downloaded again. Offline, raises
    :class:`kdjax.fetch.DownloadError` naming the URL and where to place the file by hand.
    """
    w = _weights(arch, name)
    path = download(w.url, pathlib.Path(dest_dir) / w.filename, w.sha256)
    _verify(path, w)
    return path


def known_weights(digest: str) -> imagenet.Weights | None:
    """The torchvision ImageNet file whose SHA-256 is ``digest`` (a full digest where one is
    recorded, else the hash prefix of torchvision's file name), or None."""
    for by_name in imagenet.WEIGHTS.values():
        for w in by_name.values():
            if (w.sha256 == digest) if w.sha256 else digest.startswith(w.hash_prefix):
                return w
    return None


def imagenet_variables(
    arch: str, num_classes: int, key: jax.Array, *, weights_dir: os.PathLike = DEFAULT_DIR,
    name: str | None = None,
) -> dict:
    """torchvision's ImageNet weights ``name`` (default IMAGENET1K_V1) for ``arch``; a fresh
    torch-style head unless 1000 classes.

    Never falls back to random weights: a missing file raises :class:`WeightsNotFoundError`
    with the fetch command, a corrupt one :class:`kdjax.fetch.DownloadError`.
    """
    w = _weights(arch, name)
    spec = registry.get(arch)
    if spec.fixed_size and w.crop_size != spec.input.crop_size:
        raise ValueError(f"{arch} {w.name} was trained at {w.crop_size} px; kdjax's {arch} takes "
                         f"{spec.input.crop_size} px only: choose one of {sorted(imagenet.WEIGHTS[arch])} "
                         f"trained at {spec.input.crop_size} px")
    path = pathlib.Path(weights_dir) / w.filename
    if not path.is_file():
        flag = "" if name is None else f" --weights {w.name}"
        raise WeightsNotFoundError(
            f"{path}: ImageNet weights for {arch} not found. Fetch them with "
            f"`python -m kdjax.weights fetch --arch {arch}{flag}` from the repository root, or "
            f"download {w.url} by hand and place it at {path}.")
    _verify(path, w)
    variables = to_flax(load_state_dict(path), arch, source=str(path))
    if num_classes != IMAGENET_CLASSES:
        variables = registry.replace_head(arch, variables, key, num_classes)
    return variables
