"""Oona fixtures: a client factory on the per-test Redis database."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from oona_helpers import SECRET, make_config

from esper.oona import OonaClient
from esper.security.signing import KeyRing


@pytest.fixture
def keyring() -> KeyRing:
    return KeyRing(SECRET)


@pytest.fixture
async def make_client(redis_url: str, keyring: KeyRing) -> AsyncIterator[Callable[..., OonaClient]]:
    """``make_client(instance="a-0", **config overrides)``; every client is closed afterwards."""
    clients: list[OonaClient] = []

    def factory(url: str | None = None, ring: KeyRing | None = None, **overrides: Any) -> OonaClient:
        client = OonaClient(url or redis_url, make_config(**overrides), ring or keyring)
        clients.append(client)
        return client

    yield factory
    for client in clients:
        await client.aclose()
