"""The architectures kdjax trains, as a plain registry: a name -> what the rest of kdjax may know.

Code outside ``kdjax.models`` never names a layer: it asks an entry for its classifier head (the
parameters ``fc`` / ``fc_frozen_bn`` modes train and a new task replaces), its input spec (what
the data pipeline feeds it) and its feature taps (the outputs a feature loss may read). Adding an
architecture touches its network module, one entry here and a test.
"""

from __future__ import annotations

import itertools
from typing import Any, Mapping

import flax.linen as nn
import jax
import numpy as np

from kdjax.models import cifar, convnext, efficientnet, layers, mobilenet, resnet, user, vit
from kdjax.models.spec import InputSpec, ModelSpec  # noqa: F401 (the registry's types)

Dtype = Any

# kdjax's own architectures, then users' (``register``, ``from_module``, ``MODULE:ATTRIBUTE``)
ARCHS: dict[str, ModelSpec] = {
    **resnet.SPECS,
    **mobilenet.SPECS,
    **efficientnet.SPECS,
    **convnext.SPECS,
    **vit.SPECS,
    **cifar.SPECS,
}
BUILTIN: frozenset[str] = frozenset(ARCHS)
_anonymous = itertools.count()


def get(arch: str) -> ModelSpec:
    """The registry entry of ``arch``; a ``MODULE:ATTRIBUTE`` name is imported and registered on
    first use (``kdjax.models.user.resolve``); a ValueError lists the known names."""
    try:
        return ARCHS[arch]
    except KeyError:
        if isinstance(arch, str) and ":" in arch:
            return register(arch, user.resolve(arch))
        raise ValueError(f"unknown architecture {arch!r}: expected one of {sorted(ARCHS)}, or a network of your "
                         "own as MODULE:ATTRIBUTE (a kdjax.models.UserSpec)") from None


def register(name: str, spec: user.UserSpec) -> ModelSpec:
    """Add a user's network under ``name`` (kdjax's own names are refused; registering the same
    name again replaces it). Returns its entry: ``name`` then works everywhere an architecture
    name does (``--student_arch``, ``--teacher_arch``, model directories)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a network's name must be a non-empty string, got {name!r}")
    if name in BUILTIN:
        raise ValueError(f"{name!r} is one of kdjax's own architectures: register yours under another name")
    if not isinstance(spec, user.UserSpec):
        raise TypeError(f"register({name!r}, ...) takes a kdjax.models.UserSpec, got {type(spec).__name__}")
    ARCHS[name] = user.model_spec(name, spec)
    return ARCHS[name]


def from_module(module: nn.Module, *, head: str | None = None, input: InputSpec = InputSpec(),
                taps: Mapping[str, str] | None = None, name: str | None = None) -> str:
    """Register a module instance (its ``num_classes`` field, where it has one, set per task) and
    return the name it is registered under (``name``, or ``user:<ClassName>:<n>``)."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"from_module takes a flax.linen Module, got {type(module).__name__}")

    def build(num_classes: int) -> nn.Module:
        return module.clone(num_classes=num_classes) if hasattr(module, "num_classes") else module

    name = name or f"user:{type(module).__name__}:{next(_anonymous)}"
    register(name, user.UserSpec(build, head=head, input=input, taps=dict(taps or {})))
    return name


def _require_head(arch: str) -> str:
    head = get(arch).head
    if not head:
        raise ValueError(f"network {arch!r} names no classifier head (UserSpec.head): --student_train fc / "
                         "fc_frozen_bn and a new task's head need it; name it, or train with --student_train all")
    return head


def _head_of(arch: str, params: Mapping) -> str:
    """``arch``'s head, checked to be a top-level entry of ``params``."""
    head = _require_head(arch)
    if head not in params:
        raise ValueError(f"network {arch!r}: its head {head!r} (UserSpec.head) is not a top-level entry of its "
                         f"params, which holds {sorted(params)}; name the classifier's submodule")
    return head


def create_model(arch: str, num_classes: int, dtype: Dtype = np.float32) -> nn.Module:
    """The flax module of ``arch`` with a ``num_classes``-way head, computing in ``dtype``."""
    spec = get(arch)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    return spec.build(num_classes=num_classes, dtype=dtype)


def head_params(arch: str, params: Mapping) -> dict:
    """``{head: params[head]}``: what the head-only student modes optimise."""
    head = _head_of(arch, params)
    return {head: params[head]}


def without_head(arch: str, tree: Mapping) -> dict:
    """``tree`` (params or a variables dict) without the classifier head's parameters."""
    head = _require_head(arch)
    if "params" in tree:
        return {**tree, "params": {k: v for k, v in tree["params"].items() if k != head}}
    return {k: v for k, v in tree.items() if k != head}


def num_outputs(arch: str, variables: Mapping) -> int:
    """The number of classes the head of ``variables`` (``{'params': ...}``) predicts."""
    head = variables["params"][_head_of(arch, variables["params"])]
    return int(np.shape(head["bias"] if "bias" in head else head["kernel"])[-1])


def replace_head(arch: str, variables: Mapping, key: jax.Array, num_classes: int) -> dict:
    """``variables`` with a fresh ``num_classes``-way head drawn as torch.nn.Linear draws one."""
    spec, name = get(arch), _require_head(arch)
    width = spec.head_width or int(np.shape(variables["params"][name]["kernel"])[0])  # a user's: its Dense's
    head = jax.device_get(layers.fresh_head(key, width, num_classes))
    return {**variables, "params": {**variables["params"], name: head}}
