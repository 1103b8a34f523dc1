"""The modern recipes' engine pieces: the EMA of the student (timm's ModelEmaV3), gradient
accumulation, and traced recipe values (a sweep compiles once).

The networks are tests/fixtures/tiny_net.py's (with and without BatchNorm), 32 px, so each test
takes seconds."""

from __future__ import annotations

import dataclasses
import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import make_image_folder, read_history
from kdjax import checkpoint, data, engine, models
from kdjax.config import AugmentConfig, DistillConfig, OptimConfig, TrainConfig
from kdjax.models import layers

sys.path.insert(0, str(pathlib.Path(__file__).with_name("fixtures")))
import tiny_net  # noqa: E402


class NoNorm(nn.Module):
    """tiny_net without BatchNorm: one batch of K*B and K accumulated batches of B see the same
    function (BatchNorm's batch statistics would differ)."""

    num_classes: int = 2
    dtype: object = jnp.float32
    head: bool = True

    @nn.compact
    def __call__(self, x, train: bool = False, mask=None, taps: bool = False):
        x = nn.relu(layers.conv(8, 3, 2, name="conv1", dtype=self.dtype, bias=True)(x))
        x = jnp.mean(x, axis=(1, 2))
        features = {"pool": x}
        if self.head:
            x = layers.linear(self.num_classes, x.shape[-1], self.dtype, name="fc")(x)
        return (x, features) if taps else x


NO_NORM = dataclasses.replace(tiny_net.SPEC, name="no_norm", build=NoNorm, taps=("pool",))


@pytest.fixture(autouse=True)
def registered(monkeypatch):
    monkeypatch.setitem(models.ARCHS, tiny_net.NAME, tiny_net.SPEC)
    monkeypatch.setitem(models.ARCHS, "no_norm", NO_NORM)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = make_image_folder(tmp_path_factory.mktemp("recipes") / "images",
                             {"train": {"a": 6, "b": 6}, "val": {"a": 4, "b": 4}})
    return data.load_splits(root, image_size=32, cache_dir=tmp_path_factory.mktemp("cache"))


def _teacher():
    model = models.create_model(tiny_net.NAME, 2)
    return engine.teachers.from_variables(tiny_net.NAME, models.init_variables(model, jax.random.key(1), 32))


def _student(arch=tiny_net.NAME, seed=2):
    return models.init_variables(models.create_model(arch, 2), jax.random.key(seed), 32)


def _config(**kw):
    base = dict(optim=OptimConfig(lr=0.05, step_size=1, gamma=0.7),
                distill=DistillConfig(alpha=0.5, student_train="all"), num_epochs=3, batch_size=4, image_size=32)
    return TrainConfig(**{**base, **kw})


def test_the_ema_decay_is_timm_model_ema_v3s():
    timm_ema = pytest.importorskip("timm.utils.model_ema")
    import torch

    for warmup in (True, False):
        ema = timm_ema.ModelEmaV3(torch.nn.Linear(2, 2), decay=0.999, use_warmup=warmup)
        want = np.asarray([ema.get_decay(step) for step in range(1, 300)])
        got = np.asarray([float(engine.step.ema_decay(0.999, jnp.int32(step), warmup)) for step in range(1, 300)])
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)  # float32 of timm's float64


def test_an_ema_run_resumes_exactly_and_select_ema_keeps_the_ema_student(dataset, tmp_path):
    config = _config(ema_decay=0.8, select="ema")
    whole = engine.train_and_evaluate(engine.Run(config, tmp_path / "whole", _student()), dataset,
                                      student_arch=tiny_net.NAME, teacher=_teacher())
    assert all(set(r["val_ema"]) == set(r["val"]) for r in whole.history)
    assert whole.history[-1]["val_ema"]["loss"] != whole.history[-1]["val"]["loss"]

    class Stop(Exception):
        pass

    def stop(record):
        if record["epoch"] == 1:
            raise Stop

    with pytest.raises(Stop):
        engine.train_and_evaluate(engine.Run(config, tmp_path / "cut", _student()), dataset,
                                  student_arch=tiny_net.NAME, teacher=_teacher(), on_epoch=stop)
    engine.train_and_evaluate(engine.Run(config, tmp_path / "cut", _student()), dataset,
                              student_arch=tiny_net.NAME, teacher=_teacher())
    assert read_history(tmp_path / "cut") == read_history(tmp_path / "whole")  # the EMA restored exactly
    # best/ is the EMA student of the epoch whose EMA scored best
    best_epoch = max(range(3), key=lambda e: (whole.history[e]["val_ema"]["acc"], -e)) + 1
    assert checkpoint.read_meta(tmp_path / "whole" / "best").provenance["epoch"] == best_epoch
    with pytest.raises(ValueError, match="--select ema needs --ema_decay"):
        _config(select="ema")


