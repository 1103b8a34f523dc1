"""timm's state_dicts -> kdjax's flax variables, and timm's files on the Hugging Face hub.

kdjax's networks are torchvision's; for the timm models of :data:`timm_cfgs.ARCHS` they compute
timm's function too, with timm's parameters renamed (and three reshaped), so a timm file maps
onto them as strictly as a torchvision file does (:mod:`kdjax.models.torchvision`): every key of
the file lands on a flax variable of the right shape, every variable is filled, and a mismatch
names the offending keys in timm's names.

Where timm's network differs from torchvision's, and what the mapping does about it:

- ResNets (18 ... 152, ResNeXt-50 32x4d, Wide ResNet-50-2): timm's ``resnet*`` without a variant
  letter is torchvision's v1.5 network (stride on the 3x3 convolution, 7x7 stem, max-pool,
  BatchNorm eps 1e-5) with torchvision's very names: nothing to do.
- MobileNetV3 (``mobilenetv3_large_100``, ``mobilenetv3_small_100``): the same blocks (timm's
  first block is a depthwise-separable one, torchvision's an inverted residual without its
  expansion: the same layers), the same squeeze-excitation widths and gates, and the head's
  ``conv_head`` is a 1x1 convolution with bias on the pooled 1x1 map, which is torchvision's
  ``classifier.0`` Linear with its weight reshaped. One real difference: timm's BatchNorm eps is
  1e-5, torchvision's (so kdjax's) 1e-3. The mapping folds it into the BatchNorm scale,
  ``weight * sqrt((running_var + 1e-3) / (running_var + 1e-5))``, which gives timm's function
  exactly wherever the running statistics are used (eval mode: a teacher, prediction,
  evaluation). In train mode kdjax normalises with the batch's variance and eps 1e-3: the same
  function only where the batch variance equals the running one, so a network fine-tuned from
  these weights is torchvision's MobileNetV3 started from timm's eval-mode function.
- EfficientNet-B0 (``efficientnet_b0``): timm's blocks (``conv_stem``/``bn1``/``blocks.i.j``/
  ``conv_head``/``bn2``) are torchvision's, squeeze-excitation reduced from the block's input
  width with SiLU and a sigmoid gate, eps 1e-5 in both: renaming only.
- ConvNeXt-T (``convnext_tiny``): the same stem, downsampling (LayerNorm2d then a 2x2 stride-2
  convolution), blocks (7x7 depthwise, LayerNorm, MLP with exact GELU, layer scale) and head
  (pool, LayerNorm, Linear), eps 1e-6; timm's layer scale ``gamma`` has shape ``(C,)`` where
  torchvision's ``layer_scale`` has ``(C, 1, 1)``.
- ViT-B/16 (``vit_base_patch16_224``): class token, position embedding over 197 tokens,
  pre-norm blocks with LayerNorm eps 1e-6, exact GELU, a final ``norm`` and the head on the
  class token (``fc_norm`` and layer scales are identities in this model: they have no
  parameters). timm's fused ``qkv`` Linear is torchvision's ``in_proj_weight`` / ``in_proj_bias``
  (q, k, v rows in the same order), copied unchanged.

Parity with timm itself (random weights, each model's own preprocessing) is held by
tests/test_timm_weights.py.
"""

from __future__ import annotations

import functools
import os
import pathlib
import re
from typing import Callable

import numpy as np

from kdjax.fetch import DownloadError, download, sha256_file
from kdjax.models import mobilenet, registry, torchvision as tv
from kdjax.models.timm_cfgs import ARCHS, HUB_FILENAME, TimmWeights, get
from kdjax.models.torchfile import load_state_dict

__all__ = ["ARCHS", "HUB_FILENAME", "TimmWeights", "get", "to_flax", "hub_url", "local_path", "find_file",
           "fetch", "timm_variables", "notes", "head_key"]

DEFAULT_ENDPOINT = "https://huggingface.co"  # HF_ENDPOINT overrides it, as for huggingface_hub

