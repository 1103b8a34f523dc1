"""The registry entries of the CIFAR networks of the KD literature: the CIFAR-100 table of
RepDistiller (CRD) and mdistiller (DKD), with mdistiller's definitions
(``mdistiller/models/cifar/*.py``; the networks are in ``cifar_resnet``, ``cifar_vgg`` and
``cifar_mobile``).

Every entry takes 32 px CIFAR images normalised with mdistiller's CIFAR-100 statistics and a
head that defaults to 100 classes. Its state_dict is mdistiller's (and RepDistiller's): the
torch module names are those of ``mdistiller.models.cifar.model_dict[MDISTILLER[arch]]``, so
``kdjax.models.torchvision.to_flax`` / ``from_flax`` convert its checkpoints (the ``"model"``
entry of mdistiller's teacher files) both ways. No torchvision builder exists for these
networks: ``ModelSpec.torchvision`` is ``NO_TORCHVISION``.

Taps (``apply(..., taps=True)``), mdistiller's names for the features its distillers read:

- ``feat<i>``: ``feats[i]`` of mdistiller's ``forward`` (``feat0`` the stem, then each stage's
  output; VGG and MobileNetV2 have five, the others four);
- ``preact<i>``: ``preact_feats[i]`` for i >= 1 (the stage output before its last ReLU;
  ``preact_feats[0]`` is ``feat0``); MobileNetV2, whose blocks end linearly, has none;
- ``stride<s>``: the output of the network's last layer at total stride ``s``, for the strides
  the network has (1, 2, 4 for the ResNets and WRNs; 1-8 for VGG and the ShuffleNets; 2-16 for
  MobileNetV2): the CIFAR counterparts of the ImageNet networks' ``stride4..stride32``;
- ``pool``: ``pooled_feat``, the pooled pre-logit features (the head's input).

Each network module's ``__call__`` says which tensor each tap is.
"""

from __future__ import annotations

import functools
from typing import Callable

import flax.linen as nn

from kdjax.models import cifar_layers, layers
from kdjax.models.cifar_mobile import CifarMobileNetV2, ShuffleNetV1, ShuffleNetV2
from kdjax.models.cifar_resnet import CifarResNet, WideResNet
from kdjax.models.cifar_vgg import VGG_STAGES, CifarVGG
from kdjax.models.spec import InputSpec, ModelSpec

# mdistiller's CIFAR-100 Normalize() (mdistiller/dataset/cifar100.py); CIFAR images are 32 px,
# so the eval transform resizes nothing.
CIFAR100_INPUT = InputSpec(crop_size=32, resize_size=32, mean=(0.5071, 0.4867, 0.4408), std=(0.2675, 0.2565, 0.2761))

# ``ModelSpec.torchvision`` of a network torchvision does not build (kdjax's export writes it as
# the sidecar's ``torchvision_builder``).
NO_TORCHVISION = "none"

# arch -> its name in mdistiller's ``model_dict`` (RepDistiller's the same).
MDISTILLER = {
    **{f"resnet{d}": f"resnet{d}" for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": "resnet8x4", "resnet32x4": "resnet32x4",
    **{f"wrn_{d}_{k}": f"wrn_{d}_{k}" for d in (16, 40) for k in (1, 2)},
    **{name: name for name in VGG_STAGES},
    "mobilenetv2_cifar": "MobileNetV2", "shufflenetv1_cifar": "ShuffleV1", "shufflenetv2_cifar": "ShuffleV2",
}


def _taps(feats: int, preacts: bool, strides: tuple[int, ...]) -> tuple[str, ...]:
    return (*(f"feat{i}" for i in range(feats)), *(f"preact{i}" for i in range(1, feats) if preacts),
            *(f"stride{s}" for s in strides), "pool")


_RESNET_TAPS = _taps(4, True, (1, 2, 4))


def _spec(name: str, build: Callable[..., nn.Module], head: str, head_width: int, taps: tuple[str, ...]) -> ModelSpec:
    return ModelSpec(
        name=name,
        build=build,
        head=head,
        head_width=head_width,
        input=CIFAR100_INPUT,
        taps=taps,
        backbone=layers.without_head,
        classify=layers.classify,
        torchvision=NO_TORCHVISION,
        torch_name=cifar_layers.torch_name,
    )


def _resnet(depth: int, widths: tuple[int, int, int, int]) -> Callable[..., nn.Module]:
    return functools.partial(CifarResNet, depth=depth, widths=widths)


SPECS = {
    **{f"resnet{d}": _spec(f"resnet{d}", _resnet(d, (16, 16, 32, 64)), "fc", 64, _RESNET_TAPS)
       for d in (8, 14, 20, 32, 44, 56, 110)},
    **{f"resnet{d}x4": _spec(f"resnet{d}x4", _resnet(d, (32, 64, 128, 256)), "fc", 256, _RESNET_TAPS)
       for d in (8, 32)},
    **{f"wrn_{d}_{k}": _spec(f"wrn_{d}_{k}", functools.partial(WideResNet, depth=d, widen=k), "fc", 64 * k,
                             _RESNET_TAPS)
       for d in (16, 40) for k in (1, 2)},
    **{name: _spec(name, functools.partial(CifarVGG, stages=stages), "classifier", 512, _taps(5, True, (1, 2, 4, 8)))
       for name, stages in VGG_STAGES.items()},
    "mobilenetv2_cifar": _spec("mobilenetv2_cifar", CifarMobileNetV2, "classifier_0", 1280,
                               _taps(5, False, (2, 4, 8, 16))),
    "shufflenetv1_cifar": _spec("shufflenetv1_cifar", ShuffleNetV1, "linear", 960, _taps(4, True, (1, 2, 4, 8))),
    "shufflenetv2_cifar": _spec("shufflenetv2_cifar", ShuffleNetV2, "linear", 1024, _taps(4, True, (1, 2, 4, 8))),
}
