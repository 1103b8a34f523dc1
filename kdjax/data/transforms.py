"""Host-side image transforms that reproduce torchvision's evaluation pipeline exactly.

``eval_view`` is ``Resize(resize_size)`` (shorter side, PIL bilinear, which antialiases) followed
by ``CenterCrop(image_size)``, on a PIL image already converted to RGB the way torchvision's
``default_loader`` does. ``normalize`` is ``ToTensor`` + ``Normalize`` with ImageNet statistics,
in NHWC. The training augmentation runs on the device and lives in ``kdjax.data.augment``.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageReadError(ValueError):
    """An image file could not be decoded; the message names the file."""


def resize_size_for(image_size: int) -> int:
    """The Resize() side paired with a crop, in torchvision's 256/224 proportion."""
    return image_size * 256 // 224


def load_rgb(path: os.PathLike) -> Image.Image:
    """Decode ``path`` fully and convert it to RGB (greyscale, CMYK, palette and alpha included).

    Raises ``ImageReadError`` naming the file for empty, truncated or non-image files.
    """
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            img.load()  # decode now: a truncated JPEG must fail here, not later
            return img.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ImageReadError(f"{path}: cannot read image ({err})") from err


_PIL_FILTERS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}


def resize_shorter(img: Image.Image, size: int, interpolation: str = "bilinear") -> Image.Image:
    """torchvision ``Resize(size, interpolation)`` of a PIL image for an int size: shorter side
    to ``size``, aspect kept."""
    if interpolation not in _PIL_FILTERS:
        raise ValueError(f"interpolation {interpolation!r}: expected one of {sorted(_PIL_FILTERS)}")
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    if short == size:
        return img
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    return img.resize((new_w, new_h), _PIL_FILTERS[interpolation])


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """torchvision ``CenterCrop(size)`` (the input is assumed at least ``size`` on each side)."""
    w, h = img.size
    if w < size or h < size:
        raise ValueError(f"center_crop: image {w}x{h} is smaller than the crop {size}")
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def eval_view(img: Image.Image, image_size: int = 224, resize_size: int | None = None,
              interpolation: str = "bilinear") -> np.ndarray:
    """The evaluation view as uint8 ``[image_size, image_size, 3]``."""
    resize_size = resize_size_for(image_size) if resize_size is None else resize_size
    return np.asarray(center_crop(resize_shorter(img, resize_size, interpolation), image_size), dtype=np.uint8)


def normalize(images: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """uint8 NHWC (or HWC) -> float32, ``(x / 255 - mean) / std`` as ToTensor + Normalize."""
    x = np.asarray(images, dtype=np.float32) / 255.0
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
