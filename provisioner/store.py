"""The state store: cluster records, tenants and service metadata in SQL (SQLite or PostgreSQL).

Every method is blocking and runs in the store's own small thread pool, so the event loop
never waits on the database. Admission (create, scale, adaptive growth) runs inside one
transaction holding the tenant's lock: ``BEGIN IMMEDIATE`` on SQLite, ``SELECT ... FOR
UPDATE`` of the tenant's row on PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import time
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError

from provisioner import migrations
from provisioner.models import LIVE, ClusterRecord, Status, StopReason, Wanted
from provisioner.quota import Usage, check_fits, check_workers_per_cluster, workers_that_fit
from provisioner.secrets import Keyring, WrongKey
from provisioner.tenants import Quota

P = ParamSpec("P")
T = TypeVar("T")

metadata = sa.MetaData()

clusters_table = sa.Table(
    "clusters",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("tenant", sa.String(64), nullable=False, index=True),
    sa.Column("project", sa.String(128), nullable=False),
    sa.Column("status", sa.String(16), nullable=False, index=True),
    sa.Column("worker_cores", sa.Float, nullable=False),
    sa.Column("worker_memory", sa.BigInteger, nullable=False),
    sa.Column("scheduler_cores", sa.Float, nullable=False),
    sa.Column("scheduler_memory", sa.BigInteger, nullable=False),
    sa.Column("workers_requested", sa.Integer, nullable=False),
    sa.Column("workers_running", sa.Integer, nullable=False, default=0),
    sa.Column("idle_timeout", sa.Float, nullable=False),
    sa.Column("no_client_timeout", sa.Float, nullable=False),
    sa.Column("adaptive_minimum", sa.Integer),
    sa.Column("adaptive_maximum", sa.Integer),
    sa.Column("env", sa.JSON, nullable=False),
    sa.Column("image", sa.String(512)),
    sa.Column("scheduler_address", sa.String(256)),
    sa.Column("dashboard_url", sa.String(256)),
    sa.Column("wanted", sa.String(16), nullable=False, server_default="running"),
    sa.Column("stop_reason", sa.Text),
    sa.Column("stop_detail", sa.Text),
    sa.Column("created_at", sa.Float, nullable=False, index=True),
    sa.Column("started_at", sa.Float),
    sa.Column("stopped_at", sa.Float),
    sa.Column("backend_state", sa.JSON, nullable=False),
    sa.Column("credentials", sa.JSON, nullable=False),
)

tenants_table = sa.Table(
    "tenants",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
)

#: Accounting: one row per stretch of time a cluster held a fixed amount of its tenant's quota.
#: Written in the same transaction as the change that starts or ends the stretch, so the
#: books always agree with the records.
usage_table = sa.Table(
    "usage_intervals",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("cluster_id", sa.String(32), nullable=False, index=True),
    sa.Column("tenant", sa.String(64), nullable=False, index=True),
    sa.Column("project", sa.String(128), nullable=False),
    sa.Column("cores", sa.Float, nullable=False),
    sa.Column("memory", sa.BigInteger, nullable=False),
    sa.Column("start", sa.Float, nullable=False),
    sa.Column("end", sa.Float, index=True),
)

meta_table = sa.Table(
    "meta",
    metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)

_COLUMNS = [f.name for f in fields(ClusterRecord)]


@dataclass(frozen=True, slots=True)
class Accounting:
    """Quota held over a period: core-seconds and memory GiB-seconds, per project."""

    since: float
    until: float
    projects: dict[str, tuple[float, float]]

    @property
    def core_seconds(self) -> float:
        return sum(c for c, _ in self.projects.values())

    @property
    def memory_gib_seconds(self) -> float:
        return sum(m for _, m in self.projects.values())


class StoreError(Exception):
    """The state URL cannot be used; the message says why."""


class NotFound(KeyError):
    pass


def make_engine(url: str) -> Engine:
    """An engine for ``url`` with SQLite tuned for one writer and many readers."""
    try:
        parsed = sa.make_url(url)
    except ArgumentError:
        raise StoreError(f"state URL {url!r} is not a valid SQLAlchemy URL") from None
    try:
        if parsed.get_backend_name() == "sqlite":
            if parsed.database and parsed.database != ":memory:":
                try:
                    Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    raise StoreError(f"state URL {url!r}: cannot create its folder: {exc.strerror}") from None
            engine = sa.create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

            @sa.event.listens_for(engine, "connect")
            def _sqlite_setup(dbapi_conn: Any, _record: Any) -> None:
                dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=NORMAL")
                cur.execute("PRAGMA busy_timeout=30000")
                cur.close()

            @sa.event.listens_for(engine, "begin")
            def _sqlite_begin(conn: Connection) -> None:
                mode = "BEGIN IMMEDIATE" if conn.info.pop("immediate", False) else "BEGIN"
                conn.exec_driver_sql(mode)

            return engine
        return sa.create_engine(url, pool_pre_ping=True, pool_size=8, max_overflow=8)
    except (NoSuchModuleError, ModuleNotFoundError) as exc:
        raise StoreError(f"state URL {url!r}: database driver not available ({exc})") from None


class Store:
    """Cluster records and metadata; async methods backed by a private thread pool.

    Cluster credentials are sealed with ``keyring`` in the one place rows become records and
    back, so every read and write goes through it, in the store's threads.
    """

    def __init__(self, url: str, keyring: Keyring) -> None:
        self.url = url
        self.engine = make_engine(url)
        self.keyring = keyring
        self._sqlite = self.engine.dialect.name == "sqlite"
        self._migrated = False
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="store")

    # -- rows and records -------------------------------------------------------------------

    def _row_to_record(self, row: sa.Row[Any]) -> ClusterRecord:
        data = dict(row._mapping)
        data["status"] = Status(data["status"])
        data["wanted"] = Wanted(data["wanted"])
        data["stop_reason"] = StopReason(data["stop_reason"]) if data["stop_reason"] else None
        data["credentials"] = self._open_credentials(data["credentials"])
        return ClusterRecord(**data)

    def _record_to_row(self, record: ClusterRecord,
                       columns: Collection[str] | None = None) -> dict[str, Any]:
        """The row for ``record``; with ``columns``, only those (nothing else is sealed)."""
        row = {f.name: getattr(record, f.name) for f in fields(record)
               if columns is None or f.name in columns}
        if "status" in row:
            row["status"] = record.status.value
        if "wanted" in row:
            row["wanted"] = Wanted(record.wanted).value
        if row.get("stop_reason"):
            row["stop_reason"] = StopReason(row["stop_reason"]).value
        if "credentials" in row:
            row["credentials"] = self._seal_credentials(record.credentials)
        return row

    def _seal_credentials(self, credentials: dict[str, str]) -> str | dict[str, str]:
        """Credentials as stored: a Fernet token; none ({}, a --no-tls cluster) stay {}."""
        return self.keyring.encrypt_json(credentials) if credentials else {}

    def _open_credentials(self, stored: str | dict[str, str] | None) -> dict[str, str]:
        """A token is decrypted; a dict is a row of a release that stored them in clear
        (sealed at start by :meth:`seal_credentials`, read as is until then)."""
        if isinstance(stored, str):
            return self.keyring.decrypt_json(stored)
        return dict(stored or {})

    # -- plumbing ---------------------------------------------------------------------------

    async def _call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    @contextlib.contextmanager
    def _tx(self, lock_tenant: str | None = None, write: bool = False) -> Iterator[Connection]:
        """A transaction; writers take SQLite's write lock up front (a deferred reader that
        later writes can fail at once with "database is locked" instead of waiting)."""
        with self.engine.connect() as conn:
            if (lock_tenant or write) and self._sqlite:
                conn.info["immediate"] = True
            with conn.begin():
                if lock_tenant and not self._sqlite:
                    conn.execute(
                        sa.select(tenants_table.c.name)
                        .where(tenants_table.c.name == lock_tenant)
                        .with_for_update()
                    )
                yield conn

    # -- lifecycle --------------------------------------------------------------------------

    def migrate(self) -> int:
        """Blocking, at start under the service's lease: make the tables of a fresh database,
        or bring an existing one to this release's schema version; returns that version.
        A database a newer release has already changed is refused, not misread."""
        try:
            fresh = not sa.inspect(self.engine).has_table(clusters_table.name)
            metadata.create_all(self.engine)  # missing tables only; changes are steps
            with self._tx(write=True) as conn:
                stored = conn.execute(sa.select(meta_table.c.value)
                                      .where(meta_table.c.key == migrations.VERSION_KEY)).scalar()
                try:
                    version = migrations.LATEST if fresh else int(stored or 1)
                except ValueError:
                    raise StoreError(f"state {self.engine.url!r}: schema version {stored!r} "
                                     "is not a number") from None
                if version > migrations.LATEST:
                    raise StoreError(
                        f"state {self.engine.url!r} has schema version {version}, newer than "
                        f"this release's {migrations.LATEST}: run the release that wrote it "
                        "(or a later one)")
                for step in migrations.pending(version):
                    step(conn)
                if stored != str(migrations.LATEST):
                    conn.execute(meta_table.delete().where(meta_table.c.key == migrations.VERSION_KEY))
                    conn.execute(meta_table.insert().values(key=migrations.VERSION_KEY,
                                                            value=str(migrations.LATEST)))
        except OperationalError as exc:
            raise StoreError(f"cannot open state {self.engine.url!r}: {exc.orig}") from None
        self._migrated = True
        return migrations.LATEST

    def _open(self, tenant_names: list[str]) -> None:
        if not self._migrated:  # ``serve`` migrates first, for a clear start-up error
            self.migrate()
        try:
            with self._tx(write=True) as conn:
                known = {r.name for r in conn.execute(sa.select(tenants_table.c.name))}
                for name in set(tenant_names) - known:
                    conn.execute(tenants_table.insert().values(name=name))
        except OperationalError as exc:
            raise StoreError(f"cannot open state {self.engine.url!r}: {exc.orig}") from None
        database = self.engine.url.database
        if self._sqlite and database and database != ":memory:":
            # It holds every cluster's client key: for the service's user alone.
            os.chmod(database, 0o600)

    def check(self) -> None:
        """Connect once, before serving, so a bad URL is a clear start-up error."""
        try:
            with self.engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
        except Exception as exc:  # every driver has its own error types
            reason = getattr(exc, "orig", None) or exc
            raise StoreError(f"cannot open state {self.engine.url!r}: {reason}") from None

    def seal_credentials(self) -> int:
        """Before serving: seal the credentials a previous release stored in clear, and check
        that every sealed row opens with this key, so a wrong or missing key stops start-up
        with a message naming its setting instead of failing requests later. Returns how
        many rows were sealed."""
        if not sa.inspect(self.engine).has_table(clusters_table.name):
            return 0
        c = clusters_table.c
        sealed, unreadable = 0, []
        with self._tx(write=True) as conn:
            for cluster_id, stored in conn.execute(sa.select(c.id, c.credentials)).all():
                if isinstance(stored, str):
                    try:
                        self._open_credentials(stored)
                    except WrongKey:
                        unreadable.append(cluster_id)
                elif stored:
                    conn.execute(clusters_table.update().where(c.id == cluster_id)
                                 .values(credentials=self._seal_credentials(stored)))
                    sealed += 1
            if unreadable:  # raising rolls back: nothing is sealed with a key that is wrong
                raise WrongKey(
                    f"the credentials of {len(unreadable)} cluster(s) in the state database "
                    f"(e.g. {', '.join(unreadable[:3])}) cannot be decrypted with the key from "
                    f"{self.keyring.source}; set it to the key they were sealed with")
        return sealed

    async def open(self, tenant_names: list[str]) -> None:
        await self._call(self._open, tenant_names)

    async def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.engine.dispose()

    # -- reads ------------------------------------------------------------------------------

    def _get(self, cluster_id: str) -> ClusterRecord:
        with self._tx() as conn:
            row = conn.execute(
                sa.select(clusters_table).where(clusters_table.c.id == cluster_id)
            ).first()
        if row is None:
            raise NotFound(cluster_id)
        return self._row_to_record(row)

    async def get(self, cluster_id: str) -> ClusterRecord:
        return await self._call(self._get, cluster_id)

    def _list(
        self, tenant: str | None, statuses: list[Status] | None, project: str | None,
        limit: int | None, after: str | None = None,
    ) -> list[ClusterRecord]:
        c = clusters_table.c
        query = sa.select(clusters_table).order_by(c.created_at.desc(), c.id.desc())
        mark = sa.select(c.created_at).where(c.id == after)  # where the page starts
        if tenant is not None:
            query = query.where(c.tenant == tenant)
            mark = mark.where(c.tenant == tenant)
        if statuses:
            query = query.where(c.status.in_([s.value for s in statuses]))
        if project is not None:
            query = query.where(c.project == project)
        if limit is not None:
            query = query.limit(limit)
        with self._tx() as conn:
            if after is not None:
                start = conn.execute(mark).scalar()
                if start is None:
                    raise NotFound(after)
                query = query.where(sa.or_(c.created_at < start,
                                           sa.and_(c.created_at == start, c.id < after)))
            return [self._row_to_record(r) for r in conn.execute(query)]

    async def clusters(
        self, tenant: str | None = None, statuses: list[Status] | None = None,
        project: str | None = None, limit: int | None = None, after: str | None = None,
    ) -> list[ClusterRecord]:
        """Newest first; ``after`` (a cluster id) starts just past that cluster, for paging."""
        return await self._call(self._list, tenant, statuses, project, limit, after)

    def live_backend_states(self) -> list[tuple[str, dict[str, Any]]]:
        """Blocking, for start-up checks before serving: each live cluster's id and saved
        backend state (nothing else is read: no credentials are opened)."""
        if not sa.inspect(self.engine).has_table(clusters_table.name):
            return []
        c = clusters_table.c
        with self._tx() as conn:
            rows = conn.execute(sa.select(c.id, c.backend_state)
                                .where(c.status.in_([s.value for s in LIVE])).order_by(c.id))
            return [(cid, state if isinstance(state, dict) else {}) for cid, state in rows]

    async def list_live(self) -> list[ClusterRecord]:
        return await self.clusters(statuses=list(LIVE))

    def _usage_of(self, conn: Connection, tenant: str) -> Usage:
        """What the tenant's live clusters hold, summed by the database (one row, any size)."""
        c = clusters_table.c
        query = sa.select(
            sa.func.count(),
            sa.func.coalesce(sa.func.sum(c.scheduler_cores + c.workers_requested * c.worker_cores), 0.0),
            sa.func.coalesce(sa.func.sum(c.scheduler_memory + c.workers_requested * c.worker_memory), 0),
            sa.func.coalesce(sa.func.sum(c.workers_requested), 0),
        ).where(c.tenant == tenant, c.status.in_([s.value for s in LIVE]))
        clusters, cores, memory, workers = conn.execute(query).one()
        return Usage(clusters=int(clusters), cores=round(float(cores), 6), memory=int(memory),
                     workers=int(workers))

    async def usage(self, tenant: str) -> Usage:
        def run() -> Usage:
            with self._tx() as conn:
                return self._usage_of(conn, tenant)

        return await self._call(run)

    # -- writes -----------------------------------------------------------------------------

    def _admit(self, record: ClusterRecord, quota: Quota) -> ClusterRecord:
        with self._tx(lock_tenant=record.tenant) as conn:
            usage = self._usage_of(conn, record.tenant)
            check_workers_per_cluster(quota, record.workers_requested)
            check_fits(quota, usage, cores=record.cores, memory=record.memory, clusters=1)
            conn.execute(clusters_table.insert().values(**self._record_to_row(record)))
            self._account(conn, record)
        return record

    async def admit(self, record: ClusterRecord, quota: Quota) -> ClusterRecord:
        """Insert a new cluster if it fits the tenant's quota, atomically; else OverQuota."""
        return await self._call(self._admit, record, quota)

    def _resize(
        self, cluster_id: str, quota: Quota, workers: int, best_effort: bool,
        changes: dict[str, Any],
    ) -> ClusterRecord:
        with self.engine.connect() as probe:
            tenant = probe.execute(
                sa.select(clusters_table.c.tenant).where(clusters_table.c.id == cluster_id)
            ).scalar()
        if tenant is None:
            raise NotFound(cluster_id)
        with self._tx(lock_tenant=tenant) as conn:
            row = conn.execute(
                sa.select(clusters_table).where(clusters_table.c.id == cluster_id)
            ).first()
            if row is None:
                raise NotFound(cluster_id)
            record = self._row_to_record(row)
            if record.status.terminal or record.stop_wanted:
                return record
            usage = self._usage_of(conn, tenant)  # this cluster is live: it is counted
            if best_effort:
                workers = workers_that_fit(quota, usage, record, workers)
            elif workers > record.workers_requested:
                check_workers_per_cluster(quota, workers)
                extra = workers - record.workers_requested
                check_fits(quota, usage, cores=extra * record.worker_cores,
                           memory=extra * record.worker_memory)
            else:
                check_workers_per_cluster(quota, workers)
            updated = record.evolve(workers_requested=workers, **changes)
            conn.execute(
                clusters_table.update()
                .where(clusters_table.c.id == cluster_id)
                .values(workers_requested=workers, **changes)
            )
            if updated.cores != record.cores or updated.memory != record.memory:
                self._account(conn, updated)
        return updated

    async def resize(
        self, cluster_id: str, quota: Quota, workers: int, *, best_effort: bool = False,
        **changes: Any,
    ) -> ClusterRecord:
        """Set the worker count under the tenant's lock.

        Strict (scale): OverQuota if the growth does not fit. Best effort (adaptive):
        grow only as far as the free quota allows.
        """
        return await self._call(self._resize, cluster_id, quota, workers, best_effort, changes)

    def _update(self, cluster_id: str, changes: dict[str, Any]) -> ClusterRecord:
        with self._tx(write=True) as conn:
            row = conn.execute(
                sa.select(clusters_table).where(clusters_table.c.id == cluster_id)
            ).first()
            if row is None:
                raise NotFound(cluster_id)
            before = self._row_to_record(row)
            updated = before.evolve(**changes)
            values = self._record_to_row(updated, {*changes, "stopped_at"})
            conn.execute(
                clusters_table.update().where(clusters_table.c.id == cluster_id).values(**values)
            )
            if updated.cores != before.cores or updated.memory != before.memory:
                self._account(conn, updated)
        return updated

    def _account(self, conn: Connection, record: ClusterRecord) -> None:
        """Close the cluster's open stretch and open one at its new size (none once ended)."""
        now = time.time()
        conn.execute(
            usage_table.update()
            .where(usage_table.c.cluster_id == record.id, usage_table.c.end.is_(None))
            .values(end=now)
        )
        if record.cores or record.memory:
            conn.execute(usage_table.insert().values(
                cluster_id=record.id, tenant=record.tenant, project=record.project,
                cores=record.cores, memory=record.memory, start=now, end=None,
            ))

    def _accounting(self, tenant: str, since: float, until: float) -> Accounting:
        end = sa.func.coalesce(usage_table.c.end, until)
        overlap = sa.func.max(0.0, sa.func.min(end, until) - sa.func.max(usage_table.c.start, since)) \
            if self._sqlite else sa.func.greatest(
                0.0, sa.func.least(end, until) - sa.func.greatest(usage_table.c.start, since))
        query = (
            sa.select(
                usage_table.c.project,
                sa.func.sum(usage_table.c.cores * overlap),
                sa.func.sum(usage_table.c.memory * overlap),
            )
            .where(usage_table.c.tenant == tenant, usage_table.c.start < until,
                   sa.or_(usage_table.c.end.is_(None), usage_table.c.end > since))
            .group_by(usage_table.c.project)
        )
        with self._tx() as conn:
            rows = conn.execute(query).all()
        return Accounting(since, until, {
            project: (float(cores or 0), float(memory or 0) / 2**30)
            for project, cores, memory in rows
        })

    async def accounting(self, tenant: str, since: float, until: float | None = None) -> Accounting:
        """Core-seconds and memory GiB-seconds the tenant's clusters held in [since, until]."""
        return await self._call(self._accounting, tenant, since, until or time.time())

    async def update(self, cluster_id: str, **changes: Any) -> ClusterRecord:
        """Apply field changes (status transitions checked) and return the new record."""
        return await self._call(self._update, cluster_id, changes)

    def _get_meta(self, key: str) -> str | None:
        with self._tx() as conn:
            return conn.execute(
                sa.select(meta_table.c.value).where(meta_table.c.key == key)
            ).scalar()

    async def get_meta(self, key: str) -> str | None:
        return await self._call(self._get_meta, key)

    def _set_meta(self, key: str, value: str | None) -> None:
        with self._tx(write=True) as conn:
            conn.execute(meta_table.delete().where(meta_table.c.key == key))
            if value is not None:
                conn.execute(meta_table.insert().values(key=key, value=value))

    async def set_meta(self, key: str, value: str | None) -> None:
        """Set (or, with None, remove) one service-wide value."""
        await self._call(self._set_meta, key, value)


assert set(_COLUMNS) == {c.name for c in clusters_table.columns}, "record and table disagree"
