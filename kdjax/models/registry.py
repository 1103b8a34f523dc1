"""The architectures kdjax trains, as a plain registry: a name -> what the rest of kdjax may know.

Code outside ``kdjax.models`` never names a layer: it asks an entry for its classifier head (the
parameters ``fc`` / ``fc_frozen_bn`` modes train and a new task replaces), its input spec (what
the data pipeline feeds it) and its feature taps (the outputs a feature loss may read). Adding an
architecture touches its network module, one entry here and a test.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import numpy as np

from kdjax.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from kdjax.models import resnet

Dtype = Any


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """What a network was trained on: torchvision's eval transform (``Resize(resize_size)``,
    ``CenterCrop(crop_size)``, ``interpolation``) and ``Normalize(mean, std)``."""

    crop_size: int = 224
    resize_size: int = 256
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def resize_for(self, crop_size: int) -> int:
        """The Resize() side for another crop, in this spec's proportion (256/224 -> 146 at 128)."""
        return crop_size * self.resize_size // self.crop_size


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One architecture.

    - ``build(num_classes=, dtype=)``: the flax module; ``apply(..., taps=True)`` returns
      ``(logits, {tap: array})``.
    - ``head``: the key of the classifier in ``params``; ``head_width`` is its input width.
    - ``backbone(module)``: the module stopping at the pre-logit features; ``classify(module,
      head_params, features)`` completes the same function.
    - ``taps``: the feature names ``apply(..., taps=True)`` returns.
    - ``torchvision``: the ``torchvision.models`` builder whose state_dict this mirrors.
    """

    name: str
    build: Callable[..., nn.Module]
    head: str
    head_width: int
    input: InputSpec
    taps: tuple[str, ...]
    backbone: Callable[[nn.Module], nn.Module]
    classify: Callable[[nn.Module, Any, jax.Array], jax.Array]
    torchvision: str


def _resnet(name: str, stages: tuple[int, ...], block: type, width: int, groups: int = 1,
            width_per_group: int = 64) -> ModelSpec:
    return ModelSpec(
        name=name,
        build=functools.partial(resnet.ResNet, stage_sizes=stages, block=block, groups=groups,
                                width_per_group=width_per_group),
        head="fc",
        head_width=width,
        input=InputSpec(),
        taps=("layer1", "layer2", "layer3", "layer4", "pool"),
        backbone=resnet.without_head,
        classify=resnet.classify,
        torchvision=name,
    )


ARCHS: Mapping[str, ModelSpec] = {
    "resnet18": _resnet("resnet18", (2, 2, 2, 2), resnet.BasicBlock, 512),
    "resnet34": _resnet("resnet34", (3, 4, 6, 3), resnet.BasicBlock, 512),
    "resnet50": _resnet("resnet50", (3, 4, 6, 3), resnet.Bottleneck, 2048),
    "resnet101": _resnet("resnet101", (3, 4, 23, 3), resnet.Bottleneck, 2048),
    "resnet152": _resnet("resnet152", (3, 8, 36, 3), resnet.Bottleneck, 2048),
    "resnext50_32x4d": _resnet("resnext50_32x4d", (3, 4, 6, 3), resnet.Bottleneck, 2048, groups=32,
                               width_per_group=4),
    "wide_resnet50_2": _resnet("wide_resnet50_2", (3, 4, 6, 3), resnet.Bottleneck, 2048,
                               width_per_group=128),
}


def get(arch: str) -> ModelSpec:
    """The registry entry of ``arch``; a ValueError lists the known names."""
    try:
        return ARCHS[arch]
    except KeyError:
        raise ValueError(f"unknown architecture {arch!r}: expected one of {sorted(ARCHS)}") from None


def create_model(arch: str, num_classes: int, dtype: Dtype = np.float32) -> nn.Module:
    """The flax module of ``arch`` with a ``num_classes``-way head, computing in ``dtype``."""
    spec = get(arch)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    return spec.build(num_classes=num_classes, dtype=dtype)


def head_params(arch: str, params: Mapping) -> dict:
    """``{head: params[head]}``: what the head-only student modes optimise."""
    head = get(arch).head
    return {head: params[head]}


def without_head(arch: str, tree: Mapping) -> dict:
    """``tree`` (params or a variables dict) without the classifier head's parameters."""
    head = get(arch).head
    if "params" in tree:
        return {**tree, "params": {k: v for k, v in tree["params"].items() if k != head}}
    return {k: v for k, v in tree.items() if k != head}


def num_outputs(arch: str, variables: Mapping) -> int:
    """The number of classes the head of ``variables`` (``{'params': ...}``) predicts."""
    return int(np.shape(variables["params"][get(arch).head]["bias"])[0])


def replace_head(arch: str, variables: Mapping, key: jax.Array, num_classes: int) -> dict:
    """``variables`` with a fresh ``num_classes``-way head drawn as torch.nn.Linear draws one."""
    spec = get(arch)
    head = jax.device_get(resnet.fresh_head(key, spec.head_width, num_classes))
    return {**variables, "params": {**variables["params"], spec.head: head}}
