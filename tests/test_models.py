"""kdjax.models computes torchvision's ResNets: logits and BatchNorm updates, eval and train mode.

Tolerance: max |logit difference| <= 1e-4 in float32. Both frameworks accumulate ~10^4-term
convolution sums in float32 in different orders (oneDNN vs XLA), which moves logits of magnitude
~1-10 by 1e-6..1e-5 after 18-50 layers; 1e-4 leaves an order of magnitude of headroom while a
real mistake (a wrong padding, stride, the biased running variance) moves them by >= 1e-2.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import losses, models, weights
from kdjax.models import kernels
from kdjax.models.resnet import BatchNorm
from torch_reference import (
    assert_exports_back,
    images,
    numpy_state_dict,
    running_stats,
    stat_error,
    torch64,
    torch_forward,
    torch_resnet,
)

TOL = 1e-4
# Running variances deep in a ResNet-50 reach ~10^2, where float32 resolves ~1e-5; so the
# statistics are compared relative to their size: |d| / (1 + |value|). A wrong update rule (the
# biased variance, torch's vs flax's momentum) is off by >= 1e-2 in that measure.
STAT_TOL = 1e-5


def flax_running_stats(batch_stats: dict) -> dict[str, np.ndarray]:
    """Flatten flax batch_stats back to torchvision's running_mean / running_var keys (every
    ResNet names its layers alike)."""
    return running_stats("resnet18", batch_stats)


@pytest.mark.parametrize("arch,expected", [("resnet18", 11_177_538), ("resnet50", 23_512_130)])
def test_parameter_counts_match_torchvision(arch, expected):
    params = models.abstract_variables(models.create_model(arch, 2), 64)["params"]
    assert models.count_params(params) == expected
    net = torch_resnet(arch)
    assert sum(p.numel() for p in net.parameters()) == expected


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_eval_logits_match_torchvision_at_224(arch):
    net = torch_resnet(arch).eval()
    variables = weights.to_flax(numpy_state_dict(net), arch)
    x = images(2, 224)
    want = torch_forward(net, x)
    got = np.asarray(models.create_model(arch, 2).apply(variables, jnp.asarray(x), train=False))
    err = np.max(np.abs(got - want))
    print(f"{arch} eval 224: max|dlogit| = {err:.2e} (logit scale {np.max(np.abs(want)):.2f})")
    assert err <= TOL


@pytest.mark.parametrize("arch,size", [("resnet18", 224), ("resnet50", 112)])
def test_train_mode_logits_and_running_stats_match_torchvision(arch, size):
    net = torch_resnet(arch).train()
    variables = weights.to_flax(numpy_state_dict(net), arch)
    x = images(4, size, seed=1)
    want = torch_forward(net, x)  # train mode: batch statistics, running stats updated in place
    got, updates = models.create_model(arch, 2).apply(
        variables, jnp.asarray(x), train=True, mutable=["batch_stats"]
    )
    err = np.max(np.abs(np.asarray(got) - want))
    after = numpy_state_dict(net)
    ours = flax_running_stats(updates["batch_stats"])
    assert set(ours) == {k for k in after if k.endswith(("running_mean", "running_var"))}
    stat_err = stat_error(ours, after)
    print(f"{arch} train {size}: max|dlogit| = {err:.2e}, running stats max rel. err = {stat_err:.2e}")
    assert err <= TOL
    assert stat_err <= STAT_TOL


def test_masked_batch_equals_unpadded_torch_batch():
    """A padded batch with a mask trains BatchNorm exactly like torch on the real examples."""
    arch, size = "resnet18", 64
    net = torch_resnet(arch).train()
    variables = weights.to_flax(numpy_state_dict(net), arch)
    real = images(3, size, seed=2)
    padded = np.concatenate([real, 100.0 * images(2, size, seed=3)])  # garbage padding
    mask = jnp.asarray([1, 1, 1, 0, 0], jnp.float32)
    want = torch_forward(net, real)
    got, updates = models.create_model(arch, 2).apply(
        variables, jnp.asarray(padded), train=True, mask=mask, mutable=["batch_stats"]
    )
    assert np.max(np.abs(np.asarray(got)[:3] - want)) <= TOL
    after, ours = numpy_state_dict(net), flax_running_stats(updates["batch_stats"])
    assert stat_error(ours, after) <= STAT_TOL


def test_bfloat16_compute_keeps_float32_parameters_and_logits():
    model = models.create_model("resnet18", 2, dtype=jnp.bfloat16)
    variables = models.init_variables(model, jax.random.key(0), 32)
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(variables)} == {jnp.dtype(jnp.float32)}
    f32 = models.create_model("resnet18", 2).apply(variables, jnp.asarray(images(2, 32)))
    bf16 = model.apply(variables, jnp.asarray(images(2, 32)))
    assert bf16.dtype == jnp.float32
    # bfloat16 keeps 8 bits of mantissa: logits agree to a few percent, not to 1e-4
    assert np.max(np.abs(np.asarray(bf16) - np.asarray(f32))) < 0.1 * (1 + np.max(np.abs(f32)))


def test_create_model_rejects_unknown_arch():
    with pytest.raises(ValueError, match="vgg999"):
        models.create_model("vgg999", 2)


# --------------------------------------------------------------------------- CPU kernels
# On CPU, train-mode BatchNorm reduces with dots and max-pool has its own gradient
# (kdjax.models explains why). Both must compute torch's function and torch's gradient.


def _torch_batch_norm(x_nhwc, scale, bias, grad_y):
    import torch

    x = torch.tensor(np.moveaxis(x_nhwc, -1, 1), requires_grad=True)
    bn = torch.nn.BatchNorm2d(x.shape[1]).train()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor(scale))
        bn.bias.copy_(torch.tensor(bias))
    y = bn(x)
    y.backward(torch.tensor(np.moveaxis(grad_y, -1, 1)))
    return (np.moveaxis(y.detach().numpy(), 1, -1), np.moveaxis(x.grad.numpy(), 1, -1),
            bn.weight.grad.numpy(), bn.bias.grad.numpy())


def test_cpu_batch_norm_and_its_gradient_match_torch_with_a_mask():
    """Padded examples (mask 0) change neither the real examples' output nor any gradient.
    Tolerance 1e-5 relative to each quantity's scale: float32 sums over 3x7x5 positions in
    different orders differ by ~1e-7; a wrong term of the gradient formula is off by >= 1e-2."""
    rng = np.random.default_rng(0)
    real = (rng.standard_normal((3, 7, 5, 6)) * 3 + 2).astype(np.float32)
    x = np.concatenate([real, 100 * rng.standard_normal((2, 7, 5, 6)).astype(np.float32)])
    scale = rng.uniform(0.5, 1.5, 6).astype(np.float32)
    bias = rng.standard_normal(6).astype(np.float32)
    g = rng.standard_normal(x.shape).astype(np.float32)
    g[3:] = 0  # the loss masks padded examples, so their output gets no gradient
    mask = jnp.asarray([1, 1, 1, 0, 0], jnp.float32)
    weights = mask / (3 * 7 * 5)

    def f(x, s, b):
        return kernels.batch_norm_train(x, s, b, weights)[0]

    y, vjp = jax.vjp(jax.jit(f), jnp.asarray(x), jnp.asarray(scale), jnp.asarray(bias))
    dx, ds, db = vjp(jnp.asarray(g))
    want = _torch_batch_norm(real, scale, bias, g[:3])
    for ours, theirs in zip((np.asarray(y)[:3], np.asarray(dx)[:3], ds, db), want):
        assert np.max(np.abs(np.asarray(ours) - theirs)) <= 1e-5 * (1 + np.max(np.abs(theirs)))
    assert np.all(np.asarray(dx)[3:] == 0)


def test_cpu_batch_norm_vjp_equals_autodiff_of_the_reductions():
    """The hand-written gradient of the dot path (kdjax.models.kernels._batch_norm_by_dot_bwd) against
    jax's autodiff of the plain reductions, cotangents on y, mean and var alike."""
    rng = np.random.default_rng(1)
    x = jnp.asarray((rng.standard_normal((4, 5, 3, 8)) * 2 + 1).astype(np.float32))
    scale = jnp.asarray(rng.uniform(0.5, 1.5, 8).astype(np.float32))
    bias = jnp.asarray(rng.standard_normal(8).astype(np.float32))
    weights = jnp.asarray([1, 0, 1, 1], jnp.float32) / 45
    cts = (jnp.asarray(rng.standard_normal(x.shape).astype(np.float32)),
           jnp.asarray(rng.standard_normal(8).astype(np.float32)),
           jnp.asarray(rng.standard_normal(8).astype(np.float32)))
    results = []
    for impl in (kernels._batch_norm_by_dot, kernels._batch_norm_by_reduce):
        out, vjp = jax.vjp(lambda x, s, b: impl(x, s, b, weights, 1e-5, jnp.float32), x, scale, bias)
        results.append((*out, *vjp(cts)))
    for ours, autodiff in zip(*results):
        assert np.max(np.abs(ours - autodiff)) <= 1e-5 * (1 + np.max(np.abs(autodiff)))


