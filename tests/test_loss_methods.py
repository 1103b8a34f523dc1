"""The distillation methods of kdjax.losses against torchdistill 1.1.5 (KDLoss with and without
label smoothing, DISTLoss, ATLoss, the FitNet hint through its ConvReg regressor) and, for DKD,
a PyTorch rendering of the paper's equations as its authors' code (mdistiller) writes them.

Values and gradients on random inputs. Tolerances: float64 differs from torch only in
summation order and in how a log-probability is formed (kdjax: log-sum-exps; torch: log of a
softmax), ~1e-15 relative, so 1e-10 holds with a wide margin; float32 rounds at ~6e-8 per
operation over a few dozen operations on O(1) values, so 1e-6 relative (and absolute, for the
gradients' near-zero entries) is the bound, as for the seed's two losses (tests/test_losses.py).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchdistill.losses.mid_level import ATLoss, DISTLoss, KDLoss
from torchdistill.models.adaptation import ConvReg

from kdjax import losses
from kdjax.losses import adapters as losses_adapters

TOL = {"float64": 1e-10, "float32": 1e-6}
DTYPES = {"float64": (jnp.float64, torch.float64), "float32": (jnp.float32, torch.float32)}
BATCH, CLASSES = 12, 7


def _logits(seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.normal(0, 2, (BATCH, CLASSES)), rng.normal(0, 3, (BATCH, CLASSES)), rng.integers(0, CLASSES, BATCH)


def _total(terms, weights, hparams, student, teacher, labels, mask=None, pairs=()):
    obj = losses.Objective(terms, pairs)
    hp = {**{losses.weight_key(t): w for t, w in zip(terms, weights)}, "label_smoothing": 0.0, **hparams}
    return losses.total(obj, student, teacher, labels, hp, mask)[0]


def _close(got, ref, dtype_name, what):
    tol = TOL[dtype_name]
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    worst = np.max(np.abs(got - ref) / np.maximum(np.abs(ref), 1.0))
    test = os.environ.get("PYTEST_CURRENT_TEST", "").split("::")[-1].split(" ")[0]
    print(f"{test} {what}: max |kdjax - torch| / max(|torch|, 1) = {worst:.2g}")
    np.testing.assert_allclose(got, ref, rtol=tol, atol=tol, err_msg=what)


def _logit_case(dtype_name, jax_loss, torch_loss, seed=0):
    """Value and student-logit gradient of ``jax_loss(s, t, y)`` against ``torch_loss(s, t, y)``."""
    jdt, tdt = DTYPES[dtype_name]
    s, t, y = _logits(seed)
    with jax.enable_x64(dtype_name == "float64"):
        value, grad = jax.value_and_grad(jax_loss)(jnp.asarray(s, jdt), jnp.asarray(t, jdt), jnp.asarray(y))
        value, grad = float(value), np.asarray(grad)
    ts = torch.tensor(s, dtype=tdt, requires_grad=True)
    ref = torch_loss(ts, torch.tensor(t, dtype=tdt), torch.tensor(y))
    ref.backward()
    _close(value, ref.item(), dtype_name, "value")
    _close(grad, ts.grad.numpy(), dtype_name, "gradient")


def _io(x):
    return {".": {"output": x}}


@pytest.mark.parametrize("dtype_name", ["float64", "float32"])
@pytest.mark.parametrize("alpha, temperature, smoothing", [(0.5, 4.0, 0.0), (0.3, 2.0, 0.1), (0.0, 1.0, 0.0)])
def test_kd_matches_torchdistill_kdloss(dtype_name, alpha, temperature, smoothing):
    """``ce:alpha kd:(1-alpha)`` with --label_smoothing is torchdistill's KDLoss, whose keyword
    arguments go to its CrossEntropyLoss."""
    reference = KDLoss(".", "output", ".", "output", temperature=temperature, alpha=alpha,
                       label_smoothing=smoothing)

    def torch_loss(s, t, y):
        out = reference(_io(s), _io(t), y)
        return out if alpha else (temperature ** 2) * out  # alpha 0: KDLoss returns the KL without T^2

    def jax_loss(s, t, y):
        return _total(("ce", "kd"), (alpha, 1 - alpha), {"temperature": temperature, "label_smoothing": smoothing},
                      losses.Outputs(s), losses.Outputs(t), y)

    _logit_case(dtype_name, jax_loss, torch_loss)


@pytest.mark.parametrize("dtype_name", ["float64", "float32"])
@pytest.mark.parametrize("beta, gamma, tau", [(1.0, 1.0, 1.0), (2.0, 0.5, 4.0)])
def test_dist_matches_torchdistill_distloss(dtype_name, beta, gamma, tau):
    reference = DISTLoss(".", "output", ".", "output", beta=beta, gamma=gamma, tau=tau)

    def jax_loss(s, t, y):
        return losses.dist_loss(s, t, beta, gamma, tau)

    _logit_case(dtype_name, jax_loss, lambda s, t, y: reference(_io(s), _io(t)))


def _torch_dkd(s, t, y, alpha, beta, temperature):
    """Decoupled KD as mdistiller's ``dkd_loss`` writes the paper's equations (1)-(3)."""
    gt = F.one_hot(y, s.shape[1]).bool()
    p_s, p_t = F.softmax(s / temperature, 1), F.softmax(t / temperature, 1)

    def binary(p):
        return torch.cat([(p * gt).sum(1, keepdim=True), (p * ~gt).sum(1, keepdim=True)], 1)

    tckd = F.kl_div(torch.log(binary(p_s)), binary(p_t), reduction="sum") * temperature**2 / s.shape[0]
    p_t2 = F.softmax(t / temperature - 1000.0 * gt, 1)
    log_p_s2 = F.log_softmax(s / temperature - 1000.0 * gt, 1)
    nckd = F.kl_div(log_p_s2, p_t2, reduction="sum") * temperature**2 / s.shape[0]
    return alpha * tckd + beta * nckd


@pytest.mark.parametrize("dtype_name", ["float64", "float32"])
@pytest.mark.parametrize("alpha, beta, temperature", [(1.0, 8.0, 4.0), (0.5, 0.5, 1.0)])
def test_dkd_matches_the_papers_equations(dtype_name, alpha, beta, temperature):
    def jax_loss(s, t, y):
        return losses.decoupled_kd(s, t, y, alpha, beta, temperature)

    _logit_case(dtype_name, jax_loss, lambda s, t, y: _torch_dkd(s, t, y, alpha, beta, temperature))


@pytest.mark.parametrize("dtype_name", ["float64", "float32"])
def test_the_plain_functions_meet_the_same_references(dtype_name):
    """``kdjax.losses.ce/kd/dist/dkd`` on arrays, as a user's own loop calls them, against the
    references above (values and student-logit gradients, the same tolerances): KDLoss, DISTLoss
    and DKD's equations."""
    kd_ref = KDLoss(".", "output", ".", "output", temperature=2.0, alpha=0.3, label_smoothing=0.1)
    _logit_case(dtype_name, lambda s, t, y: 0.3 * losses.ce(s, y, label_smoothing=0.1)
                + 0.7 * losses.kd(s, t, temperature=2.0), lambda s, t, y: kd_ref(_io(s), _io(t), y))
    dist_ref = DISTLoss(".", "output", ".", "output", beta=2.0, gamma=0.5, tau=4.0)
    _logit_case(dtype_name, lambda s, t, y: losses.dist(s, t, dist_beta=2.0, dist_gamma=0.5, dist_tau=4.0),
                lambda s, t, y: dist_ref(_io(s), _io(t)))
    _logit_case(dtype_name, lambda s, t, y: losses.dkd(s, t, y, dkd_alpha=1.0, dkd_beta=8.0, temperature=4.0),
                lambda s, t, y: _torch_dkd(s, t, y, 1.0, 8.0, 4.0))


