"""kdjax.models.timm, kdjax.models.timm_cfgs and the timm paths of kdjax.weights: timm's files
mapped strictly onto kdjax's networks, with timm's function, and ``--init timm:NAME``.

timm, torch and safetensors are used here only to build reference networks, files and numbers;
kdjax never imports them.
"""

from __future__ import annotations

import functools
import json
import pathlib
import re

import jax
import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from kdjax import checkpoint, models, weights
from kdjax.cli import weights as cli_weights
from kdjax.fetch import DownloadError
from kdjax.models import timm as kt, timm_cfgs
from kdjax.models.torchfile import load_state_dict

# float32 sums in different orders (oneDNN vs XLA) move these softmaxes by ~1e-7..1e-6; a mapping
# mistake (a swapped BatchNorm statistic, a missed reshape, an unfolded eps) moves them by >= 1e-3.
SOFTMAX_TOL = 1e-4
NUM_CLASSES = 10
OFFLINE = "http://127.0.0.1:9"  # the discard port: refused at once, so no test needs the network


def _size(model: str) -> int:
    """The smallest side each network takes: ViT-B/16's position embedding fixes 224."""
    return 224 if model == "vit_base_patch16_224" else 64


def _randomised(net: torch.nn.Module, x_nhwc: np.ndarray, seed: int) -> torch.nn.Module:
    """``net`` with weights a trained network could have: Linear layers N(0, 1/fan_in) (timm starts
    them near 0, which would hide their mistakes in near-uniform softmaxes), ConvNeXt's layer
    scales U(0.1, 0.5) (timm: 1e-6), ViT's class token and position embedding N(0, 0.5), norm
    affines U(0.5, 1.5) / N(0, 0.1), BatchNorm running statistics those of the test batch
    ``x_nhwc`` (so that eval mode stays in the range train mode normalised: statistics of other
    images, over EfficientNet's 2x2 maps at 64 px, drive a random network's logits to ~1e2),
    then perturbed. A quarter of each BatchNorm's channels get a small running variance (x 1e-3, the
    scale shrunk to match), as trained depthwise channels have: there eps 1e-5 and 1e-3 differ.
    The last BatchNorm of each ResNet block is scaled by 0.3 (timm and torchvision initialise it
    at 0; trained ones stay small): with O(1) branches a random ResNet-152's 50 blocks amplify
    float32 round-off to ~2e-4 in the softmax, timm's own float32 as much as kdjax's."""
    gen = torch.Generator().manual_seed(seed)
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    last_bns = [m.bn3 if hasattr(m, "bn3") else m.bn2 for m in net.modules()
                if type(m).__name__ in ("BasicBlock", "Bottleneck")]
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.normal_(0.0, m.in_features ** -0.5, generator=gen)
                m.bias.normal_(0.0, 0.1, generator=gen)
            if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.LayerNorm)):
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.normal_(0.0, 0.1, generator=gen)
        for name, p in net.named_parameters():
            if name.endswith("gamma"):
                p.uniform_(0.1, 0.5, generator=gen)
            if name in ("cls_token", "pos_embed"):
                p.normal_(0.0, 0.5, generator=gen)
        for m in last_bns:
            m.weight.mul_(0.3)
            m.bias.mul_(0.3)
        for m in bns:
            m.momentum = None  # the calibration batch's statistics
        if bns:
            net.train()(torch.from_numpy(x_nhwc).permute(0, 3, 1, 2).contiguous())
        for m in bns:
            m.running_mean.add_(0.05 * torch.randn(m.num_features, generator=gen) * m.running_var.sqrt())
            m.running_var.mul_(torch.empty(m.num_features).uniform_(0.8, 1.25, generator=gen))
            small = torch.rand(m.num_features, generator=gen) < 0.25
            m.running_var[small] *= 1e-3
            m.weight[small] *= 1e-3 ** 0.5
            m.num_batches_tracked.fill_(7)
    return net.eval()


