"""The store on a real SQLite file: atomic admission under concurrent writers."""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from provisioner import migrations
from provisioner.models import ClusterRecord, Outcome, Status, StopReason, new_cluster_id
from provisioner.quota import OverQuota
from provisioner.records import Records
from provisioner.secrets import Keyring
from provisioner.store import NotFound, Store, StoreError
from provisioner.tenants import Quota

GiB = 2**30


def fresh(tenant: str = "t", workers: int = 1) -> ClusterRecord:
    return ClusterRecord(
        id=new_cluster_id(), tenant=tenant, project="p", status=Status.PENDING, worker_cores=1.0,
        worker_memory=GiB, scheduler_cores=1.0, scheduler_memory=GiB, workers_requested=workers,
        idle_timeout=60, no_client_timeout=60,
    )


def keyring() -> Keyring:
    return Keyring(Fernet.generate_key(), "a test key")


@pytest.fixture
async def store(tmp_path: Path, state_db):  # type: ignore[no-untyped-def]
    s = Store(state_db() or f"sqlite:///{tmp_path / 'state.db'}", keyring())
    await s.open(["t", "u"])
    yield s
    await s.close()


async def test_concurrent_admission_never_exceeds_quota(store: Store) -> None:
    quota = Quota(cores=10, memory=100 * GiB, clusters=50)

    async def attempt() -> bool:
        try:
            await store.admit(fresh(workers=1), quota)  # 2 cores each
            return True
        except OverQuota:
            return False

    results = await asyncio.gather(*(attempt() for _ in range(40)))
    assert sum(results) == 5
    usage = await store.usage("t")
    assert usage.cores == 10 and usage.clusters == 5


async def test_concurrent_resizes_stay_within_quota(store: Store) -> None:
    quota = Quota(cores=12, memory=100 * GiB, clusters=5)
    ids = [(await store.admit(fresh(workers=0), quota))[0].id for _ in range(3)]  # 3 cores

    async def grow(cluster_id: str, n: int) -> None:
        try:
            await store.resize(cluster_id, quota, n)
        except OverQuota:
            pass

    await asyncio.gather(*(grow(cid, n) for cid in ids for n in (2, 5, 9, 4)))
    usage = await store.usage("t")
    assert usage.cores <= 12
    best = await store.resize(ids[0], quota, 100, best_effort=True)
    after = await store.usage("t")
    assert after.cores == 12 and best.workers_requested >= 0


async def test_records_survive_reopen_and_transitions_are_checked(tmp_path: Path, state_db) -> None:  # type: ignore[no-untyped-def]
    url = state_db() or f"sqlite:///{tmp_path / 'state.db'}"
    key = keyring()
    s = Store(url, key)
    await s.open(["t"])
    rec, _ = await s.admit(fresh(), Quota(cores=4, memory=8 * GiB))
    await s.update(rec.id, status=Status.STARTING, backend_state={"scheduler": {"pid": 1}})
    with pytest.raises(ValueError):
        await s.update(rec.id, status=Status.PENDING)
    await s.close()
    if url.startswith("sqlite:///"):  # it holds every cluster's client key
        assert os.stat(url.removeprefix("sqlite:///")).st_mode & 0o777 == 0o600
    again = Store(url, key)
    await again.open(["t"])
    got = await again.get(rec.id)
    assert got.status == Status.STARTING and got.backend_state == {"scheduler": {"pid": 1}}
    with pytest.raises(NotFound):
        await again.get("c-nope")
    await again.close()


