"""kdjax.models.torchfile and kdjax.weights: safe reading of torch.save files, strict name mapping, CLI.

torch and torchvision are used here only to write reference files and numbers; kdjax itself
never imports them. The exhaustive logits parity (both archs, eval and train mode) lives in
tests/test_models.py; this file checks the mapping with one light eval-mode comparison.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import os
import pathlib
import pickle
import subprocess
import sys
import zipfile

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
import torchvision

from kdjax import checkpoint, models, weights
from kdjax.cli import weights as cli_weights
from kdjax.fetch import DownloadError, download
from kdjax.models.torchfile import TorchFileError, UnsafePickleError, load_state_dict
from torch_reference import images, numpy_state_dict, torch_forward, torch_resnet

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Same justification as tests/test_models.py: float32 sums of ~10^3..10^4 terms in different
# orders (oneDNN vs XLA) move logits by ~1e-6..1e-5 through 18 layers; mapping mistakes
# (a missed transpose, swapped BN statistics) move them by >= 1e-2.
LOGITS_TOL = 1e-4


def _tree_equal(a: dict, b: dict) -> bool:
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    return ta == tb and all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(la, lb))


# ----------------------------------------------------------------------------- conversion

def test_state_dict_file_gives_torchvision_logits(tmp_path):
    net = torch_resnet("resnet18").eval()
    torch.save(net.state_dict(), tmp_path / "r18.pth")
    variables = weights.to_flax(load_state_dict(tmp_path / "r18.pth"), "resnet18")
    x = images(2, 64)
    logits = models.create_model("resnet18", 2).apply(variables, x, train=False)
    err = float(np.max(np.abs(np.asarray(logits) - torch_forward(net, x))))
    assert err <= LOGITS_TOL, f"max |logit difference| {err:.2e}"


# every family's module classes (torchvision.ops blocks, ViT's functools.partial norm layer)
@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large",
                                  "efficientnet_b0", "convnext_tiny", "vit_b_16"])
def test_whole_module_file_equals_its_state_dict(tmp_path, arch):
    torch.manual_seed(0)
    net = torch_resnet(arch) if arch.startswith("resnet") else getattr(torchvision.models, arch)(num_classes=3)
    torch.save(net, tmp_path / "module.pt")
    torch.save(net.state_dict(), tmp_path / "state.pth")

    from_module = load_state_dict(tmp_path / "module.pt")
    from_state = load_state_dict(tmp_path / "state.pth")
    expected = numpy_state_dict(net)
    # same keys in the same order as model.state_dict(), num_batches_tracked included
    assert list(from_module) == list(from_state) == list(expected)
    for key, value in expected.items():
        for got in (from_module[key], from_state[key]):
            assert got.dtype == value.dtype and np.array_equal(got, value), key
    assert _tree_equal(weights.to_flax(from_module, arch), weights.to_flax(from_state, arch))


def _saved_as_users_save(net, root) -> dict[str, object]:
    """The files a teacher arrives in: training-loop dicts (torchvision's reference scripts keep
    the weights under "model" beside optimizer, epoch and args; most loops under
    "state_dict"), DataParallel's "module." keys, and safetensors."""
    import argparse

    from safetensors.numpy import save_file

    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    files = {
        "reference_script.pth": {"model": net.state_dict(), "optimizer": opt.state_dict(), "epoch": 3,
                                 "args": argparse.Namespace(lr=0.1, arch="resnet18")},
        "loop.pth": {"epoch": 7, "state_dict": net.state_dict(), "best_acc": 0.93},
        "data_parallel.pth": torch.nn.DataParallel(net).state_dict(),
        "whole_in_dict.pt": {"model": net, "epoch": 1},
    }
    for name, obj in files.items():
        torch.save(obj, root / name)
    save_file(numpy_state_dict(net), str(root / "weights.safetensors"))
    return files


