"""examples/grow_your_model.py end to end, as a user runs it, against a real Weatherlight."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from _platform_support import platform_env, running_platform

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "grow_your_model.py"


def test_the_regression_example_grows_a_seed_and_its_held_out_loss_falls(tmp_path: Path) -> None:
    env = platform_env(tmp_path)
    with running_platform(tmp_path, env):
        # The example finds the platform as a user's script would: the embedded server under ./var.
        result = subprocess.run(
            [sys.executable, str(EXAMPLE), "--epochs", "12"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    epochs = [line for line in out.splitlines() if line.startswith("epoch ")]
    assert len(epochs) == 12
    first, last = map(float, re.search(r"held-out MSE ([\d.]+) -> ([\d.]+)", out).groups())  # type: ignore[union-attr]
    assert last < first
    before, after = map(int, re.search(r"parameters (\d+) -> (\d+)", out).groups())  # type: ignore[union-attr]
    assert after > before
    # The graft lands between epochs: in the first epoch that lists the seed, its kernel already trained.
    first_seen = next(line for line in epochs if "seed-1:" in line)
    assert not re.search(r"seed-1:BP\d{3}:germinated", first_seen), first_seen
    grafts = next(line for line in out.splitlines() if line.startswith("grafts: "))
    assert re.search(r"epoch \d+: seed-1:BP\d{3}", grafts), grafts
    password = (tmp_path / "var" / "redis" / "password").read_text().strip()
    assert "redis://:***@127.0.0.1:" in out
    assert password not in out + result.stderr
