"""timm's RandomErasing and Mixup / CutMix against kdjax.data.mixing: the draws by statistics
(fixed keys and seeds, so each outcome is fixed), the results given the same draws bit for bit
(timm's numpy and Python draws replaced by ours).

Not bit-exact by construction: an erase box's side is round(sqrt(area * aspect)) computed in
float32 here, in doubles in timm; given the same draws they differ only where that square root
lies within float32 rounding (~1e-6) of a half, which no test draw comes near. Mixup's boxes and
weights are timm's in every mode (batch mode's double arithmetic is decided exactly).
"""

from __future__ import annotations

import dataclasses
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch
from timm.data import mixup as timm_mixup, random_erasing as timm_erasing

from kdjax.data import mixing

P_MIN = 1e-3
HEIGHT, WIDTH = 32, 40


def _queue(values):
    """A stand-in for numpy's or Python's generator that returns ``values`` in order."""
    values = list(values)

    def draw(*args, **kwargs):
        return values.pop(0)

    return draw, values


# ----------------------------------------------------------------------------- random erasing


def _timm_boxes(n, probability, seed=0):
    """Boxes (top, left, h, w) of timm's RandomErasing on n images, read back from images of
    zeros erased with ones; zeros where it erased nothing."""
    erasing = timm_erasing.RandomErasing(probability, mode="pixel", device="cpu")
    random.seed(seed)
    boxes = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(timm_erasing, "_get_pixels", lambda per_pixel, rand_color, size, **_: torch.ones(size))
        for _ in range(n):
            image = torch.zeros(1, HEIGHT, WIDTH)
            erasing(image)
            rows, cols = np.nonzero(image[0].numpy())
            boxes.append((rows.min(), cols.min(), np.ptp(rows) + 1, np.ptp(cols) + 1) if len(rows) else (0, 0, 0, 0))
    return np.array(boxes)


def test_erasing_boxes_are_drawn_as_timm_draws_them():
    """Erased with probability p; the sides, and the position among those that fit, as timm's
    (two-sample Kolmogorov-Smirnov, 4000 images each)."""
    n, p = 4000, 0.6
    keys = jax.random.split(jax.random.key(0), n)
    ours = np.asarray(jax.jit(jax.vmap(lambda k: mixing.sample_erasing(k, HEIGHT, WIDTH, p)))(keys))[:, 0]
    theirs = _timm_boxes(n, p)
    erased = [b[:, 2] > 0 for b in (ours, theirs)]
    assert scipy.stats.binomtest(int(erased[0].sum()), n, p).pvalue > P_MIN
    assert scipy.stats.binomtest(int(erased[1].sum()), n, p).pvalue > P_MIN
    a, b = ours[erased[0]].astype(float), theirs[erased[1]].astype(float)
    features = {"h": lambda x: x[:, 2], "w": lambda x: x[:, 3], "area": lambda x: x[:, 2] * x[:, 3],
                "top": lambda x: x[:, 0] / np.maximum(HEIGHT - x[:, 2], 1),
                "left": lambda x: x[:, 1] / np.maximum(WIDTH - x[:, 3], 1)}
    for name, f in features.items():
        assert scipy.stats.ks_2samp(f(a), f(b)).pvalue > P_MIN, name
    assert (a[:, 0] + a[:, 2] <= HEIGHT).all() and (a[:, 1] + a[:, 3] <= WIDTH).all()


def test_erase_matches_timm_given_the_box_and_noise():
    """timm's _erase steered to our box (area h * w, aspect h / w) writes our noise there."""
    rng = np.random.default_rng(0)
    image = rng.standard_normal((HEIGHT, WIDTH, 3)).astype(np.float32)
    noise = rng.standard_normal((HEIGHT, WIDTH, 3)).astype(np.float32)
    top, left, h, w = 5, 7, 11, 23
    ours = np.asarray(mixing.erase(jnp.asarray(image), jnp.array([[top, left, h, w]]), jnp.asarray(noise)))
    erasing = timm_erasing.RandomErasing(1.0, mode="pixel", device="cpu")
    x = torch.from_numpy(image.transpose(2, 0, 1).copy())
    patch = noise[top:top + h, left:left + w].transpose(2, 0, 1).copy()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(random, "random", lambda: 0.0)
        mp.setattr(random, "uniform", _queue([h * w / (HEIGHT * WIDTH), np.log(h / w)])[0])
        mp.setattr(random, "randint", _queue([top, left])[0])
        mp.setattr(timm_erasing, "_get_pixels", lambda *a, **k: torch.from_numpy(patch))
        erasing(x)
    np.testing.assert_array_equal(ours, x.numpy().transpose(1, 2, 0))