def test_teacher_files_as_users_have_them(tmp_path):
    net = torch_resnet("resnet18")
    names = list(_saved_as_users_save(net, tmp_path)) + ["weights.safetensors"]
    expected = numpy_state_dict(net)  # after the optimiser step the files were saved with
    for name in names:
        got = load_state_dict(tmp_path / name)
        if name.endswith(".safetensors"):  # the format keeps no order
            assert sorted(got) == sorted(expected)
        else:
            assert list(got) == list(expected), name
        assert all(got[k].dtype == v.dtype and np.array_equal(got[k], v) for k, v in expected.items()), name
    with pytest.raises(TorchFileError, match=r"neither a state_dict nor holds one under 'state_dict'"):
        torch.save({"epoch": 1, "weights_here": {"a": 1}}, tmp_path / "odd.pth")
        load_state_dict(tmp_path / "odd.pth")
    # a mismatch names every missing, unexpected and misshaped key in one error
    bad = dict(expected)
    bad.pop("layer1.0.conv1.weight")
    bad["extra.weight"] = np.zeros(3, np.float32)
    bad["fc.bias"] = np.zeros(5, np.float32)
    with pytest.raises(weights.WeightMappingError,
                       match=r"1 missing key\(s\): layer1.0.conv1.weight; 1 unexpected key\(s\): extra.weight; "
                             r"1 misshaped key\(s\): fc.bias is \(5,\), expected \(2,\)"):
        weights.to_flax(bad, "resnet18")


def test_module_file_follows_state_dict_rules(tmp_path):
    """Parameters set to None and non-persistent buffers are left out, as torch does."""
    net = torch.nn.Sequential(torch.nn.Linear(3, 2, bias=False), torch.nn.BatchNorm1d(2))
    net[0].register_buffer("scratch", torch.ones(1), persistent=False)
    net[0].register_buffer("kept", torch.full((2,), 3.0))
    torch.save(net, tmp_path / "net.pt")
    got = load_state_dict(tmp_path / "net.pt")
    expected = numpy_state_dict(net)
    assert list(got) == list(expected) == [
        "0.weight", "0.kept", "1.weight", "1.bias", "1.running_mean", "1.running_var",
        "1.num_batches_tracked"]
    assert all(np.array_equal(got[k], expected[k]) for k in expected)


def test_dtypes_views_and_shared_storages(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tensors = {
        "transposed_view": base.t(),                           # non-contiguous strides
        "offset_slice": base[1:3, 2:5],                        # offset into a shared storage
        "half": torch.linspace(-2, 2, 7).half(),
        "bfloat16": torch.linspace(-2, 2, 7).bfloat16()[1::2],
        "int64_scalar": torch.tensor(7),
        "bool": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 3),
        "float64": torch.randn(3, dtype=torch.float64),
        "uint16": torch.arange(6).to(torch.uint16).reshape(2, 3),  # UntypedStorage + v3
    }
    torch.save(tensors, tmp_path / "misc.pt")
    got = load_state_dict(tmp_path / "misc.pt")
    assert list(got) == list(tensors)
    for key, t in tensors.items():
        want = t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()
        assert got[key].shape == tuple(t.shape), key
        if t.dtype == torch.bfloat16:
            assert got[key].dtype == ml_dtypes.bfloat16
        else:
            assert got[key].dtype == want.dtype, key
        np.testing.assert_array_equal(got[key].astype(want.dtype), want, err_msg=key)
        assert got[key].flags.c_contiguous and got[key].flags.owndata, key


# Hand-made archives: what torch itself never writes (big-endian storages, hostile geometry).

class _StorageRef:
    def __init__(self, key: str, numel: int):
        self.key, self.numel = key, numel


class _TensorRef:
    def __init__(self, storage: _StorageRef, offset: int, size: tuple, stride: tuple):
        self.args = (storage, offset, size, stride, False, collections.OrderedDict())

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, self.args


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            return ("storage", torch.FloatStorage, obj.key, "cpu", obj.numel)
        return None


def _write_archive(path, obj, records: dict[str, bytes], byteorder: str = "little"):
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(obj)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", buf.getvalue())
        z.writestr("archive/byteorder", byteorder)
        for key, data in records.items():
            z.writestr(f"archive/data/{key}", data)
    return path


def test_big_endian_storages_are_swapped(tmp_path):
    storage = _StorageRef("0", 6)
    obj = {"w": _TensorRef(storage, 0, (2, 3), (1, 2))}
    big_endian = np.arange(6, dtype=">f4").tobytes()
    path = _write_archive(tmp_path / "be.pt", obj, {"0": big_endian}, byteorder="big")
    got = load_state_dict(path)["w"]
    np.testing.assert_array_equal(got, np.arange(6, dtype=np.float32).reshape(3, 2).T)
    assert got.dtype == np.float32


