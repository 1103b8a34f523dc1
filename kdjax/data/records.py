"""Datasets of numbered records (tfds, Hugging Face Parquet, arrays in memory) as data sources.

A kind that stores its examples as records, not as files, gives a ``Table``: per split, how many
records there are (``shard_lengths``), their integer labels, and the image of record ``i``.
``RecordSource`` turns a table into a ``kdjax.data.sources.DataSource`` of the table's own splits:
example ``i`` of split ``s`` is named ``"s/i"``, its label is checked against the class list, and
the class list is the table's metadata (tfds or Hugging Face ``ClassLabel`` names), ``class_names``
given by the user (``--class_names``), or, for plain integer labels, the values ``"0"``, ``"1"``,
... up to the largest label of any split. ``kdjax.data.splits.SlicedSource`` then maps the
table's splits onto kdjax's train / val / test (``--train_split`` ...).

Labels are read when a split's examples are first asked for (``LazySplits``): a warm start, which
finds its decode cache by the table's fingerprint, reads none (except a table without class names
and without ``class_names``, whose class list is its largest label). ``to_rgb`` is how every kind
decodes an image: encoded bytes through PIL, arrays checked and converted, both to RGB as
``transforms.load_rgb`` converts a file.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import pathlib
import threading
from typing import Callable, Iterator, Mapping, Protocol, Sequence

import numpy as np
from PIL import Image

from kdjax.data import transforms
from kdjax.data.folder import DataError


class LazySplits(Mapping):
    """A mapping of ``names`` whose values are computed on first access (``load(name)``), once:
    what a source's ``examples`` is when listing them means reading every record's label."""

    def __init__(self, names: Sequence[str], load: Callable[[str], tuple]):
        self._names, self._load = tuple(names), load
        self._values: dict[str, tuple] = {}
        self._lock = threading.Lock()

    def __getitem__(self, name: str) -> tuple:
        if name not in self._names:
            raise KeyError(name)
        with self._lock:
            if name not in self._values:
                self._values[name] = self._load(name)
            return self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


class Table(Protocol):
    """A dataset's records, split by split (what each kind's module gives ``RecordSource``)."""

    @property
    def root(self) -> pathlib.Path:
        """Where the records lie (``DataSource.root``)."""

    @property
    def describe(self) -> str:
        """The dataset as messages name it, e.g. ``tfds:cifar100 (3.0.2)``."""

    @property
    def shard_lengths(self) -> Mapping[str, tuple[int, ...]]:
        """Split -> the number of records of each of its shards (files), in record order."""

    @property
    def metadata_class_names(self) -> tuple[str, ...] | None:
        """The label's class names as the dataset's metadata holds them, or None."""

    def labels(self, split: str) -> np.ndarray:
        """Every record's integer label, in record order; raises ``DataError`` naming a bad one."""

    def image(self, split: str, index: int) -> Image.Image:
        """The record's image in RGB (``to_rgb``); raises ``transforms.ImageReadError``."""

    def location(self, split: str, index: int) -> str:
        """Where the record lies (its file and row, or its split and number)."""

    def key_fields(self) -> dict:
        """JSON values of the cache key: kind, name, version, columns."""

    def fingerprint(self) -> tuple[str, int, int]:
        """``DataSource.fingerprint``."""

    def digest(self, progress: Callable[[int], object] | None = None) -> str:
        """``DataSource.digest``."""


def to_rgb(value, location: str) -> Image.Image:
    """An image value of a record as a decoded RGB image. Accepted: encoded bytes (PNG, JPEG, any
    format PIL reads) and arrays (uint8, or integers in 0..255) of shape ``[H, W]``,
    ``[H, W, 1]``, ``[H, W, 3]`` or ``[H, W, 4]``. Raises ``transforms.ImageReadError`` naming
    ``location``."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            with Image.open(io.BytesIO(value)) as img:
                img.load()  # decode now: a truncated image must fail here
                return img.convert("RGB")
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            raise transforms.ImageReadError(f"{location}: cannot read image ({err})") from err
    array = np.asarray(value)
    if array.dtype == object or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (1, 3, 4)):
        raise transforms.ImageReadError(
            f"{location}: cannot read image (an array of shape {array.shape} and dtype {array.dtype}; expected "
            "encoded bytes or uint8 [H, W], [H, W, 1], [H, W, 3] or [H, W, 4])")
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.integer) or (array.size and (array.min() < 0 or array.max() > 255)):
            raise transforms.ImageReadError(
                f"{location}: cannot read image (dtype {array.dtype}"
                f"{'' if not array.size else f', values {array.min()}..{array.max()}'}; expected uint8 pixels)")
        array = array.astype(np.uint8)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 3 and array.shape[-1] == 4:
        return Image.fromarray(array, "RGBA").convert("RGB")
    return Image.fromarray(array).convert("RGB")


def value_names(max_label: int) -> tuple[str, ...]:
    """Class names of plain integer labels: their values, ``"0"`` to ``str(max_label)``."""
    return tuple(str(i) for i in range(max_label + 1))


def split_name(name: str) -> tuple[str, int]:
    """``"train/17"`` -> ``("train", 17)``: a record source's example name."""
    split, _, index = name.rpartition("/")
    return split, int(index)


