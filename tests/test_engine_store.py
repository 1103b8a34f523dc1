"""kdjax.engine.store: run directories of earlier kdjax versions resume; one writer per study;
a damaged checkpoint is set aside; a failed write ends in one line."""

from __future__ import annotations

import fcntl
import inspect
import json
import logging
import os
import pathlib
import shutil
import socket
import subprocess
import sys

import jax
import pytest

from conftest import assert_same_history, child_env, make_image_folder, read_history
from kdjax import checkpoint, data, engine, models
from kdjax.config import DistillConfig, OptimConfig, TrainConfig

FIXTURES = pathlib.Path(__file__).with_name("fixtures")
sys.path.insert(0, str(FIXTURES))
import tiny_net  # noqa: E402

# the run of fixtures/run_v0 (fixtures/make_run_v0.py)
V0_CONFIG = TrainConfig(optim=OptimConfig(lr=0.05, step_size=1, gamma=0.5, weight_decay=1e-4),
                        distill=DistillConfig(alpha=0.3, loss="kd", hparams={"temperature": 2.0}, student_train="fc"),
                        num_epochs=2, batch_size=4, image_size=32, seed=3)


@pytest.fixture
def tiny_registered(monkeypatch):
    monkeypatch.setitem(models.ARCHS, tiny_net.NAME, tiny_net.SPEC)


def test_a_run_directory_of_kdjax_before_the_engine_package_resumes(tiny_registered, tmp_path):
    """``fixtures/run_v0`` was written by a215289 (every config field recorded, the run stopped
    after epoch 1 of 2): it resumes after epoch 1, and its two epochs equal that version's
    uninterrupted run. Tolerance: the fixture was computed on this machine kind; rtol 1e-6 leaves
    room for another CPU's instruction set, counts are exact."""
    root = tmp_path / "v0"
    shutil.copytree(FIXTURES / "run_v0", root)
    recorded = json.loads((root / "run" / "metrics.json").read_text())["run"]["config"]
    assert recorded["optim"] == {"lr": 0.05, "momentum": 0.9, "step_size": 1, "gamma": 0.5, "weight_decay": 0.0001}
    dataset = data.load_splits(root / "images", image_size=32, cache_dir=tmp_path / "cache")
    teacher = engine.load_teacher(root / "teacher", dataset)
    student = models.init_variables(models.create_model(tiny_net.NAME, 2), jax.random.key(2), 32)
    run = engine.Run(V0_CONFIG, root / "run", student, {"init": "scratch"})
    result = engine.train_and_evaluate(run, dataset, student_arch=tiny_net.NAME, teacher=teacher)
    assert "resuming" in (root / "run" / "train.log").read_text()
    want = json.loads((root / "expected_history.json").read_text())
    assert_same_history(read_history(root / "run"), want, rtol=1e-6)
    assert [r["epoch"] for r in result.history] == [1, 2]
    # what the resumed run records now leaves the defaults out
    now = json.loads((root / "run" / "metrics.json").read_text())["run"]["config"]
    assert now["optim"] == {"lr": 0.05, "step_size": 1, "gamma": 0.5, "weight_decay": 0.0001}


# ----------------------------------------------------------------------------- a full disk

SPEC = {"train": {"ants": 6, "bees": 6}, "val": {"ants": 4, "bees": 4}}

# The real command in its own process (stderr counted whole), tiny_net registered; with
# KDJAX_TEST_FILL_AT=E the disk is filled as epoch E of the student run ends, just before the
# store writes it (fill_disk: a tmpfs's last byte, or else a file-size limit of 0).
CLI_CHILD = """
import os, sys
sys.path.insert(0, FIXTURES)
import tiny_net
from kdjax import models
models.ARCHS[tiny_net.NAME] = tiny_net.SPEC
FILL_DISK
fill_at = int(os.environ.get("KDJAX_TEST_FILL_AT", "0"))
if fill_at:
    from kdjax.engine import store
    end_epoch = store.RunStore.end_epoch

    def filling(self, epoch, *args, **kwargs):
        if epoch + 1 == fill_at and "alpha_" in str(self.workdir):
            fill_disk(os.environ["KDJAX_TEST_FILLER"] or None)
        return end_epoch(self, epoch, *args, **kwargs)

    store.RunStore.end_epoch = filling
import json
import kdjax.cli
from kdjax.distributed import exit_with


def main():  # each command line in turn, until one fails
    return next((code for argv in json.loads(sys.argv[1]) if (code := kdjax.cli.main(argv))), 0)


exit_with(main, "kdjax distill")
"""


