"""experiments.paper end to end on a generated image folder: files, table arithmetic, predict,
event files written as epochs end, and resuming an output directory that holds only part of the
study (an interrupted run, then more runs)."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from conftest import (
    Interrupted,
    assert_events_hold,
    assert_shown_as_epochs_end,
    make_image_folder,
    read_history,
    read_metrics,
    watch_events,
)
from kdjax import checkpoint, models
from kdjax.cli import distill as paper
from kdjax.predict import predict_files

ALPHAS = ("0", "0.5")
COMMON = ["--num_epochs", "2", "--batch_size", "4", "--image_size", "32", "--init", "scratch",
          "--lr", "0.01", "--s_lr_step_size", "1"]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    base = tmp_path_factory.mktemp("paper")
    # file names with a space, as in the real set
    images = make_image_folder(base / "images", {"train": {"ants": 8, "bees": 8}, "val": {"ants": 5, "bees": 5}},
                               size=lambda seed: (36 + seed % 9, 30 + seed % 4), name="{cls} {i}.jpg")
    teacher = models.create_model("resnet50", 2)
    checkpoint.save_model(base / "teacher", models.init_variables(teacher, jax.random.key(7), 32),
                          arch="resnet50", class_names=["ants", "bees"], provenance={"test": True}, image_size=32)
    args = [*COMMON, "--data_dir", str(images), "--cache_dir", str(base / "cache"),
            "--teacher_file", str(base / "teacher")]
    return base, images, args


def test_paper_writes_tables_plots_runs_and_a_usable_student(study, capsys, monkeypatch):
    base, images, args = study
    out = base / "out"
    half = ["--alpha", *ALPHAS, "--n_exp", "1", "--out", str(out), *args]
    # half the study first (one run per alpha), interrupted after epoch 1, then resumed
    seen = []
    with monkeypatch.context() as patch:
        watch_events(patch, lambda run: out / "tensorboard" / run.workdir.relative_to(out), seen, stop_at=1)
        with pytest.raises(Interrupted):
            paper.main(half)
    assert [record["epoch"] for record, _ in seen] == [1, 1]  # both runs, trained together
    assert_shown_as_epochs_end(seen)
    assert paper.main(half) == 0
    first = {a: (out / f"alpha_{a}" / "run_0" / "metrics.json").read_text() for a in ALPHAS}
    tb = {a: out / "tensorboard" / f"alpha_{a}" for a in ALPHAS}
    first_events = {a: sorted((tb[a] / "run_0").iterdir()) for a in ALPHAS}
    capsys.readouterr()
    # then the whole: the first runs are reused
    assert paper.main(["--alpha", *ALPHAS, "--n_exp", "2", "--out", str(out), *args]) == 0
    printed = capsys.readouterr().out
    for a in ALPHAS:  # finished runs were read back, not trained again
        assert (out / f"alpha_{a}" / "run_0" / "metrics.json").read_text() == first[a]
    for a in ALPHAS:
        # events: each epoch of metrics.json once, even counting the interrupted attempt's file
        # (without TensorBoard's purge); a finished run's files are left as they were
        for r in range(2):
            assert_events_hold(tb[a] / f"run_{r}", read_metrics(out / f"alpha_{a}" / f"run_{r}")["history"],
                               purge=False)
        assert len(first_events[a]) == 2 and sorted((tb[a] / "run_0").iterdir()) == first_events[a]

    summary = json.loads((out / "summary.json").read_text())
    assert "epoch_loss_l" in printed and "final val acc" in printed
    histories = {
        float(a): [read_history(out / f"alpha_{a}" / f"run_{r}") for r in range(2)]
        for a in ALPHAS
    }
    # the seed's table: mean and sample std pooled over all epochs of all runs, from the JSON
    for row in summary["seed_table"]:
        vals = [rec["val"]["acc"] for h in histories[row["alpha"]] for rec in h]
        assert len(vals) == 4
        assert row["epoch_acc_l"]["mean"] == pytest.approx(np.mean(vals), abs=1e-12)
        assert row["epoch_acc_l"]["std"] == pytest.approx(np.std(vals, ddof=1), abs=1e-12)
        losses = [rec["val"]["loss"] for h in histories[row["alpha"]] for rec in h]
        assert row["epoch_loss_l"]["mean"] == pytest.approx(np.mean(losses), rel=1e-12)
    # the honest table: per-run final accuracy, mean over runs
    for row in summary["honest_table"]["rows"]:
        finals = [h[-1]["val"]["acc"] for h in histories[row["alpha"]]]
        assert row["final_acc"]["mean"] == pytest.approx(np.mean(finals), abs=1e-12)
    assert summary["honest_table"]["num_val"] == 10

    assert len(list((out / "plots").glob("*.png"))) == 6  # 3 figures x 2 alphas
    student = out / "alpha_0.5" / "run_1" / "best"
    assert checkpoint.read_meta(student).arch == "resnet18"
    results = list(predict_files(student, [str(next((images / "val" / "bees").iterdir()))]))
    assert set(results[0]["probs"]) == {"ants", "bees"}


def test_bad_flags_fail_in_one_line(study, capsys):
    base, images, args = study
    assert paper.main(["--alpha", "1.5", "--out", str(base / "bad"), *args]) == 2
    assert "--alpha must be in [0, 1]" in capsys.readouterr().err
    assert paper.main(["--out", str(base / "bad"), *args, "--batch_size", "3"]) == 2
    assert "--batch_size 3" in capsys.readouterr().err
    assert paper.main(["--out", str(base / "bad"), *COMMON, "--data_dir", str(base / "nowhere"),
                       "--teacher_file", str(base / "teacher")]) == 2
    assert "nowhere" in capsys.readouterr().err
