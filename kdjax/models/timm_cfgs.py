"""timm's pretrained weights for the architectures kdjax has, as plain data.

One :class:`TimmWeights` per timm tag kdjax loads: timm's default tag of each model (the first
entry of each model here, as ``timm.create_model(name, pretrained=True)`` resolves a bare name)
and its notable others, with what their ``pretrained_cfg`` says: the Hugging Face hub repository
(``hf_hub_id``; the file is ``HUB_FILENAME``), the number of classes, the evaluation transform
(``input_size``, ``crop_pct``, ``interpolation``, ``mean``/``std``; timm resizes the shorter
side to ``floor(input_size / crop_pct)`` and centre-crops ``input_size``), timm's larger test
size where it has one, and the licence. The values were copied from timm 1.0.31's
``timm.models.get_pretrained_cfg`` by script, so kdjax never imports timm to know them.

``bce``: the head was trained with a binary cross-entropy loss (ResNet Strikes Back's A1, A2
and A3 procedures, arXiv:2110.00476, and timm's ``a1h``, a heavier variant of A1), so its logits
are calibrated for one sigmoid per class, not for a softmax: probabilities, confidence
thresholds and distillation temperatures tuned on cross-entropy teachers read differently.

Checksums: timm records none for its hub files (``pretrained_cfg`` has no digest), so a
downloaded file is checked by its structure (every tensor of the model, with its shape) when it
is loaded; see :mod:`kdjax.models.timm`.

Tags left out on purpose: those without a classifier (``num_classes=0``: DINO, MAE, ...), the
``*_384`` ConvNeXt fine-tunes (timm evaluates them with ``crop_mode='squash'``, a resize of both
sides that kdjax's Resize + CenterCrop transform cannot express) and timm's tags whose recipe
(loss) is not documented in timm.
"""

from __future__ import annotations

import dataclasses
import math

HUB_FILENAME = "model.safetensors"  # timm's hub file (pretrained_cfg ``hf_hub_filename`` unset)

# timm model name -> the kdjax architecture (kdjax.models.registry) that computes its function
ARCHS: dict[str, str] = {
    "resnet18": "resnet18", "resnet34": "resnet34", "resnet50": "resnet50", "resnet101": "resnet101",
    "resnet152": "resnet152", "wide_resnet50_2": "wide_resnet50_2", "resnext50_32x4d": "resnext50_32x4d",
    "mobilenetv3_large_100": "mobilenet_v3_large", "mobilenetv3_small_100": "mobilenet_v3_small",
    "efficientnet_b0": "efficientnet_b0", "convnext_tiny": "convnext_tiny", "vit_base_patch16_224": "vit_b_16",
}

_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # timm's IMAGENET_DEFAULT_MEAN / _STD
_INCEPTION = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # IMAGENET_INCEPTION_MEAN / _STD
_UNIT = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # the MIIL weights: pixels in [0, 1], no normalisation


@dataclasses.dataclass(frozen=True)
class TimmWeights:
    """One timm tag's weights and how timm evaluates them (its ``pretrained_cfg``)."""

    tag: str  # "resnet50.a1_in1k": model name, a dot, the pretrained tag
    hf_hub_id: str  # "timm/resnet50.a1_in1k": the hub repository holding HUB_FILENAME
    num_classes: int
    input_size: int  # the eval crop's side, px (pretrained_cfg input_size; square)
    crop_pct: float
    interpolation: str  # of the eval resize: "bilinear", "bicubic"
    stats: tuple[tuple[float, float, float], tuple[float, float, float]]  # Normalize (mean, std)
    license: str
    test: tuple[int, float] | None = None  # timm's (test_input_size, test_crop_pct), where it has them
    bce: bool = False  # head trained with binary cross-entropy (sigmoid-calibrated logits)

    @property
    def model(self) -> str:
        return self.tag.split(".", 1)[0]

    @property
    def arch(self) -> str:
        return ARCHS[self.model]

    @property
    def mean(self) -> tuple[float, float, float]:
        return self.stats[0]

    @property
    def std(self) -> tuple[float, float, float]:
        return self.stats[1]

    @property
    def resize_size(self) -> int:
        """The shorter side before the centre crop, as timm's ``transforms_imagenet_eval``."""
        return math.floor(self.input_size / self.crop_pct)