def fill_disk(filler: str | None) -> None:
    """Leave no room for the next write: fill the filesystem of ``filler`` (a tmpfs) up to its
    last byte, or without one (``None``: no tmpfs here) limit this process's files to 0 bytes,
    so that any write into a file fails (EFBIG) as a write into a full disk does (ENOSPC)."""
    if filler is None:
        import resource
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        return
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    block = b"\0" * 65536
    try:
        while True:
            try:
                os.write(fd, block)
            except OSError:
                if len(block) == 1:
                    break
                block = block[: len(block) // 16]
    finally:
        os.close(fd)


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MiB tmpfs at ``tmp_path / 'disk'`` where this machine lets us mount one (root), else
    a plain folder (``fill_disk`` then limits file sizes instead); yields ``(folder, filler)``."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)],
                             capture_output=True).returncode == 0 if shutil.which("mount") else False
    try:
        yield disk, str(disk / "filler") if mounted else None
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(disk)], check=False)


def _distill_argv(out, images, cache) -> list[str]:
    return ["distill", "--data_dir", images, "--cache_dir", cache, "--image_size", "32", "--num_epochs", "3",
            "--batch_size", "4", "--lr", "0.05", "--s_lr_step_size", "1", "--s_rl_gamma", "0.5", "--init", "scratch",
            "--student_arch", tiny_net.NAME, "--teacher_arch", tiny_net.NAME, "--student_train", "all",
            "--n_exp", "1", "--alpha", "0.5", "--no_plots", "--out", out]


def _cli(*argvs, fill_at: int = 0, filler=None) -> subprocess.CompletedProcess:
    """The commands ``argvs`` one after another in one process (``CLI_CHILD``)."""
    env = {**child_env(), "KDJAX_TEST_FILL_AT": str(fill_at), "KDJAX_TEST_FILLER": filler or ""}
    code = CLI_CHILD.replace("FIXTURES", repr(str(FIXTURES))).replace("FILL_DISK", inspect.getsource(fill_disk))
    argvs = json.dumps([[str(a) for a in argv] for argv in argvs])
    return subprocess.run([sys.executable, "-c", code, argvs], capture_output=True, text=True, env=env, timeout=600)


def test_a_full_disk_ends_in_one_line_and_a_rerun_of_the_moved_folder_resumes(tmp_path, small_disk):
    """The study's disk fills as its student's epoch 2 is written: one line (the path, the
    cause, the epoch a re-run resumes from), no traceback, none of orbax's closed-event-loop
    callbacks; the folder moved to a disk with room then resumes and ends as an uninterrupted
    study does, to the bit (the same program on the same machine)."""
    images = make_image_folder(tmp_path / "images", SPEC)
    cache = tmp_path / "cache"
    disk, filler = small_disk
    full = _cli(_distill_argv(disk / "out", images, cache), fill_at=2, filler=filler)
    assert full.returncode == 2, full.stderr[-3000:]
    assert "Traceback" not in full.stderr and "Event loop is closed" not in full.stderr, full.stderr[-3000:]
    last = full.stderr.strip().splitlines()[-1]
    run = disk / "out" / "alpha_0.5" / "run_0"
    assert last.startswith("kdjax distill: error: cannot write epoch 2's "), last
    assert str(run) in last and ("No space left on device" in last or "File too large" in last), last
    assert f"resumes from the last good checkpoint, epoch 1 ({run / 'checkpoints' / '0'})" in last, last
    moved = tmp_path / "roomy" / "out"
    shutil.move(disk / "out", moved)
    # the uninterrupted study, then the moved one's re-run, in one process (one start-up)
    done = _cli(_distill_argv(tmp_path / "straight", images, cache), _distill_argv(moved, images, cache))
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming {moved / 'alpha_0.5' / 'run_0'} after epoch 1/3" in done.stderr
    assert "taking over" not in done.stderr
    for part in ("teacher", "alpha_0.5/run_0"):
        assert read_history(moved / part) == read_history(tmp_path / "straight" / part), part


# ----------------------------------------------------------------------------- damaged checkpoints


class Stopped(Exception):
    """The run stopped from outside after an epoch (a kill, a lost machine)."""


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return data.load_splits(make_image_folder(root / "images", SPEC), image_size=32, cache_dir=root / "cache")


def _tiny_run(workdir, epochs: int = 3) -> engine.Run:
    config = TrainConfig(optim=OptimConfig(lr=0.05, step_size=1, gamma=0.5), distill=None, num_epochs=epochs,
                         batch_size=4, image_size=32, seed=0)
    student = models.init_variables(models.create_model(tiny_net.NAME, 2), jax.random.key(2), 32)
    return engine.Run(config, workdir, student, {"init": "scratch"})


