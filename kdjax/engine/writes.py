"""Writes into a run's directory that fail because of the disk (no space, no permission, a
read-only filesystem), turned into one line that names the path, the cause and the epoch a re-run
resumes from (``writing``), and orbax quietened while the store calls it (``orbax_quiet``).

Where orbax's noise comes from: its async writer awaits ``asyncio.gather``, which stops at the
first failed write, and closes its event loop; TensorStore finishes the other writes later and
calls back into the closed loop, each callback a bare traceback on ``sys.unraisablehook``; orbax
also logs every failed thread and commit with a traceback, and asyncio reports the abandoned
tasks when they are collected. ``orbax_quiet`` holds orbax's ERROR records back while a call runs
(emitting them if it succeeds), waits for orbax's remaining threads after a failure and drops only
those closed-loop callbacks and asyncio's reports of orbax tasks; ``--verbose`` shows everything.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import pathlib
import re
import shutil
import sys
import threading
import time
import traceback
from typing import Callable, Iterator


class StoreWriteError(OSError):
    """A write into a run's work directory failed (no space, no permission, a read-only
    filesystem); the message names the path, the cause and the epoch a re-run resumes from."""



# errors of the disk rather than of the program: a write that fails with one of them is reported
# in one line (``StoreWriteError``); any other error keeps its traceback
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EROFS, errno.EIO}
_ERRNO_IN_TEXT = re.compile(r"os_error_code='?(\d+)|\[Errno (\d+)\]")  # TensorStore's, Python's


def write_errno(err: BaseException) -> int | None:
    """The disk error behind ``err`` (an ``OSError``, or orbax's ``ValueError`` carrying
    TensorStore's ``os_error_code``), searched through its causes; None when there is none."""
    seen, stack = set(), [err]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        code = e.errno if isinstance(e, OSError) else None
        if code is None and (m := _ERRNO_IN_TEXT.search(str(e))):
            code = int(m.group(1) or m.group(2))
        if code in WRITE_ERRNOS:
            return code
        stack += [e.__cause__, e.__context__]
    return None


_ROOM = "make room on that disk (or move the folder to one with room)"
_WRITABLE = "remount that filesystem writable (or move the folder to a writable one)"
_ADVICE = {errno.ENOSPC: _ROOM, errno.EDQUOT: _ROOM, errno.EROFS: _WRITABLE,
           errno.EFBIG: "lift the file-size limit (ulimit -f) or move the folder to a filesystem for larger files",
           errno.EACCES: "give this user write permission there", errno.EPERM: "give this user write permission there"}


def _free_space(path: pathlib.Path) -> str:
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return f", {shutil.disk_usage(path).free / 2**20:.1f} MiB free there"
    except OSError:
        return ""


_TENSORSTORE_SPEC = re.compile(r"\s*\[tensorstore_spec=.*?\]'?\]?$|\s*\[os_error_code=[^]]*\]")


def brief(err: BaseException, limit: int = 300) -> str:
    """``err`` in a few words, on one line: the first cause it was raised from (orbax wraps
    TensorStore's message in one that points at a spec dump of several hundred lines), its type
    and the start of its message without the spec."""
    while err.__cause__ is not None:
        err = err.__cause__
    text = _TENSORSTORE_SPEC.sub("", " ".join(str(err).split()))
    return f"{type(err).__name__}: {text[:limit] + '...' if len(text) > limit else text}"


def _orbax_failure_report(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname


def _closed_loop_callback(unraisable) -> bool:
    """An orbax write or read that fails ends the event loop it ran in while TensorStore still
    completes its other pending operations; each completion then calls ``call_soon_threadsafe``
    on the closed loop, and the ``RuntimeError('Event loop is closed')`` lands in
    ``sys.unraisablehook`` (one traceback per array). Nothing waits on that loop any more."""
    exc, tb = unraisable.exc_value, unraisable.exc_traceback
    return (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed" and tb is not None
            and any(frame.name == "call_soon_threadsafe" for frame in traceback.extract_tb(tb)))


def _abandoned_orbax_task(record: logging.LogRecord) -> bool:
    """asyncio's report of an orbax task or future that a failed operation left behind ("Task
    exception was never retrieved", logged whenever it is garbage-collected): orbax's code is in
    the message or in the traceback of its exception."""
    orbax = f"{os.sep}orbax{os.sep}"
    tb = record.exc_info[1].__traceback__ if record.exc_info and record.exc_info[1] is not None else None
    files = traceback.extract_tb(tb) if tb is not None else []
    return record.levelno >= logging.ERROR and (orbax in record.getMessage() or any(orbax in f.filename for f in files))


def _ignore_abandoned_work() -> Callable[[], None]:
    """Drop the traces of orbax work that a failed operation abandoned (``_closed_loop_callback``,
    ``_abandoned_orbax_task``) from now on; returns the function that stops dropping them."""
    previous = sys.unraisablehook

    def hook(unraisable):
        if not _closed_loop_callback(unraisable):
            previous(unraisable)

    def drop(record: logging.LogRecord) -> bool:
        return not _abandoned_orbax_task(record)

    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(drop)

    def stop():
        logging.getLogger("asyncio").removeFilter(drop)
        if sys.unraisablehook is hook:
            sys.unraisablehook = previous

    return stop


def _join_orbax_threads(timeout: float = 30.0) -> None:
    """Wait for orbax's operation threads that still run (those it started meanwhile included):
    when one write of a save fails, orbax raises in the waiting thread while the save's other
    threads go on to fail and log it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        running = [t for t in threading.enumerate() if t is not threading.current_thread()
                   and type(t).__module__.startswith("orbax.") and t.is_alive()]
        if not running:
            return
        for thread in running:
            try:
                thread.join(max(0.0, deadline - time.monotonic()))
            except Exception:  # noqa: BLE001 -- orbax's join raises the thread's error: the one reported
                pass


@contextlib.contextmanager
def orbax_quiet() -> Iterator[None]:
    """While the store writes or reads through orbax: orbax's ERROR reports (absl records with
    tracebacks, from its writer threads) are held back, and emitted after all if the operation
    succeeds; when it fails, the exception that reaches the store says it, in one line, once
    orbax's threads of the operation have ended (``_join_orbax_threads``). The traces of the work
    a failed operation abandons (``_ignore_abandoned_work``) are dropped, and keep being dropped
    afterwards: TensorStore's own threads and the garbage collector may report them any time.
    With ``--verbose`` (the ``kdjax`` logger at DEBUG) everything is shown."""
    if logging.getLogger("kdjax").isEnabledFor(logging.DEBUG):
        yield
        return
    held: list[logging.LogRecord] = []

    def hold(record: logging.LogRecord) -> bool:
        if _orbax_failure_report(record):
            held.append(record)
            return False
        return True

    absl = logging.getLogger("absl")
    absl.addFilter(hold)
    stop_ignoring = _ignore_abandoned_work()
    failed = True
    try:
        yield
        failed = False
    except Exception:  # not on Ctrl-C: that stops at once
        _join_orbax_threads()
        raise
    finally:
        absl.removeFilter(hold)
        if not failed:
            stop_ignoring()
            for record in held:
                absl.handle(record)


@contextlib.contextmanager
def writing(what: str, target: pathlib.Path, resume: Callable[[], str]) -> Iterator[None]:
    """Write ``what`` at ``target``: a disk error (``WRITE_ERRNOS``) becomes one
    ``StoreWriteError`` that names both, the cause and ``resume()`` (what re-running does)."""
    try:
        with orbax_quiet():
            yield
    except Exception as err:
        code = write_errno(err)
        if code is None:
            raise
        free = _free_space(target) if code in (errno.ENOSPC, errno.EDQUOT) else ""
        raise StoreWriteError(
            f"cannot write {what} {target}: {os.strerror(code)}{free}. Nothing saved before is lost: "
            f"{_ADVICE.get(code, 'check that disk')}, then {resume()}") from err
