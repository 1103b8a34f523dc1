"""The host loop of kdjax.engine (kdjax.engine.loop): files, resume (also after SIGKILL), mismatches, faults.

Runs use 32 px images, ResNet-18 as both student and teacher (the engine does not care which
ResNet the teacher is; test_engine_step covers ResNet-50) and 2-3 epochs on a generated folder.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
import subprocess

import jax
import numpy as np
import pytest

from conftest import (
    as_teacher,
    child_command,
    child_env,
    make_image_folder,
    read_history,
    read_metrics,
    train_batch,
    varied_size,
)
from kdjax import checkpoint, data, engine, models
from kdjax.config import DistillConfig, OptimConfig, TrainConfig
from kdjax.predict import predict_files

SPEC = {"train": {"ants": 10, "bees": 10}, "val": {"ants": 6, "bees": 6}}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("train") / "images", SPEC, size=varied_size)


@pytest.fixture(scope="module")
def dataset(folder, tmp_path_factory):
    return data.load_splits(folder, image_size=32, cache_dir=tmp_path_factory.mktemp("cache"))


def _teacher(seed: int = 1) -> engine.Teacher:
    model = models.create_model("resnet18", 2)
    return as_teacher("resnet18", model, models.init_variables(model, jax.random.key(seed), 32))


def _student():
    return models.init_variables(models.create_model("resnet18", 2), jax.random.key(2), 32)


def _config(**kw) -> TrainConfig:
    base = dict(
        optim=OptimConfig(lr=0.05, step_size=1, gamma=0.5),
        distill=DistillConfig(alpha=0.5, student_train="fc"),
        num_epochs=2,
        batch_size=4,
        image_size=32,
        seed=0,
    )
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def finished_run(dataset, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    result = engine.train_and_evaluate(engine.Run(_config(), workdir, _student()), dataset, teacher=_teacher())
    return workdir, result


def test_run_writes_metrics_checkpoints_and_best_model(finished_run, dataset, folder):
    workdir, result = finished_run
    assert [r["epoch"] for r in result.history] == [1, 2]
    val = result.history[-1]["val"]
    assert set(val) >= {"loss", "acc", "teacher_acc", "diff_t_s", "agreement", "kl_t_s", "ce", "mse"}
    # accuracy is a count over the 12 val images: a multiple of 1/12
    assert abs(val["acc"] * 12 - round(val["acc"] * 12)) < 1e-6
    assert result.history[0]["lr"] == pytest.approx(0.05) and result.history[1]["lr"] == pytest.approx(0.025)
    saved = read_metrics(workdir)
    assert saved["history"] == result.history
    assert saved["best_val_acc"] == max(r["val"]["acc"] for r in result.history)
    meta = checkpoint.read_meta(workdir / "best")
    assert meta.arch == "resnet18" and meta.class_names == ("ants", "bees") and meta.image_size == 32
    assert meta.provenance["epoch"] == result.best_epoch
    assert meta.provenance["teacher_fingerprint"] == _teacher().fingerprint
    images = sorted(str(p) for p in (folder / "val" / "ants").iterdir())[:2]
    assert [r["label"] in ("ants", "bees") for r in predict_files(workdir / "best", images)] == [True, True]


def test_teacher_is_not_checkpointed(finished_run):
    workdir, _ = finished_run
    state_files = " ".join(str(p) for p in (workdir / "checkpoints").rglob("*"))
    assert "teacher" not in state_files.replace("teacher_fingerprint", "")


def test_rerunning_a_finished_run_does_not_train_again(finished_run, dataset):
    workdir, result = finished_run
    again = engine.train_and_evaluate(engine.Run(_config(), workdir, _student()), dataset, teacher=_teacher())
    assert again.history == result.history


def test_resume_refuses_another_config_or_teacher(finished_run, dataset):
    workdir, _ = finished_run
    with pytest.raises(engine.ResumeMismatchError, match="config"):
        engine.train_and_evaluate(engine.Run(_config(seed=1), workdir, _student()), dataset, teacher=_teacher())
    with pytest.raises(engine.ResumeMismatchError, match="teacher_fingerprint"):
        engine.train_and_evaluate(engine.Run(_config(), workdir, _student()), dataset, teacher=_teacher(seed=9))


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(dataset, tmp_path):
    # gamma 1e30 multiplies the learning rate by 1e30 after epoch 1: epoch 2 diverges
    config = _config(optim=OptimConfig(lr=0.05, step_size=1, gamma=1e30), num_epochs=3)
    with pytest.raises(engine.NonFiniteLossError, match=r"epoch 2 step \d+/5"):
        engine.train_and_evaluate(engine.Run(config, tmp_path, _student()), dataset, teacher=_teacher())
    assert [r["epoch"] for r in read_history(tmp_path)] == [1]
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [0]


def _child(workdir, folder, cache, *extra, check=True):
    """tests/child.py fine-tuning everything, so that the resume must restore all of the state."""
    return subprocess.run(child_command(workdir, folder, cache, "--student_train", "all", *extra),
                          capture_output=True, text=True, env=child_env(), check=check, timeout=900)


@pytest.fixture(scope="module")
def straight_child(folder, tmp_path_factory):
    """tests/child.py's run, uninterrupted, its data held on the devices."""
    base = tmp_path_factory.mktemp("straight")
    _child(base / "run", folder, base / "cache")
    return read_history(base / "run"), base / "cache"


