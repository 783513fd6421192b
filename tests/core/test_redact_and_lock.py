"""URL masking (helper, settings, logs) and the instance lock across real processes."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from esper.core import AlreadyRunning, InstanceLock, configure_logging, get_logger, mask_url
from esper.core.instance_lock import ensure_free
from esper.core.logs import FIELD_LIMIT
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
        # an unescaped '@' in the password: clients split at the last '@', so do we
        ("redis://:p@ss@host:6379/0", "redis://:***@host:6379/0"),
        ("unix://:pw@/run/redis.sock?db=0", "unix://:***@/run/redis.sock?db=0"),
        (
            "rediss://default:pw@h:1 then postgresql://a:b@c/d",
            "rediss://default:***@h:1 then postgresql://a:***@c/d",
        ),
        ('{"url": "redis://:pw@h:1/0"}', '{"url": "redis://:***@h:1/0"}'),
        # a lone user part of a Redis URL may well be a password; of a database URL it is a user
        ("redis://s3cret@h:6379/0", "redis://***@h:6379/0"),
        ("redis://p@ss@h:6379/0", "redis://***@h:6379/0"),
        ("redis://h:6379/0?client_name=a@b", "redis://h:6379/0?client_name=a@b"),
        ("redis+sentinel://s3cret@a:1,b:2/main", "redis+sentinel://***@a:1,b:2/main"),
        ("postgresql://postgres@db/e", "postgresql://postgres@db/e"),
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


def test_mask_url_is_linear_on_hostile_text() -> None:
    """A long run of scheme-like characters must not make masking quadratic (it runs on every log line)."""
    hostile = "a." * 200_000 + "redis://:pw@h/0"
    assert mask_url(hostile).endswith("redis://:***@h/0")
    assert mask_url("x://:" + "a@" * 200_000).startswith("x://:***@")
    assert mask_url("redis://" + "a@" * 200_000).startswith("redis://***@")
    assert mask_url("redis://a" * 100_000) == "redis://a" * 100_000


def test_logs_mask_passwords_inside_object_reprs(capsys: pytest.CaptureFixture[str]) -> None:
    """Not only string fields: an object whose repr holds a URL (settings, an exception) is masked too."""
    settings = EsperSettings(redis_url="redis://:hunter2@redis:6379/0", leyline_secret="x" * 32)
    for fmt in ("json", "console"):
        configure_logging("INFO", fmt)  # type: ignore[arg-type]
        get_logger("esper.test").info("objects", settings=settings, error=ConnectionError(settings.redis_url))
        logging.getLogger("esper.stdlib").warning("stdlib %r", settings)
        err = capsys.readouterr().err
        assert "hunter2" not in err, fmt
        assert err.count("redis://:***@redis:6379/0") == 3, err


def test_json_log_lines_stay_valid_whatever_the_password_holds(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO", "json")
    urls = ['postgresql://u@db/e?password=q"}{,x', 'redis://:q"}{@h:1/0']
    get_logger("esper.test").info("urls", first=urls[0], both=urls, error=ValueError(urls[1]))
    err = capsys.readouterr().err
    line = json.loads(err.strip().splitlines()[-1])
    assert line["first"] == "postgresql://u@db/e?password=***"
    assert line["both"] == ["postgresql://u@db/e?password=***", "redis://:***@h:1/0"]
    assert 'q\\"' not in err


def test_logging_follows_the_current_stderr(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stream swapped out and closed after set-up (as pytest does between tests) is never written to."""
    first = io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    configure_logging("INFO", "json")
    get_logger("esper.test").info("one")
    first.close()
    second = io.StringIO()
    monkeypatch.setattr(sys, "stderr", second)
    get_logger("esper.test").info("two")
    logging.getLogger("esper.stdlib").warning("three")
    logging.getLogger().handlers[0].flush()
    lines = [json.loads(line)["event"] for line in second.getvalue().splitlines()]
    assert lines == ["two", "three"]


def test_long_fields_are_bounded_and_escaped(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO", "console")
    hostile = "id\nfake line\x1b[31m" + "x" * 1_000_000
    payload = b"\x00" * 100_000
    get_logger("esper.test").warning("huge", request_id=hostile, payload=payload, source="a\nb\x1b[2J")
    err = capsys.readouterr().err
    assert len(err) < 3 * FIELD_LIMIT
    assert err.count("\n") == 1  # one line: the newline inside the id is shown escaped
    assert "\x1b" not in err  # no raw escape sequence reaches the terminal
    assert err.count("fake line") == 1
    assert f"...[{len(hostile)} chars]" in err
    assert f"...[{len(repr(payload))} chars]" in err  # an object is bounded as its repr
    assert "a\\x0ab\\x1b[2J" in err  # short values are escaped too


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