@pytest.mark.parametrize("offset,size,stride,records,match", [
    (4, (3,), (1,), {"0": np.zeros(6, "<f4").tobytes()}, "reads element 6 of 6"),
    (0, (2, 3), (10, 1), {"0": np.zeros(6, "<f4").tobytes()}, "reads element 12 of 6"),
    (0, (6,), (1,), {"0": np.zeros(2, "<f4").tobytes()}, "holds 8 bytes"),
    (0, (6,), (1,), {}, "data/0 is missing"),
])
def test_hostile_tensor_geometry_is_refused(tmp_path, offset, size, stride, records, match):
    obj = {"w": _TensorRef(_StorageRef("0", 6), offset, size, stride)}
    path = _write_archive(tmp_path / "bad.pt", obj, records)
    with pytest.raises(TorchFileError, match=match):
        load_state_dict(path)


# ----------------------------------------------------------------------------- safety

class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickle_that_runs_code_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"fc.weight": torch.ones(2, 2), "payload": _Evil(str(marker))}, path)
    with pytest.raises(UnsafePickleError, match=rf"{os.system.__module__}\.system") as info:
        load_state_dict(path)
    assert str(path) in str(info.value)
    assert not marker.exists()


class _CustomModule(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 2)


def test_module_classes_outside_torch_nn_and_torchvision_are_refused(tmp_path):
    torch.save(_CustomModule(), tmp_path / "custom.pt")
    with pytest.raises(UnsafePickleError, match=r"test_weights\._CustomModule"):
        load_state_dict(tmp_path / "custom.pt")


@pytest.mark.parametrize("pkl,match", [
    # BUILD with a slot state on an allowed global: would set attributes on collections.OrderedDict
    (b"\x80\x02ccollections\nOrderedDict\nN}X\x04\x00\x00\x00evilK\x01s\x86b.",
     "tried to set 'evil'"),
    # a module stub called with arguments (torch builds modules with NEWOBJ and none)
    (b"\x80\x02ctorch.nn.modules.conv\nConv2d\nK\x01\x85R.", "constructed with arguments"),
])
def test_allowed_globals_cannot_be_abused(tmp_path, pkl, match):
    with zipfile.ZipFile(tmp_path / "odd.pt", "w") as z:
        z.writestr("archive/data.pkl", pkl)
    with pytest.raises(UnsafePickleError, match=match):
        load_state_dict(tmp_path / "odd.pt")
    assert not hasattr(collections.OrderedDict, "evil")


