"""A shortened demo run end to end: real processes, real bus, a real graft."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_short_demo_grafts_a_bus_fetched_kernel(tmp_path: Path, isolated_env: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "from esper.demo.cli import main; main()",
            "--epochs",
            "3",
            "--limit",
            "500",
            "--workdir",
            str(tmp_path / "demo"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
        check=False,
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    lines = out.splitlines()
    grafts = next(line for line in lines if line.startswith("grafts: "))
    assert grafts != "grafts: none"
    assert "seed-1:BP" in grafts
    # Three epoch rows with held-out accuracy measured by the trainer.
    rows = [line.split() for line in lines if line.strip()[:1].isdigit() and len(line.split()) >= 4]
    assert [int(r[0]) for r in rows] == [1, 2, 3]
    assert all(0.0 < float(r[3]) <= 1.0 for r in rows)
    nissa = next(line for line in lines if line.startswith("Nissa saw series from: "))
    for source in ("kasmina", "oona", "tolaria", "weatherlight"):
        assert source in nissa
    assert "missing" not in nissa
    plot = tmp_path / "demo" / "esper-demo.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
