"""kdjax.evaluate: a run's best/ scores its own best_val_acc; the confusion matrix, precision,
recall and teacher agreement agree with independent computations (kdjax.predict, numpy); the
files parse; bad inputs fail in one line with exit code 2.

One short supervised run (ResNet-18, 32 px, three classes, one epoch) is trained once for the
module, from random weights whose BatchNorm statistics are calibrated on the training images and
at a small learning rate: from raw random statistics, or at larger rates, a few steps at batch 4
leave a model that predicts one class for everything, which would leave the per-class figures
untested. A second model with random (calibrated) weights plays the other teacher.
"""

from __future__ import annotations

import contextlib
import io
import json
import pathlib

import jax
import numpy as np
import pytest
from PIL import Image

from conftest import calibrated_variables, make_image_folder, read_metrics, varied_size
from kdjax import checkpoint, data, engine, models
from kdjax.cli.evaluate import main
from kdjax.config import OptimConfig, TrainConfig
from kdjax.evaluate import class_figures, markdown
from kdjax.predict import predict_files

CLASSES = ("ants", "bees", "wasps")
SPEC = {"train": dict.fromkeys(CLASSES, 4), "val": dict.fromkeys(CLASSES, 4)}
PROG = "python -m kdjax.evaluate"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``(folder, cache, workdir)`` of a finished run."""
    root = tmp_path_factory.mktemp("evaluate")
    folder = make_image_folder(root / "images", SPEC, size=varied_size)
    cache = root / "cache"
    dataset = data.load_splits(folder, image_size=32, cache_dir=cache)
    model = models.create_model("resnet18", len(CLASSES))
    variables = calibrated_variables(model, jax.random.key(3), dataset["train"].eval.images)
    config = TrainConfig(optim=OptimConfig(lr=1e-4), distill=None, num_epochs=1, batch_size=4, image_size=32)
    engine.train_and_evaluate(engine.Run(config, root / "run", variables, {"init": "calibrated random"}),
                              dataset, student_arch="resnet18")
    return folder, cache, root / "run"


@pytest.fixture(scope="module")
def other_model(trained, tmp_path_factory):
    """A second model directory of the same classes: random weights, BatchNorm calibrated on val."""
    folder, cache, _ = trained
    views = data.load_splits(folder, image_size=32, cache_dir=cache)["val"].eval.images
    model = models.create_model("resnet18", len(CLASSES))
    directory = tmp_path_factory.mktemp("other") / "model"
    checkpoint.save_model(directory, calibrated_variables(model, jax.random.key(7), views), arch="resnet18",
                          class_names=CLASSES, provenance={"source": "test"}, image_size=32)
    return directory


def _main(*args) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main([str(a) for a in args])
    return rc, out.getvalue()


@pytest.fixture(scope="module")
def evaluated(trained):
    """The run directory evaluated on val with itself as the teacher, into the default --out."""
    folder, cache, workdir = trained
    rc, stdout = _main("--checkpoint", workdir, "--data_dir", folder, "--cache_dir", cache,
                       "--teacher_file", workdir)
    out = workdir / "eval_val"
    return rc, stdout, out, json.loads((out / "evaluation.json").read_text())


def _val_files(folder: pathlib.Path) -> tuple[list[str], np.ndarray]:
    """The val images and their labels, listed here rather than by kdjax's scan."""
    files = sorted(p for p in (folder / "val").glob("*/*.jpg"))
    return [str(p) for p in files], np.array([CLASSES.index(p.parent.name) for p in files])


def _predicted(model_dir, paths) -> np.ndarray:
    """Top-1 classes through kdjax.predict (host transform, its own forward and batches)."""
    return np.array([CLASSES.index(r["label"]) for r in predict_files(model_dir, paths)])


def _confusion(labels, predicted) -> np.ndarray:
    cm = np.zeros((len(CLASSES), len(CLASSES)), np.int64)
    np.add.at(cm, (labels, predicted), 1)
    return cm


