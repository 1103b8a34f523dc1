"""timm's batch-level regularisers on the device: RandomErasing (``timm.data.random_erasing``) and
Mixup / CutMix (``timm.data.mixup.Mixup``), as pure functions of a JAX key.

Both act on normalised float images ``[B, H, W, C]`` (NHWC), after Normalize, where timm applies
them. The draws follow timm's rules in distribution (JAX keys, not numpy's or Python's
generators); given the same draws the results are timm's to the last bit: the float32 products
go through ``kdjax.data.randaugment.rounded_mul`` so that XLA's multiply-add fusion cannot move
a rounding, and every quantity timm computes in float32 (elem and pair modes) or in doubles
(batch mode) is rounded here as it is there (``tests/test_mixing.py`` lists the exceptions).

Padding: the last batch of an epoch is padded (``mask`` False on the padding). Mixing pairs the
*real* rows the way timm pairs a batch: the k-th real row with the k-th real row from the end
(timm's ``flip(0)`` of the real rows), so a full batch is exactly timm's, and a padded batch is
timm's Mixup of its real rows alone. Padding rows, and the middle real row of an odd count
(which would pair with itself), are left unmixed with their own one-hot targets.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from kdjax.data.randaugment import rounded_div, rounded_fma, rounded_mul

# ----------------------------------------------------------------------------- random erasing


@dataclasses.dataclass(frozen=True)
class ErasingConfig:
    """timm ``RandomErasing``'s settings and defaults, except ``mode``: "pixel" (per-pixel normal
    noise) here, "rand" (one normal colour per box) and "const" (zeros) as in timm."""

    min_area: float = 0.02
    max_area: float = 1 / 3
    min_aspect: float = 0.3
    max_aspect: float | None = None  # None: 1 / min_aspect
    mode: str = "pixel"
    min_count: int = 1
    max_count: int | None = None  # None: min_count
    attempts: int = 10  # timm's fixed number of tries per box

    def __post_init__(self):
        if self.mode not in ("pixel", "rand", "const"):
            raise ValueError(f"erasing mode must be 'pixel', 'rand' or 'const', got {self.mode!r}")
        if self.max_aspect is None:
            object.__setattr__(self, "max_aspect", 1 / self.min_aspect)
        if self.max_count is None:
            object.__setattr__(self, "max_count", self.min_count)
        if not 1 <= self.min_count <= self.max_count:
            raise ValueError(f"erasing counts need 1 <= min_count <= max_count, got {self.min_count}, {self.max_count}")


def sample_erasing(key, height: int, width: int, probability, config: ErasingConfig = ErasingConfig()):
    """timm's ``_erase`` draws for one image: int32 ``[max_count, 4]`` boxes (top, left, h, w),
    zeros where no box is erased.

    The image is erased with ``probability`` (``random() <= p``), with ``count`` boxes (uniform
    in [min_count, max_count]); a box tries ``attempts`` times: area uniform in [min_area,
    max_area] * H * W / count, log aspect uniform, h = round(sqrt(area * aspect)), w =
    round(sqrt(area / aspect)), kept at the first try with h < H and w < W, then top and left
    uniform over the positions that fit. All tries are drawn at once; taking the first that fits
    is the sequential rule's distribution.
    """
    k_apply, k_count, k_area, k_aspect, k_top, k_left = jax.random.split(key, 6)
    shape = (config.max_count, config.attempts)
    count = jax.random.randint(k_count, (), config.min_count, config.max_count + 1)
    area = jax.random.uniform(k_area, shape, minval=config.min_area, maxval=config.max_area)
    area = area * (height * width) / count.astype(jnp.float32)
    log_aspect = (math.log(config.min_aspect), math.log(config.max_aspect))
    aspect = jnp.exp(jax.random.uniform(k_aspect, shape, minval=log_aspect[0], maxval=log_aspect[1]))
    hs = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
    ws = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
    fits = (ws < width) & (hs < height)
    first = jnp.argmax(fits, axis=1)[:, None]
    h = jnp.take_along_axis(hs, first, axis=1)[:, 0]
    w = jnp.take_along_axis(ws, first, axis=1)[:, 0]
    top = jax.random.randint(k_top, (config.max_count,), 0, height - h + 1)
    left = jax.random.randint(k_left, (config.max_count,), 0, width - w + 1)
    erase = jax.random.uniform(k_apply) <= probability
    active = erase & jnp.any(fits, axis=1) & (jnp.arange(config.max_count) < count)
    return jnp.where(active[:, None], jnp.stack([top, left, h, w], axis=1), 0)


def erase(image, boxes, noise):
    """``image`` [H, W, C] with each box of ``boxes`` (from ``sample_erasing``, later ones on top)
    set to ``noise``: [H, W, C] ("pixel": the box shows its part), or [max_count, C] (a colour per
    box: "rand", "const")."""
    rows = jnp.arange(image.shape[0])[:, None]
    cols = jnp.arange(image.shape[1])[None, :]
    for b in range(boxes.shape[0]):
        top, left, h, w = boxes[b]
        inside = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
        fill = noise if noise.ndim == 3 else noise[b]
        image = jnp.where(inside[..., None], fill, image)
    return image


def random_erasing(key, images, probability=0.5, config: ErasingConfig = ErasingConfig()):
    """timm's ``RandomErasing(probability, ..., device=...)(images)`` on normalised float images
    [H, W, C], or [B, H, W, C] with one key per image (``kdjax.data.augment.example_key``).

    ``key`` splits into the box draws (``sample_erasing``) and the noise: N(0, 1) per pixel and
    channel ("pixel"), per box and channel ("rand"), or zeros ("const").
    """
    if images.ndim == 4:
        if key.shape != images.shape[:1]:
            raise ValueError(f"a batch of {images.shape[0]} images needs one key per image, got keys "
                             f"of shape {key.shape}")
        return jax.vmap(lambda k, im: random_erasing(k, im, probability, config))(key, images)
    height, width, channels = images.shape
    k_box, k_noise = jax.random.split(key)
    boxes = sample_erasing(k_box, height, width, probability, config)
    if config.mode == "pixel":
        noise = jax.random.normal(k_noise, images.shape, images.dtype)
    elif config.mode == "rand":
        noise = jax.random.normal(k_noise, (config.max_count, channels), images.dtype)
    else:
        noise = jnp.zeros((config.max_count, channels), images.dtype)
    return erase(images, boxes, noise)


# ----------------------------------------------------------------------------- mixup and cutmix


@dataclasses.dataclass(frozen=True)
class MixupConfig:
    """timm ``Mixup``'s arguments and defaults (``prob`` is its mix_prob)."""

    mixup_alpha: float = 1.0
    cutmix_alpha: float = 0.0
    cutmix_minmax: tuple[float, float] | None = None
    prob: float = 1.0
    switch_prob: float = 0.5
    mode: str = "batch"
    correct_lam: bool = True
    label_smoothing: float = 0.1
    num_classes: int = 1000

    def __post_init__(self):
        if self.mode not in ("batch", "pair", "elem"):
            raise ValueError(f"mixup mode must be 'batch', 'pair' or 'elem', got {self.mode!r}")
        if self.cutmix_minmax is not None:
            if len(self.cutmix_minmax) != 2:
                raise ValueError(f"cutmix_minmax must be (min, max), got {self.cutmix_minmax!r}")
            object.__setattr__(self, "cutmix_minmax", tuple(float(v) for v in self.cutmix_minmax))
            object.__setattr__(self, "cutmix_alpha", 1.0)  # timm forces it when minmax is set
        if self.mixup_alpha < 0 or self.cutmix_alpha < 0 or max(self.mixup_alpha, self.cutmix_alpha) == 0:
            raise ValueError(f"mixup needs mixup_alpha > 0 or cutmix_alpha > 0 (or cutmix_minmax), got "
                             f"{self.mixup_alpha} and {self.cutmix_alpha}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")


