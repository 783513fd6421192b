"""The SQL catalogue: schema, engine, additive migration and row <-> record mapping.

One table, ``urza_kernels``, through SQLAlchemy 2 - a SQLite file by default
(WAL journal, busy timeout and ``synchronous=NORMAL`` set on every
connection, so several processes can share it) or PostgreSQL
(``postgresql://`` is rewritten to the psycopg 3 driver). The schema is
created at start under a lock (a PostgreSQL advisory lock, SQLite's write
lock), so any number of replicas may start at once against an empty database;
``urza_schema_version`` records the version and missing columns are added
(additive migration), so an older catalogue keeps working.
Tiers are stored by enum *name* so the column stays readable; the numeric
form is accepted when reading.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

from google.protobuf import json_format
from sqlalchemy import (
    BigInteger,
    Column,
    Engine,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    delete,
    event,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import Connection, make_url

from esper.leyline import leyline_pb2
from esper.urza import artifact as fmt
from esper.urza.records import UrzaRecord

SCHEMA_VERSION = 1
#: PostgreSQL advisory-lock key held while the schema is created or migrated.
#: Advisory locks are per database, so one constant serialises every
#: replica's schema step, whatever its search path.
SCHEMA_LOCK_KEY = 0x5572_7A61_5363_6801

_metadata = MetaData()
kernels_table = Table(
    "urza_kernels",
    _metadata,
    Column("blueprint_id", String(64), primary_key=True),
    Column("name", String(128), nullable=False),
    Column("tier", String(40), nullable=False),
    Column("descriptor_json", Text, nullable=False),
    Column("artifact_path", String(255), nullable=False),
    Column("checksum", String(64), nullable=False),
    Column("guard_digest", String(64), nullable=False),
    Column("compile_ms", Float, nullable=False),
    Column("prewarm_json", Text, nullable=False),
    Column("file_size", BigInteger, nullable=False),
    Column("mtime_ns", BigInteger, nullable=False),
    Column("width", Integer, nullable=False),
    Column("dtype", String(16), nullable=False),
    Column("updated_at", Float, nullable=False),
)
version_table = Table("urza_schema_version", _metadata, Column("version", Integer, primary_key=True))


def normalize_database_url(url: str) -> str:
    """Use the psycopg 3 driver for plain ``postgresql://`` / ``postgres://`` URLs."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def make_engine(url: str, *, busy_timeout_ms: int = 5000) -> Engine:
    url = normalize_database_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if database and database != ":memory:" and not database.startswith("file:"):
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": busy_timeout_ms / 1000}
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
            _enable_wal(cur, busy_timeout_ms / 1000)
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


def _enable_wal(cur: Any, timeout_s: float) -> None:
    """Switch the file to WAL, waiting up to ``timeout_s`` for the exclusive lock it takes.

    SQLite answers "database is locked" at once, without its busy handler,
    when another connection holds a lock while a new file is converted - as
    happens when replicas open one new catalogue together - so the wait is
    done here. A file already in WAL mode needs no lock and returns at once.
    """
    deadline = time.monotonic() + timeout_s
    delay = 0.002
    while True:
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
        time.sleep(delay)  # no event to wait on: the lock holder is another process
        delay = min(delay * 2, 0.05)


def ensure_schema(engine: Engine, *, lock_timeout_ms: int = 60_000) -> None:
    """Create the tables, add any missing column and record the schema version, under a lock.

    Replicas starting together against an empty database would otherwise
    race: both see no table, both create it, and one fails. The whole check,
    creation and migration runs in one transaction that first takes the
    database's lock (:func:`locked_transaction` on :data:`SCHEMA_LOCK_KEY`),
    so the second replica finds the finished schema.
    """
    with locked_transaction(engine, SCHEMA_LOCK_KEY, lock_timeout_ms=lock_timeout_ms) as conn:
        _metadata.create_all(conn, checkfirst=True)
        existing = {c["name"] for c in inspect(conn).get_columns(kernels_table.name)}
        for column in kernels_table.columns:
            if column.name not in existing:  # additive migration: new nullable column
                ddl = column.type.compile(dialect=engine.dialect)
                conn.execute(text(f'ALTER TABLE {kernels_table.name} ADD COLUMN "{column.name}" {ddl}'))
        current = conn.execute(select(version_table.c.version)).scalars().all()
        if not current:
            conn.execute(version_table.insert().values(version=SCHEMA_VERSION))
        elif max(current) < SCHEMA_VERSION:  # pragma: no cover - first version
            conn.execute(version_table.update().values(version=SCHEMA_VERSION))


