"""kdjax.sweep: runs trained together (vmap) against the same runs one by one.

A generated folder at 32 px, ResNet-18 as teacher and student, batch 4, 2 epochs, 4 simulated
devices (conftest). Both networks get BatchNorm statistics measured on real batches, so logits
are O(1-10) as with trained networks (raw random statistics give logits ~1e4 that turn round-off
into large absolute differences). Tolerance: vmap turns convolutions into batched ones, and the
shared-backbone path applies the head to features computed apart, so XLA may sum in another
order and the runs drift apart by round-off over the steps (train-mode BatchNorm on batches of 4
amplifies it): 1e-4 relative, against up to 1.25e-5 measured after 2 epochs. Accuracy counts
must be equal.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import augment, checkpoint, data, models, sweep, train
from kdjax.config import DistillConfig, OptimConfig, TrainConfig

SPEC = {"train": {"ants": 10, "bees": 10}, "val": {"ants": 6, "bees": 6}}
SEEDS, ALPHAS = (0, 1), (0.0, 0.5)
RTOL = 1e-4


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from conftest import write_image

    root = tmp_path_factory.mktemp("sweep") / "images"
    seed = 0
    for split, classes in SPEC.items():
        for cls, n in classes.items():
            for i in range(n):
                seed += 1
                write_image(root / split / cls / f"{i}.jpg", (40 + seed % 7, 30 + seed % 5), seed)
    return data.load_splits(root, image_size=32, cache_dir=tmp_path_factory.mktemp("cache"))


def _calibrated(model, key, dataset) -> dict:
    """Random weights with BatchNorm running statistics equal to one batch's statistics: after
    one train-mode pass from (mean 0, var 1), running = 0.9 * old + 0.1 * batch."""
    variables = models.init_variables(model, key, 32)
    images = augment.normalize(jnp.asarray(dataset["val"].eval.images))
    _, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
    stats = jax.tree.map(lambda new, old: (new - 0.9 * old) / 0.1, updates["batch_stats"], variables["batch_stats"])
    return {"params": variables["params"], "batch_stats": stats}


@pytest.fixture(scope="module")
def teacher(dataset):
    model = models.create_model("resnet18", 2)
    variables = _calibrated(model, jax.random.key(100), dataset)
    return train.Teacher(model, variables, checkpoint.fingerprint(variables))


@pytest.fixture(scope="module")
def students(dataset):
    model = models.create_model("resnet18", 2)
    return {s: _calibrated(model, jax.random.key(s), dataset) for s in SEEDS}


def _config(seed: int, alpha: float, mode: str = "fc") -> TrainConfig:
    # full fine-tuning at lr 0.01 on batches of 4 blows the networks up (val loss ~1e7), where
    # round-off differences grow without bound: "all" trains at 1e-4
    return TrainConfig(
        optim=OptimConfig(lr=0.01 if mode != "all" else 1e-4, step_size=1, gamma=0.5),
        distill=DistillConfig(alpha=alpha, student_train=mode),
        num_epochs=2, batch_size=4, image_size=32, seed=seed,
    )


def _runs(root, students, mode: str = "fc", pairs=None) -> list[sweep.Run]:
    pairs = pairs or [(a, s) for a in ALPHAS for s in SEEDS]
    return [sweep.Run(_config(s, a, mode), root / f"a{a}_s{s}", students[s]) for a, s in pairs]


def _assert_same_history(got: list[dict], want: list[dict]) -> None:
    assert [r["epoch"] for r in got] == [r["epoch"] for r in want]
    for g, w in zip(got, want):
        assert g["lr"] == w["lr"]
        for phase in ("train", "val"):
            assert set(g[phase]) == set(w[phase])
            for key, value in w[phase].items():
                if key in ("acc", "teacher_acc", "agreement"):
                    assert g[phase][key] == value, (phase, key)
                else:
                    np.testing.assert_allclose(g[phase][key], value, rtol=RTOL, atol=1e-6, err_msg=f"{phase}/{key}")


def _one_by_one(runs, dataset, teacher):
    return [train.train_and_evaluate(r.config, r.workdir, dataset, r.student_variables, teacher=teacher)
            for r in runs]


@pytest.fixture(scope="module")
def one_by_one(dataset, teacher, students, tmp_path_factory):
    return _one_by_one(_runs(tmp_path_factory.mktemp("one_by_one"), students), dataset, teacher)


def test_runs_together_equal_runs_one_by_one(dataset, teacher, students, one_by_one, tmp_path):
    runs = _runs(tmp_path, students)
    together = sweep.train_runs(runs, dataset, teacher=teacher)
    assert len(together) == len(one_by_one) == 4
    for got, want in zip(together, one_by_one):
        _assert_same_history(got.history, want.history)
        assert got.best_epoch == want.best_epoch
        assert all(r["runs_together"] == 4 for r in got.history)
        assert checkpoint.read_meta(got.workdir / "best").provenance["epoch"] == got.best_epoch
        # the saved best students are the same networks (the heads' drift, measured up to
        # 1.7e-5 absolute on weights of ~0.1, bounded at 1e-4)
        _, a, _ = checkpoint.load_model(got.workdir / "best")
        _, b, _ = checkpoint.load_model(want.workdir / "best")
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=RTOL, atol=1e-4), a, b)
    # the alphas of one seed shared a backbone but stayed distinct runs
    assert together[0].history[-1]["val"]["loss"] != together[2].history[-1]["val"]["loss"]


def test_layout_shares_backbones_only_between_equal_seeds_and_weights(students, tmp_path):
    runs = _runs(tmp_path, students)  # alpha-major: (0,s0) (0,s1) (.5,s0) (.5,s1)
    states = [train.create_train_state(r.student_variables, train.make_optimizer(r.config.optim, 5), "fc")
              for r in runs]
    seeds, layout = sweep.layout_for(runs, states, shared=True)
    assert seeds == [0, 1]
    assert layout.run_group.tolist() == [0, 1, 0, 1] and layout.group_rep.tolist() == [0, 1]
    assert layout.run_seed.tolist() == [0, 1, 0, 1] and layout.group_seed.tolist() == [0, 1]
    _, alone = sweep.layout_for(runs, states, shared=False)
    assert alone.run_group.tolist() == [0, 1, 2, 3]


def test_unshared_vmap_path_equals_runs_one_by_one(dataset, teacher, students, one_by_one, tmp_path):
    # every student's whole forward pass vmapped (batched convolutions, BatchNorm updates)
    runs = _runs(tmp_path, students)[2:]  # alpha 0.5, seeds 0 and 1
    got = sweep.train_runs(runs, dataset, teacher=teacher, share_frozen=False)
    for g, w in zip(got, one_by_one[2:]):
        _assert_same_history(g.history, w.history)


def test_full_fine_tuning_step_vmapped_matches_single_steps(dataset, teacher, students):
    # "all" mode, one step: losses agree to round-off; backbone updates are compared relative to
    # how far each tensor moved, <= 0.1 as in test_train_step: gradients through ReLU kinks
    # differ by up to ~10% between two correct summation orders, and over several steps at a
    # learning rate that trains, such differences grow chaotically, so multi-epoch histories
    # are not comparable in this mode.
    spec = train.step_spec_for(_config(0, 0.5, "all"), dataset, "resnet18", teacher)
    split = dataset["train"].train
    states = [train.create_train_state(students[s], spec.tx, "all") for s in SEEDS]
    indices = np.stack([np.arange(4), np.arange(4, 8)]).astype(np.int32)
    mask = np.ones((2, 4), bool)
    hparams = train.hparams_for(_config(0, 0.5, "all"))
    seeds = jnp.asarray(SEEDS, jnp.uint32)
    stacked = jax.tree.map(lambda *x: jnp.stack(x), *states)
    together, metrics = sweep.sweep_step(
        stacked, teacher.variables, split, indices, mask, seeds, jnp.int32(0),
        jax.tree.map(lambda x: jnp.stack([x, x]), hparams), jnp.arange(2, dtype=jnp.int32), spec,
    )
    for k, state in enumerate(states):
        alone, m = train.augmented_step(state, teacher.variables, split, indices[k], mask[k], seeds[k],
                                        jnp.int32(0), hparams, spec)
        np.testing.assert_allclose(metrics["loss"][k], m["loss"], rtol=1e-5)  # measured 1.2e-6
        for before, a, t in zip(jax.tree.leaves(state.params), jax.tree.leaves(alone.params),
                                jax.tree.leaves(together.params)):
            moved = float(jnp.max(jnp.abs(a - before)))
            assert float(jnp.max(jnp.abs(t[k] - a))) <= 0.1 * moved + 1e-7


def test_runs_at_different_epochs_resume_in_groups(dataset, teacher, students, one_by_one, tmp_path):
    runs = _runs(tmp_path, students)[:2]

    class Stop(Exception):
        pass

    def stop(record):
        raise Stop

    # run 0 stopped after its first epoch, one by one: it resumes at epoch 1, run 1 at 0
    with pytest.raises(Stop):
        train.train_and_evaluate(runs[0].config, runs[0].workdir, dataset, runs[0].student_variables,
                                 teacher=teacher, on_epoch=stop)
    seen = []
    results = sweep.train_runs(runs, dataset, teacher=teacher, on_epoch=lambda k, r: seen.append((k, r["epoch"])))
    assert sorted(seen) == [(0, 2), (1, 1), (1, 2)]
    for got, want in zip(results, one_by_one[:2]):
        _assert_same_history(got.history, want.history)
    # a finished sweep read back trains nothing
    again = sweep.train_runs(runs, dataset, teacher=teacher, on_epoch=lambda k, r: seen.append(k))
    assert len(seen) == 3 and [r.history for r in again] == [r.history for r in results]


def test_runs_with_other_recipes_are_refused(dataset, teacher, students, tmp_path):
    runs = _runs(tmp_path, students)
    odd = dataclasses.replace(runs[1], config=dataclasses.replace(runs[1].config, batch_size=8))
    with pytest.raises(ValueError, match="share the recipe"):
        sweep.train_runs([runs[0], odd], dataset, teacher=teacher)
    with pytest.raises(ValueError, match="distinct work directories"):
        sweep.train_runs([runs[0], dataclasses.replace(runs[1], workdir=runs[0].workdir)], dataset, teacher=teacher)
