"""kdjax.xla_cpu: the flags are added unless the user set them, and take effect in a new process."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

from kdjax import xla_cpu

FLAG = "xla_cpu_experimental_ynn_fusion_type"


def test_merged_appends_missing_flags_and_keeps_the_users():
    value, added = xla_cpu.merged("--xla_force_host_platform_device_count=4")
    assert added == [f"--{FLAG}="]
    assert value == f"--xla_force_host_platform_device_count=4 --{FLAG}="
    mine = f"--{FLAG}=individual_dot"
    assert xla_cpu.merged(mine) == (mine, [])
    assert xla_cpu.merged("")[0] == f"--{FLAG}="


def test_apply_after_the_backend_started_changes_nothing_and_says_so(caplog):
    import jax

    jax.devices()  # this test process runs JAX already
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    with caplog.at_level(logging.WARNING, logger="kdjax.xla_cpu"):
        assert xla_cpu.apply(env) == []
    assert env == {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    assert "already running" in caplog.text


_PROBE = """
import os, sys
from kdjax import xla_cpu
added = xla_cpu.apply() if sys.argv[1] == "apply" else None
import jax, jax.numpy as jnp
x, w = jnp.ones((32, 7, 7, 1024)), jnp.ones((1, 1, 1024, 256))
conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
hlo = jax.jit(conv).lower(x, w).compile().as_text()
print(added, "ynn_fusion" in hlo, os.environ["XLA_FLAGS"])
"""


def _probe(xla_flags: str, apply: bool) -> str:
    env = {**os.environ, "XLA_FLAGS": xla_flags, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-c", _PROBE, "apply" if apply else "no"], env=env,
                          capture_output=True, text=True, check=True, timeout=300).stdout.strip()


def test_flags_take_effect_in_a_fresh_process_and_the_user_setting_wins():
    # XLA's default hands convolutions to YNNPACK (an ynn_fusion); with kdjax's flags they
    # are XLA's own kernels. A user's own setting of the flag is left as it is.
    assert _probe("", apply=False) == "None True"
    assert _probe("", apply=True) == f"['--{FLAG}='] False --{FLAG}="
    mine = f"--{FLAG}=individual_convolution"
    assert _probe(mine, apply=True) == f"[] True {mine}"
