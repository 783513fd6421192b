"""One service per var dir: an ``flock``-held lock file that names its holder.

Why flock: the kernel drops the lock when the holding process dies, however
it dies (``kill -9`` included), so a crashed service never blocks the next
start and no stale-lock clean-up is ever needed. The file's content (the
holder's pid) is only for the message a second start prints. The lock's file
descriptor is close-on-exec, so child processes (the embedded server) never
inherit it and cannot keep it held after the service is gone.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path
from types import TracebackType

LOCK_NAME = "weatherlight.lock"


class AlreadyRunning(RuntimeError):
    """Another live process holds the lock for this var dir."""

    def __init__(self, var_dir: Path, pid: int | None) -> None:
        self.var_dir = var_dir
        self.pid = pid
        who = f"pid {pid}" if pid is not None else "pid unknown"
        super().__init__(f"already running, {who} (holds {Path(var_dir) / LOCK_NAME})")


class InstanceLock:
    """``acquire()`` or raise :class:`AlreadyRunning`; ``release()`` (or process exit) frees it."""

    def __init__(self, var_dir: Path) -> None:
        self.var_dir = Path(var_dir)
        self.path = self.var_dir / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        if self._fd is not None:
            return
        self.var_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            raise AlreadyRunning(self.var_dir, pid) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.ftruncate(fd, 0)  # the file stays (unlinking would race a concurrent acquire)
            os.close(fd)  # closing the last descriptor drops the flock

    def __enter__(self) -> InstanceLock:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def ensure_free(var_dir: Path) -> None:
    """Raise :class:`AlreadyRunning` when a live service holds ``var_dir``'s lock.

    A probe for ``--check``: it takes the lock for an instant when it is free
    and never creates the var dir. ``OSError`` when the lock file could not be
    used (the var dir is a file, or the lock path is not a regular file).
    """
    path = Path(var_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EISDIR, "not a regular file", str(path))
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AlreadyRunning(Path(var_dir), _read_pid(fd)) from None
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None
