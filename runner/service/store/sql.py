"""The store on SQLAlchemy 2 Core: SQLite by default, PostgreSQL (psycopg 3) by URL.

Why SQLAlchemy Core and psycopg 3: one set of typed queries serves both databases,
and the dialects carry what differs (upserts, `FOR UPDATE SKIP LOCKED`, connection
pools, reconnects after a database restart) without an ORM's session and identity map,
which a queue that is written from several hosts has no use for. psycopg 3 is the
maintained PostgreSQL driver (SQLAlchemy's `postgresql+psycopg`), and `sqlite3` comes
with Python: the single-host default needs nothing installed.

Atomicity. SQLite: every writing call is `BEGIN IMMEDIATE` (one writer at a time,
others wait up to 30 s), reads see a snapshot (WAL). PostgreSQL (READ COMMITTED):
creating a run first locks its tenant's scheduling row, so the quota checks and the
insert are atomic per tenant; a claim first locks the one scheduling clock row, so
claims from all hosts are serialised (a claim is a few indexed queries, once per run
start) and the fair order is decided over the whole queue, then takes its run with
`FOR UPDATE SKIP LOCKED`. Locks are always taken in the order clock -> tenant -> run
-> usage rows (sorted), so no two calls deadlock.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, cast

from sqlalchemy import (
    Connection,
    Engine,
    Row,
    Table,
    and_,
    create_engine,
    event,
    func,
    or_,
    select,
    update,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, make_url
from sqlalchemy.pool import StaticPool

from runner.service.store import schema as S
from runner.service.store.base import (
    ENDED,
    PEAK_PREFIX,
    TOKENS,
    HostRecord,
    Quota,
    QuotaExceeded,
    RunRecord,
    Store,
    StoreError,
)
from runner.service.store.migrations import migrate

BUSY_TIMEOUT_S = 30
QUEUE_RETRY_AFTER_S = 10  # a full queue frees up as runs start: come back soon


def new_run_id() -> str:
    """Sortable by creation and unguessable: the run's directory and container label too."""
    return datetime.now(UTC).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(5)


def _day(ts: float | None = None) -> str:
    return datetime.fromtimestamp(time.time() if ts is None else ts, UTC).strftime("%Y-%m-%d")


