"""tensorflow-datasets by name (``--data tfds:NAME[:VERSION]``), read without TensorFlow.

The dataset must be prepared already (its ArrayRecord files and ``dataset_info.json`` under
``--tfds_data_dir``, by default tfds's own: ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``): it
is opened with ``tfds.builder(NAME, data_dir=...)`` and read through tfds's data-source API
(``as_data_source``), which needs neither TensorFlow nor ``tf.data``. Nothing is ever
downloaded; a dataset that is not there stops with one ``DataError`` saying where it was looked
for and how to prepare it on a machine with network (``missing_message``).

The image and label features come from the builder's info: the supervised keys where the
builder declares them, else the features named ``image`` and ``label``, else the only ``Image``
and the only ``ClassLabel`` feature; ``--image_column`` / ``--label_column`` name others. Images
(``Image`` features, whose encoded bytes are decoded here with PIL, or uint8 ``Tensor``
features) come back in RGB, labels as ints; a ``ClassLabel``'s names are the class names.

Identity (the decode cache's key): kind, the builder's full name (name, config, version), the
two features, and as content digest the names and sizes of the prepared files with the bytes of
their JSON/text metadata (``dataset_info.json`` holds every split's record and byte counts).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import pathlib
from typing import Callable, Mapping

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from kdjax.data import decode_cache, records
from kdjax.data.folder import DataError

KIND = "tfds"
LABEL_CHUNK = 1024  # records read at a time while listing a split's labels
METADATA_SUFFIXES = (".json", ".txt")  # files whose bytes the digest reads (the rest: name and size)


def default_data_dir() -> pathlib.Path:
    """tfds's own default: ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``."""
    return pathlib.Path(os.environ.get("TFDS_DATA_DIR") or os.path.join("~", "tensorflow_datasets")).expanduser()


def missing_message(name: str, data_dir: pathlib.Path, reason: str) -> str:
    """The one error of a dataset that is not prepared under ``data_dir``."""
    base = name.split(":")[0]
    return (
        f"tfds dataset {name!r} is not prepared under {data_dir} ({reason}; looked for "
        f"{data_dir / base.replace(':', '/')}/<version>/dataset_info.json; the folder is --tfds_data_dir, by default "
        f"$TFDS_DATA_DIR or ~/tensorflow_datasets). Nothing is downloaded here: on a machine with network run "
        f"`tfds build {name} --data_dir DIR` (or `python -c \"import tensorflow_datasets as tfds; "
        f"tfds.builder('{name}', data_dir='DIR').download_and_prepare()\"`), copy DIR here and pass "
        f"--data tfds:{name} --tfds_data_dir DIR")


def _is_label(feature) -> bool:
    if isinstance(feature, tfds.features.ClassLabel):
        return True
    return (isinstance(feature, tfds.features.Tensor) and tuple(feature.shape) == ()
            and np.issubdtype(np.dtype(feature.np_dtype), np.integer))


def _is_image(feature) -> bool:
    if isinstance(feature, tfds.features.Image):
        return True
    return (isinstance(feature, tfds.features.Tensor) and not isinstance(feature, tfds.features.ClassLabel)
            and len(feature.shape) in (2, 3) and np.dtype(feature.np_dtype) == np.uint8)


def _choose(features, given: str | None, supervised: str | None, default: str, accepts, what: str, flag: str,
            dataset: str) -> str:
    """The feature a role reads: ``given``, else the supervised key, else ``default``, else the
    only feature ``accepts`` takes."""
    names = list(features.keys())
    listing = ", ".join(f"{k} ({type(features[k]).__name__})" for k in names)
    if given is not None:
        if given not in names or not accepts(features[given]):
            state = "is not one" if given in names else "does not exist"
            raise DataError(f"{flag} {given!r}: {dataset} has no such {what} feature ({given!r} {state}); its "
                            f"features: {listing}")
        return given
    for candidate in (supervised, default):
        if candidate in names and accepts(features[candidate]):
            return candidate
    fitting = [k for k in names if accepts(features[k])]
    if len(fitting) == 1:
        return fitting[0]
    raise DataError(f"{dataset}: cannot tell which feature is the {what} (features: {listing}); pass {flag}")