async def test_cache_follows_commit_order_when_writes_finish_out_of_order(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two writes to one cluster race through the store's threads; the first to commit is
    made slow to return. The cache must still end with what the database holds, or a cluster
    the store has ended would keep holding quota in memory."""
    records = Records(store)
    rec, _ = await records.admit(fresh(workers=0), Quota(cores=4, memory=8 * GiB))
    await records.update(rec.id, status=Status.STARTING)
    await records.update(rec.id, status=Status.RUNNING)
    original = store._update
    calls = 0

    def slow_first(cluster_id: str, changes: dict[str, object]) -> ClusterRecord:
        nonlocal calls
        calls += 1
        result = original(cluster_id, changes)
        if calls == 1:
            time.sleep(0.3)  # committed, but its answer reaches the loop last
        return result

    monkeypatch.setattr(store, "_update", slow_first)
    first = asyncio.create_task(records.update(rec.id, workers_running=1))
    await asyncio.sleep(0.05)
    await records.update(rec.id, status=Status.FAILED, stop_reason=StopReason.FAILED,
                         stop_detail="test")
    await first
    in_db = await store.get(rec.id)
    assert in_db.status == Status.FAILED
    assert records.cached(rec.id) is None
    assert (await records.usage("t")).clusters == 0


def _raw_credentials(s: Store, cluster_id: str) -> object:
    """The credentials column as the database holds it (what a copy of it would show)."""
    import sqlalchemy as sa

    from provisioner.store import clusters_table

    with s.engine.connect() as conn:
        return conn.execute(sa.select(clusters_table.c.credentials)
                            .where(clusters_table.c.id == cluster_id)).scalar()


def _insert_in_clear(s: Store, cluster_id: str) -> dict[str, str]:
    """A stopped cluster's row as the previous release wrote it: credentials in clear."""
    from provisioner.store import clusters_table
    from provisioner.tls import cluster_credentials

    creds = cluster_credentials(cluster_id)
    old = fresh()
    row = {f: getattr(old, f) for f in ("tenant", "project", "worker_cores", "worker_memory",
                                        "scheduler_cores", "scheduler_memory", "workers_requested",
                                        "idle_timeout", "no_client_timeout", "created_at")}
    with s.engine.begin() as conn:
        conn.execute(clusters_table.insert().values(
            **row, id=cluster_id, status="stopped", workers_running=0, env={},
            wanted="running", backend_state={}, credentials=creds))
    return creds


async def test_credentials_are_sealed_in_the_database(store: Store) -> None:
    from provisioner.tls import cluster_credentials

    rec = fresh()
    creds = cluster_credentials(rec.id)
    rec, _ = await store.admit(replace(rec, credentials=creds), Quota(cores=4, memory=8 * GiB))
    raw = _raw_credentials(store, rec.id)
    assert isinstance(raw, str) and "PRIVATE KEY" not in raw and "BEGIN" not in raw
    assert (await store.get(rec.id)).credentials == creds
    # Writes that do not change them leave them sealed; a --no-tls cluster has none.
    await store.update(rec.id, status=Status.STARTING)
    assert _raw_credentials(store, rec.id) == raw
    plain, _ = await store.admit(fresh(), Quota(cores=4, memory=8 * GiB))
    assert _raw_credentials(store, plain.id) == {} and (await store.get(plain.id)).credentials == {}


async def test_clear_credentials_of_an_earlier_release_are_read_then_sealed(store: Store) -> None:
    """Rows the previous release wrote ({"ca": ..., "cert": ...} in clear) still read, and
    seal_credentials (run at start) encrypts them, once."""
    import sqlalchemy as sa

    from provisioner.store import clusters_table

    old = fresh()
    creds = _insert_in_clear(store, old.id)
    assert _raw_credentials(store, old.id) == creds
    assert (await store.get(old.id)).credentials == creds
    assert store.seal_credentials() == 1
    raw = _raw_credentials(store, old.id)
    assert isinstance(raw, str) and "PRIVATE KEY" not in raw
    assert (await store.get(old.id)).credentials == creds
    assert store.seal_credentials() == 0  # nothing left in clear
    with store.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(clusters_table)).scalar() == 1


async def test_another_key_is_refused_at_start_and_changes_nothing(tmp_path: Path, state_db) -> None:  # type: ignore[no-untyped-def]
    from provisioner.secrets import WrongKey
    from provisioner.tls import cluster_credentials

    url = state_db() or f"sqlite:///{tmp_path / 'state.db'}"
    first = Store(url, keyring())
    await first.open(["t"])
    rec = fresh()
    rec, _ = await first.admit(replace(rec, credentials=cluster_credentials(rec.id)),
                            Quota(cores=4, memory=8 * GiB))
    await first.close()
    other = Store(url, Keyring(Fernet.generate_key(), "PROVISIONER_SECRET_KEY"))
    try:
        clear_id = new_cluster_id()
        clear = _insert_in_clear(other, clear_id)
        with pytest.raises(WrongKey, match=f"{rec.id}.*cannot be decrypted with the key from "
                                           "PROVISIONER_SECRET_KEY"):
            other.seal_credentials()
        # Nothing was sealed with the wrong key: the earlier release's row is still in clear.
        assert _raw_credentials(other, clear_id) == clear
    finally:
        await other.close()


async def test_a_fresh_database_gets_this_releases_schema_version(store: Store) -> None:
    assert await store.get_meta(migrations.VERSION_KEY) == str(migrations.LATEST)


#: tests/data/state-v1.db was written by release 1 of the store (schema version 1: one
#: ``stop_reason`` string per cluster) with this key; it is kept to prove every later release
#: still upgrades it.
V1_KEY = b"eb6KW1QvgEhFnAp5gxdjhUlRR6DzU7H6-l73gNKJrqM="


def _release_1_on_postgresql(url: str) -> None:
    """The kept release-1 database, tables and rows, copied into an empty PostgreSQL one."""
    import sqlite3

    import sqlalchemy as sa

    source = sqlite3.connect(Path(__file__).parent / "data" / "state-v1.db")
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            tables = list(source.execute("SELECT name, sql FROM sqlite_master WHERE type = 'table'"))
            for _, ddl in tables:
                conn.exec_driver_sql(ddl.replace("id INTEGER NOT NULL", "id SERIAL NOT NULL"))
            for table, _ in tables:
                cursor = source.execute(f'SELECT * FROM "{table}"')
                columns = [d[0] for d in cursor.description]
                types = {c["name"]: str(c["type"]) for c in sa.inspect(conn).get_columns(table)}
                names = ", ".join(f'"{c}"' for c in columns)
                for row in cursor:
                    values = {c: bool(v) if types[c] == "BOOLEAN" else v
                              for c, v in zip(columns, row, strict=True)}
                    conn.execute(sa.text(f'INSERT INTO "{table}" ({names}) VALUES '
                                         f"({', '.join(':' + c for c in columns)})"), values)
                if types.get("id") == "INTEGER":  # a serial: go on after the copied rows
                    conn.exec_driver_sql(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                                         f'(SELECT coalesce(max(id), 0) + 1 FROM "{table}"), false)')
    finally:
        engine.dispose()
        source.close()