# timm's MobileNetV3 stages of inverted residuals (``_gen_mobilenet_v3``'s arch_def, blocks per
# stage), followed by one stage holding the last 1x1 ConvBnAct
_V3_STAGES = {"mobilenetv3_large_100": (1, 2, 3, 4, 2, 3), "mobilenetv3_small_100": (1, 2, 3, 2, 3)}
TIMM_V3_BN_EPS = 1e-5  # timm's MobileNetV3 BatchNorm (nn.BatchNorm2d's default)

# How a timm tensor becomes its torchvision counterpart: the timm shape of a torchvision shape,
# and the conversion of the array.
_LAYOUTS: dict[str, tuple[Callable[[tuple], tuple], Callable[[np.ndarray], np.ndarray]]] = {
    "same": (lambda s: s, lambda a: a),
    "conv_as_linear": (lambda s: (*s, 1, 1), lambda a: a.reshape(a.shape[:2])),  # MobileNetV3 conv_head
    "vector": (lambda s: s[:1], lambda a: a.reshape(-1, 1, 1)),  # ConvNeXt gamma -> layer_scale
}


# ----------------------------------------------------------------------------- name rules
# Each rule maps one torchvision key of the kdjax network to (timm key, layout); ``keys`` is the
# network's full torchvision key set, from which a block's layers are told apart.

def _resnet(key: str, keys: frozenset) -> tuple[str, str]:
    return key, "same"


@functools.lru_cache(maxsize=None)
def _block_layers(prefix: str, keys: frozenset) -> dict[int, str]:
    """timm's names of the children of torchvision's inverted-residual Sequential ``prefix``
    (``features.3.block`` / ``features.2.0.block``): with three convolutions, the expansion,
    depthwise and projection (timm's ``InvertedResidual``); with two, the depthwise and
    projection (``DepthwiseSeparableConv``); the squeeze-excitation is ``se``."""
    children = sorted({int(k[len(prefix) + 1:].split(".")[0]) for k in keys if k.startswith(prefix + ".")})
    se = [c for c in children if f"{prefix}.{c}.fc1.weight" in keys]
    convs = [c for c in children if c not in se]
    names = (("conv_pw", "bn1"), ("conv_dw", "bn2"), ("conv_pwl", "bn3")) if len(convs) == 3 else (
        ("conv_dw", "bn1"), ("conv_pw", "bn2"))
    if len(convs) != len(names) or len(se) > 1:
        raise AssertionError(f"unexpected block layout under {prefix}: {children}")
    return {**{c: "se" for c in se}, **{c: "|".join(n) for c, n in zip(convs, names)}}


def _block_key(prefix: str, rest: str, keys: frozenset) -> str:
    """timm's name, inside a block, of the torchvision key ``prefix.rest``."""
    child, sub, leaf = rest.split(".", 2)
    role = _block_layers(prefix, keys)[int(child)]
    if role == "se":  # torchvision's SqueezeExcitation fc1 / fc2
        return f"se.{ {'fc1': 'conv_reduce', 'fc2': 'conv_expand'}[sub] }.{leaf}"
    conv, bn = role.split("|")
    return f"{conv if sub == '0' else bn}.{leaf}"  # Conv2dNormActivation: 0 conv, 1 BatchNorm


@functools.lru_cache(maxsize=None)
def _last_feature(keys: frozenset) -> int:
    return max(int(k.split(".")[1]) for k in keys if k.startswith("features."))


def _stem_or_head(key: str, keys: frozenset, last: dict[str, str]) -> str | None:
    """The stem (``features.0``: conv_stem, bn1) and the last ``features`` layer (``last``:
    its conv and BatchNorm's timm names) of the MobileNetV3 / EfficientNet mappings."""
    m = re.fullmatch(r"features\.(\d+)\.([01])\.(.+)", key)
    if m is None:
        return None
    index, sub, leaf = int(m[1]), m[2], m[3]
    if index == 0:
        return f"{'conv_stem' if sub == '0' else 'bn1'}.{leaf}"
    if index == _last_feature(keys):
        return f"{last['0' if sub == '0' else '1']}.{leaf}"
    return None


