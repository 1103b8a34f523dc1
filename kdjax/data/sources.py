"""Where a dataset comes from, before anything is decoded: a data source, and the registry of the
kinds kdjax reads.

A ``DataSource`` holds its examples per split (each a name unique in its split and an integer
label), reads one example's image, and identifies itself for the decode cache's key
(``kdjax.data.decode_cache``): ``fingerprint`` is the cheap identity a warm start looks up,
``digest`` the content identity the key is made of, and ``key_fields`` what else about the source
changes what is decoded. ``decode_cache.prepare`` decodes a source; ``batches.load_splits``
loads one.

``SOURCES`` maps a kind's name to how a source of that kind is opened; ``source_for`` turns
``--data_dir`` into a source: none means hymenoptera (downloaded into ``<cache_dir>/downloads``),
a folder means an ImageFolder tree. Both are ``folder.FolderSource``s. Adding a kind touches its
own module, one entry here and a test.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Callable, Mapping, Protocol, Sequence

from PIL import Image

from kdjax.data import folder, hymenoptera
from kdjax.data.folder import DEFAULT_SPLITS, IMG_EXTENSIONS


class DataSource(Protocol):
    """A dataset before decoding (``folder.FolderSource`` is the one member today)."""

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
class SourceSpec:
    """A kind of data source: ``open(location, cache_dir, splits, extensions)`` -> a
    ``DataSource`` of its ``splits`` (``location``: what ``--data_dir`` names, None for a
    downloaded set; ``cache_dir``: where downloads go, under ``downloads/``)."""

    open: Callable[[os.PathLike | str | None, pathlib.Path | None, Sequence[str], Sequence[str]], DataSource]
    help: str


def _hymenoptera(location, cache_dir: pathlib.Path | None, splits: Sequence[str],
                 extensions: Sequence[str]) -> DataSource:
    if location is not None:
        raise ValueError(f"hymenoptera is downloaded, not read from {location}: pass it as a folder source")
    return folder.open_folder(hymenoptera.fetch_hymenoptera(cache_dir / "downloads"), splits, extensions)


SOURCES: Mapping[str, SourceSpec] = {
    "folder": SourceSpec(
        open=lambda location, cache_dir, splits, extensions: folder.open_folder(location, splits, extensions),
        help="an ImageFolder tree at --data_dir: <root>/<split>/<class>/<image>, torchvision's rules"),
    "hymenoptera": SourceSpec(
        open=_hymenoptera,
        help="the ants/bees set of PyTorch's tutorial, downloaded and checked (no --data_dir)"),
}


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
        return SOURCES["folder"].open(data_dir, None, splits, extensions)
    if cache_dir is None:
        raise ValueError("hymenoptera (no --data_dir) is downloaded into <cache_dir>/downloads: pass a cache_dir")
    return SOURCES["hymenoptera"].open(None, pathlib.Path(cache_dir), splits, extensions)