@pytest.mark.postgresql_only
async def test_a_release_1_database_on_postgresql_is_upgraded(state_db) -> None:  # type: ignore[no-untyped-def]
    url = state_db()
    assert url is not None, "the PostgreSQL pass gives a database"
    await asyncio.to_thread(_release_1_on_postgresql, url)
    await _check_release_1_upgrade(url)


@pytest.mark.state_agnostic
@pytest.mark.parametrize("version_row", [True, False], ids=["versioned", "before-versions"])
async def test_a_release_1_database_is_upgraded_keeping_every_record(
        tmp_path: Path, version_row: bool) -> None:
    import shutil

    import sqlalchemy as sa

    path = tmp_path / "state.db"
    shutil.copy(Path(__file__).parent / "data" / "state-v1.db", path)
    if not version_row:  # as written before versions were stored: read as version 1
        with sa.create_engine(f"sqlite:///{path}").begin() as conn:
            conn.execute(sa.text("DELETE FROM meta WHERE key = 'schema_version'"))
    await _check_release_1_upgrade(f"sqlite:///{path}")


async def _check_release_1_upgrade(url: str) -> None:
    old = Store(url, Keyring(V1_KEY, "the v1 test key"))
    try:
        assert await asyncio.to_thread(old.migrate) == migrations.LATEST
        await old.open(["acme"])
        assert await old.get_meta(migrations.VERSION_KEY) == str(migrations.LATEST)
        ended = {cid: (await old.get(cid)).outcome for cid in (f"c-00000000000{i}" for i in range(1, 8))}
        assert ended == {
            "c-000000000001": None,
            "c-000000000002": Outcome(StopReason.USER),
            "c-000000000003": Outcome(StopReason.IDLE),
            "c-000000000004": Outcome(StopReason.NO_CLIENT),
            "c-000000000005": Outcome(StopReason.SHUTDOWN),
            "c-000000000006": Outcome.failed("scheduler exited with status 1"),
            "c-000000000007": Outcome.failed("workers keep exiting (worker killed: 9)"),
        }
        wanted = {cid: (await old.get(cid)).wanted.value
                  for cid in (f"c-00000000000{i}" for i in range(1, 8))}
        assert wanted == {"c-000000000001": "running", "c-000000000002": "stopped",
                          "c-000000000003": "stopped", "c-000000000004": "stopped",
                          "c-000000000005": "stopped", "c-000000000006": "running",
                          "c-000000000007": "running"}  # failed: wanted running, it failed
        live = await old.list_live()
        assert [r.id for r in live] == ["c-000000000001"]
        assert live[0].credentials == {"ca": "CA", "cert": "CERT", "key": "KEY"}
        assert live[0].env == {"A": "1"} and live[0].scheduler_address == "tls://127.0.0.1:1"
        assert (await old.usage("acme")).clusters == 1
        # Upgraded records take this release's writes.
        await old.update("c-000000000001", status=Status.FAILED,
                         stop_reason=StopReason.FAILED, stop_detail="after the upgrade")
        assert (await old.get("c-000000000001")).outcome == Outcome.failed("after the upgrade")
    finally:
        await old.close()


async def test_steps_run_once_in_order_and_a_newer_schema_is_refused(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    import sqlalchemy as sa

    ran: list[int] = []

    def step(conn: sa.Connection) -> None:
        ran.append(len(ran))
        conn.execute(sa.text("CREATE TABLE probe_step (x INTEGER)"))

    monkeypatch.setattr(migrations, "STEPS", [*migrations.STEPS, step])
    monkeypatch.setattr(migrations, "LATEST", migrations.LATEST + 1)
    assert await asyncio.to_thread(store.migrate) == migrations.LATEST
    assert await asyncio.to_thread(store.migrate) == migrations.LATEST  # nothing left to run
    assert ran == [0] and sa.inspect(store.engine).has_table("probe_step")
    # A database a later release moved on: refused with both versions named, left as it is.
    await store.set_meta(migrations.VERSION_KEY, str(migrations.LATEST + 1))
    with pytest.raises(StoreError, match=f"schema version {migrations.LATEST + 1}, newer than "
                                         f"this release's {migrations.LATEST}"):
        await asyncio.to_thread(store.migrate)
    assert await store.get_meta(migrations.VERSION_KEY) == str(migrations.LATEST + 1)


def test_a_missing_database_driver_says_which_extra_brings_it() -> None:
    from provisioner.store import make_engine

    with pytest.raises(StoreError, match=r"driver not available .*install the 'postgres' extra"):
        make_engine("postgresql+nosuchdriver://user@db/provisioner")