def _day_bounds(now: float) -> tuple[float, float]:
    start = datetime.fromtimestamp(now, UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return start.timestamp(), (start + timedelta(days=1)).timestamp()


_AGENT_HEAD = re.compile(r'^\{"agent":"([A-Za-z0-9_-]{1,32})"')


def _record(row: Row[Any], summary: bool = False) -> RunRecord:
    m = row._mapping
    if summary:  # a listing: the agent from the request's head (create_run writes it first)
        found = _AGENT_HEAD.match(m["request_head"] or "")
        request: dict[str, Any] = {"agent": found.group(1)} if found else {}
    else:
        request = json.loads(m["request"])
    return RunRecord(
        id=m["id"], tenant=m["tenant"], status=m["status"], request=request,
        created_at=m["created_at"], claimed_at=m["claimed_at"], started_at=m["started_at"],
        ended_at=m["ended_at"], host_id=m["host_id"], run_dir=m["run_dir"],
        container=m["container"], exit_code=m["exit_code"], exit_reason=m["exit_reason"],
        usage=json.loads(m["usage"] or "{}"), cancel_requested=bool(m["cancel_requested"]),
    )


def _merge(old: Mapping[str, float], new: Mapping[str, float], *, add: bool) -> dict[str, float]:
    """Counters combined: peaks keep the largest; sums add (`add`) or keep the larger
    (a final total that includes what was added along the way)."""
    out = dict(old)
    for k, v in new.items():
        v = float(v)
        if k.startswith(PEAK_PREFIX) or not add:
            out[k] = max(out.get(k, v), v)
        else:
            out[k] = out.get(k, 0.0) + v
    return out


def _delta(old: Mapping[str, float], merged: Mapping[str, float]) -> dict[str, float]:
    out = {}
    for k, v in merged.items():
        if k.startswith(PEAK_PREFIX):
            if v > old.get(k, float("-inf")):
                out[k] = v
        elif v != old.get(k, 0.0):
            out[k] = v - old.get(k, 0.0)
    return out


def _normalise_url(url: str) -> URL:
    try:
        u = make_url(url)
    except sa_exc.ArgumentError:
        raise StoreError(f"database: {url!r} is not a database URL (sqlite:///PATH or "
                         "postgresql://USER@HOST/DB)") from None
    backend = u.get_backend_name()
    if backend == "sqlite":
        db = u.database or ""
        if db and db != ":memory:" and not db.startswith(("/", ".", "~")):
            # `sqlite:///var/lib/airlock/airlock.db` (the config's documented default)
            # names /var/lib/airlock/airlock.db, as a file: URL would; SQLAlchemy alone
            # would read a path relative to the service's working directory. A relative
            # path is written `sqlite:///./airlock.db`; `sqlite:////abs` works too.
            u = u.set(database="/" + db)
        return u.set(drivername="sqlite+pysqlite")
    if backend in ("postgresql", "postgres"):
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise StoreError("database: PostgreSQL needs the psycopg driver, which is not "
                             "installed; install Airlock with the 'postgres' extra "
                             "(pip install 'airlock[postgres]')") from None
        return u.set(drivername="postgresql+psycopg")
    raise StoreError(f"database: {backend!r} is not supported (sqlite or postgresql)")


def _private_file(path: Path) -> None:
    """The database file readable by the service's user only: it holds every tenant's
    requests. SQLite gives its -wal and -shm files the same mode."""
    if not path.parent.exists():
        path.parent.mkdir(parents=True, mode=0o700)
    try:
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        if path.stat().st_mode & 0o077:
            os.chmod(path, 0o600)  # made by something else, or an older Airlock
    except OSError as exc:
        raise StoreError(f"database {path}: {exc.strerror}") from None


class SqlStore(Store):
    def __init__(self, url: str) -> None:
        u = _normalise_url(url)
        self.url = u.render_as_string(hide_password=True)
        self._sqlite = u.get_backend_name() == "sqlite"
        self.engine = self._make_engine(u)
        self._closed = False
        self._lock = threading.Lock()
        try:
            with self._tx(write=True) as c:
                migrate(c)
        except BaseException:
            self.engine.dispose()
            raise

    def _make_engine(self, u: URL) -> Engine:
        if not self._sqlite:
            return create_engine(u, pool_pre_ping=True, pool_size=8, max_overflow=8)
        memory = u.database in (None, "", ":memory:")
        if not memory:
            assert u.database is not None
            _private_file(Path(u.database).expanduser())
        engine = create_engine(
            u,
            # The driver's own transaction handling is off: BEGIN is sent below, IMMEDIATE
            # for writes, so that a check and its write are one step.
            connect_args={"isolation_level": None, "check_same_thread": False,
                          "timeout": BUSY_TIMEOUT_S},
            **({"poolclass": StaticPool} if memory else {}),
        )

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, record: Any) -> None:
            cur = dbapi_conn.cursor()
            if not memory:
                # WAL: readers never wait for the writer; NORMAL syncs at checkpoints,
                # which keeps every committed transaction through a crash of the process.
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_S * 1000}")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Connection) -> None:
            conn.exec_driver_sql("BEGIN " + conn.get_execution_options().get("airlock_begin",
                                                                              "DEFERRED"))

        return engine

    @contextmanager
    def _tx(self, *, write: bool) -> Iterator[Connection]:
        if self._closed:
            raise StoreError("the store is closed")
        try:
            with self.engine.connect() as conn:
                if write and self._sqlite:
                    conn.execution_options(airlock_begin="IMMEDIATE")
                with conn.begin():
                    yield conn
        except (sa_exc.OperationalError, sa_exc.InterfaceError) as exc:
            raise StoreError(f"database {self.url}: {str(exc.orig or exc).strip()[:300]}") from exc

    def _insert(self, table: Table) -> Any:
        if self._sqlite:
            from sqlalchemy.dialects.sqlite import insert as sqlite_insert

            return sqlite_insert(table)
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(table)

    def _greatest(self, a: Any, b: Any) -> Any:
        return func.max(a, b) if self._sqlite else func.greatest(a, b)

    # -- runs -----------------------------------------------------------------------------

    def _lock_tenant(self, c: Connection, tenant: str) -> float:
        c.execute(self._insert(S.tenant_sched).values(tenant=tenant, vtime=0.0)
                  .on_conflict_do_nothing(index_elements=["tenant"]))
        return float(c.execute(select(S.tenant_sched.c.vtime)
                               .where(S.tenant_sched.c.tenant == tenant)
                               .with_for_update()).scalar_one())

    def create_run(self, tenant: str, request: Mapping[str, Any], *, quota: Quota,
                   run_id: str | None = None) -> RunRecord:
        body = json.dumps(dict(request), separators=(",", ":"))
        r = S.runs
        with self._tx(write=True) as c:
            self._lock_tenant(c, tenant)
            now = time.time()
            day_start, day_end = _day_bounds(now)
            to_midnight = max(1, int(day_end - now) + 1)
            if quota.queued is not None:
                n = c.execute(select(func.count()).select_from(r).where(
                    r.c.tenant == tenant, r.c.status == "queued")).scalar_one()
                if n >= quota.queued:
                    raise QuotaExceeded("queued", quota.queued, QUEUE_RETRY_AFTER_S)
            if quota.runs_per_day is not None:
                n = c.execute(select(func.count()).select_from(r).where(
                    r.c.tenant == tenant, r.c.created_at >= day_start)).scalar_one()
                if n >= quota.runs_per_day:
                    raise QuotaExceeded("runs_per_day", quota.runs_per_day, to_midnight)
            if quota.tokens_per_day is not None:
                used = self._daily(c, tenant, _day(now), TOKENS)
                if used >= quota.tokens_per_day:
                    raise QuotaExceeded("tokens_per_day", quota.tokens_per_day, to_midnight)
            values = {"id": run_id or new_run_id(), "tenant": tenant, "status": "queued",
                      "request": body, "created_at": now, "usage": "{}",
                      "cancel_requested": False}
            try:
                c.execute(r.insert().values(**values))
            except sa_exc.IntegrityError:
                raise StoreError(f"run id {values['id']!r} exists already") from None
            row = c.execute(select(r).where(r.c.id == values["id"])).one()
        return _record(row)

    def _daily(self, c: Connection, tenant: str, day: str, metric: str) -> float:
        u = S.usage_daily
        v = c.execute(select(u.c.value).where(u.c.tenant == tenant, u.c.day == day,
                                              u.c.metric == metric)).scalar()
        return float(v or 0.0)

    def get_run(self, run_id: str, tenant: str | None = None) -> RunRecord | None:
        r = S.runs
        q = select(r).where(r.c.id == run_id)
        if tenant is not None:
            q = q.where(r.c.tenant == tenant)
        with self._tx(write=False) as c:
            row = c.execute(q).first()
        return _record(row) if row is not None else None

    def list_runs(self, tenant: str, limit: int = 50, cursor: str | None = None,
                  statuses: Iterable[str] | None = None) -> tuple[list[RunRecord], str | None]:
        r = S.runs
        limit = max(1, min(int(limit), 1000))
        # Never the whole request (up to 1 MiB each; measured: 6 lists of 95 such runs at
        # once took the service from 105 to 834 MB): its head names the agent.
        head = func.substr(r.c.request, 1, 64).label("request_head")
        q = select(*[c for c in r.c if c.name != "request"], head).where(r.c.tenant == tenant)
        if statuses is not None:
            q = q.where(r.c.status.in_(list(statuses)))
        with self._tx(write=False) as c:
            if cursor:
                at = c.execute(select(r.c.created_at).where(r.c.id == cursor,
                                                            r.c.tenant == tenant)).scalar()
                if at is None:
                    return [], None
                q = q.where(or_(r.c.created_at < at, and_(r.c.created_at == at, r.c.id < cursor)))
            rows = c.execute(q.order_by(r.c.created_at.desc(), r.c.id.desc())
                             .limit(limit + 1)).all()
        records = [_record(cast("Row[Any]", row), summary=True) for row in rows[:limit]]
        return records, (records[-1].id if len(rows) > limit else None)

    def claim_next(self, host_id: str, weights: Mapping[str, int],
                   concurrent: Mapping[str, int | None]) -> RunRecord | None:
        """Weighted fair order: among tenants with a queued run and below their
        `concurrent` limit, the one holding the fewest running slots per unit of weight
        goes first (so a tenant with nothing running is never behind another's backlog:
        it waits for one slot at most); ties go to the least virtual time (start-time
        fair queueing: each claim advances the tenant's clock by 1/weight, from no
        earlier than the system's clock, so idle time earns no credit), then to the
        oldest run. FIFO within a tenant."""
        r, ts, clock = S.runs, S.tenant_sched, S.sched_clock
        with self._tx(write=True) as c:
            system_v = float(c.execute(select(clock.c.vtime).where(clock.c.id == 1)
                                       .with_for_update()).scalar_one())
            heads = dict(c.execute(select(r.c.tenant, func.min(r.c.created_at))
                                   .where(r.c.status == "queued").group_by(r.c.tenant)).all())
            if not heads:
                return None
            running: dict[str, int] = {
                t: int(n) for t, n in c.execute(select(r.c.tenant, func.count())
                                                .where(r.c.status == "running")
                                                .group_by(r.c.tenant)).all()}
            vtimes = dict(c.execute(select(ts.c.tenant, ts.c.vtime)
                                    .where(ts.c.tenant.in_(list(heads)))).all())
            ranked = []
            for tenant, head in heads.items():
                n = int(running.get(tenant, 0))
                limit = concurrent.get(tenant)
                if limit is not None and n >= limit:
                    continue
                w = float(weights.get(tenant) or 1)
                w = w if w > 0 else 1.0
                start = max(float(vtimes.get(tenant, 0.0)), system_v)
                ranked.append((n / w, start, float(head), tenant, w))
            ranked.sort()
            for _share, start, _head, tenant, w in ranked:
                row = c.execute(select(r.c.id).where(r.c.status == "queued", r.c.tenant == tenant)
                                .order_by(r.c.created_at, r.c.id).limit(1)
                                .with_for_update(skip_locked=True)).first()
                if row is None:
                    continue
                now = time.time()
                c.execute(update(r).where(r.c.id == row.id).values(
                    status="running", host_id=host_id, claimed_at=now))
                c.execute(self._insert(ts).values(tenant=tenant, vtime=start + 1.0 / w)
                          .on_conflict_do_update(index_elements=["tenant"],
                                                 set_={"vtime": start + 1.0 / w}))
                c.execute(update(clock).where(clock.c.id == 1).values(vtime=max(system_v, start)))
                return _record(c.execute(select(r).where(r.c.id == row.id)).one())
        return None

    def mark_started(self, run_id: str, host_id: str, *, run_dir: str | None = None,
                     container: str | None = None) -> bool:
        r = S.runs
        values: dict[str, Any] = {"started_at": time.time()}
        if run_dir is not None:
            values["run_dir"] = run_dir
        if container is not None:
            values["container"] = container
        with self._tx(write=True) as c:
            n = c.execute(update(r).where(r.c.id == run_id, r.c.host_id == host_id,
                                          r.c.status == "running").values(**values)).rowcount
        return n == 1

    def finish(self, run_id: str, status: str, exit_code: int | None, exit_reason: str | None,
               usage: Mapping[str, float] | None = None) -> RunRecord | None:
        if status not in ENDED:
            raise StoreError(f"{status!r} is not an end status ({', '.join(sorted(ENDED))})")
        r = S.runs
        with self._tx(write=True) as c:
            row = c.execute(select(r).where(r.c.id == run_id).with_for_update()).first()
            if row is None:
                return None
            rec = _record(row)
            # A run ends once; only `lost` (decided by another host when this one's lease
            # ran out) gives way to the run's real end, should it come after all.
            if rec.ended and rec.status != "lost":
                return rec
            merged = _merge(rec.usage, usage or {}, add=False)
            self._add_daily(c, rec.tenant, _delta(rec.usage, merged))
            c.execute(update(r).where(r.c.id == run_id).values(
                status=status, exit_code=exit_code, exit_reason=exit_reason,
                ended_at=time.time(), usage=json.dumps(merged)))
            return _record(c.execute(select(r).where(r.c.id == run_id)).one())

    def request_cancel(self, run_id: str, tenant: str) -> RunRecord | None:
        r = S.runs
        with self._tx(write=True) as c:
            row = c.execute(select(r).where(r.c.id == run_id, r.c.tenant == tenant)
                            .with_for_update()).first()
            if row is None:
                return None
            rec = _record(row)
            if rec.status == "queued":
                c.execute(update(r).where(r.c.id == run_id).values(
                    status="cancelled", exit_reason="cancelled", ended_at=time.time(),
                    cancel_requested=True))
            elif rec.status == "running":
                c.execute(update(r).where(r.c.id == run_id).values(cancel_requested=True))
            else:
                return rec
            return _record(c.execute(select(r).where(r.c.id == run_id)).one())

    def cancel_requested(self, run_id: str) -> bool:
        r = S.runs
        with self._tx(write=False) as c:
            return bool(c.execute(select(r.c.cancel_requested).where(r.c.id == run_id)).scalar())

    def counts(self) -> dict[str, dict[str, int]]:
        r = S.runs
        out: dict[str, dict[str, int]] = {}
        with self._tx(write=False) as c:
            for tenant, status, n in c.execute(
                    select(r.c.tenant, r.c.status, func.count())
                    .where(r.c.status.in_(["queued", "running"]))
                    .group_by(r.c.tenant, r.c.status)).all():
                out.setdefault(tenant, {"queued": 0, "running": 0})[status] = int(n)
        return out

    # -- hosts ----------------------------------------------------------------------------

    def heartbeat(self, host_id: str, ttl: float, *, address: str | None = None) -> bool:
        """Renew the lease. False when it had run out and this host's runs were given up
        (`lost`): the caller must end what it still runs."""
        h = S.hosts
        now = time.time()
        with self._tx(write=True) as c:
            was = c.execute(select(h.c.alive).where(h.c.host_id == host_id)
                            .with_for_update()).first()
            set_: dict[str, Any] = {"heartbeat_at": now, "expires_at": now + ttl, "alive": True}
            if address is not None:
                set_["address"] = address
            c.execute(self._insert(h).values(host_id=host_id, address=address, started_at=now,
                                             heartbeat_at=now, expires_at=now + ttl, alive=True)
                      .on_conflict_do_update(index_elements=["host_id"], set_=set_))
        return was is None or bool(was.alive)

    def expire_dead_hosts(self, now: float | None = None) -> list[str]:
        h, r = S.hosts, S.runs
        now = time.time() if now is None else now
        with self._tx(write=True) as c:
            dead = list(c.execute(select(h.c.host_id).where(h.c.alive.is_(True),
                                                            h.c.expires_at < now)
                                  .with_for_update(skip_locked=True)).scalars())
            if not dead:
                return []
            lost = list(c.execute(select(r.c.id).where(r.c.host_id.in_(dead),
                                                       r.c.status == "running")
                                  .order_by(r.c.id).with_for_update()).scalars())
            if lost:
                c.execute(update(r).where(r.c.id.in_(lost)).values(
                    status="lost", exit_reason="host_lost", ended_at=now))
            c.execute(update(h).where(h.c.host_id.in_(dead)).values(alive=False))
        return lost

    def runs_of_host(self, host_id: str, statuses: Iterable[str]) -> list[RunRecord]:
        r = S.runs
        with self._tx(write=False) as c:
            rows = c.execute(select(r).where(r.c.host_id == host_id,
                                             r.c.status.in_(list(statuses)))
                             .order_by(r.c.created_at, r.c.id)).all()
        return [_record(row) for row in rows]

    def hosts(self) -> list[HostRecord]:
        h = S.hosts
        with self._tx(write=False) as c:
            rows = c.execute(select(h).order_by(h.c.host_id)).all()
        return [HostRecord(host_id=m.host_id, address=m.address, started_at=m.started_at,
                           heartbeat_at=m.heartbeat_at, expires_at=m.expires_at,
                           alive=bool(m.alive)) for m in rows]

    def leave(self, host_id: str) -> None:
        h = S.hosts
        with self._tx(write=True) as c:
            c.execute(update(h).where(h.c.host_id == host_id).values(alive=False,
                                                                     expires_at=time.time()))

    # -- usage ----------------------------------------------------------------------------

    def _add_daily(self, c: Connection, tenant: str, counters: Mapping[str, float]) -> None:
        u = S.usage_daily
        day = _day()
        for metric in sorted(counters):  # one order everywhere: no deadlock between hosts
            value = float(counters[metric])
            ins = self._insert(u).values(tenant=tenant, day=day, metric=metric, value=value)
            new = (self._greatest(u.c.value, ins.excluded.value)
                   if metric.startswith(PEAK_PREFIX) else u.c.value + ins.excluded.value)
            c.execute(ins.on_conflict_do_update(index_elements=["tenant", "day", "metric"],
                                                set_={"value": new}))

    def add_usage(self, tenant: str, run_id: str | None, counters: Mapping[str, float]) -> None:
        if not counters:
            return
        r = S.runs
        with self._tx(write=True) as c:
            if run_id is not None:
                row = c.execute(select(r.c.usage).where(r.c.id == run_id, r.c.tenant == tenant)
                                .with_for_update()).first()
                if row is not None:
                    merged = _merge(json.loads(row.usage or "{}"), counters, add=True)
                    c.execute(update(r).where(r.c.id == run_id).values(usage=json.dumps(merged)))
            self._add_daily(c, tenant, counters)

    def usage_by_day(self, tenant: str, since: date | None = None) -> dict[str, dict[str, float]]:
        u = S.usage_daily
        q = select(u.c.day, u.c.metric, u.c.value).where(u.c.tenant == tenant)
        if since is not None:
            q = q.where(u.c.day >= since.isoformat())
        out: dict[str, dict[str, float]] = {}
        with self._tx(write=False) as c:
            for day, metric, value in c.execute(q.order_by(u.c.day)).all():
                out.setdefault(day, {})[metric] = float(value)
        return out

    def usage(self, tenant: str, since: date | None = None) -> dict[str, float]:
        total: dict[str, float] = {}
        for counters in self.usage_by_day(tenant, since).values():
            total = _merge(total, counters, add=True)
        return total

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self.engine.dispose()


DEFAULT_URL = "sqlite:///var/lib/airlock/airlock.db"


def open_store(url: str | None = None) -> SqlStore:
    """The store at `url` (default: $AIRLOCK_DATABASE, else DEFAULT_URL), migrated to
    this version's schema."""
    return SqlStore(url or os.environ.get("AIRLOCK_DATABASE") or DEFAULT_URL)
