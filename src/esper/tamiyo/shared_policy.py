"""The newest accepted policy update, kept in Redis for replicas that were away.

Every replica applies every policy update it reads (its own group on the
policy stream). A replica that was down when an update was published would
find it stale when it comes back (the bus refuses messages older than the
freshness window), and keep running an older policy. So whichever replica
accepts an update also stores it here, signed with the platform key, and a
replica starting up applies the stored one if it is newer than its own. The
registry's checks (version order, bounded jump, layout, no code) apply as
for any update; the signature means only a holder of the secret can have
written it, and the version order means an old stored update can never roll
a replica back.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from esper.core.logs import get_logger
from esper.leyline import leyline_pb2
from esper.oona import OonaClient

_log = get_logger("esper.tamiyo.shared_policy")
# Keep the update only if its version is newer than the stored one. KEYS: the key.
# ARGV: version, document. Returns 1 when stored.
_OFFER = r"""
local current = redis.call('HGET', KEYS[1], 'version')
if current and tonumber(current) >= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'version', ARGV[1], 'document', ARGV[2])
return 1
"""


class SharedPolicy:
    def __init__(self, client: OonaClient) -> None:
        self._client = client
        self._key = f"{client.keys.prefix}tamiyo:policy:newest"
        self._offer = client.redis.register_script(_OFFER)

    async def offer(self, update: leyline_pb2.PolicyUpdate, version: int) -> bool:
        """Store ``update`` (accepted at ``version``) unless a newer one is stored already."""
        body = update.SerializeToString(deterministic=True)
        document = json.dumps(
            {"update": base64.b64encode(body).decode(), "signature": self._client.keyring.sign(body)}
        )
        stored: Any = await self._offer(keys=[self._key], args=[version, document])
        return bool(int(stored))

    async def newest(self) -> leyline_pb2.PolicyUpdate | None:
        """The stored update if its signature verifies (a forged or garbled one is ignored and logged)."""
        raw: Any = await self._client.redis.hget(self._key, "document")
        if raw is None:
            return None
        try:
            view = json.loads(raw)
            body = base64.b64decode(view["update"])
            if not self._client.keyring.verify(body, view["signature"]):
                raise ValueError("signature does not verify")
            return leyline_pb2.PolicyUpdate.FromString(body)
        except (ValueError, KeyError, TypeError) as exc:
            _log.warning("tamiyo.stored_policy_refused", error=f"{type(exc).__name__}: {exc}"[:200])
            return None
