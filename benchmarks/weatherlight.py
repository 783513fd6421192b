"""Weatherlight process benchmark: boot to ready, SIGTERM to exit, idle CPU and memory.

Starts the real ``esper-weatherlight-service`` as a subprocess in its default
single-node shape (``REDIS_URL`` unset, so it runs its own embedded server),
each run with a fresh ``ESPER_VAR_DIR``, artifact dir and SQLite catalogue in
a temporary directory and a free HTTP port. Per run it measures:

- ``boot_to_ready_s``: process spawn until ``/readyz`` answers 200 (polled every 10 ms);
- ``sigterm_to_exit_s``: SIGTERM until the process has exited (exit status must be 0);
- ``rss_mb``: VmRSS of the service process (not its server child) right after boot.

On the first run it also measures ``idle_cpu_percent``: utime+stime of the
service *and* its embedded server child over ``BENCH_IDLE_S`` seconds (default 30)
of idleness, as a percentage of one core. Medians are reported over
``BENCH_RUNS`` runs (default 5). ``version_s`` is the median wall time of
``esper-weatherlight-service --version`` (the CLI imports the control plane
only to run it).

Run: .venv/bin/python benchmarks/weatherlight.py   (the last line is JSON)
Targets for the finished platform: boot_to_ready_s <= 1.0, sigterm_to_exit_s <= 0.3,
idle_cpu_percent <= 0.5, rss_mb <= 120 (the control plane imports no torch;
tests/weatherlight/test_torch_free.py holds it to that), version_s <= 0.5.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from esper.core.redis_server import free_port

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _environment import esper_free_env  # the tests' one Esper-free environment

RUNS = int(os.environ.get("BENCH_RUNS", "5"))
IDLE_S = float(os.environ.get("BENCH_IDLE_S", "30"))
SECRET = "weatherlight-benchmark-secret-0123456789"
SCRIPT = str(Path(sys.executable).with_name("esper-weatherlight-service"))
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_ticks(pid: int) -> int:
    """utime + stime of one process, in clock ticks."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5), counted after "comm"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found += [int(p) for p in text]
    return found


def ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1.0) as resp:
            return int(resp.status) == 200
    except (urllib.error.URLError, OSError):
        return False


def environment(root: Path, port: int) -> dict[str, str]:
    return esper_free_env(
        ESPER_LEYLINE_SECRET=SECRET,
        ESPER_VAR_DIR=str(root / "var"),
        URZA_ARTIFACT_DIR=str(root / "urza"),
        URZA_DATABASE_URL=f"sqlite:///{root / 'urza' / 'catalog.db'}",
        WEATHERLIGHT_HTTP_PORT=str(port),
    )


def one_run(index: int, measure_idle: bool) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="weatherlight-bench-") as tmp:
        root = Path(tmp)
        port = free_port()
        log = (root / "service.log").open("wb")
        began = time.monotonic()
        proc = subprocess.Popen(
            [SCRIPT], env=environment(root, port), cwd=root, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            while not ready(port):
                if proc.poll() is not None:
                    raise RuntimeError(f"service exited with {proc.returncode}:\n{_tail(root)}")
                if time.monotonic() - began > 60:
                    raise RuntimeError(f"service not ready within 60 s:\n{_tail(root)}")
                time.sleep(0.01)
            boot = time.monotonic() - began
            result = {"boot_to_ready_s": boot, "rss_mb": rss_mb(proc.pid)}
            kids = children(proc.pid)
            print(
                f"run {index + 1}/{RUNS}: ready in {boot:.3f} s, RSS {result['rss_mb']:.1f} MB, "
                f"children {kids}",
                flush=True,
            )
            if measure_idle:
                time.sleep(1.0)  # let the last boot steps settle
                pids = [proc.pid, *kids]
                before = {pid: cpu_ticks(pid) for pid in pids}
                t0 = time.monotonic()
                time.sleep(IDLE_S)
                elapsed = time.monotonic() - t0
                used = {pid: (cpu_ticks(pid) - before[pid]) / CLK_TCK for pid in pids}
                result["idle_cpu_percent"] = 100.0 * sum(used.values()) / elapsed
                detail = ", ".join(f"{pid}: {100 * s / elapsed:.2f}%" for pid, s in used.items())
                print(
                    f"  idle CPU over {elapsed:.1f} s: {result['idle_cpu_percent']:.2f}% ({detail})",
                    flush=True,
                )
            t_sig = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=30)
            result["sigterm_to_exit_s"] = time.monotonic() - t_sig
            if code != 0:
                raise RuntimeError(f"exit status {code} after SIGTERM:\n{_tail(root)}")
            leftovers = [pid for pid in kids if Path(f"/proc/{pid}").exists()]
            if leftovers:
                raise RuntimeError(f"children left behind: {leftovers}")
            print(f"  SIGTERM -> exit 0 in {result['sigterm_to_exit_s']:.3f} s", flush=True)
            return result
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()


def version_time() -> float:
    began = time.monotonic()
    done = subprocess.run([SCRIPT, "--version"], capture_output=True, text=True, check=True)
    took = time.monotonic() - began
    if not done.stdout.startswith("esper-weatherlight-service "):
        raise RuntimeError(f"unexpected --version output: {done.stdout!r}")
    return took


def _tail(root: Path) -> str:
    return "\n".join((root / "service.log").read_text(errors="replace").splitlines()[-20:])


def compile_package() -> None:
    """Byte-compile the installed package first, as an installed service runs.

    A wheel install compiles at install time and an editable one on first
    import, unless ``PYTHONDONTWRITEBYTECODE`` is set (as on some CI machines):
    then every start would compile the sources again and measure that instead.
    """
    import esper

    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", str(Path(esper.__file__).parent)],
        check=True,
        stdout=subprocess.DEVNULL,
    )


def main() -> None:
    compile_package()
    runs = [one_run(i, measure_idle=(i == 0)) for i in range(RUNS)]
    versions = [version_time() for _ in range(RUNS)]
    print(f"--version: {', '.join(f'{v:.3f}' for v in versions)} s", flush=True)
    summary = {
        "boot_to_ready_s": round(statistics.median(r["boot_to_ready_s"] for r in runs), 3),
        "sigterm_to_exit_s": round(statistics.median(r["sigterm_to_exit_s"] for r in runs), 3),
        "idle_cpu_percent": round(runs[0]["idle_cpu_percent"], 3),
        "rss_mb": round(statistics.median(r["rss_mb"] for r in runs), 1),
        "version_s": round(statistics.median(versions), 3),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
