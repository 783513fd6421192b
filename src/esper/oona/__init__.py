"""Oona: the signed, loss-free message bus on Redis Streams.

Publish with ``OonaClient.publish_*`` (each returns a ``PublishResult``);
consume with ``client.consumer(stream, handler, types=...)`` (consumer
group: one replica handles each entry, acked after success, retried, dead
lettered) or ``client.broadcast(...)`` (every process sees every entry).
Run a consumer as an owned task and stop it with ``await consumer.stop()``;
a service running several consumers until a stop event uses ``run_consumers``.
"""

from esper.oona.breaker import CircuitBreaker
from esper.oona.client import OonaClient
from esper.oona.config import StreamConfig
from esper.oona.consumer import BroadcastConsumer, GroupConsumer
from esper.oona.messages import Handler, OonaMessage, PublishResult, RejectMessage, RejectReason
from esper.oona.metrics import OonaMetrics
from esper.oona.runner import run_consumers

__all__ = [
    "BroadcastConsumer",
    "CircuitBreaker",
    "GroupConsumer",
    "Handler",
    "OonaClient",
    "OonaMessage",
    "OonaMetrics",
    "PublishResult",
    "RejectMessage",
    "RejectReason",
    "StreamConfig",
    "run_consumers",
]
