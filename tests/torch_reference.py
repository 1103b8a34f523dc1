"""PyTorch side of the parity tests: randomly initialised torchvision models and helpers."""

from __future__ import annotations

import jax
import numpy as np
import torch
import torchvision

# The arguments torchvision's builders pass on to each network that switch dropout and
# stochastic depth, which the parity tests exclude (kdjax draws its masks from JAX's generator,
# not torch's); kdjax's modules take the same names as fields.
STOCHASTIC = {
    "mobilenet_v2": ("dropout",), "mobilenet_v3_small": ("dropout",), "mobilenet_v3_large": ("dropout",),
    "efficientnet_b0": ("dropout", "stochastic_depth_prob"), "convnext_tiny": ("stochastic_depth_prob",),
    "vit_b_16": ("dropout", "attention_dropout"),
}


def deterministic(arch: str) -> dict[str, float]:
    """``arch``'s dropout and stochastic-depth settings, all off: kwargs for torchvision's builder
    and fields for ``kdjax``'s ``model.clone``."""
    return {k: 0.0 for k in STOCHASTIC.get(arch, ())}


def torch_model(arch: str, seed: int = 0, num_classes: int = 2, **kwargs) -> torch.nn.Module:
    """A randomly initialised torchvision ``arch`` with a ``num_classes`` head whose
    normalisation layers have random affine parameters and BatchNorm non-trivial running
    statistics; ``kwargs`` go to the builder (``dropout=0.0``, ...).

    The running statistics are first calibrated on random images (cumulative average over two
    batches) and then perturbed, so eval-mode BatchNorm is neither an identity nor wildly off:
    with raw random statistics a random ResNet-50's logits reach ~400, which says nothing about
    a real network and turns float32 round-off into large absolute errors.
    """
    torch.manual_seed(seed)
    net = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes, **kwargs)
    with torch.no_grad():
        # torchvision starts some layers near zero, which would hide their mistakes: ViT's head at
        # 0 (every logit 0), MobileNet's Linear layers at N(0, 0.01) (logits ~1e-2), ConvNeXt's
        # Linear layers at N(0, 0.02) and its layer scales at 1e-6 (each block nearly the
        # identity). Redrawn as a trained network has them: Linear weights N(0, 1/fan_in),
        # layer scales U(0.1, 0.5).
        for m in net.modules():
            if isinstance(m, torch.nn.Linear) and float(m.weight.std()) < 0.5 / m.in_features**0.5:
                m.weight.normal_(0.0, 1.0 / m.in_features**0.5)
                m.bias.normal_(0.0, 0.1)
        for name, p in net.named_parameters():
            if name.endswith("layer_scale"):
                p.uniform_(0.1, 0.5)
    # calibrated at the size the zoo's eval-mode certificates run (a random EfficientNet-B0
    # calibrated at 64 px reaches logits ~1e5 at 224 px, where float32 round-off is O(1))
    return _randomise_norms(net, seed, 224, relative=True)


def torch_resnet(arch: str, seed: int = 0) -> torch.nn.Module:
    """``torch_model`` of a ResNet with its 1000-class ``fc`` replaced by a fresh 2-class one
    after building, as the seed study does (the draws, so every ResNet test's numbers, differ
    from building with ``num_classes=2``)."""
    torch.manual_seed(seed)
    net = getattr(torchvision.models, arch)(weights=None)
    net.fc = torch.nn.Linear(net.fc.in_features, 2)
    return _randomise_norms(net, seed, 64)


def _randomise_norms(net: torch.nn.Module, seed: int, size: int, relative: bool = False) -> torch.nn.Module:
    """``relative``: the running means move by 0.05 running standard deviations rather than 0.05
    (depthwise and SE-scaled channels of small variance blow up under an absolute shift)."""
    gen = torch.Generator().manual_seed(seed + 1)
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    norms = [m for m in net.modules() if isinstance(m, torch.nn.LayerNorm)]
    with torch.no_grad():
        for m in bns + norms:
            m.weight.uniform_(0.5, 1.5, generator=gen)
            m.bias.normal_(0.0, 0.1, generator=gen)
        momenta = [m.momentum for m in bns]  # torchvision's own (0.01 in MobileNetV3)
        for m in bns:
            m.momentum = None  # cumulative moving average while calibrating
        net.train()
        if bns:
            for _ in range(2):
                net(torch.randn(8, 3, size, size, generator=gen))
        for m, momentum in zip(bns, momenta):
            m.momentum = momentum
            shift = 0.05 * torch.randn(m.num_features, generator=gen)
            m.running_mean.add_(shift * m.running_var.sqrt() if relative else shift)
            m.running_var.mul_(torch.empty(m.num_features).uniform_(0.8, 1.25, generator=gen))
            m.num_batches_tracked.fill_(7)
    return net.eval()


def numpy_state_dict(net: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in net.state_dict().items()}


def images(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, size, size, 3)).astype(np.float32)


def torch_forward(net, x_nhwc: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return net(torch.from_numpy(x_nhwc).permute(0, 3, 1, 2).contiguous()).numpy()


def torch64(net, x: np.ndarray) -> np.ndarray:
    """``net``'s output in float64 (a copy; the same weights, exactly; ``net``'s own running
    statistics untouched): the reference truth."""
    import copy

    with torch.no_grad():
        return copy.deepcopy(net).double()(torch.from_numpy(x.astype(np.float64)).permute(0, 3, 1, 2)).numpy()


def running_stats(arch: str, batch_stats: dict) -> dict[str, np.ndarray]:
    """kdjax's ``batch_stats`` of ``arch`` under torchvision's running_mean / running_var keys."""
    from kdjax import models

    name = models.get(arch).torch_name
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(batch_stats):
        *mods, stat = (p.key for p in path)
        out[f"{name(mods)}.running_{stat}"] = np.asarray(leaf)
    return out


def stat_error(ours: dict, theirs: dict) -> float:
    """max |d| / (1 + |value|) over running statistics: deep running variances reach ~10^2, where
    float32 resolves ~1e-5, so they are compared relative to their size."""
    return max(float(np.max(np.abs(ours[k] - theirs[k]) / (1 + np.abs(theirs[k])))) for k in ours)


def assert_exports_back(arch: str, variables: dict, state: dict[str, np.ndarray]) -> None:
    """``kdjax.models.torchvision.from_flax(variables)`` is ``state`` (the state_dict they were
    converted from; ``num_batches_tracked``, which kdjax does not keep, aside), and
    ``torchvision.models.<arch>(num_classes=n)`` loads it with ``strict=True``."""
    from kdjax.models import torchvision as tv

    back = tv.from_flax(variables, arch)
    assert set(back) == set(state)
    for k in state:
        if not k.endswith("num_batches_tracked"):
            np.testing.assert_array_equal(back[k], state[k], err_msg=k)
    n = back[tv.head_key(arch)].shape[0]
    getattr(torchvision.models, arch)(num_classes=n).load_state_dict(
        {k: torch.from_numpy(np.asarray(v)) for k, v in back.items()}, strict=True)
