"""Settings, errors, logging, telemetry, URL masking, log-safe untrusted text, the instance lock, files."""

from esper.core.errors import ConfigError
from esper.core.files import fsync_directory, write_atomic, write_atomic_with
from esper.core.instance_lock import AlreadyRunning, InstanceLock
from esper.core.logs import configure_logging, get_logger
from esper.core.redact import mask_url
from esper.core.settings import MASK, PREVIOUS_SECRETS_ENV, SECRET_ENV, EsperSettings, load_settings
from esper.core.telemetry import TelemetryEvent, TelemetryMetric, build_telemetry_packet
from esper.core.untrusted import bounded

__all__ = [
    "MASK",
    "PREVIOUS_SECRETS_ENV",
    "SECRET_ENV",
    "AlreadyRunning",
    "ConfigError",
    "EsperSettings",
    "InstanceLock",
    "TelemetryEvent",
    "TelemetryMetric",
    "bounded",
    "build_telemetry_packet",
    "configure_logging",
    "fsync_directory",
    "get_logger",
    "load_settings",
    "mask_url",
    "write_atomic",
    "write_atomic_with",
]
