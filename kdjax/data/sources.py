"""Where a dataset comes from, before anything is decoded: a data source, and the registry of the
kinds kdjax reads.

A ``DataSource`` holds its examples per split (each a name unique in its split and an integer
label), reads one example's image, and identifies itself for the decode cache's key
(``kdjax.data.decode_cache``): ``fingerprint`` is the cheap identity a warm start looks up,
``digest`` the content identity the key is made of, and ``key_fields`` what else about the source
changes what is decoded. ``decode_cache.prepare`` decodes a source; ``batches.load_splits``
loads one.

``SOURCES`` maps a kind's name to how a source of that kind is opened, and ``open_data`` turns
``--data SPEC`` into a source (``parse_spec``):

    folder:PATH          an ImageFolder tree (``folder.FolderSource``; ``--data_dir PATH``)
    hymenoptera          PyTorch's ants/bees set, downloaded into ``<cache_dir>/downloads``
                         (no ``--data``: the default)
    tfds:NAME[:VERSION]  a prepared tensorflow-datasets dataset (``tfds_source``)
    hf:DIR | hf:ID       a Hugging Face dataset's Parquet files (``parquet_source``)

and, from Python only, ``arrays.from_arrays``. The record kinds (tfds, hf, arrays) are
``records.RecordSource``s of their own splits, seen through ``splits.SlicedSource`` as kdjax's
train / val / test (``--train_split`` ...: tfds's slicing syntax); a folder is read as it always
was unless a split flag slices it. ``source_for`` is ``--data_dir``'s older door: a folder or,
for None, hymenoptera. Adding a kind touches its own module, one entry here and a test.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Callable, Mapping, Protocol, Sequence

from PIL import Image

from kdjax.data import folder, hymenoptera
from kdjax.data.folder import DEFAULT_SPLITS, IMG_EXTENSIONS, DataError


class DataSource(Protocol):
    """A dataset before decoding (``folder.FolderSource``, ``records.RecordSource``, ``splits.SlicedSource``)."""

    @property
    def root(self) -> pathlib.Path:
        """Where the source lies: messages, the cache's records and ``Dataset.root`` name it."""

    @property
    def class_names(self) -> tuple[str, ...]:
        """Label i is ``class_names[i]``."""

    @property
    def examples(self) -> Mapping[str, tuple[tuple[str, int], ...]]:
        """Split -> ``((name, label), ...)`` in the order the examples are indexed."""

    @property
    def split_names(self) -> tuple[str, ...]:
        """The splits of ``examples``, in their order."""

    def location(self, name: str) -> str:
        """Where the example ``name`` lies, as ``read``'s errors and the cache's messages name it."""

    def read(self, name: str) -> Image.Image:
        """The example's image, decoded in full and in RGB (``transforms.load_rgb``'s result);
        raises ``transforms.ImageReadError`` naming ``location(name)``."""

    def key_fields(self) -> dict:
        """JSON values that, with the content digest, identify what is decoded (split names,
        reading rules)."""

    def fingerprint(self) -> tuple[str, int, int]:
        """A cheap identity (no byte read), the number of files and their bytes; it changes
        whenever the content may have."""

    def digest(self, progress: Callable[[int], object] | None = None) -> str:
        """The content's identity; ``progress(n)`` per ``n`` files read."""

    def notice(self) -> str | None:
        """One line on what the source leaves out, or ``None``."""


@dataclasses.dataclass(frozen=True)
class SourceOptions:
    """How a ``--data`` spec is read, besides its location: the roles' split specs (None: the
    kind's default, ``kdjax.data.splits``), which roles are read (``roles``: a
    ``splits.RoleRequest``, None for training's train + val + test where there is one), the
    record kinds' columns and class names, tfds's folder, and a folder's image extensions."""

    train_split: str | None = None
    val_split: str | None = None
    test_split: str | None = None
    roles: object | None = None  # splits.RoleRequest
    image_column: str | None = None
    label_column: str | None = None
    class_names: tuple[str, ...] | None = None
    tfds_data_dir: os.PathLike | str | None = None
    extensions: tuple[str, ...] = IMG_EXTENSIONS

    @property
    def given(self) -> dict[str, str | None]:
        """Role -> the split spec given for it, or None."""
        return {"train": self.train_split, "val": self.val_split, "test": self.test_split}

    def role_request(self):
        from kdjax.data import splits

        return splits.RoleRequest() if self.roles is None else self.roles


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """A kind of data source: ``open(location, cache_dir, options)`` -> a ``DataSource``
    (``location``: what ``--data KIND:LOCATION`` names, None for a downloaded set; ``cache_dir``:
    where downloads go, under ``downloads/``; ``options``: a ``SourceOptions``)."""

    open: Callable[[str | None, pathlib.Path | None, SourceOptions], DataSource]
    help: str
    # the options a source of this kind has no use for: given, they are an error
    refuses: tuple[str, ...] = ()


