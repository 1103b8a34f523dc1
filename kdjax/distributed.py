"""Multi-process runs on JAX's own distributed runtime: one process per host, one mesh.

kdjax has no cluster layer of its own. ``initialize`` joins JAX's multi-controller runtime
(``jax.distributed.initialize``) before anything touches the backend; after that ``jax.devices()``
lists every device of every process and the ``('data',)`` mesh of ``kdjax.sharding`` spans them
all, so the jitted steps are unchanged. What differs is only at the host boundary:

- global arrays are built so that a process touches only its own devices: ``put_batch`` feeds
  this process's rows of a global batch, ``put_replicated`` copies host data that every process
  holds identically (``jax.device_put`` would compare it across processes first);
- results come back through ``to_host``, which gathers whatever is not fully replicated;
- files are written by the primary process (``is_primary``) except orbax checkpoints, which every
  process saves together;
- a process that fails leaves at once (``exit_with``), so its peers fail too instead of waiting
  for it in a collective.

On CPU the cross-process collectives are gloo's (JAX's default, compiled into jaxlib).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import traceback
from typing import Callable, Iterator, NoReturn, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

DEFAULT_HEARTBEAT_TIMEOUT = 100  # JAX's default: seconds without heartbeats before a peer is dead
DEFAULT_INITIALIZATION_TIMEOUT = 300  # JAX's default: seconds to wait for every process to join


class DistributedConfigError(ValueError):
    """Missing, partial or inconsistent multi-process settings; the message names the flags."""


def _check_address(address: str) -> None:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DistributedConfigError(
            f"--coordinator_address {address!r} must be HOST:PORT (process 0's host name or IP "
            f"address and a free port on it, e.g. 10.0.0.1:1234)"
        )


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | None = None,
    *,
    auto: bool = False,
    heartbeat_timeout: int = DEFAULT_HEARTBEAT_TIMEOUT,
    initialization_timeout: int = DEFAULT_INITIALIZATION_TIMEOUT,
) -> bool:
    """Join a multi-process run; returns False (and does nothing) for a single-process run.

    Give ``coordinator_address``, ``num_processes`` and ``process_id`` together, or set ``auto``
    to let JAX read whatever is not given from the cluster's environment (SLURM, Open MPI, Cloud
    TPU, ``JAX_COORDINATOR_ADDRESS``...). With none of them and not ``auto``, the run is a plain
    single process. ``heartbeat_timeout`` bounds how long a process outlives a dead peer.
    Must run before anything touches the JAX backend (``jax.devices()``, any computation).
    """
    given = {
        "--coordinator_address": coordinator_address,
        "--num_processes": num_processes,
        "--process_id": process_id,
    }
    if not auto and all(v is None for v in given.values()):
        if local_device_ids is not None:
            raise DistributedConfigError(
                "--local_device_ids applies to a multi-process run; also give --coordinator_address, "
                "--num_processes and --process_id (or --distributed to read them from the cluster)"
            )
        return False
    missing = [flag for flag, v in given.items() if v is None]
    if missing and not auto:
        raise DistributedConfigError(
            f"a multi-process run needs --coordinator_address, --num_processes and --process_id "
            f"together; missing {', '.join(missing)} (or pass --distributed to read what is unset "
            f"from the cluster environment, e.g. under SLURM)"
        )
    if coordinator_address is not None:
        _check_address(coordinator_address)
    if num_processes is not None and num_processes < 1:
        raise DistributedConfigError(f"--num_processes must be >= 1, got {num_processes}")
    if process_id is not None and (process_id < 0 or (num_processes is not None and process_id >= num_processes)):
        raise DistributedConfigError(
            f"--process_id must be in 0..{'N-1' if num_processes is None else num_processes - 1}, "
            f"got {process_id}"
        )
    for flag, seconds in (("--heartbeat_timeout", heartbeat_timeout),
                          ("--initialization_timeout", initialization_timeout)):
        if int(seconds) != seconds or seconds < 1:
            raise DistributedConfigError(f"{flag} must be a whole number of seconds >= 1, got {seconds}")
    if jax.config.jax_cpu_collectives_implementation is None:
        # Without cross-process collectives a CPU computation over several processes fails.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(
            coordinator_address, num_processes, process_id, local_device_ids,
            initialization_timeout=int(initialization_timeout),
            heartbeat_timeout_seconds=int(heartbeat_timeout),
        )
    except RuntimeError as err:
        if "must be called before" in str(err):
            raise DistributedConfigError(
                "the JAX backend was already in use before the multi-process setup; initialise "
                "kdjax.distributed first thing in the program"
            ) from err
        raise
    except ValueError as err:  # JAX could not complete the settings from the environment
        raise DistributedConfigError(
            f"--distributed: no cluster environment provides the missing settings ({err}); give "
            f"--coordinator_address, --num_processes and --process_id"
        ) from err
    return True


def is_multiprocess() -> bool:
    """True inside a run of several processes (after ``initialize``)."""
    return jax.distributed.is_initialized() and jax.process_count() > 1


def is_primary() -> bool:
    """True on process 0, the one that writes summaries, logs, metrics and model directories."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process gets here (no-op in a single process). ``name`` must be unique
    per call site and the same on every process."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


