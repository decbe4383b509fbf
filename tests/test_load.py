"""Load and crashes: concurrent tenants hammering the API, and a SIGKILL in the middle of it.

Both are bounded in requests and time and talk to loopback only. Afterwards the books must
balance: quotas held at every sampled moment, no 500, every record consistent with what runs
(each running cluster takes a client and computes; each failed one says why), no orphaned
process, no quota left in use.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from distributed import Client

from tests.service import GiB, ServiceProcess, tenant, wait_until
from tests.test_mesos_backend import mesos, on_mesos, tasks

__all__ = ["mesos"]  # the fixture, shared with the Mesos backend tests

TENANTS = {"red": 3.0, "green": 3.0, "blue": 2.5}  # cores each; memory is never the limit
MakeService = Callable[..., ServiceProcess]


async def _actor(http: httpx.AsyncClient, rng: random.Random, deadline: float, ids: list[str],
                 statuses: Counter[int], max_requests: int) -> None:
    for _ in range(max_requests):
        if time.monotonic() > deadline:
            return
        op = rng.choice(["create", "create", "scale", "adapt", "delete", "get"])
        if op == "create" or not ids:
            r = await http.post("/clusters", json={"workers": rng.randint(0, 2),
                                                   "idle_timeout": 600, "no_client_timeout": 600})
            if r.status_code == 201:
                ids.append(r.json()["id"])
        else:
            cid = rng.choice(ids)
            if op == "scale":
                r = await http.post(f"/clusters/{cid}/scale", json={"workers": rng.randint(0, 3)})
            elif op == "adapt":
                r = await http.post(f"/clusters/{cid}/adapt", json={"minimum": 0, "maximum": 2})
            elif op == "delete":
                r = await http.delete(f"/clusters/{cid}")
            else:
                r = await http.get(f"/clusters/{cid}")
        statuses[r.status_code] += 1
        await asyncio.sleep(rng.random() * 0.05)


async def _storm(svc: ServiceProcess, seconds: float, on_the_way: Callable[[], None] | None = None,
                 ) -> tuple[Counter[int], dict[str, list[str]], list[tuple[str, dict[str, Any]]]]:
    statuses: Counter[int] = Counter()
    ids: dict[str, list[str]] = {name: [] for name in TENANTS}
    samples: list[tuple[str, dict[str, Any]]] = []
    deadline = time.monotonic() + seconds
    clients = {name: httpx.AsyncClient(base_url=svc.url, timeout=60,
                                       headers={"Authorization": f"Bearer token-{name}"})
               for name in TENANTS}

    async def sampler() -> None:
        while time.monotonic() < deadline:
            for name, http in clients.items():
                try:
                    samples.append((name, (await http.get("/tenants/me")).json()["usage"]))
                except httpx.HTTPError:
                    return  # the service was killed on purpose
            await asyncio.sleep(0.05)

    async def killer() -> None:
        if on_the_way is not None:
            await asyncio.sleep(seconds / 2)
            await asyncio.to_thread(on_the_way)

    async def guarded(coro: Any) -> None:
        try:
            await coro
        except httpx.HTTPError:
            if on_the_way is None:
                raise

    try:
        rng = random.Random(11)
        actors = [guarded(_actor(http, random.Random(rng.random()), deadline, ids[name], statuses, 60))
                  for name, http in clients.items() for _ in range(3)]
        await asyncio.gather(*actors, guarded(sampler()), killer())
    finally:
        for http in clients.values():
            await http.aclose()
    return statuses, ids, samples


@dataclass
class Deployment:
    """A service on one backend, and what runs for it: processes (local) or tasks (Mesos)."""

    svc: ServiceProcess
    runs_of: Callable[[str], set[Any]]
    running: Callable[[], set[Any]]


@pytest.fixture(params=["local", "mesos"])
def deploy(request: pytest.FixtureRequest, make_service: MakeService,
           mesos: Any) -> Callable[[], Deployment]:
    def make() -> Deployment:
        if request.param == "local":
            svc = make_service(_tenants()).start()
            return Deployment(svc, lambda cid: {p.pid for p in svc.processes_of(cid)},
                              lambda: {p.pid for p in svc.owned()})
        master = mesos(agents=2, agent_cpus=5, agent_mem=8192)
        svc = on_mesos(make_service, master, _tenants()).start()
        return Deployment(svc, lambda cid: {t["task_id"] for t in tasks(master, cid)},
                          lambda: {t["task_id"] for t in tasks(master)})

    return make


def _settle_and_check(d: Deployment) -> dict[str, dict[str, Any]]:
    """Wait until no record is in flux, then check records against what runs, and quotas."""
    svc = d.svc
    records: dict[str, dict[str, Any]] = {}
    for name in TENANTS:
        with svc.client(name) as http:
            def settled(http: httpx.Client = http) -> list[dict[str, Any]] | None:
                clusters = http.get("/clusters").json()["clusters"]
                busy = [c for c in clusters if c["status"] in ("pending", "starting", "stopping")]
                return None if busy else clusters

            for c in wait_until(settled, timeout=120, what=f"{name}'s clusters settle") or []:
                records[c["id"]] = c
    live = [c for c in records.values() if c["status"] == "running"]
    for c in live:
        # Against the record as it is now: adaptive clusters go on resizing themselves.
        with svc.client(c["tenant"]) as http:
            wait_until(lambda c=c, http=http: len(d.runs_of(c["id"])) == 1 + http.get(
                f"/clusters/{c['id']}").json()["workers"]["requested"],
                timeout=90, what=f"{c['id']} runs what its record asks")
        _usable(svc, c)
    for c in records.values():
        if c["status"] == "failed":
            assert c["stop_reason"].startswith("failed: "), c
        if c["status"] in ("stopped", "failed"):
            wait_until(lambda c=c: not d.runs_of(c["id"]), timeout=30, what=f"{c['id']} gone")
    # No orphans: everything that runs belongs to a running record.
    expected = set().union(*(d.runs_of(c["id"]) for c in live)) if live else set()
    wait_until(lambda: d.running() <= expected, timeout=30, what="no orphaned processes")
    return records


def _usage_at_rest(http: httpx.Client) -> tuple[list[dict[str, Any]], dict[str, Any]] | None:
    """The tenant's running clusters and its usage, read while neither changed (adaptive
    clusters go on scaling by themselves), or None."""
    def running() -> list[tuple[str, int]]:
        return sorted((c["id"], c["workers"]["requested"]) for c in
                       http.get("/clusters", params={"status": "running"}).json()["clusters"])

    before = running()
    usage = http.get("/tenants/me").json()["usage"]
    if running() != before:
        return None
    return [{"id": cid, "workers": {"requested": n}} for cid, n in before], usage


def _usable(svc: ServiceProcess, c: dict[str, Any]) -> None:
    """A running cluster takes a client; with workers (as its record says now), it computes.
    An adaptive one computes with the workers it has: submitted at once, the task keeps its
    worker busy, so the cluster does not shrink under it (its quota may be held by the
    tenant's other clusters, so it may not grow)."""
    with svc.client(c["tenant"]) as http:
        c = http.get(f"/clusters/{c['id']}").json()
        usage = http.get("/tenants/me").json()["usage"]
    with Client(c["scheduler_address"], security=svc.security(c["tenant"], c["id"]),
                timeout=30) as client:
        want = c["workers"]["requested"]
        assert client.run_on_scheduler(lambda: 7) == 7
        if not want:
            return
        future = client.submit(sum, [want, 1])
        if c["adaptive"] is None:
            client.wait_for_workers(want, timeout=60)
        try:
            assert future.result(timeout=90) == want + 1
        except TimeoutError:
            with svc.client(c["tenant"]) as http:
                now = http.get(f"/clusters/{c['id']}").json()
            raise AssertionError(f"no result: {c} then {now}, usage {usage}") from None


def _delete_all_and_check_empty(d: Deployment) -> int:
    svc = d.svc
    for name in TENANTS:
        with svc.client(name) as http:
            for c in http.get("/clusters").json()["clusters"]:
                http.delete(f"/clusters/{c['id']}")
    for name in TENANTS:
        with svc.client(name) as http:
            usage = wait_until(lambda http=http: (u := http.get("/tenants/me").json()["usage"])
                               and u["clusters"] == 0 and u, timeout=120, what="quota released")
            assert usage == {"clusters": 0, "cores": 0.0, "memory": 0, "workers": 0}
    with contextlib.suppress(AssertionError):
        wait_until(lambda: not d.running(), timeout=60, what="every cluster process gone")
    return len(d.running())


def _tenants() -> list[dict[str, Any]]:
    return [tenant(name, cores=cores, memory=16 * GiB, clusters=3) for name, cores in TENANTS.items()]


def test_load_from_several_tenants(deploy: Callable[[], Deployment]) -> None:
    d = deploy()
    statuses, ids, samples = asyncio.run(_storm(d.svc, seconds=12))
    _settle_and_check(d)
    created = sum(len(v) for v in ids.values())
    for name, usage in samples:
        assert usage["cores"] <= TENANTS[name] + 1e-9 and usage["clusters"] <= 3, (name, usage)
    leaks = _delete_all_and_check_empty(d)
    print(f"\nload: {sum(statuses.values())} requests, by status {dict(sorted(statuses.items()))}, "
          f"{created} clusters created, {len(samples)} quota samples, leaks {leaks}")
    assert statuses[500] == 0 and created >= 3 and samples
    assert set(statuses) <= {200, 201, 403, 409}, statuses
    assert leaks == 0


def test_sigkill_in_the_middle_of_creates_scales_and_deletes(deploy: Callable[[], Deployment]) -> None:
    d = deploy()
    svc = d.svc
    statuses, _, _ = asyncio.run(_storm(svc, seconds=6, on_the_way=svc.kill))
    assert statuses[500] == 0
    svc.start()
    records = _settle_and_check(d)
    for name in TENANTS:
        with svc.client(name) as http:
            mine, usage = wait_until(lambda http=http: _usage_at_rest(http), what="a still moment")
            assert usage["clusters"] == len(mine), (name, usage, mine)
            assert abs(usage["cores"] - sum(0.5 + c["workers"]["requested"] for c in mine)) < 1e-9
    # Everything still managed after the crash: one running cluster (if any) scales and stops.
    running = [c for c in records.values() if c["status"] == "running"]
    if running:
        c = running[0]
        with svc.client(c["tenant"]) as http:
            assert http.post(f"/clusters/{c['id']}/scale", json={"workers": 0}).status_code == 200
            wait_until(lambda: len(d.runs_of(c["id"])) == 1, what="scaled to zero")
    assert _delete_all_and_check_empty(d) == 0
