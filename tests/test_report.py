"""kdjax.report: table arithmetic against numpy/scipy by hand, the files it writes, plots, events.

Histories are synthetic (2 alphas x 2 runs x 3 epochs, plus a single run for the n/a path), in
the exact record format ``kdjax.train`` writes; accuracies are whole images out of NUM_VAL.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from scipy import stats

from conftest import assert_events_hold, events_by_tag_and_step
from kdjax import events as tb, report

NUM_VAL = 153
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_history(seed: int, epochs: int = 3, teacher: bool = True) -> list[dict]:
    rng = np.random.default_rng(seed)
    history = []
    for e in range(1, epochs + 1):
        val = {
            "loss": float(rng.uniform(0.2, 1.5)),
            "acc": int(rng.integers(100, NUM_VAL + 1)) / NUM_VAL,
            "ce": float(rng.uniform(0.1, 0.7)),
            "mse": float(rng.uniform(0.1, 2.0)),
        }
        if teacher:
            val.update(
                teacher_acc=143 / NUM_VAL,
                diff_t_s=float(rng.uniform(0.5, 1.5)),
                agreement=float(rng.uniform(0.8, 1.0)),
                kl_t_s=float(rng.uniform(0.0, 0.2)),
            )
        history.append({
            "epoch": e,
            "lr": 0.001 if e <= 7 else 0.0001,
            "train": {"loss": float(rng.uniform(0.2, 1.5)), "acc": float(rng.uniform(0.5, 1)),
                      "ce": 0.3, "mse": 0.4},
            "val": val,
            "seconds": 2.5,
        })
    return history


@pytest.fixture
def runs() -> dict[float, list[list[dict]]]:
    return {0.5: [make_history(1), make_history(2)], 0.0: [make_history(3), make_history(4)]}


def _pooled(runs_of_alpha, key):
    return np.array([r["val"][key] for h in runs_of_alpha for r in h], dtype=np.float64)


def test_seed_table_is_pooled_mean_and_sample_std(runs):
    rows = report.seed_table(runs)
    assert [r["alpha"] for r in rows] == [0.0, 0.5]  # ascending, floats
    for row in rows:
        assert row["n_runs"] == 2 and row["n_values"] == 6
        for name, key in report.SEED_FIGURES:
            x = _pooled(runs[row["alpha"]], key)
            assert row[name]["mean"] == pytest.approx(x.mean(), abs=1e-15)
            assert row[name]["std"] == pytest.approx(x.std(ddof=1), abs=1e-15)
            assert row[name]["n"] == 6
            assert type(row[name]["mean"]) is float and type(row[name]["std"]) is float
    # A constant teacher gives std 0 (up to rounding in the mean), like the seed's "+/- 0.0".
    assert rows[0]["epoch_acc_teacher_l"]["std"] < 1e-12
    assert "| 0.934641 +/- 0.000000 |" in report.format_seed_table(rows)


def test_seed_table_without_teacher_keys_is_na():
    rows = report.seed_table({1.0: [make_history(5, teacher=False)]})
    assert rows[0]["epoch_acc_teacher_l"] is None and rows[0]["diff_t_s"] is None
    md = report.format_seed_table(rows)
    assert md.splitlines()[-1].endswith("| n/a | n/a |")


def test_honest_table_matches_hand_computation(runs):
    table = report.honest_table(runs, NUM_VAL)
    assert table["num_val"] == NUM_VAL
    assert table["points_per_image"] == pytest.approx(100 / 153)
    assert round(table["points_per_image"], 2) == 0.65
    for row in table["rows"]:
        histories = runs[row["alpha"]]
        final = np.array([h[-1]["val"]["acc"] for h in histories])
        best = np.array([max(r["val"]["acc"] for r in h) for h in histories])
        for key, x in (("final_acc", final), ("best_acc", best)):
            stat = row[key]
            assert stat["mean"] == pytest.approx(x.mean(), abs=1e-15)
            assert stat["std"] == pytest.approx(x.std(ddof=1), abs=1e-15)
            lo, hi = stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=stats.sem(x))
            assert stat["ci95"] == pytest.approx([lo, hi], abs=1e-12)
            # Golden: t(0.975, 1 dof) = 12.7062..., half-width = t * s / sqrt(2).
            half = 12.706204736174698 * x.std(ddof=1) / np.sqrt(2)
            assert stat["ci95"] == pytest.approx([x.mean() - half, x.mean() + half], abs=1e-12)
        for i, (run, h) in enumerate(zip(row["runs"], histories)):
            accs = [r["val"]["acc"] for r in h]
            assert run["run"] == i + 1 and run["epochs"] == 3
            assert run["best_epoch"] == 1 + int(np.argmax(accs))
            assert run["final_correct"] == round(accs[-1] * NUM_VAL)
            assert run["best_correct"] / NUM_VAL == pytest.approx(max(accs))
            assert run["final_teacher_acc"] == pytest.approx(143 / NUM_VAL)


def test_honest_table_single_run_says_na():
    history = make_history(7)
    table = report.honest_table({0.5: [history]}, NUM_VAL)
    row = table["rows"][0]
    assert row["n_runs"] == 1
    assert row["final_acc"]["mean"] == history[-1]["val"]["acc"]
    assert row["final_acc"]["std"] is None and row["final_acc"]["ci95"] is None
    assert row["best_acc"]["std"] is None and row["best_acc"]["ci95"] is None
    md = report.format_honest_table(table)
    assert f"| 0.5 | 1 | {history[-1]['val']['acc']:.6f} +/- n/a | n/a (1 run) |" in md


def test_best_epoch_is_first_maximum():
    h = make_history(8)
    for r, acc in zip(h, (140, 150, 150)):
        r["val"]["acc"] = acc / NUM_VAL
    assert report.run_numbers(h, NUM_VAL)["best_epoch"] == 2


@pytest.mark.parametrize("bad", [{}, {0.5: []}, {0.5: [[]]}])
def test_empty_inputs_fail_with_a_message(bad):
    with pytest.raises(ValueError, match="alpha|empty"):
        report.seed_table(bad)


def test_write_summary_files(tmp_path, runs):
    out = tmp_path / "out"
    extra = {"command": "python -m experiments.paper --alpha 0 0.5", "wall_time_s": 12.5}
    returned = report.write_summary(out, runs, NUM_VAL, extra=extra)

    summary = json.loads((out / "summary.json").read_text())
    assert summary == json.loads(json.dumps(returned))
    assert summary["extra"] == extra
    assert [r["alpha"] for r in summary["seed_table"]] == [0.0, 0.5]
    assert len(summary["honest_table"]["rows"][1]["runs"]) == 2
    assert {p["alpha"] for p in summary["published"]} == {0.0, 0.5, 1.0}

    md = (out / "summary.md").read_text()
    for row in report.seed_table(runs):
        cells = [f"{row[n]['mean']:.6f} +/- {row[n]['std']:.6f}" for n, _ in report.SEED_FIGURES]
        assert f"| {report.alpha_label(row['alpha'])} | 2 | " + " | ".join(cells) + " |" in md
    # the seed's published row, verbatim
    assert "| 0.5 | 0.823943 +/- 0.292539 | 0.946863 +/- 0.018432 | 0.934641 +/- 0.0 | 0.957835 +/- 0.192383 |" in md
    for row in report.honest_table(runs, NUM_VAL)["rows"]:
        f = row["final_acc"]
        lo, hi = f["ci95"]
        assert f"| {f['mean']:.6f} +/- {f['std']:.6f} | [{lo:.6f}, {hi:.6f}] |" in md
    assert "1 image = 0.65 points" in md
    assert "last val batch" in md or "last (shuffled, partial) validation batch" in md
    assert "- wall_time_s: 12.5" in md
    assert not list(out.glob(".summary*"))  # no temporary files left behind


def test_write_summary_without_seed_reference(tmp_path, runs):
    report.write_summary(tmp_path, runs, NUM_VAL, seed_reference=False)
    assert json.loads((tmp_path / "summary.json").read_text())["published"] is None
    assert "0.823943" not in (tmp_path / "summary.md").read_text()


def test_the_loss_figure_draws_train_loss_beside_val_loss(runs):
    pytest.importorskip("matplotlib")
    histories = runs[0.5]
    fig = report.curve_figure(0.5, histories, "val_loss")
    for ax in fig.axes:  # the whole run and the zoom (all 3 epochs here)
        lines = ax.get_lines()
        val = [ln for ln in lines if ln.get_linestyle() == "-"]
        train = [ln for ln in lines if ln.get_linestyle() == "--"]
        assert len(val) == len(train) == 3  # 2 runs + their mean, each
        for i, h in enumerate(histories):  # each run's train curve dashed, in its val curve's colour
            np.testing.assert_array_equal(train[i].get_xdata(), [r["epoch"] for r in h])
            np.testing.assert_array_equal(train[i].get_ydata(), [r["train"]["loss"] for r in h])
            np.testing.assert_array_equal(val[i].get_ydata(), [r["val"]["loss"] for r in h])
            assert train[i].get_color() == val[i].get_color() and val[i].get_label() == f"run {i + 1}"
        assert train[-1].get_label() == "train mean" and val[-1].get_label() == "val mean"
        np.testing.assert_allclose(train[-1].get_ydata(), [np.mean([h[e]["train"]["loss"] for h in histories])
                                                           for e in range(3)])
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == ["run 1", "run 2", "val mean", "train mean"]
    # the other figures stay val-only: the accuracy figure's one dashed line is the teacher's
    acc = report.curve_figure(0.5, histories, "val_acc")
    assert [ln.get_label() for ln in acc.axes[0].get_lines() if ln.get_linestyle() == "--"] == ["teacher"]


def test_plot_curves_writes_pngs(tmp_path, runs):
    pytest.importorskip("matplotlib")
    paths = report.plot_curves(tmp_path / "plots", runs)
    names = sorted(p.name for p in paths)
    assert names == sorted(
        f"alpha{a}_{stem}.png" for a in ("0", "0.5") for stem in ("val_loss", "val_acc", "diff_t_s")
    )
    for p in paths:
        data = p.read_bytes()
        assert len(data) > 0 and data[:8] == PNG_SIGNATURE


def test_plot_curves_skips_missing_figures_and_handles_unequal_runs(tmp_path):
    pytest.importorskip("matplotlib")
    runs = {1.0: [make_history(9, epochs=20, teacher=False), make_history(10, epochs=4, teacher=False)]}
    names = {p.name for p in report.plot_curves(tmp_path, runs)}
    assert names == {"alpha1_val_loss.png", "alpha1_val_acc.png"}
    _, epochs, mean = report.curves(runs[1.0], "loss")
    assert list(epochs) == list(range(1, 21))
    assert mean[-1] == runs[1.0][0][-1]["val"]["loss"]  # only the longer run reached epoch 20


def test_missing_optional_packages_say_what_to_install(tmp_path, runs, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        report.plot_curves(tmp_path, runs)
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    with pytest.raises(ImportError, match="pip install tensorboardX"):
        tb.TensorBoardWriter(tmp_path)


def test_tensorboard_events_read_back(tmp_path, runs):
    pytest.importorskip("tensorboardX")
    history = runs[0.5][0]
    logdir = tb.write_tensorboard(tmp_path / "tb" / "alpha0.5_run1", history)
    files = list(logdir.glob("events.out.tfevents*"))
    assert len(files) == 1 and files[0].stat().st_size > 0

    scalars = events_by_tag_and_step(logdir)
    expected = tb.record_scalars(history[0])
    assert set(scalars) == set(expected)
    assert {"lr", "train/loss", "val/acc", "val/diff_t_s"} <= set(scalars)
    for r in history:
        for tag, value in tb.record_scalars(r).items():
            assert scalars[tag][r["epoch"]] == [pytest.approx(value, rel=1e-6)]  # stored as float32


def test_epoch_events_are_readable_at_once_and_resume_without_repeats(tmp_path, runs):
    pytest.importorskip("tensorboardX")
    history = make_history(11, epochs=4)
    logdir = tmp_path / "run_0"
    events = tb.EpochEvents()
    events.write(logdir, history[:1])
    assert_events_hold(logdir, history[:1])  # flushed while the writer is still open
    events.write(logdir, history[:2])
    assert_events_hold(logdir, history[:2])
    events.close()
    assert len(list(logdir.iterdir())) == 1  # one file per attempt

    # resumed after epoch 2: a second file continues the first, no step repeated (raw files too)
    with tb.EpochEvents() as events:
        events.write(logdir, history[:3])
        assert_events_hold(logdir, history[:3], purge=False)
    # resumed again with nothing left to train: the files are kept as they are
    with tb.EpochEvents() as events:
        events.write(logdir, history[:3])
    assert len(list(logdir.iterdir())) == 2


def test_epoch_events_fill_what_an_earlier_attempt_missed_and_purge_what_it_outran(tmp_path):
    pytest.importorskip("tensorboardX")
    history = make_history(12, epochs=4)
    # no events yet (a run resumed after epoch 2 whose attempt wrote none): all of its history
    with tb.EpochEvents() as events:
        events.write(tmp_path / "none", history[:3])
    assert_events_hold(tmp_path / "none", history[:3], purge=False)

    # the earlier attempt's events stop at epoch 1 but its checkpoint at epoch 2: epoch 2 is filled in
    tb.write_tensorboard(tmp_path / "lag", history[:1])
    with tb.EpochEvents() as events:
        events.write(tmp_path / "lag", history[:3])
    assert_events_hold(tmp_path / "lag", history[:3], purge=False)

    # the earlier events reach epoch 4 but the run stands at 2 (other values from epoch 3 on):
    # a restart marker at step 3 hides the stale points, and the new epoch 3 is drawn once
    tb.write_tensorboard(tmp_path / "ahead", make_history(13, epochs=4))
    replaced = history[:2] + make_history(14, epochs=3)[2:]
    with tb.EpochEvents() as events:
        events.write(tmp_path / "ahead", replaced[:2])
        assert_events_hold(tmp_path / "ahead", make_history(13, epochs=4)[:2])
        events.write(tmp_path / "ahead", replaced)
    assert_events_hold(tmp_path / "ahead", make_history(13, epochs=4)[:2] + replaced[2:])
    assert len(tb.read_scalars(tmp_path / "ahead", purge=False)) > len(tb.read_scalars(tmp_path / "ahead"))


def test_test_accuracies_get_their_statistics_and_columns(tmp_path, runs):
    tests = {a: [{"acc": c / 50, "correct": c, "num_test": 50} for c in (40 + k, 43 - 2 * k)]
             for k, a in enumerate(sorted(runs))}
    summary = report.write_summary(tmp_path, runs, NUM_VAL, tests_by_alpha=tests)
    table = summary["honest_table"]
    assert table["num_test"] == 50
    for row, alpha in zip(table["rows"], sorted(runs)):
        values = [t["acc"] for t in tests[alpha]]
        assert row["test_acc"]["mean"] == pytest.approx(np.mean(values))
        assert row["test_acc"]["std"] == pytest.approx(np.std(values, ddof=1))
        assert [r["test_correct"] for r in row["runs"]] == [t["correct"] for t in tests[alpha]]
    md = (tmp_path / "summary.md").read_text()
    assert "test acc (selected on val)" in md and report.TEST_NOTE in md and "(41/50)" in md
    plain = report.write_summary(tmp_path / "plain", runs, NUM_VAL)
    assert "num_test" not in plain["honest_table"] and "test acc" not in (tmp_path / "plain" / "summary.md").read_text()
