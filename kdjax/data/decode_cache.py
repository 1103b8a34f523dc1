"""Decode a data source (``kdjax.data.sources``: an ImageFolder tree, a tfds or Hugging Face dataset, arrays)
once into a tensorflow-datasets (array_record) cache.

``prepare`` writes one array_record file per split, example by example, with tfds' feature
serialisation and its ``dataset_info.json`` (``tfds.folder_dataset.write_metadata``), and reads
it back with tfds' data-source API, which needs neither TensorFlow nor ``tf.data`` (tfds' own
``ImageFolder`` builder does). tfds' ``GeneratorBasedBuilder`` is not used to write: its writer
holds up to 1 GB of a split in memory (``tfds.core.shuffle.MAX_MEM_BUFFER_SIZE``) and spills the
rest through ``tf.io.gfile``, i.e. it needs TensorFlow for any split bigger than that (what real
trees weigh: benchmarks/README.md "Streaming input"). Each example stores:

- ``image``: the full decode (``DataSource.read``: a file's ``transforms.load_rgb``), shrunk
  with PIL bilinear (antialiased) so that its longer side is at most ``max_side``; the training
  crops are cut from it on the device, in the coordinates of the original image
  (``kdjax.data.augment``); splits that are not augmented (``CacheSpec.augment_splits``, default
  all but train) store a 1x1 placeholder;
- ``eval_image``: torchvision's exact evaluation view (Resize + CenterCrop) at ``image_size``,
  computed from the ORIGINAL full-resolution decode;
- ``label``, ``filename`` (the example's name: a tree's path relative to its folder),
  ``orig_size`` (h, w) and ``index`` (the position in torchvision's file order).

Fidelity of the capped image: a RandomResizedCrop crop is cut from ``image``, so a crop that
covers few source pixels is limited by the cache's resolution rather than the source's. With
``max_side=512`` a crop covering 8% of a 2592x1984 photo is about 640 px wide in the source but
about 127 px in the cache, and is then upsampled to 224 (blurrier than torchvision's view, which
downsamples the 640 px). Crops are only affected where the source is larger than the cap (9 of
hymenoptera's 398 files; 4 training images) and the crop holds fewer than ``image_size`` cached
pixels; every image no larger than the cap is stored losslessly at full resolution.

The cache lives in ``<cache_dir>/<key>/`` where the key digests the source's content
(``DataSource.digest``, a tree's ``tree_digest``: relative paths and file bytes), its
``key_fields`` (a tree's split and extension lists), the sizes and ``FORMAT_VERSION``: any change
to a file prepares a new cache. Reading every byte at every launch would cost minutes on a big
tree, so ``<cache_dir>/fingerprints/`` maps the source's ``fingerprint`` (a tree's
``tree_fingerprint``: names, sizes, mtimes, one ``stat`` per file) to the content key: a warm
start reads no file, a new fingerprint (a changed, copied or moved tree) digests the content
once, and ``--verify_data`` digests it at every start (an edit that kept size and mtime). The
key is the content, not the place, so a copied or moved tree reuses the cache of the original.
Unreadable images stop a cold prepare at the first one (a ``DataError`` naming it), or, with
``skip_bad_images``, are recorded in the cache's metadata by their path relative to the tree,
so the warning (or a later error) is the same on a warm run as on a cold one and names the
files under the folder being loaded now. The metadata also holds each split's records index
(``SplitRecords``: names, labels, stored and original sizes), what streaming needs without
reading the records.

Preparing a cold cache announces itself with one ``kdjax: decoding ...`` line and one progress
bar over the images, both on stderr; tfds' own output (its "Downloading and preparing" banner,
its nested progress bars, its absl log records) is silenced while the cache is opened, see
``quiet_tfds``.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import itertools
import json
import logging
import os
import pathlib
import shutil
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image
from tensorflow_datasets.core.utils import tqdm_utils

from kdjax import console
from kdjax.data import transforms
from kdjax.data.folder import DataError
from kdjax.data.sources import DataSource

# Bump when what is stored, or how it is computed, changes: it is part of every cache key.
FORMAT_VERSION = "1.2.0"  # 1.1.0: unreadable files recorded by relative path; 1.2.0: records index
# What each stored example holds and how it is computed; FORMAT_VERSION also covers the files'
# layout. A run records the data by a key of this version (``PreparedCache.identity``), so runs
# and teacher caches of a layout change (1.1.0 -> 1.2.0) keep resuming.
CONTENT_VERSION = "1.1.0"
DEFAULT_MAX_SIDE = 512


@dataclasses.dataclass(frozen=True)
class CacheSpec:
    """What the cache stores besides the source: the eval view's size and the train image cap."""

    image_size: int = 224
    resize_size: int | None = None  # None: transforms.resize_size_for(image_size), 256 for 224
    max_side: int = DEFAULT_MAX_SIDE
    # splits whose training view is needed; the others store a 1x1 placeholder ``image``,
    # which keeps hymenoptera's val split at a third of the bytes
    augment_splits: tuple[str, ...] = ("train",)

    @property
    def eval_resize(self) -> int:
        if self.resize_size is None:
            return transforms.resize_size_for(self.image_size)
        return self.resize_size


