"""The README's "Distill your own classifier" block, command by command, on a generated 3-class
tree and a torchvision teacher saved with torch: what a user copies must run.

The commands are read from README.md itself, so an edit there is tested here. Two things are
added, and only to ``kdjax distill``: ``--init scratch`` (ImageNet weights cannot be downloaded
here) and small sizes (32 px, 1 epoch, batch 4), so that CI stays within its time.
"""

from __future__ import annotations

import json
import re
import shlex

import numpy as np
import pytest
import torch
import torchvision

import kdjax.cli
from conftest import REPO, make_image_folder, varied_size

SECTION = "### Distill your own classifier"
SPEC = {"train": {"cat": 8, "dog": 8, "fox": 8}, "val": {"cat": 3, "dog": 3, "fox": 3}}
FAST = ["--init", "scratch", "--image_size", "32", "--num_epochs", "1", "--batch_size", "4"]


def readme_commands() -> list[list[str]]:
    """The shell commands of the section's bash block: comments dropped, continuations joined."""
    text = (REPO / "README.md").read_text()
    section = text[text.index(SECTION):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    joined = block.replace("\\\n", " ")
    return [shlex.split(line) for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


@pytest.fixture
def user_files(tmp_path, monkeypatch):
    """What the user has: images/ (cat, dog, fox) and teacher.pth (a torchvision ResNet-50 of 3
    outputs, as torch.save writes its state_dict), in the working directory."""
    make_image_folder(tmp_path / "images", SPEC, varied_size)
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet50(num_classes=3).state_dict(), tmp_path / "teacher.pth")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KDJAX_CACHE", str(tmp_path / "cache"))  # decode cache and compile cache
    return tmp_path


@pytest.mark.slow
def test_the_readme_block_runs_from_a_pytorch_teacher_to_an_exported_student(user_files, capsys):
    import logging

    commands = readme_commands()
    assert [c[:2] for c in commands] == [["kdjax", "convert"], ["kdjax", "distill"], ["kdjax", "evaluate"],
                                        ["kdjax", "export"], ["kdjax", "predict"]]
    level = logging.getLogger("kdjax").level
    try:
        for command in commands:
            argv = command[1:] + (FAST if command[1] == "distill" else [])
            assert kdjax.cli.main(argv) == 0, (command, capsys.readouterr().err[-3000:])
    finally:
        logging.getLogger("kdjax").setLevel(level)
    out = capsys.readouterr().out

    root = user_files
    meta = json.loads((root / "models" / "teacher" / "meta.json").read_text())
    assert meta["arch"] == "resnet50" and meta["class_names"] == ["cat", "dog", "fox"]
    summary = json.loads((root / "runs" / "mine" / "summary.json").read_text())
    assert summary["extra"]["teacher_arch"] == "resnet50" and summary["extra"]["student_arch"] == "resnet18"
    assert (root / "runs" / "mine" / "recipe.toml").is_file()
    evaluation = json.loads((root / "runs" / "mine" / "eval" / "evaluation.json").read_text())
    assert evaluation["num_examples"] == 9 and "agreement" in json.dumps(evaluation)
    history = json.loads((root / "runs" / "mine" / "alpha_0.5" / "run_0" / "metrics.json").read_text())
    assert evaluation["correct"] == round(history["best_val_acc"] * 9)

    # the exported student loads into torchvision's builder, strictly, and predicts what kdjax does
    student = torchvision.models.resnet18(num_classes=3)
    student.load_state_dict(torch.load(root / "student.pth"), strict=True)
    [prediction] = [json.loads(line) for line in out.splitlines() if line.startswith('{"path"')]
    assert prediction["path"] == "images/val/cat/cat_0.jpg" and prediction["label"] in ("cat", "dog", "fox")
    from kdjax import checkpoint
    from kdjax.data.transforms import eval_view, load_rgb, normalize

    meta = checkpoint.read_meta(root / "runs" / "mine" / "alpha_0.5" / "run_0" / "best")
    view = eval_view(load_rgb(root / prediction["path"]), meta.image_size, meta.resize_size, meta.interpolation)
    image = torch.from_numpy(np.ascontiguousarray(normalize(view[None], meta.mean, meta.std).transpose(0, 3, 1, 2)))
    with torch.no_grad():
        probs = torch.softmax(student.eval()(image), -1)[0].numpy()
    # float32 on both sides; the tolerance covers summation order in two conv implementations
    np.testing.assert_allclose(probs, [prediction["probs"][c] for c in ("cat", "dog", "fox")], atol=1e-4)
