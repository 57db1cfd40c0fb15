"""Versioned schema migrations, recorded in `schema_version`.

Why not Alembic: the schema is a handful of tables owned by this one package, there is
no autogeneration to gain, and the service must migrate by itself on start, from
several hosts at once, with no `alembic.ini` or script directory to install. A list of
numbered steps, each run in one transaction under a lock that every host takes first
(PostgreSQL: a transaction-scoped advisory lock; SQLite: BEGIN IMMEDIATE), gives that:
the first host migrates, the others wait, then find nothing left to do.

Each step's DDL is frozen here, written for the version it creates; `schema.py` is what
the newest step leaves.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from sqlalchemy import (
    Boolean,
    Column,
    Connection,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    inspect,
    select,
    text,
)

from runner.service.store.base import StoreError

# Any constant shared by all hosts: the advisory lock that serialises migrations.
_PG_LOCK_KEY = 0x41_49_52_4C_4F_43_4B  # "AIRLOCK"


def _v1(conn: Connection) -> None:
    md = MetaData()
    Table(
        "runs", md,
        Column("id", String(64), primary_key=True),
        Column("tenant", String(128), nullable=False),
        Column("status", String(16), nullable=False),
        Column("request", Text, nullable=False),
        Column("created_at", Float, nullable=False),
        Column("claimed_at", Float),
        Column("started_at", Float),
        Column("ended_at", Float),
        Column("host_id", String(128)),
        Column("run_dir", Text),
        Column("container", String(128)),
        Column("exit_code", Integer),
        Column("exit_reason", String(64)),
        Column("usage", Text, nullable=False),
        Column("cancel_requested", Boolean, nullable=False),
        Index("runs_queue", "status", "tenant", "created_at"),
        Index("runs_tenant", "tenant", "created_at"),
        Index("runs_host", "host_id", "status"),
    )
    Table("tenant_sched", md,
          Column("tenant", String(128), primary_key=True),
          Column("vtime", Float, nullable=False))
    clock = Table("sched_clock", md,
                  Column("id", Integer, primary_key=True, autoincrement=False),
                  Column("vtime", Float, nullable=False))
    Table("hosts", md,
          Column("host_id", String(128), primary_key=True),
          Column("address", Text),
          Column("started_at", Float, nullable=False),
          Column("heartbeat_at", Float, nullable=False),
          Column("expires_at", Float, nullable=False),
          Column("alive", Boolean, nullable=False))
    Table("usage_daily", md,
          Column("tenant", String(128), primary_key=True),
          Column("day", String(10), primary_key=True),
          Column("metric", String(64), primary_key=True),
          Column("value", Float, nullable=False))
    md.create_all(conn)
    conn.execute(clock.insert().values(id=1, vtime=0.0))


MIGRATIONS: list[tuple[int, str, Callable[[Connection], None]]] = [
    (1, "runs, fair-queue clocks, host leases, daily usage", _v1),
]
LATEST = MIGRATIONS[-1][0]


def _version_table() -> Table:
    return Table("schema_version", MetaData(),
                 Column("version", Integer, primary_key=True, autoincrement=False),
                 Column("description", Text, nullable=False),
                 Column("applied_at", Float, nullable=False))


def migrate(conn: Connection) -> list[int]:
    """Bring the database to LATEST inside the caller's (locked) transaction; return the
    versions applied. A database newer than this code is refused, not touched."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK_KEY})
    versions = _version_table()
    if not inspect(conn).has_table("schema_version"):
        versions.create(conn)
    done = set(conn.execute(select(versions.c.version)).scalars())
    newest = max(done, default=0)
    if newest > LATEST:
        raise StoreError(f"the database's schema is version {newest}, newer than this "
                         f"Airlock knows ({LATEST}): upgrade Airlock on this host")
    applied = []
    for version, description, step in MIGRATIONS:
        if version in done:
            continue
        step(conn)
        conn.execute(versions.insert().values(version=version, description=description,
                                              applied_at=time.time()))
        applied.append(version)
    return applied
