"""Settings bind v1 environment names, accept keyword arguments and never leak secrets."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from esper.core import ConfigError, EsperSettings, configure_logging, get_logger, load_settings
from esper.core.redis_server import embedded_options

SECRET = "s3cr3t-value-that-must-never-appear"
OLD_SECRET = "old-secret-value-also-hidden"


def test_defaults_match_reference(isolated_env: Path) -> None:
    settings = EsperSettings()
    assert settings.redis_url is None  # the embedded server is the default
    assert settings.oona_normal_stream == "oona.normal"
    assert settings.oona_emergency_stream == "oona.emergency"
    assert settings.oona_telemetry_stream == "oona.telemetry"
    assert settings.oona_policy_stream == "oona.policy"
    assert settings.oona_message_ttl_ms == 900_000
    assert settings.kernel_freshness_window_ms == 60_000
    assert settings.kernel_nonce_cache_size == 4096
    assert settings.tamiyo_field_report_retention_hours == 24
    assert settings.urza_database_url == "sqlite:///./var/urza/catalog.db"
    assert settings.urza_artifact_dir == Path("./var/urza/artifacts")
    assert settings.log_level == "INFO"
    assert settings.weatherlight_telemetry_interval_s == 10
    assert settings.weatherlight_http_host == "127.0.0.1"
    assert settings.weatherlight_http_port == 9101
    assert settings.weatherlight_shutdown_timeout_s == 10


def test_environment_names_bind(isolated_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://example:6380/2")
    monkeypatch.setenv("KERNEL_FRESHNESS_WINDOW_MS", "1234")
    monkeypatch.setenv("TAMIYO_CONSERVATIVE_MODE", "true")
    monkeypatch.setenv("ESP_LOG_LEVEL", "debug")
    settings = EsperSettings()
    assert settings.redis_url == "redis://example:6380/2"
    assert settings.kernel_freshness_window_ms == 1234
    assert settings.tamiyo_conservative_mode is True
    assert settings.log_level == "DEBUG"


def test_keyword_arguments_take_effect(isolated_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://from-env:6379/0")
    settings = EsperSettings(redis_url="redis://from-kwargs:6379/0", urza_artifact_dir=isolated_env / "a")
    assert settings.redis_url == "redis://from-kwargs:6379/0"
    assert settings.urza_artifact_dir == isolated_env / "a"


def test_dotenv_is_read(isolated_env: Path) -> None:
    (isolated_env / ".env").write_text("OONA_NORMAL_STREAM=custom.normal\n")
    assert EsperSettings().oona_normal_stream == "custom.normal"


def test_secrets_are_masked_everywhere(
    isolated_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ESPER_LEYLINE_SECRET", SECRET)
    monkeypatch.setenv("ESPER_LEYLINE_PREVIOUS_SECRETS", f"{OLD_SECRET}, another-old-secret")
    settings = EsperSettings()
    primary, previous = settings.signing_secrets()
    assert primary == SECRET.encode()
    assert previous == (OLD_SECRET.encode(), b"another-old-secret")
    masked = settings.masked()
    assert masked["ESPER_LEYLINE_SECRET"] == "***"
    assert masked["ESPER_LEYLINE_PREVIOUS_SECRETS"] == "***"
    rendered = [repr(settings), str(settings), str(masked), settings.model_dump_json()]
    for text in rendered:
        assert SECRET not in text
        assert OLD_SECRET not in text
    configure_logging("DEBUG", "json")
    try:
        get_logger("test").info("settings", settings=settings.masked(), obj=settings)
        logging.getLogger("stdlib").error("settings %r", settings)
        logged = capsys.readouterr().err
    finally:
        configure_logging()  # the default again, so later tests see no debug lines
    assert logged.count("ESPER_LEYLINE_SECRET") == 1
    assert "leyline_secret" in logged
    assert SECRET not in logged
    assert OLD_SECRET not in logged


def test_validation_errors_name_variable_not_value(
    isolated_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ESPER_LEYLINE_SECRET", SECRET)
    monkeypatch.setenv("REDIS_URL", f"http://{SECRET}@host")
    monkeypatch.setenv("WEATHERLIGHT_HTTP_PORT", SECRET)
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = str(info.value)
    assert "REDIS_URL" in message
    assert "WEATHERLIGHT_HTTP_PORT" in message
    assert SECRET not in message
    assert SECRET not in repr(info.value)
    assert info.value.__cause__ is None


@pytest.mark.parametrize("value", [None, "", "   "])
def test_missing_or_empty_secret_is_a_clear_error(
    isolated_env: Path, monkeypatch: pytest.MonkeyPatch, value: str | None
) -> None:
    if value is not None:
        monkeypatch.setenv("ESPER_LEYLINE_SECRET", value)
    with pytest.raises(ConfigError, match="ESPER_LEYLINE_SECRET"):
        load_settings(require_secret=True)


def test_whitespace_is_stripped_from_every_secret(
    isolated_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pasted newline or a space after a comma must not change the key (it would reject every entry)."""
    monkeypatch.setenv("ESPER_LEYLINE_SECRET", f"  {SECRET}\n")
    monkeypatch.setenv("ESPER_LEYLINE_PREVIOUS_SECRETS", f"\t{OLD_SECRET} , , another-old-secret\n")
    assert load_settings().signing_secrets() == (
        SECRET.encode(),
        (OLD_SECRET.encode(), b"another-old-secret"),
    )
    # The same through keyword arguments and .env.
    assert EsperSettings(leyline_secret=f" {SECRET} ").signing_secrets()[0] == SECRET.encode()
    monkeypatch.delenv("ESPER_LEYLINE_SECRET")
    (isolated_env / ".env").write_text(f"ESPER_LEYLINE_SECRET=' {SECRET}  '\n")
    assert load_settings().signing_secrets()[0] == SECRET.encode()


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        ("ESPER_LEYLINE_SECRET", "Qz", "the secret is shorter than 16 bytes"),
        ("ESPER_LEYLINE_SECRET", "  fifteen-bytes! ", "the secret is shorter than 16 bytes"),
        ("ESPER_LEYLINE_PREVIOUS_SECRETS", f"{OLD_SECRET},Tiny", "secret 2 of 2 is shorter than 16 bytes"),
    ],
)
def test_short_secrets_are_refused_naming_the_variable(
    isolated_env: Path, monkeypatch: pytest.MonkeyPatch, variable: str, value: str, says: str
) -> None:
    monkeypatch.setenv("ESPER_LEYLINE_SECRET", SECRET)
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = str(info.value)
    assert f"{variable}: {says}" in message
    assert "esper-config init" in message
    for part in value.split(","):
        assert part.strip() not in message.replace(variable, "")
    monkeypatch.setenv(variable, "sixteen-bytes-ok")
    load_settings(require_secret=True)  # exactly the minimum is accepted