@pytest.mark.parametrize("data_in_memory", ["on", "off"])
def test_sigkill_mid_epoch_then_restart_equals_uninterrupted_run(folder, tmp_path, data_in_memory, straight_child):
    """The uninterrupted run holds its data on the devices; the killed one streams it (``off``)
    or holds it too: the restart's metrics equal the straight run's exactly either way."""
    straight, cache = straight_child
    flag = ("--data_in_memory", data_in_memory)
    killed = _child(tmp_path / "killed", folder, cache, "--kill-during-epoch", "2", *flag, check=False)
    assert killed.returncode == -9, killed.stderr[-2000:]
    # it died during epoch 2: only epoch 1 is on disk
    assert [r["epoch"] for r in read_history(tmp_path / "killed")] == [1]
    resumed = _child(tmp_path / "killed", folder, cache, *flag)
    assert "resuming" in resumed.stderr
    assert read_history(tmp_path / "killed") == straight


def test_bfloat16_runs_teacher_and_student_in_bfloat16_with_float32_state(dataset):
    import jax.numpy as jnp

    teacher = _teacher()
    spec = engine.step.step_spec_for(_config(compute_dtype="bfloat16"), dataset, "resnet18", teacher)
    assert spec.student.dtype == jnp.bfloat16 and spec.teacher.dtype == jnp.bfloat16
    spec32 = engine.step.step_spec_for(_config(), dataset, "resnet18", teacher)
    assert spec32.teacher.dtype == jnp.float32
    state = engine.step.create_train_state(_student(), spec)
    batch = train_batch(dataset["train"].train, np.arange(4), np.ones(4, bool), 0, 0, 32)
    hparams = engine.hparams_for(_config())
    new16, m16 = engine.train_step(state, teacher.variables, batch, hparams, spec)
    _, m32 = engine.train_step(state, teacher.variables, batch, hparams, spec32)
    # master weights, statistics and optimiser state stay float32
    assert {leaf.dtype for leaf in jax.tree.leaves(new16)} <= {jnp.dtype(jnp.float32), jnp.dtype(jnp.int32)}
    # bfloat16 keeps 8 bits of mantissa: the loss agrees with float32 to a few percent, not 1e-6
    assert abs(float(m16["loss"]) - float(m32["loss"])) <= 0.05 * abs(float(m32["loss"])) + 1e-3
    assert float(m16["loss"]) != float(m32["loss"])


def test_non_finite_loss_in_the_first_epoch_says_nothing_was_saved(tmp_path):
    steps = {"loss": np.array([0.5, np.nan]), "loss_sum": np.ones(2), "correct": np.ones(2), "count": np.ones(2)}
    with pytest.raises(engine.NonFiniteLossError, match=r"epoch 1 step 2/2; nothing of this epoch was saved, "
                                                       r"no epoch of this run was saved yet"):
        engine.store.summarize_steps(steps, 0, tmp_path)
    with pytest.raises(engine.NonFiniteLossError, match=r"the last good checkpoint is epoch 3 in"):
        engine.store.summarize_steps(steps, 3, tmp_path)


def test_feature_losses_train_their_adapters_and_export_the_student_alone(dataset, tmp_path):
    """``ce:1 fitnet:1 pooled:0.5``: every term is logged per epoch (train and val); the FitNet
    regressor and the projector are trained with the student and checkpointed in its train state
    (a resumed run continues them), and the exported best model is the student alone."""
    config = _config(distill=DistillConfig(loss="ce:1 fitnet:1 pooled:0.5", student_train="all",
                                           pairs={"fitnet": (("layer3", "layer3"),)}))
    result = engine.train_and_evaluate(engine.Run(config, tmp_path, _student()), dataset, teacher=_teacher())
    for record in result.history:
        assert set(record["train"]) >= {"loss", "ce", "fitnet", "pooled"}
        assert set(record["val"]) >= {"loss", "ce", "fitnet", "pooled", "agreement"}
        v = record["val"]
        assert v["loss"] == pytest.approx(v["ce"] + v["fitnet"] + 0.5 * v["pooled"], rel=1e-5)

    import orbax.checkpoint as ocp

    saved = ocp.StandardCheckpointer().restore(tmp_path / "checkpoints" / "1" / "state")
    spec = engine.step.step_spec_for(config, dataset, "resnet18", _teacher())
    fresh = engine.step.init_aux(spec, config.seed)
    assert set(saved["aux"]["params"]) == {"fitnet", "pooled"}
    kernel = saved["aux"]["params"]["fitnet"]["0"]["conv"]["kernel"]
    assert kernel.shape == (1, 1, 256, 256)  # layer3 -> layer3 of two ResNet-18s
    assert not np.allclose(kernel, fresh["params"]["fitnet"]["0"]["conv"]["kernel"])  # trained
    assert not np.allclose(saved["aux"]["batch_stats"]["fitnet"]["0"]["bn"]["mean"], 0.0)  # statistics updated
    _, variables, _ = checkpoint.load_model(tmp_path / "best")
    assert jax.tree.structure(variables) == jax.tree.structure(_student())