def test_legacy_and_non_torch_files_are_refused(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(TorchFileError, match="legacy"):
        load_state_dict(tmp_path / "legacy.pt")
    (tmp_path / "noise.pth").write_bytes(os.urandom(256))
    with pytest.raises(TorchFileError, match="not a PyTorch checkpoint"):
        load_state_dict(tmp_path / "noise.pth")
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as z:
        z.writestr("readme.txt", "hello")
    with pytest.raises(TorchFileError, match="data.pkl"):
        load_state_dict(tmp_path / "other.zip")


# ----------------------------------------------------------------------------- strict mapping

@pytest.fixture(scope="module")
def r18_state() -> dict[str, np.ndarray]:
    return numpy_state_dict(torch_resnet("resnet18"))


@pytest.mark.parametrize("edit,key,detail", [
    ("delete", "layer2.0.downsample.1.running_var", "1 missing key(s)"),
    ("add", "layer5.0.conv1.weight", "1 unexpected key(s)"),
    ("reshape", "layer1.0.conv2.weight", "is (64, 64, 1, 1), expected (64, 64, 3, 3)"),
    ("reshape", "fc.bias", "is (3,), expected (2,)"),
])
def test_mapping_failures_name_the_key(r18_state, edit, key, detail):
    sd = dict(r18_state)
    if edit == "delete":
        del sd[key]
    elif edit == "add":
        sd[key] = np.zeros((64, 64, 3, 3), np.float32)
    else:
        sd[key] = np.zeros((3,) if key == "fc.bias" else (64, 64, 1, 1), np.float32)
    with pytest.raises(weights.WeightMappingError) as info:
        weights.to_flax(sd, "resnet18", source="edited.pth")
    message = str(info.value)
    assert key in message and detail in message and "edited.pth" in message


def test_missing_head_names_fc_weight(r18_state):
    sd = {k: v for k, v in r18_state.items() if k != "fc.weight"}
    with pytest.raises(weights.WeightMappingError, match="fc.weight is missing"):
        weights.to_flax(sd, "resnet18")


# ----------------------------------------------------------------------------- ImageNet files

def test_imagenet_variables_without_the_file_says_how_to_fetch(tmp_path):
    with pytest.raises(weights.WeightsNotFoundError) as info:
        weights.imagenet_variables("resnet18", 2, jax.random.key(0), weights_dir=tmp_path)
    message = str(info.value)
    assert "python -m kdjax.weights fetch --arch resnet18" in message
    assert weights.IMAGENET_WEIGHTS["resnet18"].url in message


def test_imagenet_variables_replace_the_head(tmp_path, monkeypatch):
    # A stand-in for resnet18-f37072fd.pth (random 1000-class weights) registered under its
    # own checksum: the real file is not downloadable here.
    torch.manual_seed(0)
    name = weights.IMAGENET_WEIGHTS["resnet18"].filename
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / name)
    from kdjax.fetch import sha256_file

    monkeypatch.setitem(weights.IMAGENET_WEIGHTS, "resnet18", dataclasses.replace(
        weights.IMAGENET_WEIGHTS["resnet18"], sha256=sha256_file(tmp_path / name)))
    full = weights.to_flax(load_state_dict(tmp_path / name), "resnet18")

    same = weights.imagenet_variables("resnet18", 1000, jax.random.key(0), weights_dir=tmp_path)
    assert _tree_equal(same, full)
    student = weights.imagenet_variables("resnet18", 2, jax.random.key(0), weights_dir=tmp_path)
    head = student["params"].pop("fc")
    full["params"].pop("fc")
    assert _tree_equal(student, full)
    assert head["kernel"].shape == (512, 2) and head["bias"].shape == (2,)
    bound = 1 / np.sqrt(512)
    assert all(np.abs(a).max() <= bound for a in head.values())
    assert head["kernel"].std() > bound / 2  # U(-b, b) has std b/sqrt(3): not zeros, not tiny


def test_init_imagenet_fetches_a_missing_file_and_offline_says_where_to_put_it(tmp_path, monkeypatch, capsys):
    """``--init imagenet`` downloads torchvision's file into third_party_weights/ when it is
    missing (here from a file:// stand-in registered under its own checksum), verifies it and
    loads it; unreachable, it stops with the URL and the destination, leaving no partial file."""
    torch.manual_seed(0)
    w = weights.IMAGENET_WEIGHTS["resnet18"]
    published = tmp_path / "published" / w.filename
    published.parent.mkdir()
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), published)
    from kdjax.fetch import sha256_file

    monkeypatch.chdir(tmp_path)  # third_party_weights/ is relative to the working directory
    monkeypatch.setitem(weights.IMAGENET_WEIGHTS, "resnet18", dataclasses.replace(
        w, url=published.as_uri(), sha256=sha256_file(published)))
    variables, provenance = weights.initial_variables("imagenet", "resnet18", 2, jax.random.key(0))
    fetched = tmp_path / "third_party_weights" / w.filename
    assert fetched.read_bytes() == published.read_bytes()
    assert provenance["init"] == "imagenet"
    want = weights.to_flax(load_state_dict(published), "resnet18")
    variables["params"].pop("fc"), want["params"].pop("fc")  # a fresh 2-class head replaces the 1000-class one
    assert _tree_equal(variables, want)
    assert f"downloading {published.as_uri()}" in capsys.readouterr().err

    fetched.unlink()
    gone = tmp_path / "nowhere" / w.filename
    monkeypatch.setitem(weights.IMAGENET_WEIGHTS, "resnet18", dataclasses.replace(w, url=gone.as_uri()))
    with pytest.raises(DownloadError) as info:
        weights.initial_variables("imagenet", "resnet18", 2, jax.random.key(0))
    message = str(info.value)
    assert gone.as_uri() in message and str(pathlib.Path("third_party_weights") / w.filename) in message
    assert not list((tmp_path / "third_party_weights").iterdir())