def test_best_model_scores_the_runs_best_val_acc(trained, evaluated):
    _, _, workdir = trained
    rc, _, _, record = evaluated
    assert rc == 0
    best_val_acc = read_metrics(workdir)["best_val_acc"]
    assert record["num_examples"] == 12  # batch 32: one padded batch, every example counted once
    assert record["correct"] == round(best_val_acc * 12)
    assert record["accuracy"] == pytest.approx(best_val_acc, abs=1e-6)
    assert record["checkpoint"] == str(workdir / "best")  # a run directory stands for its best/
    assert record["fingerprint"] == checkpoint.read_meta(workdir / "best").fingerprint
    assert record["split"] == "val" and record["class_names"] == list(CLASSES)


def test_confusion_matrix_and_class_figures_match_independent_computations(trained, evaluated):
    folder, _, workdir = trained
    cm = np.array(evaluated[3]["confusion"])
    assert np.count_nonzero(cm.sum(axis=0)) >= 2, "a model predicting one class leaves precision untested"
    assert cm.sum() == 12 and np.trace(cm) == evaluated[3]["correct"]
    paths, labels = _val_files(folder)
    np.testing.assert_array_equal(cm, _confusion(labels, _predicted(workdir / "best", paths)))
    for c, figures in enumerate(evaluated[3]["per_class"]):
        assert figures["class"] == CLASSES[c]
        assert figures["support"] == cm[c].sum() == 4 and figures["predicted"] == cm[:, c].sum()
        assert figures["recall"] == pytest.approx(cm[c, c] / cm[c].sum())
        if cm[:, c].sum():
            assert figures["precision"] == pytest.approx(cm[c, c] / cm[:, c].sum())
        else:
            assert figures["precision"] is None


def test_the_same_model_as_teacher_agrees_everywhere(evaluated):
    record = evaluated[3]
    t = record["teacher"]
    assert t["fingerprint"] == record["fingerprint"]
    assert t["agreement"] == 1.0 and t["disagreements"] == 0 and t["agreements"] == 12
    assert t["correct"] == record["correct"]
    predicted_counts = np.array(record["confusion"]).sum(axis=0)
    np.testing.assert_array_equal(np.array(t["agreement_matrix"]), np.diag(predicted_counts))


def test_agreement_with_another_teacher_matches_numpy(trained, evaluated, other_model, tmp_path):
    """Also in batches of 8 (the last one padded): the model's figures do not change."""
    folder, cache, workdir = trained
    rc, _ = _main("--checkpoint", workdir / "best", "--data_dir", folder, "--cache_dir", cache,
                  "--teacher_file", other_model, "--batch_size", 8, "--out", tmp_path / "out")
    assert rc == 0
    record = json.loads((tmp_path / "out" / "evaluation.json").read_text())
    assert record["confusion"] == evaluated[3]["confusion"]
    paths, labels = _val_files(folder)
    student, teacher = _predicted(workdir / "best", paths), _predicted(other_model, paths)
    assert np.any(student != teacher), "the two models must disagree somewhere for this test to mean anything"
    t = record["teacher"]
    assert t["agreement"] == pytest.approx(np.mean(student == teacher))
    assert t["disagreements"] == int(np.sum(student != teacher))
    assert t["correct"] == int(np.sum(teacher == labels))
    np.testing.assert_array_equal(np.array(t["agreement_matrix"]), _confusion(teacher, student))


def test_report_files_exist_and_parse(evaluated):
    rc, stdout, out, record = evaluated
    assert str(out / "evaluation.md") in stdout and "accuracy" in stdout
    assert {"accuracy", "correct", "num_examples", "per_class", "confusion", "class_names", "checkpoint",
            "fingerprint", "data_dir", "split", "teacher"} <= set(record)
    md = (out / "evaluation.md").read_text()
    assert f"**accuracy: {record['accuracy']:.4f} ({record['correct']}/12)**" in md
    assert "| class | precision | recall | support | predicted |" in md
    assert "| true \\ predicted | ants | bees | wasps |" in md
    for name, row in zip(CLASSES, record["confusion"]):
        assert f"| {name} | " + " | ".join(map(str, row)) + " |" in md
    png = out / "confusion.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    with Image.open(png) as im:
        assert min(im.size) >= 200