def test_cpu_batch_norm_statistics_compile_without_reductions():
    """The speed of train-mode BatchNorm on CPU rests on XLA seeing dots, not reduce ops (its
    slow column reductions); this fails if the CPU branch is no longer the one compiled."""
    x = jnp.ones((8, 6, 6, 16))
    hlo = jax.jit(lambda x: kernels.batch_norm_train(x, jnp.ones(16), jnp.zeros(16), jnp.full(8, 1 / 288))
                  ).lower(x).compile().as_text()
    assert " reduce(" not in hlo and "dot(" in hlo


def test_cpu_max_pool_and_its_gradient_equal_torch_with_ties():
    """The forward bitwise; each window's gradient goes to its first maximal entry in scan order
    as in torch's CPU kernel, ties included (a block of zeros below, as after a ReLU). An entry
    in several windows sums their gradients in another order than torch: 1e-6 absolute on
    gradients of size ~1 (float32 rounding), while a misrouted one is off by ~1."""
    import torch

    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 11, 9, 3)).astype(np.float32)
    x[0, :4, :4] = 0.0
    g = rng.standard_normal((2, 6, 5, 3)).astype(np.float32)
    y, vjp = jax.vjp(jax.jit(kernels.max_pool), jnp.asarray(x))
    (dx,) = vjp(jnp.asarray(g))
    xt = torch.tensor(np.moveaxis(x, -1, 1), requires_grad=True)
    yt = torch.nn.functional.max_pool2d(xt, 3, 2, 1)
    yt.backward(torch.tensor(np.moveaxis(g, -1, 1)))
    np.testing.assert_array_equal(np.asarray(y), np.moveaxis(yt.detach().numpy(), 1, -1))
    np.testing.assert_allclose(np.asarray(dx), np.moveaxis(xt.grad.numpy(), 1, -1), rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- one value per channel
# A last batch with one real example reaches layer4 at 32 px as one value per channel (a 1x1
# map), where torch raises. kdjax.models.resnet.BatchNorm defines that case (its docstring says
# how); these tests hold both implementations of the kernels to it.


@pytest.fixture(params=["cpu", "default"])
def kernel_branch(request, monkeypatch):
    """Run the kernels' ``cpu`` branch (this machine's) or their ``default`` one (accelerators')."""
    if request.param == "default":
        monkeypatch.setattr(jax.lax, "platform_dependent", lambda *args, default, **_: default(*args))
    return request.param


def _bn_variables(channels: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    scale, bias = rng.uniform(0.5, 1.5, channels), rng.standard_normal(channels)
    mean, var = 0.1 * rng.standard_normal(channels), rng.uniform(0.5, 2.0, channels)
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32),
                        {"params": {"scale": scale, "bias": bias}, "batch_stats": {"mean": mean, "var": var}})


