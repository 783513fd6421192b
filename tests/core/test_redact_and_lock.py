"""URL masking (helper, settings, logs) and the instance lock across real processes."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from esper.core import AlreadyRunning, InstanceLock, configure_logging, get_logger, mask_url
from esper.core.instance_lock import ensure_free
from esper.core.settings import EsperSettings


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("redis://:pw@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
        ("redis://user:pw@h:1/0", "redis://user:***@h:1/0"),
        (
            "postgresql+psycopg://u:p%40ss@db:5432/e?sslmode=require",
            "postgresql+psycopg://u:***@db:5432/e?sslmode=require",
        ),
        ("postgresql://u@db/e?password=zz&a=1", "postgresql://u@db/e?password=***&a=1"),
        (
            "Error connecting to redis://:s3cret@10.0.0.5:6379/0.",
            "Error connecting to redis://:***@10.0.0.5:6379/0.",
        ),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("sqlite:///./var/urza/catalog.db", "sqlite:///./var/urza/catalog.db"),
        ("mail me at a@b.c", "mail me at a@b.c"),
    ],
)
def test_mask_url(raw: str, shown: str) -> None:
    assert mask_url(raw) == shown


def test_settings_mask_url_passwords(isolated_env: Path) -> None:
    settings = EsperSettings(
        redis_url="redis://:hunter2@redis:6379/0",
        urza_database_url="postgresql://esper:hunter3@db/esper",
    )
    view = settings.masked()
    assert view["REDIS_URL"] == "redis://:***@redis:6379/0"
    assert view["URZA_DATABASE_URL"] == "postgresql://esper:***@db/esper"


def test_logs_mask_passwords_in_fields_and_tracebacks(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO", "json")
    log = get_logger("esper.test")
    try:
        raise ConnectionError("cannot reach redis://:hunter2@10.0.0.5:6379/0")
    except ConnectionError as exc:
        log.error("connect failed", url="redis://:hunter2@10.0.0.5:6379/0", exc_info=exc)
    err = capsys.readouterr().err
    assert "hunter2" not in err
    line = json.loads(err.strip().splitlines()[-1])
    assert line["url"] == "redis://:***@10.0.0.5:6379/0"
    assert "Traceback" in line["exception"]
    assert "redis://:***@10.0.0.5:6379/0" in line["exception"]


_HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from esper.core.instance_lock import InstanceLock
    InstanceLock(Path(sys.argv[1])).acquire()
    print("held", flush=True)
    time.sleep(600)
    """
)


def test_one_holder_per_var_dir_and_a_killed_holder_never_blocks(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(AlreadyRunning, match=f"already running, pid {holder.pid}"):
            InstanceLock(tmp_path).acquire()
        with pytest.raises(AlreadyRunning) as probed:
            ensure_free(tmp_path)
        assert probed.value.pid == holder.pid
    finally:
        holder.kill()  # SIGKILL: no clean-up code runs
        holder.wait()
    ensure_free(tmp_path)
    with InstanceLock(tmp_path) as lock:
        assert lock.held
    ensure_free(tmp_path)  # released again
    ensure_free(tmp_path / "never-used")  # a var dir that does not exist is free (and is not created)
    assert not (tmp_path / "never-used").exists()
