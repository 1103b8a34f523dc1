"""The model zoo beyond the ResNets computes torchvision's networks: a certificate per architecture.

Each architecture, built in both frameworks from one random torchvision state_dict (random
normalisation affines, calibrated-then-perturbed BatchNorm statistics), with dropout and
stochastic depth off:

- parameter counts equal torchvision's with the 1000-class head and with 2 classes;
- the converted flax model in float64 equals torch's float64 network within 1e-6 (any
  structural mistake, a wrong padding, epsilon or activation, is >= 1e-3);
- eval logits at the native size, float32 at highest matmul precision, within TOL = 1e-4 of
  torch's float32 logits (both are ~1e-6 from the float64 truth: ~10^4-term float32 sums in
  different orders; a real mistake is >= 1e-3);
- train mode (batch statistics) likewise, and the updated running statistics within STAT_TOL
  relative (|d| / (1 + |value|)) where the network has BatchNorm;

The random networks are conditioned as trained ones are (``torch_model``): logits O(0.1-5),
where raw torchvision initialisations give 0 (ViT), ~1e-2 (MobileNet) or ~1e5 (EfficientNet).
- ``from_flax`` gives back the state_dict it was made from, which torchvision loads strictly.

Train mode runs at 64 px where the architecture allows (ViT takes 224 only) to keep CI short.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import models
from kdjax.models import torchvision as tv
from torch_reference import (
    assert_exports_back,
    deterministic,
    images,
    numpy_state_dict,
    running_stats,
    stat_error,
    torch64,
    torch_forward,
    torch_model,
)

TOL = 1e-4
STAT_TOL = 1e-5
ZOO = ["mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0", "convnext_tiny",
       "vit_b_16"]


@pytest.mark.parametrize("arch", ZOO)
def test_parameter_counts_match_torchvision(arch):
    import torchvision

    size = models.get(arch).input.crop_size
    for n in (1000, 2):
        ours = models.count_params(models.abstract_variables(models.create_model(arch, n), size)["params"])
        assert ours == sum(p.numel() for p in getattr(torchvision.models, arch)(num_classes=n).parameters())


@pytest.mark.parametrize("arch", sorted(models.ARCHS))
def test_the_head_modes_train_the_last_linear_layer(arch):
    # --student_train fc / fc_frozen_bn optimise params[head] alone: the network's last Linear,
    # head_width -> num_classes, and the only parameters that depend on num_classes
    spec = models.get(arch)
    size = spec.input.crop_size
    two, five = (models.abstract_variables(models.create_model(arch, n), size)["params"] for n in (2, 5))
    assert two[spec.head]["kernel"].shape == (spec.head_width, 2)
    differ = {k for k in two if jax.tree.map(lambda a: a.shape, two[k]) != jax.tree.map(lambda a: a.shape, five[k])}
    assert differ == {spec.head}
    assert set(models.head_params(arch, two)) == {spec.head}
    assert set(models.without_head(arch, {"params": two})["params"]) == set(two) - {spec.head}


@pytest.mark.parametrize("arch", ZOO)
def test_the_zoo_matches_torchvision(arch):
    spec = models.get(arch)
    off = deterministic(arch)
    model = models.create_model(arch, 2).clone(**off)
    net = torch_model(arch, **off)
    state = numpy_state_dict(net)
    native = spec.input.crop_size

    # export: the state_dict back, exactly, which torchvision loads strictly
    variables = tv.to_flax(state, arch)
    assert_exports_back(arch, variables, state)

    x = images(1, native, seed=4)  # one image at the native size keeps CI short
    truth = torch64(net.eval(), x)
    with jax.enable_x64(True):
        v64 = tv.to_flax(state, arch, dtype=np.float64)
        got64 = np.asarray(model.clone(dtype=jnp.float64).apply(v64, jnp.asarray(x, jnp.float64), train=False))
    err64 = np.max(np.abs(got64 - truth))
    got = np.asarray(model.apply(variables, jnp.asarray(x), train=False))
    want = torch_forward(net, x)
    ours, theirs = np.max(np.abs(got - truth)), np.max(np.abs(want - truth))
    err = np.max(np.abs(got - want))
    print(f"{arch} {native} px eval: float64 {err64:.1e}; float32 vs torch {err:.1e}; from the truth: kdjax "
          f"{ours:.1e}, torch {theirs:.1e} (logit scale {np.max(np.abs(truth)):.2f})")
    assert err64 <= 1e-6
    assert err <= TOL

    size = native if spec.fixed_size else 64
    x = images(4, size, seed=5)
    truth = torch64(net.train(), x)
    want = torch_forward(net, x)  # train mode: torch updates its running statistics in place
    got, updates = model.apply(variables, jnp.asarray(x), train=True, mutable=["batch_stats"])
    ours, theirs = np.max(np.abs(np.asarray(got) - truth)), np.max(np.abs(want - truth))
    err = np.max(np.abs(np.asarray(got) - want))
    after = numpy_state_dict(net)
    stats = running_stats(arch, updates["batch_stats"])
    assert set(stats) == {k for k in after if k.endswith(("running_mean", "running_var"))}
    stat_err = stat_error(stats, after) if stats else 0.0
    print(f"{arch} {size} px train: float32 vs torch {err:.1e}; from the truth: kdjax {ours:.1e}, torch "
          f"{theirs:.1e}; running stats vs torch {stat_err:.1e}")
    assert err <= TOL
    assert stat_err <= STAT_TOL