def _train(run, dataset, stop_after: int | None = None):
    def on_epoch(record):
        if record["epoch"] == stop_after:
            raise Stopped

    return engine.train_and_evaluate(run, dataset, student_arch=tiny_net.NAME, on_epoch=on_epoch)


def _steps(workdir) -> list[str]:
    return sorted(p.name for p in (workdir / "checkpoints").iterdir())


def _truncate_largest(step_dir: pathlib.Path, count: int = 3) -> None:
    """Cut the ``count`` largest files under ``step_dir`` in half."""
    files = sorted((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: -p.stat().st_size)[:count]
    for p in files:
        with open(p, "r+b") as f:
            f.truncate(p.stat().st_size // 2)


@pytest.fixture(scope="module")
def straight_tiny(tiny_dataset, tmp_path_factory):
    """An uninterrupted 3-epoch run of tiny_net (supervised, every layer trained)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(models.ARCHS, tiny_net.NAME, tiny_net.SPEC)
        workdir = tmp_path_factory.mktemp("straight") / "run"
        _train(_tiny_run(workdir), tiny_dataset)
        return read_history(workdir)


def _change_recorded_fingerprint(step_dir: pathlib.Path) -> None:
    """Make the state of checkpoint ``step_dir`` differ from what its metadata recorded, as
    silently corrupted bytes would (orbax reads them back without a word)."""
    path = step_dir / "meta" / "metadata"
    meta = json.loads(path.read_text())
    meta["state_fingerprint"] = "sha256:" + "0" * 64
    path.write_text(json.dumps(meta))


@pytest.mark.parametrize("damage, cause", [
    (_truncate_largest, "its state cannot be read"),  # the largest files: TensorStore's metadata
    (_change_recorded_fingerprint, "its state reads back other values than were saved"),
])
def test_a_damaged_newest_checkpoint_is_set_aside_and_the_run_resumes_from_the_one_before(
        tiny_registered, tiny_dataset, straight_tiny, tmp_path, damage, cause):
    """Stopped after epoch 2 of 3, its newest checkpoint (epoch 2) then damaged: the re-run
    says so in one line, renames it out of orbax's steps (and max_to_keep=2 keeps epoch 1's),
    resumes after epoch 1 and ends exactly as the uninterrupted run."""
    workdir = tmp_path / "run"
    with pytest.raises(Stopped):
        _train(_tiny_run(workdir), tiny_dataset, stop_after=2)
    assert _steps(workdir) == ["0", "1"]
    damage(workdir / "checkpoints" / "1")
    _train(_tiny_run(workdir), tiny_dataset)
    assert read_history(workdir) == straight_tiny
    [aside] = [name for name in _steps(workdir) if ".damaged-" in name]
    assert aside.startswith("1.damaged-") and _steps(workdir) == sorted(["1", "2", aside])
    log = (workdir / "train.log").read_text()
    [damaged] = [line for line in log.splitlines() if " is damaged" in line]
    assert damaged.startswith(f"checkpoint {workdir / 'checkpoints' / '1'} (epoch 2) is damaged, {cause}"), damaged
    assert damaged.endswith(f"; set aside as {aside}, resuming from epoch 1's checkpoint"), damaged
    assert f"resuming {workdir} after epoch 1/3" in log


def test_with_no_intact_checkpoint_left_the_run_stops_in_one_line_and_moves_nothing(
        tiny_registered, tiny_dataset, tmp_path):
    workdir = tmp_path / "run"
    with pytest.raises(Stopped):
        _train(_tiny_run(workdir), tiny_dataset, stop_after=2)
    for step in ("0", "1"):
        (workdir / "checkpoints" / step / "meta" / "metadata").write_text("{")  # cut short
    with pytest.raises(engine.store.DamagedCheckpointError) as caught:
        _train(_tiny_run(workdir), tiny_dataset)
    message = str(caught.value)
    assert f"no checkpoint of {workdir} can be read back intact" in message
    assert f"{workdir / 'checkpoints' / '1'} (epoch 2): its metadata cannot be read" in message
    assert "move these checkpoints out of" in message and "Nothing was moved" in message
    assert _steps(workdir) == ["0", "1"]


# ----------------------------------------------------------------------------- failed writes, one by one


def _record(epoch: int, acc: float) -> dict:
    figures = {"loss": 0.5, "acc": acc}
    return {"epoch": epoch + 1, "lr": 0.1, "train": figures, "val": figures, "seconds": 0.0}


class Epochs:
    """A run store driven by hand: epochs of a state of 300 small arrays (so that many of
    orbax's writes are in flight when one fails) and a tiny_net best model."""

    def __init__(self, workdir: pathlib.Path):
        self.workdir = workdir
        self.variables = models.init_variables(models.create_model(tiny_net.NAME, 2), jax.random.key(0), 32)
        self.state = {"w": [jax.numpy.full((4,), i, jax.numpy.float32) for i in range(300)]}
        self.run_meta = {"config": V0_CONFIG.to_json(), "student_arch": tiny_net.NAME, "init": None,
                         "teacher_fingerprint": None, "class_names": ["a", "b"], "data_fingerprint": "x"}

    def save_best(self, directory, provenance):
        checkpoint.save_model(directory, self.variables, arch=tiny_net.NAME, class_names=["a", "b"],
                              provenance=provenance, image_size=32)

    def open(self) -> engine.store.RunStore:
        return engine.store.RunStore(self.workdir, self.run_meta)

    def end(self, store, epoch: int, acc: float = 0.5) -> None:
        store.end_epoch(epoch, self.state, _record(epoch, acc), self.save_best)

    def resumed_at(self) -> int:
        """The epoch a new store on the directory resumes after; metrics.json must agree."""
        store = self.open()
        try:
            abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), self.state)
            assert store.restore(abstract) is not None
            history = json.loads((self.workdir / "metrics.json").read_text())["history"]
            assert [r["epoch"] for r in history] == list(range(1, store.start_epoch + 1))
            return store.start_epoch
        finally:
            store.close()


