"""The core's life cycle in one process, against backends that misbehave on purpose: fast and
deterministic, beside the end-to-end tests that run real clusters."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet

from clusters.base import Backend, BackendEvents, ClusterSpec, LaunchError, SchedulerEndpoint
from provisioner.models import Status
from provisioner.secrets import Keyring
from provisioner.service import ClusterRequest, Provisioner
from provisioner.settings import Settings
from provisioner.store import Store
from provisioner.tenants import Defaults, Quota, Tenant, TenantDirectory

GiB = 2**30
TENANT = Tenant(name="acme", token_sha256=["0" * 64],
                quota=Quota(cores=4, memory=8 * GiB, clusters=3),
                defaults=Defaults(worker_cores=1, worker_memory=GiB, scheduler_cores=1,
                                  scheduler_memory=GiB))


class FaultyBackend(Backend):
    """Starts that hang (until cancelled) or fail, and a record of every call made."""

    name = "faulty"

    def __init__(self, start: str = "hang") -> None:
        self.start = start
        self.calls: list[tuple[str, str]] = []
        self.cancelled: set[str] = set()

    async def open(self, events: BackendEvents) -> None:
        pass

    async def close(self, stop_clusters: bool) -> None:
        pass

    async def recover(self, clusters: Sequence[tuple[ClusterSpec, dict[str, Any]]]) -> dict[str, str | None]:
        return {spec.cluster_id: None for spec, _ in clusters}

    async def start_scheduler(self, spec: ClusterSpec) -> SchedulerEndpoint:
        self.calls.append(("start_scheduler", spec.cluster_id))
        if self.start == "fail":
            raise LaunchError("no capacity, on purpose")
        try:
            await asyncio.Event().wait()  # never fits
        except asyncio.CancelledError:
            self.cancelled.add(spec.cluster_id)
            raise
        raise AssertionError("unreachable")

    async def start_workers(self, spec: ClusterSpec, address: str, names: Sequence[str]) -> None:
        self.calls.append(("start_workers", spec.cluster_id))

    async def stop_workers(self, cluster_id: str, names: Sequence[str]) -> None:
        self.calls.append(("stop_workers", cluster_id))

    async def stop_cluster(self, cluster_id: str) -> None:
        self.calls.append(("stop_cluster", cluster_id))

    def live_workers(self, cluster_id: str) -> set[str]:
        return set()


@pytest.fixture
async def make(tmp_path: Path) -> AsyncIterator[Any]:
    made: list[Provisioner] = []

    async def build(backend: Backend, **settings: Any) -> Provisioner:
        store = Store(f"sqlite:///{tmp_path / f'state{len(made)}.db'}",
                      Keyring(Fernet.generate_key(), "a test key"))
        service = Provisioner(Settings(data_dir=tmp_path, tls=False, **settings),
                              TenantDirectory([TENANT]), store, backend)
        await service.start()
        made.append(service)
        return service

    yield build
    for service in made:
        await service.stop()


async def _until(service: Provisioner, cluster_id: str, *statuses: Status,
                 timeout: float = 5) -> Any:
    """The record once its status is one of ``statuses`` (asserted), waiting at most ``timeout``."""
    record = await service.records.wait_for(cluster_id, lambda r: r.status in statuses, timeout)
    assert record.status in statuses, f"{record.status} after {timeout}s"
    return record


async def test_delete_interrupts_a_start_that_never_completes(make: Any) -> None:
    backend = FaultyBackend("hang")
    service = await make(backend, start_timeout=600)
    record = await service.create(TENANT, ClusterRequest(workers=1))
    await _until(service, record.id, Status.STARTING)
    await asyncio.sleep(0.1)
    assert (await service.usage(TENANT)).clusters == 1

    await service.delete(TENANT, record.id)
    ended = await _until(service, record.id, Status.STOPPED, Status.FAILED, timeout=5)
    assert ended.status == Status.STOPPED and ended.stop_reason == "user"
    assert record.id in backend.cancelled, "the start must be cancelled, not left running"
    assert ("stop_cluster", record.id) in backend.calls, "whatever it launched is stopped"
    assert ("start_workers", record.id) not in backend.calls
    assert (await service.usage(TENANT)).clusters == 0


async def test_a_start_past_its_timeout_fails_and_is_cancelled(make: Any) -> None:
    backend = FaultyBackend("hang")
    service = await make(backend, start_timeout=0.5)
    record = await service.create(TENANT, ClusterRequest(workers=0))
    ended = await _until(service, record.id, Status.STOPPED, Status.FAILED)
    assert ended.status == Status.FAILED and "not up after 0.5s" in (ended.stop_reason or "")
    assert record.id in backend.cancelled
    assert (await service.usage(TENANT)).clusters == 0


async def test_a_failing_start_fails_the_cluster_with_the_backend_reason(make: Any) -> None:
    backend = FaultyBackend("fail")
    service = await make(backend)
    record = await service.create(TENANT, ClusterRequest(workers=0))
    ended = await _until(service, record.id, Status.STOPPED, Status.FAILED)
    assert ended.status == Status.FAILED and ended.stop_reason == "failed: no capacity, on purpose"
    assert ("stop_cluster", record.id) in backend.calls
    # A delete after the end changes nothing.
    again = await service.delete(TENANT, record.id)
    assert again.status == Status.FAILED


async def test_create_and_adapt_store_the_same_clamped_maximum(make: Any) -> None:
    """workers_per_cluster 3: an adaptive maximum of 50 is 3 whether created or adapted to."""
    limited = TENANT.model_copy(update={"quota": TENANT.quota.model_copy(
        update={"workers_per_cluster": 3})})
    service = await make(FaultyBackend("hang"), start_timeout=600)
    service.tenants = TenantDirectory([limited])
    service.reconciler.tenants = service.tenants
    created = await service.create(limited, ClusterRequest(adaptive_minimum=0, adaptive_maximum=50))
    assert (created.adaptive_minimum, created.adaptive_maximum) == (0, 3)
    adapted = await service.adapt(limited, created.id, 1, 50)
    assert (adapted.adaptive_minimum, adapted.adaptive_maximum, adapted.workers_requested) == (1, 3, 1)
    await service.delete(limited, created.id)
    assert (await _until(service, created.id, Status.STOPPED)).stop_reason == "user"
