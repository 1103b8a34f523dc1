"""Hugging Face datasets in the hub's Parquet layout (``--data hf:REPO_OR_DIR``), read with pyarrow.

A local folder, or a dataset repository already in the Hugging Face hub cache
(``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``:
``datasets--OWNER--NAME/snapshots/<revision>/``, the revision ``refs/main`` names, else the newest).
Its splits are Parquet files: ``data/<split>-NNNNN-of-NNNNN.parquet`` (what ``push_to_hub``
writes), or ``<split>-*.parquet`` / ``<split>/*.parquet`` in the folder itself (the hub's
Parquet conversion, one folder per config). Nothing is downloaded; a dataset that is not there
stops with one ``DataError`` saying where it was looked for and how to fetch it
(``missing_message``). No ``datasets`` package is needed.

Columns: ``--image_column`` (default ``image``, else the only ``Image`` feature of the Hugging
Face metadata) and ``--label_column`` (default ``label``, else the only ``ClassLabel``). The image
column may hold Hugging Face's image struct (``{"bytes": ..., "path": ...}``: encoded PNG, JPEG or
any format PIL reads; a null ``bytes`` reads ``path``, relative to the dataset's folder), plain
binary values of encoded images, nested lists ``[H][W][C]`` / ``[H][W]`` (lists or fixed-size
lists, as the ``Array2D``/``Array3D`` features store them) or pyarrow's ``fixed_shape_tensor``
column; pixels are uint8 (or integers in 0..255). Labels are integers; their class names are the
``ClassLabel`` names of the schema's ``huggingface`` metadata (``info.features.<label>.names``).

Images are read a row group at a time (the decode cache asks for the rows in order), holding at
most ``CHUNKS_HELD`` row groups of the image column. Identity (the decode cache's key): kind, the
repository id (a local folder: its name) and revision, the two columns, and as content digest the
SHA-256 of every Parquet file's bytes.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import threading
from typing import Callable, Mapping

import numpy as np
from PIL import Image

from kdjax.data import records, transforms
from kdjax.data.folder import DataError
from kdjax.fetch import sha256_file

KIND = "hf"
CHUNKS_HELD = 8  # row groups of the image column held while decoding


def hub_cache() -> pathlib.Path:
    """The Hugging Face hub cache: ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``."""
    if os.environ.get("HF_HUB_CACHE"):
        return pathlib.Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join("~", ".cache", "huggingface")
    return pathlib.Path(home).expanduser() / "hub"


def missing_message(location: str, looked: str, local: bool) -> str:
    """The one error of a dataset that is not where ``--data hf:LOCATION`` looks."""
    if local:
        how = (f"--data names a local path, so nothing is downloaded: on a machine with network run "
               f"`huggingface-cli download REPO --repo-type dataset --local-dir DIR` and copy DIR to {location}")
    else:
        how = (f"Nothing is downloaded here: on a machine with network run `huggingface-cli download {location} "
               "--repo-type dataset --local-dir DIR`, copy DIR here and pass --data hf:DIR")
    return f"Hugging Face dataset {location!r} is not here (looked for {looked}). {how}"


def _pq():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("--data hf: reads Parquet with pyarrow, which is not installed: pip install pyarrow") from None
    return pq


def split_files(folder: pathlib.Path) -> dict[str, list[pathlib.Path]]:
    """Split -> its Parquet files in name order, from ``folder/data`` or else ``folder`` itself."""
    for base in (folder / "data", folder):
        if not base.is_dir():
            continue
        found: dict[str, list[pathlib.Path]] = {}
        for entry in sorted(base.iterdir()):
            if entry.is_file() and entry.name.endswith(".parquet"):
                found.setdefault(entry.name[: -len(".parquet")].split("-")[0], []).append(entry)
            elif entry.is_dir() and entry.name != "data" and any(entry.glob("*.parquet")):
                found.setdefault(entry.name, []).extend(sorted(entry.glob("*.parquet")))
        if found:
            return found
    return {}


def _snapshot(repo: str) -> tuple[pathlib.Path | None, str | None, str]:
    """The hub cache's snapshot of the dataset ``repo`` (refs/main's, else the newest holding
    Parquet files), its revision, and where it was looked for."""
    repo_dir = hub_cache() / f"datasets--{repo.replace('/', '--')}"
    looked = f"{repo_dir}/snapshots/*/data/<split>-*.parquet in the hub cache ($HF_HUB_CACHE, $HF_HOME/hub or " \
             "~/.cache/huggingface/hub)"
    ref = repo_dir / "refs" / "main"
    candidates = [repo_dir / "snapshots" / ref.read_text().strip()] if ref.is_file() else []
    if (repo_dir / "snapshots").is_dir():
        candidates += sorted((p for p in (repo_dir / "snapshots").iterdir() if p.is_dir()),
                             key=lambda p: p.stat().st_mtime, reverse=True)
    for snapshot in candidates:
        if snapshot.is_dir() and split_files(snapshot):
            return snapshot, snapshot.name, looked
    return None, None, looked


def _hf_features(schema) -> dict:
    """The ``features`` of the Hugging Face metadata in a Parquet schema (``{}`` without it)."""
    raw = (schema.metadata or {}).get(b"huggingface")
    if not raw:
        return {}
    try:
        meta = json.loads(raw)
    except ValueError:
        return {}
    features = meta.get("info", {}).get("features") or meta.get("features") or {}
    return features if isinstance(features, dict) else {}


def _image_kind(arrow_type) -> str | None:
    """How a column of ``arrow_type`` holds images: struct, bytes, nested or tensor (None: not images)."""
    import pyarrow as pa

    if pa.types.is_struct(arrow_type) and arrow_type.get_field_index("bytes") >= 0:
        return "struct"
    if pa.types.is_binary(arrow_type) or pa.types.is_large_binary(arrow_type):
        return "bytes"
    if isinstance(arrow_type, pa.FixedShapeTensorType):
        return "tensor"
    if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type) or pa.types.is_fixed_size_list(arrow_type):
        inner = arrow_type.value_type
        nested = pa.types.is_list(inner) or pa.types.is_large_list(inner) or pa.types.is_fixed_size_list(inner)
        return "nested" if nested else None
    return None


@dataclasses.dataclass(frozen=True, eq=False)
class ParquetTable:
    """A Hugging Face Parquet dataset as a ``records.Table``."""

    folder: pathlib.Path
    name: str  # the repository id, or the local folder's name
    revision: str | None  # the hub snapshot's, None for a local folder
    files: Mapping[str, tuple[pathlib.Path, ...]]
    image_column: str
    label_column: str
    image_kind: str  # _image_kind of the image column
    class_names_meta: tuple[str, ...] | None

    def __post_init__(self):
        object.__setattr__(self, "_lock", threading.Lock())
        object.__setattr__(self, "_chunks", collections.OrderedDict())

    @property
    def root(self) -> pathlib.Path:
        return self.folder

    @property
    def describe(self) -> str:
        return f"hf:{self.name} ({self.folder})"

    @functools.cached_property
    def _row_groups(self) -> Mapping[str, tuple[list[int], list[tuple[pathlib.Path, int, int]]]]:
        """Split -> (first row of each row group, (file, row group, rows) of each), in order."""
        pq, out = _pq(), {}
        for split, paths in self.files.items():
            starts, groups, row = [], [], 0
            for path in paths:
                meta = pq.ParquetFile(path).metadata
                for g in range(meta.num_row_groups):
                    n = meta.row_group(g).num_rows
                    starts.append(row)
                    groups.append((path, g, n))
                    row += n
            out[split] = (starts, groups)
        return out

    @functools.cached_property
    def shard_lengths(self) -> Mapping[str, tuple[int, ...]]:
        pq = _pq()
        return {split: tuple(pq.ParquetFile(p).metadata.num_rows for p in paths) for split, paths in self.files.items()}

    @property
    def metadata_class_names(self) -> tuple[str, ...] | None:
        return self.class_names_meta

    def _where(self, split: str, index: int) -> tuple[pathlib.Path, int, int]:
        """(file, row group, row inside it) of record ``index`` of ``split``."""
        starts, groups = self._row_groups[split]
        g = bisect.bisect_right(starts, index) - 1
        path, group, _ = groups[g]
        return path, group, index - starts[g]

    def location(self, split: str, index: int) -> str:
        path, offset = self.files[split][0], index
        for path, n in zip(self.files[split], self.shard_lengths[split]):
            if offset < n:
                break
            offset -= n
        return f"{path} row {offset} (split {split} record {index})"

    def labels(self, split: str) -> np.ndarray:
        import pyarrow as pa

        out = []
        for path in self.files[split]:
            column = _pq().read_table(path, columns=[self.label_column]).column(self.label_column)
            if not pa.types.is_integer(column.type):
                raise DataError(f"{path}: the label column {self.label_column!r} holds {column.type}, not integers; "
                                "pass --label_column naming an integer (ClassLabel) column")
            if column.null_count:
                row = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
                raise DataError(f"{path} row {row}: no label (null in column {self.label_column!r}); fill it or "
                                "leave the row out")
            out.append(column.to_numpy().astype(np.int64))
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    def _chunk(self, path: pathlib.Path, group: int):
        """The image column of one row group, the last ``CHUNKS_HELD`` of them kept."""
        key = (path, group)
        with self._lock:
            if key in self._chunks:
                self._chunks.move_to_end(key)
                return self._chunks[key]
            chunk = _pq().ParquetFile(path).read_row_group(group, columns=[self.image_column])
            column = chunk.column(self.image_column).combine_chunks()
            self._chunks[key] = column
            while len(self._chunks) > CHUNKS_HELD:
                self._chunks.popitem(last=False)
            return column

    def _value(self, column, row: int, where: str):
        if self.image_kind == "tensor":
            return column[row].to_numpy()
        value = column[row].as_py()
        if self.image_kind == "nested":
            return value
        if self.image_kind == "struct":
            data, path = value.get("bytes") if value else None, value.get("path") if value else None
            if data is None and path:
                file = pathlib.Path(path) if os.path.isabs(path) else self.folder / path
                if not file.is_file():
                    raise transforms.ImageReadError(f"{where}: cannot read image (no bytes, and its path {path} "
                                                    f"is not a file under {self.folder})")
                return file.read_bytes()
            value = data
        if value is None:
            raise transforms.ImageReadError(f"{where}: cannot read image (null in column {self.image_column!r})")
        return value

    def image(self, split: str, index: int) -> Image.Image:
        path, group, row = self._where(split, index)
        where = f"{path} row group {group} row {row} (split {split} record {index})"
        return records.to_rgb(self._value(self._chunk(path, group), row, where), where)

    def key_fields(self) -> dict:
        return {"source": KIND, "name": self.name, "revision": self.revision, "image": self.image_column,
                "label": self.label_column}

    def _all_files(self) -> list[tuple[str, pathlib.Path]]:
        return sorted((p.relative_to(self.folder).as_posix(), p) for paths in self.files.values() for p in paths)

    def fingerprint(self) -> tuple[str, int, int]:
        """Names, sizes and mtimes of the Parquet files."""
        digest, total, files = hashlib.sha256(), 0, self._all_files()
        for rel, path in files:
            st = path.stat()
            digest.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            total += st.st_size
        return digest.hexdigest(), len(files), total

    def digest(self, progress: Callable[[int], object] | None = None) -> str:
        """SHA-256 over (name, SHA-256 of bytes) of every Parquet file."""
        digest = hashlib.sha256()
        for rel, path in self._all_files():
            digest.update(f"{rel}\0{sha256_file(path)}\n".encode())
            if progress is not None:
                progress(1)
        return digest.hexdigest()


def _column(schema, features: dict, given: str | None, default: str, hf_type: str, flag: str, path) -> str:
    names = list(schema.names)
    if given is not None or default in names:
        column = default if given is None else given
        if column not in names:
            raise DataError(f"{flag} {column!r}: {path} has no such column; its columns: {', '.join(names)}")
        return column
    typed = [k for k, f in features.items() if isinstance(f, dict) and f.get("_type") == hf_type and k in names]
    if len(typed) == 1:
        return typed[0]
    raise DataError(f"{path} has no column {default!r} (its columns: {', '.join(names)}); pass {flag} naming it")


def open_parquet(location: str, image_column: str | None = None, label_column: str | None = None) -> ParquetTable:
    """The Parquet dataset ``location`` names: a local folder (a path that exists, or one that
    starts with ``/``, ``.`` or ``~``), else a repository id looked up in the hub cache. Raises
    ``DataError`` (``missing_message``) when it is not there; nothing is downloaded."""
    if not location:
        raise DataError("--data hf: name a folder or a dataset repository, e.g. --data hf:./my_set or hf:OWNER/NAME")
    expanded = pathlib.Path(location).expanduser()
    local = location.startswith(("/", ".", "~")) or expanded.exists()
    revision = None
    if local:
        folder = expanded.absolute()
        looked = f"{folder}/data/<split>-*.parquet, {folder}/<split>-*.parquet or {folder}/<split>/*.parquet"
        if not folder.is_dir():
            raise DataError(missing_message(location, f"{looked}: no such folder", True))
        name = folder.name
    else:
        folder, revision, looked = _snapshot(location)
        if folder is None:
            raise DataError(missing_message(location, looked, False))
        name = location
    files = split_files(folder)
    if not files:
        raise DataError(missing_message(location, f"{looked}: no Parquet file there", local))
    pq = _pq()
    first = next(iter(files.values()))[0]
    schema = pq.read_schema(first)
    features = _hf_features(schema)
    image = _column(schema, features, image_column, "image", "Image", "--image_column", first)
    label = _column(schema, features, label_column, "label", "ClassLabel", "--label_column", first)
    for paths in files.values():
        for path in paths:
            other = pq.read_schema(path)
            missing = [c for c in (image, label) if c not in other.names]
            if missing:
                raise DataError(f"{path} has no column {missing[0]!r} (its columns: {', '.join(other.names)}); every "
                                f"Parquet file of {folder} needs the image and label columns")
    kind = _image_kind(schema.field(image).type)
    if kind is None:
        raise DataError(f"--image_column {image!r}: {first} holds {schema.field(image).type} there, not images "
                        "(accepted: Hugging Face's image struct of encoded bytes, binary encoded images, nested "
                        "[H][W][C] lists of uint8, a fixed_shape_tensor column)")
    label_feature = features.get(label) if isinstance(features.get(label), dict) else {}
    names = label_feature.get("names") if label_feature.get("_type") == "ClassLabel" else None
    return ParquetTable(folder, name, revision, {s: tuple(p) for s, p in files.items()}, image, label, kind,
                        tuple(names) if names else None)