def _inputs(w: timm_cfgs.TimmWeights, size: int, seed: int = 0) -> np.ndarray:
    """Two random images [2, size, size, 3] as ``w``'s preprocessing leaves them: pixels in
    [0, 1] normalised with its mean and std."""
    pixels = np.random.default_rng(seed).integers(0, 256, (2, size, size, 3)).astype(np.float32) / 255
    return ((pixels - np.asarray(w.mean, np.float32)) / np.asarray(w.std, np.float32)).astype(np.float32)


def _timm_probabilities(net: torch.nn.Module, x_nhwc: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return torch.softmax(net(torch.from_numpy(x_nhwc).permute(0, 3, 1, 2).contiguous()), -1).numpy()


@functools.partial(jax.jit, static_argnums=0)
def _probabilities(model, variables, x):
    return jax.nn.softmax(model.apply(variables, x, train=False), -1)


def _numpy(net: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}


def _zeros(model: str, num_classes: int) -> dict[str, np.ndarray]:
    """timm's state_dict keys and shapes of ``model``, filled with zeros (built on torch's meta
    device: no initialisation to wait for), for the tests of names and shapes."""
    with torch.device("meta"):
        net = timm.create_model(model, pretrained=False, num_classes=num_classes)
    return {k: np.zeros(v.shape, np.float32 if v.is_floating_point() else np.int64)
            for k, v in net.state_dict().items()}


# ----------------------------------------------------------------------------- parity

@pytest.mark.parametrize("model", list(timm_cfgs.ARCHS))
def test_timm_file_gives_timms_softmax(tmp_path, model):
    """A timm network with random weights, saved as the hub saves it (safetensors) and read back
    without torch, gives timm's softmax in kdjax's network, on timm's own preprocessing of the
    default tag. The figure printed is the report's."""
    w = timm_cfgs.get(model)
    x = _inputs(w, _size(model))
    torch.manual_seed(0)
    net = _randomised(timm.create_model(model, pretrained=False, num_classes=NUM_CLASSES), x, 1)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / kt.HUB_FILENAME))
    state = load_state_dict(tmp_path / kt.HUB_FILENAME)
    assert sorted(state) == sorted(net.state_dict())

    variables = kt.to_flax(state, model, source=kt.HUB_FILENAME)
    want = _timm_probabilities(net, x)
    got = np.asarray(_probabilities(models.create_model(w.arch, NUM_CLASSES), variables, x))
    err = float(np.max(np.abs(got - want)))
    print(f"{model}: max |softmax difference| {err:.2e}, top probability {want.max():.3f}")
    assert want.max(axis=1).min() > 1.5 / NUM_CLASSES, "near-uniform softmax: the test would not see mistakes"
    assert err <= SOFTMAX_TOL, f"{model}: max |softmax difference| {err:.2e}"


def test_mobilenetv3_needs_timms_batchnorm_eps_folded(monkeypatch):
    """Without folding timm's eps 1e-5 into the scales, kdjax's eps 1e-3 MobileNetV3 is another
    function: the parity above would fail by far more than its tolerance."""
    model = "mobilenetv3_small_100"
    w = timm_cfgs.get(model)
    x = _inputs(w, 64)
    torch.manual_seed(0)
    net = _randomised(timm.create_model(model, pretrained=False, num_classes=NUM_CLASSES), x, 1)
    want = _timm_probabilities(net, x)
    monkeypatch.setattr(kt, "TIMM_V3_BN_EPS", models.mobilenet._V3_NORM["bn_epsilon"])  # no fold
    unfolded = kt.to_flax(_numpy(net), model)
    got = np.asarray(_probabilities(models.create_model(w.arch, NUM_CLASSES), unfolded, x))
    assert float(np.max(np.abs(got - want))) > 100 * SOFTMAX_TOL


# ----------------------------------------------------------------------------- the table

