"""A smaller copy of an ImageFolder tree for the GPU machine, whose carried tree is capped at 64 MiB.

Every JPEG whose shorter side exceeds ``--short_side`` (256) is resized the way torchvision's
``Resize(256)`` sizes it (shorter side 256, longer side truncated; PIL bilinear, antialiased) and
re-encoded as a JPEG; every other file (smaller JPEGs, hymenoptera's ``.gif``) is copied byte for
byte, under the same relative path and name.

What this changes, and why it is acceptable for timing only:

- evaluation views (``Resize(256)`` + ``CenterCrop(224)``): the same geometry, since the resize
  is the one the pipeline does first, but cut from a re-encoded JPEG (quality 95: pixel values
  move by a few units);
- training crops: ``RandomResizedCrop`` draws its box in the source image's coordinates, so on
  the copy a box covers the same share of the picture but holds fewer source pixels; a small
  crop of a large photo is upsampled from the copy where it was downsampled from the original.

Speed is unaffected (every view is 224 px either way, and the decode cache is built once), but
accuracies from the copy are not comparable with full-size runs.

    python -m benchmarks.prepare_gpu_data SRC DEST [--short_side 256] [--quality 95]
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import sys
from typing import Sequence

from PIL import Image

JPEG_SUFFIXES = (".jpg", ".jpeg")


def resized_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """torchvision's ``Resize(short_side)`` output size for a PIL image: the shorter side becomes
    ``short_side`` and the longer one ``int(short_side * long / short)``."""
    if width <= height:
        return short_side, int(short_side * height / width)
    return int(short_side * width / height), short_side


def shrink_file(src: pathlib.Path, dest: pathlib.Path, short_side: int, quality: int) -> bool:
    """Write ``src`` to ``dest``, resized if it is a JPEG larger than ``short_side``; returns
    whether it was resized."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if src.suffix.lower() in JPEG_SUFFIXES:
        with Image.open(src) as img:
            if min(img.size) > short_side:
                rgb = img.convert("RGB")  # what torchvision's and kdjax's loaders decode to
                rgb.resize(resized_size(*rgb.size, short_side), Image.BILINEAR).save(
                    dest, format="JPEG", quality=quality
                )
                return True
    shutil.copyfile(src, dest)
    return False


def shrink_tree(src: pathlib.Path, dest: pathlib.Path, short_side: int = 256, quality: int = 95) -> dict:
    """Copy the tree ``src`` to ``dest`` (which must not exist yet) through ``shrink_file``.
    Returns counts and byte totals of both trees."""
    src, dest = pathlib.Path(src), pathlib.Path(dest)
    if not src.is_dir():
        raise ValueError(f"SRC {src} is not a directory")
    if dest.exists():
        raise ValueError(f"DEST {dest} already exists; remove it first")
    files = sorted(p for p in src.rglob("*") if p.is_file())
    resized = sum(shrink_file(p, dest / p.relative_to(src), short_side, quality) for p in files)
    return {
        "files": len(files),
        "resized": resized,
        "src_bytes": sum(p.stat().st_size for p in files),
        "dest_bytes": sum(p.stat().st_size for p in dest.rglob("*") if p.is_file()),
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.prepare_gpu_data", description=__doc__.split("\n")[0])
    p.add_argument("src", type=pathlib.Path, help="ImageFolder root (train/, val/)")
    p.add_argument("dest", type=pathlib.Path, help="where the copy goes, e.g. .gpu/data/hymenoptera_data")
    p.add_argument("--short_side", type=int, default=256)
    p.add_argument("--quality", type=int, default=95, help="JPEG quality of resized files")
    args = p.parse_args(argv)
    try:
        stats = shrink_tree(args.src, args.dest, args.short_side, args.quality)
    except (ValueError, OSError) as err:
        print(f"prepare_gpu_data: error: {err}", file=sys.stderr)
        return 2
    print(f"{stats['files']} files, {stats['resized']} resized: "
          f"{stats['src_bytes'] / 2**20:.1f} MiB -> {stats['dest_bytes'] / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