@contextlib.contextmanager
def primary_first(name: str) -> Iterator[None]:
    """Run the block on process 0 first, then on the others: for work that fills a shared cache
    (a download, the decode cache) that concurrent writers would race on."""
    if not is_primary():
        barrier(name)
    yield
    if is_primary():
        barrier(name)


def local_block(shape: Sequence[int], sharding: jax.sharding.Sharding) -> tuple[slice, ...]:
    """The block of a global array of ``shape`` that this process's devices hold under
    ``sharding`` (contiguous for kdjax's 1-D mesh, whose devices are ordered by process)."""
    index_map = sharding.addressable_devices_indices_map(tuple(shape))
    block = []
    for dim, size in enumerate(shape):
        spans = {index[dim].indices(size)[:2] for index in index_map.values()}
        lo, hi = min(a for a, _ in spans), max(b for _, b in spans)
        if sum(b - a for a, b in spans) != hi - lo:
            raise ValueError(f"this process's part of axis {dim} under {sharding} is not contiguous")
        block.append(slice(lo, hi))
    return tuple(block)


def put_batch(tree, sharding: jax.sharding.Sharding):
    """A global array for each host array of ``tree`` (every process holds the same global
    values, e.g. an epoch's example indices): each process feeds only the rows its devices
    hold. A single process places the arrays as ``jax.device_put`` does."""

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(sharding, x[local_block(x.shape, sharding)], x.shape)

    return jax.tree.map(put, tree)


def put_replicated(tree, sharding: jax.sharding.Sharding):
    """``tree`` (host or device values, identical on every process) placed with ``sharding``,
    typically a full copy on every device. Unlike ``jax.device_put`` across processes, nothing
    is compared or transferred between processes: each one copies its own host data."""

    def put(x):
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree)


def check_same(flag: bool, message: str) -> None:
    """Raise ``ValueError(message)`` unless every process holds the same ``flag`` (a decision each
    takes from its own files, which must agree; a no-op in a single process)."""
    if jax.process_count() == 1:
        return
    flags = np.asarray(multihost_utils.process_allgather(np.asarray([flag], np.int32)))
    if flags.min() != flags.max():
        raise ValueError(message)


def to_host(tree):
    """``tree`` as numpy arrays on every process. Fully replicated (or, in a single process,
    addressable) leaves are copied from a local device; others are gathered across processes,
    so in a multi-process run every process must call this at the same point."""

    def get(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
            return np.asarray(jax.device_get(x))
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(get, tree)


def _failure_line(err: BaseException) -> str:
    where = f"process {jax.process_index()} of {jax.process_count()}"
    text = " ".join(str(err).split())
    if isinstance(err, jax.errors.JaxRuntimeError) and re.search(r"gloo|nccl|connection|peer", text, re.I):
        return (f"{where}: a collective with the other processes failed, most likely because "
                f"another process died ({text[:300]}); stopping this one too")
    return f"{where}: {type(err).__name__}: {text}"


def exit_with(main: Callable[[], int], prog: str) -> NoReturn:
    """Run an entry point's ``main`` and exit with its status.

    In a multi-process run a process that fails (non-zero status, or any exception) prints one
    line and leaves at once through ``os._exit``: a normal exit would wait in JAX's shutdown
    barrier for peers that themselves wait for it in a collective, and all would hang. Its
    peers then fail in their next collective, or are stopped by JAX's heartbeat check within
    ``--heartbeat_timeout``. A single-process run's exception keeps its traceback; once its
    ``main`` has returned, everything it wrote is closed (files are written atomically, stores
    and event writers closed), so after flushing the console and the logs it leaves through
    ``os._exit`` too, without the interpreter's teardown of JAX, XLA and their threads, which
    does nothing a finished command needs (benchmarks/README.md, start-up).
    """
    try:
        code = main()
    except BaseException as err:  # noqa: BLE001 -- every failure must end every process
        if not is_multiprocess():
            raise
        if not isinstance(err, (jax.errors.JaxRuntimeError, KeyboardInterrupt)):
            traceback.print_exc()
        print(f"{prog}: error: {_failure_line(err)}", file=sys.stderr)
        code = 130 if isinstance(err, KeyboardInterrupt) else 1
    multiprocess = is_multiprocess()
    if code and multiprocess:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if not multiprocess:  # a normal exit of a multi-process run passes JAX's shutdown barrier
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code or 0)
    sys.exit(code)
