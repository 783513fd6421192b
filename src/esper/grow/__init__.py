"""Grow your own model: seed slots in any ``nn.Module``, trained on a running platform.

::

    import esper.grow
    from torch import nn

    async with esper.grow.connect() as platform:          # REDIS_URL / embedded server, secret from .env
        model = platform.add_seeds(model, {"body.0": 64})  # layer name -> its output width
        run = await platform.train(model, train_loader, val_loader, loss=nn.MSELoss(), epochs=20)
    print(run.grafts or run.no_graft_reason())

After each epoch the held-out loss (and ``metrics``) go to the controller as
a ``SystemStatePacket``; a graft it commands is fetched over the bus,
verified and blended in before the next epoch. See docs/grow-your-model.md.
"""

from esper.grow.connection import connect
from esper.grow.errors import PlatformUnavailable, SeedSlotError
from esper.grow.outcome import GrowthRun
from esper.grow.platform import KERNELS, Platform

__all__ = ["KERNELS", "GrowthRun", "Platform", "PlatformUnavailable", "SeedSlotError", "connect"]