@dataclasses.dataclass(frozen=True, eq=False)
class RecordSource:
    """A ``Table`` as a data source of its own splits (``kdjax.data.sources.DataSource``).

    ``class_names``: names given by the user (``--class_names``), which must be as many as the
    metadata's where it has some; None takes the metadata's, or names the labels by their values.
    """

    table: Table
    class_names_given: tuple[str, ...] | None = None

    def __post_init__(self):
        given, named = self.class_names_given, self.table.metadata_class_names
        if given is not None and (not given or len(set(given)) != len(given)):
            raise DataError(f"--class_names {','.join(given)}: give each class one distinct name, in label order")
        if given is not None and named is not None and len(given) != len(named):
            raise DataError(f"--class_names names {len(given)} classes, but {self.table.describe} has {len(named)} "
                            f"({', '.join(named[:10])}{', ...' if len(named) > 10 else ''}); give {len(named)} names")

    @property
    def root(self) -> pathlib.Path:
        return self.table.root

    @functools.cached_property
    def class_names(self) -> tuple[str, ...]:
        """Label i is ``class_names[i]`` (see the class docstring)."""
        if self.class_names_given is not None:
            return tuple(self.class_names_given)
        if self.table.metadata_class_names is not None:
            return tuple(self.table.metadata_class_names)
        top = max((int(self._labels(s).max()) for s in self.split_names if self._labels(s).size), default=0)
        return value_names(top)

    @functools.cached_property
    def _label_cache(self) -> LazySplits:
        return LazySplits(self.split_names, self.table.labels)

    def _labels(self, split: str) -> np.ndarray:
        return self._label_cache[split]

    @functools.cached_property
    def examples(self) -> Mapping[str, tuple[tuple[str, int], ...]]:
        """Split -> ``(("split/i", label), ...)`` in record order, read on first access."""
        return LazySplits(self.split_names, self._examples)

    def _examples(self, split: str) -> tuple[tuple[str, int], ...]:
        labels = self._labels(split)
        num_classes = len(self.class_names)
        bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
        if bad.size:
            i = int(bad[0])
            named = f"the {num_classes} classes {list(self.class_names[:10])}{' ...' if num_classes > 10 else ''}"
            raise DataError(
                f"{self.table.location(split, i)}: label {int(labels[i])} is outside {named} of "
                f"{self.table.describe} ({bad.size} such record(s) in split {split}); fix the labels, or pass "
                "--class_names with a name for every label value")
        return tuple((f"{split}/{i}", int(label)) for i, label in enumerate(labels.tolist()))

    @property
    def split_names(self) -> tuple[str, ...]:
        return tuple(self.table.shard_lengths)

    @property
    def shard_lengths(self) -> Mapping[str, tuple[int, ...]]:
        return self.table.shard_lengths

    def location(self, name: str) -> str:
        return self.table.location(*split_name(name))

    def read(self, name: str) -> Image.Image:
        return self.table.image(*split_name(name))

    def key_fields(self) -> dict:
        """The table's fields and where the class names come from (values of the labels are the
        content's, so their names are covered by the digest)."""
        if self.class_names_given is not None or self.table.metadata_class_names is not None:
            names = list(self.class_names)
        else:
            names = "label values"
        return {**self.table.key_fields(), "class_names": names}

    def fingerprint(self) -> tuple[str, int, int]:
        return self.table.fingerprint()

    def digest(self, progress: Callable[[int], object] | None = None) -> str:
        return self.table.digest(progress)

    def notice(self) -> str | None:
        return None
