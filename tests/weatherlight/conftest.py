"""Fixtures for the service process tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from _process_support import SCRIPT, Service


@pytest.fixture
def start_service(tmp_path: Path) -> Iterator[Callable[..., Service]]:
    started: list[Service] = []

    def start(env: dict[str, str], *args: str, argv: list[str] | None = None) -> Service:
        service = Service(argv or [SCRIPT, *args], env, tmp_path)
        started.append(service)
        return service

    yield start
    for service in started:
        service.kill()
