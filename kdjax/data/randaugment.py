"""torchvision's RandAugment and TrivialAugmentWide on the device, op by op as torchvision 0.29's
``transforms.v2`` computes them on uint8 tensors (nearest interpolation, its default).

Images are uint8 ``[H, W, 3]`` (NHWC) or batches ``[B, H, W, 3]``. Each op takes a magnitude
*bin* and a sign: the bins are torchvision's ``_AUGMENTATION_SPACE`` tables (``magnitudes``),
rebuilt on the host with torch's float32 ``linspace`` arithmetic, so bin ``k`` is the value
torchvision picks, and everything torchvision derives from it in Python doubles (factors,
thresholds, affine matrices) is derived here on the host too, into one float32 row per (op, bin,
sign). On the device an op then repeats torch's float32 operations, each rounded where torch
rounds it: blends are ``clamp(x * r + y * (1 - r))`` with torch's fused multiply-add,
truncated to uint8; Sharpness blends with the 3x3 kernel [[1,1,1],[1,5,1],[1,1,1]] / 13 and leaves
the border untouched; the affine ops build torch's ``_affine_grid`` (its bmm: ``x * a``, then a
fused ``+ y * b``, then ``+ c``) and sample it as ``grid_sample(nearest, align_corners=False)``.

XLA fuses a multiply into a following add (an FMA) where it likes and turns a division by a
broadcast value into a multiplication by its reciprocal, which moves roundings; so the float
arithmetic goes through ``rounded_mul`` / ``rounded_fma`` / ``rounded_sum3`` / ``rounded_div``,
which give the IEEE single rounding whatever XLA rewrites: products are made exact (integer
significands, or a factor cut into 12-bit halves), sums use Knuth's TwoSum and Boldo &
Melquiond's sum of three numbers with rounding to odd (IEEE Trans. Computers 57(4), 2008), and
quotients are corrected by their exact residual. What stays approximate, and why no bound is
needed, is listed in ``tests/test_randaugment.py``.

Randomness (``AugmentSpec.sample``): the op is uniform over the policy's ops, a signed op is negated with
probability 0.5 (``rand <= 0.5``) and TrivialAugment's bin is uniform, as torchvision draws them,
from a JAX key the caller derives from (seed, epoch, example). Under ``vmap`` XLA evaluates every
op of the policy for every image and selects (a batched ``lax.switch``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

OPS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
       "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize")
SIGNED = frozenset({"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
                    "Contrast", "Sharpness"})
_ROW = 7  # float32 parameters per (op, bin, sign)
_F32 = np.float32


@dataclasses.dataclass(frozen=True)
class _Space:
    """The magnitude ranges of one torchvision policy (``_AUGMENTATION_SPACE``)."""

    shear: float
    translate: float | None  # None: 150/331 of the image side (RandAugment)
    rotate: float
    color: float  # Brightness, Color, Contrast, Sharpness
    posterize_div: float  # bits = round(8 - k / ((num_bins - 1) / posterize_div))


SPACES = {
    "randaugment": _Space(shear=0.3, translate=None, rotate=30.0, color=0.9, posterize_div=4),
    "trivialaugment_wide": _Space(shear=0.99, translate=32.0, rotate=135.0, color=0.99, posterize_div=6),
}


@dataclasses.dataclass(frozen=True)
class OpSettings:
    """What an op needs besides its bin and sign: whose magnitude ranges, how many bins, and the
    fill of pixels the geometric ops bring in from outside (one value or one per channel)."""

    space: str = "randaugment"
    num_magnitude_bins: int = 31
    fill: float | tuple[float, ...] = 0.0

    def __post_init__(self):
        if self.space not in SPACES:
            raise ValueError(f"magnitude space {self.space!r} unknown; choose one of {sorted(SPACES)}")
        if not isinstance(self.num_magnitude_bins, int) or self.num_magnitude_bins < 2:
            raise ValueError(f"num_magnitude_bins must be an int >= 2, got {self.num_magnitude_bins!r}")
        fill = tuple(float(v) for v in np.atleast_1d(self.fill))
        if len(fill) not in (1, 3) or not all(0.0 <= v <= 255.0 for v in fill):
            raise ValueError(f"fill must be one value or three, each in [0, 255], got {self.fill!r}")
        object.__setattr__(self, "fill", fill * 3 if len(fill) == 1 else fill)


# ----------------------------------------------------------------------------- exact float32 arithmetic


def _two_sum(a, b):
    """(s, e) with s = RN(a + b) and s + e = a + b exactly (Knuth)."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def _add_round_odd(a, b):
    """a + b rounded to odd: RN(a + b), moved one ulp towards the exact sum when inexact and even."""
    s, e = _two_sum(a, b)
    bits = lax.bitcast_convert_type(s, jnp.int32)
    towards = jnp.where((e > 0) == (s > 0), 1, -1)  # +1 on the bits: away from zero
    odd = lax.bitcast_convert_type(bits + towards, jnp.float32)
    return jnp.where((e != 0) & ((bits & 1) == 0), odd, s)


