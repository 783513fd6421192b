"""The demo end to end: real processes, real bus, a real graft, and the baselines it is measured against."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import redis
from dotenv import dotenv_values

from esper.core.redis_server import RedisServer, embedded_options
from esper.security import KeyRing


def run_demo(tmp_path: Path, *args: str, **env_extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env.update(env_extra)
    return subprocess.run(
        [
            sys.executable,
            "-c",
            "from esper.demo.cli import main; main()",
            "--workdir",
            str(tmp_path / "demo"),
            *args,
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
        check=False,
    )


def section(lines: list[str], header: str) -> list[str]:
    """The rows under the table whose header line starts with ``header`` (up to the next blank line)."""
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2 :]:  # skip the header and its rule
        if not line.strip():
            break
        rows.append(line)
    return rows


def test_short_demo_grafts_a_bus_fetched_kernel_and_compares_three_runs(
    tmp_path: Path, isolated_env: Path
) -> None:
    result = run_demo(tmp_path, "--epochs", "3", "--limit", "500")
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "no ESPER_LEYLINE_SECRET set: using a one-off secret for this demo run" in out
    lines = out.splitlines()
    grafts = next(line for line in lines if line.startswith("grafts: "))
    assert grafts != "grafts: none"
    assert "seed-1:BP" in grafts
    assert not any(line.startswith("no seed was grafted") for line in lines)

    # The live table: one aligned row per epoch, held-out accuracy measured by the trainer.
    live = section(lines, "epoch  train loss")
    assert [int(row.split()[0]) for row in live] == [1, 2, 3]
    assert all(0.0 < float(row.split()[3]) <= 1.0 for row in live)
    seeds_column = lines[
        next(i for i, line in enumerate(lines) if line.startswith("epoch  train loss"))
    ].index("seeds")
    assert all(row[seeds_column - 2 : seeds_column] == "  " for row in live)

    # The three runs, per epoch and in the summary.
    compared = section(lines, "epoch  grown")
    assert [int(row.split()[0]) for row in compared] == [1, 2, 3]
    summary, verdict = section(lines, "run ")[:3], section(lines, "run ")[3]
    assert verdict.startswith("highest final held-out accuracy: ")
    names = [row.split("  ")[0].strip() for row in summary]
    assert names[0] == "grown"
    assert names[1] == "host only"
    assert names[2].startswith("static, hidden ")
    for row in summary:
        params, accuracy, loss = row[len(names[2]) :].split()[:3]
        assert int(params) > 0
        assert 0.0 < float(accuracy) <= 1.0
        assert float(loss) > 0.0
    grown_params, host_params = (int(row[len(names[2]) :].split()[0]) for row in summary[:2])
    assert grown_params > host_params  # the grafted kernels count

    nissa = next(line for line in lines if line.startswith("Nissa saw series from: "))
    for source in ("kasmina", "oona", "tolaria", "weatherlight"):
        assert source in nissa
    assert "missing" not in nissa
    plot = tmp_path / "demo" / "esper-demo.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_one_epoch_is_refused_with_the_reason(tmp_path: Path, isolated_env: Path) -> None:
    result = run_demo(tmp_path, "--epochs", "1")
    assert result.returncode == 2
    assert "a 1-epoch run can never graft" in result.stderr
    assert not (tmp_path / "demo").exists()  # refused before anything started


def test_a_run_without_a_graft_says_why_and_exits_3(tmp_path: Path, isolated_env: Path) -> None:
    # The demo signs with the secret that esper-config init wrote to .env, shared with every tool here.
    init = subprocess.run(
        [str(Path(sys.executable).with_name("esper-config")), "init"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    assert init.returncode == 0, init.stderr
    secret = str(dotenv_values(tmp_path / ".env")["ESPER_LEYLINE_SECRET"])
    # In conservative mode the platform's Tamiyo pauses instead of germinating.
    result = run_demo(
        tmp_path, "--epochs", "2", "--limit", "300", "--no-nissa", TAMIYO_CONSERVATIVE_MODE="true"
    )
    out = result.stdout
    assert result.returncode == 3, out + result.stderr
    assert "one-off secret" not in out
    assert secret not in out + result.stderr
    server = RedisServer(embedded_options(tmp_path / "demo" / "var"))  # the demo's bus, kept on disk
    server.start()
    try:
        client = redis.Redis.from_url(server.url)
        entries = client.xrange("oona.telemetry", count=20)
        client.close()
    finally:
        server.stop()
    assert entries
    keys = KeyRing(secret.encode())
    for _entry_id, fields in entries:
        assert keys.verify(fields[b"payload"], fields[b"signature"], fields[b"kid"].decode())
    lines = out.splitlines()
    assert "grafts: none" in lines
    reason = next(line for line in lines if line.startswith("no seed was grafted: "))
    assert "the controller germinated nothing" in reason
    assert "pause_triggered" in reason
    summary = section(lines, "run ")
    assert [row.split("  ")[0].strip() for row in summary][:2] == ["grown", "host only"]
