"""torchvision's training view in JAX, on whole batches: RandomResizedCrop, RandomHorizontalFlip,
ToTensor + Normalize.

The crop box is drawn with torchvision's rule (``RandomResizedCrop.get_params``) in the pixel
coordinates of the ORIGINAL image, then mapped onto the cached (possibly shrunk) image the
device holds; see ``kdjax.data.decode_cache`` for what the cap costs. Resampling reproduces PIL's
bilinear resize of the cropped image (what torchvision runs): a triangle filter widened by the
downscale factor (antialiasing), weights renormalised inside the crop, a horizontal pass rounded
to uint8, then a vertical pass rounded to uint8 (Pillow <= 12's order; Pillow 13 runs the
vertical pass first for some shapes, by an undocumented rule, which moves the intermediate
rounding). For an image stored at full resolution the view therefore equals torchvision's for
the same box to within one grey level, in about 1% of the values. Pixels outside the crop,
including the padding of the fixed-size canvas, get zero weight.

Randomness is counter-based: example ``index`` of epoch ``epoch`` uses
``fold_in(fold_in(key(seed), epoch), index)``, so a view depends on nothing else: not on the
batch it lands in, the number of devices, or whether earlier epochs ran in this process.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from kdjax.data.transforms import IMAGENET_MEAN, IMAGENET_STD

# Pixel sums of up to 255 x weights must stay exact enough to round like PIL: no TF32/bf16.
_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class CropConfig:
    """torchvision ``RandomResizedCrop`` + ``RandomHorizontalFlip`` defaults."""

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    tries: int = 10
    flip_prob: float = 0.5


def example_key(seed, epoch, index) -> jax.Array:
    """The key of one example's view; ``seed``, ``epoch`` and ``index`` may be traced."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), epoch), index)


