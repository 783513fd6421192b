"""The container image: a clean Dockerfile, and its install recipe runs the control plane without torch.

Docker itself does not run here, so the build stage is replayed outside it:
the files the Dockerfile copies go into a fresh build context, a new venv
gets the image's requirements and then the project with ``--no-deps``, and
Weatherlight and Nissa run from that venv with the image's environment
(paths moved from ``/var/lib/esper`` into the test's directory).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from _infra_support import REPO, setting_names

from esper.core.redis_server import embedded_url, free_port

DOCKERFILE = REPO / "infra" / "Dockerfile"
DOCKERIGNORE = REPO / "infra" / "Dockerfile.dockerignore"
REQUIREMENTS_SCRIPT = REPO / "infra" / "image_requirements.py"
IMAGE_STATE = "/var/lib/esper"
SECRET = "test-secret-for-esper-lite-0123456789"
FORGE_ONLY = {"torch", "scikit-learn", "matplotlib"}


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            result.append((word.upper(), rest.strip()))
    return result


def build_copies() -> list[tuple[list[str], str]]:
    """The build stage's ``COPY`` sources and destination."""
    copies = []
    for word, rest in instructions():
        if word == "FROM" and copies:
            break
        if word == "COPY" and not rest.startswith("--from"):
            *sources, dest = rest.split()
            copies.append((sources, dest))
    return copies


def image_env() -> dict[str, str]:
    """The runtime stage's ``ENV`` settings."""
    env: dict[str, str] = {}
    for word, rest in instructions():
        if word == "ENV":
            env.update(m.groups() for m in re.finditer(r"(\w+)=(\S+)", rest))
    return env


def run_requirements(*args: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, str(REQUIREMENTS_SCRIPT), str(REPO / "pyproject.toml"), *args],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.splitlines()


def test_dockerfile_is_hadolint_clean() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(hadolint).exists():
        pytest.skip("hadolint is not installed (pip install -e '.[dev]')")
    result = subprocess.run(
        [hadolint, "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "", result.stdout


def test_image_requirements_are_the_projects_without_the_forge_only_ones() -> None:
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    control_plane = run_requirements()
    forge = run_requirements("--forge")
    assert sorted(control_plane + forge) == sorted(dependencies)
    assert {re.split(r"[<>=\[]", r)[0].lower() for r in forge} == FORGE_ONLY


def test_build_context_holds_what_the_dockerfile_copies() -> None:
    allowed = {line[1:].rstrip("/") for line in DOCKERIGNORE.read_text().splitlines() if line.startswith("!")}
    copied = {source.rstrip("/") for sources, _ in build_copies() for source in sources}
    assert copied == allowed
    for sources, dest in build_copies():
        for source in sources:
            assert (REPO / source).exists(), source
            # Each lands at its own relative path under WORKDIR, as in the repository.
            assert dest in ("./", str(Path(source).parent) + "/", source), (source, dest)


def test_image_environment_is_flat_and_names_real_settings() -> None:
    known = setting_names()
    env = image_env()
    settings = {k: v for k, v in env.items() if not k.startswith(("PATH", "PYTHON"))}
    assert set(settings) <= known, set(settings) - known
    assert env["ESPER_VAR_DIR"] == IMAGE_STATE
    for key in ("URZA_ARTIFACT_DIR", "URZA_DATABASE_URL", "TAMIYO_POLICY_DIR"):
        assert IMAGE_STATE + "/" in env[key], key
        assert f"{IMAGE_STATE}/var/" not in env[key], key
    assert env["WEATHERLIGHT_HTTP_HOST"] == env["NISSA_HTTP_HOST"] == "0.0.0.0"


def _get(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def _wait_http(proc: subprocess.Popen[str], port: int, path: str, limit_s: float = 60.0) -> None:
    deadline = time.monotonic() + limit_s
    while True:
        assert proc.poll() is None, proc.communicate()[0]
        try:
            if _get(port, path) == 200:
                return
        except OSError:
            pass  # not listening yet
        assert time.monotonic() < deadline, f"{path} not 200 within {limit_s}s"
        time.sleep(0.1)


@pytest.mark.slow
def test_the_images_install_recipe_runs_the_control_plane_without_torch(tmp_path: Path) -> None:
    context = tmp_path / "context"
    for sources, _dest in build_copies():
        for source in sources:
            target = context / source.rstrip("/")
            if (REPO / source).is_dir():
                shutil.copytree(
                    REPO / source, target, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
                )
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / source, target)
    venv = tmp_path / "venv"
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("".join(f"{r}\n" for r in run_requirements()))
    pip_env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=pip_env)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "-r", str(requirements)], check=True, env=pip_env, timeout=540)
    subprocess.run([*pip, "--no-deps", str(context)], check=True, env=pip_env, timeout=300)
    absent = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import importlib.util as u; print([m for m in "
         "('torch', 'sklearn', 'matplotlib') if u.find_spec(m)])"],
        capture_output=True, text=True, check=True, env=pip_env,
    )  # fmt: skip
    assert absent.stdout.strip() == "[]"

    state = tmp_path / "state"
    env = {k: v for k, v in pip_env.items() if k in ("LANG", "LC_ALL", "HOME")}
    env.update({k: v.replace(IMAGE_STATE, str(state)) for k, v in image_env().items()})
    env["PATH"] = f"{venv / 'bin'}:/usr/bin:/bin"
    weatherlight_port, nissa_port = free_port(), free_port()
    notify = tmp_path / "notify.sock"
    env.update(
        ESPER_LEYLINE_SECRET=SECRET,
        WEATHERLIGHT_HTTP_PORT=str(weatherlight_port),
        NISSA_HTTP_PORT=str(nissa_port),
        NOTIFY_SOCKET=str(notify),
    )
    procs: list[subprocess.Popen[str]] = []
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
            listener.bind(str(notify))
            listener.settimeout(90)
            weatherlight = subprocess.Popen(
                [str(venv / "bin" / "esper-weatherlight-service")],
                env=env,
                cwd=tmp_path,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            procs.append(weatherlight)
            while b"READY=1" not in listener.recv(4096).split(b"\n"):
                pass
        assert _get(weatherlight_port, "/readyz") == 200
        nissa_env = {k: v for k, v in env.items() if k != "NOTIFY_SOCKET"}
        nissa_env["REDIS_URL"] = embedded_url(state)
        nissa = subprocess.Popen(
            [str(venv / "bin" / "esper-nissa-service")],
            env=nissa_env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        procs.append(nissa)
        _wait_http(nissa, nissa_port, "/readyz")
        for proc in reversed(procs):
            proc.send_signal(signal.SIGTERM)
            output, _ = proc.communicate(timeout=30)
            assert proc.returncode == 0, output
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