def test_dkd_weight_warms_up_over_epochs():
    """mdistiller's ``min(epoch / warmup, 1)`` on DKD's weight, epochs counted from 1."""
    s, t, y = (jnp.asarray(a) for a in _logits(1))
    hp = {"dkd_alpha": 1.0, "dkd_beta": 8.0, "temperature": 4.0, "warmup": 4.0}
    full = float(losses.decoupled_kd(s, t, y, 1.0, 8.0, 4.0))
    for epoch, factor in [(1, 0.25), (2, 0.5), (4, 1.0), (9, 1.0)]:
        value, terms = losses.total(losses.Objective(("dkd",)), losses.Outputs(s), losses.Outputs(t), y,
                                    {"weight_dkd": 2.0, "epoch": float(epoch), **hp})
        assert float(value) == pytest.approx(2.0 * factor * full, rel=1e-6)
        assert float(terms["dkd"]) == pytest.approx(full, rel=1e-6)  # logged unweighted


def _maps(seed, shapes):
    rng = np.random.default_rng(seed)
    return [rng.normal(0, 1, s) for s in shapes]


@pytest.mark.parametrize("dtype_name", ["float64", "float32"])
def test_attention_transfer_matches_torchdistill_atloss(dtype_name):
    """Two pairs, the second pooled 2x (a teacher map twice the student's size, as a 224 px
    ResNet-50 teacher gives a 112 px student; torchdistill's ATLoss gets the pooled map)."""
    jdt, tdt = DTYPES[dtype_name]
    s1, t1, s2, t2 = _maps(3, [(4, 8, 8, 16), (4, 8, 8, 32), (4, 4, 4, 24), (4, 8, 8, 48)])
    pooled_t2 = t2.reshape(4, 4, 2, 4, 2, 48).mean(axis=(2, 4))
    reference = ATLoss({"p1": {"student": {"io": "output", "path": "s1"}, "teacher": {"io": "output", "path": "t1"}},
                        "p2": {"student": {"io": "output", "path": "s2"}, "teacher": {"io": "output", "path": "t2"}}},
                       mode="code")
    nchw = [torch.tensor(a.transpose(0, 3, 1, 2), dtype=tdt, requires_grad=True) for a in (s1, s2)]
    ref = reference({"s1": {"output": nchw[0]}, "s2": {"output": nchw[1]}},
                    {"t1": {"output": torch.tensor(t1.transpose(0, 3, 1, 2), dtype=tdt)},
                     "t2": {"output": torch.tensor(pooled_t2.transpose(0, 3, 1, 2), dtype=tdt)}})
    ref.backward()
    with jax.enable_x64(dtype_name == "float64"):
        def f(a, b):
            return losses.attention_transfer([(a, jnp.asarray(t1, jdt)), (b, jnp.asarray(t2, jdt))])

        value, grads = jax.value_and_grad(f, argnums=(0, 1))(jnp.asarray(s1, jdt), jnp.asarray(s2, jdt))
        value, grads = float(value), [np.asarray(g) for g in grads]
    _close(value, ref.item(), dtype_name, "value")
    for g, t in zip(grads, nchw):
        # the attention maps' gradients are ~1e-3 here: an absolute bound 1e-3 tighter than the values'
        np.testing.assert_allclose(g, t.grad.numpy().transpose(0, 2, 3, 1), rtol=TOL[dtype_name],
                                   atol=TOL[dtype_name] * 1e-3)


