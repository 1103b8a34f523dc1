"""The ('data',) mesh and the batch-size check (4 simulated CPU devices, see conftest)."""

from __future__ import annotations

import jax
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from kdjax import sharding


def test_mesh_spans_all_devices_with_auto_axis():
    mesh = sharding.data_mesh()
    assert mesh.axis_names == ("data",)
    assert mesh.devices.size == len(jax.devices()) == 4
    assert mesh.axis_types == (AxisType.Auto,)
    assert sharding.batch_sharding(mesh).spec == P("data")
    assert sharding.replicated(mesh).spec == P()
    assert sharding.steps_batch_sharding(mesh).spec == P(None, "data")


def test_mesh_over_a_subset_of_devices():
    assert sharding.data_mesh(jax.devices()[:1]).devices.size == 1


@pytest.mark.parametrize("batch_size", [4, 32, 64])
def test_divisible_batch_sizes_pass(batch_size):
    sharding.check_batch_size(batch_size, sharding.data_mesh())


@pytest.mark.parametrize("batch_size", [30, 2, 0])
def test_indivisible_batch_size_names_flag_and_device_count(batch_size):
    with pytest.raises(ValueError, match=rf"--batch_size {batch_size} .*device count 4"):
        sharding.check_batch_size(batch_size, sharding.data_mesh())