def _bn_train(variables, x, mask, g, bn: nn.Module | None = None):
    """Train-mode ``bn`` (``BatchNorm``): ``(y, new batch_stats, d<y, g>/dparams, d<y, g>/dx)``."""
    bn = bn or BatchNorm(use_running_average=False)

    def f(params, x):
        y, updates = bn.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, mask,
                              mutable=["batch_stats"])
        return jnp.sum(y * g), (y, updates["batch_stats"])

    (_, (y, stats)), (d_params, dx) = jax.jit(jax.value_and_grad(f, (0, 1), has_aux=True))(
        variables["params"], x)
    return np.asarray(y), jax.tree.map(np.asarray, stats), jax.tree.map(np.asarray, d_params), np.asarray(dx)


def test_batch_norm_with_one_value_per_channel_is_finite_and_keeps_the_running_variance(kernel_branch):
    """One real example on a 1x1 map: its output is ``bias`` (its batch statistics, as torch's
    formula), the padded rows are scaled with the running variance (not by 1/sqrt(eps)), the
    running mean takes the one value, the running variance stays, every gradient is finite."""
    channels = 8
    variables = _bn_variables(channels)
    params, stats = variables["params"], variables["batch_stats"]
    rng = np.random.default_rng(3)
    x = (100 * rng.standard_normal((6, 1, 1, channels))).astype(np.float32)  # garbage padding
    x[0] = 3 * rng.standard_normal((1, 1, channels)) + 2
    mask = jnp.asarray([1, 0, 0, 0, 0, 0], jnp.float32)
    g = np.zeros(x.shape, np.float32)
    g[0] = rng.standard_normal((1, 1, channels))  # the loss masks the padded rows
    y, new_stats, d_params, dx = _bn_train(variables, jnp.asarray(x), mask, jnp.asarray(g))

    np.testing.assert_array_equal(y[0, 0, 0], params["bias"])
    rstd = 1 / np.sqrt(np.asarray(stats["var"], np.float64) + 1e-5)
    padded = (x[1:] - x[0]) * rstd * params["scale"] + params["bias"]
    np.testing.assert_allclose(y[1:], padded, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new_stats["mean"], 0.9 * stats["mean"] + 0.1 * x[0, 0, 0], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(new_stats["var"], stats["var"])
    # y[0] = bias whatever x[0]: no gradient to x or scale; bias gets g[0]
    for grad in (dx, d_params["scale"], d_params["bias"]):
        assert np.all(np.isfinite(grad))
    assert np.max(np.abs(dx)) <= 1e-6 and np.max(np.abs(d_params["scale"])) <= 1e-6
    np.testing.assert_allclose(d_params["bias"], g[0, 0, 0], rtol=1e-6)


def test_batch_norm_without_a_real_example_keeps_its_running_statistics(kernel_branch):
    variables = _bn_variables(4, seed=1)
    x = jnp.asarray(np.random.default_rng(4).standard_normal((4, 1, 1, 4)).astype(np.float32))
    y, new_stats, _, dx = _bn_train(variables, x, jnp.zeros(4), jnp.zeros(x.shape))
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(dx))
    for name in ("mean", "var"):
        np.testing.assert_array_equal(new_stats[name], variables["batch_stats"][name])


