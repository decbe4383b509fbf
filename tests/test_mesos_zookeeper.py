"""The Mesos client finds and follows the leading master through a real ZooKeeper (Debian's
3.8, started by the tests), where contenders announce themselves as Mesos masters do: leader
changes, a leader that crashes or hangs, ZooKeeper down at start, restarted, and away for a
while. The masters are the tests' Mesos master doubles; every stream is real HTTP.

Each case prints how long the move took; the assertions leave room for a loaded machine but
are far below what a client without a watch needs (a dead stream is noticed after five missed
heartbeats, 75 s by default)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest

from clusters.mesos.client import MesosClient
from tests.mesos_master import MesosMaster
from tests.service import ServiceProcess, tenant, wait_until
from tests.test_mesos_backend import RUNNER, mesos
from tests.test_mesos_client import Recorder, running, until
from tests.zookeeper import Contender, ZooKeeperServer

__all__ = ["mesos"]  # the fixture

#: Generous bound on a move to a new leader that should take under a second.
MOVE_BOUND = 4.0


@pytest.fixture(scope="module")
def zookeeper() -> Iterator[ZooKeeperServer]:
    server = ZooKeeperServer().start()
    try:
        yield server
    finally:
        server.remove()


@contextlib.asynccontextmanager
async def masters(n: int) -> AsyncIterator[list[MesosMaster]]:
    """Masters whose heartbeats are slow (15 s): only the watch can make a move fast."""
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(MesosMaster(agents=1, heartbeat_interval=15))
               for _ in range(n)]


@contextlib.contextmanager
def contenders() -> Iterator[list[Contender]]:
    made: list[Contender] = []
    try:
        yield made
    finally:
        for c in made:
            c.close()


def zk_url(zk: ZooKeeperServer, path: str) -> str:
    return f"zk://{zk.hosts}{path}"


async def moved(client: MesosClient, rec: Recorder, master: MesosMaster, since: float,
                what: str, bound: float = MOVE_BOUND) -> float:
    """Seconds from ``since`` until ``client`` is subscribed to ``master``; asserts the bound."""
    await until(lambda: client.base == master.url and client.subscribed.is_set(),
                timeout=bound + 30)
    took = time.monotonic() - since
    print(f"\n{what}: subscribed to the new leader {took:.2f}s after the change")
    assert took < bound, f"{what}: {took:.2f}s"
    return took


async def test_leader_changes_move_the_subscription_at_once_every_time(
        zookeeper: ZooKeeperServer) -> None:
    path = f"/mesos-{uuid.uuid4().hex[:8]}"
    async with masters(2) as (a, b):
        with contenders() as made:
            made.append(Contender(zookeeper, path, "127.0.0.1", a.port))
            made.append(Contender(zookeeper, path, "127.0.0.1", b.port))
            rec = Recorder()
            client = MesosClient(zk_url(zookeeper, path), rec, backoff_min=0.5)
            async with running(client):
                await until(lambda: client.base == a.url and client.subscribed.is_set())
                framework = client.framework_id
                # Five incidents in a row: each move is as quick as the first (the backoff
                # starts again after every subscription).
                times = []
                old, new = a, b
                for incident in range(5):
                    leader = made.pop(0)
                    since = time.monotonic()
                    leader.withdraw()  # the old master's stream stays open: only the watch tells
                    times.append(await moved(client, rec, new, since, f"leader change {incident + 1}"))
                    made.append(Contender(zookeeper, path, "127.0.0.1", old.port))
                    old, new = new, old
                assert client.framework_id == framework, "the same framework id throughout"
                assert max(times) < MOVE_BOUND


async def test_a_crashed_or_hung_leader_is_left_when_its_session_ends(
        zookeeper: ZooKeeperServer) -> None:
    path = f"/mesos-{uuid.uuid4().hex[:8]}"
    async with masters(3) as (a, b, c):
        with contenders() as made:
            for m in (a, b, c):
                made.append(Contender(zookeeper, path, "127.0.0.1", m.port, session_timeout=2))
            rec = Recorder()
            client = MesosClient(zk_url(zookeeper, path), rec)
            async with running(client):
                await until(lambda: client.base == a.url and client.subscribed.is_set())
                since = time.monotonic()
                made[0].hang()  # hung: its session expires after its timeout
                await moved(client, rec, b, since, "hung leader (2 s session)", MOVE_BOUND + 2)
                since = time.monotonic()
                made[1].crash()
                await moved(client, rec, c, since, "crashed leader (2 s session)", MOVE_BOUND + 2)


async def test_zookeeper_down_at_start_then_up(zookeeper: ZooKeeperServer) -> None:
    path = f"/mesos-{uuid.uuid4().hex[:8]}"
    async with masters(1) as (a,):
        with contenders() as made:
            made.append(Contender(zookeeper, path, "127.0.0.1", a.port, session_timeout=30))
            zookeeper.stop()
            rec = Recorder()
            client = MesosClient(zk_url(zookeeper, path), rec)
            try:
                async with running(client):
                    await asyncio.sleep(8)  # what a growing reconnect backoff would punish
                    assert not client.subscribed.is_set()
                    await asyncio.to_thread(zookeeper.start)
                    since = time.monotonic()
                    await moved(client, rec, a, since, "ZooKeeper back after 8 s down at start")
            finally:
                if zookeeper.process is None:
                    zookeeper.start()


async def test_a_zookeeper_outage_keeps_the_stream_and_changes_are_seen_after_it(
        zookeeper: ZooKeeperServer) -> None:
    path = f"/mesos-{uuid.uuid4().hex[:8]}"
    async with masters(2) as (a, b):
        with contenders() as made:
            for m in (a, b):
                made.append(Contender(zookeeper, path, "127.0.0.1", m.port, session_timeout=30))
            rec = Recorder()
            client = MesosClient(zk_url(zookeeper, path), rec)
            async with running(client):
                await until(lambda: client.base == a.url and client.subscribed.is_set())
                subscriptions = client.subscriptions
                zookeeper.stop()
                try:
                    await asyncio.sleep(10)
                    # Mesos does not need ZooKeeper to keep a stream: still subscribed to A.
                    assert client.subscribed.is_set() and client.subscriptions == subscriptions
                    assert client.base == a.url
                finally:
                    await asyncio.to_thread(zookeeper.start)
                back = time.monotonic()
                for _ in range(60):
                    if await asyncio.to_thread(_sessions_back, made):
                        break
                    await asyncio.sleep(0.3)
                print(f"\ncontenders' sessions back {time.monotonic() - back:.2f}s after ZooKeeper")
                made[0].withdraw()
                await moved(client, rec, b, back, "ZooKeeper back after 10 s, then a leader change",
                            MOVE_BOUND + 4)


def _sessions_back(made: list[Contender]) -> bool:
    """Both contenders' nodes are there again (their sessions outlived the outage)."""
    from kazoo.client import KazooClient

    zk: Any = None
    try:
        zk = KazooClient(hosts=made[0].hosts, timeout=5)
        zk.start(timeout=5)
        return all(zk.exists(c.node) for c in made)
    except Exception:
        return False
    finally:
        if zk is not None:
            with contextlib.suppress(Exception):
                zk.stop()
                zk.close()


