"""Examples held in Python as a data source: ``from_arrays``.

    source = data.from_arrays({"train": [(image, label), ...], "val": [(image, label), ...]},
                              class_names=("cat", "dog"))
    dataset = data.load_splits(source, image_size=32)

Each split is a sequence of ``(image, label)`` pairs, or a mapping with ``images`` and ``labels``
(e.g. ``{"images": uint8 [N, H, W, 3], "labels": int [N]}``). An image is encoded bytes (PNG,
JPEG, any format PIL reads) or a uint8 array ``[H, W]``, ``[H, W, 1]``, ``[H, W, 3]`` or
``[H, W, 4]`` (``records.to_rgb``); a label is an int in ``0 .. len(class_names) - 1``
(``class_names`` None: the classes are named by their values, ``"0"`` up to the largest label).
The splits are read as a tfds or Hugging Face dataset's are: train is ``train``, val the first of
``validation``, ``val``, ``valid``, ``test``, and ``train_split`` / ``val_split`` / ``test_split``
take tfds's slicing syntax (``val_split="train[90%:]"``). The source goes through the decode
cache like any other; its identity is the SHA-256 of every example's label and image bytes.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import pathlib
from typing import Callable, Mapping, Sequence

import numpy as np
from PIL import Image

from kdjax.data import records, splits
from kdjax.data.folder import DataError

KIND = "arrays"
ROOT = pathlib.Path("<arrays>")  # what messages and Dataset.root name: the examples lie in memory


def _as_pairs(split: str, given) -> tuple[Sequence, np.ndarray]:
    """A split's (images, labels) from either accepted form; ``DataError`` naming the split."""
    if isinstance(given, Mapping):
        if set(given) != {"images", "labels"}:
            raise DataError(f"from_arrays: split {split!r} is a mapping of {sorted(given)}; give 'images' and 'labels'")
        images, labels = given["images"], given["labels"]
    else:
        pairs = list(given)
        bad = next((i for i, p in enumerate(pairs) if not isinstance(p, (tuple, list)) or len(p) != 2), None)
        if bad is not None:
            raise DataError(f"from_arrays: example {bad} of split {split!r} is not an (image, label) pair")
        images, labels = [p[0] for p in pairs], [p[1] for p in pairs]
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(f"from_arrays: split {split!r} has {len(images)} images and labels of shape {labels.shape}; "
                        "give one integer label per image")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"from_arrays: the labels of split {split!r} are {labels.dtype}, not integers")
    return images, labels.astype(np.int64)


@dataclasses.dataclass(frozen=True, eq=False)
class ArrayTable:
    """Examples in memory as a ``records.Table``."""

    data: Mapping[str, tuple[Sequence, np.ndarray]]  # split -> (images, labels)

    @property
    def root(self) -> pathlib.Path:
        return ROOT

    @property
    def describe(self) -> str:
        return "the arrays given to from_arrays"

    @property
    def shard_lengths(self) -> Mapping[str, tuple[int, ...]]:
        return {split: (len(labels),) for split, (_, labels) in self.data.items()}

    @property
    def metadata_class_names(self) -> None:
        return None

    def labels(self, split: str) -> np.ndarray:
        return self.data[split][1]

    def image(self, split: str, index: int) -> Image.Image:
        return records.to_rgb(self.data[split][0][index], self.location(split, index))

    def location(self, split: str, index: int) -> str:
        return f"from_arrays split {split} example {index}"

    def key_fields(self) -> dict:
        return {"source": KIND}

    @functools.cached_property
    def _digest(self) -> str:
        digest = hashlib.sha256()
        for split, (images, labels) in self.data.items():
            digest.update(f"split\0{split}\0{len(labels)}\n".encode())
            for image, label in zip(images, labels.tolist()):
                if isinstance(image, (bytes, bytearray, memoryview)):
                    digest.update(f"{label}\0bytes\0{len(image)}\n".encode())
                    digest.update(bytes(image))
                else:
                    array = np.ascontiguousarray(image)
                    digest.update(f"{label}\0{array.dtype.str}\0{array.shape}\n".encode())
                    digest.update(array.tobytes())
        return digest.hexdigest()

    def fingerprint(self) -> tuple[str, int, int]:
        """The content digest itself (the examples are in memory; no file is read)."""
        return self._digest, sum(len(labels) for _, labels in self.data.values()), 0

    def digest(self, progress: Callable[[int], object] | None = None) -> str:
        return self._digest


def from_arrays(split_data: Mapping[str, object], class_names: Sequence[str] | None = None, *,
                train_split: str | None = None, val_split: str | None = None,
                test_split: str | None = None) -> splits.SlicedSource:
    """A data source of the examples ``split_data`` holds per split (see the module docstring),
    whose splits are train, val and, where there is one, test."""
    if not split_data:
        raise DataError("from_arrays: give at least a train split, e.g. {'train': [(image, label), ...], ...}")
    table = ArrayTable({str(split): _as_pairs(str(split), given) for split, given in split_data.items()})
    base = records.RecordSource(table, None if class_names is None else tuple(class_names))
    given = {"train": train_split, "val": val_split, "test": test_split}
    return splits.sliced(base, given, splits.RoleRequest(), splits.RECORD_DEFAULTS, "from_arrays")