class _BatchNormBefore(nn.Module):
    """``BatchNorm`` as it was before the single-value case was defined: the kernel without a
    fallback variance, both running statistics always updated (torch's rule)."""

    @nn.compact
    def __call__(self, x, mask):
        scale = self.param("scale", nn.initializers.ones, x.shape[-1:])
        bias = self.param("bias", nn.initializers.zeros, x.shape[-1:])
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, x.shape[-1:])
        ra_var = self.variable("batch_stats", "var", jnp.ones, x.shape[-1:])
        count = jnp.maximum(jnp.sum(mask) * x.shape[1] * x.shape[2], 1.0)
        y, mean, var = kernels.batch_norm_train(x, scale, bias, mask / count)
        unbiased = var * count / jnp.maximum(count - 1.0, 1.0)
        ra_mean.value = 0.9 * ra_mean.value + (1.0 - 0.9) * mean
        ra_var.value = 0.9 * ra_var.value + (1.0 - 0.9) * unbiased
        return y


def test_batch_norm_with_two_values_per_channel_or_more_is_unchanged_bit_for_bit(kernel_branch):
    """The single-value case changes nothing else, down to two values per channel: outputs,
    gradients and running statistics equal the rule before it bit for bit (that rule is
    torch's, which the parity tests above check). Should an XLA update fuse the two programs
    differently, float32 rounding could differ by an ulp: then compare to 1e-6 instead."""
    variables = _bn_variables(5, seed=2)
    rng = np.random.default_rng(5)
    for shape, mask in [((6, 1, 1, 5), [1, 1, 0, 0, 0, 0]), ((4, 2, 1, 5), [0, 1, 0, 0]),
                        ((3, 3, 2, 5), [1, 1, 1])]:
        x = jnp.asarray((2 * rng.standard_normal(shape) + 1).astype(np.float32))
        mask = jnp.asarray(mask, jnp.float32)
        g = jnp.asarray(rng.standard_normal(shape).astype(np.float32)) * mask[:, None, None, None]
        got = _bn_train(variables, x, mask, g)
        want = _bn_train(variables, x, mask, g, _BatchNormBefore())
        for ours, before in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
            np.testing.assert_array_equal(ours, before)


