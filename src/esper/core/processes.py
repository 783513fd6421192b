"""Ending and awaiting processes without polling, and children that die with their owner.

Why pidfds: a pid can be waited on by anyone (child or not, e.g. an orphan
from a crashed run) through ``pidfd_open``, which becomes readable when the
process exits, so neither the event loop nor a thread ever polls
``waitpid``. Why ``PR_SET_PDEATHSIG``: a private server must not outlive the
process that started it, even after kill -9. Linux sends that signal when
the *thread* that forked the child ends, so fork from the main or
event-loop thread, never from a worker thread that may go away.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import select
import signal

_PR_SET_PDEATHSIG = 1


def terminate(pid: int, timeout_s: float) -> bool:
    """SIGTERM, SIGKILL after ``timeout_s``; returns once the process is gone (child or not).

    SIGCONT follows the SIGTERM: a stopped process (``kill -STOP``, a frozen
    container) acts on nothing until it runs again, and would otherwise cost
    the whole timeout. True when SIGTERM was enough, False when it took SIGKILL.
    """
    try:
        os.kill(pid, signal.SIGTERM)
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        return True
    if wait_exit_sync(pid, timeout_s):
        return True
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    wait_exit_sync(pid, 5.0)
    return False


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        return None


def wait_exit_sync(pid: int, timeout_s: float) -> bool:
    """True once ``pid`` has exited (a zombie counts), False after ``timeout_s``; blocks the thread."""
    fd = _pidfd(pid)
    if fd is None:
        return True
    try:
        readable, _, _ = select.select([fd], [], [], timeout_s)
        return bool(readable)
    finally:
        os.close(fd)


async def await_exit(pid: int, timeout_s: float | None) -> bool:
    """True once ``pid`` has exited (a zombie counts), False after ``timeout_s``."""
    fd = _pidfd(pid)
    if fd is None:
        return True
    loop = asyncio.get_running_loop()
    exited = loop.create_future()
    loop.add_reader(fd, _resolve, exited)
    try:
        await asyncio.wait_for(exited, timeout_s)
        return True
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(fd)
        os.close(fd)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


_libc: ctypes.CDLL | None = None


def die_with(parent: int) -> None:
    """A ``preexec_fn``: in the forked child, before exec, take SIGTERM when the forking thread ends."""
    assert _libc is not None
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # the owner died before the prctl took effect
        os._exit(1)


if hasattr(os, "pidfd_open"):  # Linux: load libc in the parent, never after fork
    _libc = ctypes.CDLL(None, use_errno=True)
