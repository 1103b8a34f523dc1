"""kdjax.engine.store: run directories of earlier kdjax versions resume; one writer per study;
a damaged checkpoint is set aside; a failed write ends in one line."""

from __future__ import annotations

import json
import pathlib
import shutil
import sys

import jax
import pytest

from conftest import assert_same_history, read_history
from kdjax import data, engine, models
from kdjax.config import DistillConfig, OptimConfig, TrainConfig

FIXTURES = pathlib.Path(__file__).with_name("fixtures")
sys.path.insert(0, str(FIXTURES))
import tiny_net  # noqa: E402

# the run of fixtures/run_v0 (fixtures/make_run_v0.py)
V0_CONFIG = TrainConfig(optim=OptimConfig(lr=0.05, step_size=1, gamma=0.5, weight_decay=1e-4),
                        distill=DistillConfig(alpha=0.3, loss="kd", hparams={"temperature": 2.0}, student_train="fc"),
                        num_epochs=2, batch_size=4, image_size=32, seed=3)


@pytest.fixture
def tiny_registered(monkeypatch):
    monkeypatch.setitem(models.ARCHS, tiny_net.NAME, tiny_net.SPEC)


def test_a_run_directory_of_kdjax_before_the_engine_package_resumes(tiny_registered, tmp_path):
    """``fixtures/run_v0`` was written by a215289 (every config field recorded, the run stopped
    after epoch 1 of 2): it resumes after epoch 1, and its two epochs equal that version's
    uninterrupted run. Tolerance: the fixture was computed on this machine kind; rtol 1e-6 leaves
    room for another CPU's instruction set, counts are exact."""
    root = tmp_path / "v0"
    shutil.copytree(FIXTURES / "run_v0", root)
    recorded = json.loads((root / "run" / "metrics.json").read_text())["run"]["config"]
    assert recorded["optim"] == {"lr": 0.05, "momentum": 0.9, "step_size": 1, "gamma": 0.5, "weight_decay": 0.0001}
    dataset = data.load_splits(root / "images", image_size=32, cache_dir=tmp_path / "cache")
    teacher = engine.load_teacher(root / "teacher", dataset)
    student = models.init_variables(models.create_model(tiny_net.NAME, 2), jax.random.key(2), 32)
    run = engine.Run(V0_CONFIG, root / "run", student, {"init": "scratch"})
    result = engine.train_and_evaluate(run, dataset, student_arch=tiny_net.NAME, teacher=teacher)
    assert "resuming" in (root / "run" / "train.log").read_text()
    want = json.loads((root / "expected_history.json").read_text())
    assert_same_history(read_history(root / "run"), want, rtol=1e-6)
    assert [r["epoch"] for r in result.history] == [1, 2]
    # what the resumed run records now leaves the defaults out
    now = json.loads((root / "run" / "metrics.json").read_text())["run"]["config"]
    assert now["optim"] == {"lr": 0.05, "step_size": 1, "gamma": 0.5, "weight_decay": 0.0001}