class MixParams(NamedTuple):
    """What each row got. The draws: lam ~ Beta (1 where the row is not mixed) and the box's
    anchor (timm's randint draws: the centre (cy, cx), or (yl, xl) with cutmix_minmax). What
    follows from them: the row's weight ``lam`` on itself (after the cutmix correction), its
    partner's weight (timm's ``1 - lam``, rounded as timm rounds it), whether a box was pasted
    (else a blend, or nothing where ``lam == 1``), the box rows [yl, yh) x cols [xl, xh), and the
    partner row."""

    lam_drawn: jax.Array  # float32 [B]
    anchor: jax.Array  # int32 [B, 2]
    lam: jax.Array  # float32 [B]
    partner_weight: jax.Array  # float32 [B]
    cutmix: jax.Array  # bool [B]
    box: jax.Array  # int32 [B, 4]: yl, yh, xl, xh
    partner: jax.Array  # int32 [B]


def _pairing(mask):
    """Each real row's partner (the real rows flipped, timm's ``flip(0)``), padding with itself,
    and each row's rank among the real rows."""
    mask = jnp.asarray(mask, bool)
    rank = jnp.cumsum(mask) - 1
    real = mask.sum()
    order = jnp.argsort(~mask, stable=True)  # the real rows first, in order
    partner = jnp.where(mask, order[jnp.clip(real - 1 - rank, 0, mask.shape[0] - 1)], jnp.arange(mask.shape[0]))
    return partner.astype(jnp.int32), jnp.clip(rank, 0), real