def _efficientnet(key: str, keys: frozenset) -> tuple[str, str]:
    if key.startswith("classifier.1."):
        return "classifier." + key[len("classifier.1."):], "same"
    m = re.fullmatch(r"(features\.(\d+)\.(\d+)\.block)\.(.+)", key)
    if m:
        return f"blocks.{int(m[2]) - 1}.{m[3]}.{_block_key(m[1], m[4], keys)}", "same"
    name = _stem_or_head(key, keys, {"0": "conv_head", "1": "bn2"})
    if name is None:
        raise AssertionError(f"no timm name for efficientnet_b0 key {key}")
    return name, "same"


def _mobilenetv3(model: str) -> Callable[[str, frozenset], tuple[str, str]]:
    stages = _V3_STAGES[model]
    position = [(s, b) for s, n in enumerate(stages) for b in range(n)]  # features.i -> blocks.s.b

    def rule(key: str, keys: frozenset) -> tuple[str, str]:
        if key.startswith("classifier.0."):  # a Linear in torchvision, a 1x1 convolution in timm
            leaf = key[len("classifier.0."):]
            return f"conv_head.{leaf}", "conv_as_linear" if leaf == "weight" else "same"
        if key.startswith("classifier.3."):
            return "classifier." + key[len("classifier.3."):], "same"
        m = re.fullmatch(r"(features\.(\d+)\.block)\.(.+)", key)
        if m:
            stage, block = position[int(m[2]) - 1]
            return f"blocks.{stage}.{block}.{_block_key(m[1], m[3], keys)}", "same"
        name = _stem_or_head(key, keys, {"0": f"blocks.{len(stages)}.0.conv", "1": f"blocks.{len(stages)}.0.bn1"})
        if name is None:
            raise AssertionError(f"no timm name for {model} key {key}")
        return name, "same"

    return rule


_CONVNEXT_BLOCK = {"0": "conv_dw", "2": "norm", "3": "mlp.fc1", "5": "mlp.fc2"}


def _convnext(key: str, keys: frozenset) -> tuple[str, str]:
    for torch_name, timm_name in (("features.0.", "stem."), ("classifier.0.", "head.norm."),
                                  ("classifier.2.", "head.fc.")):
        if key.startswith(torch_name):
            return timm_name + key[len(torch_name):], "same"
    m = re.fullmatch(r"features\.(\d+)\.(\d+)\.(.+)", key)
    if m is None:
        raise AssertionError(f"no timm name for convnext_tiny key {key}")
    index, child, rest = int(m[1]), m[2], m[3]
    if index % 2 == 0:  # features.2, .4, .6: the downsampling before stage index / 2
        return f"stages.{index // 2}.downsample.{child}.{rest}", "same"
    block = f"stages.{index // 2}.blocks.{child}"
    if rest == "layer_scale":
        return f"{block}.gamma", "vector"
    layer, leaf = rest[len("block."):].split(".", 1)
    return f"{block}.{_CONVNEXT_BLOCK[layer]}.{leaf}", "same"


_VIT_RULES = (
    (r"class_token", r"cls_token"),
    (r"conv_proj\.(.+)", r"patch_embed.proj.\1"),
    (r"encoder\.pos_embedding", r"pos_embed"),
    (r"encoder\.layers\.encoder_layer_(\d+)\.ln_1\.(.+)", r"blocks.\1.norm1.\2"),
    (r"encoder\.layers\.encoder_layer_(\d+)\.self_attention\.in_proj_(weight|bias)", r"blocks.\1.attn.qkv.\2"),
    (r"encoder\.layers\.encoder_layer_(\d+)\.self_attention\.out_proj\.(.+)", r"blocks.\1.attn.proj.\2"),
    (r"encoder\.layers\.encoder_layer_(\d+)\.ln_2\.(.+)", r"blocks.\1.norm2.\2"),
    (r"encoder\.layers\.encoder_layer_(\d+)\.mlp\.0\.(.+)", r"blocks.\1.mlp.fc1.\2"),
    (r"encoder\.layers\.encoder_layer_(\d+)\.mlp\.3\.(.+)", r"blocks.\1.mlp.fc2.\2"),
    (r"encoder\.ln\.(.+)", r"norm.\1"),
    (r"heads\.head\.(.+)", r"head.\1"),
)


