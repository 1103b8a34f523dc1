"""XLA:CPU settings that kdjax's entry points apply before JAX starts its backend.

jax 0.10's XLA:CPU hands convolutions and dots to YNNPACK by default (the default list of
``--xla_cpu_experimental_ynn_fusion_type``). On this project's 2-core AVX-512 CPU that path is
the slower one for the convolutional networks kdjax trains, so ``FLAGS`` empties the list and
XLA's own kernels run them. The measurements, against PyTorch in the same process:
``benchmarks/README.md``, "On this CPU".

XLA reads ``XLA_FLAGS`` once, when JAX creates its first backend; setting flags later has no
effect. Hence a plain environment edit, done first thing by the entry points (and by the tests,
so that they check what users run). Library users who want the same call :func:`apply` before
their first JAX computation, or set ``XLA_FLAGS`` themselves.
"""

from __future__ import annotations

import logging
import os
from typing import Mapping, MutableMapping

log = logging.getLogger(__name__)

# flag name -> value. An empty value empties a list-valued flag.
FLAGS: Mapping[str, str] = {"xla_cpu_experimental_ynn_fusion_type": ""}


def merged(xla_flags: str, flags: Mapping[str, str] = FLAGS) -> tuple[str, list[str]]:
    """``xla_flags`` with each of ``flags`` appended unless it already names that flag (the
    user's setting wins), and the flags added."""
    present = {item.lstrip("-").split("=", 1)[0] for item in xla_flags.split()}
    added = [f"--{name}={value}" for name, value in flags.items() if name not in present]
    return " ".join([xla_flags.strip(), *added]).strip(), added


def backend_started() -> bool:
    from jax._src import xla_bridge

    return xla_bridge.backends_are_initialized()


def apply(environ: MutableMapping[str, str] | None = None) -> list[str]:
    """Add kdjax's XLA:CPU flags to ``XLA_FLAGS`` (those the user has not set); returns the
    flags added. Harmless on GPU and TPU (XLA:CPU flags only). If JAX's backend already runs,
    the flags could no longer take effect: nothing is changed and a warning says so."""
    environ = os.environ if environ is None else environ
    value, added = merged(environ.get("XLA_FLAGS", ""), FLAGS)
    if not added:
        return []
    if backend_started():
        log.warning("XLA:CPU flags %s not applied: JAX's backend is already running; set "
                    "XLA_FLAGS before the first JAX computation for them to count", " ".join(added))
        return []
    environ["XLA_FLAGS"] = value
    return added
