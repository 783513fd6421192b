"""Settings, errors, logging, telemetry and durable-file helpers shared by every subsystem."""

from esper.core.errors import ConfigError
from esper.core.files import fsync_directory, write_atomic, write_atomic_with
from esper.core.logs import configure_logging, get_logger
from esper.core.settings import MASK, PREVIOUS_SECRETS_ENV, SECRET_ENV, EsperSettings, load_settings
from esper.core.telemetry import TelemetryEvent, TelemetryMetric, build_telemetry_packet

__all__ = [
    "MASK",
    "PREVIOUS_SECRETS_ENV",
    "SECRET_ENV",
    "ConfigError",
    "EsperSettings",
    "TelemetryEvent",
    "TelemetryMetric",
    "build_telemetry_packet",
    "configure_logging",
    "fsync_directory",
    "get_logger",
    "load_settings",
    "write_atomic",
    "write_atomic_with",
]