@pytest.mark.parametrize("dtype_name", ["float64", "float32"])
def test_fitnet_hint_matches_torchdistill_convreg_and_mse(dtype_name):
    """The hint through the regressor in train mode (BatchNorm on batch statistics): the loss, its
    gradients into the student's map and into the regressor, and the updated running statistics,
    against torchdistill's ConvReg (without its ReLU) and MSELoss."""
    jdt, tdt = DTYPES[dtype_name]
    s, t = _maps(5, [(6, 4, 4, 16), (6, 4, 4, 32)])
    reg = losses_adapters.Regressor(32)
    with jax.enable_x64(dtype_name == "float64"):
        variables = jax.tree.map(lambda a: jnp.asarray(a, jdt),
                                 reg.init(jax.random.key(0), jnp.zeros((1, 4, 4, 16), jdt), train=False))
        conv = ConvReg(16, 32, 1, 1, 0, uses_relu=False).to(tdt)
        with torch.no_grad():  # the flax parameters into the torch module
            kernel = np.asarray(variables["params"]["conv"]["kernel"])
            conv.conv.weight.copy_(torch.tensor(kernel.transpose(3, 2, 0, 1)))
            conv.conv.bias.copy_(torch.tensor(np.asarray(variables["params"]["conv"]["bias"])))

        def f(params, x):
            y, updates = reg.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
            return losses.hint_mse(y, jnp.asarray(t, jdt)), updates["batch_stats"]

        (value, stats), (g_params, g_x) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(
            variables["params"], jnp.asarray(s, jdt))
        value = float(value)
    conv.train()
    ts = torch.tensor(s.transpose(0, 3, 1, 2), dtype=tdt, requires_grad=True)
    ref = torch.nn.MSELoss()(conv(ts), torch.tensor(t.transpose(0, 3, 1, 2), dtype=tdt))
    ref.backward()
    # kdjax's BatchNorm reduces its statistics in float32 whatever the compute dtype
    # (kdjax.models.kernels.batch_norm_train), so float64 holds to float32's bound here
    tol = "float32"
    _close(value, ref.item(), tol, "value")
    _close(g_x, ts.grad.numpy().transpose(0, 2, 3, 1), tol, "input gradient")
    _close(g_params["conv"]["kernel"][0, 0], conv.conv.weight.grad.numpy()[:, :, 0, 0].T, tol, "kernel gradient")
    _close(g_params["bn"]["scale"], conv.bn.weight.grad.numpy(), tol, "BatchNorm scale gradient")
    _close(stats["bn"]["mean"], conv.bn.running_mean.numpy(), tol, "running mean")
    _close(stats["bn"]["var"], conv.bn.running_var.numpy(), tol, "running variance")