@pytest.fixture
def quiet_check(monkeypatch, capfd):
    """``check()`` asserts that nothing was printed since the fixture started (or since its last
    ``check``): no traceback, no closed-event-loop callback, nothing sent to
    ``sys.unraisablehook``."""
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)

    def check():
        err = capfd.readouterr().err
        assert "Traceback" not in err and "Event loop is closed" not in err and not unraisable, (err, unraisable)

    return check


def _resumes_from(workdir: pathlib.Path, epoch: int) -> str:
    return f"resumes from the last good checkpoint, epoch {epoch} ({workdir / 'checkpoints' / str(epoch - 1)})"


@pytest.mark.parametrize("failing", ["best", "checkpoint", "metrics"])
def test_a_full_disk_is_one_error_naming_path_cause_and_resume_epoch(tiny_registered, small_disk, monkeypatch,
                                                                      quiet_check, failing):
    """The tmpfs fills before epoch 2's best model, checkpoint or metrics.json is written:
    ``StoreWriteError`` names the file, the cause and the checkpoint a re-run resumes from, and
    nothing else is printed (neither orbax's logged tracebacks nor the callbacks of its abandoned
    writes). With room again the run resumes there, metrics.json caught up."""
    disk, filler = small_disk
    if filler is None:
        pytest.skip("needs a tmpfs to fill (mount -t tmpfs: root); the full-disk command test covers the rest")
    epochs = Epochs(disk / "run")
    store = epochs.open()
    epochs.end(store, 0)
    if failing == "metrics":
        write_text_atomic = checkpoint.write_text_atomic

        def filling(path, text):
            fill_disk(filler)
            write_text_atomic(path, text)

        monkeypatch.setattr(checkpoint, "write_text_atomic", filling)
    else:
        fill_disk(filler)
    quiet_check()
    with pytest.raises(engine.store.StoreWriteError) as caught:
        epochs.end(store, 1, acc=0.75 if failing == "best" else 0.5)  # a better val accuracy: a new best model
    store.close()
    quiet_check()
    message = str(caught.value)
    run = epochs.workdir
    target = {"best": run / "best", "metrics": run / "metrics.json"}.get(failing, run / "checkpoints" / "1")
    assert message.startswith(f"cannot write {'metrics.json' if failing == 'metrics' else 'epoch 2'}"), message
    assert f" {target}: No space left on device" in message, message
    kept = 2 if failing == "metrics" else 1
    assert message.endswith(_resumes_from(run, kept)), message
    monkeypatch.undo()
    pathlib.Path(filler).unlink()
    assert epochs.resumed_at() == kept


