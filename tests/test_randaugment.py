"""RandAugment / TrivialAugmentWide against torchvision 0.29's ``transforms.v2``: the magnitude
bins, every op at fixed bins and signs on uint8 images (bit-exact: no bound is needed on XLA:CPU),
the exact float32 helpers the ops rely on, the policies' draws (statistics) and the registry.

What is not bit-exact by construction, and why no test needs a bound here:
- Contrast's mean is the exact integer sum rounded once, torch's while H * W * 255 < 2^24 (images
  up to 256 x 256): past that torch's float32 sum may round; such images are not tested.
- Sharpness rounds its blur in integers: torch's float32 3x3 conv is k / 13 to within 1e-4 and
  k / 13 is never within 1/26 of a half, so both round alike.
- The affine grid repeats torch's float32 steps with single roundings; grid_sample's unnormalise
  step is taken as (g + 1) * (size / 2) - 0.5 (its fused and unfused forms agreed on every
  near-tie probed). Every pixel below matches.
"""

from __future__ import annotations

from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch
import torchvision.transforms.v2 as T
from torchvision.transforms.v2 import InterpolationMode

from kdjax.data import augment, randaugment as ra

TORCHVISION = {"randaugment": T.RandAugment, "trivialaugment_wide": T.TrivialAugmentWide}
SHAPE = (32, 40)
BINS = (0, 1, 9, 15, 20, 30)  # 20: TrivialAugment's 90 degree rotation; 0 and 30: the extremes
P_MIN = 1e-3  # the statistical tests' threshold; their keys are fixed, so each outcome is too


def _images(height, width, seed=0) -> np.ndarray:
    """Random pixels, a smooth ramp, two flat halves (flat channels: AutoContrast's and
    Equalize's special cases) and a narrow range (AutoContrast's large gains)."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, height * width * 3).reshape(height, width, 3).astype(np.uint8)
    halves = np.full((height, width, 3), 77, np.uint8)
    halves[: height // 2] = 200
    return np.stack([rng.integers(0, 256, (height, width, 3), np.uint8), ramp, halves,
                     rng.integers(100, 140, (height, width, 3), np.uint8)])


def _torchvision_op(space, op, image, magnitude_bin, negate, fill):
    """torchvision's own op at the magnitude its ``forward`` picks for this bin and sign."""
    policy = TORCHVISION[space](fill=None if fill is None else list(fill))
    height, width = image.shape[:2]
    table = policy._AUGMENTATION_SPACE[op][0](31, height, width)
    magnitude = 0.0 if table is None else float(table[magnitude_bin])
    if negate and policy._AUGMENTATION_SPACE[op][1]:
        magnitude *= -1
    x = torch.from_numpy(image).permute(2, 0, 1).contiguous()
    out = policy._apply_image_or_video_transform(x, op, magnitude, interpolation=InterpolationMode.NEAREST,
                                                 fill=policy._fill)
    return out.permute(1, 2, 0).numpy()


@pytest.mark.parametrize("num_bins", [31, 10, 2])
@pytest.mark.parametrize("space", sorted(TORCHVISION))
def test_magnitude_bins_match_torchvision(space, num_bins):
    table = TORCHVISION[space]._AUGMENTATION_SPACE
    for height, width in [SHAPE, (224, 224), (57, 31)]:
        for op in ra.OPS:
            theirs = table[op][0](num_bins, height, width)
            ours = ra.magnitudes(op, space, num_bins, height, width)
            assert (ours is None) == (theirs is None), op
            if theirs is not None:
                np.testing.assert_array_equal(ours, theirs.double().numpy(), err_msg=f"{op} {height}x{width}")
    assert {op for op in ra.OPS if table[op][1]} == ra.SIGNED


_apply = jax.jit(ra.apply_op, static_argnums=(1, 4))


def _check_op(op, space, fill, shape=SHAPE, bins=BINS):
    images = _images(*shape)
    cases = [(i, b, n) for i in range(len(images)) for b in bins for n in (False, True)]
    settings = ra.OpSettings(space, 31, 0.0 if fill is None else fill)
    ours = np.asarray(_apply(jnp.asarray(images[[i for i, _, _ in cases]]), op,
                             jnp.asarray([b for _, b, _ in cases]), jnp.asarray([n for _, _, n in cases]), settings))
    for k, (i, b, n) in enumerate(cases):
        theirs = _torchvision_op(space, op, images[i], b, n, fill)
        np.testing.assert_array_equal(ours[k], theirs, err_msg=f"{op} {space} image {i} bin {b} negate {n}")


@pytest.mark.parametrize("op", ["ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"])
def test_geometric_ops_match_torchvision_exactly(op):
    """The affine ops at both policies' ranges, with the default fill and a per-channel one
    (127.5 rounds half to even, as torch's round_)."""
    _check_op(op, "randaugment", None)
    _check_op(op, "trivialaugment_wide", (10.0, 127.5, 255.0))


