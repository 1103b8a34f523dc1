"""What kdjax may know of an architecture: ``ModelSpec`` (and its ``InputSpec``).

Each network module (``resnet``, ``mobilenet``, ...) declares its entries with these; the
registry collects them. Code outside ``kdjax.models`` reaches a network only through its entry.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax

from kdjax.data.transforms import IMAGENET_MEAN, IMAGENET_STD

# Every CNN's taps include the output of its last block at each of these strides (a ResNet's
# layer1..layer4), so a feature loss names the same taps for any pair of architectures.
STRIDE_TAPS = ("stride4", "stride8", "stride16", "stride32")


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


def dotted(path: Sequence[str]) -> str:
    """torch's module name of a flax module path that mirrors torch's tree (``features/0/1`` is
    ``features.0.1``)."""
    return ".".join(path)


def renaming(aliases: Mapping[str, str]) -> Callable[[Sequence[str]], str]:
    """``dotted``, with the top-level flax modules of ``aliases`` renamed (a head kept at the
    top of ``params`` for the engine, such as ``classifier_3`` -> ``classifier.3``)."""
    def name(path: Sequence[str]) -> str:
        return dotted([aliases.get(path[0], path[0]), *path[1:]])
    return name


def indexed(path: Sequence[str]) -> str:
    """torch's module name where the i-th child of a torch Sequential is the flax module
    ``<parent>_<i>`` (the ResNets: ``layer1_0/downsample_1`` is ``layer1.0.downsample.1``)."""
    return ".".join(re.sub(r"_(\d+)$", r".\1", n) for n in path)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One architecture.

    - ``build(num_classes=, dtype=)``: the flax module; ``apply(..., taps=True)`` returns
      ``(logits, {tap: array})``; in train mode it takes a ``'dropout'`` rng where it has
      dropout or stochastic depth.
    - ``head``: the top-level key of the classifier (the last Linear) in ``params``;
      ``head_width`` is its input width.
    - ``backbone(module)``: the module stopping at the pre-logit features (after any dropout that
      precedes the head); ``classify(module, head_params, features)`` completes the function.
    - ``taps``: the feature names ``apply(..., taps=True)`` returns.
    - ``torchvision``: the ``torchvision.models`` builder whose state_dict this mirrors;
      ``torch_name(flax module path)`` is the torch module name of a flax module.
    - ``fixed_size``: the network takes ``input.crop_size`` only (ViT's position embedding).
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
    torch_name: Callable[[Sequence[str]], str] = dotted
    fixed_size: bool = False
