"""Consumers: the group reader that owns delivery, and the broadcast reader.

Use ``GroupConsumer`` (``client.consumer``) for work: each entry goes to one
replica of the group, is acked only after its handler succeeds, is retried
with backoff and an ``attempt`` count on failure, dead-lettered after
``retry_max_attempts``, and is claimed and processed by a live replica if its
consumer dies (XAUTOCLAIM after ``retry_idle_ms``).

Use ``BroadcastConsumer`` (``client.broadcast``) when every process must see
every entry, e.g. training processes each waiting for the
``KernelArtifactReady`` of their own request id. It reads with XREAD from
the last id it saw, runs the same verification (replay keys are per consumer
name), never acks and never dead-letters: the group consumers of the stream
own those duties.

Both run as an owned coroutine: ``await consumer.run()`` until cancelled or
until ``await consumer.stop()``, which lets the batch in flight finish and
be acked. Reads always use a finite BLOCK (never sleep-polling); Redis errors
go to the client's consume breaker and the loop reconnects with exponential
backoff.

The code lives in three modules, one job each: :mod:`esper.oona.consumer_loop`
(the shared loop), :mod:`esper.oona.group_consumer` and
:mod:`esper.oona.broadcast_consumer`; this module names them together.
"""

from esper.oona.broadcast_consumer import BroadcastConsumer, BroadcastOptions
from esper.oona.consumer_loop import ConsumerLoop, ReadOptions
from esper.oona.group_consumer import GroupConsumer, GroupOptions

__all__ = [
    "BroadcastConsumer",
    "BroadcastOptions",
    "ConsumerLoop",
    "GroupConsumer",
    "GroupOptions",
    "ReadOptions",
]