def test_cpu_batch_norm_vjp_equals_autodiff_with_one_value_per_channel():
    """The dot path's hand-written gradient where the fallback variance scales ``y`` (its
    derivation drops a term there, see kernels._batch_norm_by_dot_bwd) against autodiff of the
    reductions; cotangents on every row, padded ones included, and on mean and var."""
    rng = np.random.default_rng(6)
    x = jnp.asarray((rng.standard_normal((5, 1, 1, 8)) * 2 + 1).astype(np.float32))
    scale = jnp.asarray(rng.uniform(0.5, 1.5, 8).astype(np.float32))
    bias = jnp.asarray(rng.standard_normal(8).astype(np.float32))
    fallback_var = jnp.asarray(rng.uniform(0.5, 2.0, 8).astype(np.float32))
    weights = jnp.asarray([0, 0, 1, 0, 0], jnp.float32)
    cts = (jnp.asarray(rng.standard_normal(x.shape).astype(np.float32)),
           jnp.asarray(rng.standard_normal(8).astype(np.float32)),
           jnp.asarray(rng.standard_normal(8).astype(np.float32)))
    results = []
    for impl in (kernels._batch_norm_by_dot, kernels._batch_norm_by_reduce):
        f = functools.partial(impl, weights=weights, epsilon=1e-5, dtype=jnp.float32,
                              fallback_var=fallback_var)
        out, vjp = jax.vjp(f, x, scale, bias)
        results.append((*out, *vjp(cts)))
    for ours, autodiff in zip(*results):
        assert np.all(np.isfinite(ours))
        assert np.max(np.abs(ours - autodiff)) <= 1e-5 * (1 + np.max(np.abs(autodiff)))


def test_resnet18_trains_on_a_32px_batch_with_one_real_example(kernel_branch):
    """The last batch of 31 images in batches of 6: finite loss, gradients and running
    statistics; layer4 (1x1 maps) keeps its running variances, the layers before update theirs;
    padded rows stay at the scale of real logits (1/sqrt(eps) per layer4 BatchNorm took them to
    ~1e9, and after a few training steps past float32's range: NaN); the real example's logits
    are those of the unpadded batch of one."""
    model = models.create_model("resnet18", 2)
    variables = models.init_variables(model, jax.random.key(0), 32)
    x = jnp.asarray(images(6, 32, seed=4))
    mask = jnp.asarray([1, 0, 0, 0, 0, 0], jnp.float32)
    labels = jnp.asarray([1, 0, 0, 0, 0, 0])

    def loss(params):
        logits, updates = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                                      train=True, mask=mask, mutable=["batch_stats"])
        return losses.cross_entropy(logits, labels, mask), (logits, updates["batch_stats"])

    (value, (logits, stats)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
    assert np.isfinite(float(value))
    assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))
    assert np.any(np.asarray(grads["fc"]["bias"]) != 0)
    before, after = flax_running_stats(variables["batch_stats"]), flax_running_stats(stats)
    assert all(np.all(np.isfinite(v)) for v in after.values())
    for key in after:
        if key.endswith("running_var"):
            unchanged = np.array_equal(after[key], before[key])
            assert unchanged == key.startswith("layer4"), key
    assert np.max(np.abs(np.asarray(logits))) < 1e3
    alone = model.apply(variables, x[:1], train=True, mutable=["batch_stats"])[0]
    assert np.max(np.abs(np.asarray(alone)[0] - np.asarray(logits)[0])) <= TOL


RESNET_FAMILY = ["resnet34", "resnet101", "resnet152", "resnext50_32x4d", "wide_resnet50_2"]