TABLE: tuple[TimmWeights, ...] = (
    # resnet18: timm's default tag first
    TimmWeights("resnet18.a1_in1k", "timm/resnet18.a1_in1k",
                1000, 224, 0.95, "bicubic", _IMAGENET, "apache-2.0", test=(288, 1.0), bce=True),
    TimmWeights("resnet18.a2_in1k", "timm/resnet18.a2_in1k",
                1000, 224, 0.95, "bicubic", _IMAGENET, "apache-2.0", test=(288, 1.0), bce=True),
    TimmWeights("resnet18.a3_in1k", "timm/resnet18.a3_in1k",
                1000, 160, 0.95, "bicubic", _IMAGENET, "apache-2.0", test=(224, 0.95), bce=True),
    TimmWeights("resnet18.tv_in1k", "timm/resnet18.tv_in1k",
                1000, 224, 0.875, "bilinear", _IMAGENET, "bsd-3-clause"),
    TimmWeights("resnet18.gluon_in1k", "timm/resnet18.gluon_in1k",
                1000, 224, 0.875, "bicubic", _IMAGENET, "apache-2.0"),
    TimmWeights("resnet18.fb_ssl_yfcc100m_ft_in1k", "timm/resnet18.fb_ssl_yfcc100m_ft_in1k",
                1000, 224, 0.875, "bilinear", _IMAGENET, "cc-by-nc-4.0"),
    TimmWeights("resnet18.fb_swsl_ig1b_ft_in1k", "timm/resnet18.fb_swsl_ig1b_ft_in1k",
                1000, 224, 0.875, "bilinear", _IMAGENET, "cc-by-nc-4.0"),
    # resnet34: timm's default tag first
    TimmWeights("resnet34.a1_in1k", "timm/resnet34.a1_in1k",
                1000, 224, 0.95, "bicubic", _IMAGENET, "apache-2.0", test=(288, 1.0), bce=True),
    TimmWeights("resnet34.a2_in1k", "timm/resnet34.a2_in1k",
                1000, 224, 0.95, "bicubic", _IMAGENET, "apache-2.0", test=(288, 1.0), bce=True),
    TimmWeights("resnet34.a3_in1k", "timm/resnet34.a3_in1k",
                1000, 160, 0.95, "bicubic", _IMAGENET, "apache-2.0", test=(224, 0.95), bce=True),
    TimmWeights("resnet34.bt_in1k", "timm/resnet34.bt_in1k",
                1000, 224, 0.875, "bicubic", _IMAGENET, "apache-2.0", test=(288, 0.95)),
    TimmWeights("resnet34.ra4_e3600_r224_in1k", "timm/resnet34.ra4_e3600_r224_in1k",
                1000, 224, 0.9, "bicubic", _INCEPTION, "apache-2.0", test=(288, 1.0)),
    TimmWeights("resnet34.tv_in1k", "timm/resnet34.tv_in1k",
                1000, 224, 0.875, "bilinear", _IMAGENET, "bsd-3-clause"),
    TimmWeights("resnet34.gluon_in1k", "timm/resnet34.gluon_in1k",
                1000, 224, 0.875, "bicubic", _IMAGENET, "apache-2.0"),
    # resnet50: timm's default tag first
    TimmWeights("resnet50.a1_in1k", "timm/resnet50.a1_in1k",
                1000, 224, 0.95, "bicubic", _IMAGENET, "apache-2.0", test=(288, 1.0), bce=True),
    TimmWeights("resnet50.a1h_in1k", "timm/resnet50.a1h_in1k",
                1000, 176, 0.9, "bicubic", _IMAGENET, "apache-2.0", test=(224, 1.0), bce=True),
    TimmWeights("resnet50.a2_in1k", "timm/resnet50.a2_in1k",
                1000, 224, 0.95, "bicubic", _IMAGENET, "apache-2.0", test=(288, 1.0), bce=True),
    TimmWeights("resnet50.a3_in1k", "timm/resnet50.a3_in1k",
                1000, 160, 0.95, "bicubic", _IMAGENET, "apache-2.0", test=(224, 0.95), bce=True),
    TimmWeights("resnet50.ram_in1k", "timm/resnet50.ram_in1k",
                1000, 224, 0.875, "bicubic", _IMAGENET, "apache-2.0", test=(288, 0.95)),
    TimmWeights("resnet50.ra_in1k", "timm/resnet50.ra_in1k",
                1000, 224, 0.875, "bicubic", _IMAGENET, "apache-2.0", test=(288, 0.95)),
    TimmWeights("resnet50.bt_in1k", "timm/resnet50.bt_in1k",
                1000, 224, 0.875, "bicubic", _IMAGENET, "apache-2.0", test=(288, 0.95)),
    TimmWeights("resnet50.tv_in1k", "timm/resnet50.tv_in1k",
                1000, 224, 0.875, "bilinear", _IMAGENET, "bsd-3-clause"),
    TimmWeights("resnet50.tv2_in1k", "timm/resnet50.tv2_in1k",
                1000, 176, 0.875, "bilinear", _IMAGENET, "bsd-3-clause", test=(224, 0.965)),
    TimmWeights("resnet50.gluon_in1k", "timm/resnet50.gluon_in1k",
                1000, 224, 0.875, "bicubic", _IMAGENET, "apache-2.0"),
    TimmWeights("resnet50.fb_ssl_yfcc100m_ft_in1k", "timm/resnet50.fb_ssl_yfcc100m_ft_in1k",
                1000, 224, 0.875, "bilinear", _IMAGENET, "cc-by-nc-4.0"),
    TimmWeights("resnet50.fb_swsl_ig1b_ft_in1k", "timm/resnet50.fb_swsl_ig1b_ft_in1k",
                1000, 224, 0.875, "bilinear", _IMAGENET, "cc-by-nc-4.0"),
    # resnet101: timm's default tag first
    TimmWeights("resnet101.a1h_in1k", "timm/resnet101.a1h_in1k",
                1000, 224, 0.95, "bicubic", _IMAGENET, "apache-2.0", test=(288, 1.0), bce=True),
    TimmWeights("resnet101.a1_in1k", "timm/resnet101.a1_in1k",
                1000, 224, 0.95, "bicubic", _IMAGENET, "apache-2.0", test=(288, 1.0), bce=True),
    TimmWeights("resnet101.a2_in1k", "timm/resnet101.a2_in1k",
                1000, 224, 0.95, "bicubic", _IMAGENET, "apache-2.0", test=(288, 1.0), bce=True),
    TimmWeights("resnet101.a3_in1k", "timm/resnet101.a3_in1k",
                1000, 160, 0.95, "bicubic", _IMAGENET, "apache-2.0", test=(224, 0.95), bce=True),
    TimmWeights("resnet101.tv_in1k", "timm/resnet101.tv_in1k",
                1000, 224, 0.875, "bilinear", _IMAGENET, "bsd-3-clause"),
    TimmWeights("resnet101.tv2_in1k", "timm/resnet101.tv2_in1k",
                1000, 176, 0.875, "bilinear", _IMAGENET, "bsd-3-clause", test=(224, 0.965)),
    TimmWeights("resnet101.gluon_in1k", "timm/resnet101.gluon_in1k",
                1000, 224, 0.875, "bicubic", _IMAGENET, "apache-2.0"),
    # resnet152: timm's default tag first
    TimmWeights("resnet152.a1h_in1k", "timm/resnet152.a1h_in1k",
                1000, 224, 0.95, "bicubic", _IMAGENET, "apache-2.0", test=(288, 1.0), bce=True),
    TimmWeights("resnet152.a1_in1k", "timm/resnet152.a1_in1k",
                1000, 224, 0.95, "bicubic", _IMAGENET, "apache-2.0", test=(288, 1.0), bce=True),
    TimmWeights("resnet152.a2_in1k", "timm/resnet152.a2_in1k",
                1000, 224, 0.95, "bicubic", _IMAGENET, "apache-2.0", test=(288, 1.0), bce=True),
    TimmWeights("resnet152.a3_in1k", "timm/resnet152.a3_in1k",
                1000, 160, 0.95, "bicubic", _IMAGENET, "apache-2.0", test=(224, 0.95), bce=True),
    TimmWeights("resnet152.tv_in1k", "timm/resnet152.tv_in1k",
                1000, 224, 0.875, "bilinear", _IMAGENET, "bsd-3-clause"),
    TimmWeights("resnet152.tv2_in1k", "timm/resnet152.tv2_in1k",
                1000, 176, 0.875, "bilinear", _IMAGENET, "bsd-3-clause", test=(224, 0.965)),
    TimmWeights("resnet152.gluon_in1k", "timm/resnet152.gluon_in1k",
                1000, 224, 0.875, "bicubic", _IMAGENET, "apache-2.0"),
    # wide_resnet50_2: timm's default tag first
    TimmWeights("wide_resnet50_2.racm_in1k", "timm/wide_resnet50_2.racm_in1k",
                1000, 224, 0.875, "bicubic", _IMAGENET, "apache-2.0", test=(288, 0.95)),
    TimmWeights("wide_resnet50_2.tv_in1k", "timm/wide_resnet50_2.tv_in1k",
                1000, 224, 0.875, "bilinear", _IMAGENET, "bsd-3-clause"),
    TimmWeights("wide_resnet50_2.tv2_in1k", "timm/wide_resnet50_2.tv2_in1k",
                1000, 176, 0.875, "bilinear", _IMAGENET, "bsd-3-clause", test=(224, 0.965)),
    # resnext50_32x4d: timm's default tag first
    TimmWeights("resnext50_32x4d.a1h_in1k", "timm/resnext50_32x4d.a1h_in1k",
                1000, 224, 0.95, "bicubic", _IMAGENET, "apache-2.0", test=(288, 1.0), bce=True),
    TimmWeights("resnext50_32x4d.a1_in1k", "timm/resnext50_32x4d.a1_in1k",
                1000, 224, 0.95, "bicubic", _IMAGENET, "apache-2.0", test=(288, 1.0), bce=True),
    TimmWeights("resnext50_32x4d.a2_in1k", "timm/resnext50_32x4d.a2_in1k",
                1000, 224, 0.95, "bicubic", _IMAGENET, "apache-2.0", test=(288, 1.0), bce=True),
    TimmWeights("resnext50_32x4d.a3_in1k", "timm/resnext50_32x4d.a3_in1k",
                1000, 160, 0.95, "bicubic", _IMAGENET, "apache-2.0", test=(224, 0.95), bce=True),
    TimmWeights("resnext50_32x4d.ra_in1k", "timm/resnext50_32x4d.ra_in1k",
                1000, 224, 0.875, "bicubic", _IMAGENET, "apache-2.0", test=(288, 0.95)),
    TimmWeights("resnext50_32x4d.tv_in1k", "timm/resnext50_32x4d.tv_in1k",
                1000, 224, 0.875, "bilinear", _IMAGENET, "bsd-3-clause"),
    TimmWeights("resnext50_32x4d.tv2_in1k", "timm/resnext50_32x4d.tv2_in1k",
                1000, 176, 0.875, "bilinear", _IMAGENET, "bsd-3-clause", test=(224, 0.965)),
    TimmWeights("resnext50_32x4d.gluon_in1k", "timm/resnext50_32x4d.gluon_in1k",
                1000, 224, 0.875, "bicubic", _IMAGENET, "apache-2.0"),
    TimmWeights("resnext50_32x4d.fb_ssl_yfcc100m_ft_in1k", "timm/resnext50_32x4d.fb_ssl_yfcc100m_ft_in1k",
                1000, 224, 0.875, "bilinear", _IMAGENET, "cc-by-nc-4.0"),
    TimmWeights("resnext50_32x4d.fb_swsl_ig1b_ft_in1k", "timm/resnext50_32x4d.fb_swsl_ig1b_ft_in1k",
                1000, 224, 0.875, "bilinear", _IMAGENET, "cc-by-nc-4.0"),
    # mobilenetv3_large_100: timm's default tag first
    TimmWeights("mobilenetv3_large_100.ra_in1k", "timm/mobilenetv3_large_100.ra_in1k",
                1000, 224, 0.875, "bicubic", _IMAGENET, "apache-2.0"),
    TimmWeights("mobilenetv3_large_100.ra4_e3600_r224_in1k", "timm/mobilenetv3_large_100.ra4_e3600_r224_in1k",
                1000, 224, 0.95, "bicubic", _INCEPTION, "apache-2.0", test=(256, 1.0)),
    TimmWeights("mobilenetv3_large_100.miil_in21k_ft_in1k", "timm/mobilenetv3_large_100.miil_in21k_ft_in1k",
                1000, 224, 0.875, "bilinear", _UNIT, "apache-2.0"),
    TimmWeights("mobilenetv3_large_100.miil_in21k", "timm/mobilenetv3_large_100.miil_in21k",
                11221, 224, 0.875, "bilinear", _UNIT, "apache-2.0"),
    # mobilenetv3_small_100: timm's default tag first
    TimmWeights("mobilenetv3_small_100.lamb_in1k", "timm/mobilenetv3_small_100.lamb_in1k",
                1000, 224, 0.875, "bicubic", _IMAGENET, "apache-2.0"),
    # efficientnet_b0: timm's default tag first
    TimmWeights("efficientnet_b0.ra_in1k", "timm/efficientnet_b0.ra_in1k",
                1000, 224, 0.875, "bicubic", _IMAGENET, "apache-2.0"),
    TimmWeights("efficientnet_b0.ra4_e3600_r224_in1k", "timm/efficientnet_b0.ra4_e3600_r224_in1k",
                1000, 224, 0.9, "bicubic", _INCEPTION, "apache-2.0", test=(256, 1.0)),
    # convnext_tiny: timm's default tag first
    TimmWeights("convnext_tiny.in12k_ft_in1k", "timm/convnext_tiny.in12k_ft_in1k",
                1000, 224, 0.95, "bicubic", _IMAGENET, "apache-2.0", test=(288, 1.0)),
    TimmWeights("convnext_tiny.fb_in22k_ft_in1k", "timm/convnext_tiny.fb_in22k_ft_in1k",
                1000, 224, 0.875, "bicubic", _IMAGENET, "apache-2.0", test=(288, 1.0)),
    TimmWeights("convnext_tiny.fb_in1k", "timm/convnext_tiny.fb_in1k",
                1000, 224, 0.875, "bicubic", _IMAGENET, "apache-2.0", test=(288, 1.0)),
    TimmWeights("convnext_tiny.in12k", "timm/convnext_tiny.in12k",
                11821, 224, 0.95, "bicubic", _IMAGENET, "apache-2.0"),
    TimmWeights("convnext_tiny.fb_in22k", "timm/convnext_tiny.fb_in22k",
                21841, 224, 0.875, "bicubic", _IMAGENET, "apache-2.0"),
    # vit_base_patch16_224: timm's default tag first
    TimmWeights("vit_base_patch16_224.augreg2_in21k_ft_in1k", "timm/vit_base_patch16_224.augreg2_in21k_ft_in1k",
                1000, 224, 0.9, "bicubic", _INCEPTION, "apache-2.0"),
    TimmWeights("vit_base_patch16_224.augreg_in21k_ft_in1k", "timm/vit_base_patch16_224.augreg_in21k_ft_in1k",
                1000, 224, 0.9, "bicubic", _INCEPTION, "apache-2.0"),
    TimmWeights("vit_base_patch16_224.orig_in21k_ft_in1k", "timm/vit_base_patch16_224.orig_in21k_ft_in1k",
                1000, 224, 0.9, "bicubic", _INCEPTION, "apache-2.0"),
    TimmWeights("vit_base_patch16_224.augreg_in1k", "timm/vit_base_patch16_224.augreg_in1k",
                1000, 224, 0.9, "bicubic", _INCEPTION, "apache-2.0"),
    TimmWeights("vit_base_patch16_224.sam_in1k", "timm/vit_base_patch16_224.sam_in1k",
                1000, 224, 0.9, "bicubic", _INCEPTION, "apache-2.0"),
    TimmWeights("vit_base_patch16_224.augreg_in21k", "timm/vit_base_patch16_224.augreg_in21k",
                21843, 224, 0.9, "bicubic", _INCEPTION, "apache-2.0"),
)

# model -> {tag: entry}, in the table's order (timm's default tag first)
WEIGHTS: dict[str, dict[str, TimmWeights]] = {
    model: {w.tag: w for w in TABLE if w.model == model} for model in ARCHS}
DEFAULT: dict[str, str] = {model: next(iter(by_tag)) for model, by_tag in WEIGHTS.items()}


def get(name: str) -> TimmWeights:
    """The entry of a timm name: ``resnet50.a1_in1k``, or ``resnet50`` for timm's default tag.
    A ValueError lists the supported models, or the model's known tags."""
    model, _, tag = name.partition(".")
    if model not in WEIGHTS:
        raise ValueError(f"timm model {model!r} is not one kdjax loads: expected one of {sorted(WEIGHTS)}")
    full = f"{model}.{tag}" if tag else DEFAULT[model]
    if full not in WEIGHTS[model]:
        raise ValueError(f"timm tag {full!r} is not in kdjax's table (kdjax/models/timm_cfgs.py): expected "
                         f"one of {sorted(WEIGHTS[model])}, or the bare {model!r} for timm's default")
    return WEIGHTS[model][full]
