"""The database under the store: its engine (SQLite tuned for one writer and many readers, or
PostgreSQL), transactions that take a tenant's lock, a private thread pool so the event loop
never waits on it, and start-up (schema versions, tenants, a check of the URL)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError

from provisioner import migrations
from provisioner.secrets import Keyring
from provisioner.store.schema import clusters_table, meta_table, metadata, tenants_table

P = ParamSpec("P")
T = TypeVar("T")


#: PostgreSQL advisory lock key of the shared pool's admissions ("dpPOOL").
POOL_LOCK = 0x6470504F4F4C


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
        hint = ("; install the 'postgres' extra (pip install '.[server,postgres]') for "
                "postgresql+psycopg:// URLs" if parsed.get_backend_name() == "postgresql" else "")
        raise StoreError(f"state URL {url!r}: database driver not available ({exc}){hint}") from None


class Database:
    """The engine, its thread pool and transactions; the store's parts build on it."""

    def __init__(self, url: str, keyring: Keyring) -> None:
        self.url = url
        self.engine = make_engine(url)
        self.keyring = keyring
        self._sqlite = self.engine.dialect.name == "sqlite"
        self._migrated = False
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="store")

    async def _call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    @contextlib.contextmanager
    def _tx(self, lock_tenant: str | None = None, write: bool = False,
            lock_pool: bool = False) -> Iterator[Connection]:
        """A transaction; writers take SQLite's write lock up front (a deferred reader that
        later writes can fail at once with "database is locked" instead of waiting).
        ``lock_pool``: one writer at a time across tenants (the shared pool's fit): SQLite's
        write lock is that already; on PostgreSQL a transaction advisory lock."""
        with self.engine.connect() as conn:
            if (lock_tenant or write or lock_pool) and self._sqlite:
                conn.info["immediate"] = True
            with conn.begin():
                if lock_pool and not self._sqlite:
                    conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": POOL_LOCK})
                if lock_tenant and not self._sqlite:
                    conn.execute(
                        sa.select(tenants_table.c.name)
                        .where(tenants_table.c.name == lock_tenant)
                        .with_for_update()
                    )
                yield conn

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

    async def open(self, tenant_names: list[str]) -> None:
        await self._call(self._open, tenant_names)

    async def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.engine.dispose()

