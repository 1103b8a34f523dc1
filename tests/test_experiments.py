"""experiments.teacher then experiments.paper, end to end, as a new user chains them: the teacher's
run directory as --teacher_file, any registered pair (here reversed: a ResNet-18 teacher for a
ResNet-50 student), a last batch of one example, the run identity (--init) on re-runs, and the
teacher's event files, written as its epochs end.

29 generated train images at batch 4 leave one example in the last batch of every epoch (at
32 px layer4's maps are 1x1, so its BatchNorms see one value per channel there).
"""

from __future__ import annotations

import json
import math

import pytest

from conftest import (
    assert_events_hold,
    assert_shown_as_epochs_end,
    make_image_folder,
    read_metrics,
    varied_size,
    watch_events,
)
from kdjax import checkpoint
from kdjax.cli import distill as paper, teacher

SPEC = {"train": {"ants": 15, "bees": 14}, "val": {"ants": 3, "bees": 3}}
COMMON = ["--image_size", "32", "--num_epochs", "1", "--batch_size", "4", "--init", "scratch",
          "--lr", "0.001", "--no_plots"]


@pytest.fixture(scope="module")
def teacher_epochs() -> list:
    """What the teacher run's event files showed as each of its epochs ended (``watch_events``;
    filled by ``chained``)."""
    return []


@pytest.fixture(scope="module")
def chained(tmp_path_factory, teacher_epochs):
    base = tmp_path_factory.mktemp("experiments")
    images = make_image_folder(base / "images", SPEC, varied_size)
    data_flags = ["--data_dir", str(images), "--cache_dir", str(base / "cache")]
    with pytest.MonkeyPatch.context() as patch:
        watch_events(patch, lambda run: run.workdir / "tensorboard", teacher_epochs)
        status = teacher.main(["--arch", "resnet18", "--out", str(base / "teacher"), *data_flags,
                               *[f for f in COMMON if f != "--no_plots"]])
    return base, data_flags, status


def test_teacher_trains_through_a_one_example_batch(chained):
    base, _, status = chained
    assert status == 0
    history = json.loads((base / "teacher" / "metrics.json").read_text())["history"]
    assert math.isfinite(history[0]["train"]["loss"]) and math.isfinite(history[0]["val"]["loss"])
    log = (base / "teacher" / "train.log").read_text()
    assert "29 training examples at batch size 4 leave one example in the last batch" in log
    assert checkpoint.read_meta(base / "teacher" / "best").arch == "resnet18"


def test_teacher_writes_its_events_as_each_epoch_ends(chained, teacher_epochs):
    base, _, _ = chained
    assert [record["epoch"] for record, _ in teacher_epochs] == [1]
    assert_shown_as_epochs_end(teacher_epochs)  # in OUT/tensorboard while the run was going
    assert_events_hold(base / "teacher" / "tensorboard", read_metrics(base / "teacher")["history"])


def test_paper_takes_the_teacher_run_directory_and_a_reversed_pair(chained, capsys):
    base, data_flags, _ = chained
    out = base / "paper"
    args = ["--alpha", "0.5", "--n_exp", "1", "--student_arch", "resnet50",
            "--teacher_file", str(base / "teacher"), "--out", str(out), *data_flags, *COMMON]
    assert paper.main(args) == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["extra"]["teacher_arch"] == "resnet18" and summary["extra"]["student_arch"] == "resnet50"
    assert checkpoint.read_meta(out / "alpha_0.5" / "run_0" / "best").arch == "resnet50"

    # the same --out with other initial weights is another run: refused, not silently reused
    student_dir = out / "alpha_0.5" / "run_0" / "best"
    again = [a if a != "scratch" else str(student_dir) for a in args]
    assert paper.main(again) == 2
    err = capsys.readouterr().err
    assert "different init (--init)" in err and "use another --out" in err


def test_teacher_file_errors_name_what_to_pass(chained, capsys, tmp_path):
    base, data_flags, _ = chained
    (tmp_path / "empty").mkdir()
    args = ["--n_exp", "1", "--out", str(tmp_path / "out"), *data_flags, *COMMON]
    assert paper.main(["--teacher_file", str(tmp_path / "empty"), *args]) == 2
    assert "nor a training run" in capsys.readouterr().err
    assert paper.main(["--teacher_file", str(base / "teacher"), "--teacher_arch", "resnet50", *args]) == 2
    assert "holds a resnet18, but --teacher_arch is resnet50" in capsys.readouterr().err
    assert paper.main(["--teacher_file", str(base / "teacher"), "--loss", "mse", "--temperature", "2",
                       *args]) == 2
    assert "--loss mse takes no --temperature" in capsys.readouterr().err
    assert paper.main(["--teacher_file", str(base / "teacher"), "--loss", "ce:1", "kd:1", "--alpha", "0.5",
                       *args]) == 2
    assert "leave --alpha out" in capsys.readouterr().err
    assert paper.main(["--teacher_file", str(base / "teacher"), str(base / "teacher"), "--loss", "ce:1", "at:1",
                       *args]) == 2
    assert "reads feature taps, which one teacher has" in capsys.readouterr().err
    assert paper.main(["--teacher_file", str(base / "teacher"), "--loss", "ce:1", "fitnet:1", "--fitnet_pairs",
                       "layer3:nope", *args]) == 2
    assert "the teacher has no tap 'nope'" in capsys.readouterr().err


