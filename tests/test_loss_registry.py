"""kdjax.losses' registry as the engine uses it: configs, flags, traced hyper-parameters, and a
loss that reads feature taps (what a feature method plugs into).

The parity of every term with PyTorch and torchdistill is tests/test_losses.py; here the interface.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import conftest
from kdjax import data, engine, losses, models
from kdjax.cli import flags as cli
from kdjax.config import DistillConfig, OptimConfig, TrainConfig


def test_config_fills_defaults_and_refuses_what_the_loss_does_not_take():
    assert DistillConfig(loss="kd").hparams == {"label_smoothing": 0.0, "temperature": 4.0}
    assert DistillConfig(loss="kl", hparams={"temperature": 2}).hparams["temperature"] == 2.0  # the old name
    assert DistillConfig(loss="kl").loss == "kd"
    assert DistillConfig(loss="mse").hparams == {"label_smoothing": 0.0}
    with pytest.raises(ValueError, match="--loss mse takes no --temperature"):
        DistillConfig(loss="mse", hparams={"temperature": 2.0})
    with pytest.raises(ValueError, match="--temperature must be > 0"):
        DistillConfig(loss="kd", hparams={"temperature": 0.0})
    with pytest.raises(ValueError, match="unknown distillation loss kind 'hinton'"):
        DistillConfig(loss="hinton")
    # equal configs are equal and hash alike (a run's identity, the sweep's recipe key)
    a, b = DistillConfig(loss="kd", hparams={"temperature": 3}), DistillConfig(loss="kd", hparams={"temperature": 3.0})
    assert a == b and hash(a) == hash(b)


def test_weighted_terms_and_the_alpha_shorthand():
    shorthand = DistillConfig(alpha=0.3, loss="kd")
    assert shorthand.weights == {"ce": 0.3, "kd": 0.7} and not shorthand.weighted
    weighted = DistillConfig(loss="ce:1 at:500 kd:0.5")
    assert weighted.weights == {"ce": 1.0, "at": 500.0, "kd": 0.5} and weighted.alpha == 1.0
    assert weighted.loss == "ce:1 at:500 kd:0.5" and weighted.terms == ("ce", "at", "kd")
    assert DistillConfig(loss="dkd:1").alpha == 0.0  # no cross-entropy
    for bad, message in [("ce:1", "has no distillation term"), ("ce", "alone is supervised"),
                         ("ce:1 kd", "has no weight"), ("ce:x kd:1", "must be a number"),
                         ("ce:1 kd:-1", "must be >= 0"), ("kd:1 kd:2", "names kd twice"), ("", "is empty")]:
        with pytest.raises(ValueError, match=message):
            DistillConfig(loss=bad)
    with pytest.raises(ValueError, match="--fitnet_pairs given, but fitnet is not a term"):
        DistillConfig(loss="kd", pairs={"fitnet": (("stride16", "stride16"),)})


def test_flags_come_from_the_registry(capsys):
    parser = argparse.ArgumentParser()
    cli.add_loss_flags(parser)
    args = parser.parse_args(["--loss", "kd", "--temperature", "2"])
    assert args.temperature == 2.0 and cli.loss_name(args) == "kd"
    assert cli.loss_hparams(args) == {"temperature": 2.0}
    with pytest.raises(ValueError, match="--loss mse takes no --temperature"):
        cli.loss_hparams(parser.parse_args(["--loss", "mse", "--temperature", "2"]))
    args = parser.parse_args(["--loss", "ce:1", "fitnet:2", "--fitnet_pairs", "layer3:layer3", "--label_smoothing",
                              "0.1"])
    assert cli.loss_name(args) == "ce:1 fitnet:2"
    assert cli.loss_pairs(args) == {"fitnet": (("layer3", "layer3"),)}
    assert cli.loss_hparams(args) == {"label_smoothing": 0.1}
    with pytest.raises(ValueError, match="is not STUDENT_TAP:TEACHER_TAP"):
        cli.loss_pairs(parser.parse_args(["--loss", "ce:1", "at:1", "--at_pairs", "layer3"]))


def test_every_weight_and_hyper_parameter_is_traced():
    config = TrainConfig(distill=DistillConfig(loss="kd", hparams={"temperature": 3.0}))
    hparams = engine.hparams_for(config)
    # the loss's weights and hyper-parameters, and (since the recipes issue) the optimiser's lr and decay
    assert set(hparams) == {"weight_ce", "weight_kd", "label_smoothing", "temperature", "optim/lr",
                            "optim/weight_decay"}
    assert all(isinstance(v, jax.Array) for v in hparams.values())
    # what differs between runs trained together: seed, weights and every hyper-parameter
    other = dataclasses.replace(config, seed=3, distill=dataclasses.replace(config.distill, alpha=0.1,
                                                                            hparams={"temperature": 9.0}))
    assert engine.recipe_key(config) == engine.recipe_key(other)
    a = TrainConfig(distill=DistillConfig(loss="ce:1 dkd:1"))
    b = TrainConfig(distill=DistillConfig(loss="ce:0.5 dkd:2", hparams={"dkd_beta": 0.5}))
    assert engine.recipe_key(a) == engine.recipe_key(b)
    assert engine.recipe_key(a) != engine.recipe_key(TrainConfig(distill=DistillConfig(loss="ce:1 kd:1")))


def test_default_tap_pairs_exist_for_every_registered_pair():
    """Each feature term's default pairs name taps both networks have, for every teacher/student
    pair of the registry within one family (ImageNet-sized networks, whose taps name strides of a
    224 px input, and the 32 px CIFAR networks, whose taps are mdistiller's; a ViT's patch grid is
    its stride16 tap)."""
    def family(arch):
        return models.get(arch).input.crop_size == 32

    for name in ("fitnet", "at", "pooled"):
        for s_arch, t_arch in itertools.product(models.ARCHS, repeat=2):
            if family(s_arch) != family(t_arch):
                continue
            obj = losses.objective((name,), None, models.get(s_arch).taps, models.get(t_arch).taps)
            assert obj.pairs_of(name), (name, s_arch, t_arch)
    cifar = models.get("resnet8x4").taps, models.get("resnet32x4").taps
    assert losses.objective(("fitnet",), None, *cifar).pairs_of("fitnet") == (("feat2", "feat2"),)
    assert losses.objective(("at",), None, *cifar).pairs_of("at") == tuple((f"feat{i}", f"feat{i}") for i in (1, 2, 3))
    obj = losses.objective(("ce", "at"), None, models.get("resnet18").taps, models.get("vit_b_16").taps)
    assert obj.pairs_of("at") == (("stride16", "stride16"),)
    with pytest.raises(ValueError, match="the teacher has no tap 'layer9'"):
        losses.objective(("at",), {"at": (("layer3", "layer9"),)}, models.get("resnet18").taps,
                         models.get("resnet50").taps)


def test_a_feature_loss_gets_its_taps_from_both_networks():
    """A step of ``ce:0.25 at:0.75`` equals the loss computed by hand from the networks' own taps."""
    config = TrainConfig(optim=OptimConfig(lr=0.01), batch_size=4, image_size=32,
                         distill=DistillConfig(loss="ce:0.25 at:0.75", student_train="all"))
    student = models.create_model("resnet18", 2)
    teacher = models.create_model("resnet18", 2)
    pairs = (("at", (("layer3", "layer3"), ("layer4", "layer4"))),)
    spec = engine.StepSpec("resnet18", student, teacher, config.optim, 1, "all", config.distill.loss, 32, pairs=pairs)
    assert spec.student_taps == spec.teacher_taps == ("layer3", "layer4")
    s_vars = models.init_variables(student, jax.random.key(0), 32)
    t_vars = models.init_variables(teacher, jax.random.key(1), 32)
    rng = np.random.default_rng(0)
    batch = data.Batch(jnp.asarray(rng.normal(size=(4, 32, 32, 3)), jnp.float32),
                       jnp.asarray([0, 1, 1, 0], jnp.int32), jnp.asarray([True, True, True, False]))
    hparams = engine.hparams_for(config)
    _, metrics = jax.jit(engine.train_step, static_argnames="spec")(
        engine.step.create_train_state(s_vars, spec), t_vars, batch, hparams, spec=spec)

    # the same loss by hand, from the networks' own taps
    mask = np.asarray(batch.mask, np.float32)
    (s_logits, s_feats), _ = student.apply(s_vars, batch.images, train=True, mask=batch.mask, taps=True,
                                           mutable=["batch_stats"])
    _, t_feats = teacher.apply(t_vars, batch.images, train=False, taps=True)

    def at(f):
        a = np.mean(np.asarray(f, np.float64) ** 2, -1).reshape(4, -1)
        return a / np.linalg.norm(a, axis=-1, keepdims=True)

    term = sum(np.sum(np.mean((at(s_feats[k]) - at(t_feats[k])) ** 2, -1) * mask) / mask.sum()
               for k in ("layer3", "layer4"))
    ce = float(losses.cross_entropy(s_logits, batch.labels, mask))
    np.testing.assert_allclose(float(metrics["loss"]), 0.25 * ce + 0.75 * term, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["at_sum"]) / 3, term, rtol=1e-5)
    assert float(metrics["ce_sum"]) / 3 == pytest.approx(ce, rel=1e-5)
    # runs reading features never share a frozen backbone (its taps are per run)
    assert engine.groups.group_mode(dataclasses.replace(spec, student_train="fc"), 4, True) == "vmap"
    assert engine.groups.group_mode(dataclasses.replace(spec, loss="mse", pairs=(), student_train="fc"), 4,
                                    True) == "shared"