def _vit(key: str, keys: frozenset) -> tuple[str, str]:
    for pattern, replacement in _VIT_RULES:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, replacement, key), "same"
    raise AssertionError(f"no timm name for vit_base_patch16_224 key {key}")


def _rule(model: str) -> Callable[[str, frozenset], tuple[str, str]]:
    if model in _V3_STAGES:
        return _mobilenetv3(model)
    return {"efficientnet_b0": _efficientnet, "convnext_tiny": _convnext,
            "vit_base_patch16_224": _vit}.get(model, _resnet)


# ----------------------------------------------------------------------------- strict mapping

@functools.lru_cache(maxsize=None)
def _table(model: str, num_classes: int) -> dict[str, tuple[str, tuple[int, ...] | None, str]]:
    """timm key -> (torchvision key, timm shape or None for the optional ``num_batches_tracked``,
    layout), for every parameter and buffer of kdjax's network of ``model``."""
    targets = tv._targets(ARCHS[model], num_classes)
    keys, rule = frozenset(targets), _rule(model)
    table = {}
    for tv_key, target in targets.items():
        timm_key, layout = rule(tv_key, keys)
        shape = None if target.torch_shape is None else _LAYOUTS[layout][0](target.torch_shape)
        table[timm_key] = (tv_key, shape, layout)
    return table


def head_key(model: str) -> str:
    """timm's key of ``model``'s classifier weight (``fc.weight``, ``head.fc.weight``, ...)."""
    return _rule(model)(tv.head_key(ARCHS[model]), frozenset())[0]  # no rule needs the key set for a head


