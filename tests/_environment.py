"""The environment for a process a test starts: the caller's, without any Esper setting.

Why: a developer's shell or a CI job may export ``REDIS_URL``, a secret or
any ``OONA_*``/``URZA_*`` setting (or run under systemd with ``NOTIFY_SOCKET`` and
``WATCHDOG_USEC``),
and a service started by a test must see only what the test gives it. The
``ESPER_TEST_*`` variables that point the suite at its servers are kept.
"""

from __future__ import annotations

import os

#: Prefixes of every setting the platform reads from the environment.
SETTING_PREFIXES = ("ESPER_", "OONA_", "URZA_", "TAMIYO_", "WEATHERLIGHT_", "KERNEL_", "ESP_", "NISSA_")
_DROPPED = ("REDIS_URL", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def esper_free_env(**extra: str) -> dict[str, str]:
    """``os.environ`` without Esper settings (``ESPER_TEST_*`` kept), then ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not (k.startswith(SETTING_PREFIXES) or k in _DROPPED) or k.startswith("ESPER_TEST_")
    }
    env.update(extra)
    return env