def test_pooled_matching_is_mse_through_a_linear_projector():
    s, t = _maps(7, [(5, 16), (5, 24)])
    proj = losses_adapters.Projector(24)
    variables = proj.init(jax.random.key(0), jnp.zeros((1, 16)), train=False)

    def f(x):
        return losses.pooled_mse(proj.apply(variables, x, train=True), jnp.asarray(t, jnp.float32))

    value, grad = jax.value_and_grad(f)(jnp.asarray(s, jnp.float32))
    linear = torch.nn.Linear(16, 24)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor(np.asarray(variables["params"]["linear"]["kernel"]).T))
        linear.bias.copy_(torch.tensor(np.asarray(variables["params"]["linear"]["bias"])))
    ts = torch.tensor(s, dtype=torch.float32, requires_grad=True)
    ref = torch.nn.MSELoss()(linear(ts), torch.tensor(t, dtype=torch.float32))
    ref.backward()
    _close(float(value), ref.item(), "float32", "value")
    _close(grad, ts.grad.numpy(), "float32", "gradient")


@pytest.mark.parametrize("term", ["kd", "dkd", "dist", "mse"])
def test_padded_rows_change_no_logit_term(term):
    """A batch padded to a fixed shape gives the unpadded batch's value and gradient (DIST's
    intra-class correlation runs over the batch: padded rows must stay out of it)."""
    s, t, y = (jnp.asarray(a, jnp.float32) for a in _logits(2))
    y = y.astype(jnp.int32)
    hp = {"temperature": 2.0, "dkd_alpha": 1.0, "dkd_beta": 2.0, "dist_beta": 1.0, "dist_gamma": 2.0,
          "dist_tau": 1.5, "warmup": 1.0, "epoch": 1.0, "label_smoothing": 0.0, "weight_" + term: 1.0}
    spec = losses.LOSSES[term]

    def f(s_, t_, y_, m):
        return spec.term(losses.Outputs(s_), losses.Outputs(t_), y_, m, hp)

    mask = jnp.asarray([1.0] * 8 + [0.0] * 4)
    padded = jax.value_and_grad(f)(s.at[8:].set(99.0), t.at[8:].set(-50.0), y, mask)
    plain = jax.value_and_grad(f)(s[:8], t[:8], y[:8], None)
    np.testing.assert_allclose(float(padded[0]), float(plain[0]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(padded[1][:8]), np.asarray(plain[1]), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(padded[1][8:]), 0.0)


def test_one_example_batches_stay_finite():
    """DIST's intra-class correlation of a one-example batch has zero-norm columns: the clamp
    keeps value and gradient finite, as torch's does."""
    s, t, _ = (jnp.asarray(a, jnp.float32) for a in _logits(3))
    value, grad = jax.value_and_grad(lambda x: losses.dist_loss(x, t[:1], 1.0, 1.0, 1.0))(s[:1])
    assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(grad)))


@pytest.mark.parametrize("term", ["dkd", "dist"])
def test_a_sweep_over_a_hyper_parameter_compiles_once(term):
    """DKD's beta and DIST's tau (like every hyper-parameter and weight) are traced: a vmapped
    sweep over them is one compilation, and each value's loss equals its own evaluation."""
    s, t, y = (jnp.asarray(a, jnp.float32) for a in _logits(4))
    y = y.astype(jnp.int32)
    name = {"dkd": "dkd_beta", "dist": "dist_tau"}[term]
    base = {"temperature": 4.0, "dkd_alpha": 1.0, "dkd_beta": 8.0, "dist_beta": 1.0, "dist_gamma": 1.0,
            "dist_tau": 1.0, "warmup": 1.0, "epoch": 1.0, "weight_" + term: 1.0}
    traces = []

    def f(value):
        traces.append(1)
        return losses.total(losses.Objective((term,)), losses.Outputs(s), losses.Outputs(t), y,
                            {**base, name: value})[0]

    sweep = jax.jit(jax.vmap(f))
    values = jnp.asarray([0.5, 1.0, 2.0, 4.0], jnp.float32)
    out = sweep(values)
    sweep(values * 2)
    assert len(traces) == 1
    for v, o in zip(values, out):
        np.testing.assert_allclose(float(o), float(jax.jit(f)(v)), rtol=1e-6)