def rounded_sum3(a, b, c):
    """a + b + c rounded once to float32 (Boldo & Melquiond's sum of three numbers)."""
    uh, ul = _two_sum(b, c)
    th, tl = _two_sum(a, uh)
    return th + _add_round_odd(tl, ul)


def _significand(v):
    bits = lax.bitcast_convert_type(v, jnp.int32)
    expo = (bits >> 23) & 0xFF
    return jnp.where(expo > 0, (bits & 0x7FFFFF) | 0x800000, 0), expo - 150  # |v| = m * 2^e


def _pow2(k):
    return lax.bitcast_convert_type((jnp.clip(k, -126, 127) + 127) << 23, jnp.float32)


def _exact_product(a, b):
    """a * b = hi + lo exactly, both float32: the 48-bit product of the significands in 12-bit
    pieces (integer arithmetic, nothing rounds). For numbers above 2^-103 whose product is
    above 2^-102 (its low part stays a normal number)."""
    ma, ea = _significand(a)
    mb, eb = _significand(b)
    ah, al, bh, bl = ma >> 12, ma & 0xFFF, mb >> 12, mb & 0xFFF
    cross = ah * bl + al * bh
    low = al * bl + ((cross & 0xFFF) << 12)
    high = ah * bh + (cross >> 12) + (low >> 24)  # < 2^24: the product is below 2^48
    sign = jnp.where((a < 0) != (b < 0), -1.0, 1.0).astype(jnp.float32)
    # scaled by 2^ea, then by 2^eb: every intermediate stays a normal number
    hi = sign * (high.astype(jnp.float32) * _pow2(ea + 24)) * _pow2(eb)
    return hi, sign * ((low & 0xFFFFFF).astype(jnp.float32) * _pow2(ea)) * _pow2(eb)


def rounded_mul(a, b):
    """a * b rounded once to float32, as an IEEE multiply, even where XLA would fuse it into a
    following add."""
    hi, lo = _exact_product(a, b)
    return hi + lo


def _by_short(short, v):
    """short * v = hi + lo exactly, both float32, for ``short`` with at most 12 significant bits
    (an integer below 4096, a half-integer below 2048): ``v`` is cut into its top 12 bits and
    the rest (a bit mask), so both partial products are exact float32 products."""
    top = lax.bitcast_convert_type(lax.bitcast_convert_type(v, jnp.int32) & -4096, jnp.float32)
    return short * top, short * (v - top)


def _mul_short(short, v):
    """RN(short * v) (see ``_by_short``), whatever XLA fuses."""
    hi, lo = _by_short(short, v)
    return hi + lo


def _fma_short(short, v, c):
    """RN(short * v + c), the fused multiply-add (see ``_by_short``)."""
    hi, lo = _by_short(short, v)
    return rounded_sum3(c, hi, lo)


def _neighbour(q, step):
    return lax.bitcast_convert_type(lax.bitcast_convert_type(q, jnp.int32) + step, jnp.float32)


def rounded_div(a, b):
    """a / b rounded once to float32, for a >= 0 and b > 0 (XLA turns a division by a broadcast
    value into a multiplication by its reciprocal): XLA's quotient, corrected twice by one ulp
    where the exact residual a - q * b puts a / b past a midpoint (ties to even)."""
    q = a / b
    for _ in range(2):
        hi, lo = _exact_product(q, b)
        rest = a - hi  # exact: q * b is within a factor 2 of a (Sterbenz)
        up, down = _neighbour(q, 1), _neighbour(q, -1)
        above = rounded_sum3(rest, -lo, -((up - q) * 0.5) * b)  # sign of a - (q + ulp / 2) * b
        below = rounded_sum3(rest, -lo, ((q - down) * 0.5) * b)
        odd = (lax.bitcast_convert_type(q, jnp.int32) & 1) == 1
        q = jnp.where((above > 0) | ((above == 0) & odd), up,
                      jnp.where((below < 0) | ((below == 0) & odd), down, q))
    return jnp.where(a == 0, 0.0, q)


