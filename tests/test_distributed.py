"""kdjax.distributed: settings checks, global arrays, and real multi-process runs on this CPU.

The end-to-end part starts separate processes (tests/child.py) on JAX's distributed
runtime with gloo CPU collectives: two processes of 2 simulated devices each against one process
of 4, the same seed, one SIGKILL, one restart on the other process count.
"""

from __future__ import annotations

import pathlib
import socket
import subprocess
import time

import jax
import numpy as np
import pytest

from conftest import REPO, assert_same_history, child_command, child_env, make_image_folder, read_history, varied_size
from kdjax import data, distributed, sharding

# 3 steps of 4 per epoch, and a padded last validation batch
SPEC = {"train": {"ants": 6, "bees": 6}, "val": {"ants": 5, "bees": 5}}
# Seconds without heartbeats before JAX declares a process dead: bounds how long the survivor of
# a dead peer lives on. With 10 s a live but CPU-starved process was once declared dead on this
# loaded 2-core machine.
HEARTBEAT = 20
# Counts (accuracies, agreement) match exactly; losses and logit statistics to 5e-5 relative. Not
# bit-exact: the cross-process all-reduces (BatchNorm batch statistics, gradients) run in gloo,
# which adds the per-device partial sums in another order than XLA's in-process all-reduce, and
# float32 rounding then differs in the last bits and grows through BatchNorm and SGD (measured: at
# most 6.9e-6 relative over 3 epochs, the logit MSE). A real fault (a shard fed twice,
# per-process BatchNorm statistics, another view of an example) changes which numbers are
# summed, not only their order.
RTOL = 5e-5


# ----------------------------------------------------------------------------- settings


def test_no_settings_is_a_single_process_run():
    assert distributed.initialize() is False
    assert not distributed.is_multiprocess() and distributed.is_primary()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_processes=2, process_id=0), r"missing --coordinator_address"),
        (dict(coordinator_address="h:1234"), r"missing --num_processes, --process_id"),
        (dict(coordinator_address="h", num_processes=2, process_id=0), r"--coordinator_address 'h' must be HOST:PORT"),
        (dict(coordinator_address="h:99999", num_processes=2, process_id=0), r"must be HOST:PORT"),
        (dict(coordinator_address="h:1234", num_processes=0, process_id=0), r"--num_processes must be >= 1"),
        (dict(coordinator_address="h:1234", num_processes=2, process_id=2), r"--process_id must be in 0\.\.1, got 2"),
        (dict(coordinator_address="h:1234", num_processes=2, process_id=0, heartbeat_timeout=0),
         r"--heartbeat_timeout must be a whole number of seconds >= 1"),
        (dict(local_device_ids=[0]), r"--local_device_ids applies to a multi-process run"),
    ],
)
def test_partial_or_bad_settings_name_the_flag(kwargs, message):
    with pytest.raises(distributed.DistributedConfigError, match=message):
        distributed.initialize(**kwargs)


def test_initialising_after_the_backend_is_in_use_is_refused():
    jax.devices()  # this test process has long started its backend
    with pytest.raises(distributed.DistributedConfigError, match="already in use"):
        distributed.initialize("127.0.0.1:1234", 2, 0)