def _micro_batch(split, indices):
    return data.train_views(data.take_rows(split, jnp.asarray(indices)), jnp.asarray(indices),
                            jnp.ones(len(indices), bool), 0, 0, image_size=32)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_two_accumulated_batches_equal_one_batch_of_both_without_batchnorm(dataset, optimizer):
    """K=2 micro-batches of 4 then one update equal one batch of 8 (example-weighted mean of the
    micro-gradients: the batch-of-8 gradient). Tolerance 1e-4 of each tensor's update: the two
    sides sum a gradient in another order, and a bias's gradient sums 2,048 terms of both signs
    whose cancellation leaves ~1e-5 of its value as rounding (measured 9e-6)."""
    split = jax.device_put(dataset["train"].train)
    student = _student("no_norm")
    t_model = models.create_model(tiny_net.NAME, 2)
    t_vars = models.init_variables(t_model, jax.random.key(1), 32)

    def spec_for(accum):
        config = _config(optim=OptimConfig(optimizer=optimizer, lr=0.05, step_size=1, accum_steps=accum))
        teacher = engine.teachers.from_variables(tiny_net.NAME, t_vars)
        spec = engine.step.step_spec_for(config, dataset, "no_norm", teacher)
        return dataclasses.replace(spec, steps_per_epoch=2 if accum == 2 else 1), engine.hparams_for(config)

    spec2, hp = spec_for(2)
    state = engine.step.create_train_state(student, spec2)
    for part in (range(4), range(4, 8)):
        state, _ = engine.train_step(state, t_vars, _micro_batch(split, list(part)), hp, spec2)
    spec1, hp = spec_for(1)
    one, _ = engine.train_step(engine.step.create_train_state(student, spec1), t_vars,
                               _micro_batch(split, list(range(8))), hp, spec1)
    leaves = jax.tree.leaves
    for a, b, before in zip(leaves(state.params), leaves(one.params), leaves(student["params"])):
        assert not np.allclose(a, before)
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * float(np.abs(b - before).max()))


def test_runs_that_differ_in_lr_decay_and_ema_train_together_with_one_compilation(dataset, tmp_path):
    step = engine.trainer._group_step_jit
    configs = [_config(optim=OptimConfig(lr=lr, step_size=1, weight_decay=wd), ema_decay=d, num_epochs=1, seed=s)
               for lr, wd, d, s in ((0.05, 1e-4, 0.9, 0), (0.01, 5e-4, 0.99, 1))]
    runs = [engine.Run(c, tmp_path / f"r{k}", _student()) for k, c in enumerate(configs)]
    engine.train_runs(runs, dataset, student_arch=tiny_net.NAME, teacher=_teacher())
    size = step._cache_size()
    others = [dataclasses.replace(c, optim=dataclasses.replace(c.optim, lr=c.optim.lr * 3, weight_decay=1e-3),
                                  ema_decay=0.5) for c in configs]
    got = engine.train_runs([engine.Run(c, tmp_path / f"o{k}", _student()) for k, c in enumerate(others)], dataset,
                            student_arch=tiny_net.NAME, teacher=_teacher())
    assert step._cache_size() == size  # nothing retraced
    assert got[0].history[0]["lr"] == pytest.approx(0.15) and got[1].history[0]["lr"] == pytest.approx(0.03)


def _strong(**kw):
    return AugmentConfig(**{"augment": "randaugment", "random_erasing": 0.25, "mixup_alpha": 0.8, "cutmix_alpha": 1.0,
                            **kw})


def test_mixed_views_train_identically_from_a_teacher_cache(dataset, tmp_path):
    """RandAugment, erasing, mixup and cutmix on: the teacher's logits on each (mixed) view are
    cached as the view they are, so a study reading them trains as one that runs the teacher."""
    config = _config(augment=_strong(), num_epochs=2, distill=DistillConfig(loss="ce:1 kd:1", student_train="all"))

    def runs(name):
        return [engine.Run(dataclasses.replace(config, seed=s), tmp_path / name / str(s), _student()) for s in (0, 1)]

    cache = engine.EngineOptions(teacher_cache_dir=tmp_path / "cache")
    plain = engine.train_runs(runs("plain"), dataset, student_arch=tiny_net.NAME, teacher=_teacher())
    engine.train_runs(runs("fill"), dataset, student_arch=tiny_net.NAME, teacher=_teacher(), options=cache)
    read = engine.train_runs(runs("read"), dataset, student_arch=tiny_net.NAME, teacher=_teacher(), options=cache)
    for a, b in zip(plain, read):
        assert [{k: v for k, v in r.items() if k != "seconds"} for r in a.history] == \
               [{k: v for k, v in r.items() if k != "seconds"} for r in b.history]
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == 4  # 2 seeds x 2 epochs