def _floor_rounded_div(a, b):
    """floor(RN(a / b)) for a >= 0, b > 0, as int32: n = round(a / b) if a / b reaches the
    midpoint below n (``a - n * b + b * ulp / 2 >= 0``, exact), else n - 1."""
    n = jnp.round(a / b)
    hi, lo = _by_short(n, b)
    half_ulp = (n - _neighbour(n, -1)) * 0.5
    reaches = rounded_sum3(a - hi, -lo, half_ulp * b) >= 0  # a - hi exact where n >= 1 (Sterbenz)
    return jnp.where(reaches | (n == 0), n, n - 1).astype(jnp.int32)


def rounded_fma(a, b, c):
    """a * b + c rounded once to float32: a fused multiply-add, as torch's vectorised CPU kernels
    compute ``c.add_(a, alpha=b)`` and the float32 bmm."""
    hi, lo = _exact_product(a, b)
    return rounded_sum3(c, hi, lo)


# ----------------------------------------------------------------------------- magnitude tables (host)


def _fma32(a, b, c) -> np.float32:
    # float32 a * b + c rounded once: the product is exact in float64, the sum is for these ranges
    return _F32(np.float64(_F32(a)) * np.float64(_F32(b)) + np.float64(_F32(c)))


def _linspace(start: float, end: float, steps: int) -> np.ndarray:
    """torch.linspace(start, end, steps) in float32 as torch's CPU kernel computes it (a float32
    step; start + i * step for the first half, end - (steps - 1 - i) * step after, fused)."""
    s, e = _F32(start), _F32(end)
    step = (e - s) / _F32(steps - 1)
    return np.array([_fma32(i, step, s) if i < steps // 2 else _fma32(-(steps - 1 - i), step, e)
                     for i in range(steps)], np.float32)


def magnitudes(op: str, space: str, num_bins: int, height: int, width: int) -> np.ndarray | None:
    """torchvision's magnitude bins of ``op`` (``_AUGMENTATION_SPACE[op][0](num_bins, height,
    width)``) as float64 values of its float32 (or int) entries; None for ops without one."""
    s = SPACES[space]
    if op in ("ShearX", "ShearY"):
        return _linspace(0.0, s.shear, num_bins).astype(np.float64)
    if op in ("TranslateX", "TranslateY"):
        side = width if op == "TranslateX" else height
        return _linspace(0.0, 150.0 / 331.0 * side if s.translate is None else s.translate, num_bins).astype(float)
    if op == "Rotate":
        return _linspace(0.0, s.rotate, num_bins).astype(np.float64)
    if op in ("Brightness", "Color", "Contrast", "Sharpness"):
        return _linspace(0.0, s.color, num_bins).astype(np.float64)
    if op == "Posterize":
        bits = _F32(8) - np.arange(num_bins, dtype=np.float32) / _F32((num_bins - 1) / s.posterize_div)
        return np.round(bits).astype(np.int32).astype(np.float64)
    if op == "Solarize":
        return _linspace(1.0, 0.0, num_bins).astype(np.float64)
    return None


def _inverse_affine(center, angle, translate, shear) -> list[float]:
    """torchvision's ``_get_inverse_affine_matrix`` (scale 1), in Python doubles as there."""
    rot, sx, sy = math.radians(angle), math.radians(shear[0]), math.radians(shear[1])
    (cx, cy), (tx, ty) = center, translate
    a = math.cos(rot - sy) / math.cos(sy)
    b = -(a * math.tan(sx) + math.sin(rot))
    c = math.sin(rot - sy) / math.cos(sy)
    d = math.cos(rot) - c * math.tan(sx)
    m = [d, -b, 0.0, -c, a, 0.0]
    m[2] += cx - m[0] * (cx + tx) - m[1] * (cy + ty)
    m[5] += cy - m[3] * (cx + tx) - m[4] * (cy + ty)
    return m