def test_table_is_timms_pretrained_cfgs():
    """Golden: the shipped table equals timm 1.0.31's pretrained_cfgs (regenerate the table when
    timm's change); the first tag of each model is timm's default."""
    for w in timm_cfgs.TABLE:
        cfg = timm.models.get_pretrained_cfg(w.tag).to_dict()
        assert w.hf_hub_id == cfg["hf_hub_id"] == f"timm/{w.tag}" and cfg.get("hf_hub_filename") is None, w.tag
        assert (w.num_classes, w.crop_pct, w.interpolation) == (cfg["num_classes"], cfg["crop_pct"],
                                                               cfg["interpolation"]), w.tag
        assert cfg["input_size"] == (3, w.input_size, w.input_size) and cfg["crop_mode"] == "center", w.tag
        assert (w.mean, w.std) == (tuple(cfg["mean"]), tuple(cfg["std"])), w.tag
        test = cfg.get("test_input_size")
        assert w.test == (None if test is None else (test[1], cfg["test_crop_pct"])), w.tag
        assert w.license == cfg["license"], w.tag
        assert w.bce == (w.tag.split(".")[1].split("_")[0] in ("a1", "a1h", "a2", "a3")), w.tag
    for model, tag in timm_cfgs.DEFAULT.items():
        assert timm.models.get_pretrained_cfg(model).hf_hub_id == f"timm/{tag}"
        assert timm_cfgs.get(model).tag == tag


def test_names_and_tags():
    w = timm_cfgs.get("resnet50")
    assert (w.tag, w.arch, w.resize_size, w.bce) == ("resnet50.a1_in1k", "resnet50", 235, True)
    assert timm_cfgs.get("resnet50.tv2_in1k").resize_size == 201  # floor(176 / 0.875), timm's eval transform
    assert timm_cfgs.get("vit_base_patch16_224").arch == "vit_b_16"
    with pytest.raises(ValueError, match=r"'resnet50\.b1k_in1k' is not in kdjax's table.*'resnet50\.a1h_in1k'"):
        timm_cfgs.get("resnet50.b1k_in1k")
    with pytest.raises(ValueError, match=r"'vgg11' is not one kdjax loads.*'convnext_tiny'"):
        timm_cfgs.get("vgg11.tv_in1k")


# ----------------------------------------------------------------------------- strict mapping

@pytest.fixture(scope="module")
def r18() -> dict[str, np.ndarray]:
    torch.manual_seed(0)
    return _numpy(timm.create_model("resnet18", pretrained=False, num_classes=1000))


@pytest.mark.parametrize("model,edit,key,detail", [
    ("resnet18", "delete", "layer3.1.bn2.running_var", "1 missing key(s): layer3.1.bn2.running_var"),
    ("resnet18", "add", "layer5.0.conv1.weight", "1 unexpected key(s): layer5.0.conv1.weight"),
    ("mobilenetv3_small_100", "delete", "conv_head.weight", "1 missing key(s): conv_head.weight"),
    ("convnext_tiny", "reshape", "stages.0.blocks.0.gamma", "stages.0.blocks.0.gamma is (96, 1, 1), expected (96,)"),
    ("vit_base_patch16_224", "reshape", "pos_embed", "pos_embed is (1, 577, 768), expected (1, 197, 768)"),
])
def test_mapping_failures_name_timms_key(model, edit, key, detail):
    sd = _zeros(model, 3)
    if edit == "delete":
        del sd[key]
    elif edit == "add":
        sd[key] = np.zeros((64, 64, 3, 3), np.float32)
    else:
        sd[key] = np.zeros((96, 1, 1) if key.endswith("gamma") else (1, 577, 768), np.float32)
    with pytest.raises(weights.WeightMappingError) as info:
        kt.to_flax(sd, model, source="edited.safetensors")
    message = str(info.value)
    assert detail in message and "edited.safetensors" in message and f"timm's {model}" in message


