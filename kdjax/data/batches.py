"""The input pipeline: decoded splits held on the device, fixed-shape padded and masked batches.

``load_splits`` scans an ImageFolder tree (or downloads hymenoptera), opens its decode cache
(``kdjax.data.decode_cache``) and returns host arrays ready to be placed once on the device(s):

- splits named in ``augment_splits`` (default train) carry ``TrainArrays``: every cached image
  in the top-left corner of one zero-padded canvas ``[N, H, W, 3]`` uint8 with its true size;
- every split carries torchvision's evaluation views ``[N, s, s, 3]`` uint8 (``EvalArrays``).

Per epoch, ``epoch_order`` gives ``[num_batches, batch_size]`` dataset indices and a mask: the
last partial batch is padded, so shapes never change and every example counts exactly once.
``train_batch`` and ``eval_batch`` are pure and jit-able (also inside ``lax.scan``); the view of
an example depends only on (seed, epoch, example index), see ``kdjax.data.augment``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
from typing import Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from kdjax.data import augment, decode_cache, hymenoptera
from kdjax.data.folder import (
    DEFAULT_SPLITS,
    IMG_EXTENSIONS,
    DataError,
    ignored_notice,
    scan_image_folder,
)
from kdjax.sharding import (
    batch_sharding,
    check_batch_size,
    replicated,
    steps_batch_sharding,
)

log = logging.getLogger(__name__)


class TrainArrays(NamedTuple):
    """What the training augmentation reads, indexed by dataset position (a pytree)."""

    canvas: np.ndarray  # uint8 [N, H, W, 3]: cached image top-left, zeros elsewhere
    sizes: np.ndarray  # int32 [N, 2]: (h, w) of the cached image inside the canvas
    orig_sizes: np.ndarray  # int32 [N, 2]: (h, w) of the source file, where crops are drawn
    labels: np.ndarray  # int32 [N]


class EvalArrays(NamedTuple):
    images: np.ndarray  # uint8 [N, s, s, 3]: torchvision's Resize + CenterCrop
    labels: np.ndarray  # int32 [N]


class Batch(NamedTuple):
    images: jax.Array  # float32 [B, s, s, 3], normalised
    labels: jax.Array  # int32 [B]
    mask: jax.Array  # bool [B]: False on padding


@dataclasses.dataclass(frozen=True)
class Split:
    name: str
    filenames: tuple[str, ...]  # relative to the data folder, in torchvision's order
    eval: EvalArrays
    train: TrainArrays | None  # None unless the split was in ``augment_splits``

    @property
    def num_examples(self) -> int:
        return len(self.filenames)


@dataclasses.dataclass(frozen=True)
class Dataset:
    root: pathlib.Path
    class_names: tuple[str, ...]
    splits: Mapping[str, Split]
    cache_path: pathlib.Path
    decoded: bool  # True when this load decoded the images (the cache was cold)

    def __getitem__(self, split: str) -> Split:
        return self.splits[split]


def _canvas(images: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    sizes = np.array([im.shape[:2] for im in images], np.int32).reshape(-1, 2)
    height, width = sizes.max(axis=0)
    # Zero padding is enough: augment gives zero weight to every pixel outside the crop box.
    canvas = np.zeros((len(images), height, width, 3), np.uint8)
    for i, im in enumerate(images):
        canvas[i, : im.shape[0], : im.shape[1]] = im
    return canvas, sizes


def _read_split(name: str, source, train_view: bool) -> Split:
    examples = source.__getitems__(list(range(len(source))))
    examples.sort(key=lambda ex: int(ex["index"]))
    labels = np.array([ex["label"] for ex in examples], np.int32)
    train = None
    if train_view:
        canvas, sizes = _canvas([ex["image"] for ex in examples])
        orig = np.stack([ex["orig_size"] for ex in examples]).astype(np.int32)
        train = TrainArrays(canvas, sizes, orig, labels)
    return Split(
        name=name,
        filenames=tuple(ex["filename"].decode() for ex in examples),  # tfds Text reads as bytes
        eval=EvalArrays(np.stack([ex["eval_image"] for ex in examples]), labels),
        train=train,
    )


def load_splits(
    data_dir: os.PathLike | str | None,
    *,
    image_size: int = 224,
    cache_dir: os.PathLike | str | None = None,
    max_side: int = decode_cache.DEFAULT_MAX_SIDE,
    skip_bad_images: bool = False,
    splits: Sequence[str] = DEFAULT_SPLITS,
    augment_splits: Sequence[str] = ("train",),
    extensions: Sequence[str] = IMG_EXTENSIONS,
) -> Dataset:
    """Decoded ``splits`` of the ImageFolder tree ``data_dir`` (``None``: hymenoptera, fetched
    into ``cache_dir/downloads``); ``cache_dir`` defaults to ``$KDJAX_CACHE/datasets``.

    Raises ``DataError`` for a malformed tree or unreadable images (unless ``skip_bad_images``,
    which leaves them out and lists them in a warning), ``kdjax.fetch.DownloadError`` when the
    download is impossible.
    """
    cache_dir = decode_cache.default_cache_dir() if cache_dir is None else pathlib.Path(cache_dir)
    unknown = sorted(set(augment_splits) - set(splits))
    if unknown:
        raise ValueError(f"augment_splits {unknown} are not among the loaded splits {list(splits)}")
    root = hymenoptera.fetch_hymenoptera(cache_dir / "downloads") if data_dir is None else data_dir
    index = scan_image_folder(root, splits, extensions)
    notice = ignored_notice(index)
    if notice:
        log.warning(notice)
    spec = decode_cache.CacheSpec(
        image_size=image_size, max_side=max_side, augment_splits=tuple(augment_splits)
    )
    prepared = decode_cache.prepare(index, spec, cache_dir, extensions)

    bad = [entry for split in splits for entry in prepared.unreadable.get(split, ())]
    if bad and not skip_bad_images:
        raise DataError(
            f"{len(bad)} unreadable image file(s) under {index.root}:\n  " + "\n  ".join(bad)
            + "\nRepair or remove them, or pass --skip_bad_images to train without them."
        )
    if bad:
        log.warning(
            "--skip_bad_images: left out %d unreadable image file(s):\n  %s",
            len(bad),
            "\n  ".join(bad),
        )

    loaded = {
        s: _read_split(s, prepared.sources[s], s in augment_splits) for s in splits
    }
    for s, split in loaded.items():
        counts = np.bincount(split.eval.labels, minlength=len(index.class_names))
        empty = [index.class_names[c] for c in np.flatnonzero(counts == 0)]
        if empty:
            raise DataError(
                f"class folder(s) {', '.join(str(index.root / s / c) for c in empty)} have no "
                "readable image left after --skip_bad_images; add images or remove the class "
                "from every split."
            )
    return Dataset(index.root, index.class_names, loaded, prepared.path, prepared.decoded)


def epoch_order(
    num_examples: int, batch_size: int, seed: int, epoch: int, shuffle: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Dataset indices ``[num_batches, batch_size]`` int32 for one epoch, and their bool mask.

    Shuffled from ``(seed, epoch)`` (non-negative ints) alone, so any epoch can be produced
    without the previous ones (resume). The last batch is filled up with the first examples of
    the epoch's order, masked out: real images, so a forgotten mask does not feed garbage.
    """
    if num_examples <= 0 or batch_size <= 0:
        raise ValueError(
            f"need num_examples > 0 and batch_size > 0, got {num_examples} and {batch_size}"
        )
    # numpy's SeedSequence stream, independent of the JAX keys used for the views
    order = (
        np.random.default_rng((seed, epoch)).permutation(num_examples)
        if shuffle
        else np.arange(num_examples)
    )
    num_batches = -(-num_examples // batch_size)
    pad = num_batches * batch_size - num_examples
    indices = np.concatenate([order, np.resize(order, pad)]).astype(np.int32)
    mask = np.arange(num_batches * batch_size) < num_examples
    return indices.reshape(num_batches, batch_size), mask.reshape(num_batches, batch_size)


def train_batch(
    arrays: TrainArrays,
    indices: jax.Array,
    mask: jax.Array,
    seed,
    epoch,
    image_size: int,
    crop: augment.CropConfig = augment.CropConfig(),
) -> Batch:
    """Augmented, normalised views of the examples ``indices`` [B]. ``image_size`` and ``crop``
    are static under ``jit``; ``seed`` and ``epoch`` may be traced."""
    indices = jnp.asarray(indices)
    images = augment.train_views(
        seed,
        epoch,
        indices,
        jnp.take(arrays.canvas, indices, axis=0),
        jnp.take(arrays.sizes, indices, axis=0),
        jnp.take(arrays.orig_sizes, indices, axis=0),
        image_size,
        crop,
    )
    return Batch(images, jnp.take(arrays.labels, indices, axis=0), jnp.asarray(mask))


def eval_batch(arrays: EvalArrays, indices: jax.Array, mask: jax.Array) -> Batch:
    """Normalised evaluation views of the examples ``indices`` [B]."""
    indices = jnp.asarray(indices)
    images = augment.normalize(jnp.take(arrays.images, indices, axis=0))
    return Batch(images, jnp.take(arrays.labels, indices, axis=0), jnp.asarray(mask))


def put_replicated(tree, mesh: Mesh):
    """Place a split's arrays (or any pytree) whole on every device of ``mesh``."""
    return jax.device_put(tree, replicated(mesh))


def put_batch(tree, mesh: Mesh):
    """Place a global batch (leading axis = batch) split over the ``'data'`` axis."""
    for leaf in jax.tree.leaves(tree):
        check_batch_size(np.shape(leaf)[0], mesh)
    return jax.device_put(tree, batch_sharding(mesh))


def put_epoch_order(indices: np.ndarray, mask: np.ndarray, mesh: Mesh):
    """Place ``epoch_order``'s ``[num_batches, batch_size]`` arrays with each batch split over
    the ``'data'`` axis, ready to be scanned over batches."""
    check_batch_size(indices.shape[1], mesh)
    return jax.device_put((indices, mask), steps_batch_sharding(mesh))