def _fold_v3_eps(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """torchvision-named MobileNetV3 BatchNorms with timm's eps folded into their scale, so that
    kdjax's eps (torchvision's) gives timm's eval-mode function (the module docstring)."""
    ours = mobilenet._V3_NORM["bn_epsilon"]
    out = dict(state_dict)
    for key in state_dict:
        if key.endswith(".running_var"):
            bn = key[: -len("running_var")]
            var = np.asarray(state_dict[key], np.float64)
            out[bn + "weight"] = np.asarray(state_dict[bn + "weight"], np.float64) * np.sqrt(
                (var + ours) / (var + TIMM_V3_BN_EPS))
    return out


def to_flax(state_dict: dict[str, np.ndarray], model: str, *, source: str = "state_dict",
            dtype=np.float32) -> dict:
    """``{'params', 'batch_stats'}`` (nested dicts of ``dtype`` numpy arrays) of kdjax's network of
    the timm ``model`` (``resnet50``, ``vit_base_patch16_224``, ...; ``timm_cfgs.ARCHS``) from
    timm's state_dict of it. ``num_classes`` is read from the head's weight.

    Raises :class:`kdjax.models.torchvision.WeightMappingError` naming the missing, unexpected and
    misshaped keys (timm's names and shapes); ``source`` names the file.
    """
    if model not in ARCHS:
        raise tv.WeightMappingError(f"unknown timm model {model!r}: expected one of {sorted(ARCHS)}")
    arch, key = ARCHS[model], head_key(model)
    fc = state_dict.get(key)
    if fc is None or np.ndim(fc) != 2:
        got = "missing" if fc is None else f"of shape {np.shape(fc)}"
        hint = (f" (the file has torchvision's {tv.head_key(arch)}: convert it as a torchvision {arch})"
                if tv.head_key(arch) in state_dict else "")
        raise tv.WeightMappingError(
            f"{source}: {key} is {got}; a timm {model} state_dict has a 2-D {key}, which also gives the "
            f"number of classes{hint}")
    num_classes = int(np.shape(fc)[0])
    table = _table(model, num_classes)
    unexpected = [k for k in state_dict if k not in table]
    missing = [k for k, (_, shape, _) in table.items() if shape is not None and k not in state_dict]
    misshaped = [f"{k} is {tuple(np.shape(v))}, expected {table[k][1]}" for k, v in state_dict.items()
                 if k in table and table[k][1] is not None and tuple(np.shape(v)) != table[k][1]]
    if unexpected or missing or misshaped:
        found = (("missing", missing), ("unexpected", unexpected), ("misshaped", misshaped))
        parts = [f"{len(keys)} {kind} key(s): {tv._listing(keys)}" for kind, keys in found if keys]
        raise tv.WeightMappingError(
            f"{source} does not fit timm's {model} with {num_classes} classes (kdjax's {arch}): "
            + "; ".join(parts) + f". Check that the file holds timm.create_model('{model}').state_dict().")
    renamed = {table[k][0]: _LAYOUTS[table[k][2]][1](np.asarray(v)) for k, v in state_dict.items()}
    if model in _V3_STAGES:
        renamed = _fold_v3_eps(renamed)
    return tv.to_flax(renamed, arch, source=source, dtype=dtype)


def notes(w: TimmWeights) -> dict[str, str]:
    """What a user of ``w`` must know, one sentence per kind: ``bce`` (a head trained with binary
    cross-entropy), ``bn_eps`` (MobileNetV3: timm's BatchNorm eps folded), ``normalize`` (Normalize()
    statistics that kdjax's training engine does not apply to this architecture), ``license`` (a
    non-commercial licence); only the kinds that apply."""
    out = {}
    if w.bce:
        out["bce"] = (f"{w.tag}'s head was trained with binary cross-entropy: its logits are calibrated for "
                      "one sigmoid per class, not for a softmax: softmax probabilities, confidence thresholds and "
                      "distillation temperatures tuned on cross-entropy teachers read differently")
    if w.model in _V3_STAGES:
        out["bn_eps"] = (f"timm's BatchNorm eps {TIMM_V3_BN_EPS:g} is folded into the scales for kdjax's "
                         f"{mobilenet._V3_NORM['bn_epsilon']:g}: exact in eval mode, in train mode exact only "
                         "where the batch variance equals the running one")
    spec = registry.get(w.arch).input
    if (tuple(w.mean), tuple(w.std)) != (tuple(spec.mean), tuple(spec.std)):
        out["normalize"] = (f"{w.tag} expects Normalize(mean={list(w.mean)}, std={list(w.std)}): meta.json "
                            f"records it and a teacher read from this model directory sees it; a student "
                            f"started from it sees {w.arch}'s own statistics unless --mean "
                            f"{' '.join(f'{v:g}' for v in w.mean)} --std {' '.join(f'{v:g}' for v in w.std)} "
                            f"are given")
    if "nc" in w.license.split("-"):
        out["license"] = f"{w.tag} is licensed {w.license}: non-commercial use only"
    return out


# ----------------------------------------------------------------------------- hub files

def hub_url(w: TimmWeights) -> str:
    """The hub's URL of ``w``'s file (``$HF_ENDPOINT`` for a mirror)."""
    endpoint = os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT).rstrip("/")
    return f"{endpoint}/{w.hf_hub_id}/resolve/main/{HUB_FILENAME}"


def local_path(w: TimmWeights, weights_dir: os.PathLike = tv.DEFAULT_DIR) -> pathlib.Path:
    """Where kdjax keeps ``w``'s file: ``<weights_dir>/timm/<tag>/model.safetensors``."""
    return pathlib.Path(weights_dir) / w.hf_hub_id / HUB_FILENAME


