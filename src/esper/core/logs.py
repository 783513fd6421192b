"""Structured logging set-up shared by every entry point.

``ESP_LOG_FORMAT`` picks JSON lines (for collectors) or a console renderer
(for people); ``ESP_LOG_LEVEL`` sets the threshold. Standard-library loggers
are routed through the same processors so third-party messages look alike.

Tracebacks (``exc_info``) are rendered to text in both formats and every
field then goes through :func:`esper.core.redact.mask_data`, so a password
inside a URL never reaches the log, whether it sits in a string, in the repr
of an object or in an exception message deep in a traceback. Each field is
then made printable and bounded (``FIELD_LIMIT``), so text from the wire can
neither forge log lines nor turn into megabyte ones.

Records go to whatever ``sys.stderr`` is when they are written, not the
stream that was current at set-up: a test runner (or an embedding
application) that swaps and closes streams never makes logging fail.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal, TextIO

import structlog

from esper.core.redact import mask_data
from esper.core.untrusted import bounded

LogFormat = Literal["json", "console"]
#: Longest rendering of one field (characters); a traceback may be longer (``TRACEBACK_LIMIT``).
FIELD_LIMIT = 4096
TRACEBACK_LIMIT = 65536
_LONG_FIELDS = frozenset({"event", "exception", "stack"})


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
            _bound_fields,
            renderer,
        ],
    )
    handler = _CurrentStderr()
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)


class _CurrentStderr(logging.StreamHandler[TextIO]):
    """A stream handler bound to ``sys.stderr`` as it is at each write, never a stale copy."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr  # under the handler's lock (taken by ``handle``)
        super().emit(record)

    def flush(self) -> None:
        self.stream = sys.stderr
        super().flush()


def _bound_fields(logger: object, name: str, event: structlog.types.EventDict) -> structlog.types.EventDict:
    """Make every text field one bounded, printable string (see ``esper.core.untrusted``).

    Field values may come from the wire: a newline or an escape sequence in one could forge a
    log line or repaint a terminal, so any value that is not printable or is too long is shown
    escaped and cut. The message and tracebacks keep their line breaks and are only cut.
    """
    for key, value in event.items():
        if not isinstance(value, str):
            continue
        if key in _LONG_FIELDS:
            if len(value) > TRACEBACK_LIMIT:
                event[key] = value[:TRACEBACK_LIMIT] + f"\n...[{len(value)} chars]"
        elif len(value) > FIELD_LIMIT or not value.isprintable():
            event[key] = bounded(value, FIELD_LIMIT)
    return event


def _mask_credentials(
    logger: object, name: str, event: structlog.types.EventDict
) -> structlog.types.EventDict:
    """Every field masked, objects included (as the repr a renderer would print), before rendering."""
    masked: structlog.types.EventDict = mask_data(event)
    return masked


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """A structlog logger bound to ``name``."""
    logger: structlog.stdlib.BoundLogger = structlog.stdlib.get_logger(name)
    return logger
