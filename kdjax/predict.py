"""Classify images with a saved model directory, using exactly torchvision's evaluation transform
at the directory's input size. The command (``kdjax predict``, ``python -m kdjax.predict``) is
``kdjax.cli.predict``.
"""

from __future__ import annotations

import sys
from typing import Iterable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kdjax import checkpoint
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


if __name__ == "__main__":  # ``python -m kdjax.predict``: the command lives in kdjax.cli.predict
    from kdjax.cli import predict as _command

    sys.exit(_command.main())
