"""The tables as the newest migration leaves them (queries use these definitions).

Changing a table here needs a new migration in `migrations.py` that makes the same
change; tests compare a migrated database with these definitions.
"""

from __future__ import annotations

from sqlalchemy import (
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)

metadata = MetaData()

runs = Table(
    "runs", metadata,
    Column("id", String(64), primary_key=True),
    Column("tenant", String(128), nullable=False),
    Column("status", String(16), nullable=False),
    Column("request", Text, nullable=False),  # JSON
    Column("created_at", Float, nullable=False),
    Column("claimed_at", Float),
    Column("started_at", Float),
    Column("ended_at", Float),
    Column("host_id", String(128)),
    Column("run_dir", Text),
    Column("container", String(128)),
    Column("exit_code", Integer),
    Column("exit_reason", String(64)),
    Column("usage", Text, nullable=False),  # JSON object of counters
    Column("cancel_requested", Boolean, nullable=False),
    Index("runs_queue", "status", "tenant", "created_at"),
    Index("runs_tenant", "tenant", "created_at"),
    Index("runs_host", "host_id", "status"),
)

# Weighted fair queueing: each tenant's virtual time, and the system's (one row, id 1).
tenant_sched = Table(
    "tenant_sched", metadata,
    Column("tenant", String(128), primary_key=True),
    Column("vtime", Float, nullable=False),
)

sched_clock = Table(
    "sched_clock", metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("vtime", Float, nullable=False),
)

hosts = Table(
    "hosts", metadata,
    Column("host_id", String(128), primary_key=True),
    Column("address", Text),
    Column("started_at", Float, nullable=False),
    Column("heartbeat_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
    Column("alive", Boolean, nullable=False),
)

usage_daily = Table(
    "usage_daily", metadata,
    Column("tenant", String(128), primary_key=True),
    Column("day", String(10), primary_key=True),  # YYYY-MM-DD, UTC
    Column("metric", String(64), primary_key=True),
    Column("value", Float, nullable=False),
)

schema_version = Table(
    "schema_version", metadata,
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("description", Text, nullable=False),
    Column("applied_at", Float, nullable=False),
)
