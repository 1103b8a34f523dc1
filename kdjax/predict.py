"""Classify images with a saved model directory.

    python -m kdjax.predict --checkpoint DIR IMAGE [IMAGE ...]

Prints one JSON object per image on stdout, ``{"path", "label", "probs": {class: p}}``, using
exactly torchvision's evaluation transform at the directory's input size. An image that cannot
be read is reported on stderr (one line) while the others are still classified; the exit code
is then 1. A bad model directory stops at once with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Iterable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kdjax import checkpoint, models
from kdjax.data.transforms import ImageReadError, eval_view, load_rgb, normalize

_BATCH = 16  # fixed batch shape: one compilation whatever the number of images


def _forward(model: nn.Module, variables: dict, images: jax.Array) -> jax.Array:
    return jax.nn.softmax(model.apply(variables, images, train=False), axis=-1)


def predict_arrays(
    model: nn.Module, variables: dict, views: np.ndarray, meta: checkpoint.ModelMeta
) -> np.ndarray:
    """Class probabilities ``[n, num_classes]`` for uint8 eval views ``[n, s, s, 3]``."""
    forward = jax.jit(_forward, static_argnums=0)
    out = []
    for start in range(0, len(views), _BATCH):
        chunk = normalize(views[start : start + _BATCH], meta.mean, meta.std)
        pad = _BATCH - len(chunk)
        batch = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)]) if pad else chunk
        out.append(np.asarray(forward(model, variables, jnp.asarray(batch)))[: len(chunk)])
    return np.concatenate(out) if out else np.zeros((0, meta.num_classes), np.float32)


def predict_files(directory, paths: Sequence[str]) -> Iterable[dict | ImageReadError]:
    """Yield a result dict per readable image, or the ``ImageReadError`` for an unreadable one,
    in the order of ``paths``."""
    model, variables, meta = checkpoint.load_model(directory)
    views, errors = {}, {}
    for i, path in enumerate(paths):
        try:
            views[i] = eval_view(load_rgb(path), meta.image_size, meta.resize_size, meta.interpolation)
        except ImageReadError as err:
            errors[i] = err
        except OSError as err:  # a missing file is an OSError before PIL sees it
            errors[i] = ImageReadError(f"{path}: {err.strerror or err}")
    order = sorted(views)
    probs = predict_arrays(model, variables, np.stack([views[i] for i in order]), meta) if order else []
    by_index = dict(zip(order, probs))
    for i, path in enumerate(paths):
        if i in errors:
            yield errors[i]
            continue
        p = by_index[i]
        yield {
            "path": str(path),
            "label": meta.class_names[int(np.argmax(p))],
            "probs": {name: float(v) for name, v in zip(meta.class_names, p)},
        }


def main(argv: Sequence[str] | None = None, prog: str = "python -m kdjax.predict") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a kdjax model directory")
    parser.add_argument("--arch", choices=sorted(models.ARCHS), help="fail unless the model is this arch")
    parser.add_argument("images", nargs="+", metavar="IMAGE")
    args = parser.parse_args(argv)
    name = "kdjax.predict" if prog == "python -m kdjax.predict" else prog
    try:
        if args.arch is not None:
            meta = checkpoint.read_meta(args.checkpoint)
            if meta.arch != args.arch:
                raise checkpoint.ModelDirError(
                    f"{args.checkpoint}: holds a {meta.arch}, but --arch {args.arch} was given"
                )
        failed = False
        for result in predict_files(args.checkpoint, args.images):
            if isinstance(result, ImageReadError):
                failed = True
                print(f"{name}: error: {result}", file=sys.stderr)
            else:
                print(json.dumps(result), flush=True)
    except checkpoint.ModelDirError as err:
        print(f"{name}: error: {err}", file=sys.stderr)
        return 2
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
