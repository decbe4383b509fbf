"""Drive every live cluster from what it is toward what is wanted, one runner task per cluster.

A runner owns its cluster: it starts the scheduler (a start that takes long is interrupted
the moment a stop is wanted), keeps the worker count at what the record asks for (or what
Dask's adaptive target asks, within quota; shrinking only by workers Dask agrees to let go),
reaps the cluster when idle, and ends it. Every end, whatever its cause (a stop, a reap, a
failure, a shutdown), goes one way: the backend stops the processes (retried until it
confirms), then :meth:`Records.end` writes the outcome; for a scheduler found gone the
outcome is written first and what is left of the cluster is stopped after. All changes are
written through :class:`Records` first, so a service killed at any point finds, on restart,
records it can resume from. The reconciler also relays the backend's events to the runners.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from clusters.base import BACKEND_KEY, Backend, ClusterSpec, LaunchError, Outcome
from clusters.logs import cluster_log
from provisioner.models import ClusterRecord, Status, StopReason, Wanted
from provisioner.quota import Pool
from provisioner.reaping import reap_reason
from provisioner.records import Records
from provisioner.settings import Settings
from provisioner.tenants import TenantDirectory
from provisioner.tls import client_credentials, process_credentials
from provisioner.watch import Report, SchedulerLink, follow

logger = logging.getLogger("provisioner.reconciler")

T = TypeVar("T")

#: A worker that keeps dying is not replaced forever: this many losses in this many seconds
#: fail the cluster.
WORKER_LOSS_LIMIT = (8, 60.0)


def spec_for(record: ClusterRecord, tenants: TenantDirectory, lease: float = 0) -> ClusterSpec:
    tenant = tenants.get(record.tenant)
    environment = tenants.environments.get(record.environment) if record.environment else None
    return ClusterSpec(
        cluster_id=record.id,
        tenant=record.tenant,
        role=tenant.role if tenant else record.tenant,
        batch=tenant.batch if tenant else None,
        worker_cores=record.worker_cores,
        worker_memory=record.worker_memory,
        scheduler_cores=record.scheduler_cores,
        scheduler_memory=record.scheduler_memory,
        env={**(tenant.env if tenant else {}), **record.env},
        image=(environment.image if environment else None) or record.image,
        python=environment.python if environment else None,
        credentials=process_credentials(record.credentials),
        idle_timeout=record.idle_timeout,
        no_client_timeout=record.no_client_timeout,
        lease=lease,
    )


def worker_name(cluster_id: str) -> str:
    return f"{cluster_id}-w{secrets.token_hex(3)}"


class ClusterRunner:
    """Owns one cluster's life; woken by record changes, reports and backend events."""

    def __init__(self, reconciler: Reconciler, record: ClusterRecord) -> None:
        self.rec = reconciler
        self.id = record.id
        self.log = cluster_log(logger, record.tenant, record.id)
        self.kick = asyncio.Event()
        self.report: Report | None = None
        self.report_at = 0.0
        self.link: SchedulerLink | None = None
        self._follower: asyncio.Task[None] | None = None
        self._down_since: float | None = None
        self._losses: deque[float] = deque()
        self._lost_names: deque[str] = deque(maxlen=64)
        self._last_loss = ""
        self.task = asyncio.create_task(self._run(), name=f"cluster-{self.id}")

    @property
    def record(self) -> ClusterRecord:
        record = self.rec.records.cached(self.id)
        assert record is not None, "runner outlived its live record"
        return record

    def spec(self) -> ClusterSpec:
        return spec_for(self.record, self.rec.tenants, self.rec.settings.orphan_lease)

    async def _run(self) -> None:
        try:
            await self._drive()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.log.exception("runner crashed")
            await self._end(Outcome.failed(f"internal error: {exc!r}"))
        finally:
            await self._unlink()
            self.rec.runners.pop(self.id, None)

    async def _drive(self) -> None:
        record = self.record
        if record.status in (Status.PENDING, Status.STARTING) and not record.stop_wanted:
            if not await self._start():
                return
        elif record.status == Status.RUNNING and record.dashboard_url:
            await self._link(record.dashboard_url)
        while True:
            self.kick.clear()  # before looking: a change from here on wakes the next round
            record = self.record
            if record.stop_wanted or record.status == Status.STOPPING:
                await self._end(record.outcome or Outcome(StopReason.USER))
                return
            if record.status.terminal:
                return
            await self._reconcile_workers(record)
            if self.rec.records.cached(self.id) is None:
                return  # it ended (workers that keep exiting fail it)
            reason = reap_reason(record, self.report, time.monotonic() - self.report_at)
            if reason is not None:
                reason = await self._confirm_reap(record)
            if reason is not None:
                self.log.info("reaping reason=%s", reason)
                await self.rec.records.update(self.id, wanted=Wanted.STOPPED, stop_reason=reason)
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.kick.wait(), self.rec.settings.reap_interval)

    # -- start / stop -------------------------------------------------------------------

    async def _start(self) -> bool:
        records = self.rec.records
        if self.record.status == Status.PENDING:
            await records.update(self.id, status=Status.STARTING)
        else:  # a start interrupted by a restart: begin again from nothing
            await self.rec.backend.stop_cluster(self.id)
        # Workers a backend can start along with the scheduler (batch jobs) overlap its start.
        early = [worker_name(self.id) for _ in range(self.record.workers_requested)]
        try:
            endpoint = await self._unless_stopped(
                self.rec.backend.start_scheduler(self.spec(), early),
                self.rec.settings.start_timeout)
        except (LaunchError, TimeoutError) as exc:
            self.rec.backend_error("scheduler-start")
            reason = str(exc) or f"scheduler not up after {self.rec.settings.start_timeout:g}s"
            await self._end(Outcome.failed(reason))
            return False
        if endpoint is None or self.record.stop_wanted:
            self.log.info("asked to stop while starting")
            return True  # the loop stops it: whatever the start left is the backend's to end
        await records.update(
            self.id, status=Status.RUNNING, scheduler_address=endpoint.address,
            dashboard_url=endpoint.http_url, started_at=time.time(),
        )
        self.log.info("running address=%s", endpoint.address)
        if endpoint.http_url:
            await self._link(endpoint.http_url)
        return True

    async def _unless_stopped(self, call: Coroutine[Any, Any, T], timeout: float) -> T | None:
        """Await a backend call that can take long (a start waiting for capacity) so that a
        stop asked meanwhile interrupts it at once: None then, the call cancelled. Past
        ``timeout``: TimeoutError, the call cancelled too."""
        work = asyncio.ensure_future(call)
        deadline = asyncio.get_running_loop().time() + timeout
        try:
            while not work.done():
                if self.record.stop_wanted:
                    return None
                self.kick.clear()
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    raise TimeoutError
                kicked = asyncio.ensure_future(self.kick.wait())
                try:
                    await asyncio.wait({work, kicked}, timeout=left,
                                       return_when=asyncio.FIRST_COMPLETED)
                finally:
                    kicked.cancel()
            return work.result()
        finally:
            if not work.done():
                work.cancel()
                with contextlib.suppress(BaseException):
                    await work

    async def _end(self, outcome: Outcome) -> None:
        """End the cluster, whatever the cause: its processes are stopped first (the record
        stays live and holds its quota until they are gone), then the record is ended."""
        record = self.rec.records.cached(self.id)
        if record is None or record.status.terminal:
            return
        level = logging.WARNING if outcome.is_failure else logging.INFO
        detail = f" detail={outcome.detail!r}" if outcome.detail else ""
        self.log.log(level, "%s reason=%s%s", "failing" if outcome.is_failure else "stopping",
                     outcome.reason.value, detail)
        if not outcome.is_failure and record.status != Status.STOPPING:
            await self.rec.records.update(self.id, status=Status.STOPPING, wanted=Wanted.STOPPED,
                                          stop_reason=outcome.reason, stop_detail=outcome.detail)
        elif outcome.is_failure and record.stop_reason is None:
            # Said before the processes go: a shutdown meanwhile ends it failed, not stopped.
            await self.rec.records.update(self.id, stop_reason=outcome.reason,
                                          stop_detail=outcome.detail)
        await self._unlink()
        await self._stop_processes()
        await self.rec.records.end(self.id, outcome)
        self.log.log(level, "%s reason=%s%s", "failed" if outcome.is_failure else "stopped",
                     outcome.reason.value, detail)

    async def _stop_processes(self) -> None:
        """Have the backend stop everything of the cluster, retrying until it confirms: the
        record meanwhile stays live, its quota held, since something of it may still run."""
        await self.rec.stop_until_confirmed(self.id, self.log)

    # -- observing -----------------------------------------------------------------------

    async def _link(self, http_url: str) -> None:
        self.link = await SchedulerLink.open(http_url,
                                             client_credentials(self.record.credentials) or None)
        self._follower = asyncio.create_task(
            follow(self.link, self._on_report, self.rec.settings.report_timeout)
        )

    async def _unlink(self) -> None:
        if self._follower is not None:
            self._follower.cancel()
            with contextlib.suppress(BaseException):
                await self._follower
            self._follower = None
        if self.link is not None:
            link, self.link = self.link, None
            with contextlib.suppress(Exception):
                await asyncio.wait_for(link.close(), 5)

    async def _on_report(self, report: Report) -> None:
        self.report = report
        self.report_at = time.monotonic()
        running = len(report.workers)
        record = self.rec.records.cached(self.id)
        if record is not None and record.workers_running != running and not record.status.terminal:
            await self.rec.records.update(self.id, workers_running=running)
        self.kick.set()

    async def _confirm_reap(self, record: ClusterRecord) -> StopReason | None:
        """Ask the scheduler once more, right now: work may have arrived since the last report."""
        if self.link is None:
            return None
        try:
            fresh = await self.link.report(-1, 0)
        except Exception:
            return None
        self.report, self.report_at = fresh, time.monotonic()
        return reap_reason(record, fresh, 0)

    def worker_lost(self, name: str, reason: str) -> None:
        if name in self._lost_names:
            return  # the same loss told twice counts once
        self._lost_names.append(name)
        self.rec.backend_error("worker-lost")
        now = time.monotonic()
        self._losses.append(now)
        self._last_loss = reason
        while self._losses and now - self._losses[0] > WORKER_LOSS_LIMIT[1]:
            self._losses.popleft()
        self.kick.set()

    # -- workers -------------------------------------------------------------------------

    async def _adaptive_target(self, record: ClusterRecord) -> ClusterRecord:
        if not record.adaptive or self.report is None:
            return record
        lo, hi = record.adaptive_minimum or 0, record.adaptive_maximum or 0
        target = max(lo, min(hi, self.report.adaptive_target))
        now = time.monotonic()
        tenant = self.rec.tenants.get(record.tenant)
        if tenant is None:
            return record
        if target > record.workers_requested:
            self._down_since = None
            return await self.rec.records.resize(self.id, tenant.quota, target, best_effort=True,
                                                 pool=self.rec.pool)
        if target < record.workers_requested:
            self._down_since = self._down_since or now
            if now - self._down_since >= self.rec.settings.adapt_down_delay:
                self._down_since = None
                closable = await self._closable(record, record.workers_requested - target)
                if closable:
                    return await self.rec.records.resize(
                        self.id, tenant.quota, record.workers_requested - closable)
        else:
            self._down_since = None
        return record

    async def _closable(self, record: ClusterRecord, count: int) -> int:
        """How many of ``count`` workers an adaptive scale-down may take now: those wanted but
        not there (a start failed, a loss not replaced yet), those that never connected, and
        those the scheduler agrees to close at this moment (its report may predate work that
        arrived since; a worker holding the only copy of a result stays)."""
        live = self.rec.backend.live_workers(self.id)
        connected = set(self.report.workers) if self.report else set()
        free = max(0, record.workers_requested - len(live)) + len(live - connected)
        if free >= count or self.link is None:
            return count
        try:
            agreed = await self.link.workers_to_close(count - free, idle_only=True)
        except Exception:
            return min(free, count)  # ask Dask again next round
        # Never more than asked, whatever the scheduler (tenant code) answers.
        return min(count, free + len(set(agreed) & live & connected))

    async def _reconcile_workers(self, record: ClusterRecord) -> None:
        if record.status != Status.RUNNING or not record.scheduler_address:
            return
        if len(self._losses) >= WORKER_LOSS_LIMIT[0]:
            await self._end(Outcome.failed(f"workers keep exiting ({self._last_loss})"))
            return
        address = record.scheduler_address
        record = await self._adaptive_target(record)
        backend = self.rec.backend
        live = backend.live_workers(self.id)
        want = record.workers_requested
        if len(live) < want:
            names = [worker_name(self.id) for _ in range(want - len(live))]
            try:
                await backend.start_workers(self.spec(), address, names)
            except LaunchError as exc:
                self.rec.backend_error("worker-start")
                self.log.warning("workers not started: %s", exc)
        elif len(live) > want:
            await self._retire(live, len(live) - want)

    async def _retire(self, live: set[str], count: int) -> None:
        connected = set(self.report.workers) if self.report else set()
        # Workers that never connected hold no data: drop those first.
        chosen = sorted(live - connected)[:count]
        graceful: list[str] = []
        if len(chosen) < count and self.link is not None:
            with contextlib.suppress(Exception):
                suggested = await self.link.workers_to_close(count - len(chosen))
                graceful = [n for n in suggested if n in live and n not in chosen]
            graceful = graceful[: count - len(chosen)]
            for name in sorted(live & connected):
                if len(chosen) + len(graceful) >= count:
                    break
                if name not in graceful and name not in chosen:
                    graceful.append(name)
            try:
                await self.link.retire(graceful)
            except Exception as exc:
                self.log.warning("graceful retire failed: %r", exc)
        await self.rec.backend.stop_workers(self.id, chosen + graceful)