def test_the_resnet_taps_are_the_registered_ones():
    spec = models.get("resnet50")
    model = models.create_model("resnet50", 3)
    variables = models.init_variables(model, jax.random.key(0), 64)
    logits, feats = model.apply(variables, jnp.zeros((2, 64, 64, 3)), taps=True)
    assert tuple(feats) == spec.taps
    assert [feats[f"layer{i}"].shape for i in range(1, 5)] == [(2, 16, 16, 256), (2, 8, 8, 512),
                                                                (2, 4, 4, 1024), (2, 2, 2, 2048)]
    assert feats["pool"].shape == (2, spec.head_width) and logits.shape == (2, 3)
    with pytest.raises(ValueError, match="unknown architecture 'vgg999'"):
        models.get("vgg999")


def test_several_teachers_one_vmapped_pass_per_architecture():
    """Three teachers, two of one architecture: the step's loss is CE plus KD towards their mean
    probabilities, computed by hand from each teacher alone, and the two ResNet-18s form one group
    (one vmapped pass); with ``teacher_combine="sum"`` each teacher's KD is summed, CE counted once."""
    student = models.create_model("resnet18", 2)
    teachers = [
        conftest.as_teacher(arch, models.create_model(arch, 2),
                            models.init_variables(models.create_model(arch, 2), jax.random.key(seed), 32))
        for arch, seed in [("resnet18", 1), ("resnet34", 2), ("resnet18", 3)]
    ]
    ensemble = engine.ensemble(teachers)
    assert ensemble.archs == ("resnet18", "resnet18", "resnet34")
    config = TrainConfig(batch_size=4, image_size=32, optim=OptimConfig(lr=0.0),
                         distill=DistillConfig(alpha=0.3, loss="kd", student_train="all"))
    spec = engine.StepSpec("resnet18", student, ensemble.model, config.optim, 1, "all", "kd", 32,
                          teacher_groups=engine.teachers.step_groups(ensemble, jnp.float32, 32))
    assert [(g.arch, g.count) for g in spec.teacher_groups] == [("resnet18", 2), ("resnet34", 1)]
    s_vars = models.init_variables(student, jax.random.key(0), 32)
    rng = np.random.default_rng(0)
    batch = data.Batch(jnp.asarray(rng.normal(size=(4, 32, 32, 3)), jnp.float32),
                       jnp.asarray([0, 1, 1, 0], jnp.int32), jnp.asarray([True, True, True, True]))
    hparams = engine.hparams_for(config)
    _, metrics = jax.jit(engine.train_step, static_argnames="spec")(
        engine.step.create_train_state(s_vars, spec), ensemble.variables, batch, hparams, spec=spec)

    s_logits, _ = student.apply(s_vars, batch.images, train=True, mask=batch.mask, mutable=["batch_stats"])
    t_logits = [t.model.apply(t.variables, batch.images, train=False) for t in teachers]
    ce = float(losses.cross_entropy(s_logits, batch.labels))
    mean_p = np.mean([jax.nn.softmax(t) for t in t_logits], axis=0)
    kd = float(losses.hinton_kl(s_logits, jnp.log(mean_p), 4.0))
    np.testing.assert_allclose(float(metrics["loss"]), 0.3 * ce + 0.7 * kd, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["kd_sum"]) / 4, kd, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["ce_sum"]) / 4, ce, rtol=1e-5)

    # the same figures through the evaluation's loss, for both ways of combining
    stacked = losses.Outputs(jnp.stack([t_logits[0], t_logits[2], t_logits[1]]))  # the ensemble's order
    for combine, want_kd in [("mean", kd), ("sum", sum(float(losses.hinton_kl(s_logits, t, 4.0)) for t in t_logits))]:
        got = engine.evaluation.eval_metrics(losses.Outputs(s_logits), stacked, batch.labels, {**hparams, "epoch": 1.0},
                                 dataclasses.replace(spec, teacher_combine=combine))
        np.testing.assert_allclose(float(got["kd"]), want_kd, rtol=1e-5, err_msg=combine)
        np.testing.assert_allclose(float(got["loss"]), 0.3 * ce + 0.7 * want_kd, rtol=1e-5, err_msg=combine)
        np.testing.assert_allclose(float(got["teacher_acc"]), np.mean(np.argmax(mean_p, -1) == batch.labels))
