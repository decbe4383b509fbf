"""The core's life cycle in one process, against backends that misbehave on purpose: fast and
deterministic, beside the end-to-end tests that run real clusters."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet

from clusters.base import (
    Backend,
    BackendEvents,
    ClusterSpec,
    LaunchError,
    Outcome,
    SchedulerEndpoint,
    StopReason,
)
from provisioner.models import Status, Wanted
from provisioner.secrets import Keyring
from provisioner.service import ClusterRequest, ClusterService
from provisioner.settings import Settings
from provisioner.store import Store
from provisioner.tenants import Defaults, Quota, Tenant, TenantDirectory

GiB = 2**30
TENANT = Tenant(name="acme", token_sha256=["0" * 64],
                quota=Quota(cores=4, memory=8 * GiB, clusters=3),
                defaults=Defaults(worker_cores=1, worker_memory=GiB, scheduler_cores=1,
                                  scheduler_memory=GiB))


class FaultyBackend(Backend):
    """Misbehaves on purpose: starts that hang (until cancelled), fail or succeed; workers that
    stay or die at once; stops that fail a number of times. Records every call made."""

    name = "faulty"

    def __init__(self, start: str = "hang", workers: str = "stay", stop_failures: int = 0) -> None:
        self.start = start
        self.workers = workers
        self.stop_failures = stop_failures
        self.calls: list[tuple[str, str]] = []
        self.cancelled: set[str] = set()
        self.live: dict[str, set[str]] = {}
        self.events: BackendEvents | None = None

    async def open(self, events: BackendEvents) -> None:
        self.events = events

    async def close(self, stop_clusters: bool) -> None:
        pass

    async def recover(self, clusters: Sequence[tuple[ClusterSpec, dict[str, Any]]],
                      ) -> dict[str, Outcome | None]:
        return {spec.cluster_id: None for spec, _ in clusters}

    async def start_scheduler(self, spec: ClusterSpec,
                              workers: Sequence[str] = ()) -> SchedulerEndpoint:
        self.calls.append(("start_scheduler", spec.cluster_id))
        if self.start == "fail":
            raise LaunchError("no capacity, on purpose")
        if self.start == "ok":
            return SchedulerEndpoint("tcp://127.0.0.1:1")  # no HTTP server: nothing to watch
        try:
            await asyncio.Event().wait()  # never fits
        except asyncio.CancelledError:
            self.cancelled.add(spec.cluster_id)
            raise
        raise AssertionError("unreachable")

    async def start_workers(self, spec: ClusterSpec, address: str, names: Sequence[str]) -> None:
        self.calls.append(("start_workers", spec.cluster_id))
        live = self.live.setdefault(spec.cluster_id, set())
        live.update(names)
        if self.workers == "die":
            assert self.events is not None
            for name in names:
                live.discard(name)
                await self.events.worker_lost(spec.cluster_id, name, "exit code 1, on purpose")

    async def stop_workers(self, cluster_id: str, names: Sequence[str]) -> None:
        self.calls.append(("stop_workers", cluster_id))
        self.live.get(cluster_id, set()).difference_update(names)

    async def stop_cluster(self, cluster_id: str) -> None:
        self.calls.append(("stop_cluster", cluster_id))
        if self.stop_failures:
            self.stop_failures -= 1
            raise LaunchError("the engine did not answer, on purpose")
        self.live.pop(cluster_id, None)

    def live_workers(self, cluster_id: str) -> set[str]:
        return set(self.live.get(cluster_id, set()))


@pytest.fixture
async def make(tmp_path: Path) -> AsyncIterator[Any]:
    made: list[ClusterService] = []

    key = Fernet.generate_key()

    async def build(backend: Backend, state: str = "", **settings: Any) -> ClusterService:
        """A service on ``backend``; services given the same ``state`` share their database."""
        store = Store(f"sqlite:///{tmp_path / (state or f'state{len(made)}.db')}",
                      Keyring(key, "a test key"))
        service = ClusterService(Settings(data_dir=tmp_path, tls=False, **settings),
                              TenantDirectory([TENANT]), store, backend)
        await service.start()
        made.append(service)
        return service

    yield build
    for service in made:
        await service.stop()


async def _until(service: ClusterService, cluster_id: str, *statuses: Status,
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
    assert ended.status == Status.STOPPED and ended.outcome == Outcome(StopReason.USER)
    assert ended.wanted == Wanted.STOPPED
    assert record.id in backend.cancelled, "the start must be cancelled, not left running"
    assert ("stop_cluster", record.id) in backend.calls, "whatever it launched is stopped"
    assert ("start_workers", record.id) not in backend.calls
    assert (await service.usage(TENANT)).clusters == 0


async def test_a_start_past_its_timeout_fails_and_is_cancelled(make: Any) -> None:
    backend = FaultyBackend("hang")
    service = await make(backend, start_timeout=0.5)
    record = await service.create(TENANT, ClusterRequest(workers=0))
    ended = await _until(service, record.id, Status.STOPPED, Status.FAILED)
    assert ended.status == Status.FAILED and "not up after 0.5s" in (ended.stop_detail or "")
    assert record.id in backend.cancelled
    assert (await service.usage(TENANT)).clusters == 0


async def test_a_failing_start_fails_the_cluster_with_the_backend_reason(make: Any) -> None:
    backend = FaultyBackend("fail")
    service = await make(backend)
    record = await service.create(TENANT, ClusterRequest(workers=0))
    ended = await _until(service, record.id, Status.STOPPED, Status.FAILED)
    assert ended.status == Status.FAILED
    assert ended.outcome == Outcome.failed("no capacity, on purpose")
    assert ended.wanted == Wanted.RUNNING, "it was wanted running, and failed"
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
    assert (await _until(service, created.id, Status.STOPPED)).stop_reason == StopReason.USER


async def test_workers_that_die_in_a_loop_fail_the_cluster_with_their_reason(make: Any) -> None:
    backend = FaultyBackend("ok", workers="die")
    service = await make(backend)
    record = await service.create(TENANT, ClusterRequest(workers=2))
    ended = await _until(service, record.id, Status.FAILED, Status.STOPPED, timeout=30)
    assert ended.status == Status.FAILED
    assert ended.outcome == Outcome.failed("workers keep exiting (exit code 1, on purpose)")
    starts = backend.calls.count(("start_workers", record.id))
    assert 4 <= starts <= 8, "replaced a few times, not forever"
    assert backend.calls[-1] == ("stop_cluster", record.id)
    assert (await service.usage(TENANT)).clusters == 0


async def test_a_stop_that_fails_is_retried_and_holds_the_quota_until_it_succeeds(
        make: Any) -> None:
    backend = FaultyBackend("ok", stop_failures=2)
    service = await make(backend)
    record = await service.create(TENANT, ClusterRequest(workers=1))
    await _until(service, record.id, Status.RUNNING)
    await service.delete(TENANT, record.id)
    await asyncio.sleep(0.2)  # the first attempt failed, the next waits 0.5 s
    assert (await service.records.get(record.id)).status == Status.STOPPING
    assert (await service.usage(TENANT)).clusters == 1, "something may still run: quota held"
    ended = await _until(service, record.id, Status.STOPPED, Status.FAILED, timeout=10)
    assert ended.status == Status.STOPPED and ended.outcome == Outcome(StopReason.USER)
    assert backend.calls.count(("stop_cluster", record.id)) == 3
    assert (await service.usage(TENANT)).clusters == 0


async def test_duplicated_and_out_of_order_events_change_nothing_twice(make: Any) -> None:
    backend = FaultyBackend("ok")
    service = await make(backend)
    events = service.reconciler
    record = await service.create(TENANT, ClusterRequest(workers=1))
    await _until(service, record.id, Status.RUNNING)
    # One worker loss told nine times is one loss, not a loop of them.
    name = next(iter(backend.live_workers(record.id)))
    for _ in range(9):
        await events.worker_lost(record.id, name, "exit code 1")
    await asyncio.sleep(0.3)
    assert (await service.records.get(record.id)).status == Status.RUNNING
    # Events about clusters nobody knows are ignored.
    await events.worker_lost("c-nobody", "c-nobody-w1", "exit code 1")
    await events.scheduler_lost("c-nobody", Outcome.failed("gone"))
    # The scheduler lost twice: the first reason stands.
    await events.scheduler_lost(record.id, Outcome.failed("scheduler task TASK_FAILED: first"))
    await events.scheduler_lost(record.id, Outcome(StopReason.IDLE))
    ended = await _until(service, record.id, Status.FAILED, Status.STOPPED)
    assert ended.outcome == Outcome.failed("scheduler task TASK_FAILED: first")
    # A stop or a reap decided just too late does not rewrite how it ended.
    late = await service.records.update(record.id, wanted=Wanted.STOPPED, stop_reason=StopReason.USER)
    assert (late.status, late.outcome) == (Status.FAILED, ended.outcome)
    # A loss arriving after the end changes nothing either.
    await events.worker_lost(record.id, name, "late")
    await events.state_changed(record.id, {"scheduler": None, "workers": {}})
    again = await service.records.get(record.id)
    assert (again.status, again.outcome) == (Status.FAILED, ended.outcome)
    assert (await service.usage(TENANT)).clusters == 0


async def test_a_restarted_service_re_adopts_what_runs_and_fails_what_died(
        make: Any, tmp_path: Path) -> None:
    class Restarted(FaultyBackend):
        """After the restart the engine says one scheduler is gone, the other alive."""

        def __init__(self, gone: str) -> None:
            super().__init__("ok")
            self.gone = gone

        async def recover(self, clusters: Sequence[tuple[ClusterSpec, dict[str, Any]]],
                          ) -> dict[str, Outcome | None]:
            return {spec.cluster_id: Outcome.failed("scheduler task TASK_LOST")
                    if spec.cluster_id == self.gone else None for spec, _ in clusters}

    first = await make(FaultyBackend("ok"), state="restart.db")
    kept = await first.create(TENANT, ClusterRequest(workers=1))
    lost = await first.create(TENANT, ClusterRequest(workers=1))
    await _until(first, kept.id, Status.RUNNING)
    await _until(first, lost.id, Status.RUNNING)
    await first.stop(keep_clusters=True)

    backend = Restarted(lost.id)
    second = await make(backend, state="restart.db")
    assert (await _until(second, kept.id, Status.RUNNING)).stop_reason is None
    ended = await _until(second, lost.id, Status.FAILED)
    assert ended.outcome == Outcome.failed("scheduler task TASK_LOST")
    # The adopted cluster is driven again: its worker restarted, then it stops on request.
    for _ in range(50):
        if backend.live_workers(kept.id):
            break
        await asyncio.sleep(0.1)
    assert backend.live_workers(kept.id), "the adopted cluster's worker is started again"
    await second.delete(TENANT, kept.id)
    assert (await _until(second, kept.id, Status.STOPPED)).outcome == Outcome(StopReason.USER)
    assert (await second.usage(TENANT)).clusters == 0


async def test_the_first_reason_to_end_stands_when_a_shutdown_comes_meanwhile(make: Any) -> None:
    backend = FaultyBackend("ok", stop_failures=1000)  # the user's stop cannot finish
    service = await make(backend)
    record = await service.create(TENANT, ClusterRequest(workers=0))
    await _until(service, record.id, Status.RUNNING)
    await service.delete(TENANT, record.id)
    await _until(service, record.id, Status.STOPPING)
    # The service's shutdown ends it (as Reconciler.shutdown does once its stop went through).
    ended = await service.records.end(record.id, Outcome(StopReason.SHUTDOWN))
    assert (ended.status, ended.outcome) == (Status.STOPPED, Outcome(StopReason.USER))


async def test_a_scheduler_offering_more_workers_than_asked_takes_no_more(make: Any) -> None:
    """workers-to-close is answered by tenant code: an answer naming every worker when one
    was asked for shrinks the cluster by one, never below what Dask's target asked."""
    from types import SimpleNamespace

    from provisioner.reconciler import ClusterRunner
    from provisioner.watch import Report

    names = {f"c-1-w{i}" for i in range(5)}

    class Lying:
        async def workers_to_close(self, n: int, idle_only: bool = False) -> list[str]:
            return sorted(names)  # all of them, whatever n was

    runner = ClusterRunner.__new__(ClusterRunner)
    runner.id = "c-1"
    runner.rec = SimpleNamespace(backend=SimpleNamespace(live_workers=lambda _: set(names)))
    runner.report = Report(version=1, workers=sorted(names), clients=1, busy=False,
                           idle_for=None, no_client_for=None, adaptive_target=4)
    runner.link = Lying()  # type: ignore[assignment]
    record = SimpleNamespace(workers_requested=5)
    assert await runner._closable(record, 1) == 1  # type: ignore[arg-type]