class Reconciler:
    """Creates runners for live records and relays backend events to them."""

    def __init__(self, records: Records, backend: Backend, tenants: TenantDirectory,
                 settings: Settings) -> None:
        self.records = records
        self.backend = backend
        self.tenants = tenants
        self.settings = settings
        self.runners: dict[str, ClusterRunner] = {}
        #: The capacity all clusters share (adaptive growth stops at it); set by the service.
        self.pool = Pool()
        self._closed = False
        #: Counts backend failures by kind (set by the service to its metrics).
        self.on_backend_error: Any = None
        #: Told of every worker lost: (cluster id, worker name, reason).
        self.on_worker_lost: Callable[[str, str, str], None] = lambda *_: None
        #: Stops of what a lost scheduler left, going on in the background.
        self._stopping: set[asyncio.Task[None]] = set()

    def backend_error(self, kind: str) -> None:
        if self.on_backend_error is not None:
            self.on_backend_error(kind).inc()

    def ensure(self, record: ClusterRecord) -> None:
        """Make sure a runner drives this record (called after every change that needs one)."""
        runner = self.runners.get(record.id)
        if self._closed:
            return  # shutting down: nothing new starts
        if runner is None and not record.status.terminal and record.status != Status.QUEUED:
            self.runners[record.id] = ClusterRunner(self, record)
        elif runner is not None:
            runner.kick.set()

    async def recover(self) -> None:
        """After a (re)start: re-adopt what still runs, end what died, resume the rest."""
        live = await self.records.load_live()
        specs = [(spec_for(r, self.tenants, self.settings.orphan_lease), r.backend_state)
                 for r in live]
        outcome = await self.backend.recover(specs)
        for record in live:
            lost = outcome.get(record.id)
            if record.status == Status.RUNNING and lost and not record.stop_wanted:
                await self.backend.stop_cluster(record.id)
                await self._end_lost(record, lost, " while the service was down")
                continue
            self.ensure(self.records.cached(record.id) or record)

    async def _end_lost(self, record: ClusterRecord, outcome: Outcome, when: str = "") -> None:
        """Record the end of a cluster whose scheduler is gone: it reaped itself, or failed."""
        log = cluster_log(logger, record.tenant, record.id)
        detail = f" detail={outcome.detail!r}" if outcome.detail else ""
        log.log(logging.WARNING if outcome.is_failure else logging.INFO,
                "scheduler ended%s reason=%s%s", when, outcome.reason.value, detail)
        await self.records.end(record.id, outcome)

    async def shutdown(self, stop_clusters: bool) -> None:
        self._closed = True
        runners = list(self.runners.values())
        for runner in runners:
            runner.task.cancel()
        for task in list(self._stopping):
            task.cancel()
        await asyncio.gather(*(r.task for r in runners), *self._stopping, return_exceptions=True)
        if stop_clusters:
            async def stop(record: ClusterRecord) -> None:
                with contextlib.suppress(Exception):
                    await self.backend.stop_cluster(record.id)
                    await self.records.end(record.id, Outcome(StopReason.SHUTDOWN))

            # Queued clusters stay queued (nothing of theirs runs) for the next start.
            await asyncio.gather(*(stop(r) for r in self.records.live()
                                   if r.status != Status.QUEUED))
        await self.backend.close(stop_clusters=False)

    # -- BackendEvents ---------------------------------------------------------------------

    async def state_changed(self, cluster_id: str, state: dict[str, Any]) -> None:
        state = {**state, BACKEND_KEY: self.backend.name}  # a service on another backend refuses it
        record = self.records.cached(cluster_id)
        if record is not None and record.backend_state != state:
            await self.records.update(cluster_id, backend_state=state)

    async def scheduler_lost(self, cluster_id: str, outcome: Outcome) -> None:
        record = self.records.cached(cluster_id)
        if record is None or record.status.terminal or record.status == Status.STOPPING:
            return
        # Record the end first: whatever the runner is doing, it finds a terminal record.
        await self._end_lost(record, outcome)
        runner = self.runners.get(cluster_id)
        if runner is not None:
            runner.task.cancel()
        # What is left of it (workers) goes, retried until the backend confirms.
        log = cluster_log(logger, record.tenant, cluster_id)
        task = asyncio.create_task(self.stop_until_confirmed(cluster_id, log))
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    async def stop_until_confirmed(self, cluster_id: str, log: logging.LoggerAdapter[Any]
                                   | logging.Logger) -> None:
        """The backend stops everything of the cluster; failures are retried with backoff."""
        delay = 0.5
        while True:
            try:
                await self.backend.stop_cluster(cluster_id)
                return
            except Exception as exc:
                self.backend_error("stop")
                log.warning("stop failed, again in %gs: %r", delay, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)

    async def worker_lost(self, cluster_id: str, name: str, reason: str) -> None:
        runner = self.runners.get(cluster_id)
        if runner is not None:
            runner.log.info("worker lost name=%s reason=%r", name, reason)
            self.on_worker_lost(cluster_id, name, reason)
            runner.worker_lost(name, reason)

    def _backend_key(self) -> str:
        return f"backend:{self.backend.name}"

    async def load_backend_state(self) -> dict[str, Any] | None:
        raw = await self.records.store.get_meta(self._backend_key())
        return json.loads(raw) if raw else None

    async def save_backend_state(self, state: dict[str, Any] | None) -> None:
        await self.records.store.set_meta(
            self._backend_key(), None if state is None else json.dumps(state, sort_keys=True))
