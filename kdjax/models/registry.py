"""The architectures kdjax trains, as a plain registry: a name -> what the rest of kdjax may know.

Code outside ``kdjax.models`` never names a layer: it asks an entry for its classifier head (the
parameters ``fc`` / ``fc_frozen_bn`` modes train and a new task replaces), its input spec (what
the data pipeline feeds it) and its feature taps (the outputs a feature loss may read). Adding an
architecture touches its network module, one entry here and a test.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import numpy as np

from kdjax.models import cifar, convnext, efficientnet, layers, mobilenet, resnet, vit
from kdjax.models.spec import InputSpec, ModelSpec  # noqa: F401 (the registry's types)

Dtype = Any

ARCHS: Mapping[str, ModelSpec] = {
    **resnet.SPECS,
    **mobilenet.SPECS,
    **efficientnet.SPECS,
    **convnext.SPECS,
    **vit.SPECS,
    **cifar.SPECS,
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
    head = jax.device_get(layers.fresh_head(key, spec.head_width, num_classes))
    return {**variables, "params": {**variables["params"], spec.head: head}}
