"""Streaming (``--data_in_memory off``): the same views and metrics as the device-resident path,
whatever the reader threads; ``auto`` picks by memory; the flag's bad values are named.

Two processes streaming against one holding the data are in test_distributed.py; a streamed run
killed mid-epoch and resumed, in test_engine_loop.py.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from conftest import as_teacher, read_history
from kdjax import data, engine, models, sharding
from kdjax.config import DistillConfig, OptimConfig, TrainConfig
from kdjax.data import batches, stream


@pytest.fixture(scope="module")
def hymenoptera(hymenoptera_dir, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return (data.load_splits(hymenoptera_dir, image_size=32, cache_dir=cache, in_memory="on"),
            data.load_splits(hymenoptera_dir, image_size=32, cache_dir=cache, in_memory="off"))


def test_a_streamed_split_holds_no_arrays_and_reads_what_the_resident_one_holds(hymenoptera):
    held, streamed = hymenoptera
    assert held.in_memory and not streamed.in_memory
    assert streamed["train"].train is None and streamed["val"].eval is None
    assert streamed.cache_path == held.cache_path and streamed["train"].filenames == held["train"].filenames
    order, _ = data.epoch_order(streamed["train"].num_examples, 32, seed=3, epoch=1)
    mesh = sharding.data_mesh()
    steps = list(stream.train_steps(streamed["train"], order[:, None], sharding.batch_sharding_at(mesh, 1)))
    assert len(steps) == order.shape[0]
    for rows, indices in zip(steps, order):
        want = batches.take_rows(held["train"].train, indices)
        for got_leaf, want_leaf in zip(rows, want):
            np.testing.assert_array_equal(got_leaf[0], np.asarray(want_leaf))
    evals = list(stream.eval_batches(streamed["val"], 32, sharding.batch_sharding(mesh)))
    joined = np.concatenate([np.asarray(b) for b in evals])
    np.testing.assert_array_equal(joined[:153], held["val"].eval.images)
    assert joined.shape[0] == 160 and not joined[153:].any()  # the last batch padded with zeros


def _runs(root, alphas=(0.5, 1.0)):
    student = models.init_variables(models.create_model("resnet18", 2), jax.random.key(2), 32)
    config = TrainConfig(optim=OptimConfig(lr=0.01, step_size=1, gamma=0.5), num_epochs=1, batch_size=32,
                         image_size=32, seed=0, distill=DistillConfig(alpha=0.5, student_train="fc"))
    return [engine.Run(dataclasses.replace(config, seed=k, distill=DistillConfig(alpha=a, student_train="fc")),
                      root / f"alpha_{a}", student) for k, a in enumerate(alphas)]


def _history(results) -> list:
    return [[{k: v for k, v in r.items() if k != "seconds"} for r in read_history(res.workdir)] for res in results]


def test_streaming_and_holding_hymenoptera_give_identical_float32_metrics(hymenoptera, tmp_path, monkeypatch):
    """Two runs of two seeds trained together (each seed's batch streamed), with a teacher: every
    figure is equal, bit for bit, held in memory or streamed with 4 reader threads or 1."""
    held, streamed = hymenoptera
    model = models.create_model("resnet18", 2)
    teacher = as_teacher("resnet18", model, models.init_variables(model, jax.random.key(1), 32))
    got = {}
    for name, ds, threads in (("held", held, 4), ("streamed", streamed, 4), ("one_thread", streamed, 1)):
        monkeypatch.setattr(stream, "DEFAULT_THREADS", threads)
        monkeypatch.setattr(stream, "DEFAULT_PREFETCH", threads)
        got[name] = _history(engine.train_runs(_runs(tmp_path / name), ds, teacher=teacher,
                             options=engine.EngineOptions(scan_epochs=False)))
    assert [r["epoch"] for r in got["held"][0]] == [1]
    assert got["streamed"] == got["held"] and got["one_thread"] == got["held"]


def test_auto_holds_what_fits_and_streams_what_does_not(hymenoptera_dir, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    ds = data.load_splits(hymenoptera_dir, image_size=32, cache_dir=cache, in_memory="auto")
    needed = sum(split.in_memory_bytes(32) for split in ds.splits.values())
    assert ds.in_memory  # 0.2 GB of canvas against a quarter of the host's RAM
    monkeypatch.setattr(batches, "memory_capacity", lambda: (int(needed / batches.DEVICE_MEMORY_SHARE) - 1, "test"))
    assert not data.load_splits(hymenoptera_dir, image_size=32, cache_dir=cache, in_memory="auto").in_memory
    monkeypatch.setattr(batches, "memory_capacity", lambda: (int(needed / batches.DEVICE_MEMORY_SHARE), "test"))
    assert data.load_splits(hymenoptera_dir, image_size=32, cache_dir=cache, in_memory="auto").in_memory


def test_a_bad_in_memory_choice_is_named(hymenoptera_dir, tmp_path):
    with pytest.raises(ValueError, match=r"--data_in_memory 'maybe': choose one of auto, on, off"):
        data.load_splits(hymenoptera_dir, image_size=32, cache_dir=tmp_path, in_memory="maybe")


def test_scanned_epochs_over_streamed_data_are_refused_with_the_way_out(hymenoptera, tmp_path):
    _, streamed = hymenoptera
    with pytest.raises(ValueError, match=r"--scan_epochs on .* streamed: pass --data_in_memory on"):
        engine.train_runs(_runs(tmp_path), streamed, options=engine.EngineOptions(scan_epochs=True))
