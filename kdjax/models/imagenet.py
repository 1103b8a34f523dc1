"""torchvision's ImageNet-1K weights for kdjax's architectures, as plain data.

One :class:`Weights` per member of torchvision 0.29.1's weight enums (``ResNet50_Weights``,
``ViT_B_16_Weights``, ...) for every architecture in :data:`WEIGHTS`: the file's URL, the
evaluation transform the published accuracy was measured with (resize the shorter side to
``resize_size`` with ``interpolation``, centre-crop ``crop_size``; every entry normalises with
ImageNet's mean and std), torchvision's acc@1 and parameter count. The values were copied from the
enums by script, so kdjax never imports torch or torchvision to know them.

Not every entry fits every kdjax network as is: ``vit_b_16``'s ``IMAGENET1K_SWAG_E2E_V1`` was
trained at 384 px (its position embedding has 577 tokens), while kdjax's ``vit_b_16`` is 224 px;
the caller decides which entries it can load.

Verification: a file whose full SHA-256 is known (``sha256``, see third_party_weights/README.md) is
checked against it; for the others only torchvision's hash prefix is known (the hex digits
between ``-`` and ``.`` in the file name, ``resnet34-b627a593.pth``), which is what
``torch.hub.load_state_dict_from_url(check_hash=True)`` compares with the start of the file's
SHA-256 (:func:`verification` says which applies).
"""

from __future__ import annotations

import dataclasses
import re

# torch.hub's HASH_REGEX: the first match in the file name gives the SHA-256 prefix.
_HASH_REGEX = re.compile(r"-([a-f0-9]*)\.")


@dataclasses.dataclass(frozen=True)
class Weights:
    """One torchvision ImageNet-1K weight file and how torchvision evaluates it."""

    arch: str  # kdjax / torchvision architecture name, e.g. "resnet50"
    name: str  # the enum member, e.g. "IMAGENET1K_V2"
    url: str
    sha256: str | None  # the full digest where known, else None (only the prefix in the file name)
    crop_size: int  # centre crop, px
    resize_size: int  # shorter side before the crop, px
    interpolation: str  # InterpolationMode value of the resize: "bilinear", "bicubic", ...
    acc1: float  # torchvision's published ImageNet-1K top-1, %
    num_params: int

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def hash_prefix(self) -> str | None:
        """torchvision's SHA-256 prefix in the file name, exactly as torch.hub extracts it."""
        match = _HASH_REGEX.search(self.filename)
        return match.group(1) if match else None


def verification(w: Weights) -> str:
    """``"sha256"`` where the full digest is known, else ``"prefix"`` (torchvision's hash prefix)."""
    if w.sha256 is not None:
        return "sha256"
    if not w.hash_prefix:
        raise ValueError(f"{w.arch} {w.name}: {w.filename!r} carries no hash prefix and no sha256 is known")
    return "prefix"


