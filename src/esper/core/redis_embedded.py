"""The service's embedded bus server (no ``REDIS_URL``): where it lives and how tools find it.

Why kept files: the port and a generated password are chosen once and kept
under ``<var_dir>/redis/`` (the password with mode 0600, the directory 0700
because it holds the password and the bus's data), so a restart reuses the
same URL and any tool pointed at the var dir (:func:`embedded_url`) finds
the bus without configuration.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from pathlib import Path

from esper.core.files import write_atomic
from esper.core.ports import free_port
from esper.core.redis_options import RedisServerError, ServerOptions

EMBEDDED_DIR = "redis"
PORT_FILE = "port"
PASSWORD_FILE = "password"


def embedded_options(var_dir: Path, *, max_bulk_bytes: int | None = None) -> ServerOptions:
    """Options for the service's private bus server under ``<var_dir>/redis``."""
    data_dir = Path(var_dir) / EMBEDDED_DIR
    data_dir.mkdir(parents=True, exist_ok=True)
    data_dir.chmod(0o700)
    port = int(_kept(data_dir / PORT_FILE, lambda: str(free_port()), mode=0o644, valid=_is_port))
    password = _kept(data_dir / PASSWORD_FILE, lambda: secrets.token_urlsafe(32), mode=0o600, valid=_is_token)
    return ServerOptions(
        data_dir=data_dir, port=port, append_only=True, password=password, max_bulk_bytes=max_bulk_bytes
    )


def embedded_url(var_dir: Path, host: str = "127.0.0.1") -> str:
    """The embedded server's URL, password included, for tools that must find the bus.

    Raises ``RedisServerError`` when the service never started one in ``var_dir``.
    """
    data_dir = Path(var_dir) / EMBEDDED_DIR
    try:
        port = int((data_dir / PORT_FILE).read_text().strip())
        password = (data_dir / PASSWORD_FILE).read_text().strip()
    except (FileNotFoundError, ValueError) as exc:
        raise RedisServerError(f"no embedded server has been set up under {data_dir}") from exc
    return ServerOptions(data_dir=data_dir, port=port, host=host, password=password).url


def _is_port(text: str) -> bool:
    return text.isdigit() and 0 < int(text) < 65536


def _is_token(text: str) -> bool:
    return bool(text) and not any(c.isspace() or c in '"@/:' for c in text)


def _kept(path: Path, make: Callable[[], str], *, mode: int, valid: Callable[[str], bool]) -> str:
    """The value stored in ``path``, or a new one written there (atomically, with ``mode``)."""
    try:
        value = path.read_text().strip()
    except FileNotFoundError:
        value = ""
    if not valid(value):
        value = make()
        write_atomic(path, f"{value}\n".encode(), mode=mode)
    path.chmod(mode)
    return value
