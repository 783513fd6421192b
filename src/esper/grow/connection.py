"""Finding a running platform: its bus, its secret, and proof that Weatherlight answers.

:func:`connect` takes the same settings as every Esper-Lite process (the
environment and ``.env``): ``REDIS_URL``, or the embedded server that
``esper-weatherlight-service`` starts under ``ESPER_VAR_DIR`` when it is
unset; ``ESPER_LEYLINE_SECRET``; and the Urza catalogue and artifact
directory, which the trainer shares with the platform (kernels are loaded
from it once the platform has verified them). Every way this can fail ends
in :class:`~esper.grow.errors.PlatformUnavailable` naming what to start or
set; URLs in messages have their password masked and no secret is shown.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from esper.core.errors import ConfigError
from esper.core.redact import mask_url
from esper.core.redis_server import RedisServerError, embedded_url
from esper.core.settings import EsperSettings, load_settings
from esper.grow.errors import PlatformUnavailable
from esper.grow.platform import Platform
from esper.grow.probe import ask_for_kernel
from esper.oona import OonaClient

START_HINT = (
    "start one with `esper-weatherlight-service` in the directory you train from "
    "(it keeps its state under ./var and shares it through .env), or set REDIS_URL, "
    "ESPER_LEYLINE_SECRET, URZA_DATABASE_URL and URZA_ARTIFACT_DIR to those of the running platform"
)


def bus_url(settings: EsperSettings) -> str:
    """``REDIS_URL``, else the embedded server's URL from ``ESPER_VAR_DIR``."""
    if settings.redis_url:
        return settings.redis_url
    try:
        return embedded_url(settings.var_dir)
    except RedisServerError:
        raise PlatformUnavailable(
            f"no Esper-Lite platform found: REDIS_URL is not set and no embedded server was ever "
            f"started under {settings.var_dir}/redis; {START_HINT}"
        ) from None


@asynccontextmanager
async def connect(
    settings: EsperSettings | None = None, *, timeout_s: float = 10.0
) -> AsyncIterator[Platform]:
    """A :class:`Platform` for the running platform of ``settings`` (default: environment and ``.env``).

    Entering checks, in order: the settings and secret, that the bus accepts
    writes, and that Weatherlight answers a signed kernel request within
    ``timeout_s`` (which also proves both sides use the same secret).
    """
    try:
        settings = settings if settings is not None else load_settings()
        settings.signing_secrets()
    except ConfigError as exc:
        raise PlatformUnavailable(
            f"{exc}; use the secret the platform runs with (ESPER_LEYLINE_SECRET, e.g. from its .env)"
        ) from None
    url = bus_url(settings)
    where = mask_url(url)
    client = OonaClient.from_settings(settings, instance=f"grow-{uuid.uuid4().hex[:12]}", redis_url=url)
    try:
        problem = await client.probe(timeout_s=min(timeout_s, 5.0))
        if problem is not None:
            raise PlatformUnavailable(f"cannot use the platform's bus at {where} ({problem}); {START_HINT}")
        try:
            answer = await ask_for_kernel(client, "BP001", timeout_s=timeout_s)
        except TimeoutError:
            answer = f"the reply streams could not be read within {timeout_s:g}s"
        if isinstance(answer, str):
            raise PlatformUnavailable(
                f"the bus at {where} works, but no Weatherlight answered a kernel request: {answer}. "
                f"Either none is running on this bus ({START_HINT}), or it runs with another "
                "ESPER_LEYLINE_SECRET (its log then shows this process's entries dead-lettered as "
                "bad_signature)"
            )
        yield Platform(settings, url, client, timeout_s=timeout_s)
    finally:
        await client.aclose()
