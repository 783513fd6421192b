"""Settings, errors, logging and telemetry helpers shared by every subsystem."""

from esper.core.errors import ConfigError
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
    "get_logger",
    "load_settings",
]
