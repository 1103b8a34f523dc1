"""kdjax.optim against torch.optim.SGD + torch.optim.lr_scheduler.StepLR stepped per epoch.

The same 2-layer MLP (plain jnp functions / torch.nn.Sequential) starts from the same weights
and sees the same batches. Tolerances: in float64 the two sides differ only by rounding in the
matmuls, so parameters agree to 1e-12 after 9 steps; in float32 (what training runs) per-step
rounding of ~1e-7 relative on O(0.1-1) parameters accumulates over 9 steps to well under 1e-6.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from kdjax.optim import sgd, step_lr

IN, HIDDEN, OUT = 6, 8, 3
EPOCHS, STEPS_PER_EPOCH, BATCH = 3, 3, 4
LR, MOMENTUM = 0.1, 0.9
TOL = {"float64": 1e-12, "float32": 1e-6}


def _init_and_data(seed: int = 0):
    rng = np.random.default_rng(seed)
    params = {
        "w1": rng.normal(0, 0.5, (HIDDEN, IN)), "b1": rng.normal(0, 0.1, HIDDEN),
        "w2": rng.normal(0, 0.5, (OUT, HIDDEN)), "b2": rng.normal(0, 0.1, OUT),
    }  # torch's layout: Linear.weight is [out, in]
    x = rng.normal(0, 1, (EPOCHS, STEPS_PER_EPOCH, BATCH, IN))
    y = rng.integers(0, OUT, (EPOCHS, STEPS_PER_EPOCH, BATCH))
    return params, x, y


def _mlp(params, x):
    h = jax.nn.relu(x @ params["w1"].T + params["b1"])
    return h @ params["w2"].T + params["b2"]


def _loss(params, x, y):
    logp = jax.nn.log_softmax(_mlp(params, x))
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=-1))


def _train_torch(params, x, y, gamma, weight_decay, nesterov, dtype):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(IN, HIDDEN), torch.nn.ReLU(),
                                torch.nn.Linear(HIDDEN, OUT)).to(dtype)
    with torch.no_grad():
        for layer, name in ((model[0], "1"), (model[2], "2")):
            layer.weight.copy_(torch.tensor(params["w" + name]))
            layer.bias.copy_(torch.tensor(params["b" + name]))
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM,
                          weight_decay=weight_decay, nesterov=nesterov)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=gamma)
    history = []
    for epoch in range(EPOCHS):
        for step in range(STEPS_PER_EPOCH):
            opt.zero_grad()
            out = model(torch.tensor(x[epoch, step], dtype=dtype))
            torch.nn.CrossEntropyLoss()(out, torch.tensor(y[epoch, step])).backward()
            opt.step()
        sched.step()  # per epoch, as the reference does
        history.append({
            k + n: getattr(model[i], attr).detach().numpy().copy()
            for i, n in ((0, "1"), (2, "2")) for k, attr in (("w", "weight"), ("b", "bias"))
        })
    return history


def _train_jax(params, x, y, gamma, weight_decay, nesterov, dtype):
    tx = sgd(step_lr(LR, 1, gamma, STEPS_PER_EPOCH), MOMENTUM, weight_decay, nesterov)
    params = jax.tree.map(lambda a: jnp.asarray(a, dtype), params)
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params, opt_state, xb, yb):
        grads = jax.grad(_loss)(params, xb, yb)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    history = []
    for epoch in range(EPOCHS):
        for step in range(STEPS_PER_EPOCH):
            params, opt_state = train_step(params, opt_state, jnp.asarray(x[epoch, step], dtype),
                                           jnp.asarray(y[epoch, step]))
        history.append(jax.tree.map(np.asarray, params))
    return history


@pytest.mark.parametrize("dtype_name", ["float64", "float32"])
@pytest.mark.parametrize(
    "gamma, weight_decay, nesterov",
    [(0.1, 0.0, False), (0.0, 0.0, False), (0.1, 1e-4, False), (0.0, 1e-4, False),
     (0.1, 1e-4, True)],
)
def test_sgd_step_lr_matches_torch_every_epoch(gamma, weight_decay, nesterov, dtype_name):
    tol = TOL[dtype_name]
    params, x, y = _init_and_data()
    ref = _train_torch(params, x, y, gamma, weight_decay, nesterov, getattr(torch, dtype_name))
    with jax.enable_x64(dtype_name == "float64"):
        got = _train_jax(params, x, y, gamma, weight_decay, nesterov, jnp.dtype(dtype_name))
    worst = 0.0
    for epoch, (g, r) in enumerate(zip(got, ref)):
        for k in r:
            assert g[k].dtype == r[k].dtype
            np.testing.assert_allclose(g[k], r[k], rtol=0, atol=tol, err_msg=f"epoch {epoch} {k}")
            worst = max(worst, float(np.max(np.abs(g[k] - r[k]))))
    # The parameters really moved in epoch 0 (the test is not comparing two frozen models) ...
    assert max(np.max(np.abs(got[0][k] - params[k])) for k in params) > 1e-2
    if gamma == 0.0:
        # ... and with gamma 0 they stop exactly after the first epoch, momentum notwithstanding.
        for k in params:
            np.testing.assert_array_equal(got[2][k], got[0][k])
    print(f"max |jax - torch| params (gamma={gamma}, wd={weight_decay}, nesterov={nesterov}, "
          f"{dtype_name}): {worst:.3g}")


def _torch_step_lr_per_step(base_lr, step_size, gamma, steps_per_epoch, epochs):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base_lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=step_size, gamma=gamma)
    lrs = []
    for _ in range(epochs):
        lrs += [opt.param_groups[0]["lr"]] * steps_per_epoch
        opt.step()
        sched.step()
    return lrs


@pytest.mark.parametrize("base_lr, step_size, gamma, steps_per_epoch",
                         [(0.001, 7, 0.1, 8), (0.001, 7, 0.0, 8), (0.1, 1, 0.1, 3),
                          (0.1, 1, 0.0, 3), (0.5, 2, 0.5, 1)])
def test_step_lr_schedule_values(base_lr, step_size, gamma, steps_per_epoch):
    epochs = 25
    ref = _torch_step_lr_per_step(base_lr, step_size, gamma, steps_per_epoch, epochs)
    schedule = jax.jit(step_lr(base_lr, step_size, gamma, steps_per_epoch))
    got = [float(schedule(jnp.int32(i))) for i in range(len(ref))]
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=0)
    if gamma == 0.0:
        boundary = step_size * steps_per_epoch
        assert all(v == np.float32(base_lr) for v in got[:boundary])
        assert all(v == 0.0 for v in got[boundary:]), "gamma 0 must give an lr of exactly 0"


def test_step_lr_seed_command():
    # The seed's published command: lr 0.001, StepLR(7, gamma 0), 244 images / batch 32 = 8 steps.
    schedule = step_lr(0.001, 7, 0.0, 8)
    assert float(schedule(0)) == np.float32(0.001)
    assert float(schedule(7 * 8 - 1)) == np.float32(0.001)
    assert float(schedule(7 * 8)) == 0.0
    assert float(schedule(25 * 8 - 1)) == 0.0


@pytest.mark.parametrize("kwargs, match", [
    (dict(steps_per_epoch=0), "steps_per_epoch"),
    (dict(step_size_epochs=0), "step_size_epochs"),
    (dict(gamma=-0.1), "gamma"),
])
def test_step_lr_rejects_bad_arguments(kwargs, match):
    args = dict(base_lr=0.1, step_size_epochs=1, gamma=0.1, steps_per_epoch=2) | kwargs
    with pytest.raises(ValueError, match=match):
        step_lr(**args)


def test_sgd_rejects_nesterov_without_momentum():
    with pytest.raises(ValueError, match="nesterov"):
        sgd(0.1, momentum=0.0, nesterov=True)
