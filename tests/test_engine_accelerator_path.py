"""The GPU default path of kdjax.engine (scanned epochs, runs vectorised, bfloat16), exercised on
2 simulated CPU devices against the CPU default (a host loop, one run after another, float32).

A generated folder at 32 px, ResNet-18 teacher and students with measured BatchNorm statistics
(logits O(1), as with trained networks), 2 alphas x 2 seeds in the seed's ``fc`` mode, 2 epochs.

Tolerances:
- float32: the scanned, vectorised program sums in another order than the host loop (batched
  convolutions, heads applied to shared features), so figures drift apart by round-off over the
  steps: 1e-4 relative, as tests/test_engine_groups.py; accuracy counts are equal.
- bfloat16: 8 bits of mantissa (relative rounding 2^-9 = 2e-3 per operation) through ~20 layers
  of teacher and student, then 10 optimiser steps (at the seed's lr 0.001) that carry the
  differences on: the validation loss, its terms and the logit difference are held to 5e-2
  relative of the float32 figure (measured up to MEASURED_BF16) and accuracies to 2 of the 12
  examples.
"""

from __future__ import annotations

import jax
import pytest

from conftest import as_teacher, assert_same_history, calibrated_variables, make_image_folder, read_history, varied_size
from kdjax import data, engine, models, sharding
from kdjax.config import DistillConfig, OptimConfig, TrainConfig

SPEC = {"train": {"ants": 10, "bees": 10}, "val": {"ants": 6, "bees": 6}}
SEEDS, ALPHAS = (0, 1), (0.0, 0.5)
RTOL_F32 = 1e-4
RTOL_BF16 = 5e-2
MEASURED_BF16 = "2.9e-2"  # the largest relative difference seen (val loss), 2026-12-01


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    root = make_image_folder(tmp_path_factory.mktemp("accel") / "images", SPEC, varied_size)
    dataset = data.load_splits(root, image_size=32, cache_dir=tmp_path_factory.mktemp("cache"))
    model = models.create_model("resnet18", 2)
    images = dataset["val"].eval.images
    t_vars = calibrated_variables(model, jax.random.key(100), images)
    teacher = as_teacher("resnet18", model, t_vars)
    students = {s: calibrated_variables(model, jax.random.key(s), images) for s in SEEDS}
    return dataset, teacher, students, sharding.data_mesh(jax.devices()[:2])


def _runs(root, students, dtype: str) -> list[engine.Run]:
    def config(seed, alpha):
        return TrainConfig(optim=OptimConfig(lr=0.001, step_size=1, gamma=0.5),
                           distill=DistillConfig(alpha=alpha), num_epochs=2, batch_size=4, image_size=32,
                           seed=seed, compute_dtype=dtype)

    return [engine.Run(config(s, a), root / f"a{a}_s{s}", students[s]) for a in ALPHAS for s in SEEDS]


@pytest.fixture(scope="module")
def plain(setting, tmp_path_factory):
    dataset, teacher, students, mesh = setting
    runs = _runs(tmp_path_factory.mktemp("plain"), students, "float32")
    return engine.train_runs(runs, dataset, teacher=teacher, mesh=mesh,
                             options=engine.EngineOptions(vectorize=False, scan_epochs=False))


def _accelerated(setting, root, dtype):
    dataset, teacher, students, mesh = setting
    return engine.train_runs(_runs(root, students, dtype), dataset, teacher=teacher, mesh=mesh,
                             options=engine.EngineOptions(vectorize=True, scan_epochs=True))


def _worst(got, want, key):
    return max(abs(g["val"][key] - w["val"][key]) / abs(w["val"][key])
               for a, b in zip(got, want) for g, w in zip(a.history, b.history))


def test_float32_scanned_and_vectorised_equals_the_plain_path(setting, plain, tmp_path):
    got = _accelerated(setting, tmp_path, "float32")
    for g, w in zip(got, plain):
        history = read_history(g.workdir)
        assert [r["epoch"] for r in history] == [1, 2] and all(r["runs_together"] == 4 for r in history)
        assert_same_history(history, read_history(w.workdir), rtol=RTOL_F32)


def test_bfloat16_on_the_accelerator_path_stays_near_float32(setting, plain, tmp_path):
    got = _accelerated(setting, tmp_path, "bfloat16")
    for key in ("loss", "ce", "mse", "diff_t_s"):
        worst = _worst(got, plain, key)
        print(f"bfloat16 vs float32, val {key}: {worst:.2e} relative")
        assert worst <= RTOL_BF16, f"val {key}: {worst:.3g} relative (measured up to {MEASURED_BF16})"
        assert worst > 0  # bfloat16 really ran
    n = sum(SPEC["val"].values())
    for a, b in zip(got, plain):
        for g, w in zip(a.history, b.history):
            assert abs(g["val"]["acc"] - w["val"]["acc"]) * n <= 2 + 1e-9