def test_rotations_by_quarter_turns_take_torchvision_fast_paths():
    """TrivialAugment's bin 20 is 90 degrees: a square image goes through torch.rot90, a
    non-square one through the affine grid; 180 degrees would flip both axes."""
    _check_op("Rotate", "trivialaugment_wide", None, shape=(33, 33), bins=(0, 20, 30))


@pytest.mark.parametrize("op", ["Brightness", "Color", "Contrast", "Sharpness"])
def test_blending_ops_match_torchvision_exactly(op):
    """clamp(x * r + y * (1 - r)).to(uint8) with torch's fused multiply-add: a plain float32
    blend differs from torch in ~0.1% of the (x, y) pairs."""
    _check_op(op, "randaugment", None)
    _check_op(op, "trivialaugment_wide", None)


@pytest.mark.parametrize("op", ["Identity", "Posterize", "Solarize", "AutoContrast", "Equalize"])
def test_other_ops_match_torchvision_exactly(op):
    _check_op(op, "randaugment", None)
    _check_op(op, "trivialaugment_wide", None, bins=(0, 5, 30))


def test_op_index_may_be_traced_and_per_image():
    images = jnp.asarray(_images(*SHAPE))
    ops = jnp.asarray([ra.OPS.index(o) for o in ("Equalize", "Rotate", "Color", "Solarize")])
    settings = ra.OpSettings("trivialaugment_wide")
    traced = jax.jit(lambda im, o: ra.apply_op(im, o, 7, True, settings))(images, ops)
    for k in range(4):
        single = _apply(images[k], ra.OPS[int(ops[k])], 7, True, settings)
        np.testing.assert_array_equal(traced[k], single)


def _round(value: Fraction) -> np.float32:
    """An exact rational rounded once to float32 (to nearest, ties to even)."""
    near = np.float32(float(value))
    candidates = [np.nextafter(near, np.float32(-np.inf)), near, np.nextafter(near, np.float32(np.inf))]
    return min(candidates, key=lambda f: (abs(Fraction(float(f)) - value), int(np.array(f).view(np.int32)) & 1))


def test_rounded_arithmetic_rounds_once_whatever_xla_fuses():
    """XLA fuses ``a * b + c`` into an FMA (and a division by a broadcast into a reciprocal
    multiply) as it likes; the helpers give the single IEEE rounding. Cases near midpoints."""
    rng = np.random.default_rng(0)
    n = 3000
    a = rng.uniform(-300, 300, n).astype(np.float32)
    b = (rng.uniform(-2, 2, n) * 2.0 ** rng.integers(-20, 3, n)).astype(np.float32)
    near_integer = (rng.integers(-300, 300, n) - a.astype(np.float64) * b).astype(np.float32)
    c = np.where(rng.random(n) < 0.7, near_integer, rng.uniform(-500, 500, n).astype(np.float32))
    fma = np.asarray(jax.jit(ra.rounded_fma)(a, b, c))
    assert all(fma[i] == _round(Fraction(float(a[i])) * Fraction(float(b[i])) + Fraction(float(c[i])))
               for i in range(n))
    x, y = (rng.uniform(-1, 1, (2, n)) * 2.0 ** rng.integers(-30, 9, (2, n))).astype(np.float32)
    z = np.where(rng.random(n) < 0.5, (-(x.astype(np.float64) + y)).astype(np.float32), c * 2.0**-20)
    total = np.asarray(jax.jit(ra.rounded_sum3)(x, y, z))
    assert all(total[i] == _round(sum(Fraction(float(v[i])) for v in (x, y, z))) for i in range(n))
    np.testing.assert_array_equal(np.asarray(jax.jit(ra.rounded_mul)(a, b)), a * b)
    numerators = rng.integers(0, 256 * 1280, n).astype(np.float32)
    quotient = jax.jit(lambda x, d: ra.rounded_div(x, jnp.broadcast_to(d, x.shape)))(numerators, np.float32(1280))
    np.testing.assert_array_equal(np.asarray(quotient), numerators / np.float32(1280))


# ----------------------------------------------------------------------------- policies


def _draws(spec, n, seed=0):
    keys = jax.random.split(jax.random.key(seed), n)
    return [np.asarray(v).reshape(-1) for v in jax.jit(jax.vmap(spec.sample))(keys)]


def _torchvision_draws(policy, n, seed=0):
    """(op, magnitude) pairs torchvision's ``forward`` applies, recorded in place of the op."""
    seen = []
    policy._apply_image_or_video_transform = lambda image, op, magnitude, **_: seen.append((op, magnitude)) or image
    torch.manual_seed(seed)
    image = torch.zeros(3, 4, 4, dtype=torch.uint8)
    for _ in range(n):
        policy(image)
    return seen


def _contingency_p(ours, theirs) -> float:
    """Chi-square p of "both samples come from one categorical distribution"."""
    cats = sorted(set(ours) | set(theirs))
    table = np.array([[ours.count(c) for c in cats], [theirs.count(c) for c in cats]])
    return scipy.stats.chi2_contingency(table).pvalue


