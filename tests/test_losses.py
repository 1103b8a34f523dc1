"""kdjax.losses against the PyTorch expressions the reference (and Hinton et al.) use.

Tolerances: in float64 the two sides differ only in summation order, so 1e-12 holds with a wide
margin; in float32 (what training runs) each side rounds at ~6e-8 relative per operation over
a handful of operations on O(1) values, so 1e-6 (absolute and relative) is the bound.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdjax.losses import Objective, Outputs, cross_entropy, get, hinton_kl, logit_mse, total, weight_key

BATCH, CLASSES = 16, 5
ALPHAS = (0.0, 0.3, 0.5, 1.0)
TEMPERATURES = (1.0, 2.0, 4.0)
TOL = {"float64": 1e-12, "float32": 1e-6}


def distillation_loss(student_logits, teacher_logits, labels, alpha, temperature, kind, mask=None):
    """The seed's alpha blend through ``kdjax.losses.total``: ``alpha * CE + (1 - alpha) * TERM``
    for a logit-only ``kind`` ("mse": the seed, "kd": Hinton; ``temperature`` is ignored by
    "mse"), and the unweighted terms ``{"ce": CE, kind: TERM}``."""
    name = get(kind).name
    alpha = jnp.asarray(alpha)
    hparams = {"label_smoothing": 0.0, "alpha": alpha, "temperature": temperature,
               weight_key("ce"): alpha, weight_key(name): 1.0 - alpha}
    return total(Objective(("ce", name)), Outputs(student_logits), Outputs(teacher_logits), labels, hparams, mask)


def _data(seed: int = 0, batch: int = BATCH, classes: int = CLASSES):
    rng = np.random.default_rng(seed)
    student = rng.normal(0.0, 2.0, (batch, classes))
    teacher = rng.normal(0.0, 3.0, (batch, classes))
    labels = rng.integers(0, classes, batch)
    return student, teacher, labels


def _torch_loss(s, t, y, alpha, temperature, kind):
    """The reference blend in PyTorch; returns (loss, {term: value})."""
    ce = torch.nn.CrossEntropyLoss()(s, y)
    if kind == "mse":
        soft = torch.nn.MSELoss()(s, t)
    else:
        kl = torch.nn.KLDivLoss(reduction="batchmean")(
            F.log_softmax(s / temperature, dim=1), F.softmax(t / temperature, dim=1)
        )
        soft = temperature**2 * kl
    return alpha * ce + (1 - alpha) * soft, {"ce": ce, kind: soft}


def _torch_value_and_grad(s_np, t_np, y_np, alpha, temperature, kind, dtype):
    s = torch.tensor(s_np, dtype=dtype, requires_grad=True)
    t = torch.tensor(t_np, dtype=dtype)
    y = torch.tensor(y_np, dtype=torch.long)
    loss, terms = _torch_loss(s, t, y, alpha, temperature, kind)
    loss.backward()
    return (
        loss.item(),
        {k: v.item() for k, v in terms.items()},
        s.grad.numpy(),
    )


def _jax_value_and_grad(s_np, t_np, y_np, alpha, temperature, kind, dtype):
    def f(s, t, y, a, temp):
        return distillation_loss(s, t, y, a, temp, kind)

    (loss, terms), grad = jax.jit(jax.value_and_grad(f, has_aux=True))(
        jnp.asarray(s_np, dtype), jnp.asarray(t_np, dtype), jnp.asarray(y_np, jnp.int32),
        jnp.asarray(alpha, dtype), jnp.asarray(temperature, dtype),
    )
    assert loss.dtype == dtype and grad.dtype == dtype
    return float(loss), {k: float(v) for k, v in terms.items()}, np.asarray(grad)


@pytest.mark.parametrize("dtype_name", ["float64", "float32"])
@pytest.mark.parametrize("kind", ["mse", "kd"])
def test_parity_with_torch_values_and_gradients(dtype_name, kind):
    tol = TOL[dtype_name]
    torch_dtype = getattr(torch, dtype_name)
    s, t, y = _data()
    temperatures = TEMPERATURES if kind == "kd" else (1.0,)
    worst = 0.0
    with jax.enable_x64(dtype_name == "float64"):
        dtype = jnp.dtype(dtype_name)
        for alpha, temperature in itertools.product(ALPHAS, temperatures):
            ref = _torch_value_and_grad(s, t, y, alpha, temperature, kind, torch_dtype)
            got = _jax_value_and_grad(s, t, y, alpha, temperature, kind, dtype)
            case = f"{kind} {dtype_name} alpha={alpha} T={temperature}"
            np.testing.assert_allclose(got[0], ref[0], rtol=tol, atol=tol, err_msg=case)
            assert got[1].keys() == ref[1].keys() == {"ce", kind}
            for k in ref[1]:
                np.testing.assert_allclose(got[1][k], ref[1][k], rtol=tol, atol=tol, err_msg=case)
            np.testing.assert_allclose(got[2], ref[2], rtol=tol, atol=tol, err_msg=case)
            worst = max(worst, abs(got[0] - ref[0]), float(np.max(np.abs(got[2] - ref[2]))))
    print(f"max |jax - torch| ({kind}, {dtype_name}, value and grad): {worst:.3g}")


@pytest.mark.parametrize("dtype_name", ["float64", "float32"])
def test_single_losses_match_torch(dtype_name):
    tol = TOL[dtype_name]
    torch_dtype = getattr(torch, dtype_name)
    s, t, y = _data(seed=1)
    ts, tt, ty = (torch.tensor(s, dtype=torch_dtype), torch.tensor(t, dtype=torch_dtype),
                  torch.tensor(y))
    with jax.enable_x64(dtype_name == "float64"):
        js, jt, jy = jnp.asarray(s, dtype_name), jnp.asarray(t, dtype_name), jnp.asarray(y)
        np.testing.assert_allclose(
            float(cross_entropy(js, jy)), torch.nn.CrossEntropyLoss()(ts, ty).item(),
            rtol=tol, atol=tol)
        np.testing.assert_allclose(
            float(logit_mse(js, jt)), torch.nn.MSELoss()(ts, tt).item(), rtol=tol, atol=tol)
        for temperature in TEMPERATURES:
            ref = temperature**2 * torch.nn.KLDivLoss(reduction="batchmean")(
                F.log_softmax(ts / temperature, 1), F.softmax(tt / temperature, 1)).item()
            np.testing.assert_allclose(
                float(hinton_kl(js, jt, temperature)), ref, rtol=tol, atol=tol)


def test_kl_is_stable_for_confident_teachers():
    # Teacher probabilities underflow to 0 in float32; log(p + eps) would bias the value and
    # log(p) alone would give 0 * -inf = NaN.
    s = jnp.array([[0.0, 1.0, -1.0], [3.0, -2.0, 0.5]], jnp.float32)
    t = jnp.array([[200.0, -200.0, 0.0], [-150.0, 150.0, 0.0]], jnp.float32)
    value, grad = jax.value_and_grad(hinton_kl)(s, t, 1.0)
    assert np.isfinite(value) and np.all(np.isfinite(grad))
    # With a one-hot teacher KL_i = -log q_i[argmax t_i].
    logq = jax.nn.log_softmax(s, axis=-1)
    np.testing.assert_allclose(value, -(logq[0, 0] + logq[1, 1]) / 2, rtol=1e-6)


@pytest.mark.parametrize("kind", ["mse", "kd"])
def test_padded_batch_equals_unpadded(kind):
    s, t, y = _data(seed=2, batch=11)
    pad = 5
    rng = np.random.default_rng(3)
    # Padding rows hold arbitrary finite logits and labels: they must not count.
    s_pad = np.concatenate([s, rng.normal(0, 50, (pad, CLASSES))])
    t_pad = np.concatenate([t, rng.normal(0, 50, (pad, CLASSES))])
    y_pad = np.concatenate([y, rng.integers(0, CLASSES, pad)])
    mask = np.concatenate([np.ones(len(y)), np.zeros(pad)]).astype(np.float32)

    def value_and_grad(s_, t_, y_, m):
        f = lambda s__: distillation_loss(s__, t_, y_, 0.3, 2.0, kind, mask=m)  # noqa: E731
        return jax.value_and_grad(f, has_aux=True)(jnp.asarray(s_, jnp.float32))

    (loss, terms), grad = value_and_grad(s, t, y, None)
    (loss_p, terms_p), grad_p = value_and_grad(s_pad, t_pad, y_pad, mask)
    np.testing.assert_allclose(loss_p, loss, rtol=1e-6)
    for k in terms:
        np.testing.assert_allclose(terms_p[k], terms[k], rtol=1e-6)
    np.testing.assert_allclose(grad_p[: len(y)], grad, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(grad_p[len(y):], 0.0)
    # An all-ones mask is the unmasked loss; a boolean mask works as well.
    (loss_ones, _), _ = value_and_grad(s, t, y, np.ones(len(y)))
    (loss_bool, _), _ = value_and_grad(s_pad, t_pad, y_pad, mask.astype(bool))
    np.testing.assert_allclose(loss_ones, loss, rtol=1e-6)
    np.testing.assert_allclose(loss_bool, loss, rtol=1e-6)


def test_all_padding_batch_gives_zero_not_nan():
    s, t, y = _data(seed=4, batch=4)
    loss, terms = distillation_loss(s, t, y, 0.5, 2.0, "kd", mask=np.zeros(4))
    assert float(loss) == 0.0 and all(float(v) == 0.0 for v in terms.values())


@pytest.mark.parametrize("kind", ["mse", "kd"])
def test_alpha_and_temperature_are_traced_compile_once(kind):
    traces = 0

    def f(s, t, y, alpha, temperature):
        nonlocal traces
        traces += 1  # runs only while tracing
        return distillation_loss(s, t, y, alpha, temperature, kind)

    step = jax.jit(jax.value_and_grad(f, has_aux=True))
    s, t, y = (jnp.asarray(a) for a in _data(seed=5))
    s, t = s.astype(jnp.float32), t.astype(jnp.float32)
    losses = []
    for alpha, temperature in itertools.product(ALPHAS, TEMPERATURES):
        (loss, _), _ = step(s, t, y, jnp.float32(alpha), jnp.float32(temperature))
        losses.append(float(loss))
    assert traces == 1, f"distillation_loss retraced {traces} times across a sweep"
    assert len(set(losses)) > 1  # the traced scalars really change the result


def test_invalid_kind_raises():
    s, t, y = _data()
    with pytest.raises(ValueError, match="kind 'hinton'"):
        distillation_loss(s, t, y, 0.5, 1.0, "hinton")