def test_imagenet_variables_refuse_a_corrupt_file(tmp_path):
    (tmp_path / weights.IMAGENET_WEIGHTS["resnet18"].filename).write_bytes(b"not the weights")
    with pytest.raises(DownloadError, match="SHA-256"):
        weights.imagenet_variables("resnet18", 2, jax.random.key(0), weights_dir=tmp_path)


def test_every_architecture_has_its_imagenet_file_and_transform():
    from kdjax.models import imagenet

    # every torchvision architecture (the CIFAR networks have none: their ModelSpec.torchvision is "none")
    assert set(weights.IMAGENET_WEIGHTS) == {a for a, spec in models.ARCHS.items() if spec.torchvision != "none"}
    for arch, w in weights.IMAGENET_WEIGHTS.items():
        assert w.name == "IMAGENET1K_V1" and w.url.startswith("https://download.pytorch.org/models/")
        assert len(w.hash_prefix) >= 8 and (w.sha256 is None or w.sha256.startswith(w.hash_prefix))
        spec = models.get(arch).input  # the architecture's transform is its V1 weight's
        assert (spec.crop_size, spec.resize_size, spec.interpolation) == (w.crop_size, w.resize_size,
                                                                          w.interpolation), arch
    assert imagenet.verification(weights.IMAGENET_WEIGHTS["resnet18"]) == "sha256"
    assert imagenet.verification(weights.IMAGENET_WEIGHTS["convnext_tiny"]) == "prefix"


def _registered_as_torchvision_file(monkeypatch, path, arch: str, name: str):
    """Stand in for torchvision's file ``name`` of ``arch`` with the random file ``path``: the
    table entry renamed after the file's own hash prefix (the real files cannot be fetched)."""
    from kdjax.fetch import sha256_file
    from kdjax.models import imagenet

    w = imagenet.get(arch, name)
    stem = w.filename.rsplit("-", 1)[0]
    fake = dataclasses.replace(w, url=w.url.rsplit("/", 1)[0] + f"/{stem}-{sha256_file(path)[:8]}.pth")
    monkeypatch.setitem(imagenet.WEIGHTS, arch, {**imagenet.WEIGHTS[arch], name: fake})
    return fake


def test_files_without_a_full_digest_are_checked_by_torchvisions_hash_prefix(tmp_path, monkeypatch):
    torch.manual_seed(0)
    src = tmp_path / "src.pth"
    torch.save(torchvision.models.mobilenet_v3_small(weights=None).state_dict(), src)
    fake = _registered_as_torchvision_file(monkeypatch, src, "mobilenet_v3_small", "IMAGENET1K_V1")
    monkeypatch.setitem(weights.IMAGENET_WEIGHTS, "mobilenet_v3_small", fake)
    src.rename(tmp_path / fake.filename)
    variables = weights.imagenet_variables("mobilenet_v3_small", 2, jax.random.key(0), weights_dir=tmp_path)
    assert models.num_outputs("mobilenet_v3_small", variables) == 2
    (tmp_path / fake.filename).write_bytes(b"truncated")
    with pytest.raises(DownloadError, match=f"does not start with {fake.hash_prefix}"):
        weights.imagenet_variables("mobilenet_v3_small", 2, jax.random.key(0), weights_dir=tmp_path)


def test_converting_a_known_torchvision_file_records_its_own_eval_transform(tmp_path, monkeypatch):
    # resnet50 IMAGENET1K_V2 is evaluated at resize 232 (V1: 256); efficientnet_b0's is bicubic
    torch.manual_seed(0)
    src = tmp_path / "r50.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), src)
    _registered_as_torchvision_file(monkeypatch, src, "resnet50", "IMAGENET1K_V2")
    meta = weights.convert(src, tmp_path / "v2", arch="resnet50")
    assert (meta.image_size, meta.resize_size, meta.interpolation) == (224, 232, "bilinear")
    assert meta.provenance["source_weights"] == "IMAGENET1K_V2"
    torch.save(torchvision.models.efficientnet_b0(weights=None).state_dict(), tmp_path / "b0.pth")
    meta = weights.convert(tmp_path / "b0.pth", tmp_path / "b0", arch="efficientnet_b0")  # unknown file
    assert (meta.resize_size, meta.interpolation) == (256, "bicubic")  # the architecture's V1 transform
    assert "source_weights" not in meta.provenance
    assert checkpoint.load_model(tmp_path / "b0")[2].interpolation == "bicubic"


