"""The input pipeline: decoded splits, held on the device or read on demand, and fixed-shape
padded and masked batches.

``load_splits`` opens a data source (``kdjax.data.sources``: an ImageFolder tree, hymenoptera
downloaded, a tfds or Hugging Face dataset, arrays), its decode cache
(``kdjax.data.decode_cache``) and returns a ``Dataset`` of ``Split``s. Every split knows its
records (``SplitRecords``: names, labels, sizes) and reads any of them on demand (``Split.
train_rows``, ``Split.eval_images``: what ``kdjax.data.stream`` feeds). Held in memory
(``--data_in_memory``, ``decide_in_memory``), a split also carries host arrays ready to be
placed once on the device(s):

- splits named in ``augment_splits`` (default train) carry ``TrainArrays``: every cached image
  in the top-left corner of one zero-padded canvas ``[N, H, W, 3]`` uint8 with its true size;
- every split carries torchvision's evaluation views ``[N, s, s, 3]`` uint8 (``EvalArrays``).

Per epoch, ``epoch_order`` gives ``[num_batches, batch_size]`` dataset indices and a mask: the
last partial batch is padded, so shapes never change and every example counts exactly once.
``train_views`` (of rows gathered on the device by ``take_rows``, or read by a stream) and
``eval_batch`` are pure and jit-able (also inside ``lax.scan``); the view of
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

from kdjax.data import augment, decode_cache, sources
from kdjax.data.folder import DEFAULT_SPLITS, IMG_EXTENSIONS, DataError, FolderSource
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
    # mixup/cutmix's soft targets float32 [B, C] (kdjax.data.views), None without mixing
    targets: jax.Array | None = None


# --data_in_memory auto: the device-resident path when the arrays take at most this share of one
# device's memory (on CPU, of the host's RAM, which every simulated device's copy shares)
DEVICE_MEMORY_SHARE = 0.25
IN_MEMORY_CHOICES = ("auto", "on", "off")


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
    """One split of a prepared cache: its records' index, random access to the records, and,
    when the dataset is held in memory, its arrays (``eval``; ``train`` where augmented)."""

    name: str
    records: decode_cache.SplitRecords
    source: object  # tfds ArrayRecordDataSource: record i is example i
    augmented: bool  # the records store training images (``augment_splits``)
    eval: EvalArrays | None  # None when streamed
    train: TrainArrays | None  # None when streamed or not augmented

    @property
    def num_examples(self) -> int:
        return len(self.records.filenames)

    @property
    def filenames(self) -> tuple[str, ...]:
        """Relative to the data folder, in torchvision's order."""
        return self.records.filenames

    @property
    def labels(self) -> np.ndarray:
        return self.records.labels

    @property
    def canvas_shape(self) -> tuple[int, int]:
        """(H, W) of the zero-padded canvas every training image is placed in: the split's largest."""
        h, w = self.records.sizes.max(axis=0)
        return int(h), int(w)

    def in_memory_bytes(self, image_size: int) -> int:
        """What the device-resident path places of this split on each device."""
        n = self.num_examples
        canvas = n * int(np.prod(self.canvas_shape)) * 3 if self.augmented else 0
        return canvas + n * image_size * image_size * 3

    def read(self, positions: Sequence[int]) -> list[dict]:
        """The stored examples at ``positions`` (dataset indices), in that order."""
        examples = self.source.__getitems__([int(i) for i in positions])
        for i, ex in zip(positions, examples):
            if ex["filename"].decode() != self.records.filenames[i]:  # tfds Text reads as bytes
                raise DataError(f"decode cache {self.name} record {i} holds {ex['filename'].decode()}, its index "
                                f"says {self.records.filenames[i]}: the cache is damaged; delete it and run again")
        return examples

    def train_rows(self, positions: np.ndarray) -> TrainArrays:
        """The training images of ``positions`` (any shape of dataset indices), each on the split's
        canvas: what ``take(self.train, positions)`` gives, read from the records."""
        if not self.augmented:
            raise ValueError(f"split {self.name!r} was loaded without training views")
        flat = np.asarray(positions).reshape(-1)
        canvas = np.zeros((flat.size, *self.canvas_shape, 3), np.uint8)
        for k, ex in enumerate(self.read(flat)):
            im = ex["image"]
            canvas[k, : im.shape[0], : im.shape[1]] = im
        shape = np.shape(positions)
        return TrainArrays(canvas.reshape(*shape, *canvas.shape[1:]), self.records.sizes[flat].reshape(*shape, 2),
                           self.records.orig_sizes[flat].reshape(*shape, 2), self.records.labels[flat].reshape(shape))

    def eval_images(self, positions: np.ndarray) -> np.ndarray:
        """torchvision's evaluation views of ``positions`` (dataset indices) ``[n, s, s, 3]`` uint8."""
        return np.stack([ex["eval_image"] for ex in self.read(positions)])