def _run_config(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from esper.core.cli import main; main()", *args],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", **env},
        cwd=cwd,
        check=False,
    )


@pytest.mark.parametrize(
    "url",
    [
        "nonsense",
        f"redis://:{SECRET}@127.0.0.1:99999/0",
        "redis://127.0.0.1:abc/0",
        "redis+cluster://127.0.0.1:7000,127.0.0.1:x",
    ],
)
def test_cli_reports_bad_settings_without_traceback(isolated_env: Path, url: str) -> None:
    result = _run_config({"ESPER_LEYLINE_SECRET": SECRET, "REDIS_URL": url}, isolated_env)
    assert result.returncode == 2
    assert "REDIS_URL" in result.stderr
    assert "Traceback" not in result.stderr
    assert SECRET not in result.stderr + result.stdout


@pytest.mark.parametrize(
    "url", ["redis://[::1]/0", "redis://[::1]:6379/0", "redis+sentinel://:pw@h1:26379,h2:26380/main/0"]
)
def test_good_redis_urls_pass(isolated_env: Path, url: str) -> None:
    assert EsperSettings(redis_url=url).redis_url == url


def test_cli_missing_secret_exits_nonzero(isolated_env: Path) -> None:
    result = _run_config({}, isolated_env, "--require-secret")
    assert result.returncode == 2
    assert "ESPER_LEYLINE_SECRET" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_prints_masked_settings(isolated_env: Path) -> None:
    result = _run_config({"ESPER_LEYLINE_SECRET": SECRET}, isolated_env, "--require-secret")
    assert result.returncode == 0, result.stderr
    assert '"ESPER_LEYLINE_SECRET": "***"' in result.stdout
    assert SECRET not in result.stdout


def test_env_example_documents_every_variable() -> None:
    example = (Path(__file__).resolve().parents[2] / ".env.example").read_text()
    for info in EsperSettings.model_fields.values():
        alias = info.validation_alias
        names = getattr(alias, "choices", [])
        assert names, "every setting is bound to an environment name"
        assert f"{names[0]}=" in example, f"{names[0]} missing from .env.example"


_CRASH = """
import sys
from esper.core.cli import run_main
def body():
    raise RuntimeError("lost redis://:hunter2@10.0.0.5:6379/0")
sys.exit(run_main(body))
"""


def test_an_unexpected_failure_exits_1_with_a_masked_traceback(isolated_env: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", _CRASH], capture_output=True, text=True, cwd=isolated_env, check=False
    )
    assert result.returncode == 1
    assert "Traceback" in result.stderr
    assert "RuntimeError: lost redis://:***@10.0.0.5:6379/0" in result.stderr
    assert "hunter2" not in result.stderr


def test_bus_url_is_redis_url_or_the_embedded_server(isolated_env: Path) -> None:
    assert EsperSettings(redis_url="redis://cache:6379/1").bus_url() == "redis://cache:6379/1"
    with pytest.raises(ConfigError, match="REDIS_URL is not set and no embedded server") as info:
        EsperSettings(var_dir=isolated_env / "var").bus_url()
    assert "esper-weatherlight-service" in str(info.value)
    options = embedded_options(isolated_env / "var")  # what the service keeps under the var dir
    assert EsperSettings(var_dir=isolated_env / "var").bus_url() == options.url
    assert options.password
    assert options.password in options.url