@pytest.mark.parametrize("arch,num_params", [("resnet18", 11_689_512), ("resnet50", 25_557_032)])
def test_real_imagenet_files_when_present(arch, num_params):
    path = os.path.join(REPO, "third_party_weights", weights.IMAGENET_WEIGHTS[arch].filename)
    if not os.path.exists(path):
        pytest.skip(f"{path} not fetched (python -m kdjax.weights fetch --arch {arch})")
    variables = weights.imagenet_variables(
        arch, 1000, jax.random.key(0), weights_dir=os.path.dirname(path))
    assert models.count_params(variables["params"]) == num_params


def test_download_offline_names_url_and_destination(tmp_path):
    url = "http://127.0.0.1:9/resnet18-f37072fd.pth"  # discard port: refused at once, no network
    dest = tmp_path / "third_party_weights" / "resnet18-f37072fd.pth"
    with pytest.raises(DownloadError) as info:
        download(url, dest, "0" * 64, timeout=5)
    assert url in str(info.value) and str(dest) in str(info.value)
    assert not dest.exists() and not dest.with_name(dest.name + ".part").exists()


# ----------------------------------------------------------------------------- command line

def _run_cli(args: list[str], cwd, **env) -> subprocess.CompletedProcess:
    path = os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])
    full_env = {**os.environ, "PYTHONPATH": path, **env}
    return subprocess.run([sys.executable, "-m", "kdjax.weights", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=300)


def test_cli_convert_writes_a_model_directory(tmp_path):
    net = torch_resnet("resnet18")
    torch.save(net, tmp_path / "student.pt")
    out = tmp_path / "student"
    result = _run_cli(["convert", "--arch", "resnet18", "--src", str(tmp_path / "student.pt"),
                       "--out", str(out), "--class-names", "ants,bees"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    model, variables, meta = checkpoint.load_model(out, arch="resnet18")
    assert meta.class_names == ("ants", "bees") and meta.num_classes == 2
    assert meta.provenance["source_file"] == "student.pt"
    assert meta.provenance["converted_by"] == "kdjax.weights"
    assert len(meta.provenance["source_sha256"]) == 64 and "source_url" not in meta.provenance
    expected = weights.to_flax(numpy_state_dict(net), "resnet18")
    assert _tree_equal(jax.tree_util.tree_map(np.asarray, variables), expected)


@pytest.mark.parametrize("names,match", [("ants,bees,wasps", "3 class names"),
                                         ("ants,,bees", "empty name")])
def test_cli_bad_class_names_exit_2_with_one_line(tmp_path, capsys, names, match):
    torch.save(torch_resnet("resnet18").state_dict(), tmp_path / "r18.pth")
    code = cli_weights.main(["convert", "--arch", "resnet18", "--src", str(tmp_path / "r18.pth"),
                         "--out", str(tmp_path / "out"), "--class-names", names])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("kdjax.weights: error: --class-names:") and match in err
    assert not (tmp_path / "out").exists()


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert cli_weights.main(["convert", "--arch", "resnet18", "--src", str(tmp_path / "none.pth"),
                         "--out", str(tmp_path / "out")]) == 2
    assert cli_weights.main(["convert", "--arch", "vgg999", "--src", "x", "--out", "y"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and all(line.startswith("kdjax.weights: error: ") for line in lines)
    assert "none.pth" in lines[0] and "--arch" in lines[1]


def test_cli_fetch_offline_names_the_url(tmp_path):
    # Every HTTP(S) request goes to a proxy on the discard port, which refuses at once: the
    # test never depends on the real download host or on this machine being offline.
    proxy = "http://127.0.0.1:9"
    result = _run_cli(["fetch", "--arch", "resnet18"], cwd=tmp_path, https_proxy=proxy,
                      HTTPS_PROXY=proxy, http_proxy=proxy, HTTP_PROXY=proxy, no_proxy="",
                      NO_PROXY="")
    spec = weights.IMAGENET_WEIGHTS["resnet18"]
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("kdjax.weights")]
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert spec.url in lines[0] and f"third_party_weights/{spec.filename}" in lines[0]
    assert not (tmp_path / "third_party_weights" / spec.filename).exists()
