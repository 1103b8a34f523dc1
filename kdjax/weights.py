"""Where a run's weights come from (ImageNet, scratch, a file), conversion and export.

The commands over these (``kdjax convert | export | fetch``, also ``python -m kdjax.weights
convert|fetch|list|export``) are ``kdjax.cli.weights``.

``FILE`` is read by :mod:`kdjax.models.torchfile` (no torch, no pickled code run) and may hold a
state_dict or a whole pickled module; :mod:`kdjax.models.torchvision` maps it, strictly, or
:mod:`kdjax.models.timm` for timm's names (``convert_timm``, ``--init timm:NAME``).
"""

from __future__ import annotations

import os
import pathlib
import sys
from typing import Sequence

import jax

from kdjax import checkpoint, console, distributed, models
from kdjax.fetch import sha256_file
from kdjax.models import timm
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
    "initial_variables", "convert", "convert_timm", "export",
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
    - ``timm:NAME`` (``timm:resnet50.a1_in1k``; a bare model name is timm's default tag): timm's
      weights for the ``arch`` that computes that model, with a fresh head unless the tag has
      ``num_classes``; the file is looked for under ``third_party_weights/timm/`` and in the
      Hugging Face hub cache, else downloaded from the hub (timm publishes no checksum; loading
      checks every tensor). Offline, it stops with one line naming the URL and where to put the
      file (``kdjax.models.timm.fetch``);
    - a model directory or PyTorch file of ``arch``; its head must have ``num_classes`` outputs.

    Returns ``(variables, provenance)``.
    """
    if init == "imagenet":
        if arch not in IMAGENET_WEIGHTS:
            raise ValueError(f"--init imagenet: torchvision has no ImageNet weights for {arch}; use --init scratch, "
                             "or a model directory or checkpoint file of its weights")
        # a missing file is downloaded (checksummed, with a progress bar) by process 0 first, the
        # others then find it; offline, fetch stops with the URL and where to put the file
        with distributed.primary_first("kdjax.weights.initial_variables"):
            if not (DEFAULT_DIR / IMAGENET_WEIGHTS[arch].filename).is_file():
                fetch(arch)
        variables = imagenet_variables(arch, num_classes, key)
        return variables, {"init": "imagenet", "url": IMAGENET_WEIGHTS[arch].url}
    if init.startswith("timm:"):
        # as for imagenet: process 0 downloads a missing file first, the others then find it
        with distributed.primary_first("kdjax.weights.initial_variables"):
            variables, provenance = timm.timm_variables(init[len("timm:"):], arch, num_classes, key)
        kept_head = num_classes == timm.get(provenance["timm_tag"]).num_classes
        for kind, note in timm.notes(timm.get(provenance["timm_tag"])).items():
            if kind != "bce" or kept_head:  # a fresh head has no calibration to mind
                console.line(f"kdjax: warning: {note}")
        return variables, provenance
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
    class_names = _class_names(class_names, models.num_outputs(arch, variables), src, "fc.weight")
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


def _class_names(class_names: Sequence[str] | None, num_classes: int, src: pathlib.Path, head: str) -> list[str]:
    """``class_names``, or ``class_0 .. class_{n-1}``; a ClassNamesError unless one per output."""
    if class_names is None:
        return [f"class_{i}" for i in range(num_classes)]
    if len(class_names) != num_classes:
        raise ClassNamesError(
            f"{len(class_names)} class names ({_listing(list(class_names), 4)}) but {src} has "
            f"{num_classes} outputs ({head}); give exactly {num_classes} comma-separated names")
    return list(class_names)


def convert_timm(src: os.PathLike, out: os.PathLike, name: str,
                 class_names: Sequence[str] | None = None) -> checkpoint.ModelMeta:
    """Convert timm's ``.safetensors``/``.pth`` of the timm ``name`` (``resnet50.a1_in1k``; a bare
    model name is timm's default tag) to a model directory of the kdjax architecture that
    computes it (``kdjax.models.timm``).

    meta.json records the tag's eval transform from its ``pretrained_cfg``: ``image_size`` its
    input size, ``resize_size`` ``floor(input_size / crop_pct)``, its interpolation, mean and
    std; provenance records the tag, hub repository, licence, crop_pct, timm's test size, whether
    the head was trained with binary cross-entropy (``bce_head``) and ``notes`` (what
    ``kdjax.models.timm.notes`` says a user must know). ``class_names`` as in ``convert``.
    """
    w = timm.get(name)
    src = pathlib.Path(src)
    variables = timm.to_flax(load_state_dict(src), w.model, source=str(src))
    class_names = _class_names(class_names, models.num_outputs(w.arch, variables), src, timm.head_key(w.model))
    provenance = {
        "source_file": src.name,
        "source_sha256": sha256_file(src),
        "converted_by": "kdjax.weights",
        "timm_tag": w.tag, "hf_hub_id": w.hf_hub_id, "source_url": timm.hub_url(w),
        "source_license": w.license, "timm_num_classes": w.num_classes, "crop_pct": w.crop_pct,
        "test_input_size": w.test[0] if w.test else None, "test_crop_pct": w.test[1] if w.test else None,
        "bce_head": w.bce, "notes": list(timm.notes(w).values()),
    }
    inputs = models.InputSpec(crop_size=w.input_size, resize_size=w.resize_size, interpolation=w.interpolation,
                              mean=tuple(w.mean), std=tuple(w.std))
    return checkpoint.save_model(out, variables, arch=w.arch, class_names=class_names, provenance=provenance,
                                 image_size=w.input_size, inputs=inputs)


def export(checkpoint_dir: os.PathLike, out: os.PathLike) -> tuple[pathlib.Path, pathlib.Path]:
    """A kdjax model directory as a torchvision state_dict file ``out`` (what
    ``torchvision.models.<arch>(num_classes=n).load_state_dict(torch.load(out), strict=True)``
    accepts; written without torch) and a JSON sidecar ``out`` with suffix ``.json``: the
    architecture, class names, eval transform (resize, crop, interpolation, mean, std), the
    weights' fingerprint and provenance. Returns both paths."""
    import json

    _, variables, meta = checkpoint.load_model(checkpoint_dir)
    if meta.arch not in models.BUILTIN:
        raise ValueError(f"{checkpoint_dir}: {meta.arch!r} is a network of your own, and export writes the PyTorch "
                         "state_dicts of kdjax's architectures only; use the model directory itself "
                         "(kdjax.checkpoint.load_model) or its variables")
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
