"""The one data-parallel layout of kdjax: a ``('data',)`` mesh over every device.

Batches are split along their leading axis (``P('data')``); model state and the device-resident
dataset are replicated (``P()``). Under ``jit`` with these shardings XLA computes global batch
statistics itself, so no step function needs an ``axis_name`` or a ``pmean``.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh named ``'data'`` over ``devices`` (default: all of them).

    The axis type is ``Auto`` on purpose: ``jax.make_mesh`` now defaults to ``Explicit``
    (sharding in types), which would demand explicit reshards inside otherwise plain step code.
    """
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.array(devices), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the ``'data'`` axis; all other axes whole."""
    return NamedSharding(mesh, P(DATA_AXIS))


def steps_batch_sharding(mesh: Mesh) -> NamedSharding:
    """``[steps, batch, ...]`` arrays (a whole epoch of batches, scanned over steps): each
    step's batch split over ``'data'`` as ``batch_sharding`` splits a single one."""
    return NamedSharding(mesh, P(None, DATA_AXIS))


def batch_sharding_at(mesh: Mesh, batch_axis: int) -> NamedSharding:
    """Arrays whose axis ``batch_axis`` is the batch (stacked per run or per step in front of
    it): that axis split over ``'data'`` as ``batch_sharding`` splits a single batch."""
    return NamedSharding(mesh, P(*([None] * batch_axis), DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device (model state, teacher variables, the cached dataset)."""
    return NamedSharding(mesh, P())


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
    """Fail fast when a global batch cannot be split evenly over the devices."""
    n = mesh.devices.size
    if batch_size <= 0 or batch_size % n:
        raise ValueError(
            f"--batch_size {batch_size} must be a positive multiple of the device count {n} "
            f"(the batch is split evenly over the 'data' mesh axis); use e.g. "
            f"--batch_size {max(n, (batch_size // n) * n or n)}."
        )