def artifact_lock_key(blueprint_id: str) -> int:
    """The advisory-lock key guarding one blueprint's files against a sweep (signed 64-bit)."""
    digest = hashlib.sha256(f"urza-artifacts:{blueprint_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


@contextmanager
def locked_transaction(engine: Engine, key: int, *, lock_timeout_ms: int = 60_000) -> Iterator[Connection]:
    """One transaction holding a database lock; commits on exit, rolls back on error.

    PostgreSQL: ``pg_advisory_xact_lock(key)`` as the transaction's first
    statement - the statements that follow run on the same connection, and
    the lock goes with the commit, the rollback or a dropped connection.
    ``lock_timeout`` bounds the wait, so a stuck peer yields an error rather
    than a hung boot. SQLite: ``BEGIN IMMEDIATE`` takes the file's one write
    lock (whatever ``key``) before anything is read; others wait for it up to
    the busy timeout. DDL is transactional in both.
    """
    if engine.dialect.name == "sqlite":
        with engine.connect() as conn:
            # The driver must not open transactions of its own: this one is BEGIN IMMEDIATE.
            conn.execution_options(isolation_level="AUTOCOMMIT")
            conn.exec_driver_sql("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                if conn.connection.driver_connection.in_transaction:  # type: ignore[union-attr]
                    conn.exec_driver_sql("ROLLBACK")
                raise
            conn.exec_driver_sql("COMMIT")
        return
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(text(f"SET LOCAL lock_timeout = {int(lock_timeout_ms)}"))
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})
        yield conn


def tier_name(tier: int) -> str:
    return leyline_pb2.BlueprintTier.Name(cast(Any, tier))


def _tier_value(text_value: str) -> int:
    return int(text_value) if text_value.isdigit() else int(leyline_pb2.BlueprintTier.Value(text_value))


def record_from_row(row: Any) -> UrzaRecord:
    """Map a row to a record; columns a migration added read as empty values."""
    m = row._mapping
    return UrzaRecord(
        blueprint_id=m["blueprint_id"],
        name=m["name"],
        tier=_tier_value(m["tier"]),
        descriptor_json=m["descriptor_json"],
        artifact_path=m["artifact_path"],
        checksum=m["checksum"] or "",
        guard_digest=m["guard_digest"] or "",
        compile_ms=float(m["compile_ms"] or 0.0),
        prewarm_samples=tuple(float(s) for s in json.loads(m["prewarm_json"] or "[]")),
        file_size=int(m["file_size"] or 0),
        mtime_ns=int(m["mtime_ns"] or 0),
        d=int(m["width"] or 0),
        dtype=m["dtype"] or "",
        updated_at=float(m["updated_at"] or 0.0),
    )


def row_for_save(
    descriptor: leyline_pb2.BlueprintDescriptor,
    manifest: fmt.Manifest,
    *,
    artifact_path: str,
    checksum: str,
    compile_ms: float,
    prewarm_samples: Sequence[float],
    st: os.stat_result,
) -> dict[str, Any]:
    """The column values for a freshly stored artifact (``st`` is the stat of its file)."""
    return {
        "blueprint_id": descriptor.blueprint_id,
        "name": descriptor.name,
        "tier": tier_name(descriptor.tier),
        "descriptor_json": json_format.MessageToJson(
            descriptor, preserving_proto_field_name=True, indent=None, sort_keys=True
        ),
        "artifact_path": artifact_path,
        "checksum": checksum,
        "guard_digest": manifest.guard_digest,
        "compile_ms": float(compile_ms),
        "prewarm_json": json.dumps(list(prewarm_samples)),
        "file_size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "width": manifest.d,
        "dtype": manifest.dtype,
        "updated_at": time.time(),
    }


def upsert_row(conn: Connection, row: Mapping[str, Any]) -> None:
    """Insert or replace one row (inside the caller's transaction)."""
    dialect = conn.dialect.name
    values = dict(row)
    if dialect in ("sqlite", "postgresql"):
        from sqlalchemy.dialects import postgresql, sqlite

        dialect_insert: Any = sqlite.insert if dialect == "sqlite" else postgresql.insert
        stmt = dialect_insert(kernels_table).values(**values)
        stmt = stmt.on_conflict_do_update(
            index_elements=[kernels_table.c.blueprint_id],
            set_={k: stmt.excluded[k] for k in values if k != "blueprint_id"},
        )
        conn.execute(stmt)
    else:  # pragma: no cover - other dialects
        conn.execute(delete(kernels_table).where(kernels_table.c.blueprint_id == values["blueprint_id"]))
        conn.execute(kernels_table.insert().values(**values))


def artifact_path_of(conn: Connection, blueprint_id: str) -> str | None:
    """The relative artifact path the row for ``blueprint_id`` points at, if there is a row."""
    path = conn.execute(
        select(kernels_table.c.artifact_path).where(kernels_table.c.blueprint_id == blueprint_id)
    ).scalar()
    return None if path is None else str(path)
