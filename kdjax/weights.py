"""Where a run's weights come from (ImageNet, scratch, a file), conversion and export.

The commands over these (``kdjax convert | export | fetch``, also ``python -m kdjax.weights
convert|fetch|list|export``) are ``kdjax.cli.weights``.

``FILE`` is read by :mod:`kdjax.models.torchfile` (no torch, no pickled code run) and may hold a
state_dict or a whole pickled module; :mod:`kdjax.models.torchvision` maps it, strictly.
"""

from __future__ import annotations

import os
import pathlib
import sys
from typing import Sequence

import jax

from kdjax import checkpoint, distributed, models
from kdjax.fetch import sha256_file
from kdjax.models.torchfile import load_state_dict, save_state_dict
from kdjax.models.torchvision import (
    DEFAULT_DIR,
    IMAGENET_WEIGHTS,
    WeightMappingError,
    WeightsNotFoundError,
    _listing,
    fetch,
    from_flax,
    imagenet_variables,
    known_weights,
    to_flax,
)

__all__ = [
    "IMAGENET_WEIGHTS", "WeightMappingError", "WeightsNotFoundError",
    "ClassNamesError", "to_flax", "fetch", "imagenet_variables", "load_variables",
    "initial_variables", "convert", "export",
]



class ClassNamesError(ValueError):
    """The class names do not match the head of the weights."""


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

    - ``imagenet``: torchvision's IMAGENET1K_V1 weights with a fresh head; a file missing from
      ``third_party_weights/`` is downloaded first (checksummed). Never a silent random fallback:
      offline, the download stops with its URL and where to place the file by hand;
    - ``scratch``: torchvision's initialisation distributions, seeded by ``key``;
    - a model directory or PyTorch file of ``arch``; its head must have ``num_classes`` outputs.

    Returns ``(variables, provenance)``.
    """
    if init == "imagenet":
        # a missing file is downloaded (checksummed, with a progress bar) by process 0 first, the
        # others then find it; offline, fetch stops with the URL and where to put the file
        with distributed.primary_first("kdjax.weights.initial_variables"):
            if not (DEFAULT_DIR / IMAGENET_WEIGHTS[arch].filename).is_file():
                fetch(arch)
        variables = imagenet_variables(arch, num_classes, key)
        return variables, {"init": "imagenet", "url": IMAGENET_WEIGHTS[arch].url}
    if init == "scratch":
        model = models.create_model(arch, num_classes)
        spec = models.get(arch)
        size = spec.input.crop_size if spec.fixed_size else image_size
        return jax.device_get(models.init_variables(model, key, size)), {"init": "scratch"}
    variables, _, provenance = load_variables(init, arch)
    outputs = models.num_outputs(arch, variables)
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
    num_classes = models.num_outputs(arch, variables)
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
    inputs = None  # the architecture's IMAGENET1K_V1 transform, unless the file is a known one
    known = known_weights(digest)
    if known is not None and known.arch == arch:
        provenance.update(source_url=known.url, source_weights=known.name,
                          source_license="BSD-3-Clause (torchvision)")
        inputs = models.InputSpec(crop_size=known.crop_size, resize_size=known.resize_size,
                                  interpolation=known.interpolation)
    return checkpoint.save_model(out, variables, arch=arch, class_names=class_names,
                                 provenance=provenance, image_size=(inputs or models.get(arch).input).crop_size,
                                 inputs=inputs)


def export(checkpoint_dir: os.PathLike, out: os.PathLike) -> tuple[pathlib.Path, pathlib.Path]:
    """A kdjax model directory as a torchvision state_dict file ``out`` (what
    ``torchvision.models.<arch>(num_classes=n).load_state_dict(torch.load(out), strict=True)``
    accepts; written without torch) and a JSON sidecar ``out`` with suffix ``.json``: the
    architecture, class names, eval transform (resize, crop, interpolation, mean, std), the
    weights' fingerprint and provenance. Returns both paths."""
    import json

    _, variables, meta = checkpoint.load_model(checkpoint_dir)
    out = pathlib.Path(out)
    if out.suffix not in (".pth", ".pt"):
        raise ValueError(f"--out {out}: give a .pth or .pt file name (the sidecar goes next to it as .json)")
    path = save_state_dict(from_flax(jax.device_get(variables), meta.arch), out)
    sidecar = out.with_suffix(".json")
    info = {
        "arch": meta.arch, "torchvision_builder": models.get(meta.arch).torchvision,
        "num_classes": meta.num_classes, "class_names": list(meta.class_names),
        "eval_transform": {"resize": meta.resize_size, "crop": meta.image_size,
                           "interpolation": meta.interpolation,
                           "mean": list(meta.mean), "std": list(meta.std)},
        "fingerprint": meta.fingerprint, "provenance": meta.provenance,
        "exported_by": "kdjax.weights export", "exported_from": str(pathlib.Path(checkpoint_dir).absolute()),
    }
    checkpoint.write_text_atomic(sidecar, json.dumps(info, indent=2) + "\n")
    return path, sidecar


if __name__ == "__main__":  # ``python -m kdjax.weights``: the command lives in kdjax.cli.weights
    from kdjax.cli import weights as _command

    sys.exit(_command.main())
