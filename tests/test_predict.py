"""kdjax.predict: torchvision's eval transform + softmax, one JSON line per image, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import torch
import torchvision
from torchvision import transforms as T

from kdjax import checkpoint, weights
from kdjax.cli import weights as cli_weights
from kdjax.cli.predict import main
from torch_reference import numpy_state_dict, torch_resnet

VAL_IMAGES = ["ants/10308379_1b6c72e180.jpg", "bees/1032546534_06907fe3b3.jpg", "ants/desert_ant.jpg"]


def _model_dir(tmp_path):
    net = torch_resnet("resnet18").eval()
    checkpoint.save_model(
        tmp_path / "student",
        weights.to_flax(numpy_state_dict(net), "resnet18"),
        arch="resnet18",
        class_names=["ants", "bees"],
        provenance={"source": "test"},
    )
    return net, tmp_path / "student"


def test_predict_matches_torchvision_softmax_on_real_images(tmp_path, hymenoptera_dir, capsys):
    net, directory = _model_dir(tmp_path)
    paths = [str(hymenoptera_dir / "val" / p) for p in VAL_IMAGES]
    assert main(["--checkpoint", str(directory), *paths]) == 0
    results = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["path"] for r in results] == paths

    tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(),
                    T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    loader = torchvision.datasets.folder.default_loader
    with torch.no_grad():
        want = torch.softmax(net(torch.stack([tf(loader(p)) for p in paths])), -1).numpy()
    got = np.array([[r["probs"]["ants"], r["probs"]["bees"]] for r in results])
    err = np.max(np.abs(got - want))
    print(f"predict vs torchvision softmax: max|dp| = {err:.2e}")
    assert err <= 1e-4
    assert [r["label"] for r in results] == [["ants", "bees"][i] for i in want.argmax(1)]


def test_unreadable_image_is_reported_and_others_still_classified(tmp_path, hymenoptera_dir, capsys):
    _, directory = _model_dir(tmp_path)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    good = str(hymenoptera_dir / "val" / VAL_IMAGES[0])
    assert main(["--checkpoint", str(directory), str(broken), good, str(tmp_path / "missing.jpg")]) == 1
    captured = capsys.readouterr()
    assert [json.loads(line)["path"] for line in captured.out.splitlines()] == [good]
    errors = captured.err.strip().splitlines()
    assert len(errors) == 2 and "broken.jpg" in errors[0] and "missing.jpg" in errors[1]


def test_missing_directory_and_wrong_arch_fail_in_one_line(tmp_path):
    _, directory = _model_dir(tmp_path)
    for args, needle in [
        (["--checkpoint", str(tmp_path / "nowhere"), "x.jpg"], "no such model directory"),
        (["--checkpoint", str(directory), "--arch", "resnet50", "x.jpg"], "holds a resnet18"),
    ]:
        proc = subprocess.run([sys.executable, "-m", "kdjax.predict", *args], capture_output=True, text=True)
        assert proc.returncode == 2
        assert proc.stdout == ""
        assert len(proc.stderr.strip().splitlines()) == 1 and needle in proc.stderr


def test_corrupted_weights_are_detected(tmp_path):
    _, directory = _model_dir(tmp_path)
    meta = json.loads((directory / "meta.json").read_text())
    meta["fingerprint"] = "sha256:" + "0" * 64
    (directory / "meta.json").write_text(json.dumps(meta))
    proc = subprocess.run([sys.executable, "-m", "kdjax.predict", "--checkpoint", str(directory), "x.jpg"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "fingerprint" in proc.stderr


def test_export_loads_strictly_in_torchvision_and_predicts_what_kdjax_predicts(tmp_path, hymenoptera_dir, capsys):
    """``kdjax.weights export``: a model directory (here a distilled student as kdjax writes one,
    converted from a random torchvision net) -> a .pth that torchvision loads with strict=True
    and whose softmax equals kdjax.predict's (1e-4, as test_predict_matches_...) on real images."""
    _, directory = _model_dir(tmp_path)
    out = tmp_path / "export" / "student.pth"
    assert cli_weights.main(["export", "--checkpoint", str(directory), "--out", str(out)]) == 0
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["arch"] == "resnet18" and sidecar["class_names"] == ["ants", "bees"]
    assert sidecar["eval_transform"] == {"resize": 256, "crop": 224, "interpolation": "bilinear",
                                         "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    net = getattr(torchvision.models, sidecar["torchvision_builder"])(num_classes=sidecar["num_classes"])
    net.load_state_dict(torch.load(out), strict=True)  # weights_only: only allowed globals in the file
    net.eval()

    paths = [str(hymenoptera_dir / "val" / p) for p in VAL_IMAGES]
    capsys.readouterr()
    assert main(["--checkpoint", str(directory), *paths]) == 0
    got = np.array([[r["probs"]["ants"], r["probs"]["bees"]]
                    for r in map(json.loads, capsys.readouterr().out.splitlines())])
    t = sidecar["eval_transform"]
    tf = T.Compose([T.Resize(t["resize"]), T.CenterCrop(t["crop"]), T.ToTensor(), T.Normalize(t["mean"], t["std"])])
    loader = torchvision.datasets.folder.default_loader
    with torch.no_grad():
        want = torch.softmax(net(torch.stack([tf(loader(p)) for p in paths])), -1).numpy()
    err = np.max(np.abs(got - want))
    print(f"exported .pth in torchvision vs kdjax.predict: max|dp| = {err:.2e}")
    assert err <= 1e-4
    assert cli_weights.main(["export", "--checkpoint", str(directory), "--out", str(tmp_path / "x.bin")]) == 2
    assert "give a .pth or .pt file name" in capsys.readouterr().err
