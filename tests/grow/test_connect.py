"""Connecting to a platform: each way it can fail says what to start or set, and never shows a secret."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _platform_support import SECRET
from torch import nn

import esper.grow
from esper.core.redis_server import free_port
from esper.core.settings import EsperSettings, load_settings
from esper.tolaria import load_digits_splits


def settings_for(env: dict[str, str], **overrides: object) -> EsperSettings:
    """Settings of a platform environment, given explicitly (nothing read from this process's env)."""
    values: dict[str, object] = {
        "redis_url": env.get("REDIS_URL"),
        "leyline_secret": env["ESPER_LEYLINE_SECRET"],
        "var_dir": env["ESPER_VAR_DIR"],
        "urza_artifact_dir": env["URZA_ARTIFACT_DIR"],
        "urza_database_url": env["URZA_DATABASE_URL"],
    }
    values.update(overrides)
    return load_settings(**values)


def local_settings(tmp_path: Path, **overrides: object) -> EsperSettings:
    values: dict[str, object] = {"leyline_secret": SECRET, "var_dir": tmp_path / "var", "redis_url": None}
    values.update(overrides)
    return load_settings(**values)


async def test_no_platform_found_says_how_to_start_one(tmp_path: Path) -> None:
    with pytest.raises(esper.grow.PlatformUnavailable) as caught:
        async with esper.grow.connect(local_settings(tmp_path)):
            pass
    message = str(caught.value)
    assert "REDIS_URL is not set" in message
    assert "esper-weatherlight-service" in message


async def test_a_missing_secret_is_named_not_shown(tmp_path: Path) -> None:
    with pytest.raises(esper.grow.PlatformUnavailable, match="ESPER_LEYLINE_SECRET"):
        async with esper.grow.connect(local_settings(tmp_path, leyline_secret="")):
            pass


async def test_an_unreachable_bus_is_named_with_its_password_masked(tmp_path: Path) -> None:
    url = f"redis://:hunter2-password@127.0.0.1:{free_port()}/0"
    with pytest.raises(esper.grow.PlatformUnavailable) as caught:
        async with esper.grow.connect(local_settings(tmp_path, redis_url=url)):
            pass
    message = str(caught.value)
    assert "cannot use the platform's bus" in message
    assert "redis://:***@127.0.0.1" in message
    assert "hunter2" not in message
    assert "esper-weatherlight-service" in message


async def test_a_bus_without_weatherlight_is_told_apart(tmp_path: Path, redis_url: str) -> None:
    with pytest.raises(esper.grow.PlatformUnavailable) as caught:
        async with esper.grow.connect(local_settings(tmp_path, redis_url=redis_url), timeout_s=0.5):
            pass
    message = str(caught.value)
    assert "no Weatherlight answered a kernel request" in message
    assert "ESPER_LEYLINE_SECRET" in message


async def test_another_secret_than_the_platforms_is_suspected(platform: dict[str, str]) -> None:
    settings = settings_for(platform, leyline_secret="not-the-platform-secret-0123456789")
    with pytest.raises(esper.grow.PlatformUnavailable) as caught:
        async with esper.grow.connect(settings, timeout_s=2.0):
            pass
    assert "another ESPER_LEYLINE_SECRET" in str(caught.value)
    assert "not-the-platform-secret" not in str(caught.value)


async def test_the_embedded_server_is_found_from_the_var_dir(platform: dict[str, str]) -> None:
    async with esper.grow.connect(settings_for(platform)) as connected:
        assert connected.bus.startswith("redis://:***@127.0.0.1:")


async def test_a_one_epoch_run_explains_why_nothing_was_grafted(platform: dict[str, str]) -> None:
    data = load_digits_splits(seed=0, limit=300)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    async with esper.grow.connect(settings_for(platform)) as connected:
        connected.add_seeds(model, {"0": 32})
        run = await connected.train(
            model, data.train, data.validation, loss=nn.functional.cross_entropy, epochs=1
        )
    assert not run.grafted
    assert "1-epoch run cannot graft" in run.no_graft_reason()
    (result,) = run.results
    assert result.validation_accuracy is not None
    # The controller answered that epoch (and the wait ended on its decision).
    assert result.decision is not None


async def test_another_kernel_library_than_the_platforms_is_refused(
    platform: dict[str, str], tmp_path: Path
) -> None:
    elsewhere = settings_for(
        platform,
        urza_artifact_dir=tmp_path / "artifacts",
        urza_database_url=f"sqlite:///{tmp_path / 'catalog.db'}",
    )
    model = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    data = load_digits_splits(seed=0, limit=200)
    async with esper.grow.connect(elsewhere) as connected:
        connected.add_seeds(model, {"0": 16})
        with pytest.raises(esper.grow.PlatformUnavailable, match="another kernel library"):
            await connected.train(
                model, data.train, data.validation, loss=nn.functional.cross_entropy, epochs=2
            )
