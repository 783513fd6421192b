"""Oona: the signed bus on Redis Streams, built around subscriptions.

Publish with ``OonaClient.publish`` (or a typed ``publish_*``); each returns a
``PublishResult``. Consume with a *subscription*, ``client.subscribe(stream,
group, handler, types=...)``: the group exists only on that stream, each entry
goes to one replica of the group, and what the handler returns (``Reply``
objects) is published in the same server round trip that acknowledges the
entry. Failures are retried inside the group (the server's delivery count is
the attempt), under a per-handler deadline, and dead-lettered with a reason
after the last delivery. ``client.broadcast(...)`` is for readers that must
see every entry. Both run as workers under the one worker contract:
``await reader.run(ctx)`` (see :mod:`esper.core.worker`).
"""

from esper.oona.broadcast import BroadcastReader
from esper.oona.client import OonaClient
from esper.oona.config import DeliveryPolicy, StreamConfig
from esper.oona.connection import connect
from esper.oona.housekeeping import HousekeepingReport
from esper.oona.keys import KeySpace, hash_tag_for
from esper.oona.lease import InstanceLease, LeaseLost, instance_token
from esper.oona.messages import Handler, OonaMessage, PublishResult, RejectMessage, RejectReason, Reply
from esper.oona.metrics import OonaMetrics
from esper.oona.subscription import Subscription

__all__ = [
    "BroadcastReader",
    "DeliveryPolicy",
    "Handler",
    "HousekeepingReport",
    "InstanceLease",
    "KeySpace",
    "LeaseLost",
    "OonaClient",
    "OonaMessage",
    "OonaMetrics",
    "PublishResult",
    "RejectMessage",
    "RejectReason",
    "Reply",
    "StreamConfig",
    "Subscription",
    "connect",
    "hash_tag_for",
    "instance_token",
]
