"""One real platform per test module that asks for it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from _platform_support import platform_env, running_platform


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The environment of a running Weatherlight on its own embedded server (fresh var dir)."""
    root = Path(tmp_path_factory.mktemp("platform"))
    env = platform_env(root)
    with running_platform(root, env):
        yield env