# kinds of affine rows: the general grid, or one of rotate_image's exact fast paths
_GRID, _SAME, _ROT180, _ROT90, _ROT270 = range(5)


def _affine_row(op: str, magnitude: float, height: int, width: int) -> list[float]:
    """theta / [w/2, h/2] of torchvision's ``_affine_grid`` (float32, transposed) and the kind."""
    if op == "Rotate":
        angle = magnitude % 360
        fast = {0.0: _SAME, 180.0: _ROT180}
        if height == width:
            fast.update({90.0: _ROT90, 270.0: _ROT270})
        if angle in fast:
            return [0.0] * 6 + [fast[angle]]
        m = _inverse_affine([0.0, 0.0], -angle, [0.0, 0.0], [0.0, 0.0])
    elif op in ("TranslateX", "TranslateY"):
        shift = [int(magnitude), 0] if op == "TranslateX" else [0, int(magnitude)]
        m = _inverse_affine([0.0, 0.0], 0.0, [float(t) for t in shift], [0.0, 0.0])
    else:  # Shear about the top-left corner (center=[0, 0]), by atan(magnitude) in degrees
        shear = math.degrees(math.atan(magnitude))
        m = _inverse_affine([-width * 0.5, -height * 0.5], 0.0, [0.0, 0.0],
                            [shear, 0.0] if op == "ShearX" else [0.0, shear])
    theta = np.asarray(m, np.float32)
    half = (_F32(0.5 * width), _F32(0.5 * height))
    return [theta[0] / half[0], theta[1] / half[0], theta[2] / half[0],
            theta[3] / half[1], theta[4] / half[1], theta[5] / half[1], _GRID]


def _row(op: str, magnitude: float, height: int, width: int) -> list[float]:
    """The float32 parameters an op's kernel reads for one signed magnitude."""
    if op in ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"):
        return _affine_row(op, magnitude, height, width)
    if op == "Brightness":
        return [_F32(1.0 + magnitude)]
    if op in ("Color", "Contrast"):
        ratio = 1.0 + magnitude
        return [_F32(ratio), _F32(1.0 - ratio)]
    if op == "Sharpness":
        return [_F32(1.0 - (1.0 + magnitude))]
    if op == "Posterize":
        bits = int(magnitude)
        return [0xFF if bits >= 8 else ((1 << bits) - 1) << (8 - bits)]
    if op == "Solarize":
        return [_F32(255.0 * magnitude)]
    return []


@functools.lru_cache(maxsize=64)
def _rows(op: str, settings: OpSettings, height: int, width: int) -> np.ndarray:
    """float32 ``[num_bins, 2, _ROW]``: the row of each bin, unsigned and negated."""
    table = np.zeros((settings.num_magnitude_bins, 2, _ROW), np.float32)
    values = magnitudes(op, settings.space, settings.num_magnitude_bins, height, width)
    for k in range(settings.num_magnitude_bins if values is not None else 0):
        for negate in (0, 1):
            signed = -values[k] if negate and op in SIGNED else values[k]
            row = _row(op, float(signed), height, width)
            table[k, negate, : len(row)] = row
    return table


# ----------------------------------------------------------------------------- the ops (one image)


def _to_uint8(x):
    """torch's ``clamp_(0, 255).to(uint8)``: truncation of a value in [0, 255]."""
    return jnp.floor(jnp.clip(x, 0.0, 255.0)).astype(jnp.uint8)


def _identity(image, row, fill):
    return image


def _affine(image, row, fill):
    """torchvision's ``affine_image`` / ``rotate_image`` with nearest sampling and ``fill``."""
    h, w, c = image.shape
    x = (jnp.arange(w, dtype=jnp.float32) - (w - 1) / 2)[None, :]  # the base grid: half-integers
    y = (jnp.arange(h, dtype=jnp.float32) - (h - 1) / 2)[:, None]

    def source(r0, r1, r2, size):
        # the bmm [x, y, 1] @ theta': x * r0, then fused + y * r1, then + r2; grid_sample
        # (align_corners=False) reads pixel (g + 1) * size / 2 - 0.5, rounded half to even
        g = _fma_short(y, r1, _mul_short(x, r0)) + r2
        return jnp.round(_mul_short(jnp.float32(size / 2), g + 1.0) - 0.5)

    ix, iy = source(row[0], row[1], row[2], w), source(row[3], row[4], row[5], h)
    inside = (ix >= 0) & (ix <= w - 1) & (iy >= 0) & (iy <= h - 1)
    flat = (jnp.clip(iy, 0, h - 1) * w + jnp.clip(ix, 0, w - 1)).astype(jnp.int32)
    out = jnp.where(inside[..., None], image.reshape(h * w, c)[flat], fill)
    kind = row[6]
    out = jnp.where(kind == _SAME, image, out)
    out = jnp.where(kind == _ROT180, jnp.rot90(image, 2, axes=(0, 1)), out)
    if h == w:  # torch.rot90(dims=(-2, -1)) is numpy's rot90 over (H, W)
        out = jnp.where(kind == _ROT90, jnp.rot90(image, 1, axes=(0, 1)), out)
        out = jnp.where(kind == _ROT270, jnp.rot90(image, 3, axes=(0, 1)), out)
    return out


