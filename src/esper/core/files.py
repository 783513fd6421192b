"""Durable file replacement: write a temp file, fsync, rename, fsync the directory.

Urza artifacts, Tamiyo policies and field reports, and Tolaria checkpoints
must all be found intact after a crash. ``os.replace`` is atomic, so readers
see the old file or the new one, never a mix; but the new content is only on
disk once the temp file is fsynced *before* the rename, and the rename itself
only once the directory entry is flushed *after* it. That dance lives here
once so every caller gets all four steps.

The temp file sits in the target's directory (a rename across file systems
is not atomic) under a unique name ``<temp_prefix><name>.<random>.tmp``, so
concurrent writers of the same path never share a temp file; callers that
sweep stale temp files pick their own ``temp_prefix``.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

_OPEN_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)


def fsync_directory(path: Path) -> None:
    """Flush a directory entry so a rename or create inside it survives a crash.

    A no-op where directories cannot be opened or fsynced (e.g. Windows, some
    network file systems): the file data itself is already durable then.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - file systems that refuse directory fsync
        pass
    finally:
        os.close(fd)


def write_atomic_with(
    path: Path,
    writer: Callable[[BinaryIO], object],
    *,
    temp_prefix: str = ".",
    mode: int = 0o666,
    replace: bool = True,
) -> None:
    """Replace ``path`` with whatever ``writer`` writes into the open binary file.

    For producers that stream into a file object (``torch.save``). If
    ``writer`` raises, the temp file is removed and ``path`` is untouched.
    ``mode`` is the permission of the new file before the umask. With
    ``replace=False`` an existing ``path`` is never touched: the complete
    file is hard-linked into place, which fails with ``FileExistsError`` if
    ``path`` exists (atomically: two racing writers cannot both win).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"{temp_prefix}{path.name}.{uuid.uuid4().hex}.tmp"
    fd = os.open(tmp, _OPEN_FLAGS, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            writer(handle)
            handle.flush()
            os.fsync(handle.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
            tmp.unlink()
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_directory(path.parent)


def write_atomic(
    path: Path, data: bytes, *, temp_prefix: str = ".", mode: int = 0o666, replace: bool = True
) -> None:
    """Replace ``path`` with ``data``: readers see the old or the new file, never a mix."""
    write_atomic_with(
        path, lambda handle: handle.write(data), temp_prefix=temp_prefix, mode=mode, replace=replace
    )