@dataclasses.dataclass(frozen=True, eq=False)
class TfdsTable:
    """A prepared tfds dataset as a ``records.Table``."""

    builder: object  # tfds.core.DatasetBuilder (prepared)
    name: str  # NAME[:VERSION] as given
    image_key: str
    label_key: str

    @property
    def root(self) -> pathlib.Path:
        return pathlib.Path(os.fspath(self.builder.data_dir))

    @property
    def describe(self) -> str:
        return f"tfds:{self.name} ({self.builder.info.full_name} under {self.root.parent.parent})"

    @functools.cached_property
    def shard_lengths(self) -> Mapping[str, tuple[int, ...]]:
        return {name: tuple(int(n) for n in info.shard_lengths) for name, info in self.builder.info.splits.items()}

    @property
    def metadata_class_names(self) -> tuple[str, ...] | None:
        feature = self.builder.info.features[self.label_key]
        return tuple(feature.names) if isinstance(feature, tfds.features.ClassLabel) else None

    @functools.cached_property
    def _sources(self) -> Mapping[str, object]:
        """Split -> tfds ArrayRecordDataSource; encoded images are left encoded (decoded by
        ``records.to_rgb``, and not at all while labels are listed)."""
        skip = {k: tfds.decode.SkipDecoding() for k, f in self.builder.info.features.items()
                if isinstance(f, tfds.features.Image)}
        with decode_cache.quiet_tfds():
            return self.builder.as_data_source(decoders=skip or None)

    def labels(self, split: str) -> np.ndarray:
        source = self._sources[split]
        n = len(source)
        out = np.empty(n, np.int64)
        for start in range(0, n, LABEL_CHUNK):
            chunk = source.__getitems__(list(range(start, min(n, start + LABEL_CHUNK))))
            out[start:start + len(chunk)] = [int(ex[self.label_key]) for ex in chunk]
        return out

    def image(self, split: str, index: int) -> Image.Image:
        return records.to_rgb(self._sources[split][int(index)][self.image_key], self.location(split, index))

    def location(self, split: str, index: int) -> str:
        return f"tfds:{self.builder.info.full_name} split {split} record {index} (under {self.root})"

    def key_fields(self) -> dict:
        info = self.builder.info
        return {"source": KIND, "name": info.full_name, "version": str(info.version), "image": self.image_key,
                "label": self.label_key}

    def _files(self) -> list[tuple[str, pathlib.Path]]:
        return sorted((p.relative_to(self.root).as_posix(), p) for p in self.root.rglob("*") if p.is_file())

    def fingerprint(self) -> tuple[str, int, int]:
        """Names, sizes and mtimes of the prepared files; the bytes are those ``digest`` reads."""
        digest, metadata_bytes, files = hashlib.sha256(), 0, self._files()
        for rel, path in files:
            st = path.stat()
            digest.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            metadata_bytes += st.st_size if rel.endswith(METADATA_SUFFIXES) else 0
        return digest.hexdigest(), len(files), metadata_bytes

    def digest(self, progress: Callable[[int], object] | None = None) -> str:
        """Names and sizes of the prepared files, and the bytes of their metadata files."""
        digest = hashlib.sha256()
        for rel, path in self._files():
            content = hashlib.sha256(path.read_bytes()).hexdigest() if rel.endswith(METADATA_SUFFIXES) else ""
            digest.update(f"{rel}\0{path.stat().st_size}\0{content}\n".encode())
            if progress is not None:
                progress(1)
        return digest.hexdigest()


def open_tfds(name: str, data_dir: os.PathLike | str | None = None, image_column: str | None = None,
              label_column: str | None = None) -> TfdsTable:
    """The prepared dataset ``name`` (``NAME[:VERSION]``, tfds's ``NAME/CONFIG:VERSION`` too)
    under ``data_dir`` (None: ``default_data_dir()``); raises ``DataError`` with
    ``missing_message`` when it is not prepared there (nothing is downloaded)."""
    if not name:
        raise DataError("--data tfds: name the dataset, e.g. --data tfds:cifar100 or tfds:cifar100:3.0.2")
    data_dir = default_data_dir() if data_dir is None else pathlib.Path(data_dir).expanduser().absolute()
    try:
        with decode_cache.quiet_tfds():
            builder = tfds.builder(name, data_dir=os.fspath(data_dir))
    except (ValueError, AssertionError, FileNotFoundError) as err:  # tfds' DatasetNotFoundError is a ValueError
        reason = (str(err).splitlines() or [type(err).__name__])[0].rstrip(".")
        raise DataError(missing_message(name, data_dir, reason)) from None
    if not builder.is_prepared():
        raise DataError(missing_message(name, data_dir, f"no prepared files in {builder.data_dir}"))
    features, dataset = builder.info.features, f"tfds:{name}"
    supervised = builder.info.supervised_keys
    pair = tuple(supervised) if isinstance(supervised, (tuple, list)) and len(supervised) == 2 else (None, None)
    pair = tuple(k if isinstance(k, str) else None for k in pair)
    image = _choose(features, image_column, pair[0], "image", _is_image, "image", "--image_column", dataset)
    label = _choose(features, label_column, pair[1], "label", _is_label, "label", "--label_column", dataset)
    return TfdsTable(builder, name, image, label)