def _is_plain(options: SourceOptions) -> bool:
    """Whether a folder is read as it always was: no split flag, or each naming its own folder."""
    return all(spec is None or spec.strip() == role for role, spec in options.given.items())


def _folder_source(root: os.PathLike | str, options: SourceOptions) -> DataSource:
    """An ImageFolder tree, its roles' split folders as they are (``_is_plain``) or sliced."""
    roles = options.role_request()
    if _is_plain(options):
        return folder.open_folder(root, roles.needed, options.extensions)
    from kdjax.data import splits

    path = pathlib.Path(root).expanduser().absolute()
    if not path.is_dir():
        return folder.open_folder(path, roles.needed, options.extensions)  # raises its "no such folder"
    dataset = f"data folder {path}"
    available = tuple(sorted(e.name for e in os.scandir(path) if e.is_dir()))
    specs = splits.default_specs(available, options.given, roles, splits.FOLDER_DEFAULTS, dataset)
    read: set[str] = set()
    for role, spec in specs.items():
        names = splits.referenced(splits.parse(spec, role))
        if names is None:
            raise DataError(f"{splits.FLAGS[role]} {spec!r}: name the split folders of {path} to read ('all' is for "
                            "tfds and Hugging Face datasets)")
        read |= names
    base = folder.open_folder(path, tuple(sorted(read)), options.extensions)
    return splits.sliced(base, options.given, roles, splits.FOLDER_DEFAULTS, dataset)


def _folder(location, cache_dir: pathlib.Path | None, options: SourceOptions) -> DataSource:
    if not location:
        raise ValueError("--data folder: name the folder, e.g. --data folder:/data/images")
    return _folder_source(location, options)


def _hymenoptera(location, cache_dir: pathlib.Path | None, options: SourceOptions) -> DataSource:
    if location is not None:
        raise ValueError(f"hymenoptera is downloaded, not read from {location}: pass it as a folder source")
    if cache_dir is None:
        from kdjax.data import decode_cache

        cache_dir = decode_cache.default_cache_dir()
    return _folder_source(hymenoptera.fetch_hymenoptera(cache_dir / "downloads"), options)


def _records(kind: str, table, options: SourceOptions) -> DataSource:
    from kdjax.data import records, splits

    base = records.RecordSource(table, options.class_names)
    return splits.sliced(base, options.given, options.role_request(), splits.RECORD_DEFAULTS, f"{kind}:{table.name}")


def _tfds(location, cache_dir: pathlib.Path | None, options: SourceOptions) -> DataSource:
    from kdjax.data import tfds_source

    table = tfds_source.open_tfds(location or "", options.tfds_data_dir, options.image_column, options.label_column)
    return _records("tfds", table, options)


def _hf(location, cache_dir: pathlib.Path | None, options: SourceOptions) -> DataSource:
    from kdjax.data import parquet_source

    table = parquet_source.open_parquet(location or "", options.image_column, options.label_column)
    return _records("hf", table, options)


SOURCES: Mapping[str, SourceSpec] = {
    "folder": SourceSpec(
        open=_folder,
        help="folder:PATH, an ImageFolder tree: <root>/<split>/<class>/<image>, torchvision's rules (--data_dir PATH)",
        refuses=("image_column", "label_column", "class_names", "tfds_data_dir")),
    "hymenoptera": SourceSpec(
        open=_hymenoptera,
        help="the ants/bees set of PyTorch's tutorial, downloaded and checked (no --data, no --data_dir)",
        refuses=("image_column", "label_column", "class_names", "tfds_data_dir")),
    "tfds": SourceSpec(
        open=_tfds,
        help="tfds:NAME[:VERSION], a tensorflow-datasets dataset already prepared under --tfds_data_dir, read "
             "without TensorFlow"),
    "hf": SourceSpec(
        open=_hf,
        help="hf:DIR or hf:OWNER/NAME, a Hugging Face dataset's Parquet files (data/<split>-*.parquet) in a folder "
             "or in the hub cache",
        refuses=("tfds_data_dir",)),
}