def test_precision_of_a_never_predicted_class_is_null_and_noted():
    cm = np.array([[3, 1, 0], [0, 2, 0], [1, 1, 0]])  # nothing predicted as the third class
    figures = class_figures(cm, ["a", "b", "c"])
    assert [f["precision"] for f in figures] == [0.75, 0.5, None]
    assert [f["recall"] for f in figures] == [0.75, 1.0, 0.0]
    assert [f["predicted"] for f in figures] == [4, 4, 0]
    record = {"split": "val", "checkpoint": "m", "arch": "resnet18", "fingerprint": "sha256:" + "0" * 64,
              "image_size": 32, "compute_dtype": "float32", "data_dir": "d", "num_examples": 8, "correct": 5,
              "accuracy": 5 / 8, "class_names": ["a", "b", "c"], "per_class": figures, "confusion": cm.tolist(),
              "teacher": None}
    md = markdown(record)
    assert "| c | n/a | 0.0000 | 2 | 0 |" in md and "never predicts" in md


def _fails(capsys, *args) -> str:
    assert main([str(a) for a in args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{PROG}: error: "), captured.err
    return lines[0]


def test_classes_other_than_the_checkpoints_fail(trained, image_folder, capsys):
    _, cache, workdir = trained
    other = image_folder({"val": {"ants": 1, "bees": 1, "hornets": 1}})
    err = _fails(capsys, "--checkpoint", workdir, "--data_dir", other, "--cache_dir", cache)
    assert "['ants', 'bees', 'hornets']" in err and "['ants', 'bees', 'wasps']" in err


def test_missing_split_names_its_path(trained, capsys):
    folder, cache, workdir = trained
    err = _fails(capsys, "--checkpoint", workdir, "--data_dir", folder, "--cache_dir", cache, "--split", "test")
    assert str(folder / "test") in err


def test_a_val_only_tree_is_enough(trained, tmp_path):
    """No train/ folder needed: the val images alone give the same figures."""
    folder, _, workdir = trained
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "val").symlink_to(folder / "val")
    rc, _ = _main("--checkpoint", workdir, "--data_dir", tmp_path / "images", "--cache_dir", tmp_path / "cache",
                  "--out", tmp_path / "out")
    assert rc == 0
    record = json.loads((tmp_path / "out" / "evaluation.json").read_text())
    assert record["correct"] == round(read_metrics(workdir)["best_val_acc"] * 12)


def test_non_model_directories_fail(trained, tmp_path, capsys):
    folder, cache, workdir = trained
    (tmp_path / "empty").mkdir()
    err = _fails(capsys, "--checkpoint", tmp_path / "empty", "--data_dir", folder, "--cache_dir", cache)
    assert str(tmp_path / "empty") in err and "model directory" in err
    err = _fails(capsys, "--checkpoint", tmp_path / "nowhere", "--data_dir", folder, "--cache_dir", cache)
    assert str(tmp_path / "nowhere") in err and "no such model directory" in err


def test_teacher_of_other_classes_fails(trained, other_model, tmp_path, capsys):
    folder, cache, workdir = trained
    _, variables, _ = checkpoint.load_model(other_model)
    checkpoint.save_model(tmp_path / "teacher", jax.device_get(variables), arch="resnet18",
                          class_names=["x", "y", "z"], provenance={"source": "test"}, image_size=32)
    err = _fails(capsys, "--checkpoint", workdir, "--data_dir", folder, "--cache_dir", cache,
                 "--teacher_file", tmp_path / "teacher")
    assert str(tmp_path / "teacher") in err and "['x', 'y', 'z']" in err
