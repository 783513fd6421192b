"""A safe, bounded rendering of text that came from outside (the bus, a request, a file) for logs.

Ids and names read from the wire are chosen by whoever sent them: a 1 MB
``request_id`` would become a 1 MB log line on every retry, and a newline or
an escape sequence inside one could forge log lines or repaint a terminal.
:func:`bounded` keeps the start of the text, escapes everything that is not
printable and says how much was cut, so the log stays one short line per
event and still names the offending value.
"""

from __future__ import annotations

from esper.core.redact import mask_url

#: Characters kept from an untrusted value by default: enough to tell ids apart.
ID_LIMIT = 128
#: Masking looks this far past the cut, so a URL whose password is cut off is still masked.
_MASK_LOOKAHEAD = 512


def bounded(value: str | bytes | bytearray | None, limit: int = ID_LIMIT) -> str:
    """``value`` as at most ``limit`` printable characters, plus its full length when it was cut.

    Control characters, line breaks and other unprintable code points are
    shown as ``\\xNN``/``\\uNNNN`` escapes; bytes are decoded as UTF-8 with
    undecodable bytes escaped; URL passwords are masked. The work done is
    bounded by ``limit``, not by the length of ``value``.
    """
    if value is None:
        return ""
    if isinstance(value, bytes | bytearray):
        total, unit = len(value), "bytes"
        head = bytes(value[: limit + _MASK_LOOKAHEAD]).decode("utf-8", errors="backslashreplace")
    else:
        total, unit = len(value), "chars"
        head = value[: limit + _MASK_LOOKAHEAD]
    out: list[str] = []
    width = 0
    for char in mask_url(head):
        piece = char if char.isprintable() else _escape(char)
        if width + len(piece) > limit:
            return "".join(out) + f"...[{total} {unit}]"
        out.append(piece)
        width += len(piece)
    if len(head) < total:  # only reachable when masking shortened the head
        return "".join(out) + f"...[{total} {unit}]"
    return "".join(out)


def _escape(char: str) -> str:
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"
