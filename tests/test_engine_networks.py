"""What each network sees and draws in the engine's step.

Teacher and student with different input specs: each sees the same augmented crop, normalised
(and, where its size differs, resized) for itself.

The reference is PyTorch: the student's crop un-normalised, normalised with the teacher's
statistics, resized with ``torch.nn.functional.interpolate(mode="bilinear", antialias=True)``
(torchvision's tensor ``Resize``), then the torchvision teacher. Tolerance 1e-4 on logits, as for
the networks themselves (the resize adds a few float32 roundings per pixel); a wrong
normalisation or resize (align_corners, no antialias when shrinking) moves them by >= 1e-2.

Dropout and stochastic depth: drawn in train mode from the run's ``(seed, step)`` alone, off in
``fc_frozen_bn`` mode (the backbone runs as in evaluation) and in evaluation.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from kdjax import data, engine, losses, models, weights
from kdjax.config import DistillConfig, OptimConfig, TrainConfig
from kdjax.data import augment, transforms
from kdjax.models.spec import InputSpec
from torch_reference import images, numpy_state_dict, torch_resnet

STUDENT_SIZE = 40
MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.3, 0.2)


def _teacher_arch(monkeypatch, size: int) -> str:
    """A ResNet-18 registered as a network of its own input spec: other statistics, and one
    input size (as ViT has)."""
    name = f"resnet18_{size}px"
    spec = dataclasses.replace(models.get("resnet18"), name=name, fixed_size=True,
                               input=InputSpec(crop_size=size, resize_size=size * 8 // 7, mean=MEAN, std=STD))
    monkeypatch.setitem(models.registry.ARCHS, name, spec)
    return name


def _torch_teacher_logits(net, x_student: np.ndarray, size: int) -> np.ndarray:
    x = torch.from_numpy(x_student).permute(0, 3, 1, 2)
    imagenet_mean = torch.tensor(transforms.IMAGENET_MEAN).view(1, 3, 1, 1)
    imagenet_std = torch.tensor(transforms.IMAGENET_STD).view(1, 3, 1, 1)
    x = x * imagenet_std + imagenet_mean
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True,
                                        align_corners=False)
    with torch.no_grad():
        return net.eval()(x).numpy()


@pytest.mark.parametrize("teacher_size", [64, 32])  # larger (upsampled) and smaller (antialiased)
def test_a_teacher_of_another_input_spec_sees_the_students_crop_as_its_own(monkeypatch, teacher_size):
    arch = _teacher_arch(monkeypatch, teacher_size)
    assert engine.network_view("resnet18", STUDENT_SIZE) is None  # the canonical batch, as it is
    view = engine.network_view(arch, STUDENT_SIZE)
    assert view == augment.View(teacher_size, MEAN, STD)

    net = torch_resnet("resnet18", seed=3)
    t_vars = weights.to_flax(numpy_state_dict(net), "resnet18")
    s_vars = weights.to_flax(numpy_state_dict(torch_resnet("resnet18", seed=4)), "resnet18")
    config = TrainConfig(optim=OptimConfig(lr=0.01, momentum=0.9, step_size=7, gamma=0.1),
                         distill=DistillConfig(alpha=0.3, loss="mse", student_train="fc"),
                         batch_size=4, image_size=STUDENT_SIZE)
    spec = engine.StepSpec(student_arch="resnet18", student=models.create_model("resnet18", 2),
                          teacher=models.create_model(arch, 2), optim=config.optim, steps_per_epoch=1,
                          student_train="fc", loss="mse", image_size=STUDENT_SIZE,
                          student_view=None, teacher_view=view)
    x = images(4, STUDENT_SIZE, seed=7)
    want = _torch_teacher_logits(net, x, teacher_size)
    got = np.asarray(jax.jit(engine.step.teacher_outputs, static_argnums=0)(spec, t_vars, jnp.asarray(x)).logits)
    err = np.max(np.abs(got - want))
    print(f"teacher at {teacher_size} px from a {STUDENT_SIZE} px crop: max|dlogit| vs torch {err:.1e} "
          f"(logit scale {np.max(np.abs(want)):.1f})")
    assert err <= 1e-4

    # the whole step: the loss is alpha * CE(student) + (1 - alpha) * MSE(student, torch's teacher)
    labels = np.asarray([0, 1, 1, 0], np.int32)
    batch = data.Batch(jnp.asarray(x), jnp.asarray(labels), jnp.ones(4, bool))
    state = engine.step.create_train_state(s_vars, spec)
    _, metrics = jax.jit(engine.train_step, static_argnames="spec")(state, t_vars, batch, engine.hparams_for(config),
                                                                  spec=spec)
    s_logits = models.create_model("resnet18", 2).apply(s_vars, jnp.asarray(x), train=True, mutable=["batch_stats"])[0]
    ce = losses.cross_entropy(s_logits, jnp.asarray(labels))
    expected = 0.3 * ce + 0.7 * jnp.mean(jnp.square(s_logits - want))
    assert abs(float(metrics["loss"]) - float(expected)) <= 1e-5 * abs(float(expected))


def test_a_network_of_one_input_size_sees_every_batch_at_that_size():
    assert engine.network_view("vit_b_16", 112) == augment.View(224)
    assert engine.network_view("vit_b_16", 224) is None
    assert engine.network_view("convnext_tiny", 112) is None


def test_dropout_masks_come_from_the_runs_seed_and_step():
    config = TrainConfig(optim=OptimConfig(lr=0.01, momentum=0.9, step_size=7, gamma=0.1),
                         distill=None, batch_size=4, image_size=32)
    model = models.create_model("mobilenet_v3_small", 2)  # dropout 0.2 before its head
    assert model.dropout == 0.2
    variables = models.init_variables(model, jax.random.key(0), 32)
    x = jnp.asarray(images(4, 32, seed=9))
    batch = data.Batch(x, jnp.asarray([0, 1, 1, 0], jnp.int32), jnp.ones(4, bool))
    step = jax.jit(engine.train_step, static_argnames="spec")

    def loss(mode: str, seed: int) -> float:
        spec = engine.StepSpec(student_arch="mobilenet_v3_small", student=model,
                              teacher=None, optim=config.optim, steps_per_epoch=1, student_train=mode,
                              image_size=32)
        state = engine.step.create_train_state(variables, spec)
        return float(step(state, None, batch, engine.hparams_for(config), spec=spec, seed=seed)[1]["loss"])

    assert loss("fc", 0) == loss("fc", 0)  # reproducible: the masks depend on (seed, step) alone
    assert loss("fc", 0) != loss("fc", 1)  # drawn in train mode, from the run's seed
    assert loss("fc_frozen_bn", 0) == loss("fc_frozen_bn", 1)  # none: the backbone runs as in eval