def _brightness(image, row, fill):
    return _to_uint8(_mul_short(image.astype(jnp.float32), row[0]))


def _gray_floor(x):
    """floor of torchvision's grayscale of a float32 image holding 0..255: r * 0.2989, then
    fused + g * 0.587 and + b * 0.114 (``mul`` then ``add_(alpha=)``), as its blends use it."""
    gray = _mul_short(x[..., 0], _F32(0.2989))
    gray = _fma_short(x[..., 1], _F32(0.587), gray)
    return jnp.floor(_fma_short(x[..., 2], _F32(0.114), gray))


def _color(image, row, fill):
    """``adjust_saturation``: ``_blend(image, floor(gray), ratio)``."""
    x = image.astype(jnp.float32)
    gray = _gray_floor(x)[..., None]
    return _to_uint8(_fma_short(gray, row[1], _mul_short(x, row[0])))


def _contrast(image, row, fill):
    """``adjust_contrast``: ``_blend(image, mean(floor(gray)), ratio)``; the mean is the exact
    integer sum / pixels rounded once, which is torch's while the sum stays below 2^24."""
    x = image.astype(jnp.float32)
    total = jnp.sum(_gray_floor(x).astype(jnp.int32)).astype(jnp.float32)
    mean = rounded_div(total, jnp.float32(image.shape[0] * image.shape[1]))
    return _to_uint8(rounded_fma(mean, row[1], _mul_short(x, row[0])))


def _sharpness(image, row, fill):
    """``adjust_sharpness``: the interior blended towards round(conv3x3 / 13) by ``alpha``.

    The blur is ``k / 13`` for an integer ``k``; its fraction is never within 1/26 of a half, so
    torch's float32 conv rounds it to round(k / 13) = (2k + 13) // 26, computed here in integers.
    """
    h, w, _ = image.shape
    if h <= 2 or w <= 2:
        return image
    x = image.astype(jnp.int32)
    k = sum(x[dy : h - 2 + dy, dx : w - 2 + dx] for dy in range(3) for dx in range(3)) + 4 * x[1:-1, 1:-1]
    blurred = (2 * k + 13) // 26
    view = x[1:-1, 1:-1]
    out = _fma_short((blurred - view).astype(jnp.float32), row[0], view.astype(jnp.float32))
    return image.at[1:-1, 1:-1].set(_to_uint8(out))


def _posterize(image, row, fill):
    return image & row[0].astype(jnp.uint8)


def _solarize(image, row, fill):
    """``where(image >= threshold, 255 - image, image)``, the threshold compared in float32."""
    return jnp.where(image.astype(jnp.float32) >= row[0], 255 - image, image)


def _autocontrast(image, row, fill):
    """Per channel ``(x - min) / ((max - min) * (1 / 255))``; a flat channel is left as is."""
    x = image.astype(jnp.float32)
    lo, hi = jnp.min(x, axis=(0, 1)), jnp.max(x, axis=(0, 1))
    flat = hi == lo
    inv_scale = jnp.broadcast_to(jnp.where(flat, 1.0, _mul_short(hi - lo, _F32(1.0 / 255.0))), x.shape)
    return jnp.clip(_floor_rounded_div(x - jnp.where(flat, 0.0, lo), inv_scale), 0, 255).astype(jnp.uint8)


