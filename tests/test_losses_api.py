"""The loss terms as plain functions (``kdjax.losses.kd`` ...): the registry's terms, with its
defaults and checks, light to import, and the README's "In your own training loop" example run
as written."""

from __future__ import annotations

import contextlib
import io
import re
import runpy
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO
from kdjax import losses


def _batch(num_classes=5, batch=6):
    k = jax.random.split(jax.random.key(0), 4)
    return (jax.random.normal(k[0], (batch, num_classes)) * 3, jax.random.normal(k[1], (batch, num_classes)) * 3,
            jnp.arange(batch) % num_classes, jnp.array([1, 1, 1, 1, 0, 0], jnp.float32)[:batch])


def test_every_registered_term_has_a_plain_function():
    assert sorted(losses.PLAIN) == sorted(losses.LOSSES)


@pytest.mark.parametrize("name,hparams", [
    ("ce", {"label_smoothing": 0.1}), ("mse", {}), ("kd", {"temperature": 2.0}),
    ("dkd", {"dkd_alpha": 0.5, "dkd_beta": 4.0, "temperature": 2.0}),
    ("dist", {"dist_beta": 2.0, "dist_gamma": 0.5, "dist_tau": 1.5}),
])
def test_a_logit_function_is_the_engine_term_it_names(name, hparams):
    """The same value as the engine's weighted sum with that term alone at weight 1, masked rows
    left out; a padded row's garbage changes nothing."""
    s, t, labels, mask = _batch()
    all_hparams = {**{k: v.default for k, v in losses.LOSSES[name].hparams.items()}, **hparams,
                   losses.weight_key(name): 1.0, "epoch": 1e9}
    want, _ = losses.total(losses.objective((name,)), losses.Outputs(s), losses.Outputs(t), labels, all_hparams, mask)
    args = (s, labels) if name == "ce" else (s, t, labels) if name == "dkd" else (s, t)
    got = losses.PLAIN[name](*args, mask=mask, **hparams)
    assert float(got) == float(want)
    garbage = s.at[4:].set(1e3)
    assert float(losses.PLAIN[name](*((garbage,) + args[1:]), mask=mask, **hparams)) == pytest.approx(float(got),
                                                                                                      rel=1e-6)
    if hparams:  # the keywords are read: the defaults give another value
        assert float(losses.PLAIN[name](*args, mask=mask)) != float(got)


def test_feature_functions_take_a_map_or_pairs():
    k = jax.random.split(jax.random.key(1), 4)
    s8, t8 = jax.random.normal(k[0], (2, 8, 8, 4)), jax.random.normal(k[1], (2, 8, 8, 4))
    s4, t4 = jax.random.normal(k[2], (2, 4, 4, 4)), jax.random.normal(k[3], (2, 4, 4, 4))
    np.testing.assert_allclose(losses.fitnet(s8, t8), jnp.mean((s8 - t8) ** 2), rtol=1e-6)
    assert float(losses.fitnet([s8, s4], [t8, t4])) == pytest.approx(
        float(losses.fitnet(s8, t8)) + float(losses.fitnet(s4, t4)), rel=1e-6)
    assert float(losses.at([s8, s4], [t4, t4])) == pytest.approx(
        float(losses.attention_transfer([(s8, t4), (s4, t4)])), rel=1e-6)
    assert float(losses.pooled(s8.mean((1, 2)), t8.mean((1, 2)))) == pytest.approx(
        float(jnp.mean((s8.mean((1, 2)) - t8.mean((1, 2))) ** 2)), rel=1e-6)


def test_bad_hyper_parameters_are_named():
    s, t, labels, _ = _batch()
    with pytest.raises(ValueError, match=r"--temperature must be > 0, got 0"):
        losses.kd(s, t, temperature=0.0)
    with pytest.raises(TypeError, match=r"kd\(\) got an unexpected keyword argument 'tau'"):
        losses.kd(s, t, tau=2.0)
    with pytest.raises(ValueError, match=r"--label_smoothing must be >= 0"):
        losses.ce(s, labels, label_smoothing=-0.1)
    # traced hyper-parameters pass unchecked: a sweep under jit or vmap
    temps = jnp.array([1.0, 2.0, 4.0])
    swept = jax.jit(jax.vmap(lambda T: losses.kd(s, t, temperature=T)))(temps)
    np.testing.assert_allclose(swept, [losses.kd(s, t, temperature=float(T)) for T in temps], rtol=1e-6)


def test_importing_the_losses_loads_no_model_data_or_engine_module():
    code = ("import sys, kdjax.losses; "
            "print(sorted(m for m in sys.modules if m.startswith(('kdjax.models', 'kdjax.data', 'kdjax.engine'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]"


def test_the_readme_training_loop_runs_and_learns(tmp_path):
    text = (REPO / "README.md").read_text()
    section = text[text.index("### In your own training loop"):]
    script = tmp_path / "readme_training_loop.py"
    script.write_text(re.search(r"```python\n(.*?)```", section, re.S).group(1))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        runpy.run_path(str(script), run_name="readme_training_loop")
    printed = [float(v) for v in re.findall(r"loss (\d+\.\d+)", out.getvalue())]
    assert len(printed) == 5 and printed[-1] < 0.5 * printed[0]
