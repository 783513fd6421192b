"""Process configuration read from the environment and ``.env``.

Every field is bound to the environment name used by esper-lite v1 and may
also be passed by its Python name (``EsperSettings(redis_url=...)``), which
tests and embedding applications rely on. Secrets are ``SecretStr`` so that
``repr``, ``masked()`` and validation errors never contain them.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from esper.core.errors import ConfigError
from esper.core.redact import mask_url
from esper.core.redis_server import RedisServerError, embedded_url

SECRET_ENV = "ESPER_LEYLINE_SECRET"
PREVIOUS_SECRETS_ENV = "ESPER_LEYLINE_PREVIOUS_SECRETS"
MASK = "***"
#: Shortest accepted signing secret, in bytes (UTF-8): an HMAC key is only as strong as its length.
MIN_SECRET_BYTES = 16
_SECRET_HINT = "use a long random value (esper-config init writes one to .env)"
_REDIS_SCHEMES = frozenset({"redis", "rediss", "unix", "redis+sentinel", "redis+cluster"})
_SQL_SCHEMES = ("sqlite", "postgresql")


def _env(name: str) -> Any:
    """Bind a field to its environment name while still accepting the field name."""
    return AliasChoices(name)


class EsperSettings(BaseSettings):
    """Settings shared by every Esper-Lite process."""

    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        case_sensitive=True,
        extra="ignore",
        frozen=True,
        validate_by_name=True,
        validate_by_alias=True,
        hide_input_in_errors=True,
    )

    redis_url: str | None = Field(default=None, validation_alias=_env("REDIS_URL"))
    oona_normal_stream: str = Field(default="oona.normal", validation_alias=_env("OONA_NORMAL_STREAM"))
    oona_emergency_stream: str = Field(
        default="oona.emergency", validation_alias=_env("OONA_EMERGENCY_STREAM")
    )
    oona_telemetry_stream: str = Field(
        default="oona.telemetry", validation_alias=_env("OONA_TELEMETRY_STREAM")
    )
    oona_policy_stream: str = Field(default="oona.policy", validation_alias=_env("OONA_POLICY_STREAM"))
    oona_message_ttl_ms: int | None = Field(
        default=900_000, ge=0, validation_alias=_env("OONA_MESSAGE_TTL_MS")
    )
    oona_max_stream_length: int = Field(default=10_000, ge=1, validation_alias=_env("OONA_MAX_STREAM_LENGTH"))
    oona_consumer_name: str | None = Field(default=None, validation_alias=_env("OONA_CONSUMER_NAME"))
    oona_stream_hard_cap: int | None = Field(
        default=None, ge=1, validation_alias=_env("OONA_STREAM_HARD_CAP")
    )
    oona_handler_timeout_ms: int = Field(
        default=30_000, ge=1, validation_alias=_env("OONA_HANDLER_TIMEOUT_MS")
    )
    oona_claim_idle_ms: int = Field(default=15_000, ge=1, validation_alias=_env("OONA_CLAIM_IDLE_MS"))
    kernel_freshness_window_ms: int = Field(
        default=60_000, gt=0, validation_alias=_env("KERNEL_FRESHNESS_WINDOW_MS")
    )
    kernel_nonce_cache_size: int = Field(default=4096, ge=1, validation_alias=_env("KERNEL_NONCE_CACHE_SIZE"))
    prometheus_pushgateway: str = Field(
        default="http://localhost:9091", validation_alias=_env("PROMETHEUS_PUSHGATEWAY")
    )
    elasticsearch_url: str = Field(
        default="http://localhost:9200", validation_alias=_env("ELASTICSEARCH_URL")
    )
    leyline_schema_dir: str = Field(
        default="./contracts/leyline", validation_alias=_env("LEYLINE_SCHEMA_DIR")
    )
    leyline_namespace: str = Field(
        default="esper.leyline.v1", validation_alias=_env("LEYLINE_DEFAULT_NAMESPACE")
    )
    leyline_secret: SecretStr | None = Field(default=None, validation_alias=_env(SECRET_ENV))
    leyline_previous_secrets: SecretStr | None = Field(
        default=None, validation_alias=_env(PREVIOUS_SECRETS_ENV)
    )
    tamiyo_policy_dir: Path = Field(
        default=Path("./var/tamiyo/policies"), validation_alias=_env("TAMIYO_POLICY_DIR")
    )
    tamiyo_conservative_mode: bool = Field(default=False, validation_alias=_env("TAMIYO_CONSERVATIVE_MODE"))
    tamiyo_field_report_retention_hours: float = Field(
        default=24, gt=0, validation_alias=_env("TAMIYO_FIELD_REPORT_RETENTION_HOURS")
    )
    urza_database_url: str = Field(
        default="sqlite:///./var/urza/catalog.db", validation_alias=_env("URZA_DATABASE_URL")
    )
    urza_artifact_dir: Path = Field(
        default=Path("./var/urza/artifacts"), validation_alias=_env("URZA_ARTIFACT_DIR")
    )
    urza_cache_ttl_seconds: float | None = Field(
        default=None, gt=0, validation_alias=_env("URZA_CACHE_TTL_SECONDS")
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = Field(
        default="INFO", validation_alias=_env("ESP_LOG_LEVEL")
    )
    log_format: Literal["json", "console"] = Field(default="console", validation_alias=_env("ESP_LOG_FORMAT"))
    var_dir: Path = Field(default=Path("./var"), validation_alias=_env("ESPER_VAR_DIR"))
    weatherlight_telemetry_interval_s: float = Field(
        default=10.0, gt=0, validation_alias=_env("WEATHERLIGHT_TELEMETRY_INTERVAL_S")
    )
    weatherlight_http_host: str = Field(default="127.0.0.1", validation_alias=_env("WEATHERLIGHT_HTTP_HOST"))
    weatherlight_http_port: int = Field(
        default=9101, ge=0, le=65535, validation_alias=_env("WEATHERLIGHT_HTTP_PORT")
    )
    nissa_http_host: str = Field(default="127.0.0.1", validation_alias=_env("NISSA_HTTP_HOST"))
    nissa_http_port: int = Field(default=9100, ge=0, le=65535, validation_alias=_env("NISSA_HTTP_PORT"))
    weatherlight_shutdown_timeout_s: float = Field(
        default=10.0, gt=0, validation_alias=_env("WEATHERLIGHT_SHUTDOWN_TIMEOUT_S")
    )
    weatherlight_housekeeping_interval_s: float = Field(
        default=60.0, gt=0, validation_alias=_env("WEATHERLIGHT_HOUSEKEEPING_INTERVAL_S")
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("log_format", mode="before")
    @classmethod
    def _lower_format(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator("redis_url", mode="before")
    @classmethod
    def _blank_redis_is_embedded(cls, value: Any) -> Any:
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str | None) -> str | None:
        if value is not None:
            parts = urlsplit(value)
            if parts.scheme not in _REDIS_SCHEMES or (parts.scheme != "unix" and not parts.hostname):
                raise ValueError(
                    "must be a redis://, rediss://, unix://, redis+sentinel:// or redis+cluster:// URL"
                )
            for node in parts.netloc.rpartition("@")[2].split(","):  # (after any password)
                _host, colon, port = node.rpartition(":")
                if colon and not node.endswith("]") and not (port.isdigit() and 0 < int(port) < 65536):
                    raise ValueError(f"port {port[:20]!r} is not a number from 1 to 65535")
        return value

    @field_validator("urza_database_url")
    @classmethod
    def _check_database_url(cls, value: str) -> str:
        if value.split(":", 1)[0].split("+", 1)[0] not in _SQL_SCHEMES:
            raise ValueError("must be a sqlite:/// or postgresql:// URL")
        return value

    # -- secrets -----------------------------------------------------------------
    # Both variables are normalised the same way: surrounding whitespace (a pasted newline, a
    # space after a comma) is dropped, blank means unset, and a value shorter than
    # MIN_SECRET_BYTES is refused. Errors name the variable, never the value.

    @field_validator("leyline_secret", mode="before")
    @classmethod
    def _normalise_secret(cls, value: Any) -> Any:
        text = _secret_text(value)
        if text is None:
            return value
        text = text.strip()
        if not text:
            return None
        _check_length(text, "the secret")
        return text

    @field_validator("leyline_previous_secrets", mode="before")
    @classmethod
    def _normalise_previous(cls, value: Any) -> Any:
        text = _secret_text(value)
        if text is None:
            return value
        items = [item.strip() for item in text.split(",")]
        kept = [item for item in items if item]
        for position, item in enumerate(kept, start=1):
            _check_length(item, f"secret {position} of {len(kept)}")
        return ",".join(kept) or None

    def signing_secrets(self) -> tuple[bytes, tuple[bytes, ...]]:
        """Return the primary secret and the previous ones accepted during rotation.

        Raises ``ConfigError`` naming the variable when the primary secret is
        missing or blank: nothing on the bus may be sent or accepted unsigned.
        """
        if self.leyline_secret is None:
            raise ConfigError([f"{SECRET_ENV} is missing or empty; {_SECRET_HINT}"])
        primary = self.leyline_secret.get_secret_value()
        raw_previous = (
            self.leyline_previous_secrets.get_secret_value() if self.leyline_previous_secrets else ""
        )
        previous = tuple(item.encode() for item in raw_previous.split(",") if item)
        return primary.encode(), previous

    # -- derived values ------------------------------------------------------------

    def bus_url(self) -> str:
        """The bus to connect to: ``REDIS_URL``, else the embedded server under ``ESPER_VAR_DIR``.

        The service keeps its embedded server's port and password under
        ``<ESPER_VAR_DIR>/redis/``, so every tool started with the same
        settings (the same ``.env``) finds it. Raises ``ConfigError`` naming
        ``REDIS_URL`` when it is unset and no embedded server was ever set up.
        The URL holds the password: show it only through ``mask_url``.
        """
        if self.redis_url is not None:
            return self.redis_url
        try:
            return embedded_url(self.var_dir)
        except RedisServerError:
            where = self.var_dir / "redis"
            raise ConfigError(
                [
                    f"REDIS_URL is not set and no embedded server has been set up under {where}: start "
                    "esper-weatherlight-service here first (or set REDIS_URL, or the service's ESPER_VAR_DIR)"
                ]
            ) from None

    def consumer_name(self, prefix: str) -> str:
        """A consumer name unique to this process, so replicas split work instead of colliding."""
        if self.oona_consumer_name:
            return self.oona_consumer_name
        host = socket.gethostname().replace(" ", "-")
        return f"{prefix}-{host}-{os.getpid()}"

    def masked(self) -> dict[str, Any]:
        """Every setting by environment name, secrets and URL passwords replaced by ``***``; safe to log."""
        view: dict[str, Any] = {}
        for name, info in type(self).model_fields.items():
            alias = info.validation_alias
            env_name = alias.choices[0] if isinstance(alias, AliasChoices) else name
            value = getattr(self, name)
            if isinstance(value, SecretStr):
                view[str(env_name)] = MASK
            elif isinstance(value, Path):
                view[str(env_name)] = str(value)
            elif isinstance(value, str):
                view[str(env_name)] = mask_url(value)
            else:
                view[str(env_name)] = value
        return view

    def __repr_args__(self) -> Any:  # pragma: no cover - exercised through repr()
        return [(k, MASK if isinstance(v, SecretStr) else v) for k, v in super().__repr_args__()]


def _secret_text(value: Any) -> str | None:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    return value if isinstance(value, str) else None


def _check_length(text: str, what: str) -> None:
    if len(text.encode()) < MIN_SECRET_BYTES:
        raise ValueError(f"{what} is shorter than {MIN_SECRET_BYTES} bytes; {_SECRET_HINT}")


def _env_name(field: str) -> str:
    info = EsperSettings.model_fields.get(field)
    if info is not None and isinstance(info.validation_alias, AliasChoices):
        return str(info.validation_alias.choices[0])
    return field


def load_settings(*, require_secret: bool = False, **overrides: Any) -> EsperSettings:
    """Build settings, turning validation failures into one ``ConfigError``.

    The error lists every bad variable by its environment name with the
    reason, never the value, so secrets cannot leak through it.
    """
    try:
        settings = EsperSettings(**overrides)
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_input=False, include_url=False, include_context=False):
            field = str(err["loc"][0]) if err["loc"] else "settings"
            message = str(err["msg"]).removeprefix("Value error, ")
            problems.append(f"{_env_name(field)}: {message}")
        raise ConfigError(problems) from None
    if require_secret:
        settings.signing_secrets()
    return settings
