"""One kernel request over the bus, answered by the platform's Urza prefetch worker.

The cheapest proof that a platform is really serving: a signed request goes
out, and only a live Weatherlight (same bus, same secret) answers it, with
the kernel (``KernelArtifactReady``) or a reason (``KernelArtifactError``).
Both reply streams are read from before the request is published, so the
answer cannot be missed; the wait is on the answer, bounded by a timeout.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import TypeAlias

from esper.core.worker import WorkerContext, run_children, running
from esper.leyline import leyline_pb2
from esper.oona import OonaClient, OonaMessage

_L = leyline_pb2
Answer: TypeAlias = leyline_pb2.KernelArtifactReady | leyline_pb2.KernelArtifactError


async def ask_for_kernel(
    client: OonaClient, blueprint_id: str, *, timeout_s: float, training_run_id: str = "grow-probe"
) -> Answer | str:
    """The platform's answer to one request for ``blueprint_id``, or why there is none."""
    request_id = uuid.uuid4().hex
    answered: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()

    def settle(answer: Answer) -> None:
        if answer.request_id == request_id and not answered.done():
            answered.set_result(answer)

    async def on_ready(message: OonaMessage) -> None:
        settle(message.decode(leyline_pb2.KernelArtifactReady))

    async def on_error(message: OonaMessage) -> None:
        settle(message.decode(leyline_pb2.KernelArtifactError))

    config = client.config
    readers = {
        "ready": client.broadcast(
            config.kernel_ready_stream,
            on_ready,
            types={_L.BUS_MESSAGE_TYPE_KERNEL_PREFETCH_READY},
            ignore_types={_L.BUS_MESSAGE_TYPE_KERNEL_CATALOG_UPDATE},
        ).run,
        "errors": client.broadcast(
            config.kernel_error_stream, on_error, types={_L.BUS_MESSAGE_TYPE_KERNEL_PREFETCH_ERROR}
        ).run,
    }

    async def replies(ctx: WorkerContext) -> None:
        await run_children(ctx, readers)

    request = leyline_pb2.KernelPrefetchRequest(
        request_id=request_id, blueprint_id=blueprint_id, training_run_id=training_run_id
    )
    request.issued_at.GetCurrentTime()
    async with running(replies, "grow.probe", start_timeout_s=timeout_s):
        result = await client.publish_kernel_prefetch_request(request)
        if not result.ok:
            return f"the request was refused ({result.reason})"
        try:
            return await asyncio.wait_for(answered, timeout_s)
        except TimeoutError:
            return f"no answer within {timeout_s:g}s"