def test_paper_with_weighted_terms_two_teachers_and_a_teacher_cache(chained, capsys):
    """``--loss ce:0.5 kd:0.5 --teacher_file A B --teacher_combine sum --teacher_cache DIR``: one
    study row (alpha is the CE weight), each term logged, the teachers' logits cached; its
    recipe.toml run into another --out (``--config``, no other flag) reads the cache and
    reproduces the metrics exactly."""
    base, data_flags, _ = chained
    cache = base / "tcache"
    args = ["--loss", "ce:0.5", "kd:0.5", "--temperature", "2", "--n_exp", "1", "--teacher_combine", "sum",
            "--teacher_file", str(base / "teacher"), str(base / "teacher"), "--teacher_cache", str(cache),
            *data_flags, *COMMON]
    assert paper.main([*args, "--out", str(base / "multi")]) == 0, capsys.readouterr().err
    summary = json.loads((base / "multi" / "summary.json").read_text())
    assert summary["extra"]["teacher_arch"] == "resnet18+resnet18"
    history = json.loads((base / "multi" / "alpha_0.5" / "run_0" / "metrics.json").read_text())["history"]
    assert {"ce", "kd"} <= set(history[0]["train"]) and {"ce", "kd", "agreement"} <= set(history[0]["val"])
    assert len(list(cache.glob("*/seed0_epoch0.npy"))) == 1
    recipe = (base / "multi" / "recipe.toml").read_text()
    assert 'command = "distill"' in recipe and 'dtype = "float32"' in recipe and "image_size = 32" in recipe
    assert 'loss = ["ce:0.5", "kd:0.5"]' in recipe and "temperature = 2.0" in recipe
    assert paper.main(["--config", str(base / "multi" / "recipe.toml"), "--out", str(base / "multi_again")]) == 0, \
        capsys.readouterr().err
    again = json.loads((base / "multi_again" / "alpha_0.5" / "run_0" / "metrics.json").read_text())["history"]
    assert [r["train"] for r in again] == [r["train"] for r in history]
    assert [r["val"] for r in again] == [r["val"] for r in history]


def test_the_study_runs_with_any_pair(chained, capsys):
    # the pair: a ConvNeXt-T teacher (no BatchNorm; a model directory of its scratch
    # weights, so CI compiles no ConvNeXt training step) for a MobileNetV3-Small student with a
    # frozen backbone, through its one-example last batch (its `all` step is test_engine_step's)
    import jax

    from kdjax import models

    base, data_flags, _ = chained
    out = base / "pair"
    variables = models.init_variables(models.create_model("convnext_tiny", 2), jax.random.key(0), 32)
    checkpoint.save_model(base / "convnext", jax.device_get(variables), arch="convnext_tiny",
                          class_names=["ants", "bees"], provenance={"init": "scratch"}, image_size=32)
    args = ["--alpha", "0.5", "--n_exp", "1", "--teacher_file", str(base / "convnext"), "--student_arch",
            "mobilenet_v3_small", "--student_train", "fc_frozen_bn", "--out", str(out), *data_flags, *COMMON]
    assert paper.main(args) == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["extra"]["teacher_arch"] == "convnext_tiny"
    assert checkpoint.read_meta(out / "alpha_0.5" / "run_0" / "best").arch == "mobilenet_v3_small"
    history = json.loads((out / "alpha_0.5" / "run_0" / "metrics.json").read_text())["history"]
    assert math.isfinite(history[0]["train"]["loss"]) and math.isfinite(history[0]["val"]["loss"])
    assert 0 <= history[0]["val"]["teacher_acc"] <= 1


def test_paper_streams_a_tree_with_a_test_split_and_reports_its_test_accuracy(chained, capsys, tmp_path):
    """``--data_in_memory off --verify_data`` on a tree with test/: the summary's honest table
    reports the selected model's test accuracy; a bad ``--data_in_memory`` is argparse's error."""
    base, _, _ = chained
    images = make_image_folder(tmp_path / "images", {**SPEC, "test": {"ants": 2, "bees": 3}}, varied_size)
    args = ["--alpha", "0.5", "--n_exp", "1", "--teacher_file", str(base / "teacher"), "--data_dir", str(images),
            "--cache_dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out"), *COMMON]
    assert paper.main([*args, "--data_in_memory", "off", "--verify_data"]) == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    [row] = summary["honest_table"]["rows"]
    assert summary["honest_table"]["num_test"] == 5 and row["runs"][0]["num_test"] == 5
    assert 0 <= row["test_acc"]["mean"] <= 1
    assert "test acc (selected on val)" in (tmp_path / "out" / "summary.md").read_text()
    with pytest.raises(SystemExit):
        paper.main([*args, "--data_in_memory", "maybe"])
    assert "--data_in_memory: invalid choice: 'maybe'" in capsys.readouterr().err