def _equalize(image, row, fill):
    """torchvision's ``equalize_image`` (PIL's scheme), per channel, in integers: with ``step =
    (pixels - count of the last non-empty bin) // 255``, ``lut[k] = (cum[k-1] + step // 2) //
    step`` clamped to 0..255, ``lut[0] = 0``; a channel with ``step == 0`` is left as is."""
    h, w, c = image.shape
    flat = image.reshape(h * w, c).T.astype(jnp.int32)
    hist = jax.vmap(lambda v: jnp.bincount(v, length=256))(flat)
    cum = jnp.cumsum(hist, axis=1)
    last = jnp.argmax(cum, axis=1)
    step = (h * w - jnp.take_along_axis(hist, last[:, None], axis=1)) // 255
    lut = jnp.clip((cum[:, :-1] + step // 2) // jnp.maximum(step, 1), 0, 255)
    lut = jnp.concatenate([jnp.zeros((c, 1), lut.dtype), lut], axis=1)
    out = jnp.where(step != 0, jnp.take_along_axis(lut, flat, axis=1), flat)
    return out.T.reshape(h, w, c).astype(jnp.uint8)


_KERNELS = {
    "Identity": _identity, "ShearX": _affine, "ShearY": _affine, "TranslateX": _affine,
    "TranslateY": _affine, "Rotate": _affine, "Brightness": _brightness, "Color": _color,
    "Contrast": _contrast, "Sharpness": _sharpness, "Posterize": _posterize, "Solarize": _solarize,
    "AutoContrast": _autocontrast, "Equalize": _equalize,
}


# ----------------------------------------------------------------------------- applying ops


def _check_image(image) -> None:
    if image.ndim not in (3, 4) or image.shape[-1] != 3 or image.dtype != jnp.uint8:
        raise ValueError(f"expected uint8 images [H, W, 3] or [B, H, W, 3], got {image.dtype} {image.shape}")


def _switch(image, index, magnitude_bin, negate, ops: tuple[str, ...], settings: OpSettings):
    """``ops[index]`` at the bin and sign on one image; ``index`` may be traced."""
    h, w, _ = image.shape
    table = jnp.asarray(np.stack([_rows(op, settings, h, w) for op in ops]))
    row = table[index, magnitude_bin, jnp.asarray(negate, jnp.int32)]
    fill = jnp.asarray(np.round(np.asarray(settings.fill, np.float32)).astype(np.uint8))
    kernels = list(dict.fromkeys(_KERNELS[op] for op in ops))  # the five affine ops share one
    branches = [functools.partial(kernel, fill=fill) for kernel in kernels]
    if len(branches) == 1:
        return branches[0](image, row)
    which = jnp.asarray([kernels.index(_KERNELS[op]) for op in ops], jnp.int32)[index]
    return lax.switch(which, branches, image, row)


def apply_op(image, op, magnitude_bin, negate, settings: OpSettings = OpSettings()):
    """``op`` (a name of ``OPS``, static, or an int index into ``OPS``, may be traced) at
    ``magnitude_bin`` of ``settings``' space, negated if ``negate`` (signed ops only), as
    torchvision's ``_apply_image_or_video_transform`` with magnitude ``magnitudes(...)[bin]``.
    On a batch the bin, sign and index are per image or shared."""
    _check_image(image)
    if image.ndim == 4:
        batch = image.shape[0]
        args = [jnp.broadcast_to(jnp.asarray(v), (batch,)) for v in (magnitude_bin, negate)]
        if isinstance(op, str):
            return jax.vmap(lambda im, b, n: apply_op(im, op, b, n, settings))(image, *args)
        index = jnp.broadcast_to(jnp.asarray(op), (batch,))
        return jax.vmap(lambda im, i, b, n: apply_op(im, i, b, n, settings))(image, index, *args)
    if isinstance(op, str):
        if op not in OPS:
            raise ValueError(f"unknown op {op!r}; choose one of {OPS}")
        return _switch(image, 0, magnitude_bin, negate, (op,), settings)
    return _switch(image, op, magnitude_bin, negate, OPS, settings)


class Draws(NamedTuple):
    """The ops one image gets, in order: indices into ``OPS``, magnitude bins, negated (signed
    ops only)."""

    op: jax.Array  # int32 [num_ops]
    magnitude_bin: jax.Array  # int32 [num_ops]
    negate: jax.Array  # bool [num_ops]


@dataclasses.dataclass(frozen=True)
class AugmentSpec:
    """An ``--augment`` choice: the ops it draws from (uniformly), how many per image, the
    magnitude bin (None: drawn uniformly per op, TrivialAugment), over how many bins of whose
    ranges (``SPACES``)."""

    help: str
    ops: tuple[str, ...] = ()
    num_ops: int = 0
    magnitude: int | None = None
    num_magnitude_bins: int = 31
    space: str = "randaugment"

    def __post_init__(self):
        unknown = [op for op in self.ops if op not in OPS]
        if unknown or self.num_ops < 0 or (self.num_ops and not self.ops):
            raise ValueError(f"augment spec: ops must come from {OPS} (unknown: {unknown}) and num_ops be "
                             f">= 0 with ops to draw from, got num_ops={self.num_ops}")
        if self.magnitude is not None and not 0 <= self.magnitude < self.num_magnitude_bins:
            raise ValueError(f"magnitude must be a bin in [0, {self.num_magnitude_bins}), got {self.magnitude}")

    def sample(self, key: jax.Array) -> Draws:
        """One image's draws, as torchvision's ``forward`` draws them (in distribution)."""
        k_op, k_bin, k_sign = jax.random.split(key, 3)
        choice = jax.random.randint(k_op, (self.num_ops,), 0, len(self.ops))
        op = jnp.asarray([OPS.index(o) for o in self.ops], jnp.int32)[choice]
        if self.magnitude is None:
            magnitude_bin = jax.random.randint(k_bin, (self.num_ops,), 0, self.num_magnitude_bins)
        else:
            magnitude_bin = jnp.full((self.num_ops,), self.magnitude, jnp.int32)
        signed = jnp.asarray([o in SIGNED for o in OPS])[op]
        return Draws(op, magnitude_bin, signed & (jax.random.uniform(k_sign, (self.num_ops,)) <= 0.5))

    def apply(self, key: jax.Array, image, fill: float | tuple[float, ...] = 0.0):
        """The augmented uint8 image; on a batch ``[B, H, W, 3]``, ``key`` holds one key per image
        (``kdjax.data.augment.example_key``), so a view does not depend on its batch."""
        _check_image(image)
        if image.ndim == 4:
            if key.shape != image.shape[:1]:
                raise ValueError(f"a batch of {image.shape[0]} images needs one key per image, got keys "
                                 f"of shape {key.shape}")
            return jax.vmap(lambda k, im: self.apply(k, im, fill))(key, image)
        if self.num_ops == 0:
            return image
        settings = OpSettings(self.space, self.num_magnitude_bins, fill)
        ops = tuple(dict.fromkeys(self.ops))
        draws = self.sample(key)
        local = jnp.asarray([ops.index(OPS[i]) if OPS[i] in ops else 0 for i in range(len(OPS))])[draws.op]

        def step(img, d):
            return _switch(img, d[0], d[1], d[2], ops, settings), None

        return lax.scan(step, image, (local, draws.magnitude_bin, draws.negate))[0]


AUGMENTS: dict[str, AugmentSpec] = {
    "none": AugmentSpec("no strong augmentation"),
    "randaugment": AugmentSpec(
        "RandAugment (Cubuk et al. 2020): 2 ops per image at bin 9 of 31 (torchvision's defaults)",
        ops=OPS, num_ops=2, magnitude=9),
    "trivialaugment": AugmentSpec(
        "TrivialAugment Wide (Mueller & Hutter 2021): 1 op per image at a uniform bin of 31",
        ops=OPS, num_ops=1, magnitude=None, space="trivialaugment_wide"),
}


def rand_augment(key, image, num_ops: int = 2, magnitude: int = 9, num_magnitude_bins: int = 31,
                 fill: float | tuple[float, ...] = 0.0):
    """torchvision's ``RandAugment(num_ops, magnitude, num_magnitude_bins, fill=fill)``."""
    spec = AugmentSpec("", OPS, num_ops, magnitude, num_magnitude_bins, "randaugment")
    return spec.apply(key, image, fill)


def trivial_augment_wide(key, image, num_magnitude_bins: int = 31, fill: float | tuple[float, ...] = 0.0):
    """torchvision's ``TrivialAugmentWide(num_magnitude_bins, fill=fill)``."""
    spec = AugmentSpec("", OPS, 1, None, num_magnitude_bins, "trivialaugment_wide")
    return spec.apply(key, image, fill)
