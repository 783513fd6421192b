"""The systemd unit: it verifies, its sandbox scores as hardened, and its paths stay flat.

``systemd-analyze`` runs here without a running systemd: ``verify`` loads the
unit (with ``ExecStart`` pointed at this environment's console script, since
``/opt/esper-lite`` does not exist here) and ``security --offline=yes``
scores the file itself.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import _unit_sandbox
import pytest
from _infra_support import REPO, setting_names

from esper.core.redis_server import free_port
from esper.core.settings import EsperSettings

UNIT = REPO / "infra" / "esper-weatherlight.service"
INSTALLED_SCRIPT = "/opt/esper-lite/.venv/bin/esper-weatherlight-service"
MAX_EXPOSURE = 3.0
TEST_SECRET = "test-secret-for-esper-lite-0123456789"

needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")


def unit_settings() -> dict[str, list[str]]:
    """``key -> values`` of the [Service] section, repeated keys kept in order."""
    values: dict[str, list[str]] = {}
    section = ""
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
        elif section == "Service":
            key, _, value = line.partition("=")
            values.setdefault(key, []).append(value)
    return values


def unit_environment() -> dict[str, str]:
    return dict(value.split("=", 1) for value in unit_settings()["Environment"])


@needs_analyze
def test_unit_verifies(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("esper-weatherlight-service")
    local = tmp_path / UNIT.name
    local.write_text(UNIT.read_text().replace(INSTALLED_SCRIPT, str(script)))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(local)], capture_output=True, text=True, timeout=60, check=False
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert UNIT.name not in output, output  # no warning about the unit


@needs_analyze
def test_unit_exposure_score_is_at_most_3() -> None:
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = result.stdout + result.stderr
    if "--offline" in output and "unrecognized option" in output:
        pytest.skip("this systemd-analyze cannot score unit files offline")
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", output)
    assert match, output
    assert float(match.group(1)) <= MAX_EXPOSURE, output


def test_unit_names_only_real_settings() -> None:
    assert set(unit_environment()) <= setting_names(), set(unit_environment()) - setting_names()


def test_restart_policy_and_limits() -> None:
    service = unit_settings()
    assert service["Type"] == ["notify"]
    assert service["Restart"] == ["on-failure"]
    assert service["RestartPreventExitStatus"] == ["2"]  # a configuration error never restart-loops
    assert int(service["LimitNOFILE"][0]) >= 65536
    assert "WatchdogSec" in service


def test_state_paths_are_flat(isolated_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The unit's environment resolves every path directly under the state directory."""
    service = unit_settings()
    state = Path("/var/lib") / service["StateDirectory"][0]
    assert service["WorkingDirectory"] == [str(state)]
    for key, value in unit_environment().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("ESPER_LEYLINE_SECRET", "x" * 32)
    settings = EsperSettings()
    assert Path(settings.var_dir) == state
    assert Path(settings.urza_artifact_dir) == state / "urza" / "artifacts"
    assert settings.urza_database_url == f"sqlite:///{state / 'urza' / 'catalog.db'}"
    assert Path(settings.tamiyo_policy_dir) == state / "tamiyo" / "policies"
    resolved = [
        str(settings.var_dir),
        str(settings.urza_artifact_dir),
        settings.urza_database_url,
        str(settings.tamiyo_policy_dir),
    ]
    assert not [p for p in resolved if f"{state}/var" in p], resolved


def test_service_runs_in_the_units_sandbox(tmp_path: Path) -> None:
    """Boots, serves /readyz with its embedded valkey, writes only its state dir, stops with 0.

    The unit's own Environment= lines are used; the secret comes from the
    environment file in a real install. READY=1 on the notify socket is the
    event waited for.
    """
    why = _unit_sandbox.unavailable()
    if why:
        pytest.skip(why)
    state = tmp_path / "state"
    state.mkdir()
    notify = state / "notify.sock"
    port = free_port()
    script = Path(sys.executable).with_name("esper-weatherlight-service")
    command, extra = _unit_sandbox.sandboxed(
        [str(script)], state, keep=[Path(sys.base_prefix), Path(sys.prefix), REPO]
    )
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL")}
    env.update(unit_environment())
    env.update(
        extra,
        ESPER_LEYLINE_SECRET=TEST_SECRET,
        WEATHERLIGHT_HTTP_PORT=str(port),
        NOTIFY_SOCKET=f"{_unit_sandbox.STATE}/{notify.name}",
    )
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(notify))
        os.chmod(notify, 0o777)
        listener.settimeout(90)
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            messages = b""
            while b"READY=1" not in messages.split(b"\n"):
                try:
                    messages = listener.recv(4096)
                except TimeoutError:
                    proc.kill()
                    pytest.fail(f"no READY=1 from the sandboxed service:\n{proc.communicate()[0]}")
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as resp:
                assert resp.status == 200
            service_pid = int(Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()[0])
            os.kill(service_pid, signal.SIGTERM)
            output, _ = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0, output
    assert "Read-only file system" not in output, output
    top = sorted(p.name for p in state.iterdir())
    assert "var" not in top, top  # flat: nothing nested under the state directory
    assert {"redis", "urza", "weatherlight.lock"} <= set(top), top
    assert (state / "urza" / "catalog.db").is_file()
    assert (state / "urza" / "artifacts").is_dir()
    assert (state / "redis" / "port").is_file()
    assert all(p.stat().st_uid == _unit_sandbox.NOBODY for p in state.rglob("*") if p != notify)