def test_a_torchvision_file_is_named_as_one():
    import torchvision

    with torch.device("meta"):
        net = torchvision.models.convnext_tiny()
    sd = {k: np.zeros(v.shape, np.float32) for k, v in net.state_dict().items()}
    with pytest.raises(weights.WeightMappingError, match=r"head\.fc\.weight is missing.*torchvision's "
                                                         r"classifier\.2\.weight"):
        kt.to_flax(sd, "convnext_tiny")


# ----------------------------------------------------------------------------- conversion

def test_convert_records_the_tags_pretrained_cfg(tmp_path, r18, capsys):
    """``kdjax convert --from timm``: meta.json has the tag's transform, provenance its cfg and
    the BCE flag, and the warning is printed; the weights are those of the strict mapping."""
    save_file({k: torch.from_numpy(v) for k, v in r18.items()}, str(tmp_path / "model.safetensors"))
    out = tmp_path / "r18"
    code = cli_weights.main(["convert", "--from", "timm", "--arch", "resnet18", "--src",
                             str(tmp_path / "model.safetensors"), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 0, err
    assert err.startswith("kdjax.weights: warning: resnet18.a1_in1k's head was trained with binary cross-entropy")
    _, variables, meta = checkpoint.load_model(out, arch="resnet18")
    assert (meta.image_size, meta.resize_size, meta.interpolation) == (224, 235, "bicubic")
    assert (meta.mean, meta.std) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)) and meta.num_classes == 1000
    p = meta.provenance
    assert (p["timm_tag"], p["hf_hub_id"], p["crop_pct"], p["test_input_size"], p["bce_head"]) == (
        "resnet18.a1_in1k", "timm/resnet18.a1_in1k", 0.95, 288, True)
    assert p["source_url"] == "https://huggingface.co/timm/resnet18.a1_in1k/resolve/main/model.safetensors"
    want = kt.to_flax(r18, "resnet18")
    assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), b), variables, want))


def test_convert_records_other_statistics_which_a_teacher_sees(tmp_path):
    """The MIIL MobileNetV3 expects pixels in [0, 1] unnormalised, bilinear; its BatchNorm eps is
    folded; both are noted, the statistics with the flags a student needs for them; a teacher
    read from the model directory normalises with them."""
    torch.manual_seed(0)
    net = timm.create_model("mobilenetv3_large_100", pretrained=False, num_classes=1000)
    torch.save(net.state_dict(), tmp_path / "miil.pth")
    meta = weights.convert_timm(tmp_path / "miil.pth", tmp_path / "out", "mobilenetv3_large_100.miil_in21k_ft_in1k")
    assert meta.arch == "mobilenet_v3_large" and meta.interpolation == "bilinear"
    assert (meta.mean, meta.std, meta.resize_size) == ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), 256)
    notes = json.loads((tmp_path / "out" / checkpoint.META_FILE).read_text())["provenance"]["notes"]
    assert len(notes) == 2 and "eps 1e-05 is folded" in notes[0] and "a teacher read from" in notes[1]
    assert "unless --mean 0 0 0 --std 1 1 1 are given" in notes[1]
    from kdjax.engine import teachers

    assert teachers.recorded_normalization(checkpoint.read_meta(tmp_path / "out")) == ((0.0,) * 3, (1.0,) * 3)
    assert meta.provenance["bce_head"] is False


