"""kdjax.models computes torchvision's ResNets: logits and BatchNorm updates, eval and train mode.

Tolerance: max |logit difference| <= 1e-4 in float32. Both frameworks accumulate ~10^4-term
convolution sums in float32 in different orders (oneDNN vs XLA), which moves logits of magnitude
~1-10 by 1e-6..1e-5 after 18-50 layers; 1e-4 leaves an order of magnitude of headroom while a
real mistake (a wrong padding, stride, the biased running variance) moves them by >= 1e-2.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import models, weights
from torch_reference import images, numpy_state_dict, torch_forward, torch_resnet

TOL = 1e-4
# Running variances deep in a ResNet-50 reach ~10^2, where float32 resolves ~1e-5; so the
# statistics are compared relative to their size: |d| / (1 + |value|). A wrong update rule (the
# biased variance, torch's vs flax's momentum) is off by >= 1e-2 in that measure.
STAT_TOL = 1e-5


def _stat_error(ours: dict, theirs: dict) -> float:
    return max(float(np.max(np.abs(ours[k] - theirs[k]) / (1 + np.abs(theirs[k])))) for k in ours)


def flax_running_stats(batch_stats: dict) -> dict[str, np.ndarray]:
    """Flatten flax batch_stats back to torchvision's running_mean / running_var keys."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(batch_stats):
        names = [p.key for p in path]
        *mods, stat = names
        key = ".".join(m.replace("_", ".") for m in mods)
        out[f"{key}.running_{stat}"] = np.asarray(leaf)
    return out


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
    stat_err = _stat_error(ours, after)
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
    assert _stat_error(ours, after) <= STAT_TOL


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
    with pytest.raises(ValueError, match="resnet34"):
        models.create_model("resnet34", 2)
