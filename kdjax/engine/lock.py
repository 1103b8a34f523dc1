"""One writer per directory: a lock file that the kernel releases when its holder dies.

A study's ``--out`` (``kdjax.cli``) and each run's work directory (``kdjax.engine.store``) are
written by one process at a time. ``hold(directory)`` takes ``DIRECTORY/.kdjax.lock`` with
``fcntl.flock`` and writes its holder into it (pid, host, start time, command), so a second
writer stops at once with a message that names the holder and what to do.

- The kernel drops the lock when the holder's process ends, however it ends (SIGKILL
  included), so a crashed study never blocks the next one. A clean release empties the file; a
  file that still names a holder while nobody holds its lock was left by a process that died,
  and the next writer takes it over with a one-line warning.
- In a multi-process run process 0 takes the locks; the others write only what it coordinates.
- A process may take a lock it already holds (``kdjax teacher`` locks ``--out``, which is also
  its run's work directory): the inner hold is a no-op, the outer one releases.
- Nothing reads the lock file but this module; it sits in the directory it guards, never in a
  data tree.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import logging
import os
import pathlib
import socket
import sys
import time

LOCK_FILE = ".kdjax.lock"

_LOG = logging.getLogger(__name__)


class DirectoryLockedError(OSError):
    """Another process writes the directory; the message names it and what to do."""


@dataclasses.dataclass(frozen=True)
class Holder:
    """Who holds (or held) a lock, as its lock file records it."""

    pid: int
    host: str
    started: str
    command: str = ""

    @classmethod
    def of_this_process(cls) -> "Holder":
        return cls(pid=os.getpid(), host=socket.gethostname(), started=time.strftime("%Y-%m-%d %H:%M:%S %z"),
                   command=" ".join(sys.argv)[:300])

    @classmethod
    def parse(cls, text: str) -> "Holder | None":
        """The holder a lock file names; None for an empty file or one that is not a holder record."""
        try:
            d = json.loads(text)
            return cls(pid=int(d["pid"]), host=str(d["host"]), started=str(d["started"]),
                       command=str(d.get("command", "")))
        except (ValueError, KeyError, TypeError):
            return None

    def describe(self, command: bool = True) -> str:
        what = f" ({self.command})" if command and self.command else ""
        return f"pid {self.pid} on host {self.host}, started {self.started}{what}"

    def is_this_process(self) -> bool:
        return self.pid == os.getpid() and self.host == socket.gethostname()

    def runs_here(self) -> bool | None:
        """Whether the holder's process still exists (None: it ran on another host)."""
        if self.host != socket.gethostname():
            return None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # another user's process
            return True
        return True


class DirectoryLock:
    """A held lock on a directory; ``release`` (or leaving its ``with`` block) gives it back."""

    def __init__(self, path: pathlib.Path, fd: int | None):
        self.path = path
        self._fd = fd  # None: held by an outer hold of this process, or not lockable here

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)  # an empty file: released cleanly, nothing to take over
        except OSError:
            pass
        finally:
            os.close(fd)  # closing the last descriptor drops the flock

    def __enter__(self) -> "DirectoryLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _read(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", "replace")


def _refusal(directory: pathlib.Path, path: pathlib.Path, holder: Holder | None) -> DirectoryLockedError:
    who = holder.describe() if holder is not None else "a process that has not written its name yet"
    if holder is not None and holder.runs_here() is False:  # a process it forked keeps the lock
        who += ", which has ended, but a process it started still holds the lock"
    return DirectoryLockedError(
        f"{directory} is being written by another kdjax process: {who}. Wait for it to finish, or stop it; "
        f"if that process is gone (e.g. on another host), delete {path} and re-run")


def hold(directory: str | os.PathLike, what: str = "directory") -> DirectoryLock:
    """Take ``directory``'s lock (creating the directory), or raise ``DirectoryLockedError``
    naming its holder. ``what`` names the directory in the takeover warning (``--out``, a run)."""
    directory = pathlib.Path(directory).absolute()
    path = directory / LOCK_FILE
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise OSError(f"cannot create the lock file {path}: {err.strerror or err}; {directory} must be a "
                      f"writable folder (free space, write permission)") from err
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = Holder.parse(_read(fd))
        os.close(fd)
        if holder is not None and holder.is_this_process():
            return DirectoryLock(path, None)  # an outer hold of this process releases it
        raise _refusal(directory, path, holder) from None
    except OSError as err:
        os.close(fd)
        if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
        _LOG.warning("%s: this filesystem cannot lock files (%s); a second process writing %s would not be "
                     "noticed", path, os.strerror(err.errno), directory)
        return DirectoryLock(path, None)
    try:
        left = Holder.parse(_read(fd))
        if left is not None:
            alive = left.runs_here()
            state = "which no longer runs" if alive is False else "which no longer holds it"
            _LOG.warning("taking over the lock of %s %s left by %s, %s", what, directory, left.describe(False), state)
        record = json.dumps(dataclasses.asdict(Holder.of_this_process())) + "\n"
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, record.encode(), 0)
        except OSError:  # a full disk: the lock holds all the same, unnamed (a later write will report it)
            pass
    except BaseException:
        os.close(fd)
        raise
    return DirectoryLock(path, fd)
