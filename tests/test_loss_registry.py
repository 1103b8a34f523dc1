"""kdjax.losses' registry as the engine uses it: configs, flags, traced hyper-parameters, and a
loss that reads feature taps (what a feature method plugs into).

The parity of mse and kl with PyTorch is tests/test_losses.py; here the interface.
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import cli
from kdjax import data, losses, models, train
from kdjax.config import DistillConfig, OptimConfig, TrainConfig


def test_config_fills_defaults_and_refuses_what_the_loss_does_not_take():
    assert DistillConfig(loss="kl").hparams == {"temperature": 4.0}
    assert DistillConfig(loss="kl", hparams={"temperature": 2}).hparams == {"temperature": 2.0}
    assert DistillConfig(loss="mse").hparams == {}
    with pytest.raises(ValueError, match="--loss mse takes no --temperature"):
        DistillConfig(loss="mse", hparams={"temperature": 2.0})
    with pytest.raises(ValueError, match="--temperature must be > 0"):
        DistillConfig(loss="kl", hparams={"temperature": 0.0})
    with pytest.raises(ValueError, match="--loss must be one of"):
        DistillConfig(loss="hinton")
    # equal configs are equal and hash alike (a run's identity, the sweep's recipe key)
    a, b = DistillConfig(loss="kl", hparams={"temperature": 3}), DistillConfig(loss="kl", hparams={"temperature": 3.0})
    assert a == b and hash(a) == hash(b)


def test_flags_come_from_the_registry(capsys):
    parser = argparse.ArgumentParser()
    cli.add_loss_flags(parser)
    assert parser.parse_args(["--loss", "kl", "--temperature", "2"]).temperature == 2.0
    with pytest.raises(SystemExit):
        parser.parse_args(["--loss", "nope"])
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--loss mse takes no --temperature"):
        cli.loss_hparams(parser.parse_args(["--loss", "mse", "--temperature", "2"]))


def test_every_declared_hyper_parameter_is_traced():
    config = TrainConfig(distill=DistillConfig(loss="kl", hparams={"temperature": 3.0}))
    hparams = train.hparams_for(config)
    assert set(hparams) == {"alpha", "temperature"}
    assert all(isinstance(v, jax.Array) for v in hparams.values())
    # what differs between runs trained together: seed, alpha and every hyper-parameter
    other = dataclasses.replace(config, seed=3, distill=dataclasses.replace(config.distill, alpha=0.1,
                                                                            hparams={"temperature": 9.0}))
    assert train.recipe_key(config) == train.recipe_key(other)


def _pool_term(student, teacher, mask, hparams):
    """A feature term for the test: the mean squared difference of the pooled features."""
    diff = jnp.sum(jnp.square(student.features["pool"] - teacher.features["pool"]), axis=-1)
    return hparams["weight"] * losses.masked_mean(diff, mask)


FEATURE_LOSS = losses.LossSpec("pool_mse", _pool_term, "test: pooled-feature MSE",
                               hparams={"weight": losses.HParam(1.0, "scale")}, features=("pool",))


def test_a_loss_reading_feature_taps_gets_them_from_both_networks(monkeypatch):
    monkeypatch.setitem(losses.LOSSES, "pool_mse", FEATURE_LOSS)
    config = TrainConfig(optim=OptimConfig(lr=0.01), batch_size=4, image_size=32,
                         distill=DistillConfig(alpha=0.25, loss="pool_mse", hparams={"weight": 2.0},
                                               student_train="all"))
    student = models.create_model("resnet18", 2)
    teacher = models.create_model("resnet18", 2)
    spec = train.StepSpec("resnet18", student, teacher, config.optim, 1, "all", "pool_mse", 32)
    assert spec.taps == ("pool",)
    s_vars = models.init_variables(student, jax.random.key(0), 32)
    t_vars = models.init_variables(teacher, jax.random.key(1), 32)
    rng = np.random.default_rng(0)
    batch = data.Batch(jnp.asarray(rng.normal(size=(4, 32, 32, 3)), jnp.float32),
                             jnp.asarray([0, 1, 1, 0], jnp.int32), jnp.asarray([True, True, True, False]))
    hparams = train.hparams_for(config)
    _, metrics = jax.jit(train.train_step, static_argnames="spec")(
        train.create_train_state(s_vars, spec), t_vars, batch, hparams, spec=spec)

    # the same loss by hand, from the networks' own taps
    mask = np.asarray(batch.mask, np.float32)
    (s_logits, s_feats), _ = student.apply(s_vars, batch.images, train=True, mask=batch.mask, taps=True,
                                           mutable=["batch_stats"])
    _, t_feats = teacher.apply(t_vars, batch.images, train=False, taps=True)
    term = 2.0 * np.sum(np.sum((s_feats["pool"] - t_feats["pool"]) ** 2, -1) * mask) / mask.sum()
    ce = float(losses.cross_entropy(s_logits, batch.labels, mask))
    np.testing.assert_allclose(float(metrics["loss"]), 0.25 * ce + 0.75 * term, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["pool_mse_sum"]) / 3, term, rtol=1e-5)
    assert float(metrics["ce_sum"]) / 3 == pytest.approx(ce, rel=1e-5)
    # runs reading features never share a frozen backbone (its taps are per run)
    assert train.group_mode(dataclasses.replace(spec, student_train="fc"), 4, True) == "vmap"
    assert train.group_mode(dataclasses.replace(spec, loss="mse", student_train="fc"), 4, True) == "shared"


def test_the_resnet_taps_are_the_registered_ones():
    spec = models.get("resnet50")
    model = models.create_model("resnet50", 3)
    variables = models.init_variables(model, jax.random.key(0), 64)
    logits, feats = model.apply(variables, jnp.zeros((2, 64, 64, 3)), taps=True)
    assert tuple(feats) == spec.taps
    assert [feats[f"layer{i}"].shape for i in range(1, 5)] == [(2, 16, 16, 256), (2, 8, 8, 512),
                                                                (2, 4, 4, 1024), (2, 2, 2, 2048)]
    assert feats["pool"].shape == (2, spec.head_width) and logits.shape == (2, 3)
    with pytest.raises(ValueError, match="unknown architecture 'vgg11'"):
        models.get("vgg11")
