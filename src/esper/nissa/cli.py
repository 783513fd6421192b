"""``esper-nissa-service``: run Nissa against a running platform's bus.

Environment (besides the shared ``EsperSettings``):

* ``REDIS_URL`` - the running platform's Redis; unset, the embedded server
  the service keeps under ``ESPER_VAR_DIR`` (Nissa never starts a Redis of
  its own), so started in the service's directory it needs no setting;
* ``ESPER_LEYLINE_SECRET`` (+ ``ESPER_LEYLINE_PREVIOUS_SECRETS``) - required,
  usually from the ``.env`` that ``esper-config init`` wrote;
* ``NISSA_HTTP_HOST`` (default ``127.0.0.1``) and ``NISSA_HTTP_PORT``
  (default ``9100``) - where ``/metrics``, ``/healthz``, ``/alerts``,
  ``/livez`` and ``/readyz`` are served.

A bad or missing setting prints one line and exits 2. SIGINT/SIGTERM stop
the consumers (in-flight batches are acked) and the HTTP server, exit 0; a
second signal exits at once with 130.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import signal
import sys
from collections.abc import Sequence

from redis.exceptions import RedisError

from esper.core import (
    ConfigError,
    EsperSettings,
    bounded,
    configure_logging,
    get_logger,
    load_settings,
    mask_url,
)
from esper.core.cli import run_main
from esper.core.worker import Worker, WorkerContext, run_children
from esper.nissa.service import DEFAULT_HTTP_HOST, DEFAULT_HTTP_PORT, NissaService
from esper.oona import InstanceLease, KeySpace, OonaClient, StreamConfig, connect, hash_tag_for

_log = get_logger("esper.nissa.cli")


async def serve(settings: EsperSettings, host: str, port: int) -> int:
    """Run until a signal; the consumer name is ``OONA_CONSUMER_NAME`` or a leased ``nissa-<n>``."""
    url = settings.bus_url()
    try:
        lease_redis = connect(url, StreamConfig(instance="nissa"))
    except ValueError as exc:  # a port out of range, a Sentinel URL without a service...
        raise ConfigError([f"REDIS_URL: {bounded(str(exc))}"]) from None
    ctx = WorkerContext("nissa")
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)

    def on_signal(signum: int) -> None:
        if ctx.stopping.is_set():
            _log.warning("second signal: exiting at once", signal=signal.Signals(signum).name)
            os._exit(130)
        _log.info("signal received: shutting down", signal=signal.Signals(signum).name)
        ctx.stopping.set()

    for signum in signals:
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        workers: dict[str, Worker] = {}
        instance = settings.oona_consumer_name
        lease: InstanceLease | None = None
        if not instance:
            keys = KeySpace(hash_tag_for(url))
            lease = InstanceLease(lease_redis, "nissa", secrets.token_hex(16), keys=keys)
            instance = await lease.acquire()
            workers["lease"] = lease.run
        client = OonaClient.from_settings(settings, instance=instance, redis_url=url)
        try:
            workers["service"] = NissaService(client, http_host=host, http_port=port).run
            await run_children(ctx, workers)
        finally:
            await client.aclose()
            if lease is not None and ctx.stopping.is_set():
                # A clean stop frees the name at once, so the next start takes it again instead of
                # a new one (which would be a new ``instance`` label for the same Nissa).
                await lease.release()
    except (RedisError, OSError) as exc:  # Redis unreachable at start, or the HTTP port is taken
        _log.error("nissa failed", bus=mask_url(url), error=bounded(f"{type(exc).__name__}: {exc}", 300))
        return 1
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)
        await lease_redis.aclose()
    _log.info("nissa stopped")
    return 0


def nissa_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="esper-nissa-service",
        description=(
            "Consume oona.telemetry, oona.normal and oona.emergency (group 'nissa') into "
            "Prometheus series and alerts; serve /metrics, /healthz, /alerts, /livez, /readyz. "
            "Reads the environment and .env in this directory: REDIS_URL (unset: the service's "
            "embedded server under ESPER_VAR_DIR) and ESPER_LEYLINE_SECRET; listens on "
            "NISSA_HTTP_HOST:NISSA_HTTP_PORT "
            f"(default {DEFAULT_HTTP_HOST}:{DEFAULT_HTTP_PORT}). Exits 2 on invalid configuration."
        ),
    )
    parser.parse_args(argv)

    def body() -> int:
        settings = load_settings(require_secret=True)
        settings.bus_url()  # no bus to join is a configuration error, reported before logging starts
        configure_logging(settings.log_level, settings.log_format)
        return asyncio.run(serve(settings, settings.nissa_http_host, settings.nissa_http_port))

    return run_main(body)


def main() -> None:
    sys.exit(nissa_main())