def test_a_read_only_run_directory_is_one_error_and_resumes_once_writable(tiny_registered, small_disk,
                                                                           quiet_check):
    disk, filler = small_disk
    if filler is None:
        pytest.skip("needs mount (root) for a read-only view")
    epochs = Epochs(disk / "run")
    store = epochs.open()
    epochs.end(store, 0)
    store.close()
    run = str(epochs.workdir)
    subprocess.run(["mount", "--bind", run, run], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", run], check=True)
        with pytest.raises(engine.store.StoreWriteError) as caught:
            epochs.open()
    finally:
        subprocess.run(["umount", run], check=True)
    quiet_check()
    message = str(caught.value)
    assert message.startswith(f"cannot write the run's work directory {run}: Read-only file system"), message
    assert "remount that filesystem writable" in message and message.endswith(_resumes_from(epochs.workdir, 1))
    assert epochs.resumed_at() == 1


# ----------------------------------------------------------------------------- one writer per directory

LOCK_HOLDER = """
import sys, time
from kdjax.engine import lock
held = lock.hold(sys.argv[1], "--out")
print("held", flush=True)
time.sleep(600)
"""


@pytest.fixture
def console_levels():
    """A command sets the ``kdjax`` and ``absl`` loggers' levels: put them back."""
    loggers = [logging.getLogger(name) for name in ("kdjax", "absl")]
    before = [logger.level for logger in loggers]
    yield
    for logger, level in zip(loggers, before):
        logger.setLevel(level)


def test_a_second_writer_stops_naming_the_holder_and_a_dead_holders_lock_is_taken_over(tmp_path, capsys, caplog,
                                                                                       console_levels):
    """Another process holds ``--out``: the command stops before writing anything, in one line
    that names the holder (pid, host, start time) and what to do; so does a run store opened
    there. Killed (SIGKILL: no clean-up), the holder leaves its record but not the lock, and the
    next writer takes it over with a warning naming the dead holder."""
    import kdjax.cli
    from kdjax.engine import lock

    out = tmp_path / "study"
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(out)], stdout=subprocess.PIPE, text=True,
                              env=child_env())
    try:
        assert holder.stdout.readline().strip() == "held"
        assert kdjax.cli.main(["distill", "--out", str(out), "--data_dir", str(tmp_path / "absent")]) == 2
        [line] = capsys.readouterr().err.strip().splitlines()
        assert line.startswith(f"kdjax distill: error: {out} is being written by another kdjax process: "
                               f"pid {holder.pid} on host {socket.gethostname()}, started "), line
        assert "Wait for it to finish, or stop it" in line and f"delete {out / lock.LOCK_FILE} and re-run" in line
        assert sorted(p.name for p in out.iterdir()) == [lock.LOCK_FILE]  # nothing written
        run_meta = {"config": V0_CONFIG.to_json()}
        with pytest.raises(lock.DirectoryLockedError, match=f"pid {holder.pid} on host"):
            engine.store.RunStore(out, run_meta)
    finally:
        holder.kill()
        holder.wait()
    caplog.set_level(logging.WARNING, logger="kdjax.engine.lock")
    with lock.hold(out, "--out"):
        [taken] = [r.getMessage() for r in caplog.records if r.name == "kdjax.engine.lock"]
        assert taken.startswith(f"taking over the lock of --out {out} left by pid {holder.pid} on host "), taken
        assert taken.endswith(", which no longer runs"), taken
        with lock.hold(out, "the run"):  # this process holds it already: a no-op
            pass
        with open(out / lock.LOCK_FILE) as f, pytest.raises(BlockingIOError):  # held against any other open
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    assert (out / lock.LOCK_FILE).read_text() == ""  # released cleanly: nothing to take over


@pytest.mark.parametrize("error, says", [
    (PermissionError(13, "Permission denied"), "Permission denied. Nothing saved before is lost: give this user "
                                               "write permission there, then re-running"),
    # orbax's wording of a TensorStore write that failed
    (ValueError("RESOURCE_EXHAUSTED: Error writing \"x\" in OCDBT database [os_error_code='28'] [spec=...]"),
     "No space left on device, "),
])
def test_a_disk_error_in_any_wording_becomes_a_store_write_error(tmp_path, error, says):
    with pytest.raises(engine.store.StoreWriteError, match=f"^cannot write metrics.json {tmp_path}: ") as caught:
        with engine.writes.writing("metrics.json", tmp_path, lambda: "re-running resumes"):
            raise error
    assert says in str(caught.value) and str(caught.value).endswith("re-running resumes")
    assert caught.value.__cause__ is error


def test_an_error_that_is_not_the_disks_keeps_its_type_and_traceback(tmp_path):
    with pytest.raises(KeyError):
        with engine.writes.writing("metrics.json", tmp_path, lambda: "re-running resumes"):
            raise KeyError("a bug")
