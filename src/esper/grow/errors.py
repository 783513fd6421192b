"""What can stop a model from growing, each with a message that says what to do."""

from __future__ import annotations


class PlatformUnavailable(RuntimeError):
    """No running platform could be used: the message says what to start or what to set."""


class SeedSlotError(ValueError):
    """Seed slots this model cannot use: an unknown layer, a wrong or mixed width, an unused slot."""