def parse_spec(spec: str) -> tuple[str, str | None]:
    """``--data SPEC`` -> (kind, location): ``KIND:LOCATION`` for a kind of ``SOURCES``, or
    ``hymenoptera``; a ``ValueError`` listing the forms otherwise."""
    kind, sep, location = str(spec).partition(":")
    if kind == "hymenoptera" and not location:
        return kind, None
    if sep and kind in SOURCES:
        return kind, location
    hint = f" (a folder: --data folder:{spec})" if os.path.isdir(os.path.expanduser(str(spec))) else ""
    raise ValueError(f"--data {spec!r}: not a data spec{hint}; write one of: "
                     + "; ".join(entry.help for entry in SOURCES.values()))


def data_spec(data: str | None, data_dir: os.PathLike | str | None) -> str | None:
    """The spec of ``--data`` or of ``--data_dir DIR`` (``folder:DIR``); None when neither is
    given (hymenoptera). Both given is a ``ValueError``."""
    if data is not None and data_dir is not None:
        raise ValueError(f"--data {data} and --data_dir {data_dir} both name the data: pass one (--data_dir DIR is "
                         "--data folder:DIR)")
    return data if data is not None else None if data_dir is None else f"folder:{os.fspath(data_dir)}"


def parse_class_names(text: str | None) -> tuple[str, ...] | None:
    """``--class_names a,b,c`` -> ``("a", "b", "c")`` (None stays None)."""
    if text is None:
        return None
    names = tuple(name.strip() for name in str(text).split(","))
    if not all(names):
        raise ValueError(f"--class_names {text!r}: give the names separated by commas, none empty (e.g. cat,dog)")
    return names


def options_from_flags(args, roles=None) -> SourceOptions:
    """The ``SourceOptions`` of the data flags (``kdjax.cli.flags.add_data_flags``) held by
    ``args``, reading the roles ``roles`` (a ``splits.RoleRequest``; None: training's)."""
    return SourceOptions(
        train_split=args.train_split, val_split=args.val_split, test_split=args.test_split, roles=roles,
        image_column=args.image_column, label_column=args.label_column,
        class_names=parse_class_names(args.class_names), tfds_data_dir=args.tfds_data_dir)


def open_data(spec: str | None, cache_dir: os.PathLike | str | None, options: SourceOptions = SourceOptions()
              ) -> DataSource:
    """The source ``--data SPEC`` names (None: hymenoptera, fetched into
    ``<cache_dir>/downloads``, by default ``$KDJAX_CACHE/datasets/downloads``), read as
    ``options`` say. An option its kind has no use for is a ``ValueError``."""
    kind, location = ("hymenoptera", None) if spec is None else parse_spec(spec)
    entry = SOURCES[kind]
    stray = [f"--{name}" for name in entry.refuses if getattr(options, name) is not None]
    if stray:
        verb = "does" if len(stray) == 1 else "do"
        raise ValueError(f"{' and '.join(stray)} {verb} not apply to --data {spec or 'hymenoptera'} ({entry.help}); "
                         "leave it out")
    return entry.open(location, None if cache_dir is None else pathlib.Path(cache_dir), options)


def source_for(
    data_dir: os.PathLike | str | None,
    cache_dir: os.PathLike | str | None,
    splits: Sequence[str] = DEFAULT_SPLITS,
    extensions: Sequence[str] = IMG_EXTENSIONS,
) -> DataSource:
    """The source ``--data_dir`` names: ``None`` is hymenoptera, fetched into
    ``<cache_dir>/downloads`` (``cache_dir`` is needed then only), anything else an ImageFolder
    tree. ``splits`` must be there; a ``test/`` split is added where the tree has one."""
    if data_dir is not None:
        return folder.open_folder(data_dir, splits, extensions)
    if cache_dir is None:
        raise ValueError("hymenoptera (no --data_dir) is downloaded into <cache_dir>/downloads: pass a cache_dir")
    return folder.open_folder(hymenoptera.fetch_hymenoptera(pathlib.Path(cache_dir) / "downloads"), splits, extensions)
