"""The platform's one way to hide credentials in URLs before they leave the process.

Redis and database URLs may carry a password (``redis://:pw@host:6379/0``,
``postgresql://user:pw@db/esper``, ``...?password=pw``). Anything that is
printed, logged, put in telemetry or served on a status page goes through
:func:`mask_url` first; the logging set-up and the status pages apply
:func:`mask_data` to every field they render (tracebacks and the repr of
any object included) as a last line of defence.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

MASK = "***"
# scheme://user:password@host -- the user part may be empty and holds no ':', '/', '@' or space; the
# password runs to the last '@' before the next '/' or space (an unescaped '@' in a password is
# common, and clients split the authority at its last '@' too). The scheme is at most 32
# characters so that hostile text (a long "a.a.a..." run) is scanned in linear time.
_USERINFO = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.\-]{0,31}://[^\s:/@]*):(?P<password>[^\s/]+)@")
# redis://secret@host: Redis clients read a lone user part as a user name, but people write a
# password there too (some clients take it as one), so for Redis URLs it is hidden as well (up to
# the last '@', as a password is).
_LONE_REDIS_USER = re.compile(
    r"(?P<head>\b(?:redis|rediss|valkey|valkeys|unix|redis\+sentinel|redis\+cluster)://)[^\s:/]+@",
    re.IGNORECASE,
)
_QUERY = re.compile(r"(?P<head>[?&](?:password|passwd|pwd)=)(?P<password>[^&#\s]+)", re.IGNORECASE)


def mask_url(text: str) -> str:
    """``text`` with the password of every URL in it replaced by ``***``.

    A Redis URL's lone user part (``redis://secret@host``) is hidden too.

    Works on a bare URL (``redis://:***@127.0.0.1:6379/0``) and on free text
    that mentions URLs (an exception message, a traceback). Text without
    credentials is returned unchanged.
    """
    if "@" not in text and "=" not in text:
        return text
    masked = _USERINFO.sub(lambda m: f"{m['head']}:{MASK}@", text)
    masked = _LONE_REDIS_USER.sub(lambda m: f"{m['head']}{MASK}@", masked)
    return _QUERY.sub(lambda m: f"{m['head']}{MASK}", masked)


def mask_data(value: Any, render: Callable[[object], str] = repr) -> Any:
    """``value`` with :func:`mask_url` applied to every string in it, structure kept.

    For data about to be serialised (a log event, a status page): dicts
    (keys and values), lists and tuples are walked; numbers, booleans and
    ``None`` pass through; any other object is replaced by its masked
    rendering (``render``, ``repr`` by default), since its repr or str is what
    a serialiser would otherwise print unmasked. Masking values one by one,
    not the serialised text, keeps JSON valid whatever a password contains.
    """
    if isinstance(value, str):
        return mask_url(value)
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, dict):
        return {mask_data(k, render): mask_data(v, render) for k, v in value.items()}
    if isinstance(value, tuple) and not hasattr(value, "_fields"):  # a namedtuple is shown as a list
        return tuple(mask_data(v, render) for v in value)
    if isinstance(value, list | tuple):
        return [mask_data(v, render) for v in value]
    return mask_url(render(value))
