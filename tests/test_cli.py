"""experiments.cli: the runtime settings shared by the entry points."""

from __future__ import annotations

import jax
import pytest

from experiments import cli


@pytest.fixture
def restore_cache_dir():
    before = jax.config.jax_compilation_cache_dir
    yield
    jax.config.update("jax_compilation_cache_dir", before)


def test_compile_cache_goes_where_asked_or_is_off(tmp_path, restore_cache_dir):
    assert cli.enable_compile_cache("none") is None
    target = tmp_path / "xla"
    assert cli.enable_compile_cache(str(target)) == str(target)
    assert jax.config.jax_compilation_cache_dir == str(target) and target.is_dir()
    # without a flag, an already configured cache (JAX_COMPILATION_CACHE_DIR) is kept
    assert cli.enable_compile_cache(None) == str(target)


def test_default_cache_is_under_kdjax_cache(tmp_path, monkeypatch, restore_cache_dir):
    jax.config.update("jax_compilation_cache_dir", None)
    monkeypatch.setenv("KDJAX_CACHE", str(tmp_path))
    assert cli.enable_compile_cache(None) == str(tmp_path / "jax")


def test_cpu_defaults_to_float32():
    assert not cli.accelerated()
    assert cli.default_dtype(None) == "float32"
    assert cli.default_dtype("bfloat16") == "bfloat16"
