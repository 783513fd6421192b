"""A private PostgreSQL schema for one test (or one round of one), dropped afterwards.

Why a schema, not a database: the server the tests are given may allow only
one database, and a schema per test still keeps every test's rows and tables
apart. The URL it yields selects the schema through ``search_path``.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def private_schema(url: str, prefix: str = "esper_test") -> Iterator[str]:
    """An SQLAlchemy (psycopg) URL whose tables live in a fresh schema of ``url``'s database."""
    import psycopg

    plain = url.replace("postgresql+psycopg://", "postgresql://", 1)
    schema = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    sep = "&" if "?" in plain else "?"
    driver_url = plain.replace("postgresql://", "postgresql+psycopg://", 1)
    scoped = f"{driver_url}{sep}options=-csearch_path%3D{schema}"
    try:
        yield scoped
    finally:
        with psycopg.connect(plain, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
