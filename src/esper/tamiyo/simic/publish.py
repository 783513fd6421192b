"""Offering Simic's update to every Tamiyo replica on the bus.

Kept in Simic, beside the training that produces the update, so the
control plane's Tamiyo service (which only consumes updates) never imports
Simic or torch.
"""

from __future__ import annotations

from esper.core import get_logger
from esper.oona import OonaClient, PublishResult
from esper.tamiyo.simic.trainer import SimicRun

_LOG = get_logger(__name__)


async def publish_simic_update(client: OonaClient, run: SimicRun) -> PublishResult:
    """Put Simic's validated PolicyUpdate on ``oona.policy`` (signed by the client's key).

    Raises ``ValueError`` when the run produced no update (training did not
    pass validation); a refused publish comes back as a ``PublishResult``.
    """
    if run.update is None:
        raise ValueError(f"Simic produced no policy update ({run.result.reason})")
    result = await client.publish_policy_update(run.update)
    if result.ok:
        _LOG.info(
            "simic.policy_update_published",
            version=run.update.tamiyo_policy_version,
            policy_id=run.update.policy_id,
            entry_id=result.entry_id,
        )
    else:
        _LOG.warning("simic.policy_update_refused", reason=result.reason)
    return result