def test_rand_augment_draws_as_torchvision():
    """Op uniform over the 14 (chi-square against uniform and against torchvision's own draws),
    a signed op negated with probability 1/2, the bin fixed: magnitude bin 9 each time."""
    spec = ra.AUGMENTS["randaugment"]
    op, magnitude_bin, negate = _draws(spec, 3000)
    assert (magnitude_bin == 9).all() and op.shape == (6000,)
    assert scipy.stats.chisquare(np.bincount(op, minlength=14)).pvalue > P_MIN
    signed = np.isin(op, [ra.OPS.index(o) for o in ra.SIGNED])
    assert not negate[~signed].any()
    assert scipy.stats.binomtest(int(negate[signed].sum()), int(signed.sum())).pvalue > P_MIN
    theirs = _torchvision_draws(T.RandAugment(), 3000)
    ours = [(ra.OPS[o], bool(s)) for o, s in zip(op, negate)]
    assert _contingency_p(ours, [(o, m < 0) for o, m in theirs]) > P_MIN


def test_trivial_augment_draws_as_torchvision():
    """One op per image, uniform; its bin uniform over 31; the sign as RandAugment's."""
    spec = ra.AUGMENTS["trivialaugment"]
    op, magnitude_bin, negate = _draws(spec, 6000, seed=1)
    assert scipy.stats.chisquare(np.bincount(op, minlength=14)).pvalue > P_MIN
    assert scipy.stats.chisquare(np.bincount(magnitude_bin, minlength=31)).pvalue > P_MIN
    signed = np.isin(op, [ra.OPS.index(o) for o in ra.SIGNED])
    assert scipy.stats.binomtest(int(negate[signed].sum()), int(signed.sum())).pvalue > P_MIN
    theirs = _torchvision_draws(T.TrivialAugmentWide(), 3000, seed=1)
    # bin 0 is magnitude 0, whose sign torchvision's record cannot show
    ours = [(ra.OPS[o], bool(s) and b != 0) for o, s, b in zip(op[:3000], negate[:3000], magnitude_bin[:3000])]
    assert _contingency_p(ours, [(o, m < 0) for o, m in theirs]) > P_MIN
    # torchvision's bin, read back from the magnitude, against ours (ops with a magnitude only)
    rotate = ra.magnitudes("Rotate", "trivialaugment_wide", 31, 4, 4)
    their_bins = [int(np.argmin(np.abs(rotate - abs(m)))) for o, m in theirs if o == "Rotate"]
    our_bins = list(magnitude_bin[op == ra.OPS.index("Rotate")])
    assert _contingency_p(our_bins, their_bins) > P_MIN


def test_policy_applies_its_draws_and_depends_only_on_the_example_key():
    # a policy of three cheap-to-compile ops: the mechanics are those of the registry's entries
    spec = ra.AugmentSpec("test", ops=("Rotate", "Posterize", "Solarize"), num_ops=2, magnitude=None)
    images = jnp.asarray(_images(*SHAPE))
    keys = jax.vmap(lambda i: augment.example_key(3, 1, i))(jnp.arange(4))
    run = jax.jit(spec.apply)
    views = np.asarray(run(keys, images))
    for k in range(4):
        draws = spec.sample(keys[k])
        expected = images[k]
        for op, b, n in zip(*draws):
            expected = _apply(expected, ra.OPS[int(op)], b, n, ra.OpSettings())
        np.testing.assert_array_equal(views[k], expected)
    np.testing.assert_array_equal(np.asarray(run(keys[::-2], images[::-2])), views[::-2])  # any batch


def test_registry_entries_declare_their_policy():
    assert set(ra.AUGMENTS) == {"none", "randaugment", "trivialaugment"}
    rand, trivial = ra.AUGMENTS["randaugment"], ra.AUGMENTS["trivialaugment"]
    assert (rand.ops, rand.num_ops, rand.magnitude, rand.num_magnitude_bins) == (ra.OPS, 2, 9, 31)
    assert (trivial.num_ops, trivial.magnitude, trivial.space) == (1, None, "trivialaugment_wide")
    images = jnp.asarray(_images(*SHAPE))
    keys = jax.random.split(jax.random.key(0), 4)
    np.testing.assert_array_equal(ra.AUGMENTS["none"].apply(keys, images), images)
    with pytest.raises(ValueError, match="one key per image"):
        ra.AUGMENTS["none"].apply(keys[0], images)
    with pytest.raises(ValueError, match="magnitude must be a bin"):
        ra.AugmentSpec("x", ra.OPS, 2, magnitude=31)
    with pytest.raises(ValueError, match="unknown"):
        ra.AugmentSpec("x", ("Invert",), 1)
    with pytest.raises(ValueError, match="fill"):
        ra.OpSettings(fill=(1.0, 2.0))
