"""Tolaria with a regression loss, the caller's own loaders and metrics, and clear errors for bad input."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import torch
from _stream_support import read_stream
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from esper.kasmina import KasminaSeedManager, add_seed_slots
from esper.leyline import leyline_pb2
from esper.oona import OonaClient, StreamConfig
from esper.security import KeyRing
from esper.tolaria import TolariaTrainer, TrainingConfig

_L = leyline_pb2
SECRET = b"tolaria-test-secret-0123456789abcdef"
RUN = "run-regression"


def regression_loaders() -> tuple[DataLoader[tuple[torch.Tensor, ...]], DataLoader[tuple[torch.Tensor, ...]]]:
    """y = a noisy linear function of 6 inputs, float targets [N, 1], split 300 / 100."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(400, 6, generator=generator)
    y = (x @ torch.linspace(-1.0, 1.0, 6)).unsqueeze(1) + 0.1 * torch.randn(400, 1, generator=generator)
    train = TensorDataset(x[:300], y[:300])
    held_out = TensorDataset(x[300:], y[300:])
    return (
        DataLoader(train, batch_size=32, shuffle=True, generator=generator),
        DataLoader(held_out, batch_size=64),
    )


def mae(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return (outputs - targets).abs().mean()


def regression_model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 1))
    add_seed_slots(model, {"0": 16})
    return model


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[OonaClient]:
    oona = OonaClient(redis_url, StreamConfig(instance="t-regression", block_ms=200), KeyRing(SECRET))
    try:
        yield oona
    finally:
        await oona.aclose()


async def test_regression_trains_with_mse_and_reports_its_metrics(redis_url: str, client: OonaClient) -> None:
    train, held_out = regression_loaders()
    model = regression_model()
    manager = KasminaSeedManager(keys=KeyRing(SECRET), training_run_id=RUN)
    manager.register_host_model(model)
    trainer = TolariaTrainer(
        model,
        manager,
        train,
        held_out,
        client=client,
        training_run_id=RUN,
        config=TrainingConfig(max_epochs=3, lr=1e-2),
        loss=nn.MSELoss(),
        metrics={"mae": mae},
    )
    results = await trainer.run()

    assert [r.epoch for r in results] == [1, 2, 3]
    assert results[-1].validation_loss < results[0].validation_loss
    assert all(r.validation_accuracy is None and r.train_accuracy is None for r in results)
    # The held-out numbers are the model's on the held-out split, recomputed here from scratch.
    xs = torch.cat([x for x, _ in held_out])
    ys = torch.cat([y for _, y in held_out])
    model.eval()
    with torch.no_grad():
        predictions = model(xs)
    assert results[-1].validation_loss == pytest.approx(
        float(nn.functional.mse_loss(predictions, ys)), rel=1e-5
    )
    assert results[-1].validation_metrics["mae"] == pytest.approx(float(mae(predictions, ys)), rel=1e-5)
    assert results[-1].parameters == sum(p.numel() for p in model.parameters())

    states = [
        _L.SystemStatePacket.FromString(payload)
        for kind, payload in await read_stream(redis_url, "oona.normal")
        if kind == _L.BUS_MESSAGE_TYPE_SYSTEM_STATE
    ]
    assert len(states) == 3
    last = states[-1]
    assert last.validation_loss == pytest.approx(results[-1].validation_loss, rel=1e-6)
    assert last.validation_accuracy == 0.0
    assert "train_accuracy" not in last.training_metrics
    assert last.training_metrics["val_mae"] == pytest.approx(results[-1].validation_metrics["mae"], rel=1e-6)
    assert last.training_metrics["parameters"] == results[-1].parameters
    telemetry = [
        _L.TelemetryPacket.FromString(payload)
        for _kind, payload in await read_stream(redis_url, "oona.telemetry")
    ]
    names = {m.name for p in telemetry if p.source_subsystem == "tolaria" for m in p.metrics}
    assert "tolaria.validation.mae" in names
    assert "tolaria.model.parameters" in names
    assert "tolaria.validation.accuracy" not in names


def trainer_for(train: object, **kwargs: object) -> TolariaTrainer:
    model = regression_model()
    manager = KasminaSeedManager(keys=KeyRing(SECRET), training_run_id=RUN)
    manager.register_host_model(model)
    _, held_out = regression_loaders()
    return TolariaTrainer(
        model,
        manager,
        train,  # type: ignore[arg-type]
        held_out,
        client=None,
        training_run_id=RUN,
        config=TrainingConfig(max_epochs=1),
        loss=kwargs.pop("loss", nn.MSELoss()),  # type: ignore[arg-type]
        **kwargs,  # type: ignore[arg-type]
    )


async def test_a_batch_that_is_not_a_pair_is_a_clear_error() -> None:
    trainer = trainer_for([torch.zeros(4, 6)])
    with pytest.raises(TypeError, match=r"pair \(inputs, targets\)"):
        await trainer.run()


async def test_a_loss_that_is_not_a_scalar_is_a_clear_error() -> None:
    train, _ = regression_loaders()
    trainer = trainer_for(train, loss=nn.MSELoss(reduction="none"))
    with pytest.raises(TypeError, match="scalar tensor"):
        await trainer.run()


@pytest.mark.parametrize("name", ["Bad Name", "loss", "accuracy", "x" * 49, ""])
def test_metric_names_must_be_short_snake_case(name: str) -> None:
    train, _ = regression_loaders()
    with pytest.raises(ValueError, match="snake_case"):
        trainer_for(train, metrics={name: mae})


def test_auto_device_is_cuda_only_when_present() -> None:
    train, _ = regression_loaders()
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert trainer_for(train).device.type == expected
