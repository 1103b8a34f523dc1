"""Test setup: four simulated CPU devices, kdjax's XLA:CPU flags, float32 at highest precision, a
compile cache.

Only this file and the entry points touch global JAX configuration; it must run before jax
creates its backend, hence the environment variable at import time.
"""

from __future__ import annotations

import os
import pathlib

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from kdjax import xla_cpu  # noqa: E402

xla_cpu.apply()  # the XLA:CPU flags the entry points apply: tests check what users run

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
HYMENOPTERA = REPO.parent / "shared" / "data" / "hymenoptera_data"

jax.config.update("jax_default_matmul_precision", "highest")
# Compiling ResNet-50 costs seconds on 2 cores; a persistent cache makes reruns cheap.
jax.config.update("jax_compilation_cache_dir", str(REPO / ".cache" / "jax-tests"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@pytest.fixture(scope="session")
def hymenoptera_dir() -> pathlib.Path:
    """The real ants/bees set that lies beside the project (never copied into it)."""
    if not HYMENOPTERA.is_dir():
        pytest.skip(f"real dataset not found at {HYMENOPTERA}")
    return HYMENOPTERA


def write_image(path: pathlib.Path, size=(40, 30), seed=0, mode="RGB", fmt=None) -> pathlib.Path:
    """Write a random image (never committed: tests generate their images)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    img = Image.fromarray(arr, "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt)
    return path


@pytest.fixture
def image_folder(tmp_path):
    """Factory: ``image_folder({"train": {"ants": 3, "bees": 2}, "val": {...}}, size=(40, 30))``
    writes an ImageFolder tree of random JPEGs and returns its root."""

    def make(spec: dict, size=(40, 30), root: pathlib.Path | None = None) -> pathlib.Path:
        root = root or tmp_path / "images"
        seed = 0
        for split, classes in spec.items():
            for cls, n in classes.items():
                for i in range(n):
                    seed += 1
                    w, h = size if not callable(size) else size(seed)
                    write_image(root / split / cls / f"{cls}_{i}.jpg", (w, h), seed)
        return root

    return make
