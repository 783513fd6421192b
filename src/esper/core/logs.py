"""Structured logging set-up shared by every entry point.

``ESP_LOG_FORMAT`` picks JSON lines (for collectors) or a console renderer
(for people); ``ESP_LOG_LEVEL`` sets the threshold. Standard-library loggers
are routed through the same processors so third-party messages look alike.

Tracebacks (``exc_info``) are rendered to text in both formats and every
rendered string goes through :func:`esper.core.redact.mask_url`, so a
password inside a URL never reaches the log, not even from an exception
message deep in a traceback.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal

import structlog

from esper.core.redact import mask_url

LogFormat = Literal["json", "console"]


def configure_logging(level: str = "INFO", fmt: LogFormat = "console") -> None:
    """Configure structlog and the standard library; safe to call more than once."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            _mask_credentials,
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)


def _mask_credentials(
    logger: object, name: str, event: structlog.types.EventDict
) -> structlog.types.EventDict:
    for key, value in event.items():
        if isinstance(value, str):
            event[key] = mask_url(value)
        elif isinstance(value, list | tuple | dict):
            event[key] = mask_url(str(value)) if "@" in str(value) else value
    return event


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """A structlog logger bound to ``name``."""
    logger: structlog.stdlib.BoundLogger = structlog.stdlib.get_logger(name)
    return logger