@dataclasses.dataclass(frozen=True)
class Dataset:
    root: pathlib.Path
    class_names: tuple[str, ...]
    splits: Mapping[str, Split]
    cache_path: pathlib.Path
    decoded: bool  # True when this load decoded the images (the cache was cold)
    in_memory: bool = True  # the splits' arrays are loaded (else they are streamed)
    digested: bool = False  # True when this load read every file's bytes to identify the tree
    # the data's identity (content, sizes, cache settings), what runs and teacher caches record
    fingerprint: str = ""

    def __getitem__(self, split: str) -> Split:
        return self.splits[split]

    @property
    def test(self) -> Split | None:
        """The held-out ``test/`` split when the tree has one."""
        return self.splits.get("test")


def _canvas(images: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    sizes = np.array([im.shape[:2] for im in images], np.int32).reshape(-1, 2)
    height, width = sizes.max(axis=0)
    # Zero padding is enough: augment gives zero weight to every pixel outside the crop box.
    canvas = np.zeros((len(images), height, width, 3), np.uint8)
    for i, im in enumerate(images):
        canvas[i, : im.shape[0], : im.shape[1]] = im
    return canvas, sizes


def _loaded(split: Split) -> Split:
    """``split`` with its arrays read into host memory."""
    examples = split.read(range(split.num_examples))
    labels = split.labels
    train = None
    if split.augmented:
        canvas, sizes = _canvas([ex["image"] for ex in examples])
        train = TrainArrays(canvas, sizes, split.records.orig_sizes, labels)
    images = np.stack([ex["eval_image"] for ex in examples])
    return dataclasses.replace(split, eval=EvalArrays(images, labels), train=train)


def memory_capacity() -> tuple[int, str]:
    """Bytes of one local device's memory, and what they are (the host's RAM on CPU, where the
    simulated devices share it: divided among them)."""
    device = jax.local_devices()[0]
    stats = device.memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"]), f"{device.platform} device memory"
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return ram // jax.local_device_count(), f"host RAM / {jax.local_device_count()} local devices"


def decide_in_memory(choice: str | bool, needed: int, share: float = DEVICE_MEMORY_SHARE) -> bool:
    """``--data_in_memory``: ``on``/``off`` as said; ``auto`` holds the arrays on the devices when
    ``needed`` bytes are at most ``share`` of ``memory_capacity()``, and streams otherwise."""
    if isinstance(choice, bool):
        return choice
    if choice not in IN_MEMORY_CHOICES:
        raise ValueError(f"--data_in_memory {choice!r}: choose one of {', '.join(IN_MEMORY_CHOICES)}")
    if choice != "auto":
        return choice == "on"
    capacity, what = memory_capacity()
    fits = needed <= share * capacity
    log.debug("--data_in_memory auto: the splits take %.2f GB per device, %s is %.2f GB: %s", needed / 1e9, what,
             capacity / 1e9, "held in memory" if fits else f"streamed (more than {share:.0%})")
    return fits


def _unreadable_list(bad: Sequence[str]) -> str:
    named = "\n  ".join(bad[: decode_cache.NAMED_UNREADABLE])
    more = len(bad) - decode_cache.NAMED_UNREADABLE
    return "\n  " + named + (f"\n  ... and {more} more" if more > 0 else "")


@dataclasses.dataclass(frozen=True)
class LoadOptions:
    """How ``load_splits`` reads a dataset (its keywords, one per field).

    ``splits`` and ``extensions`` choose what is read of a ``--data_dir`` (a source already holds
    its own); ``cache_dir`` defaults to ``$KDJAX_CACHE/datasets``; ``in_memory``
    (``--data_in_memory``): ``auto``/``on``/``off`` (``decide_in_memory``); ``verify_data``
    digests every file's bytes even when the source's fingerprint is known. The sequences are
    kept as tuples.
    """

    image_size: int = 224
    cache_dir: os.PathLike | str | None = None
    max_side: int = decode_cache.DEFAULT_MAX_SIDE
    skip_bad_images: bool = False
    splits: tuple[str, ...] = DEFAULT_SPLITS
    augment_splits: tuple[str, ...] = ("train",)
    extensions: tuple[str, ...] = IMG_EXTENSIONS
    in_memory: str | bool = "auto"
    verify_data: bool = False
    # the evaluation views' Resize() side (None: torchvision's 256/224 proportion of image_size;
    # image_size itself: the image as it is, for ``--crop pad``)
    resize_size: int | None = None

    def __post_init__(self):
        for name in ("splits", "augment_splits", "extensions"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if not isinstance(self.in_memory, bool) and self.in_memory not in IN_MEMORY_CHOICES:
            raise ValueError(f"--data_in_memory {self.in_memory!r}: choose one of {', '.join(IN_MEMORY_CHOICES)}")


def _source(data: sources.DataSource | os.PathLike | str | None, options: LoadOptions,
            cache_dir: pathlib.Path) -> sources.DataSource:
    """``data`` as a source, after checking ``options`` against it (before any download or scan)."""
    is_location = data is None or isinstance(data, (str, os.PathLike))
    defaults = LoadOptions()
    if not is_location and (options.splits, options.extensions) != (defaults.splits, defaults.extensions):
        raise ValueError(f"load_splits: the source {data.root} holds its splits {list(data.split_names)} and "
                         "reading rules; choose splits and extensions where it is opened (sources.source_for)")
    splits = options.splits if is_location else data.split_names
    unknown = sorted(set(options.augment_splits) - set(splits))
    if unknown:
        raise ValueError(f"augment_splits {unknown} are not among the loaded splits {list(splits)}")
    return sources.source_for(data, cache_dir, options.splits, options.extensions) if is_location else data


def load_splits(data: sources.DataSource | os.PathLike | str | None, options: LoadOptions | None = None,
                **keywords) -> Dataset:
    """Decoded splits of ``data``: a ``sources.DataSource``, or a ``--data_dir`` (``None``:
    hymenoptera, fetched into ``<cache_dir>/downloads``; a folder: the ImageFolder tree's
    ``splits``, plus its ``test/`` split where there is one). ``options`` and ``keywords`` (the
    fields of ``LoadOptions``, which override ``options``) say how.

    A streamed dataset (``in_memory``) holds only its records' index on the host and reads
    examples on demand. Raises ``DataError`` for a malformed tree or unreadable images (unless
    ``skip_bad_images``, which leaves them out and lists them in a warning),
    ``kdjax.fetch.DownloadError`` when the download is impossible.
    """
    options = dataclasses.replace(options or LoadOptions(), **keywords)
    cache_dir = decode_cache.default_cache_dir() if options.cache_dir is None else pathlib.Path(options.cache_dir)
    source = _source(data, options, cache_dir)
    notice = source.notice()
    if notice:
        log.warning(notice)
    spec = decode_cache.CacheSpec(
        image_size=options.image_size, resize_size=options.resize_size, max_side=options.max_side,
        augment_splits=options.augment_splits,
    )
    prepared = decode_cache.prepare(source, spec, cache_dir, skip_bad_images=options.skip_bad_images,
                                    verify=options.verify_data)

    bad = [entry for split in source.examples for entry in prepared.unreadable.get(split, ())]
    if bad and not options.skip_bad_images:
        raise DataError(
            f"{len(bad)} unreadable image file(s) under {source.root}:" + _unreadable_list(bad)
            + "\nRepair or remove them, or pass --skip_bad_images to train without them."
        )
    if bad:
        log.warning("--skip_bad_images: left out %d unreadable image file(s):%s", len(bad), _unreadable_list(bad))

    loaded = {
        s: Split(s, prepared.records[s], prepared.sources[s], s in options.augment_splits, None, None)
        for s in source.examples
    }
    for s, split in loaded.items() if bad else ():  # only skipping can empty a class the source fills
        counts = np.bincount(split.labels, minlength=len(source.class_names))
        had = np.bincount([label for _, label in source.examples[s]], minlength=len(source.class_names))
        empty = [source.class_names[c] for c in np.flatnonzero((counts == 0) & (had > 0))]
        if empty and isinstance(source, FolderSource):
            raise DataError(
                f"class folder(s) {', '.join(str(source.root / s / c) for c in empty)} have no "
                "readable image left after --skip_bad_images; add images or remove the class "
                "from every split."
            )
        if empty:
            raise DataError(f"class(es) {', '.join(empty)} of split {s} of {source.root} have no readable image left "
                            "after --skip_bad_images; repair their images")
    held = decide_in_memory(options.in_memory,
                            sum(split.in_memory_bytes(options.image_size) for split in loaded.values()))
    if held:
        loaded = {s: _loaded(split) for s, split in loaded.items()}
    return Dataset(source.root, source.class_names, loaded, prepared.path, prepared.decoded, held,
                   prepared.digested, prepared.identity)


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


def take_rows(arrays: TrainArrays, indices: jax.Array) -> TrainArrays:
    """The rows ``indices`` [B] of a device-resident split (what a stream reads on the host)."""
    indices = jnp.asarray(indices)
    return TrainArrays(*(jnp.take(a, indices, axis=0) for a in arrays))


def train_views(
    rows: TrainArrays,
    indices: jax.Array,
    mask: jax.Array,
    seed,
    epoch,
    image_size: int,
    crop: augment.CropConfig = augment.CropConfig(),
) -> Batch:
    """Augmented, normalised views of the examples ``indices`` [B] (dataset positions: they key
    the views) whose images are ``rows`` [B]. ``image_size`` and ``crop`` are static under
    ``jit``; ``seed`` and ``epoch`` may be traced."""
    images = augment.train_views(
        seed, epoch, jnp.asarray(indices), rows.canvas, rows.sizes, rows.orig_sizes, image_size, crop)
    return Batch(images, jnp.asarray(rows.labels), jnp.asarray(mask))


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