def test_runs_that_differ_in_mixing_alphas_train_together_with_one_compilation(dataset, tmp_path):
    step = engine.trainer._group_step_jit
    alphas = ((0.8, 1.0), (0.2, 0.5))
    configs = [_config(augment=_strong(mixup_alpha=m, cutmix_alpha=c), num_epochs=1) for m, c in alphas]
    runs = [engine.Run(c, tmp_path / f"r{k}", _student()) for k, c in enumerate(configs)]
    first = engine.train_runs(runs, dataset, student_arch=tiny_net.NAME, teacher=_teacher())
    size = step._cache_size()
    others = [dataclasses.replace(c, augment=dataclasses.replace(c.augment, mixup_alpha=0.3)) for c in configs]
    engine.train_runs([engine.Run(c, tmp_path / f"o{k}", _student()) for k, c in enumerate(others)], dataset,
                      student_arch=tiny_net.NAME, teacher=_teacher())
    assert step._cache_size() == size
    # one seed, two alphas: two view groups, so the two runs saw other batches
    assert first[0].history[0]["train"]["loss"] != first[1].history[0]["train"]["loss"]


def test_named_recipes_parse_and_the_command_line_wins(capsys):
    from kdjax.cli import distill, flags, recipe

    assert recipe.named_recipes() == ["function_matching", "imagenet_kd", "mdistiller_cifar", "seed", "timm_kd"]
    parser = distill.build_parser()
    defaults = vars(flags.parse(parser, [], command="distill"))
    assert vars(flags.parse(parser, ["--recipe", "seed"], command="distill")) == {**defaults, "recipe": "seed"}
    timm = flags.parse(parser, ["--recipe", "timm_kd", "--lr", "0.002"], command="distill")
    assert (timm.optimizer, timm.lr, timm.mixup_alpha, timm.ema_decay, timm.augment) == ("adamw", 0.002, 0.8, 0.9998,
                                                                                       "randaugment")
    imagenet = flags.parse(parser, ["--recipe", "imagenet_kd"], command="distill")
    assert (imagenet.milestones, imagenet.batch_size, imagenet.gamma) == ([30, 60, 90], 256, 0.1)
    cifar = flags.train_config(flags.parse(parser, ["--recipe", "mdistiller_cifar"], command="distill"), "resnet8")
    assert (cifar.augment.crop, cifar.optim.milestones, cifar.batch_size, cifar.image_size) == (
        "pad", (150, 180, 210), 64, 32)
    for name in recipe.named_recipes():  # every recipe builds a valid config
        args = flags.parse(parser, ["--recipe", name], command="distill")
        flags.train_config(args, "resnet18")
        assert recipe.describe(name).startswith(name + ":")
    with pytest.raises(SystemExit):
        flags.parse(parser, ["--recipe", "timm"], command="distill")
    assert "--recipe 'timm' is not a recipe kdjax ships (did you mean timm_kd?)" in capsys.readouterr().err


def test_a_changed_recipe_setting_is_named_when_a_run_resumes():
    from kdjax.config import AugmentConfig, config_differences

    adamw = OptimConfig(optimizer="adamw", lr=0.01)
    recorded = _config(optim=adamw, augment=AugmentConfig(mixup_alpha=0.8)).to_json()
    now = _config(optim=dataclasses.replace(adamw, schedule="cosine"), augment=AugmentConfig(mixup_alpha=0.4))
    assert config_differences(recorded, now) == ["optim.schedule: 'step' != 'cosine'",
                                                 "augment.mixup_alpha: 0.8 != 0.4"]
    assert config_differences(recorded, TrainConfig.from_json(recorded)) == []


@pytest.mark.parametrize("kwargs, match", [
    ({"mean": (0.5, 0.5, 0.5)}, "--mean and --std go together: give both or neither"),
    ({"mean": (0.5, 0.5), "std": (0.2, 0.2, 0.2)}, r"--mean takes 3 values \(R G B\), got \[0.5, 0.5\]"),
    ({"mean": (0.5, 0.5, 0.5), "std": (0.2, 0.0, 0.2)}, r"--std must be > 0 per channel, got \[0.2, 0.0, 0.2\]"),
    ({"mean": (125.3, 123.0, 113.9), "std": (0.2, 0.2, 0.2)}, r"--mean is of 0..1 pixel values"),
])
def test_bad_normalization_flags_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AugmentConfig(**kwargs)