def test_entry_point_reports_partial_flags_in_one_line(capsys):
    from kdjax.cli import teacher

    assert teacher.main(["--num_processes", "2", "--process_id", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "missing --coordinator_address" in err


def test_gloo_is_the_cpu_collectives():
    assert jax.config.jax_cpu_collectives_implementation == "gloo"


# ----------------------------------------------------------------------------- global arrays


def test_local_block_of_a_single_process_is_everything():
    mesh = sharding.data_mesh()
    assert distributed.local_block((8,), sharding.batch_sharding(mesh)) == (slice(0, 8),)
    assert distributed.local_block((3, 8), sharding.steps_batch_sharding(mesh)) == (slice(0, 3), slice(0, 8))


def test_global_arrays_round_trip_in_one_process():
    mesh = sharding.data_mesh()
    order = np.arange(24, dtype=np.int32).reshape(3, 8)
    batch = distributed.put_batch(order, sharding.steps_batch_sharding(mesh))
    assert batch.sharding == sharding.steps_batch_sharding(mesh)
    assert [s.data.shape for s in batch.addressable_shards] == [(3, 2)] * 4
    tree = {"w": np.ones((2, 3), np.float32), "step": np.int32(7)}
    placed = distributed.put_replicated(tree, sharding.replicated(mesh))
    assert placed["w"].sharding.is_fully_replicated and placed["step"].dtype == np.int32
    back = distributed.to_host({"order": batch, **placed})
    np.testing.assert_array_equal(back["order"], order)
    assert int(back["step"]) == 7 and isinstance(back["w"], np.ndarray)


# ----------------------------------------------------------------------------- multi-process runs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Launcher:
    """Starts tests/child.py processes, logs each to a file, and kills whatever is left at teardown."""

    def __init__(self, folder: pathlib.Path, cache: pathlib.Path, logs: pathlib.Path):
        self.folder, self.cache, self.logs = folder, cache, logs
        self.procs: list[subprocess.Popen] = []

    def start(self, name: str, workdir, processes: int, devices: int,
              kill: tuple[int, int] | None = None, extra: tuple[str, ...] = ()) -> list[subprocess.Popen]:
        """``kill=(process, epoch)``: that process SIGKILLs itself during that epoch."""
        address = f"127.0.0.1:{_free_port()}"
        started = []
        for pid in range(processes):
            cmd = child_command(workdir, self.folder, self.cache, "--devices", devices,
                                "--heartbeat_timeout", HEARTBEAT, *extra)
            if kill is not None and kill[0] == pid:
                cmd += ["--kill-during-epoch", str(kill[1])]
            if processes > 1:
                cmd += ["--coordinator_address", address, "--num_processes", str(processes),
                        "--process_id", str(pid)]
            log = open(self.logs / f"{name}.{pid}.log", "w")
            started.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env(), cwd=REPO))
            log.close()
        self.procs += started
        return started

    def log(self, name: str, pid: int = 0) -> str:
        return (self.logs / f"{name}.{pid}.log").read_text()

    def kill_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _wait(procs: list[subprocess.Popen], timeout: float) -> list[float]:
    """Each process's exit time (time.monotonic()); fails, leaving them to the teardown, on timeout."""
    done: dict[int, float] = {}
    deadline = time.monotonic() + timeout
    while len(done) < len(procs):
        for i, p in enumerate(procs):
            if i not in done and p.poll() is not None:
                done[i] = time.monotonic()
        if time.monotonic() > deadline:
            pytest.fail(f"still running after {timeout} s: {[' '.join(map(str, p.args[1:])) for p in procs]}")
        time.sleep(0.1)
    return [done[i] for i in range(len(procs))]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process x 4 devices straight through; 2 processes x 2 devices with process 1 killed
    during epoch 3; the same directory resumed by 1 process x 4 devices."""
    root = tmp_path_factory.mktemp("dist")
    folder = make_image_folder(root / "images", SPEC, size=varied_size)
    data.load_splits(folder, image_size=32, cache_dir=root / "cache")  # decode once, here
    launcher = Launcher(folder, root / "cache", root)
    try:
        straight = launcher.start("straight", root / "straight", 1, 4)
        _wait(straight, 900)
        survivor, victim = launcher.start("killed", root / "shared", 2, 2, kill=(1, 3))
        times = _wait([victim], 900) + _wait([survivor], 300)

        resumed = launcher.start("resumed", root / "shared", 1, 4)
        _wait(resumed, 900)
        # two processes streaming: each reads only its own rows of every batch
        streamed = launcher.start("streamed", root / "streamed", 2, 2, extra=("--data_in_memory", "off"))
        _wait(streamed, 900)
    finally:
        launcher.kill_all()
    print(f"survivor: status {survivor.returncode}, {times[1] - times[0]:.1f} s after its peer died")
    return {
        "straight": (straight[0].returncode, read_history(root / "straight")),
        "victim": victim.returncode,
        "survivor": (survivor.returncode, times[1] - times[0], launcher.log("killed", 0)),
        "resumed": (resumed[0].returncode, launcher.log("resumed", 0), read_history(root / "shared")),
        "train_log": (root / "shared" / "train.log").read_text(),
        "streamed": ([p.returncode for p in streamed], [launcher.log("streamed", i) for i in range(2)],
                     read_history(root / "streamed")),
    }


def test_two_processes_compute_the_metrics_of_one(runs):
    code, straight = runs["straight"]
    assert code == 0 and [r["epoch"] for r in straight] == [1, 2, 3]
    # the 2-process run's epochs 1-2 are in the resumed history, untouched by the restart
    assert_same_history(runs["resumed"][2][:2], straight[:2], RTOL)


def test_two_streaming_processes_compute_the_metrics_of_one_holding_the_data(runs):
    codes, logs, history = runs["streamed"]
    assert codes == [0, 0], logs[1][-3000:]
    assert_same_history(history, runs["straight"][1], RTOL)
    # 12 training images x 3 epochs, batch 4 split 2 + 2: each process reads its half of every batch
    for log in logs:
        assert "child: read 18 training records" in log, log[-3000:]


def test_a_dead_peer_stops_the_survivor_in_bounded_time_with_one_clear_line(runs):
    assert runs["victim"] == -9
    code, seconds, log = runs["survivor"]
    assert code != 0, log[-3000:]
    assert seconds < HEARTBEAT + 25, f"survivor outlived its dead peer by {seconds:.1f} s"
    # Either the survivor's next collective failed (gloo saw the connection drop), and
    # kdjax.distributed.exit_with printed its line; or it was blocked in a collective that
    # never returns (gloo has no timeout: a device thread waits for a local rank that gave
    # up) and JAX's heartbeat check ended it (a C++ fatal error: this line, then a stack trace).
    ours = [line for line in log.splitlines() if line.startswith("child: error: process 0 of 2:")]
    jaxs = [line for line in log.splitlines() if "Terminating process because the JAX distributed service "
            "detected fatal errors. This most likely indicates that another task died" in line]
    assert (len(ours) == 1 and "another process died" in ours[0]) or len(jaxs) == 1, log[-3000:]


def test_restart_on_another_process_count_resumes_with_the_same_metrics(runs):
    code, log, history = runs["resumed"]
    assert code == 0, log[-3000:]
    assert "resuming" in log and "after epoch 2/3" in log
    assert_same_history(history, runs["straight"][1], RTOL)


def test_only_process_0_writes_the_run_files(runs):
    lines = runs["train_log"].splitlines()
    # epochs 1 and 2 from the 2-process run, then the restart: each line once
    assert sum(line.startswith("epoch   1/3") for line in lines) == 1
    assert sum(line.startswith("epoch   2/3") for line in lines) == 1
    assert sum(line.startswith("epoch   3/3") for line in lines) == 1