@pytest.mark.parametrize("mode", ["pixel", "rand", "const"])
def test_random_erasing_replaces_one_box_and_depends_only_on_the_key(mode):
    rng = np.random.default_rng(1)
    images = jnp.asarray(rng.standard_normal((6, HEIGHT, WIDTH, 3)).astype(np.float32))
    keys = jax.random.split(jax.random.key(3), 6)
    config = mixing.ErasingConfig(mode=mode)
    run = jax.jit(lambda k, x: mixing.random_erasing(k, x, 1.0, config))
    out = np.asarray(run(keys, images))
    changed = (out != np.asarray(images)).any(-1)
    for k in range(6):
        rows, cols = np.nonzero(changed[k])
        assert len(rows) > 0  # probability 1: every image is erased (the default sizes always fit)
        assert changed[k, rows.min():rows.max() + 1, cols.min():cols.max() + 1].mean() > 0.9  # one box
        patch = out[k, rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        if mode == "const":
            assert (patch == 0).all()
        elif mode == "rand":
            assert (patch == patch[0, 0]).all()
    np.testing.assert_array_equal(np.asarray(run(keys[::-1], images[::-1])), out[::-1])
    with pytest.raises(ValueError, match="one key per image"):
        mixing.random_erasing(keys[0], images)


# ----------------------------------------------------------------------------- mixup and cutmix

CONFIGS = {
    "mixup": dict(mixup_alpha=0.8),
    "cutmix": dict(mixup_alpha=0.0, cutmix_alpha=1.0),
    "both": dict(mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.8, switch_prob=0.5),
    "minmax": dict(mixup_alpha=0.0, cutmix_minmax=(0.2, 0.8)),
    "uncorrected": dict(mixup_alpha=0.0, cutmix_alpha=1.0, correct_lam=False),
}


def _timm_draws(params, config: mixing.MixupConfig, rows: int):
    """The values timm's Mixup takes from numpy, in its order, for the same draws as ``params``
    on a full batch of ``rows``: switch and mix uniforms, Beta draws, then each box's randints."""
    drawn, cut = np.asarray(params.lam_drawn, np.float64), np.asarray(params.cutmix)
    anchor, box = np.asarray(params.anchor), np.asarray(params.box)
    mixed = drawn != 1.0
    both = config.mixup_alpha > 0 and config.cutmix_alpha > 0

    def box_draws(i):
        if config.cutmix_minmax is None:
            return [anchor[i, 0], anchor[i, 1]]
        return [box[i, 1] - box[i, 0], box[i, 3] - box[i, 2], anchor[i, 0], anchor[i, 1]]

    if config.mode == "batch":
        if not mixed[0]:
            return [0.999]
        switch = [0.0 if cut[0] else 0.999] if both else []
        return [0.0, *switch, float(drawn[0])] + (box_draws(0) if cut[0] else [])
    n = rows if config.mode == "elem" else rows // 2
    switch = np.where(cut[:n], 0.0, 0.999)
    betas = [np.where(cut[:n], drawn[:n], 0.5), np.where(cut[:n], 0.5, drawn[:n])]
    values = ([switch] if both else []) + [b for b, on in zip(betas, (config.cutmix_alpha, config.mixup_alpha)) if on]
    values.append(np.where(mixed[:n], 0.0, 0.999))
    return values + [v for i in range(n) if cut[i] for v in box_draws(i)]


def _timm_mix(images, labels, params, config: mixing.MixupConfig):
    mix = timm_mixup.Mixup(**dataclasses.asdict(config))
    draw, left = _queue(_timm_draws(params, config, len(images)))
    with pytest.MonkeyPatch.context() as mp:
        for name in ("rand", "beta", "randint"):
            mp.setattr(np.random, name, draw)
        x = torch.from_numpy(np.asarray(images).transpose(0, 3, 1, 2).copy())
        x, target = mix(x, torch.from_numpy(np.array(labels)).long())
    assert not left, "timm took fewer draws than the test prepared"
    return x.numpy().transpose(0, 2, 3, 1), target.numpy()


ROWS = 8


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    images = jnp.asarray(rng.standard_normal((ROWS, HEIGHT, WIDTH, 3)).astype(np.float32))
    return images, jnp.asarray(rng.integers(0, 10, ROWS).astype(np.int32))


def _config(kind, mode):
    return mixing.MixupConfig(**CONFIGS[kind], mode=mode, num_classes=10, label_smoothing=0.1)


# one program per config and batch shape, shared by the tests below (compiling is their cost)
_mixup = jax.jit(mixing.mixup, static_argnums=4)


def _draws(config, n, mask=None):
    """MixParams of ``n`` batches (numpy, stacked), from the same program the parity test runs."""
    images, labels = _batch()
    mask = jnp.ones(ROWS, bool) if mask is None else mask
    runs = [_mixup(jax.random.key(1000 + i), images, labels, mask, config)[2] for i in range(n)]
    return mixing.MixParams(*(np.stack([np.asarray(getattr(r, f)) for r in runs]) for f in mixing.MixParams._fields))


@pytest.mark.parametrize("kind,mode", [("both", "batch"), ("both", "pair"), ("both", "elem"), ("mixup", "batch"),
                                       ("cutmix", "elem"), ("minmax", "pair"), ("uncorrected", "batch")])
def test_mixup_matches_timm_bit_for_bit_given_the_draws(kind, mode):
    """Each mode with both methods on (timm's switch), each method alone, cutmix_minmax and
    correct_lam=False; three draws each."""
    config = _config(kind, mode)
    images, labels = _batch()
    for seed in range(3):
        ours, targets, params = _mixup(jax.random.key(seed), images, labels, jnp.ones(ROWS, bool), config)
        theirs, their_targets = _timm_mix(images, labels, params, config)
        np.testing.assert_array_equal(np.asarray(ours), theirs, err_msg=f"seed {seed}")
        np.testing.assert_array_equal(np.asarray(targets), their_targets, err_msg=f"seed {seed}")


@pytest.mark.parametrize("kind,mode", [("both", "batch"), ("cutmix", "elem")])
def test_cutmix_boxes_are_timms_for_their_draws(kind, mode):
    """rand_bbox and the corrected lam from the same lam and centre, over many draws: float32
    sides in elem mode, double ones in batch mode (decided exactly here)."""
    draws = _draws(_config(kind, mode), 150)
    cut = draws.cutmix.reshape(-1)
    lam, corrected = draws.lam_drawn.reshape(-1)[cut], draws.lam.reshape(-1)[cut]
    anchor, box = draws.anchor.reshape(-1, 2)[cut], draws.box.reshape(-1, 4)[cut]
    assert len(lam) > 100
    for k in range(len(lam)):
        value = float(lam[k]) if mode == "batch" else np.float32(lam[k])
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(np.random, "randint", _queue(anchor[k])[0])
            (yl, yh, xl, xh), theirs = timm_mixup.cutmix_bbox_and_lam((HEIGHT, WIDTH), value)
        assert (yl, yh, xl, xh) == tuple(box[k]), k
        assert np.float32(theirs) == corrected[k], k


def test_padding_is_never_mixed_into_real_rows():
    """5 real rows of 8: row k mixes with row 4 - k, the middle row (2) and the padding are
    left alone with their own one-hot targets; the real rows are timm's Mixup of them alone."""
    config = _config("both", "elem")
    images, labels = _batch()
    mask = jnp.arange(ROWS) < 5
    ours, targets, params = _mixup(jax.random.key(1), images, labels, mask, config)
    np.testing.assert_array_equal(np.asarray(params.partner), [4, 3, 2, 1, 0, 5, 6, 7])
    np.testing.assert_array_equal(np.asarray(ours)[[2, 5, 6, 7]], np.asarray(images)[[2, 5, 6, 7]])
    assert (np.asarray(params.lam)[[2, 5, 6, 7]] == 1).all()
    on, off = np.float32(0.9 + 0.01), np.float32(0.01)
    np.testing.assert_array_equal(np.asarray(targets)[5], np.where(np.arange(10) == int(labels[5]), on, off))
    # an even count: the real rows are exactly timm's mix of those rows alone
    mask = jnp.arange(ROWS) < 6
    ours, targets, params = _mixup(jax.random.key(2), images, labels, mask, config)
    real = mixing.MixParams(*(v[:6] for v in params))
    theirs, their_targets = _timm_mix(images[:6], labels[:6], real, config)
    np.testing.assert_array_equal(np.asarray(ours)[:6], theirs)
    np.testing.assert_array_equal(np.asarray(targets)[:6], their_targets)


def test_mixup_draws_follow_timms_distributions():
    """Over 4000 draws (elem mode, both methods: prob 0.8, switch_prob 0.5): mixed with
    probability prob, cutmix with switch_prob, lam ~ Beta(alpha, alpha) of the chosen method
    (one-sample KS against scipy's Beta), box centres uniform (chi-square)."""
    draws = _draws(_config("both", "elem"), 500)
    lam, cut = draws.lam_drawn.reshape(-1), draws.cutmix.reshape(-1)
    mixed = lam != 1.0
    assert scipy.stats.binomtest(int(mixed.sum()), lam.size, 0.8).pvalue > P_MIN
    assert scipy.stats.binomtest(int(cut.sum()), int(mixed.sum()), 0.5).pvalue > P_MIN
    assert scipy.stats.kstest(lam[mixed & ~cut], scipy.stats.beta(0.8, 0.8).cdf).pvalue > P_MIN
    assert scipy.stats.kstest(lam[cut], scipy.stats.beta(1.0, 1.0).cdf).pvalue > P_MIN
    centre = draws.anchor.reshape(-1, 2)[cut]
    assert scipy.stats.chisquare(np.bincount(centre[:, 0], minlength=HEIGHT)).pvalue > P_MIN
    assert scipy.stats.chisquare(np.bincount(centre[:, 1], minlength=WIDTH)).pvalue > P_MIN


def test_configs_fail_fast():
    with pytest.raises(ValueError, match="mixup_alpha > 0 or cutmix_alpha > 0"):
        mixing.MixupConfig(mixup_alpha=0.0)
    with pytest.raises(ValueError, match="mode"):
        mixing.MixupConfig(mode="half")
    with pytest.raises(ValueError, match="erasing mode"):
        mixing.ErasingConfig(mode="noise")
    assert mixing.MixupConfig(cutmix_minmax=[0.2, 0.8]).cutmix_alpha == 1.0  # as timm forces it
