"""kdjax.optim's optimisers and schedules against their PyTorch references.

Optimisers: 20 steps on a small MLP (one weight matrix per layer, biases, a 1-D "norm" scale)
from the same weights on the same batches, against torch.optim.SGD (nesterov), torch.optim.AdamW
and timm's Lamb and Lars, with and without ``no_decay_norm_bias`` (timm's two parameter groups).
Tolerance 1e-6 relative to each tensor's scale (its largest entry) in float32: each step rounds at
~1e-7 of the magnitudes it mixes (a gradient entry sums products over the batch and the other
layer's entries), and the two sides order a few operations differently; over 20 steps that stays
below 1e-6 of the tensor's scale. An entry much smaller than its tensor's largest (0.03 beside
0.8) carries the same absolute rounding, hence the scale rather than the entry itself.

Schedules: every step's lr over a whole run against torch.optim.lr_scheduler (StepLR,
MultiStepLR, CosineAnnealingLR, LinearLR then cosine through SequentialLR), stepped per epoch
and per step, and timm's CosineLRScheduler with warm-up, within 1e-7 (float32 rounding of lrs
of at most 0.1 is below 1e-8).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from kdjax import optim
from kdjax.config import OptimConfig

IN, HIDDEN, OUT, BATCH, STEPS = 6, 8, 3, 5, 20


def _data(seed=0):
    rng = np.random.default_rng(seed)
    params = {"w1": rng.normal(0, 0.5, (HIDDEN, IN)), "b1": rng.normal(0, 0.1, HIDDEN),
              "scale": 1 + rng.normal(0, 0.1, HIDDEN),
              "w2": rng.normal(0, 0.5, (OUT, HIDDEN)), "b2": rng.normal(0, 0.1, OUT)}
    x = rng.normal(0, 1, (STEPS, BATCH, IN))
    y = rng.integers(0, OUT, (STEPS, BATCH))
    return {k: v.astype(np.float32) for k, v in params.items()}, x.astype(np.float32), y


def _loss(p, x, y):
    h = jax.nn.relu(x @ p["w1"].T + p["b1"]) * p["scale"]
    logp = jax.nn.log_softmax(h @ p["w2"].T + p["b2"])
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=-1))


def _jax(config: OptimConfig, params, x, y):
    tx = optim.build(config, steps_per_epoch=STEPS).tx
    p = {k: jnp.asarray(v) for k, v in params.items()}
    state = tx.init(p)
    for i in range(STEPS):
        g = jax.grad(_loss)(p, jnp.asarray(x[i]), jnp.asarray(y[i]))
        updates, state = tx.update(g, state, p)
        p = optax.apply_updates(p, updates)
    return {k: np.asarray(v) for k, v in p.items()}


def _torch(make, no_decay, params, x, y, weight_decay):
    tp = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in params.items()}
    if no_decay:
        groups = [{"params": [v for v in tp.values() if v.ndim > 1], "weight_decay": weight_decay},
                  {"params": [v for v in tp.values() if v.ndim <= 1], "weight_decay": 0.0}]
    else:
        groups = [{"params": list(tp.values()), "weight_decay": weight_decay}]
    opt = make(groups)
    for i in range(STEPS):
        xi, yi = torch.tensor(x[i]), torch.tensor(y[i])
        h = torch.relu(xi @ tp["w1"].T + tp["b1"]) * tp["scale"]
        loss = torch.nn.functional.cross_entropy(h @ tp["w2"].T + tp["b2"], yi)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach().numpy() for k, v in tp.items()}


def _timm(name):
    timm_optim = pytest.importorskip("timm.optim")
    return getattr(timm_optim, name)


CASES = {
    "sgd_nesterov": (dict(optimizer="sgd", lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3),
                     lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.9, nesterov=True)),
    "adamw": (dict(optimizer="adamw", lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05),
              lambda g: torch.optim.AdamW(g, lr=0.01, betas=(0.9, 0.99), eps=1e-8)),
    "lamb": (dict(optimizer="lamb", lr=0.01, betas=(0.9, 0.999), weight_decay=0.02),
             lambda g: _timm("Lamb")(g, lr=0.01, betas=(0.9, 0.999), eps=1e-6)),
    "lars": (dict(optimizer="lars", lr=0.5, momentum=0.9, weight_decay=1e-4),
             lambda g: _timm("Lars")(g, lr=0.5, momentum=0.9)),
}


@pytest.mark.parametrize("no_decay", [False, True], ids=["decay_all", "no_decay_norm_bias"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_optimizer_matches_its_pytorch_reference_over_20_steps(case, no_decay):
    kwargs, make = CASES[case]
    params, x, y = _data()
    config = OptimConfig(**kwargs, no_decay_norm_bias=no_decay, step_size=STEPS)
    got = _jax(config, params, x, y)
    want = _torch(make, no_decay, params, x, y, kwargs["weight_decay"])
    for k in params:
        assert not np.allclose(got[k], params[k]), k  # the parameter moved
        np.testing.assert_allclose(got[k], want[k], rtol=0, atol=1e-6 * np.abs(want[k]).max(),
                                   err_msg=f"{case} {k}")


def test_gradient_clipping_matches_torch_clip_grad_norm():
    params, x, y = _data(1)
    config = OptimConfig(optimizer="sgd", lr=0.5, momentum=0.9, clip_grad_norm=0.1, step_size=STEPS)
    got = _jax(config, params, x, y)
    tp = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in params.items()}
    opt = torch.optim.SGD(list(tp.values()), lr=0.5, momentum=0.9)
    for i in range(STEPS):
        h = torch.relu(torch.tensor(x[i]) @ tp["w1"].T + tp["b1"]) * tp["scale"]
        loss = torch.nn.functional.cross_entropy(h @ tp["w2"].T + tp["b2"], torch.tensor(y[i]))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(tp.values()), 0.1)
        opt.step()
    for k in params:
        want = tp[k].detach().numpy()
        np.testing.assert_allclose(got[k], want, rtol=0, atol=1e-6 * np.abs(want).max(), err_msg=k)


# --------------------------------------------------------------------------- schedules

EPOCHS, SPE, BASE = 12, 5, 0.1


def _ours(config: OptimConfig) -> np.ndarray:
    schedule = optim.build(config, SPE, EPOCHS).schedule
    return np.asarray([float(schedule(s)) for s in range(EPOCHS * SPE)])


def _torch_lrs(make, per_step: bool) -> np.ndarray:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=BASE)
    sched = make(opt)
    lrs = []
    for _ in range(EPOCHS):
        for _ in range(SPE):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            if per_step:
                sched.step()
        if not per_step:
            sched.step()
    return np.asarray(lrs)


def _warm_cosine(opt, warmup, total, eta_min):
    lin = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.01 / BASE, end_factor=1.0, total_iters=warmup)
    cos = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total - warmup, eta_min=eta_min)
    return torch.optim.lr_scheduler.SequentialLR(opt, [lin, cos], milestones=[warmup])


lr_sched = torch.optim.lr_scheduler
SCHEDULE_CASES = {
    "step": (dict(schedule="step", step_size=3, gamma=0.5), lambda o, n: lr_sched.StepLR(o, 3 * n, 0.5)),
    "multistep": (dict(schedule="multistep", milestones=(4, 7, 10), gamma=0.1),
                  lambda o, n: lr_sched.MultiStepLR(o, [4 * n, 7 * n, 10 * n], 0.1)),
    "cosine": (dict(schedule="cosine", min_lr=0.001),
               lambda o, n: lr_sched.CosineAnnealingLR(o, T_max=EPOCHS * n, eta_min=0.001)),
    "warmup_cosine": (dict(schedule="cosine", min_lr=0.001, warmup_epochs=3, warmup_lr=0.01),
                      lambda o, n: _warm_cosine(o, 3 * n, EPOCHS * n, 0.001)),
}


@pytest.mark.parametrize("per", ["epoch", "step"])
@pytest.mark.parametrize("case", sorted(SCHEDULE_CASES))
def test_schedule_matches_torch_lr_scheduler_at_every_step(case, per):
    kwargs, make = SCHEDULE_CASES[case]
    config = OptimConfig(lr=BASE, schedule_per=per, **kwargs)
    n = SPE if per == "step" else 1
    want = _torch_lrs(lambda o: make(o, n), per_step=per == "step")
    np.testing.assert_allclose(_ours(config), want, rtol=0, atol=1e-7)


@pytest.mark.parametrize("prefix", [True, False])
@pytest.mark.parametrize("per", ["epoch", "step"])
def test_warmup_cosine_matches_timm_cosine_lr_scheduler(per, prefix):
    timm_scheduler = pytest.importorskip("timm.scheduler")
    warmup = 3
    config = OptimConfig(lr=BASE, schedule="cosine", min_lr=0.001, warmup_epochs=warmup, warmup_lr=0.01,
                         warmup_prefix=prefix, schedule_per=per)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=BASE)
    n = SPE if per == "step" else 1
    t_initial = (EPOCHS - warmup if prefix else EPOCHS) * n
    sched = timm_scheduler.CosineLRScheduler(opt, t_initial=t_initial, lr_min=0.001, warmup_t=warmup * n,
                                             warmup_lr_init=0.01, warmup_prefix=prefix, t_in_epochs=per == "epoch")
    want = []
    for epoch in range(EPOCHS):
        for step in range(SPE):
            want.append(opt.param_groups[0]["lr"])
            if per == "step":
                sched.step_update(epoch * SPE + step + 1)
        sched.step(epoch + 1)
    np.testing.assert_allclose(_ours(config), np.asarray(want), rtol=0, atol=1e-7)


def test_the_lr_and_weight_decay_are_traced_in_one_compilation():
    config = OptimConfig(optimizer="adamw", lr=0.01, weight_decay=0.05, schedule="cosine")
    traces = []

    @jax.jit
    def step(hparams, params, state, grads):
        traces.append(1)
        tx = optim.build(config, SPE, EPOCHS, hparams).tx
        return tx.update(grads, state, params)

    params = {"w": jnp.ones((2, 2))}
    state = optim.build(config, SPE, EPOCHS).tx.init(params)
    outs = [step(optim.traced_hparams(dataclasses.replace(config, lr=lr, weight_decay=wd)), params, state, params)[0]
            for lr, wd in ((0.01, 0.05), (0.02, 0.1), (0.5, 0.0))]
    assert len(traces) == 1
    assert not np.allclose(outs[0]["w"], outs[1]["w"])


@pytest.mark.parametrize("kwargs, match", [
    (dict(schedule="multistep"), "--schedule multistep needs --milestones"),
    (dict(milestones=(3,)), "--milestones .* are for --schedule multistep"),
    (dict(schedule="multistep", milestones=(5, 3)), "increasing"),
    (dict(optimizer="adamw", nesterov=True, momentum=0.9), "--nesterov is a momentum option"),
    (dict(optimizer="sgd", eps=1e-6), "--eps is not an option of --optimizer sgd"),
    (dict(betas=(0.9,)), "--betas takes two values"),
    (dict(clip_grad_norm=0.0), "--clip_grad_norm must be > 0"),
    (dict(accum_steps=0), "--accum_steps must be >= 1"),
    (dict(schedule_per="batch"), "--schedule_per must be step or epoch"),
    (dict(optimizer="rmsprop"), "--optimizer 'rmsprop': choose one of sgd, adamw, lamb, lars"),
])
def test_bad_optimiser_settings_name_the_flag(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OptimConfig(**kwargs)


def test_schedules_that_outrun_the_run_are_refused():
    from kdjax.config import TrainConfig

    with pytest.raises(ValueError, match="--milestones \\[30\\]: epoch 30 is past the last epoch"):
        TrainConfig(optim=OptimConfig(schedule="multistep", milestones=(30,)), num_epochs=25)
    with pytest.raises(ValueError, match="--warmup_epochs 25 is not shorter than the run"):
        TrainConfig(optim=OptimConfig(schedule="cosine", warmup_epochs=25), num_epochs=25)
