"""Untrusted text is rendered for logs short, printable and with its true length."""

from __future__ import annotations

import pytest

from esper.core.untrusted import ID_LIMIT, bounded


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("request-1", "request-1"),
        ("", ""),
        (None, ""),
        ("a\nb\rc\td", "a\\x0ab\\x0dc\\x09d"),
        ("\x1b[2J", "\\x1b[2J"),
        ("right\u202etxt.exe", "right\\u202etxt.exe"),  # a bidi override cannot reorder the line
        ("naïve-ид", "naïve-ид"),  # printable non-ASCII is kept
        (b"bytes\xff\x00", "bytes\\xff\\x00"),
        ("see redis://:pw@h:1/0", "see redis://:***@h:1/0"),
    ],
)
def test_rendering(raw: str | bytes | None, shown: str) -> None:
    assert bounded(raw) == shown


def test_long_values_are_cut_and_their_length_given() -> None:
    huge = "x" * 1_000_000
    shown = bounded(huge)
    assert shown == "x" * ID_LIMIT + "...[1000000 chars]"
    assert bounded(b"y" * 5000, limit=10) == "y" * 10 + "...[5000 bytes]"


def test_escapes_count_towards_the_limit() -> None:
    shown = bounded("\n" * 1000, limit=20)
    assert shown == "\\x0a" * 5 + "...[1000 chars]"


def test_a_password_cut_off_by_the_limit_is_still_masked() -> None:
    shown = bounded("redis://:" + "p" * 200 + "@host/0", limit=40)
    assert "ppp" not in shown
    assert shown.startswith("redis://:***@host/0")
