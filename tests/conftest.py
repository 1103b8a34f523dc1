"""Test setup: four simulated CPU devices, kdjax's XLA:CPU flags, float32 at highest precision, a
compile cache.

Only this file and the entry points touch global JAX configuration; it must run before jax
creates its backend, hence the environment variable at import time.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys

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
COMPILE_CACHE = REPO / ".cache" / "jax-tests"
CHILD = pathlib.Path(__file__).with_name("child.py")

jax.config.update("jax_default_matmul_precision", "highest")
# Compiling ResNet-50 costs seconds on 2 cores; a persistent cache makes reruns cheap.
jax.config.update("jax_compilation_cache_dir", str(COMPILE_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@pytest.fixture(scope="session")
def hymenoptera_dir() -> pathlib.Path:
    """The real ants/bees set that lies beside the project (never copied into it)."""
    if not HYMENOPTERA.is_dir():
        pytest.skip(f"real dataset not found at {HYMENOPTERA}")
    return HYMENOPTERA


# ----------------------------------------------------------------------------- generated images


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


def varied_size(seed: int) -> tuple[int, int]:
    """Image sizes (width, height) that differ from image to image: 40-46 x 30-34 px."""
    return 40 + seed % 7, 30 + seed % 5


def make_image_folder(root: pathlib.Path, spec: dict, size=(40, 30), name: str = "{cls}_{i}.jpg") -> pathlib.Path:
    """Write an ImageFolder tree of random JPEGs at ``root`` and return it.

    ``spec`` is ``{"train": {"ants": 3, "bees": 2}, "val": {...}}``; image k (counting from 1
    over the splits and classes in ``spec``'s order) has seed k and size ``size``, or
    ``size(k)`` when ``size`` is a function such as ``varied_size``; ``name`` is formatted with
    the class and the index in the class. For module-scoped fixtures; tests take ``image_folder``.
    """
    seed = 0
    for split, classes in spec.items():
        for cls, n in classes.items():
            for i in range(n):
                seed += 1
                width_height = size(seed) if callable(size) else size
                write_image(root / split / cls / name.format(cls=cls, i=i), width_height, seed)
    return root


@pytest.fixture
def image_folder(tmp_path):
    """Factory: ``image_folder(spec, size=(40, 30), root=None, name=...)`` is ``make_image_folder``
    at ``root``, by default ``tmp_path / "images"``."""

    def make(spec: dict, size=(40, 30), root: pathlib.Path | None = None, **kwargs) -> pathlib.Path:
        return make_image_folder(root or tmp_path / "images", spec, size, **kwargs)

    return make


# ----------------------------------------------------------------------------- runs


def as_teacher(arch: str, model, variables):
    """``variables`` of ``model`` as the engine's teacher, with the fingerprint that a resumed run
    checks."""
    from kdjax import checkpoint, engine

    return engine.Teacher(arch, model, variables, checkpoint.fingerprint(variables))


def calibrated_variables(model, key, images) -> dict:
    """Random variables of ``model`` whose BatchNorm running statistics are those of ``images``
    (uint8 eval views, one train-mode batch), so that eval-mode logits are O(1-10) as with
    trained networks: raw random statistics (mean 0, var 1) give logits ~1e4, which turn
    round-off into large absolute differences. One train-mode pass from the init statistics
    moves running = m * old + (1 - m) * batch; solved here for the batch's."""
    import jax.numpy as jnp

    from kdjax import models
    from kdjax.data import augment

    m = models.resnet.BatchNorm.momentum
    variables = models.init_variables(model, key, images.shape[1])
    _, updates = model.apply(variables, augment.normalize(jnp.asarray(images)), train=True, mutable=["batch_stats"])
    stats = jax.tree.map(lambda new, old: (new - m * old) / (1 - m), updates["batch_stats"], variables["batch_stats"])
    return {"params": variables["params"], "batch_stats": stats}


def read_metrics(workdir) -> dict:
    """A run's ``metrics.json``."""
    return json.loads((pathlib.Path(workdir) / "metrics.json").read_text())


def read_history(workdir) -> list[dict]:
    """A run's epoch records without their wall-clock ``seconds``, which differ between two runs
    that computed the same numbers."""
    history = read_metrics(workdir)["history"]
    for record in history:
        record.pop("seconds")
    return history


EXACT = ("acc", "teacher_acc", "agreement")  # counts over the examples


def assert_same_history(got: list[dict], want: list[dict], rtol: float, atol: float = 1e-6) -> None:
    """Two runs' epoch records agree: the epochs and learning rates exactly, the counts
    (accuracies, agreement) exactly, every other train and val figure to ``rtol`` relative
    (``atol`` absolute). Each caller says why its ``rtol`` is the right one."""
    assert [r["epoch"] for r in got] == [r["epoch"] for r in want]
    for g, w in zip(got, want):
        assert g["lr"] == w["lr"], g["epoch"]
        for phase in ("train", "val"):
            assert g[phase].keys() == w[phase].keys(), (g["epoch"], phase)
            for key, value in w[phase].items():
                if key in EXACT:
                    assert g[phase][key] == value, (g["epoch"], phase, key)
                else:
                    np.testing.assert_allclose(g[phase][key], value, rtol=rtol, atol=atol,
                                               err_msg=f"epoch {g['epoch']} {phase}/{key}")


def events_by_tag_and_step(logdir, purge: bool = True) -> dict[str, dict[int, list[float]]]:
    """The scalars of the event files under ``logdir`` (``kdjax.events.read_scalars``): tag ->
    step -> every value written there, in order; with ``purge`` what TensorBoard shows."""
    from kdjax import events

    grouped: dict[str, dict[int, list[float]]] = {}
    for tag, step, value in events.read_scalars(logdir, purge=purge):
        grouped.setdefault(tag, {}).setdefault(step, []).append(value)
    return grouped


def assert_events_hold(logdir, history: list[dict], purge: bool = True) -> None:
    """The event files under ``logdir`` hold each record of ``history`` once (every tag of
    ``kdjax.events.record_scalars``, at step = its epoch, to float32) and nothing else; with
    ``purge=False`` even without TensorBoard's purging of restarted runs."""
    import pytest

    from kdjax import events

    scalars = events_by_tag_and_step(logdir, purge)
    want = {r["epoch"]: events.record_scalars(r) for r in history}
    assert set(scalars) == set(want[history[0]["epoch"]]), logdir
    for tag, by_step in scalars.items():
        assert sorted(by_step) == sorted(want), (logdir, tag)
        for step, values in by_step.items():
            assert values == [pytest.approx(want[step][tag], rel=1e-6)], (logdir, tag, step)


class Interrupted(Exception):
    """A training stopped from outside (Ctrl-C, a lost machine), raised by ``watch_events``."""


def watch_events(monkeypatch, logdir_of, seen: list, stop_at: int | None = None) -> None:
    """Wrap ``kdjax.engine.train_runs`` (as the protocol calls it) so that as each epoch of a run
    ends, after the caller's own ``on_epoch``, ``seen`` gets ``(record,
    events_by_tag_and_step(logdir_of(run)))``: what the run's event files show while it is still
    going. With ``stop_at``, training stops (raises
    ``Interrupted``) as the last run's epoch ``stop_at`` ends."""
    from kdjax import engine

    train_runs = engine.train_runs

    def watched(runs, *args, on_epoch, **kwargs):
        def callback(k, record):
            on_epoch(k, record)
            seen.append((record, events_by_tag_and_step(logdir_of(runs[k]))))
            if record["epoch"] == stop_at and k == len(runs) - 1:
                raise Interrupted

        return train_runs(runs, *args, on_epoch=callback, **kwargs)

    monkeypatch.setattr(engine.loop, "train_runs", watched)


def assert_shown_as_epochs_end(seen: list) -> None:
    """Each ``watch_events`` sighting shows its record's epoch, with the record's values."""
    from kdjax import events

    assert seen
    for record, shown in seen:
        for tag, value in events.record_scalars(record).items():
            assert shown[tag][record["epoch"]] == [pytest.approx(value, rel=1e-6)], (tag, record["epoch"])


# ----------------------------------------------------------------------------- child processes


def child_command(workdir, images, cache, *flags) -> list[str]:
    """The command line of one ``tests/child.py`` process (a small run; see its docstring)."""
    return [sys.executable, str(CHILD), str(workdir), str(images), str(cache), *map(str, flags)]


def child_env() -> dict[str, str]:
    """The environment of a child process: this one's, with the tests' compile cache and the
    CPU, and without ``XLA_FLAGS`` (the child sets its own device count)."""
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(COMPILE_CACHE), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    return env


# ----------------------------------------------------------------------------- memory between files


@pytest.fixture(scope="module", autouse=True)
def release_memory_after_each_file():
    """Drop what a test file compiled and allocated once it is done. An xdist worker runs many
    files; JAX keeps every executable it compiled in memory and glibc keeps freed heap, so
    without this each worker grows by gigabytes over the suite, and two of them beside a
    multi-process test's children can exhaust the machine (a worker killed mid-run). A later
    file that needs an executable again reads it from the persistent compile cache."""
    yield
    import ctypes
    import gc

    jax.clear_caches()
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


# ----------------------------------------------------------------------------- batches


def train_batch(arrays, indices, mask, seed, epoch, image_size):
    """``kdjax.data.train_views`` of the examples ``indices`` [B] of a device-resident split
    ``arrays`` (``TrainArrays``), gathered with ``take_rows``: a training batch as the engine's
    step builds it from a split held in memory. Pure and jit-able (``image_size`` static)."""
    from kdjax import data

    return data.train_views(data.take_rows(arrays, indices), indices, mask, seed, epoch, image_size)
