"""A server left behind by a crashed run: found through its pidfile, checked, stopped.

Why the checks: a pidfile outlives its process and pids are recycled, so
the pid in ``<data_dir>/server.pid`` is only trusted when
``/proc/<pid>/cmdline`` names a Redis-protocol server on our port and its
working directory (or ``--dir``) is our data dir; anything else is left
alone. A port still held after that belongs to someone else, which is a
clear error naming the port instead of the server's raw ``bind`` failure.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from esper.core.logs import get_logger
from esper.core.ports import port_in_use
from esper.core.processes import terminate
from esper.core.redis_options import SERVER_NAMES, RedisServerError

PIDFILE = "server.pid"
_log = get_logger("esper.core.redis_server")


def stale_server_pid(data_dir: Path, port: int) -> int | None:
    """The pid in ``data_dir``'s pidfile if it is a live Redis-protocol server on ``port`` in that dir."""
    try:
        pid = int((data_dir / PIDFILE).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    proc = Path(f"/proc/{pid}")
    try:
        argv = (proc / "cmdline").read_bytes().split(b"\0")
        cwd = os.readlink(proc / "cwd")
    except OSError:
        return None  # gone, or not ours to inspect
    if not argv or Path(argv[0].decode(errors="replace").split(" ")[0]).name not in SERVER_NAMES:
        return None
    text = b" ".join(argv).decode(errors="replace")
    on_port = f":{port}" in text or f"--port {port}" in text
    in_dir = Path(cwd) == data_dir.resolve() or f"--dir {data_dir}" in text
    return pid if on_port and in_dir else None


def clear_stale(data_dir: Path, host: str, port: int) -> None:
    """Stop a server of ours left by a crashed run; refuse a port held by anything else."""
    data_dir.mkdir(parents=True, exist_ok=True)
    stale = stale_server_pid(data_dir, port)
    if stale is not None:
        _log.warning("stopping a server left by an earlier run", pid=stale, port=port, data_dir=str(data_dir))
        if not terminate(stale, 10.0):
            _log.warning("the server left by an earlier run ignored SIGTERM: killed", pid=stale)
    with contextlib.suppress(FileNotFoundError):
        (data_dir / PIDFILE).unlink()
    if port_in_use(host, port):
        raise RedisServerError(
            f"cannot start the server for {data_dir}: port {host}:{port} is in use by another process"
        )


def forget_pid(data_dir: Path, pid: int) -> None:
    """Remove the pidfile if it still names ``pid`` (a newer server's file is left alone)."""
    pidfile = data_dir / PIDFILE
    with contextlib.suppress(FileNotFoundError, ValueError):
        if int(pidfile.read_text().strip()) == pid:
            pidfile.unlink()
