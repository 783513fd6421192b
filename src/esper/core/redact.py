"""The platform's one way to hide credentials in URLs before they leave the process.

Redis and database URLs may carry a password (``redis://:pw@host:6379/0``,
``postgresql://user:pw@db/esper``, ``...?password=pw``). Anything that is
printed, logged, put in telemetry or served on a status page goes through
:func:`mask_url` first; the logging set-up applies it to every rendered
field and traceback as a last line of defence.
"""

from __future__ import annotations

import re

MASK = "***"
# scheme://user:password@host -- the user part may be empty and holds no ':', '/', '@' or space; the
# password runs to the last '@' before the next '/' or space (an unescaped '@' in a password is
# common, and clients split the authority at its last '@' too). The scheme is at most 32
# characters so that hostile text (a long "a.a.a..." run) is scanned in linear time.
_USERINFO = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.\-]{0,31}://[^\s:/@]*):(?P<password>[^\s/]+)@")
_QUERY = re.compile(r"(?P<head>[?&](?:password|passwd|pwd)=)(?P<password>[^&#\s]+)", re.IGNORECASE)


def mask_url(text: str) -> str:
    """``text`` with the password of every URL in it replaced by ``***``.

    Works on a bare URL (``redis://:***@127.0.0.1:6379/0``) and on free text
    that mentions URLs (an exception message, a traceback). Text without
    credentials is returned unchanged.
    """
    if "@" not in text and "=" not in text:
        return text
    masked = _USERINFO.sub(lambda m: f"{m['head']}:{MASK}@", text)
    return _QUERY.sub(lambda m: f"{m['head']}{MASK}", masked)