_TABLE: tuple[Weights, ...] = (
    Weights(
        "resnet18", "IMAGENET1K_V1", "https://download.pytorch.org/models/resnet18-f37072fd.pth",
        sha256="f37072fd47e89c5e827621c5baffa7500819f7896bbacec160b1a16c560e07ec",
        crop_size=224, resize_size=256, interpolation="bilinear", acc1=69.758, num_params=11_689_512,
    ),
    Weights(
        "resnet34", "IMAGENET1K_V1", "https://download.pytorch.org/models/resnet34-b627a593.pth",
        sha256=None, crop_size=224, resize_size=256, interpolation="bilinear", acc1=73.314, num_params=21_797_672,
    ),
    Weights(
        "resnet50", "IMAGENET1K_V1", "https://download.pytorch.org/models/resnet50-0676ba61.pth",
        sha256="0676ba61b6795bbe1773cffd859882e5e297624d384b6993f7c9e683e722fb8a",
        crop_size=224, resize_size=256, interpolation="bilinear", acc1=76.13, num_params=25_557_032,
    ),
    Weights(
        "resnet50", "IMAGENET1K_V2", "https://download.pytorch.org/models/resnet50-11ad3fa6.pth",
        sha256=None, crop_size=224, resize_size=232, interpolation="bilinear", acc1=80.858, num_params=25_557_032,
    ),
    Weights(
        "resnet101", "IMAGENET1K_V1", "https://download.pytorch.org/models/resnet101-63fe2227.pth",
        sha256=None, crop_size=224, resize_size=256, interpolation="bilinear", acc1=77.374, num_params=44_549_160,
    ),
    Weights(
        "resnet101", "IMAGENET1K_V2", "https://download.pytorch.org/models/resnet101-cd907fc2.pth",
        sha256=None, crop_size=224, resize_size=232, interpolation="bilinear", acc1=81.886, num_params=44_549_160,
    ),
    Weights(
        "resnet152", "IMAGENET1K_V1", "https://download.pytorch.org/models/resnet152-394f9c45.pth",
        sha256=None, crop_size=224, resize_size=256, interpolation="bilinear", acc1=78.312, num_params=60_192_808,
    ),
    Weights(
        "resnet152", "IMAGENET1K_V2", "https://download.pytorch.org/models/resnet152-f82ba261.pth",
        sha256=None, crop_size=224, resize_size=232, interpolation="bilinear", acc1=82.284, num_params=60_192_808,
    ),
    Weights(
        "wide_resnet50_2", "IMAGENET1K_V1", "https://download.pytorch.org/models/wide_resnet50_2-95faca4d.pth",
        sha256=None, crop_size=224, resize_size=256, interpolation="bilinear", acc1=78.468, num_params=68_883_240,
    ),
    Weights(
        "wide_resnet50_2", "IMAGENET1K_V2", "https://download.pytorch.org/models/wide_resnet50_2-9ba9bcbe.pth",
        sha256=None, crop_size=224, resize_size=232, interpolation="bilinear", acc1=81.602, num_params=68_883_240,
    ),
    Weights(
        "resnext50_32x4d", "IMAGENET1K_V1", "https://download.pytorch.org/models/resnext50_32x4d-7cdf4587.pth",
        sha256=None, crop_size=224, resize_size=256, interpolation="bilinear", acc1=77.618, num_params=25_028_904,
    ),
    Weights(
        "resnext50_32x4d", "IMAGENET1K_V2", "https://download.pytorch.org/models/resnext50_32x4d-1a0047aa.pth",
        sha256=None, crop_size=224, resize_size=232, interpolation="bilinear", acc1=81.198, num_params=25_028_904,
    ),
    Weights(
        "mobilenet_v2", "IMAGENET1K_V1", "https://download.pytorch.org/models/mobilenet_v2-b0353104.pth",
        sha256=None, crop_size=224, resize_size=256, interpolation="bilinear", acc1=71.878, num_params=3_504_872,
    ),
    Weights(
        "mobilenet_v2", "IMAGENET1K_V2", "https://download.pytorch.org/models/mobilenet_v2-7ebf99e0.pth",
        sha256=None, crop_size=224, resize_size=232, interpolation="bilinear", acc1=72.154, num_params=3_504_872,
    ),
    Weights(
        "mobilenet_v3_small", "IMAGENET1K_V1", "https://download.pytorch.org/models/mobilenet_v3_small-047dcff4.pth",
        sha256=None, crop_size=224, resize_size=256, interpolation="bilinear", acc1=67.668, num_params=2_542_856,
    ),
    Weights(
        "mobilenet_v3_large", "IMAGENET1K_V1", "https://download.pytorch.org/models/mobilenet_v3_large-8738ca79.pth",
        sha256=None, crop_size=224, resize_size=256, interpolation="bilinear", acc1=74.042, num_params=5_483_032,
    ),
    Weights(
        "mobilenet_v3_large", "IMAGENET1K_V2", "https://download.pytorch.org/models/mobilenet_v3_large-5c1a4163.pth",
        sha256=None, crop_size=224, resize_size=232, interpolation="bilinear", acc1=75.274, num_params=5_483_032,
    ),
    Weights(
        "efficientnet_b0", "IMAGENET1K_V1",
        "https://download.pytorch.org/models/efficientnet_b0_rwightman-7f5810bc.pth",
        sha256=None, crop_size=224, resize_size=256, interpolation="bicubic", acc1=77.692, num_params=5_288_548,
    ),
    Weights(
        "convnext_tiny", "IMAGENET1K_V1", "https://download.pytorch.org/models/convnext_tiny-983f1562.pth",
        sha256=None, crop_size=224, resize_size=236, interpolation="bilinear", acc1=82.52, num_params=28_589_128,
    ),
    Weights(
        "vit_b_16", "IMAGENET1K_V1", "https://download.pytorch.org/models/vit_b_16-c867db91.pth",
        sha256=None, crop_size=224, resize_size=256, interpolation="bilinear", acc1=81.072, num_params=86_567_656,
    ),
    Weights(
        "vit_b_16", "IMAGENET1K_SWAG_E2E_V1", "https://download.pytorch.org/models/vit_b_16_swag-9ac1b537.pth",
        sha256=None, crop_size=384, resize_size=384, interpolation="bicubic", acc1=85.304, num_params=86_859_496,
    ),
    Weights(
        "vit_b_16", "IMAGENET1K_SWAG_LINEAR_V1", "https://download.pytorch.org/models/vit_b_16_lc_swag-4e70ced5.pth",
        sha256=None, crop_size=224, resize_size=224, interpolation="bicubic", acc1=81.886, num_params=86_567_656,
    ),
)

WEIGHTS: dict[str, dict[str, Weights]] = {
    arch: {w.name: w for w in _TABLE if w.arch == arch} for arch in dict.fromkeys(w.arch for w in _TABLE)
}

# The weight every architecture has, and the one the seed study uses.
DEFAULT: dict[str, str] = {arch: "IMAGENET1K_V1" for arch in WEIGHTS}


def get(arch: str, name: str = "IMAGENET1K_V1") -> Weights:
    """The entry ``name`` of ``arch``; a ValueError lists the known archs or that arch's names."""
    if arch not in WEIGHTS:
        raise ValueError(f"no ImageNet weights for arch {arch!r}: expected one of {sorted(WEIGHTS)}")
    names = WEIGHTS[arch]
    if name not in names:
        raise ValueError(f"no ImageNet weights {name!r} for {arch}: expected one of {sorted(names)}")
    return names[name]