@pytest.mark.parametrize("args,match", [
    (["--from", "timm", "--arch", "resnet50.b1k_in1k"], "'resnet50.b1k_in1k' is not in kdjax's table"),
    (["--from", "timm", "--arch", "vgg11"], "'vgg11' is not one kdjax loads"),
    (["--arch", "resnet50.a1_in1k"], "invalid choice: 'resnet50.a1_in1k'.*needs --from timm"),
    (["--from", "timm", "--arch", "resnet18", "--class-names", "a,b"], r"--class-names: 2 class names.*\(fc\.weight\)"),
])
def test_cli_timm_errors_are_one_line(tmp_path, r18, capsys, args, match):
    save_file({k: torch.from_numpy(v) for k, v in r18.items()}, str(tmp_path / "model.safetensors"))
    code = cli_weights.main(["convert", *args, "--src", str(tmp_path / "model.safetensors"),
                             "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("kdjax.weights: error: "), err
    assert re.search(match, err), err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- --init timm:NAME

@pytest.fixture
def hub(tmp_path, monkeypatch, r18) -> pathlib.Path:
    """A stand-in hub (file://, via HF_ENDPOINT) holding timm/resnet18.a1_in1k's file, an empty hub
    cache, and the working directory where third_party_weights/ is looked for."""
    published = tmp_path / "hub" / "timm" / "resnet18.a1_in1k" / "resolve" / "main" / kt.HUB_FILENAME
    published.parent.mkdir(parents=True)
    save_file({k: torch.from_numpy(v) for k, v in r18.items()}, str(published))
    monkeypatch.setenv("HF_ENDPOINT", (tmp_path / "hub").as_uri())
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return published


def test_init_timm_fetches_from_the_hub_and_offline_says_where_to_put_the_file(hub, r18, monkeypatch, capsys):
    variables, provenance = weights.initial_variables("timm:resnet18", "resnet18", 2, jax.random.key(0))
    fetched = pathlib.Path("third_party_weights/timm/resnet18.a1_in1k/model.safetensors")
    assert fetched.read_bytes() == hub.read_bytes()
    assert (provenance["init"], provenance["bce_head"], provenance["url"]) == (
        "timm:resnet18.a1_in1k", True, hub.as_uri())
    assert f"downloading {hub.as_uri()}" in capsys.readouterr().err  # no BCE warning: the head is new
    want = kt.to_flax(r18, "resnet18")
    assert variables["params"].pop("fc")["kernel"].shape == (512, 2)
    want["params"].pop("fc")
    assert jax.tree.all(jax.tree.map(np.array_equal, variables, want))

    fetched.unlink()
    monkeypatch.setenv("HF_ENDPOINT", OFFLINE)
    with pytest.raises(DownloadError) as info:
        weights.initial_variables("timm:resnet18.a1_in1k", "resnet18", 2, jax.random.key(0))
    message = str(info.value)
    print(message)
    url = f"{OFFLINE}/timm/resnet18.a1_in1k/resolve/main/model.safetensors"
    assert "\n" not in message and url in message and f"place it at {fetched}" in message
    assert "timm publishes no checksum" in message
    assert not list(fetched.parent.iterdir())  # no partial file


def test_init_timm_reads_the_hub_cache_and_keeps_a_bce_head_with_a_warning(hub, monkeypatch, capsys):
    snapshot = pathlib.Path("../hf_cache/models--timm--resnet18.a1_in1k/snapshots/0123abc").resolve()
    snapshot.mkdir(parents=True)
    (snapshot / kt.HUB_FILENAME).write_bytes(hub.read_bytes())
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abc")
    monkeypatch.setenv("HF_ENDPOINT", OFFLINE)  # found in the cache: nothing downloaded
    variables, provenance = weights.initial_variables("timm:resnet18.a1_in1k", "resnet18", 1000, jax.random.key(0))
    assert provenance["source_file"] == str(snapshot / kt.HUB_FILENAME)
    assert models.num_outputs("resnet18", variables) == 1000
    assert "warning: resnet18.a1_in1k's head was trained with binary cross-entropy" in capsys.readouterr().err
    assert not pathlib.Path("third_party_weights").exists()


def test_init_timm_for_another_arch_says_which(hub):
    with pytest.raises(ValueError, match=r"timm:resnet18 is timm's resnet18, which is kdjax's resnet18, not "
                                         r"resnet50: choose --arch resnet18, or timm:resnet50 for a resnet50"):
        weights.initial_variables("timm:resnet18", "resnet50", 2, jax.random.key(0))