def _hub_cache() -> pathlib.Path:
    """huggingface_hub's cache: ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return pathlib.Path(os.environ["HF_HUB_CACHE"]).expanduser()
    return pathlib.Path(os.environ.get("HF_HOME", "~/.cache/huggingface")).expanduser() / "hub"


def _cached(w: TimmWeights) -> pathlib.Path | None:
    """``w``'s file in the hub cache (``timm.create_model(..., pretrained=True)`` puts it there):
    the snapshot ``refs/main`` names, else the newest snapshot holding it."""
    repo = _hub_cache() / ("models--" + w.hf_hub_id.replace("/", "--"))
    ref = repo / "refs" / "main"
    if ref.is_file():
        path = repo / "snapshots" / ref.read_text().strip() / HUB_FILENAME
        if path.is_file():
            return path
    snapshots = sorted((repo / "snapshots").glob(f"*/{HUB_FILENAME}"), key=lambda p: p.stat().st_mtime)
    return snapshots[-1] if snapshots else None


def find_file(w: TimmWeights, weights_dir: os.PathLike = tv.DEFAULT_DIR) -> pathlib.Path | None:
    """``w``'s file under ``weights_dir`` (``local_path``), else in the hub cache, else None."""
    path = local_path(w, weights_dir)
    return path if path.is_file() else _cached(w)


def fetch(name: str, dest_dir: os.PathLike = tv.DEFAULT_DIR) -> pathlib.Path:
    """The file of the timm ``name`` (``resnet50.a1_in1k``; a bare model name is timm's default
    tag): found by ``find_file``, else downloaded from the hub to ``local_path``.

    timm publishes no checksum for its hub files, so none is checked here: the download reaches
    its place only complete, and loading it checks every tensor's name and shape. Unreachable,
    raises :class:`kdjax.fetch.DownloadError` with one line naming the URL and where to put the file.
    """
    w = get(name)
    found = find_file(w, dest_dir)
    if found is not None:
        return found
    url, dest = hub_url(w), local_path(w, dest_dir)

    def unreachable(reason: str) -> DownloadError:
        return DownloadError(
            f"could not download {url} ({' '.join(reason.split())}). Fetch that file on a machine with network "
            f"and place it at {dest} (a copy in the Hugging Face hub cache, {_hub_cache()}, is used too); timm "
            "publishes no checksum for it, so kdjax checks its tensors when it loads the file.")

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):  # huggingface_hub's switch
        raise unreachable("HF_HUB_OFFLINE is set")
    try:
        return download(url, dest, sha256=None)
    except DownloadError as err:
        raise unreachable(str(err.__cause__ or err)) from err.__cause__


def timm_variables(name: str, arch: str, num_classes: int, key, *,
                   weights_dir: os.PathLike = tv.DEFAULT_DIR) -> tuple[dict, dict]:
    """timm's weights ``name`` for kdjax's ``arch``, their file found or fetched (``fetch``), with
    a fresh torch-style head unless ``num_classes`` is the tag's own. Returns ``(variables,
    provenance)``; ``arch`` must be the one that computes timm's model (``timm_cfgs.ARCHS``)."""
    w = get(name)
    if w.arch != arch:
        same = sorted(m for m, a in ARCHS.items() if a == arch)
        raise ValueError(f"timm:{name} is timm's {w.model}, which is kdjax's {w.arch}, not {arch}: choose "
                         f"--arch {w.arch}" + (f", or timm:{same[0]} for a {arch}" if same else ""))
    path = fetch(name, weights_dir)
    variables = to_flax(load_state_dict(path), w.model, source=str(path))
    if registry.num_outputs(arch, variables) != num_classes:
        variables = registry.replace_head(arch, variables, key, num_classes)
    provenance = {"init": f"timm:{w.tag}", "timm_tag": w.tag, "hf_hub_id": w.hf_hub_id, "url": hub_url(w),
                  "source_file": str(path.absolute()), "source_sha256": sha256_file(path),
                  "license": w.license, "bce_head": w.bce, "notes": list(notes(w).values())}
    return variables, provenance
