"""benchmarks/cifar100_table.py's CPU smoke run: two of the table's pairs, KD and DKD, two seeds
trained together, on a generated 32x32 folder, from teachers that the test writes with torch in
mdistiller's checkpoint format (``<arch>_vanilla/ckpt_epoch_240.pth``). Checks that the teachers
convert with the data's classes, that every study runs the recipe with the method's loss and
the pair's DKD beta, that the table names the published figures beside kdjax's, and that a second
call reads the finished studies instead of training them again."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from benchmarks import cifar100_table
from benchmarks.cifar_torch_reference import torch_cifar
from conftest import make_image_folder, read_metrics

PAIRS = "vgg13:vgg8,wrn_40_2:wrn_16_2"


def test_the_table_runs_kd_and_dkd_from_mdistiller_teachers(tmp_path, capsys):
    classes = {f"c{i}": 2 for i in range(4)}
    images = make_image_folder(tmp_path / "images", {"train": classes, "val": {c: 1 for c in classes}}, size=(32, 32))
    for arch in ("vgg13", "wrn_40_2"):
        (tmp_path / "teachers" / f"{arch}_vanilla").mkdir(parents=True)
        torch.save({"epoch": 240, "model": torch_cifar(arch, seed=1, num_classes=4).state_dict(),
                    "best_acc": np.float64(74.6)}, tmp_path / "teachers" / f"{arch}_vanilla" / "ckpt_epoch_240.pth")
    argv = ["--teachers", str(tmp_path / "teachers"), "--data", f"folder:{images}", "--pairs", PAIRS,
            "--seeds", "2", "--num_epochs", "2", "--milestones", "1", "--batch_size", "4",
            "--cache_dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out"), "--quiet"]
    assert cifar100_table.main(argv) == 0
    rows = json.loads((tmp_path / "out" / "table.json").read_text())
    assert [(r["teacher"], r["method"]) for r in rows] == [
        ("vgg13", "kd"), ("vgg13", "dkd"), ("wrn_40_2", "kd"), ("wrn_40_2", "dkd")]
    for row in rows:
        study = tmp_path / "out" / f"{row['teacher']}-{row['student']}" / row["method"]
        recipe = (study / "recipe.toml").read_text()
        assert 'crop = "pad"' in recipe and "lr = 0.05" in recipe and "milestones = [1]" in recipe
        assert ('"dkd:1"' in recipe) == (row["method"] == "dkd")
        if row["method"] == "dkd":
            assert "dkd_beta = 6.0" in recipe  # both pairs: mdistiller gives 6
        runs = sorted(study.glob("alpha_*/run_*"))
        assert len(runs) == 2 and row["accuracy"] == [100 * read_metrics(r)["best_val_acc"] for r in runs]
    meta = json.loads((tmp_path / "out" / "teachers" / "vgg13" / "meta.json").read_text())
    assert meta["class_names"] == list(classes)
    text = (tmp_path / "out" / "table.md").read_text()
    assert "| KD (mdistiller) | 72.98 | 74.92 |" in text and "| DKD (mdistiller) | 74.68 | 76.23 |" in text
    assert text.count(" +/- ") == 4 and text.strip() in capsys.readouterr().out

    # the finished studies are read back, not trained again
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("metrics.json")}
    assert cifar100_table.main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("metrics.json")} == before
    with pytest.raises(SystemExit, match="--pairs 'resnet8:resnet20' is not one of the table's"):
        cifar100_table.main([*argv[:4], "--pairs", "resnet8:resnet20", "--out", str(tmp_path / "bad")])