def _cut_side(side: int, lam, exact_double: bool):
    """timm's ``int(side * sqrt(1 - lam))``: in float32 (elem, pair) or, in batch mode, in doubles,
    which is the exact floor: the largest k with k^2 <= side^2 (1 - lam), decided exactly."""
    approx = jnp.floor(side * jnp.sqrt(1.0 - lam)).astype(jnp.int32)
    if not exact_double:
        return approx
    square = jnp.float32(side * side)

    def fits(k):  # sign of side^2 * lam - (side^2 - k^2), exactly
        return rounded_fma(square, lam, (k * k - side * side).astype(jnp.float32)) <= 0

    return jnp.where(fits(approx + 1), approx + 1, jnp.where(fits(approx), approx, approx - 1))


def _boxes(keys, lam, height: int, width: int, config: MixupConfig):
    """timm's ``rand_bbox`` (or ``rand_bbox_minmax``) per draw: the anchors int32 [N, 2] and the
    boxes int32 [N, 4] (yl, yh, xl, xh)."""
    n = lam.shape[0]
    if config.cutmix_minmax is None:
        cut_h = _cut_side(height, lam, config.mode == "batch")
        cut_w = _cut_side(width, lam, config.mode == "batch")
        cy = jax.random.randint(keys[0], (n,), 0, height)
        cx = jax.random.randint(keys[1], (n,), 0, width)
        box = [jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + (cut_h + 1) // 2, 0, height),
               jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + (cut_w + 1) // 2, 0, width)]
        return jnp.stack([cy, cx], axis=1), jnp.stack(box, axis=1)
    lo, hi = config.cutmix_minmax
    bounds = [(int(height * lo), int(height * hi)), (int(width * lo), int(width * hi))]
    if any(a >= b for a, b in bounds):
        raise ValueError(f"cutmix_minmax {config.cutmix_minmax} leaves no box size for {height}x{width} images")
    cut_h = jax.random.randint(keys[2], (n,), *bounds[0])
    cut_w = jax.random.randint(keys[3], (n,), *bounds[1])
    yl = jax.random.randint(keys[0], (n,), 0, height - cut_h + 1)
    xl = jax.random.randint(keys[1], (n,), 0, width - cut_w + 1)
    return jnp.stack([yl, xl], axis=1), jnp.stack([yl, yl + cut_h, xl, xl + cut_w], axis=1)


def sample_mix(key, mask, height: int, width: int, config: MixupConfig, alphas=None) -> MixParams:
    """timm's draws (``_params_per_batch`` / ``_params_per_elem``, then the boxes) for a batch
    whose real rows are ``mask``: one draw per batch, per real row (elem) or per pair of real
    rows (pair); a draw mixes with probability ``prob``, by cutmix with ``switch_prob`` when
    both alphas are on, with lam ~ Beta(alpha, alpha) of the chosen one. ``alphas``: the
    (mixup, cutmix) alphas as traced values, replacing the config's (which then only say which
    mixing is on), so runs that differ in them share one compilation."""
    partner, rank, real = _pairing(mask)
    size = partner.shape[0]
    keys = jax.random.split(key, 8)
    mixes = jax.random.uniform(keys[0], (size,)) < config.prob
    if config.mixup_alpha > 0 and config.cutmix_alpha > 0:
        cutmix = jax.random.uniform(keys[1], (size,)) < config.switch_prob
    else:
        cutmix = jnp.full((size,), config.cutmix_alpha > 0)
    # Beta(a, a) = G1 / (G1 + G2) for G1, G2 ~ Gamma(a), in logs (small alphas underflow G), all
    # four gammas from one call (the gamma sampler is slow to compile); an alpha of 0 is unused
    if alphas is None:
        alphas = jnp.asarray([config.cutmix_alpha, config.mixup_alpha], jnp.float32).clip(1.0e-3)
    else:
        alphas = jnp.asarray([alphas[1], alphas[0]], jnp.float32).clip(1.0e-3)
    log_gamma = jax.random.loggamma(keys[2], jnp.broadcast_to(alphas[:, None, None], (2, 2, size)))
    lam_cut, lam_mix = jax.nn.sigmoid(log_gamma[:, 0] - log_gamma[:, 1])
    lam = drawn = jnp.where(mixes, jnp.where(cutmix, lam_cut, lam_mix), 1.0).astype(jnp.float32)
    anchor, box = _boxes(keys[4:8], lam, height, width, config)
    box_area = ((box[:, 1] - box[:, 0]) * (box[:, 3] - box[:, 2])).astype(jnp.float32)
    pixels = jnp.float32(height * width)
    if config.correct_lam or config.cutmix_minmax is not None:
        # 1 - area / (H W) in doubles, then float32: (H W - area) / (H W) rounded once
        lam = jnp.where(cutmix & (drawn != 1.0), rounded_div(pixels - box_area, pixels), lam)
    partner_weight = 1.0 - lam
    if config.mode == "batch" and (config.correct_lam or config.cutmix_minmax is not None):
        # batch mode keeps lam a double: float32(1 - lam) is area / (H W) rounded once
        partner_weight = jnp.where(cutmix & (drawn != 1.0), rounded_div(box_area, pixels), partner_weight)
    slot = {"batch": jnp.zeros_like(rank), "elem": rank, "pair": jnp.minimum(rank, real - 1 - rank)}[config.mode]
    alone = partner == jnp.arange(size)  # padding, or the middle of an odd number of real rows
    lam = jnp.where(alone, 1.0, lam[slot])
    partner_weight = jnp.where(alone, 0.0, partner_weight[slot])
    drawn = jnp.where(alone, 1.0, drawn[slot])
    return MixParams(drawn, anchor[slot], lam, partner_weight, cutmix[slot] & (drawn != 1.0), box[slot], partner)


def mix_images(images, params: MixParams):
    """The mixed batch: ``x * lam + x[partner] * (1 - lam)`` (each product rounded, as torch's
    ``mul`` then ``add``) where a row blends, ``x[partner]`` inside the box where it cuts."""
    other = images[params.partner]
    lam = params.lam[:, None, None, None]
    blend = rounded_mul(images, lam) + rounded_mul(other, params.partner_weight[:, None, None, None])
    rows = jnp.arange(images.shape[1])[None, :, None]
    cols = jnp.arange(images.shape[2])[None, None, :]
    yl, yh, xl, xh = (params.box[:, i, None, None] for i in range(4))
    inside = (rows >= yl) & (rows < yh) & (cols >= xl) & (cols < xh)
    cut = jnp.where(inside[..., None], other, images)
    out = jnp.where(params.cutmix[:, None, None, None], cut, blend)
    return jnp.where((lam == 1.0), images, out)


def mix_targets(labels, params: MixParams, config: MixupConfig):
    """timm's ``mixup_target``: smoothed one-hot targets (off = eps / C, on = 1 - eps + off, as
    float32) mixed as ``y * lam + y[partner] * (1 - lam)``; float32 [B, num_classes]."""
    off = config.label_smoothing / config.num_classes
    on = 1.0 - config.label_smoothing + off
    y = jnp.where(jax.nn.one_hot(labels, config.num_classes, dtype=bool), jnp.float32(on), jnp.float32(off))
    return (rounded_mul(y, params.lam[:, None])
            + rounded_mul(y[params.partner], params.partner_weight[:, None]))


def mixup(key, images, labels, mask, config: MixupConfig = MixupConfig()):
    """timm's ``Mixup(**config)(images, labels)`` on a batch [B, H, W, C] whose real rows are
    ``mask`` (padding is never mixed in; see the module's docstring). ``key`` is the batch's
    (e.g. from seed, epoch and step). Returns the mixed images, the soft targets [B, C] and the
    draws (``MixParams``)."""
    if images.ndim != 4 or labels.shape != images.shape[:1] or jnp.shape(mask) != images.shape[:1]:
        raise ValueError(f"mixup needs images [B, H, W, C] with labels [B] and mask [B], got {images.shape}, "
                         f"{labels.shape}, {jnp.shape(mask)}")
    params = sample_mix(key, mask, images.shape[1], images.shape[2], config)
    return mix_images(images, params), mix_targets(labels, params, config), params