@pytest.mark.parametrize("arch", RESNET_FAMILY)
def test_the_resnet_family_matches_torchvision(arch):
    """Parameter counts (1000 and 2 classes); the architecture in float64; float32 eval and
    train mode against torch's float32, both measured from the float64 truth.

    Tolerances: in float64 (kdjax's pooled features and head stay float32 by design: 1e-7 of
    the logits) the two networks agree within 1e-6, where any structural mistake is >= 1e-2.
    In float32 these deep random networks (64 px, the smallest size with 2x2 maps in layer4,
    to keep CI short) amplify round-off: torch's own float32 logits are up to 5e-4 from the
    float64 truth (ResNet-152). So kdjax's float32 must be within TOL / STAT_TOL of torch, or
    no further than 2x torch's own float32 error from the truth.
    """
    import torchvision

    for n in (1000, 2):
        ours = models.count_params(models.abstract_variables(models.create_model(arch, n), 64)["params"])
        assert ours == sum(p.numel() for p in getattr(torchvision.models, arch)(num_classes=n).parameters())
    net = torch_resnet(arch)
    state = numpy_state_dict(net)
    assert_exports_back(arch, weights.to_flax(state, arch), state)
    model = models.create_model(arch, 2)
    x = images(2, 64, seed=4)

    truth = torch64(net.eval(), x)
    with jax.enable_x64(True):
        v64 = weights.to_flax(state, arch, dtype=np.float64)
        got64 = np.asarray(model.clone(dtype=jnp.float64).apply(v64, jnp.asarray(x, jnp.float64), train=False))
    assert np.max(np.abs(got64 - truth)) <= 1e-6

    variables = weights.to_flax(state, arch)
    ours = np.max(np.abs(np.asarray(model.apply(variables, jnp.asarray(x), train=False)) - truth))
    theirs = np.max(np.abs(torch_forward(net, x) - truth))
    print(f"{arch} 64 px eval: float64 {np.max(np.abs(got64 - truth)):.1e}; float32 from the truth: "
          f"kdjax {ours:.1e}, torch {theirs:.1e}")
    assert ours <= max(TOL, 2 * theirs)

    # train mode: batch statistics (over 4 images: 16 values per channel in layer4), running
    # statistics updated (torch's in place)
    x = images(4, 64, seed=5)
    truth = torch64(net.train(), x)
    want = torch_forward(net, x)
    got, updates = model.apply(variables, jnp.asarray(x), train=True, mutable=["batch_stats"])
    ours, theirs = np.max(np.abs(np.asarray(got) - truth)), np.max(np.abs(want - truth))
    stat_err = stat_error(flax_running_stats(updates["batch_stats"]), numpy_state_dict(net))
    print(f"{arch} 64 px train: float32 from the truth: kdjax {ours:.1e}, torch {theirs:.1e}; "
          f"running stats vs torch {stat_err:.1e}")
    assert ours <= max(TOL, 2 * theirs)
    assert stat_err <= max(STAT_TOL, 2 * theirs)


@pytest.mark.parametrize("kernel,stride,size", [(3, 1, 9), (3, 2, 9), (5, 2, 8), (7, 1, 7)])
def test_cpu_depthwise_convolution_and_its_gradients_match_torch(kernel, stride, size):
    # MobileNet's 3x3 (stride 1 and 2), EfficientNet's 5x5, ConvNeXt's 7x7; odd and even sides
    import torch

    rng = np.random.default_rng(kernel + stride)
    x = rng.standard_normal((3, size, size, 8)).astype(np.float32)
    w = rng.standard_normal((kernel, kernel, 1, 8)).astype(np.float32)
    pad = (kernel - 1) // 2

    def f(x, w):
        y = kernels.depthwise_conv(x, w, stride, pad)
        return y, jnp.sum(y * jnp.sin(y))

    (y, _), grads = jax.jit(lambda x, w: (f(x, w), jax.grad(lambda *a: f(*a)[1], argnums=(0, 1))(x, w)))(x, w)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().requires_grad_()
    wt = torch.from_numpy(w.transpose(3, 2, 0, 1).copy()).requires_grad_()
    yt = torch.nn.functional.conv2d(xt, wt, stride=stride, padding=pad, groups=8)
    (yt * torch.sin(yt)).sum().backward()
    assert np.max(np.abs(np.asarray(y) - yt.detach().permute(0, 2, 3, 1).numpy())) <= 1e-5
    assert np.max(np.abs(np.asarray(grads[0]) - xt.grad.permute(0, 2, 3, 1).numpy())) <= 1e-4
    assert np.max(np.abs(np.asarray(grads[1]) - wt.grad.numpy().transpose(2, 3, 1, 0))) <= 1e-4
