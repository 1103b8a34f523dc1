"""kdjax.models.shapes: the abstract variables read back from the disk cache are the traced ones."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from kdjax import models
from kdjax.models import shapes


def _trace(model, size):
    dummy = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    return {"batch_stats": {}, **jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), dummy)}


@pytest.mark.parametrize("arch", ["resnet18", "convnext_tiny"])  # with and without BatchNorm statistics
def test_cached_shapes_equal_the_traced_ones(arch, tmp_path, monkeypatch):
    monkeypatch.setenv("KDJAX_CACHE", str(tmp_path))
    model = models.create_model(arch, 3)
    traced = _trace(model, 64)
    first = shapes.cached(model, 64, lambda: _trace(model, 64))
    files = list((tmp_path / "shapes").glob("*.json"))
    assert len(files) == 1

    def no_trace():
        raise AssertionError("traced although the shapes were cached")

    again = shapes.cached(model, 64, no_trace)
    for got in (first, again):
        assert jax.tree.structure(got) == jax.tree.structure(traced)
        assert jax.tree.leaves(got) == jax.tree.leaves(traced)
    # another size or another head is another entry; a damaged file is traced again
    shapes.cached(models.create_model(arch, 5), 64, lambda: _trace(models.create_model(arch, 5), 64))
    assert len(list((tmp_path / "shapes").glob("*.json"))) == 2
    files[0].write_text("{not json")
    assert jax.tree.leaves(shapes.cached(model, 64, lambda: _trace(model, 64))) == jax.tree.leaves(traced)


def test_a_module_outside_kdjax_is_never_cached(tmp_path, monkeypatch):
    import flax.linen as nn

    class Mine(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            return nn.Dense(2)(x.mean(axis=(1, 2)))

    monkeypatch.setenv("KDJAX_CACHE", str(tmp_path))
    shapes.cached(Mine(), 32, lambda: _trace(Mine(), 32))
    assert not (tmp_path / "shapes").exists()