def sample_crop(key: jax.Array, height, width, config: CropConfig = CropConfig()) -> jax.Array:
    """torchvision ``RandomResizedCrop.get_params`` for an image of ``height`` x ``width``.

    Returns int32 ``[top, left, h, w]``. All ``config.tries`` candidates are drawn at once and
    the first that fits is taken, which is the sequential rule's distribution.
    """
    k_area, k_ratio, k_top, k_left = jax.random.split(key, 4)
    height = jnp.asarray(height, jnp.int32)
    width = jnp.asarray(width, jnp.int32)
    area = (height * width).astype(jnp.float32)
    lo, hi = config.scale
    target_area = area * jax.random.uniform(k_area, (config.tries,), minval=lo, maxval=hi)
    log_r = (math.log(config.ratio[0]), math.log(config.ratio[1]))
    aspect = jnp.exp(jax.random.uniform(k_ratio, (config.tries,), minval=log_r[0], maxval=log_r[1]))
    # round() is half-to-even in both Python and jnp
    ws = jnp.round(jnp.sqrt(target_area * aspect)).astype(jnp.int32)
    hs = jnp.round(jnp.sqrt(target_area / aspect)).astype(jnp.int32)
    fits = (ws > 0) & (ws <= width) & (hs > 0) & (hs <= height)
    first = jnp.argmax(fits)
    w_try, h_try = ws[first], hs[first]
    top_try = jax.random.randint(k_top, (), 0, height - h_try + 1)
    left_try = jax.random.randint(k_left, (), 0, width - w_try + 1)

    # Fallback when no try fits: a central crop, the aspect ratio clamped into ``ratio``.
    rmin, rmax = min(config.ratio), max(config.ratio)
    in_ratio = width.astype(jnp.float32) / height.astype(jnp.float32)
    w_fb = jnp.where(
        in_ratio > rmax, jnp.round(height.astype(jnp.float32) * rmax).astype(jnp.int32), width
    )
    h_fb = jnp.where(
        in_ratio < rmin, jnp.round(width.astype(jnp.float32) / rmin).astype(jnp.int32), height
    )
    found = jnp.any(fits)
    h = jnp.where(found, h_try, h_fb)
    w = jnp.where(found, w_try, w_fb)
    top = jnp.where(found, top_try, (height - h_fb) // 2)
    left = jnp.where(found, left_try, (width - w_fb) // 2)
    return jnp.stack([top, left, h, w]).astype(jnp.int32)


def _axis_weights(out_size: int, start, length, extent, canvas_len: int) -> jax.Array:
    """``[out_size, canvas_len]`` weights of PIL's bilinear resample of ``[start, start+length)``
    along one axis; ``extent`` is the image's true size on this axis, ``canvas_len`` the padded.

    Dense on purpose: two GEMMs per view beat a banded gather of the few taps each output
    needs (measured on this CPU: a 32-image batch at 224 from a 512 canvas took the same time
    or longer with gathers, which XLA runs at ~0.2 G elements/s), and on GPUs GEMMs are free.
    """
    # PIL's tap weight is tri(((p + 0.5) - centre_k) / support) with centre_k = start +
    # (k + 0.5) * length / out and support = max(length / out, 1) (widened when downscaling:
    # the antialias). Scaled by 2 * out, numerator and denominator are exact in float32 for
    # whole-pixel boxes, so the weights carry one rounding, as PIL's double ones nearly do;
    # naive float32 centres (~3e-5 off) flipped the uint8 rounding of ~1% of the pixels.
    pixels = jnp.arange(canvas_len, dtype=jnp.float32)
    twice_k = 2.0 * jnp.arange(out_size, dtype=jnp.float32) + 1.0
    num = (2.0 * pixels + 1.0 - 2.0 * start)[None, :] * out_size - twice_k[:, None] * length
    w = jnp.maximum(0.0, 1.0 - jnp.abs(num) / (2.0 * jnp.maximum(length, float(out_size))))
    # A crop mapped onto a shrunk image may be narrower than one pixel; widen it to one pixel
    # (inside the image) so that every output pixel keeps a source pixel. Pixels outside the
    # crop, which includes the canvas padding, get no weight: PIL resizes the cropped image.
    mid = start + length / 2
    half = jnp.maximum(length, 1.0) / 2
    lo = jnp.clip(mid - half, 0.0, jnp.maximum(extent - 2 * half, 0.0))
    hi = lo + 2 * half
    centres = pixels + 0.5
    w = jnp.where(((centres >= lo) & (centres < hi))[None, :], w, 0.0)
    total = jnp.sum(w, axis=1, keepdims=True)
    return w / jnp.where(total > 0, total, 1.0)


def _round_u8(x: jax.Array) -> jax.Array:
    # PIL adds half and truncates its fixed-point sums: round half up, then clip to uint8.
    return jnp.clip(jnp.floor(x + 0.5), 0.0, 255.0)


def resized_crop(
    canvas: jax.Array, box: jax.Array, size: jax.Array, out_size: int, flip
) -> jax.Array:
    """One view: crop ``box`` (top, left, h, w; float, cached-image pixels) of the image in the
    top-left ``size`` (h, w) corner of ``canvas`` [H, W, 3], resized to ``out_size`` square,
    mirrored if ``flip``. Returns float32 ``[out_size, out_size, 3]`` holding integers 0..255."""
    canvas_h, canvas_w = canvas.shape[:2]
    size = size.astype(jnp.float32)
    wy = _axis_weights(out_size, box[0], box[2], size[0], canvas_h)
    wx = _axis_weights(out_size, box[1], box[3], size[1], canvas_w)
    wx = jnp.where(flip, wx[::-1], wx)  # flipping the resized image = reversing its columns
    x = canvas.astype(jnp.float32)
    # PIL's order: the horizontal pass first, rounded to uint8, then the vertical pass.
    rows = _round_u8(jnp.einsum("yxc,kx->ykc", x, wx, precision=_HIGHEST))
    return _round_u8(jnp.einsum("my,ykc->mkc", wy, rows, precision=_HIGHEST))


def random_view(
    key: jax.Array,
    canvas: jax.Array,
    size: jax.Array,
    orig_size: jax.Array,
    out_size: int,
    config: CropConfig = CropConfig(),
) -> jax.Array:
    """RandomResizedCrop + RandomHorizontalFlip of one cached image, 0..255 float32.

    ``size`` is the cached image's (h, w), ``orig_size`` the source file's: the box is drawn in
    source pixels (torchvision's distribution) and scaled onto the cache.
    """
    k_crop, k_flip = jax.random.split(key)
    top, left, h, w = sample_crop(k_crop, orig_size[0], orig_size[1], config)
    to_cache = size.astype(jnp.float32) / orig_size.astype(jnp.float32)
    box = jnp.stack([top * to_cache[0], left * to_cache[1], h * to_cache[0], w * to_cache[1]])
    flip = jax.random.bernoulli(k_flip, config.flip_prob)
    return resized_crop(canvas, box, size, out_size, flip)


def pad_crop_view(key: jax.Array, canvas: jax.Array, size: jax.Array, out_size: int, padding: int,
                  flip_prob: float = 0.5) -> jax.Array:
    """RandomCrop(out_size, padding) + RandomHorizontalFlip of one cached image (``--crop pad``,
    the CIFAR recipe), 0..255 float32 ``[out_size, out_size, 3]``.

    As torchvision: the image (the top-left ``size`` (h, w) of ``canvas``) is padded by
    ``padding`` zeros on every side and a window of ``out_size`` is taken at a uniform offset,
    ``top`` in ``[0, h + 2 * padding - out_size]`` (``RandomCrop.get_params``), the same for
    ``left``; pixels outside the image read 0 (torchvision's ``fill=0``). An image smaller than
    the window after padding keeps its top-left corner (torchvision raises; here the rest is 0).
    """
    k_crop, k_flip = jax.random.split(key)
    k_top, k_left = jax.random.split(k_crop)
    h, w = size[0].astype(jnp.int32), size[1].astype(jnp.int32)
    top = jax.random.randint(k_top, (), 0, jnp.maximum(h + 2 * padding - out_size, 0) + 1)
    left = jax.random.randint(k_left, (), 0, jnp.maximum(w + 2 * padding - out_size, 0) + 1)
    rows = jnp.arange(out_size) + top - padding  # source pixel of each output row / column
    cols = jnp.arange(out_size) + left - padding
    inside = ((rows >= 0) & (rows < h))[:, None] & ((cols >= 0) & (cols < w))[None, :]
    canvas_h, canvas_w = canvas.shape[:2]
    picked = canvas[jnp.clip(rows, 0, canvas_h - 1)][:, jnp.clip(cols, 0, canvas_w - 1)]
    view = jnp.where(inside[:, :, None], picked.astype(jnp.float32), 0.0)
    return jnp.where(jax.random.bernoulli(k_flip, flip_prob), view[:, ::-1], view)


@dataclasses.dataclass(frozen=True)
class View:
    """How a network sees a batch when it differs from the canonical one (``normalize``'s
    ImageNet statistics at the batch's size): its input side and its Normalize() statistics."""

    size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


def as_view(x: jax.Array, view: View | None) -> jax.Array:
    """A canonical (``normalize``d) float batch ``[B, s, s, 3]`` as the network of ``view``
    sees the same crop: renormalised with its statistics and, where its side differs, resized
    (bilinear, antialiased when shrinking, as torchvision's tensor ``Resize``). ``None``: as is."""
    if view is None:
        return x
    if (view.mean, view.std) != (IMAGENET_MEAN, IMAGENET_STD):
        x = x * jnp.asarray(IMAGENET_STD, x.dtype) + jnp.asarray(IMAGENET_MEAN, x.dtype)
        x = (x - jnp.asarray(view.mean, x.dtype)) / jnp.asarray(view.std, x.dtype)
    if x.shape[1:3] != (view.size, view.size):
        x = jax.image.resize(x, (x.shape[0], view.size, view.size, x.shape[3]), "bilinear", antialias=True)
    return x


def normalize(images: jax.Array) -> jax.Array:
    """0..255 values -> ``(x / 255 - mean) / std`` float32, as ToTensor + Normalize (NHWC)."""
    x = images.astype(jnp.float32) / 255.0
    return (x - jnp.asarray(IMAGENET_MEAN, jnp.float32)) / jnp.asarray(IMAGENET_STD, jnp.float32)


def train_views(
    seed,
    epoch,
    indices: jax.Array,
    canvas: jax.Array,
    sizes: jax.Array,
    orig_sizes: jax.Array,
    out_size: int,
    config: CropConfig = CropConfig(),
) -> jax.Array:
    """Normalised training views ``[B, out_size, out_size, 3]`` of the examples ``indices``
    (dataset positions, which seed their keys) whose cached images are ``canvas`` [B, H, W, 3]."""
    keys = jax.vmap(lambda i: example_key(seed, epoch, i))(indices)
    views = jax.vmap(random_view, in_axes=(0, 0, 0, 0, None, None))(
        keys, canvas, sizes, orig_sizes, out_size, config
    )
    return normalize(views)
