"""Streaming a split that is not held on the devices: each process reads its own rows of every
global batch from the decode cache's records, a few steps ahead, on grain's reader threads.

What is read per training step is exactly what the device-resident path gathers on the device
(``batches.take_rows``): every stored training image of the step's examples on the split's
fixed-size canvas (zero padding), its stored and original sizes and its label. The crop, the
resize and the flip then run on the device as they do for a resident split (``batches.
train_views``), keyed by (seed, epoch, example index), so a streamed epoch computes the same
views, hence the same metrics, whatever the number of reader threads or processes.

Why the crops stay on the device: host workers would have to reproduce the device's resampling
to the last bit for the metrics to be path-independent, and they would be slower at it, on cores
the step itself uses (PIL's crop + resize + flip, measured: benchmarks/README.md "Streaming
input", "Where to crop"). The host's work is a record read (raw bytes: nothing to decode) and a
copy into the canvas.

The read-ahead is grain's: a ``MapDataset`` over the epoch's steps, read through an
``IterDataset`` with ``ReadOptions(num_threads, prefetch_buffer_size)``; what is held on the
host is bounded by ``prefetch`` steps, whatever the split's size.
"""

from __future__ import annotations

from typing import Iterator

import grain
import jax
import numpy as np

from kdjax import distributed
from kdjax.data.batches import Split, TrainArrays

DEFAULT_THREADS = 4
DEFAULT_PREFETCH = 4


def _local(shape: tuple[int, ...], sharding: jax.sharding.Sharding, axis: int) -> slice:
    return distributed.local_block(shape, sharding)[axis]


def _read_ahead(fn, num: int, threads: int | None, prefetch: int | None) -> Iterator:
    """``fn(0), fn(1), ..., fn(num - 1)`` in order, computed up to ``prefetch`` ahead on threads
    (``None``: the module's ``DEFAULT_THREADS`` and ``DEFAULT_PREFETCH`` at call time)."""
    threads = DEFAULT_THREADS if threads is None else threads
    prefetch = DEFAULT_PREFETCH if prefetch is None else prefetch
    dataset = grain.MapDataset.range(num).map(fn)
    options = grain.ReadOptions(num_threads=max(1, threads), prefetch_buffer_size=max(1, prefetch))
    return iter(dataset.to_iter_dataset(options))


def train_steps(split: Split, order: np.ndarray, sharding: jax.sharding.Sharding, *,
                threads: int | None = None, prefetch: int | None = None) -> Iterator[TrainArrays]:
    """One ``TrainArrays`` per step of ``order`` ``[steps, S, B]`` (dataset indices per seed):
    this process's rows ``[S, B_local, ...]`` of the step's ``[S, B]`` batch under ``sharding``
    (batch axis 1), as host arrays."""
    rows = _local(order.shape[1:], sharding, 1)

    def read(step: int) -> TrainArrays:
        return split.train_rows(order[step][:, rows])

    return _read_ahead(read, order.shape[0], threads, prefetch)


def put_rows(rows: TrainArrays, sharding: jax.sharding.Sharding, batch_size: int) -> TrainArrays:
    """A global ``TrainArrays`` ``[S, B, ...]`` from this process's rows (``train_steps``)."""

    def put(x):
        shape = (x.shape[0], batch_size, *x.shape[2:])
        return jax.make_array_from_process_local_data(sharding, x, shape)

    return TrainArrays(*(put(np.asarray(a)) for a in rows))


def eval_batches(split: Split, batch_size: int, sharding: jax.sharding.Sharding, *,
                 threads: int | None = None, prefetch: int | None = None) -> Iterator[jax.Array]:
    """The split's evaluation views in fixed-shape batches ``[batch_size, s, s, 3]`` uint8 placed
    with ``sharding`` (batch axis 0), the last one padded with zeros; each process reads its rows."""
    n = split.num_examples
    steps = -(-n // batch_size)
    rows = _local((batch_size,), sharding, 0)

    def read(step: int) -> np.ndarray:
        positions = np.arange(step * batch_size, (step + 1) * batch_size)[rows]
        real = positions[positions < n]
        images = split.eval_images(real) if real.size else None
        if real.size == positions.size:
            return images
        out = np.zeros((positions.size, *split_eval_shape(split)), np.uint8)
        if images is not None:
            out[: real.size] = images
        return out

    for local in _read_ahead(read, steps, threads, prefetch):
        yield jax.make_array_from_process_local_data(sharding, local, (batch_size, *local.shape[1:]))


def split_eval_shape(split: Split) -> tuple[int, int, int]:
    """``(s, s, 3)``: the shape of one of the split's evaluation views."""
    return tuple(split.eval_images(np.zeros(1, np.int64)).shape[1:])
