"""Which borrowed workers preemption takes (pure planning; the end-to-end run with real
clusters is in tests/test_queue.py)."""

from __future__ import annotations

import time

from provisioner.models import ClusterRecord, Status
from provisioner.preemption import Take, plan, within_guarantee
from provisioner.quota import Pool, Usage
from provisioner.tenants import Tenant

GiB = 2**30


def tenant(name: str, cores: float = 8, guaranteed: float | None = 4) -> Tenant:
    quota: dict = {"cores": cores, "memory": 64 * GiB}
    if guaranteed is not None:
        quota["guaranteed"] = {"cores": guaranteed, "memory": 32 * GiB}
    return Tenant(name=name, token_sha256=["0" * 64], quota=quota)


def cluster(cid: str, owner: str, workers: int, age: float = 0, status: Status = Status.RUNNING,
            ) -> ClusterRecord:
    return ClusterRecord(id=cid, tenant=owner, project="p", status=status, worker_cores=1,
                         worker_memory=GiB, scheduler_cores=0.5, scheduler_memory=GiB,
                         workers_requested=workers, idle_timeout=60, no_client_timeout=60,
                         created_at=time.time() - age)


TENANTS = {t.name: t for t in (tenant("a"), tenant("b"), tenant("free", guaranteed=None))}
POOL = Pool(cores=8)


def test_takes_only_what_is_borrowed_newest_cluster_first() -> None:
    old, new = cluster("c-old", "a", 3, age=100), cluster("c-new", "a", 3, age=1)  # a: 7 cores
    wanted = cluster("c-b", "b", 2)  # 2.5 cores, within b's 4
    running = [old, new]
    assert within_guarantee(TENANTS["b"], Usage(), wanted)
    takes = plan(wanted, POOL, Usage.of(running), running, TENANTS)
    # 7 + 2.5 - 8 = 1.5 cores needed: two workers of the newest cluster.
    assert takes == [Take("c-new", "a", 2)]


def test_never_below_the_victims_guarantee() -> None:
    running = [cluster("c-a", "a", 4)]  # a holds 4.5: 0.5 above its guarantee
    wanted = cluster("c-b", "b", 3, status=Status.QUEUED)  # 3.5; pool free 3.5 -> fits
    assert plan(wanted, POOL, Usage.of(running), running, TENANTS) == []
    bigger = cluster("c-b2", "b", 4)  # 4.5 > 3.5 free: 1 core needed, a can spare 0.5 only
    assert plan(bigger, POOL, Usage.of(running), running, TENANTS) is None


def test_a_tenant_without_guarantee_has_everything_borrowed_and_asks_for_nothing() -> None:
    running = [cluster("c-f", "free", 7)]  # 7.5 cores, no guarantee
    wanted = cluster("c-a", "a", 3)  # 3.5 within a's 4; 3 cores needed
    assert plan(wanted, POOL, Usage.of(running), running, TENANTS) == [Take("c-f", "free", 3)]
    assert not within_guarantee(TENANTS["free"], Usage(), cluster("c-x", "free", 0))


def test_a_request_above_its_guarantee_does_not_preempt() -> None:
    mine = [cluster("c-b", "b", 3)]  # b holds 3.5 of its 4
    assert not within_guarantee(TENANTS["b"], Usage.of(mine), cluster("c-b2", "b", 1))
