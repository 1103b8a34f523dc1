"""TensorBoard event files of runs, written as each epoch ends and read back, without TensorFlow
(tensorboardX's protos and record framing).

Inputs are the per-epoch records ``kdjax.engine`` writes (``kdjax.report``'s ``Record``). The
writers write only under the paths they are given, so the caller decides which process writes
(process 0 when multi-host). tensorboardX is imported only inside the functions that need it.
"""

from __future__ import annotations

import os
import pathlib
import socket
import struct
import sys
import time

from kdjax.report import History, Record


def record_scalars(record: Record) -> dict[str, float]:
    """A record's scalars by TensorBoard tag: ``lr``, ``seconds``, ``train/<k>``, ``val/<k>`` and,
    with an EMA student, ``val_ema/<k>``."""
    tags = {"lr": float(record["lr"])}
    if "seconds" in record:
        tags["seconds"] = float(record["seconds"])
    for phase in ("train", "val", "val_ema"):
        for k, v in record.get(phase, {}).items():
            tags[f"{phase}/{k}"] = float(v)
    return tags


def _tensorboardx():
    """tensorboardX's record writer and event protos, imported without torch: tensorboardX imports
    torch when it is installed, only to recognise its tensors, which kdjax never passes (seconds of
    start-up; benchmarks/README.md). A torch the program already imported is left as it is."""

    def load():
        try:
            from tensorboardX import RecordWriter
            from tensorboardX.proto import event_pb2, summary_pb2
        except ImportError as e:
            raise ImportError("kdjax.events needs tensorboardX: pip install tensorboardX") from e
        return RecordWriter, event_pb2, summary_pb2

    if "torch" in sys.modules or "tensorboardX" in sys.modules:
        return load()
    sys.modules["torch"] = None  # makes `import torch` raise ImportError, which tensorboardX handles
    try:
        return load()
    finally:
        del sys.modules["torch"]


def _event_file_name(logdir: pathlib.Path) -> pathlib.Path:
    """A new ``events.out.tfevents.<ns>.<host>`` in ``logdir``. TensorBoard reads a directory's
    files in name order and a restart marker purges what it read before, so names must sort in
    the order they were opened: a nanosecond stamp does, also after tensorboardX's second-stamped
    names of the same second; tensorboardX's own names collide within a second and overwrite."""
    host = socket.gethostname()
    ns = time.time_ns()
    while (path := logdir / f"events.out.tfevents.{ns}.{host}").exists():
        ns += 1
    return path


class TensorBoardWriter:
    """TensorBoard event files for one run under ``logdir`` (tensorboardX's protos and record
    framing; no TensorFlow).

    The step of every scalar is the 1-based epoch. Writes are synchronous: after ``flush`` a
    reader sees every record written so far (tensorboardX's ``SummaryWriter`` hands events to a
    background thread, and its ``flush`` does not wait for them). When resuming a run, pass
    ``purge_step=<first epoch about to be written>``: it writes a restart marker, so TensorBoard
    discards the earlier attempt's events from that epoch on instead of drawing them twice.
    """

    def __init__(self, logdir: str | os.PathLike, purge_step: int | None = None):
        RecordWriter, self._event_pb2, self._summary_pb2 = _tensorboardx()
        self.logdir = pathlib.Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        self._file = RecordWriter(str(_event_file_name(self.logdir)))
        self._write(self._event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))
        if purge_step is not None:
            start = self._event_pb2.SessionLog(status=self._event_pb2.SessionLog.START)
            self._write(self._event_pb2.Event(wall_time=time.time(), step=int(purge_step), session_log=start))

    def _write(self, event) -> None:
        self._file.write(event.SerializeToString())

    def write_record(self, record: Record) -> None:
        """One event at step ``record["epoch"]`` holding every scalar of ``record_scalars``."""
        Summary = self._summary_pb2.Summary
        values = [Summary.Value(tag=tag, simple_value=value) for tag, value in record_scalars(record).items()]
        self._write(self._event_pb2.Event(wall_time=time.time(), step=int(record["epoch"]),
                                          summary=Summary(value=values)))

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> TensorBoardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_tensorboard(
    logdir: str | os.PathLike, history: History, purge_step: int | None = None
) -> pathlib.Path:
    """Write a whole history as one run's events under ``logdir``; return ``logdir``."""
    with TensorBoardWriter(logdir, purge_step=purge_step) as w:
        for record in history:
            w.write_record(record)
    return w.logdir


def read_scalars(logdir: str | os.PathLike, *, purge: bool = True) -> list[tuple[str, int, float]]:
    """The scalars of the event files in ``logdir`` as ``(tag, step, value)``: files in name order
    (TensorBoard's), events in the order written; none when there are no files.

    With ``purge`` the scalars TensorBoard shows: a restart marker at step p (``purge_step``)
    drops the values read before it at steps >= p. Without, every value the files hold. A record
    cut short at a file's end (a crash while writing) ends that file, as in TensorBoard.
    """
    _, event_pb2, _ = _tensorboardx()
    start = event_pb2.SessionLog.START
    scalars: list[tuple[str, int, float]] = []
    for path in sorted(pathlib.Path(logdir).glob("*tfevents*")):
        data, pos = path.read_bytes(), 0
        while pos + 12 <= len(data):  # TFRecord: u64 length, u32 crc, data, u32 crc
            (length,) = struct.unpack("<Q", data[pos: pos + 8])
            if pos + 12 + length + 4 > len(data):
                break
            event = event_pb2.Event.FromString(data[pos + 12: pos + 12 + length])
            pos += 12 + length + 4
            if purge and event.HasField("session_log") and event.session_log.status == start:
                scalars = [s for s in scalars if s[1] < event.step]
            scalars += [(v.tag, int(event.step), float(v.simple_value)) for v in event.summary.value]
    return scalars


class EpochEvents:
    """Event files of several runs kept up to date as their epochs end: one ``TensorBoardWriter``
    per run directory, opened at the run's first new record and kept open, flushed after every
    write so that a reader sees an epoch as soon as it is recorded. ``close`` (or leaving the
    ``with`` block) closes them all.
    """

    def __init__(self):
        self._writers: dict[pathlib.Path, TensorBoardWriter] = {}
        self._last: dict[pathlib.Path, int] = {}  # the last epoch each open writer holds

    def write(self, logdir: str | os.PathLike, history: History) -> None:
        """Make the events under ``logdir`` hold each record of ``history`` (a run's records so
        far, in epoch order) once.

        The first call for a directory reads what its files already show (a resumed run's earlier
        attempts), up to epoch m. With m at the history's last epoch L it writes nothing (no new
        file: a finished run keeps its files). Otherwise it opens a writer with ``purge_step =
        min(m, L) + 1``, so TensorBoard drops whatever the earlier files hold from there on
        (points of an attempt that outran its checkpoints), and writes the records after
        ``min(m, L)``: the ones the earlier attempt recorded but had no events for too. Later
        calls write the records after the last one written.
        """
        logdir = pathlib.Path(logdir)
        last = int(history[-1]["epoch"]) if history else 0
        if logdir not in self._writers:
            shown = max((step for _, step, _ in read_scalars(logdir)), default=0)
            if shown == last:
                return
            self._last[logdir] = min(shown, last)
            self._writers[logdir] = TensorBoardWriter(logdir, purge_step=self._last[logdir] + 1)
        writer = self._writers[logdir]
        for record in history:
            if int(record["epoch"]) > self._last[logdir]:
                writer.write_record(record)
        writer.flush()
        self._last[logdir] = max(self._last[logdir], last)

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()
        self._last.clear()

    def __enter__(self) -> EpochEvents:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