@pytest.mark.state_agnostic
def test_a_service_answers_at_once_with_zookeeper_down_and_serves_once_it_is_back(
        zookeeper: ZooKeeperServer, make_service: Callable[..., ServiceProcess],
        mesos: Any) -> None:
    """The port answers while the service waits for its backend (liveness yes, readiness and
    requests a clear 503), and it serves, adopting nothing twice, once ZooKeeper is back."""
    path = f"/mesos-{uuid.uuid4().hex[:8]}"
    master = mesos(agents=1, agent_cpus=4, agent_mem=4096)
    host, port = master.address.rsplit(":", 1)
    with contenders() as made:
        made.append(Contender(zookeeper, path, host, int(port), session_timeout=30))
        zookeeper.stop()
        svc = make_service([tenant("acme", cores=4)], args=[
            "--backend", "mesos", "--mesos-master", zk_url(zookeeper, path),
            "--mesos-command", RUNNER])
        starting = threading.Thread(target=svc.start, kwargs={"timeout": 120}, daemon=True)
        try:
            begun = time.monotonic()
            starting.start()
            live = wait_until(lambda: _status(svc, "/livez") == 200, timeout=30,
                              what="/livez while starting")
            answered = time.monotonic() - begun
            print(f"\n/livez answered {answered:.2f}s after start with ZooKeeper down")
            assert live and answered < 15
            assert _status(svc, "/healthz") == 503
            with svc.client("acme") as http:
                refused = http.get("/clusters")
            assert refused.status_code == 503 and "starting" in refused.json()["detail"]
        finally:
            zookeeper.start()
        starting.join(120)
        assert _status(svc, "/healthz") == 200
        c = svc.create("acme", workers=1)
        assert c["status"] == "running", c
        with svc.client("acme") as http:
            assert http.delete(f"/clusters/{c['id']}").status_code == 200


def _status(svc: ServiceProcess, path: str) -> int | None:
    try:
        return httpx.get(svc.url + path, timeout=2).status_code
    except httpx.HTTPError:
        return None
