"""torchvision ResNet weights for kdjax: name/layout mapping, ImageNet files, conversion CLI.

    python -m kdjax.weights convert --arch {resnet18,resnet50} --src FILE --out DIR \
        [--class-names ants,bees]
    python -m kdjax.weights fetch --arch {resnet18,resnet50}

``FILE`` is read by :mod:`kdjax.torchfile` (no torch, no pickled code run) and may hold a
state_dict or a whole pickled module. The mapping is strict: every key of the file must land on
a flax variable of the same shape and every flax variable must be filled, so a wrong ``--arch``
or a truncated file fails by key name instead of yielding a half-random network.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import pathlib
import re
import sys
from typing import Callable, Sequence

import jax
import numpy as np

from kdjax import checkpoint, models
from kdjax.fetch import DownloadError, download, sha256_file, verify_sha256
from kdjax.torchfile import TorchFileError, load_state_dict

__all__ = [
    "IMAGENET_WEIGHTS", "PretrainedFile", "WeightMappingError", "WeightsNotFoundError",
    "ClassNamesError", "to_flax", "fetch", "imagenet_variables", "load_variables",
    "initial_variables", "convert", "main",
]

DEFAULT_DIR = pathlib.Path("third_party_weights")  # relative to the working directory (repo root)
IMAGENET_CLASSES = 1000


class WeightMappingError(ValueError):
    """A state_dict does not fit the flax model; the message names every offending key."""


class WeightsNotFoundError(FileNotFoundError):
    """The ImageNet file is not on disk; the message gives the command that fetches it."""


class ClassNamesError(ValueError):
    """The class names do not match the head of the weights."""


@dataclasses.dataclass(frozen=True)
class PretrainedFile:
    url: str
    sha256: str
    size: int  # bytes, for the README and a sanity check by eye

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


# torchvision's IMAGENET1K_V1 weights. The 8 hex digits in each file name are torchvision's own
# prefix of the file's SHA-256; the full digests are those published by third parties who
# downloaded the files (see third_party_weights/README.md).
IMAGENET_WEIGHTS: dict[str, PretrainedFile] = {
    "resnet18": PretrainedFile(
        "https://download.pytorch.org/models/resnet18-f37072fd.pth",
        "f37072fd47e89c5e827621c5baffa7500819f7896bbacec160b1a16c560e07ec",
        46_830_571,
    ),
    "resnet50": PretrainedFile(
        "https://download.pytorch.org/models/resnet50-0676ba61.pth",
        "0676ba61b6795bbe1773cffd859882e5e297624d384b6993f7c9e683e722fb8a",
        102_530_333,
    ),
}


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


_TORCH_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias",
               "mean": "running_mean", "var": "running_var"}


def _torch_module_name(flax_names: Sequence[str]) -> str:
    # models.py names the i-th child of a torch Sequential ``<parent>_<i>`` (layer1_0, downsample_1)
    return ".".join(re.sub(r"_(\d+)$", r".\1", n) for n in flax_names)


@functools.lru_cache(maxsize=None)
def _targets(arch: str, num_classes: int) -> dict[str, _Target]:
    """Every torchvision key of ``arch`` and where it goes, derived from the flax model itself."""
    abstract = models.abstract_variables(models.create_model(arch, num_classes))
    table: dict[str, _Target] = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(abstract):
        collection, *mods, name = (p.key for p in path)
        module = _torch_module_name(mods)
        shape = tuple(leaf.shape)
        if name == "kernel" and len(shape) == 4:
            layout, torch_shape = _oihw_to_hwio, (shape[3], shape[2], shape[0], shape[1])
        elif name == "kernel" and len(shape) == 2:
            layout, torch_shape = _linear_to_dense, (shape[1], shape[0])
        else:
            layout, torch_shape = _identity, shape
        table[f"{module}.{_TORCH_LEAF[name]}"] = _Target(
            collection, (*mods, name), torch_shape, layout)
        if name == "mean":  # a BatchNorm: torch also saves a step counter that flax has no use for
            table[f"{module}.num_batches_tracked"] = _Target("", (), None, _identity)
    return table


def _listing(items: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... (+{len(items) - limit} more)" if len(items) > limit else "")


def to_flax(state_dict: dict[str, np.ndarray], arch: str, *, source: str = "state_dict") -> dict:
    """``{'params', 'batch_stats'}`` (nested dicts of float32 numpy arrays) for ``arch``.

    ``num_classes`` is read from ``fc.weight``. Raises :class:`WeightMappingError` naming every
    missing, unexpected or misshaped key (shapes in torch's layout); ``source`` names the file.
    """
    if arch not in models.ARCHS:
        raise WeightMappingError(f"unknown arch {arch!r}: expected one of {sorted(models.ARCHS)}")
    fc = state_dict.get("fc.weight")
    if fc is None or np.ndim(fc) != 2:
        got = "missing" if fc is None else f"of shape {np.shape(fc)}"
        raise WeightMappingError(
            f"{source}: fc.weight is {got}; a torchvision {arch} state_dict has a 2-D fc.weight, "
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
                                                     dtype=np.float32)
    return variables


# ----------------------------------------------------------------------------- ImageNet files

def _spec(arch: str) -> PretrainedFile:
    if arch not in IMAGENET_WEIGHTS:
        raise ValueError(f"no ImageNet weights for arch {arch!r}: expected one of "
                         f"{sorted(IMAGENET_WEIGHTS)}")
    return IMAGENET_WEIGHTS[arch]


def fetch(arch: str, dest_dir: os.PathLike = DEFAULT_DIR) -> pathlib.Path:
    """Download torchvision's IMAGENET1K_V1 file for ``arch`` (checksummed); return its path.

    A file already in ``dest_dir`` is verified, not downloaded again. Offline, raises
    :class:`kdjax.fetch.DownloadError` naming the URL and where to place the file by hand.
    """
    spec = _spec(arch)
    return download(spec.url, pathlib.Path(dest_dir) / spec.filename, spec.sha256)


def imagenet_variables(
    arch: str, num_classes: int, key: jax.Array, *, weights_dir: os.PathLike = DEFAULT_DIR
) -> dict:
    """torchvision's ImageNet weights for ``arch``; a fresh torch-style head unless 1000 classes.

    Never falls back to random weights: a missing file raises :class:`WeightsNotFoundError`
    with the fetch command, a corrupt one :class:`kdjax.fetch.DownloadError`.
    """
    spec = _spec(arch)
    path = pathlib.Path(weights_dir) / spec.filename
    if not path.is_file():
        raise WeightsNotFoundError(
            f"{path}: ImageNet weights for {arch} not found. Fetch them with "
            f"`python -m kdjax.weights fetch --arch {arch}` from the repository root, or "
            f"download {spec.url} by hand and place it at {path}.")
    verify_sha256(path, spec.sha256)
    variables = to_flax(load_state_dict(path), arch, source=str(path))
    if num_classes != IMAGENET_CLASSES:
        fan_in = variables["params"]["fc"]["kernel"].shape[0]
        variables["params"]["fc"] = jax.device_get(models.fresh_head(key, fan_in, num_classes))
    return variables


# ----------------------------------------------------------------------------- initial weights

def load_variables(path: os.PathLike, arch: str) -> tuple[dict, tuple[str, ...] | None, dict]:
    """Variables of ``arch`` from a kdjax model directory or a PyTorch file (state_dict or whole
    pickled module, e.g. the seed's ``resnet50_bees.pt``).

    Returns ``(variables, class_names, provenance)``; ``class_names`` is None for a PyTorch file
    (it does not record them).
    """
    path = pathlib.Path(path)
    if path.is_dir():
        _, variables, meta = checkpoint.load_model(path, arch=arch)
        return jax.device_get(variables), meta.class_names, {"model_dir": str(path.absolute())}
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such model directory or PyTorch file")
    variables = to_flax(load_state_dict(path), arch, source=str(path))
    return variables, None, {"source_file": str(path.absolute()), "source_sha256": sha256_file(path)}


def initial_variables(
    init: str, arch: str, num_classes: int, key: jax.Array, *, image_size: int = 224
) -> tuple[dict, dict]:
    """Starting weights for training, by the ``--init`` flag:

    - ``imagenet``: torchvision's IMAGENET1K_V1 weights with a fresh head (never a silent random
      fallback: a missing file stops with the fetch command);
    - ``scratch``: torchvision's initialisation distributions, seeded by ``key``;
    - a model directory or PyTorch file of ``arch``; its head must have ``num_classes`` outputs.

    Returns ``(variables, provenance)``.
    """
    if init == "imagenet":
        variables = imagenet_variables(arch, num_classes, key)
        return variables, {"init": "imagenet", "url": IMAGENET_WEIGHTS[arch].url}
    if init == "scratch":
        model = models.create_model(arch, num_classes)
        return jax.device_get(models.init_variables(model, key, image_size)), {"init": "scratch"}
    variables, _, provenance = load_variables(init, arch)
    outputs = int(np.shape(variables["params"]["fc"]["bias"])[0])
    if outputs != num_classes:
        raise ValueError(
            f"--init {init}: its head has {outputs} outputs but the data has {num_classes} classes"
        )
    return variables, {"init": str(init), **provenance}


# ----------------------------------------------------------------------------- conversion

def convert(
    src: os.PathLike, out: os.PathLike, *, arch: str, class_names: Sequence[str] | None = None
) -> checkpoint.ModelMeta:
    """Convert a torchvision ``.pth``/``.pt`` (state_dict or whole module) to a model directory.

    ``class_names`` defaults to ``class_0 .. class_{n-1}`` for the head's ``n`` outputs.
    """
    src = pathlib.Path(src)
    variables = to_flax(load_state_dict(src), arch, source=str(src))
    num_classes = int(variables["params"]["fc"]["bias"].shape[0])
    if class_names is None:
        class_names = [f"class_{i}" for i in range(num_classes)]
    if len(class_names) != num_classes:
        raise ClassNamesError(
            f"{len(class_names)} class names ({_listing(list(class_names), 4)}) but {src} has "
            f"{num_classes} outputs (fc.weight); give exactly {num_classes} comma-separated names")
    digest = sha256_file(src)
    provenance = {
        "source_file": src.name,
        "source_sha256": digest,
        "converted_by": "kdjax.weights",
    }
    for spec in IMAGENET_WEIGHTS.values():
        if spec.sha256 == digest:
            provenance["source_url"] = spec.url
            provenance["source_license"] = "BSD-3-Clause (torchvision)"
    return checkpoint.save_model(out, variables, arch=arch, class_names=class_names,
                                 provenance=provenance)


# ----------------------------------------------------------------------------- command line

class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line on stderr, not argparse's usage block
        raise _UsageError(message)


def _class_names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",")]
    if any(not n for n in names):
        raise ClassNamesError(f"empty name in {text!r}")
    if len(set(names)) != len(names):
        raise ClassNamesError(f"duplicate names in {text!r}")
    return names


def main(argv: Sequence[str] | None = None) -> int:
    parser = _Parser(prog="python -m kdjax.weights", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    conv = commands.add_parser("convert", help="torchvision .pth/.pt -> kdjax model directory")
    conv.add_argument("--arch", required=True, choices=sorted(models.ARCHS))
    conv.add_argument("--src", required=True, type=pathlib.Path, help="state_dict or module file")
    conv.add_argument("--out", required=True, type=pathlib.Path, help="model directory to write")
    conv.add_argument("--class-names", help="comma-separated, in output order (default class_i)")
    get = commands.add_parser("fetch", help=f"torchvision's ImageNet file -> {DEFAULT_DIR}/")
    get.add_argument("--arch", required=True, choices=sorted(IMAGENET_WEIGHTS))

    def fail(message: str) -> int:
        print(f"kdjax.weights: error: {' '.join(str(message).split())}", file=sys.stderr)
        return 2

    try:
        args = parser.parse_args(argv)
    except _UsageError as err:
        return fail(str(err))
    try:
        if args.command == "fetch":
            print(fetch(args.arch))
            return 0
        names = _class_names(args.class_names) if args.class_names is not None else None
        meta = convert(args.src, args.out, arch=args.arch, class_names=names)
    except ClassNamesError as err:
        return fail(f"--class-names: {err}")
    except (WeightMappingError, TorchFileError, DownloadError, checkpoint.ModelDirError,
            OSError, ValueError) as err:
        return fail(str(err))
    print(f"{args.out}: {meta.arch}, {meta.num_classes} classes, {meta.fingerprint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