def default_cache_dir() -> pathlib.Path:
    """``$KDJAX_CACHE/datasets``, by default ``~/.cache/kdjax/datasets``."""
    root = os.environ.get("KDJAX_CACHE") or os.path.join("~", ".cache", "kdjax")
    return pathlib.Path(root).expanduser() / "datasets"


def cache_key(source: DataSource, spec: CacheSpec, tree: str, version: str = FORMAT_VERSION) -> str:
    """The cache's name: ``tree`` (the source's ``digest``, or its ``fingerprint`` for the record
    that maps fingerprints to caches) with everything that changes what is stored. For a tree the
    payload is format, tree, splits, extensions (sorted, lower case), the sizes and the augmented
    splits; runs record a key of it (``PreparedCache.identity``), so it must stay as it is for the
    same tree (tests/test_data_sources.py re-derives it)."""
    payload = {
        **source.key_fields(),
        "format": version,
        "tree": tree,
        "image_size": spec.image_size,
        "resize_size": spec.eval_resize,
        "max_side": spec.max_side,
        "augment_splits": sorted(spec.augment_splits),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def shrink_to(img: Image.Image, max_side: int) -> Image.Image:
    """``img`` with its longer side at most ``max_side`` (PIL bilinear, antialiased)."""
    w, h = img.size
    if max(w, h) <= max_side:
        return img
    k = max_side / max(w, h)
    return img.resize((max(1, round(w * k)), max(1, round(h * k))), Image.BILINEAR)


def decode_example(source: DataSource, name: str, spec: CacheSpec, train_view: bool) -> dict:
    """The stored arrays of the example ``name`` of ``source``; raises
    ``transforms.ImageReadError`` naming it."""
    img = source.read(name)
    w, h = img.size
    stored = shrink_to(img, spec.max_side) if train_view else None
    return {
        # 1x1 placeholder where no training view is needed (tfds cannot read back a 0x0 one)
        "image": np.zeros((1, 1, 3), np.uint8) if stored is None else np.asarray(stored, np.uint8),
        "eval_image": transforms.eval_view(img, spec.image_size, spec.eval_resize),
        "orig_size": np.array([h, w], np.int32),
    }


UNREADABLE_HINT = "Repair or remove it, or pass --skip_bad_images to leave unreadable files out (and list them)."
# How many unreadable files a message names; the rest are counted.
NAMED_UNREADABLE = 20


def ordered_map(fn: Callable, items: Sequence, workers: int | None = None, ahead: int = 4) -> Iterator:
    """``map(fn, items)`` on a thread pool, in order, with at most ``ahead`` x ``workers`` results
    pending (``Executor.map`` submits everything at once, so a slow consumer holds every result).
    PIL releases the GIL while decoding and resizing, so threads use every core."""
    workers = workers or min(8, os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        pending: collections.deque = collections.deque()
        it = iter(items)
        for item in itertools.islice(it, ahead * workers):
            pending.append(pool.submit(fn, item))
        while pending:
            result = pending.popleft().result()
            for item in itertools.islice(it, 1):
                pending.append(pool.submit(fn, item))
            yield result


# Stands for the image's path in a recorded read error: the message is stored without the
# absolute path the cache was built from, and gets the path under the current tree on reading.
_FILE = "<file>"


NAME = "decoded_image_folder"
INDEX_FILE = "kdjax_index.json"  # records index, unreadable files and the source, per cache


def features_for(spec: CacheSpec, class_names: Sequence[str]) -> tfds.features.FeaturesDict:
    """What each stored example holds (see the module docstring)."""
    s = spec.image_size
    return tfds.features.FeaturesDict(
        {
            # raw bytes (not PNG, not tfds' default int64 list): a warm load decodes nothing
            "image": tfds.features.Tensor(shape=(None, None, 3), dtype=np.uint8, encoding="bytes"),
            "eval_image": tfds.features.Tensor(shape=(s, s, 3), dtype=np.uint8, encoding="bytes"),
            "orig_size": tfds.features.Tensor(shape=(2,), dtype=np.int32),
            "label": tfds.features.ClassLabel(names=list(class_names)),
            "filename": tfds.features.Text(),
            "index": tfds.features.Scalar(dtype=np.int64),
        }
    )


def _data_dir(path: pathlib.Path) -> pathlib.Path:
    return path / NAME / FORMAT_VERSION


def is_prepared(path: pathlib.Path) -> bool:
    return (path / INDEX_FILE).is_file() and (_data_dir(path) / "dataset_info.json").is_file()


def _write_split(writer_path: pathlib.Path, split: str, entries, source: DataSource, spec: CacheSpec, features,
                 stop_on_unreadable: bool, progress: Callable[[int], object]) -> tuple[dict, list, int, int]:
    """Decode ``entries`` into one array_record file, example by example (bounded memory: tfds'
    own writer buffers a split in memory, and past 1 GB spills it through TensorFlow)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    train_view = split in spec.augment_splits

    def decode(entry):
        name = entry[0]
        try:
            return decode_example(source, name, spec, train_view)
        except transforms.ImageReadError as err:
            if stop_on_unreadable:
                raise DataError(f"{err}\n{UNREADABLE_HINT}") from err
            # "<path>: cannot read image (<reason>)", where PIL's reason may name the path too
            return transforms.ImageReadError(str(err).replace(source.location(name), _FILE))

    records = {"filename": [], "label": [], "size": [], "orig_size": []}
    unreadable: list[dict] = []
    written = num_bytes = 0
    writer = ArrayRecordWriter(os.fspath(writer_path), "group_size:1")
    try:
        for i, ((rel, label), arrays) in enumerate(zip(entries, ordered_map(decode, entries))):
            progress(1)
            if isinstance(arrays, Exception):
                unreadable.append({"file": rel, "message": str(arrays)})
                continue
            record = features.serialize_example({**arrays, "label": label, "filename": rel, "index": i})
            writer.write(record)
            written += 1
            num_bytes += len(record)
            records["filename"].append(rel)
            records["label"].append(label)
            records["size"].append(list(arrays["image"].shape[:2]))
            records["orig_size"].append(arrays["orig_size"].tolist())
    finally:
        writer.close()
    return records, unreadable, written, num_bytes


def write_cache(path: pathlib.Path, source: DataSource, spec: CacheSpec, *, identity: str,
                stop_on_unreadable: bool, progress: Callable[[int], object]) -> None:
    """Decode every split of ``source`` into the cache ``path``: array_record files that tfds'
    data-source API reads (its ``dataset_info.json`` beside them) and ``INDEX_FILE``. Written in
    a temporary folder renamed into place when complete, so an interrupted or failed prepare
    leaves nothing that looks prepared."""
    features = features_for(spec, source.class_names)
    tmp = path.parent / f".{path.name}.incomplete-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    data_dir = _data_dir(tmp)
    data_dir.mkdir(parents=True)
    try:
        split_infos, all_records, all_unreadable = [], {}, {}
        for split, entries in source.examples.items():
            shard = data_dir / f"{NAME}-{split}.array_record-00000-of-00001"
            records, unreadable, n, num_bytes = _write_split(shard, split, entries, source, spec, features,
                                                             stop_on_unreadable, progress)
            split_infos.append(tfds.core.SplitInfo(name=split, shard_lengths=[n], num_bytes=num_bytes))
            all_records[split], all_unreadable[split] = records, unreadable
        tfds.folder_dataset.write_metadata(
            data_dir=data_dir, features=features, split_infos=split_infos, check_data=False,
            filename_template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}", disable_shuffling=True)
        index_json = {"source": str(source.root), "identity": identity, "records": all_records,
                      "unreadable": all_unreadable}
        (tmp / INDEX_FILE).write_text(json.dumps(index_json))
        if path.exists() and not is_prepared(path):
            shutil.rmtree(path)  # what an older kdjax or a failed copy left under this key
        try:
            os.rename(tmp, path)
        except OSError:
            if not is_prepared(path):  # another process prepared the same cache meanwhile: keep that
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@dataclasses.dataclass(frozen=True)
class SplitRecords:
    """What the cache recorded of a split's stored examples, in record order (torchvision's file
    order, unreadable files left out): enough to stream it without reading the records first."""

    filenames: tuple[str, ...]
    labels: np.ndarray  # int32 [N]
    sizes: np.ndarray  # int32 [N, 2]: (h, w) of the stored training image (1x1 where not stored)
    orig_sizes: np.ndarray  # int32 [N, 2]: (h, w) of the source file

    @classmethod
    def from_metadata(cls, m: Mapping) -> "SplitRecords":
        return cls(tuple(m["filename"]), np.asarray(m["label"], np.int32).reshape(-1),
                   np.asarray(m["size"], np.int32).reshape(-1, 2), np.asarray(m["orig_size"], np.int32).reshape(-1, 2))


@dataclasses.dataclass(frozen=True)
class PreparedCache:
    """A prepared cache: per-split tfds data sources and what the generator recorded."""

    path: pathlib.Path
    sources: Mapping[str, object]  # split -> tfds ArrayRecordDataSource (random access)
    records: Mapping[str, SplitRecords]
    # split -> "<path>: <reason>" per skipped file, <path> under the source passed to ``prepare``
    unreadable: Mapping[str, tuple[str, ...]]
    decoded: bool  # True when this call decoded the images (a cold cache)
    digested: bool  # True when this call read every file's bytes (a new or verified tree)
    identity: str  # the data's key at CONTENT_VERSION: what runs record (``run_meta_for``)


def _not_tfds_chatter(record: logging.LogRecord) -> bool:
    """A log filter: False for a record below ERROR that a tfds module logged."""
    from_tfds = pathlib.Path(record.pathname).is_relative_to(pathlib.Path(tfds.__file__).parent)
    return record.levelno >= logging.ERROR or not from_tfds


@contextlib.contextmanager
def quiet_tfds() -> Iterator[None]:
    """Silence tfds' progress bars and its absl log records below ERROR, for this block only.

    tfds announces its steps through ``absl.logging`` and may draw tqdm bars; none of it says
    more than kdjax's own line.
    Everything is put back on exit: the progress-bar switch as it was, the filter removed. absl
    calls ``logging.basicConfig()`` (a stderr handler on the root logger, for good) when the
    root logger has none; a ``NullHandler`` held there meanwhile keeps the program's logging
    as it was. The switch and the filter are process-wide while the block runs.
    """
    bars_were_on = getattr(tqdm_utils, "_active", True)  # tfds has no public getter
    absl_logger = logging.getLogger("absl")
    placeholder = None if logging.root.handlers else logging.NullHandler()
    tfds.disable_progress_bar()
    absl_logger.addFilter(_not_tfds_chatter)
    if placeholder is not None:
        logging.root.addHandler(placeholder)
    try:
        yield
    finally:
        if placeholder is not None:
            logging.root.removeHandler(placeholder)
        absl_logger.removeFilter(_not_tfds_chatter)
        tfds.display_progress_bar(bars_were_on)


def _fingerprint_record(cache_dir: pathlib.Path, fast_key: str) -> pathlib.Path:
    return cache_dir / "fingerprints" / f"{fast_key[:24]}.json"


# A tree of more bytes than this announces its content digest and shows its progress.
DIGEST_NOTICE_BYTES = 256 << 20


def _content_digest(source: DataSource, num_files: int, num_bytes: int) -> str:
    if num_bytes <= DIGEST_NOTICE_BYTES:
        return source.digest()
    console.line(f"kdjax: reading the {num_files} files ({num_bytes / 1e9:.1f} GB) under {source.root} to identify "
                 "them (once per change of the tree; --verify_data does it on every start)")
    with console.bar(total=num_files, desc="digest", unit="file") as bar:
        return source.digest(progress=bar.update)


def _write_atomic(path: pathlib.Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def prepare(
    source: DataSource,
    spec: CacheSpec,
    cache_dir: os.PathLike | str,
    *,
    skip_bad_images: bool = False,
    verify: bool = False,
) -> PreparedCache:
    """Open the cache for ``source`` under ``cache_dir``, decoding the images if it is cold.

    Finding the cache reads no file's bytes when the source's ``fingerprint`` (a tree's names,
    sizes, mtimes) was seen before: ``<cache_dir>/fingerprints/`` maps it to the content key. A new
    fingerprint (a new, changed, copied or moved tree), or ``verify``, computes the content digest,
    so a copied tree still finds the cache of the original. A cold cache prints one line saying
    what is decoded from where into where, then a progress bar over the images, on stderr; a warm
    one prints nothing. Without ``skip_bad_images`` the first unreadable file stops a cold
    prepare with a ``DataError`` naming it, and nothing is written.
    """
    cache_dir = pathlib.Path(cache_dir).expanduser().absolute()
    fingerprint, num_files, num_bytes = source.fingerprint()
    record = _fingerprint_record(cache_dir, cache_key(source, spec, fingerprint))
    key = None
    if record.is_file() and not verify:
        key = json.loads(record.read_text())["key"]
        if not is_prepared(cache_dir / key):
            key = None  # the cache was deleted: identify the content again
    digested = key is None
    identity = None
    if digested:
        content = _content_digest(source, num_files, num_bytes)
        key = cache_key(source, spec, content)[:24]
        identity = cache_key(source, spec, content, CONTENT_VERSION)[:24]
    path = cache_dir / key
    decoded = not is_prepared(path)
    if decoded:
        total = sum(len(entries) for entries in source.examples.values())
        console.line(f"kdjax: decoding {total} images of {source.root} into {path} (once; later runs read the cache)")
        cache_dir.mkdir(parents=True, exist_ok=True)
        with quiet_tfds(), console.bar(total=total, desc="decoding", unit="image") as bar:
            write_cache(path, source, spec, identity=identity, stop_on_unreadable=not skip_bad_images,
                        progress=bar.update)
    with quiet_tfds():
        sources = tfds.builder_from_directory(_data_dir(path)).as_data_source()
    stored = json.loads((path / INDEX_FILE).read_text())
    if digested:
        _write_atomic(record, json.dumps({"key": key, "source": str(source.root)}))
    recorded = stored["unreadable"]
    unreadable = {
        split: tuple(
            bad["message"].replace(_FILE, source.location(bad["file"])) for bad in entries
        )
        for split, entries in recorded.items()
    }
    records = {split: SplitRecords.from_metadata(m) for split, m in stored["records"].items()}
    return PreparedCache(path, sources, records, unreadable, decoded, digested, stored["identity"])
