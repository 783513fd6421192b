"""Errors that end a process with a clear message instead of a traceback."""

from __future__ import annotations


class ConfigError(Exception):
    """Configuration is missing or invalid.

    The message names the offending environment variables but never their
    values, so it is safe to print, log or ship in telemetry even when the
    variable is a secret.
    """

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("invalid configuration: " + "; ".join(self.problems))
