"""Reading an ImageFolder tree (``root/split/class/image``) the way torchvision's ImageFolder does.

Classes are the sorted sub-folder names of a split, files are listed in torchvision's order
(sorted ``os.walk`` inside each class folder, links followed), and only torchvision's image
extensions count, case-insensitively. Everything else under a split is reported, never silently
dropped: structural problems raise ``DataError`` naming the folder, unsupported files are counted
in a one-line notice. ``open_folder`` gives a scanned tree as a data source (``FolderSource``,
see ``kdjax.data.sources``), identified by its content (``tree_digest``) or, cheaply, by its
files' names, sizes and mtimes (``tree_fingerprint``).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import os
import pathlib
from typing import Callable, Mapping, Sequence

from PIL import Image

from kdjax.data import transforms
from kdjax.fetch import sha256_file

# torchvision.datasets.folder.IMG_EXTENSIONS; `.gif` is deliberately absent (the seed's 244).
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
DEFAULT_SPLITS = ("train", "val")
# read when the folder is there: a held-out split that model selection never looks at
OPTIONAL_SPLITS = ("test",)


class DataError(ValueError):
    """The input folder is not a usable ImageFolder tree; the message says where and what to do."""


@dataclasses.dataclass(frozen=True)
class FolderIndex:
    """What a scan found. Paths are relative to ``root`` with ``/`` separators."""

    root: pathlib.Path
    class_names: tuple[str, ...]
    # split -> ((relative path, label), ...) in torchvision's order
    files: Mapping[str, tuple[tuple[str, int], ...]]
    # files under a split that are not read: unsupported extension or not inside a class folder
    ignored: tuple[str, ...]


def _has_image_extension(name: str, extensions: Sequence[str]) -> bool:
    return name.lower().endswith(tuple(e.lower() for e in extensions))


def _rel(path: str, root: pathlib.Path) -> str:
    return pathlib.Path(path).relative_to(root).as_posix()


def scan_image_folder(
    root: os.PathLike | str,
    splits: Sequence[str] = DEFAULT_SPLITS,
    extensions: Sequence[str] = IMG_EXTENSIONS,
    optional: Sequence[str] = OPTIONAL_SPLITS,
) -> FolderIndex:
    """List ``root``'s splits, classes and images; raise ``DataError`` on a malformed tree.

    ``optional`` splits (a held-out ``test/``) are read where their folder exists, under the same
    rules as the others."""
    root = pathlib.Path(root).expanduser().absolute()
    if not root.is_dir():
        raise DataError(
            f"data folder {root} does not exist or is not a folder. Pass --data_dir pointing at "
            f"an ImageFolder tree ({'/'.join(('<root>', splits[0], '<class>', '<image>'))}), or "
            "omit --data_dir to download hymenoptera."
        )
    missing = [s for s in splits if not (root / s).is_dir()]
    if missing:
        present = sorted(e.name for e in os.scandir(root) if e.is_dir())
        raise DataError(
            f"data folder {root} has no split folder {', '.join(repr(s) for s in missing)} "
            f"(found folders: {present or 'none'}). Expected {', '.join(splits)} side by side, "
            "each holding one sub-folder per class."
        )

    splits = tuple(splits) + tuple(s for s in optional if s not in splits and (root / s).is_dir())
    classes_per_split = {
        s: sorted(e.name for e in os.scandir(root / s) if e.is_dir()) for s in splits
    }
    for s, classes in classes_per_split.items():
        if not classes:
            raise DataError(
                f"split folder {root / s} has no class sub-folders; put each class's images in "
                f"{root / s}/<class name>/."
            )
    all_classes = sorted(set().union(*classes_per_split.values()))
    gaps = []
    for c in all_classes:
        lacking = [s for s in splits if c not in classes_per_split[s]]
        if lacking:
            having = [s for s in splits if s not in lacking]
            gaps.append(f"{c!r} is in {', '.join(having)} but not in {', '.join(lacking)}")
    if gaps:
        raise DataError(
            f"data folder {root}: every split needs the same class folders (labels are their sorted names), "
            f"but class folder {'; '.join(gaps)}. Add the missing folders or remove the extra ones."
        )

    class_to_label = {c: i for i, c in enumerate(all_classes)}
    files: dict[str, tuple[tuple[str, int], ...]] = {}
    ignored: list[str] = []
    for s in splits:
        split_dir = root / s
        # Files lying directly in a split folder have no class: torchvision skips them silently.
        ignored += sorted(_rel(e.path, root) for e in os.scandir(split_dir) if e.is_file())
        entries: list[tuple[str, int]] = []
        for c in all_classes:
            class_dir = split_dir / c
            found = 0
            for dirpath, _, fnames in sorted(os.walk(class_dir, followlinks=True)):
                for fname in sorted(fnames):
                    rel = _rel(os.path.join(dirpath, fname), root)
                    if _has_image_extension(fname, extensions):
                        entries.append((rel, class_to_label[c]))
                        found += 1
                    else:
                        ignored.append(rel)
            if not found:
                raise DataError(
                    f"class folder {class_dir} holds no image with a supported extension "
                    f"({' '.join(extensions)}, any case); add images or remove the folder "
                    "(from every split)."
                )
        files[s] = tuple(entries)
    return FolderIndex(root, tuple(all_classes), files, tuple(ignored))


def ignored_notice(index: FolderIndex) -> str | None:
    """One line counting the files a scan left out, by extension, or ``None`` if there are none."""
    if not index.ignored:
        return None
    by_ext = collections.Counter(
        pathlib.PurePosixPath(p).suffix.lower() or "(no extension)" for p in index.ignored
    )
    kinds = ", ".join(f"{n} {ext}" for ext, n in sorted(by_ext.items()))
    return (
        f"ignored {len(index.ignored)} file(s) under {index.root} that torchvision's ImageFolder "
        f"does not read (by extension: {kinds}; e.g. {index.ignored[0]})"
    )


def _tree_files(root: pathlib.Path) -> list[str]:
    return [os.path.join(d, f) for d, _, fnames in os.walk(root, followlinks=True) for f in fnames]


def tree_digest(root: os.PathLike | str, progress: Callable[[int], object] | None = None) -> str:
    """SHA-256 over the sorted (relative path, SHA-256 of bytes) of every file under ``root``.

    Independent of timestamps, permissions and the order the file system lists entries in, so
    it identifies a tree's content: an added, removed, renamed or edited file changes it. Reads
    every byte; ``progress(n)`` is called per file hashed.
    """
    root = pathlib.Path(root)
    entries = []
    for path in _tree_files(root):
        entries.append((_rel(path, root), sha256_file(path)))
        if progress is not None:
            progress(1)
    digest = hashlib.sha256()
    for rel, sha in sorted(entries):
        digest.update(f"{rel}\0{sha}\n".encode())
    return digest.hexdigest()


def tree_fingerprint(root: os.PathLike | str) -> tuple[str, int, int]:
    """SHA-256 over the sorted (relative path, size, modification time in ns) of every file under
    ``root``, the number of files and their bytes: what a warm start reads instead of the bytes.

    It changes when a file is added, removed, renamed, resized or rewritten (a new mtime); an
    edit that keeps both size and mtime (``touch -r``, some copy tools) is only seen by
    ``tree_digest`` (``--verify_data``). A copied tree has new mtimes, so a new fingerprint.
    """
    root = pathlib.Path(root)
    entries = []
    for path in _tree_files(root):
        st = os.stat(path)
        entries.append((_rel(path, root), st.st_size, st.st_mtime_ns))
    digest = hashlib.sha256()
    for rel, size, mtime in sorted(entries):
        digest.update(f"{rel}\0{size}\0{mtime}\n".encode())
    return digest.hexdigest(), len(entries), sum(size for _, size, _ in entries)


@dataclasses.dataclass(frozen=True)
class FolderSource:
    """A scanned ImageFolder tree as a data source (``kdjax.data.sources.DataSource``): examples
    are named by their path relative to ``root``, read with ``transforms.load_rgb`` and
    identified by the tree's content."""

    index: FolderIndex
    extensions: tuple[str, ...]  # the image extensions the scan read: part of the cache key

    @property
    def root(self) -> pathlib.Path:
        return self.index.root

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.index.class_names

    @property
    def examples(self) -> Mapping[str, tuple[tuple[str, int], ...]]:
        return self.index.files

    @property
    def split_names(self) -> tuple[str, ...]:
        return tuple(self.index.files)

    @property
    def shard_lengths(self) -> Mapping[str, tuple[int, ...]]:
        """Split -> its number of files, as one shard (what ``kdjax.data.splits`` slices)."""
        return {split: (len(entries),) for split, entries in self.index.files.items()}

    def location(self, name: str) -> str:
        """Where the example ``name`` lies, as messages (and ``read``'s errors) name it."""
        return str(self.root / name)

    def read(self, name: str) -> Image.Image:
        """The example's full decode in RGB; raises ``transforms.ImageReadError`` naming its file."""
        return transforms.load_rgb(self.root / name)

    def key_fields(self) -> dict:
        """What the decode cache's key holds of the source besides its content digest."""
        return {"splits": list(self.index.files), "extensions": sorted(e.lower() for e in self.extensions)}

    def fingerprint(self) -> tuple[str, int, int]:
        """``tree_fingerprint``: one ``stat`` per file, no byte read."""
        return tree_fingerprint(self.root)

    def digest(self, progress: Callable[[int], object] | None = None) -> str:
        """``tree_digest``: every file's bytes."""
        return tree_digest(self.root, progress)

    def notice(self) -> str | None:
        """``ignored_notice``: what the scan left out, in one line."""
        return ignored_notice(self.index)


def open_folder(
    root: os.PathLike | str,
    splits: Sequence[str] = DEFAULT_SPLITS,
    extensions: Sequence[str] = IMG_EXTENSIONS,
) -> FolderSource:
    """The ImageFolder tree ``root`` as a data source: ``scan_image_folder``'s splits (``test/``
    too where it exists), classes and files; raises ``DataError`` on a malformed tree."""
    return FolderSource(scan_image_folder(root, splits, extensions), tuple(extensions))
