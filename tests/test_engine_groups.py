"""kdjax.engine.groups: runs trained together (vmap, shared backbones) against the same runs
one by one.

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

from conftest import as_teacher, assert_same_history, calibrated_variables, make_image_folder, varied_size
from kdjax import checkpoint, data, engine, models
from kdjax.config import DistillConfig, OptimConfig, TrainConfig

SPEC = {"train": {"ants": 10, "bees": 10}, "val": {"ants": 6, "bees": 6}}
SEEDS, ALPHAS = (0, 1), (0.0, 0.5)
RTOL = 1e-4


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = make_image_folder(tmp_path_factory.mktemp("sweep") / "images", SPEC, size=varied_size)
    return data.load_splits(root, image_size=32, cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def teacher(dataset):
    model = models.create_model("resnet18", 2)
    return as_teacher("resnet18", model, calibrated_variables(model, jax.random.key(100), dataset["val"].eval.images))


@pytest.fixture(scope="module")
def students(dataset):
    model = models.create_model("resnet18", 2)
    return {s: calibrated_variables(model, jax.random.key(s), dataset["val"].eval.images) for s in SEEDS}


def _config(seed: int, alpha: float, mode: str = "fc") -> TrainConfig:
    # full fine-tuning at lr 0.01 on batches of 4 blows the networks up (val loss ~1e7), where
    # round-off differences grow without bound: "all" trains at 1e-4
    return TrainConfig(
        optim=OptimConfig(lr=0.01 if mode != "all" else 1e-4, step_size=1, gamma=0.5),
        distill=DistillConfig(alpha=alpha, student_train=mode),
        num_epochs=2, batch_size=4, image_size=32, seed=seed,
    )


def _runs(root, students, mode: str = "fc", pairs=None) -> list[engine.Run]:
    pairs = pairs or [(a, s) for a in ALPHAS for s in SEEDS]
    return [engine.Run(_config(s, a, mode), root / f"a{a}_s{s}", students[s]) for a, s in pairs]


def _one_by_one(runs, dataset, teacher):
    return [engine.train_and_evaluate(r, dataset, teacher=teacher)
            for r in runs]


@pytest.fixture(scope="module")
def one_by_one(dataset, teacher, students, tmp_path_factory):
    return _one_by_one(_runs(tmp_path_factory.mktemp("one_by_one"), students), dataset, teacher)


def test_runs_together_equal_runs_one_by_one(dataset, teacher, students, one_by_one, tmp_path):
    runs = _runs(tmp_path, students)
    together = engine.train_runs(runs, dataset, teacher=teacher)
    assert len(together) == len(one_by_one) == 4
    for got, want in zip(together, one_by_one):
        assert_same_history(got.history, want.history, RTOL)
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


def test_layout_shares_backbones_only_between_equal_seeds_and_weights(dataset, teacher, students, tmp_path):
    runs = _runs(tmp_path, students)  # alpha-major: (0,s0) (0,s1) (.5,s0) (.5,s1)
    spec = dataclasses.replace(engine.step.step_spec_for(runs[0].config, dataset, "resnet18", teacher),
                               steps_per_epoch=5)
    states = [engine.step.create_train_state(r.student_variables, spec) for r in runs]
    seeds, layout = engine.groups.layout_for([r.config.seed for r in runs], states, "resnet18", shared=True)
    assert seeds == [0, 1]
    assert layout.run_group.tolist() == [0, 1, 0, 1] and layout.group_rep.tolist() == [0, 1]
    assert layout.run_seed.tolist() == [0, 1, 0, 1] and layout.group_seed.tolist() == [0, 1]
    _, alone = engine.groups.layout_for([r.config.seed for r in runs], states, "resnet18", shared=False)
    assert alone.run_group.tolist() == [0, 1, 2, 3]


def test_unshared_vmap_path_equals_runs_one_by_one(dataset, teacher, students, one_by_one, tmp_path):
    # every student's whole forward pass vmapped (batched convolutions, BatchNorm updates)
    runs = _runs(tmp_path, students)[2:]  # alpha 0.5, seeds 0 and 1
    got = engine.train_runs(runs, dataset, teacher=teacher, options=engine.EngineOptions(share_frozen=False))
    for g, w in zip(got, one_by_one[2:]):
        assert_same_history(g.history, w.history, RTOL)


def test_full_fine_tuning_step_vmapped_matches_single_steps(dataset, teacher, students):
    # "all" mode, one step: losses agree to round-off; backbone updates are compared relative to
    # how far each tensor moved, <= 0.1 as in test_engine_step: gradients through ReLU kinks
    # differ by up to ~10% between two correct summation orders, and over several steps at a
    # learning rate that trains, such differences grow chaotically, so multi-epoch histories
    # are not comparable in this mode.
    spec = engine.step.step_spec_for(_config(0, 0.5, "all"), dataset, "resnet18", teacher)
    split = dataset["train"].train
    states = [engine.step.create_train_state(students[s], spec) for s in SEEDS]
    indices = np.stack([np.arange(4), np.arange(4, 8)]).astype(np.int32)
    mask = np.ones((2, 4), bool)
    hparams = engine.hparams_for(_config(0, 0.5, "all"))
    seeds = jnp.asarray(SEEDS, jnp.uint32)
    stacked = jax.tree.map(lambda *x: jnp.stack(x), *states)
    two = jnp.arange(2, dtype=jnp.int32)
    layout = engine.groups.Layout(seeds, two, two, two, two)
    groups = engine.groups
    together, metrics = groups.group_step(
        stacked, teacher.variables, split, groups.StepData(indices, mask),
        groups.GroupContext(jnp.int32(0), jax.tree.map(lambda x: jnp.stack([x, x]), hparams), layout),
        groups.GroupProgram(spec, "vmap"),
    )
    for k, state in enumerate(states):
        alone, m = groups.group_step(
            jax.tree.map(lambda a: a[None], state), teacher.variables, split,
            groups.StepData(indices[k:k + 1], mask[k:k + 1]),
            groups.GroupContext(jnp.int32(0), jax.tree.map(lambda a: a[None], hparams),
                                groups.Layout.single(SEEDS[k])),
            groups.GroupProgram(spec, "single"))
        alone, m = jax.tree.map(lambda a: a[0], (alone, m))
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
        engine.train_and_evaluate(runs[0], dataset, teacher=teacher, on_epoch=stop)
    seen = []
    results = engine.train_runs(runs, dataset, teacher=teacher, on_epoch=lambda k, r: seen.append((k, r["epoch"])))
    assert sorted(seen) == [(0, 2), (1, 1), (1, 2)]
    for got, want in zip(results, one_by_one[:2]):
        assert_same_history(got.history, want.history, RTOL)
    # a finished sweep read back trains nothing
    again = engine.train_runs(runs, dataset, teacher=teacher, on_epoch=lambda k, r: seen.append(k))
    assert len(seen) == 3 and [r.history for r in again] == [r.history for r in results]


def test_runs_with_other_recipes_are_refused(dataset, teacher, students, tmp_path):
    runs = _runs(tmp_path, students)
    odd = dataclasses.replace(runs[1], config=dataclasses.replace(runs[1].config, batch_size=8))
    with pytest.raises(ValueError, match="share the recipe"):
        engine.train_runs([runs[0], odd], dataset, teacher=teacher)
    with pytest.raises(ValueError, match="distinct work directories"):
        engine.train_runs([runs[0], dataclasses.replace(runs[1], workdir=runs[0].workdir)], dataset, teacher=teacher)
