"""Replicas opening the library at once against an empty catalogue all succeed.

Three real processes import everything and say they are ready; each round
then releases them together (one line on stdin each), so their schema
creation overlaps as closely as processes can make it. Every round uses a new
empty database: a fresh PostgreSQL schema or a fresh SQLite file.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from _postgres import private_schema
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError

from esper.urza.catalog import SCHEMA_LOCK_KEY, SCHEMA_VERSION, ensure_schema, make_engine

ROUNDS = 10
REPLICAS = 3

_OPEN = """
import sys
from prometheus_client import CollectorRegistry
from esper.urza import UrzaLibrary

print("ready", flush=True)
for line in sys.stdin:
    artifact_dir, database_url = line.rstrip("\\n").split("\\t")
    try:
        library = UrzaLibrary(artifact_dir, database_url, registry=CollectorRegistry())
        library.list_all()
        library.close()
    except Exception as exc:
        message = " ".join(str(exc).split())[:300]
        print(f"failed {type(exc).__name__}: {message}", flush=True)
    else:
        print("opened", flush=True)
"""


class Replicas:
    """Processes that each open the library once per round, all released by the same write."""

    def __init__(self, count: int) -> None:
        self.procs = [
            subprocess.Popen(
                [sys.executable, "-c", _OPEN],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                bufsize=1,
            )
            for _ in range(count)
        ]
        for line in self._replies():
            assert line == "ready", line

    def _replies(self) -> list[str]:
        replies = []
        for proc in self.procs:
            assert proc.stdout is not None
            replies.append(proc.stdout.readline().strip())
        return replies

    def open_at_once(self, artifact_dir: Path, database_url: str) -> list[str]:
        """Every replica opens the library; the failure lines of those that could not."""
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.write(f"{artifact_dir}\t{database_url}\n")
            proc.stdin.flush()
        return [reply for reply in self._replies() if reply != "opened"]

    def close(self) -> None:
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.close()
        for proc in self.procs:
            proc.wait(timeout=30)


@pytest.fixture
def replicas() -> Iterator[Replicas]:
    group = Replicas(REPLICAS)
    try:
        yield group
    finally:
        group.close()


def _assert_one_schema(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            versions = conn.execute(text("SELECT version FROM urza_schema_version")).scalars().all()
            assert versions == [SCHEMA_VERSION]
            assert conn.execute(text("SELECT count(*) FROM urza_kernels")).scalar() == 0
    finally:
        engine.dispose()


@pytest.mark.slow
@pytest.mark.postgres
def test_replicas_boot_at_once_on_an_empty_postgres_catalogue(tmp_path: Path, replicas: Replicas) -> None:
    url = os.environ.get("ESPER_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("ESPER_TEST_POSTGRES_URL is not set")
    failures: list[str] = []
    for n in range(ROUNDS):
        with private_schema(url, "esper_boot") as database_url:
            failures += [
                f"round {n}: {f}" for f in replicas.open_at_once(tmp_path / f"artifacts-{n}", database_url)
            ]
            _assert_one_schema(database_url)
    assert failures == []


@pytest.mark.slow
def test_replicas_boot_at_once_on_one_new_sqlite_file(tmp_path: Path, replicas: Replicas) -> None:
    failures: list[str] = []
    for n in range(ROUNDS):
        database_url = f"sqlite:///{tmp_path / f'catalog-{n}.db'}"
        failures += [
            f"round {n}: {f}" for f in replicas.open_at_once(tmp_path / f"artifacts-{n}", database_url)
        ]
        _assert_one_schema(database_url)
    assert failures == []


@pytest.mark.postgres
def test_postgres_schema_step_waits_for_the_advisory_lock(tmp_path: Path) -> None:
    """While another session holds the schema lock, creating the schema waits (here: times out)."""
    url = os.environ.get("ESPER_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("ESPER_TEST_POSTGRES_URL is not set")
    import psycopg

    with private_schema(url, "esper_boot") as database_url:
        engine = make_engine(database_url)
        try:
            with psycopg.connect(url) as holder:
                holder.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK_KEY,))
                with pytest.raises(OperationalError, match="lock timeout"):
                    ensure_schema(engine, lock_timeout_ms=200)
            ensure_schema(engine, lock_timeout_ms=200)  # lock released with the holder's transaction
        finally:
            engine.dispose()
        _assert_one_schema(database_url)