def _histories(results):
    return [[{k: v for k, v in r.items() if k != "seconds"} for r in result.history] for result in results]


def test_teacher_cache_fills_once_and_a_second_study_trains_identically(dataset, tmp_path, monkeypatch):
    """Two seeds trained together (the cache's per-seed files, gathered and scattered by
    example): a study with the cache fills it; a second study (another alpha and loss) over the
    same seeds reads it without running the teacher, and its metrics equal, to the last bit, the
    same study's without a cache."""
    teacher = _teacher()

    def runs(name, alpha, loss):
        config = _config(optim=OptimConfig(lr=0.002, step_size=1, gamma=0.5),
                         distill=DistillConfig(alpha=alpha, loss=loss, student_train="all"))
        return [engine.Run(dataclasses.replace(config, seed=seed), tmp_path / name / str(seed), _student())
                for seed in (0, 1)]

    cache = tmp_path / "cache"
    engine.train_runs(runs("fill", 0.5, "mse"), dataset, teacher=teacher,
                      options=engine.EngineOptions(teacher_cache_dir=cache))
    [entry] = list(cache.iterdir())
    assert sorted(p.name for p in entry.glob("*.npy")) == [f"seed{s}_epoch{e}.npy" for s in (0, 1) for e in (0, 1)]
    logits = np.load(entry / "seed0_epoch0.npy")
    assert logits.shape == (dataset["train"].num_examples, 2) and np.all(np.isfinite(logits))

    plain = engine.train_runs(runs("plain", 0.3, "kd"), dataset, teacher=teacher)

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher ran although its outputs were cached")

    monkeypatch.setattr(engine.groups, "teacher_outputs", no_teacher)
    cached = engine.train_runs(runs("cached", 0.3, "kd"), dataset, teacher=teacher,
                               options=engine.EngineOptions(teacher_cache_dir=cache))
    assert _histories(cached) == _histories(plain)
    with pytest.raises(ValueError, match="reads its feature taps"):
        config = _config(distill=DistillConfig(loss="ce:1 at:1", student_train="all"))
        engine.train_runs([engine.Run(config, tmp_path / "at", _student())], dataset, teacher=teacher,
                          options=engine.EngineOptions(teacher_cache_dir=cache))


@pytest.mark.parametrize("in_memory", ["on", "off"])
def test_a_test_split_scores_the_model_selected_on_val(folder, tmp_path, in_memory):
    """test/ holds the val images with their labels swapped: the model selected on val (its best
    epoch) must then score exactly 1 - its val accuracy on test, which shows that selection used
    val and that the score is the selected model's on test's own labels."""
    root = tmp_path / "images"
    shutil.copytree(folder, root)
    for cls, other in (("ants", "bees"), ("bees", "ants")):
        shutil.copytree(folder / "val" / cls, root / "test" / other)
    ds = data.load_splits(root, image_size=32, cache_dir=tmp_path / "cache", in_memory=in_memory)
    assert ds.test is not None and ds.test.num_examples == 12
    [result] = engine.train_runs([engine.Run(_config(num_epochs=2), tmp_path / "run", _student())], ds,
                                teacher=_teacher())
    test = json.loads((tmp_path / "run" / engine.store.TEST_FILE).read_text())
    assert result.test == test and test["num_test"] == 12
    assert test["selected_epoch"] == result.best_epoch and test["selected_val_acc"] == result.best_val_acc
    assert test["correct"] == 12 - round(result.best_val_acc * 12)
    assert "test: " in (tmp_path / "run" / "train.log").read_text()


def test_console_lines_name_each_run_by_its_directory():
    paths = [pathlib.Path("/o/alpha_0/run_0"), pathlib.Path("/o/alpha_0.5/run_1")]
    assert engine.store.run_labels(paths) == ["alpha_0/run_0", "alpha_0.5/run_1"]
    assert engine.store.run_labels(paths[1:]) == ["alpha_0.5/run_1"]  # a run alone keeps its parent's name
    assert engine.store.run_labels([pathlib.Path("/o/alpha_0.5/run_0"), pathlib.Path("/o/alpha_0.5/run_1")]) == \
        ["alpha_0.5/run_0", "alpha_0.5/run_1"]
