"""``esper-config init`` writes the shared .env once, privately, and never clobbers a secret."""

from __future__ import annotations

import re
import stat
import subprocess
import sys
from pathlib import Path

from _environment import esper_free_env
from dotenv import dotenv_values

from esper.core.env_file import render
from esper.core.settings import EsperSettings

CONFIG = str(Path(sys.executable).with_name("esper-config"))


def _env(**extra: str) -> dict[str, str]:
    return esper_free_env(**extra)


def _config(cwd: Path, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CONFIG, *args], cwd=cwd, env=_env(**extra), capture_output=True, text=True, timeout=60, check=False
    )


def _secret(path: Path) -> str:
    return str(dotenv_values(path)["ESPER_LEYLINE_SECRET"])


def test_init_writes_a_private_env_with_a_fresh_secret(tmp_path: Path) -> None:
    done = _config(tmp_path, "init")
    assert done.returncode == 0, done.stderr
    env_file = tmp_path / ".env"
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    secret = _secret(env_file)
    assert len(secret) == 64
    int(secret, 16)
    assert secret not in done.stdout + done.stderr  # the value is never printed
    assert "wrote .env (mode 0600)" in done.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == [".env"]  # no temp file left
    # Every process started here reads it: esper-config resolves it with no secret in the environment.
    shown = _config(tmp_path, "--require-secret")
    assert shown.returncode == 0, shown.stderr
    assert '"ESPER_LEYLINE_SECRET": "***"' in shown.stdout
    # A second machine (directory) gets a different secret.
    other = tmp_path / "other"
    other.mkdir()
    assert _config(other, "init").returncode == 0
    assert _secret(other / ".env") != secret


def test_init_again_keeps_the_secret_and_force_replaces_it(tmp_path: Path) -> None:
    assert _config(tmp_path, "init").returncode == 0
    first = _secret(tmp_path / ".env")
    again = _config(tmp_path, "init")
    assert again.returncode == 0, again.stderr  # the set-up command can be run again
    assert "left unchanged" in again.stdout
    assert "--force" in again.stdout
    assert _secret(tmp_path / ".env") == first
    forced = _config(tmp_path, "init", "--force")
    assert forced.returncode == 0, forced.stderr
    assert "replaced .env" in forced.stdout
    assert _secret(tmp_path / ".env") != first
    assert stat.S_IMODE((tmp_path / ".env").stat().st_mode) == 0o600


def test_init_refuses_to_overwrite_a_file_without_a_usable_secret(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    for content in ("REDIS_URL=redis://cache:6379/0\n", "ESPER_LEYLINE_SECRET=short\n"):
        env_file.write_text(content)
        done = _config(tmp_path, "init")
        assert done.returncode == 2
        assert "not overwriting it" in done.stderr
        assert "--force" in done.stderr
        assert "Traceback" not in done.stderr
        assert "short\n" not in done.stderr
        assert env_file.read_text() == content


def test_init_says_when_the_environment_overrides_the_file(tmp_path: Path) -> None:
    done = _config(tmp_path, "init", ESPER_LEYLINE_SECRET="from-the-environment-0123456789")
    assert done.returncode == 0
    assert "also set in this environment" in done.stdout
    assert "from-the-environment" not in done.stdout


def test_init_into_an_unwritable_place_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    done = _config(tmp_path, "init", "--path", str(blocker / ".env"))
    assert done.returncode == 2
    assert "cannot write" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_template_names_real_settings_at_their_defaults(isolated_env: Path) -> None:
    text = render("0" * 64)
    assert "\nESPER_LEYLINE_SECRET=" + "0" * 64 + "\n" in text
    shown = re.findall(r"^# ([A-Z_]+)=(.*)$", text, flags=re.MULTILINE)
    assert len(shown) > 10
    known = set(EsperSettings(leyline_secret="0" * 64).masked())
    switched_on = isolated_env / "defaults.env"
    switched_on.write_text("".join(f"{name}={value}\n" for name, value in shown))
    defaults = EsperSettings(leyline_secret="0" * 64).masked()
    configured = EsperSettings(_env_file=switched_on, leyline_secret="0" * 64).masked()  # type: ignore[call-arg]
    for name, _value in shown:
        assert name in known, name
        assert configured[name] == defaults[name], name
