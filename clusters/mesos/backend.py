"""Mesos backend: the service is one framework; schedulers and workers are command tasks.

Each tenant's clusters run under the tenant's role (MULTI_ROLE), so Mesos applies its own
quota and weighted DRF between tenants. Task status updates drive the clusters: RUNNING (and
reachable) completes a scheduler start, a failed or lost worker is reported so the core can
replace it, a lost scheduler ends its cluster with Mesos's reason (or the reap its exit
status names). The framework id is kept in the service's database and the failover timeout
is long, so a restarted service re-subscribes, reconciles the tasks its records name and
kills any other task of the framework.

This module is the adapter to the backend interface (offers placed, updates handled,
reconciliation, start and stop); :mod:`.framework` is the subscription and its roles,
:mod:`.book` the tasks and their states, :mod:`.client` the HTTP API, :mod:`.detector` the
leader, :mod:`.offers` placement and :mod:`.tasks` the TaskInfos.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import logging
import secrets
import time
from collections.abc import Sequence
from typing import Any

from clusters.base import (
    Backend,
    BackendEvents,
    ClusterSpec,
    LaunchError,
    Outcome,
    SchedulerEndpoint,
)
from clusters.logs import cluster_log
from clusters.mesos.book import (
    TERMINAL,
    ClusterTasks,
    TaskBook,
    TaskRef,
    TaskState,
    describe,
    reaped_reason,
)
from clusters.mesos.client import MesosClient
from clusters.mesos.framework import Framework
from clusters.mesos.offers import OfferPool, match
from clusters.mesos.tasks import (
    TaskRequest,
    TaskSettings,
    mesos_cpus,
    mesos_mem,
    task_info,
)
from clusters.runner import scheduler_options, worker_options

logger = logging.getLogger("provisioner.mesos")

WEEK = 7 * 24 * 3600.0
#: Updates held before recovery at most (more are left unacknowledged for Mesos to resend).
EARLY_LIMIT = 10_000


class MesosBackend(Framework, Backend):
    """Runs clusters as tasks of one Mesos framework (see the module docstring)."""

    name = "mesos"

    def __init__(
        self,
        master: str,
        *,
        command: str = "python -m clusters.runner",
        framework_name: str = "dask-provisioner",
        user: str | None = None,
        principal: str | None = None,
        failover_timeout: float = WEEK,
        teardown_on_close: bool = False,
        refuse_seconds: float = 5.0,
        idle_refuse_seconds: float = 60.0,
        kill_grace: float = 10.0,
        worker_death_timeout: float = 60.0,
        recover_timeout: float = 20.0,
        scheduler_attempts: int = 3,
        reconcile_interval: float = 900.0,
        weights: dict[str, float] | None = None,
        roles: Sequence[str] = (),
        missed_heartbeats: float = 5,
        backoff_max: float = 15.0,
    ) -> None:
        self.master = master
        self.framework_name = framework_name
        self.user = user or _user()
        self.principal = principal
        self.failover_timeout = failover_timeout
        self.teardown_on_close = teardown_on_close
        self.refuse_seconds = refuse_seconds
        self.idle_refuse_seconds = idle_refuse_seconds
        self.recover_timeout = recover_timeout
        self.scheduler_attempts = max(1, scheduler_attempts)
        self.reconcile_interval = reconcile_interval
        self.weights = dict(weights or {})
        self.task_settings = TaskSettings(command=command, kill_grace=kill_grace,
                                          death_timeout=worker_death_timeout)
        self.roles: set[str] = set(roles)
        self.client = MesosClient(master, self, framework_id=None,
                                  missed_heartbeats=missed_heartbeats, backoff_max=backoff_max)
        self._events: BackendEvents | None = None
        self.book = TaskBook()
        self._pending: dict[str, TaskRequest] = {}
        self._suppressed: set[str] | None = None  # None: unknown, tell the master next time
        self._fresh: set[str] = set()  # roles with newly queued tasks: revive (clears filters)
        self._offer_lock = asyncio.Lock()
        self._recovered = False
        #: Updates of tasks not known yet, seen before recover(): kept unacknowledged until
        #: recovery knows which tasks are ours, then handled (a terminal one tells how a
        #: scheduler ended while the service was away; acknowledged, Mesos forgets it).
        self._early: list[dict[str, Any]] = []
        self._background: set[asyncio.Task[Any]] = set()
        self._persist_lock = asyncio.Lock()
        self._reconciling: asyncio.Task[None] | None = None


    # -- EventHandler (called by the client) -----------------------------------------------

    async def subscribed(self, framework_id: str, heartbeat_interval: float) -> None:
        await self._persist(framework_id)
        # Launches whose ACCEPT was lost with the old stream are found by reconciliation.
        self._start_reconcile()

    async def event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "OFFERS":
            await self._on_offers((event.get("offers") or {}).get("offers") or [])
        elif kind == "UPDATE":
            await self._on_update((event.get("update") or {}).get("status") or {})
        elif kind == "FAILURE":
            failure = event.get("failure") or {}
            agent = (failure.get("agent_id") or {}).get("value")
            if "executor_id" not in failure:
                logger.warning("mesos: agent %s lost", agent)
        elif kind == "INVERSE_OFFERS":
            ids = [o["id"] for o in (event.get("inverse_offers") or {}).get("inverse_offers", [])]
            if ids:
                self._spawn(self._call("DECLINE_INVERSE_OFFERS", {"inverse_offer_ids": ids}))
        elif kind in ("RESCIND", "RESCIND_INVERSE_OFFER", "MESSAGE"):
            pass  # offers are never held, so a rescind has nothing to undo
        else:
            logger.debug("mesos: ignoring event %s", kind)


    async def _kill(self, ref: TaskRef) -> bool:
        payload: dict[str, Any] = {
            "task_id": {"value": ref.task_id},
            "kill_policy": {"grace_period": {
                "nanoseconds": int(self.task_settings.kill_grace * 1e9)}},
        }
        if ref.agent_id:
            payload["agent_id"] = {"value": ref.agent_id}
        return await self._call("KILL", payload)

    # -- offers ----------------------------------------------------------------------------

    async def _on_offers(self, offers: list[dict[str, Any]]) -> None:
        async with self._offer_lock:
            pools = [OfferPool.parse(o) for o in offers]
            placements = match(pools, list(self._pending.values()), self.book.used_by_role(),
                               self.weights)
            by_offer: dict[str, list[Any]] = {}
            for placement in placements:
                by_offer.setdefault(placement.offer.id, []).append(placement)
            changed: set[str] = set()
            calls = []
            for pool in pools:
                chosen = by_offer.get(pool.id)
                if not chosen:
                    continue
                infos = []
                for p in chosen:
                    request = p.request
                    self._pending.pop(request.task_id, None)
                    ref = self.book.ref(request.task_id)
                    if ref is None:
                        continue
                    ref.agent_id, ref.host = pool.agent_id, pool.hostname
                    ref.port = p.ports[0] if p.ports else None
                    ref.dashboard_port = p.ports[1] if len(p.ports) > 1 else None
                    ref.state = TaskState.LAUNCHED
                    ref.resources = (request.cpus, request.mem)
                    infos.append(task_info(request, pool.agent_id, pool.hostname, p.resources,
                                           p.ports, self.task_settings))
                    changed.add(request.cluster_id)
                calls.append((pool, chosen, {
                    "offer_ids": [{"value": pool.id}],
                    "operations": [{"type": "LAUNCH", "launch": {"task_infos": infos}}],
                    "filters": {"refuse_seconds": self.refuse_seconds},
                }))
            for cluster_id in changed:
                await self._save(cluster_id)
            declined = [{"value": p.id} for p in pools if p.id not in by_offer]
            refuse = self.refuse_seconds if self._pending else self.idle_refuse_seconds
            results = await asyncio.gather(
                *(self._call("ACCEPT", payload) for _, _, payload in calls),
                *([self._call("DECLINE", {"offer_ids": declined,
                                          "filters": {"refuse_seconds": refuse}})]
                  if declined else []),
            )
            for (_, chosen, _), ok in zip(calls, results, strict=False):
                if not ok:  # the master refused the call: nothing was launched
                    for p in chosen:
                        ref = self.book.ref(p.request.task_id)
                        if ref is not None and ref.state == TaskState.LAUNCHED:
                            ref.state = TaskState.PENDING
                            self._pending[p.request.task_id] = p.request
            for p in placements:
                cluster_log(logger, p.request.tenant, p.request.cluster_id).info(
                    "mesos: launched task=%s agent=%s", p.request.task_id, p.offer.hostname)
        await self._sync_offers()

    # -- status updates --------------------------------------------------------------------

    async def _on_update(self, status: dict[str, Any]) -> None:
        task_id = (status.get("task_id") or {}).get("value", "")
        agent_id = (status.get("agent_id") or {}).get("value")
        if not self._recovered and self.book.ref(task_id) is None:
            if len(self._early) < EARLY_LIMIT:
                self._early.append(status)
            return  # unacknowledged: past the limit, Mesos sends it again
        try:
            await self._handle_status(task_id, agent_id, status)
        finally:
            uuid = status.get("uuid")
            if uuid and agent_id:
                self._spawn(self._call("ACKNOWLEDGE", {
                    "agent_id": {"value": agent_id}, "task_id": {"value": task_id},
                    "uuid": uuid}))

    async def _handle_status(self, task_id: str, agent_id: str | None,
                             status: dict[str, Any]) -> None:
        state = TaskState.of(status.get("state"))
        ref = self.book.ref(task_id)
        if ref is None:
            if state not in TERMINAL:
                logger.warning("mesos: killing unrecognised task %s", task_id)
                self._spawn(self._kill(TaskRef(task_id, "worker", agent_id)))
            return
        cluster = self.book.clusters[self.book.index[task_id]]
        ref.seen = time.monotonic()
        if agent_id:
            ref.agent_id = agent_id
        if state not in TERMINAL:
            ref.state = state
            if state == TaskState.RUNNING and ref is cluster.scheduler and cluster.starting \
                    and not cluster.starting.done():
                cluster.starting.set_result(None)
            if task_id in cluster.stopping and status.get("reason") == "REASON_RECONCILIATION":
                self._spawn(self._kill(ref))  # a kill lost while disconnected
            cluster.touch()
            return
        reason = describe(status)
        if ref is cluster.scheduler and cluster.recovering and state == TaskState.FAILED \
                and status.get("reason") == "REASON_RECONCILIATION" and task_id not in cluster.stopping:
            # Reconciliation keeps the state alone; how it ended (its exit status, which says
            # whether it reaped itself) comes with the agent's own update, which the agent
            # sends again until acknowledged: recovery waits a while for it.
            ref.state = TaskState.ENDED_UNCONFIRMED
            cluster.lost = Outcome.failed(f"scheduler task {reason}")
            return
        reaped = reaped_reason(status) if ref is cluster.scheduler else None
        lost = reaped or Outcome.failed(f"scheduler task {reason}")
        ref.state = state
        self.book.index.pop(task_id, None)
        wanted_end = task_id in cluster.stopping or cluster.stopped
        cluster.stopping.discard(task_id)
        if ref is cluster.scheduler:
            cluster.scheduler = None
            if cluster.starting is not None and not cluster.starting.done():
                cluster.starting.set_exception(LaunchError(f"scheduler task {reason}"))
            elif cluster.launching:
                pass  # start_scheduler sees the state and decides
            elif cluster.recovering:
                cluster.lost = lost
            elif not wanted_end and self._events is not None:
                cluster_log(logger, cluster.spec.tenant, cluster.spec.cluster_id).warning(
                    "mesos: scheduler lost: %s", reason)
                self._spawn(self._events.scheduler_lost(cluster.spec.cluster_id, lost))
        else:
            cluster.workers.pop(task_id, None)
            # A clean exit is a worker retired by Dask; anything else is a loss to report.
            if not wanted_end and state != TaskState.FINISHED and self._events is not None \
                    and not cluster.recovering:
                self._spawn(self._events.worker_lost(cluster.spec.cluster_id, task_id,
                                                     f"worker task {reason}"))
        cluster.touch()
        if cluster.stopped and not cluster.tasks():
            self.book.clusters.pop(cluster.spec.cluster_id, None)
        await self._save(cluster.spec.cluster_id)

    # -- reconciliation --------------------------------------------------------------------

    def _start_reconcile(self) -> None:
        if self._reconciling is not None and not self._reconciling.done():
            self._reconciling.cancel()
        self._reconciling = asyncio.create_task(self._reconcile(), name="mesos-reconcile")

    async def _reconcile(self) -> None:
        """Explicit reconciliation of every task we believe in, retried with backoff, then
        (once the core has told us what is ours) implicit reconciliation to find strays."""
        await self._sync_offers()
        started = time.monotonic()
        delay = 2.0
        # Only tasks launched before this round: a launch in flight is no question yet.
        believed = [r for c in self.book.clusters.values() for r in c.tasks() if r.state != TaskState.PENDING]
        for attempt in range(6):
            if attempt:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
            refs = [r for r in believed if r.seen < started and self.book.ref(r.task_id) is r]
            if not refs:
                break
            tasks = []
            for ref in refs:
                item: dict[str, Any] = {"task_id": {"value": ref.task_id}}
                if ref.agent_id:
                    item["agent_id"] = {"value": ref.agent_id}
                tasks.append(item)
            if not await self._call("RECONCILE", {"tasks": tasks}):
                return
        if self._recovered:
            await self._call("RECONCILE", {"tasks": []})

    # -- persistence -----------------------------------------------------------------------

    async def _save(self, cluster_id: str) -> None:
        cluster = self.book.clusters.get(cluster_id)
        state = cluster.state() if cluster and not cluster.stopped \
            else {"scheduler": None, "workers": {}}
        if self._events is not None:
            await self._events.state_changed(cluster_id, state)

    # -- Backend ---------------------------------------------------------------------------

    async def _reconcile_periodically(self) -> None:
        """Implicit reconciliation now and then catches tasks whose updates went missing."""
        while True:
            await asyncio.sleep(self.reconcile_interval)
            if self._recovered and (self._reconciling is None or self._reconciling.done()):
                await self._call("RECONCILE", {"tasks": []})

    async def open(self, events: BackendEvents) -> None:
        self._events = events
        await self._load(events)
        self.client.start()
        self._spawn(self._reconcile_periodically())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.client.subscribed.wait(), self.recover_timeout)
        if not self.client.subscribed.is_set():
            logger.warning("mesos: not subscribed yet to %s; carrying on, retrying", self.master)

    async def close(self, stop_clusters: bool) -> None:
        if stop_clusters:
            await asyncio.gather(*(self.stop_cluster(c) for c in list(self.book.clusters)),
                                 return_exceptions=True)
        if self.teardown_on_close:
            logger.warning("mesos: TEARDOWN of framework %s", self.client.framework_id)
            if await self._call("TEARDOWN"):
                await self._persist(None)
        self._events = None
        if self._reconciling is not None:
            self._reconciling.cancel()
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self.client.stop()

    async def recover(
        self, clusters: Sequence[tuple[ClusterSpec, dict[str, Any]]]
    ) -> dict[str, Outcome | None]:
        recovering: list[ClusterTasks] = []
        for spec, state in clusters:
            cluster = self.book.cluster(spec)
            cluster.recovering = True
            sched = (state or {}).get("scheduler")
            if sched:
                cluster.scheduler = TaskRef.from_dict("scheduler", sched)
                self.book.index[cluster.scheduler.task_id] = spec.cluster_id
            for name, data in ((state or {}).get("workers") or {}).items():
                ref = TaskRef.from_dict("worker", data)
                cluster.workers[name] = ref
                self.book.index[ref.task_id] = spec.cluster_id
            if cluster.tasks():
                with contextlib.suppress(LaunchError):
                    await self._ensure_role(spec.role)
            recovering.append(cluster)
        self._recovered = True
        early, self._early = self._early, []
        for status in early:
            await self._on_update(status)
        if self.client.subscribed.is_set():
            self._start_reconcile()

        deadline = time.monotonic() + self.recover_timeout
        while time.monotonic() < deadline:
            if all(c.scheduler is None or c.scheduler.state not in (TaskState.RECOVERING, TaskState.ENDED_UNCONFIRMED)
                   for c in recovering):
                break
            await asyncio.sleep(0.1)
        result: dict[str, Outcome | None] = {}
        for cluster in recovering:
            cid = cluster.spec.cluster_id
            cluster.recovering = False
            if cluster.scheduler is not None and cluster.scheduler.state == TaskState.ENDED_UNCONFIRMED:
                self.book.index.pop(cluster.scheduler.task_id, None)
                cluster.scheduler = None
            if cluster.scheduler is None:
                result[cid] = cluster.lost or Outcome.failed("no scheduler task")
            else:
                # RUNNING, or no answer yet: assume alive, a later answer will tell.
                result[cid] = None
            # Workers found gone during recovery are simply not live any more.
            await self._save(cid)
        return result

    async def start_scheduler(self, spec: ClusterSpec,
                              workers: Sequence[str] = ()) -> SchedulerEndpoint:
        cluster = self.book.cluster(spec)
        cluster.stopped = False
        await self._ensure_role(spec.role)
        cluster.launching = True
        try:
            for attempt in range(1, self.scheduler_attempts + 1):
                try:
                    ref = await self._run_scheduler(cluster, spec)
                    break
                except LaunchError as exc:
                    # A scheduler that dies at once (say its port is taken by a process
                    # Mesos does not know) gets another try elsewhere.
                    if cluster.stopped or attempt == self.scheduler_attempts:
                        raise
                    cluster_log(logger, spec.tenant, spec.cluster_id).warning(
                        "mesos: %s; launching the scheduler again", exc)
        finally:
            cluster.launching = False
        if ref.host is None:  # running means placed: an agent's host is known
            raise LaunchError("scheduler task running on no known host")
        return SchedulerEndpoint.of(ref.host, ref.port, ref.dashboard_port, bool(spec.credentials))

    async def _run_scheduler(self, cluster: ClusterTasks, spec: ClusterSpec) -> TaskRef:
        """Launch one scheduler task; return once it runs and accepts connections."""
        if cluster.scheduler is not None:  # an earlier attempt: make way
            old, cluster.scheduler = cluster.scheduler, None
            self._pending.pop(old.task_id, None)
            self.book.index.pop(old.task_id, None)  # from now on a stray, killed if seen alive
            if old.state != TaskState.PENDING:
                await self._kill(old)
        task_id = f"{spec.cluster_id}-scheduler-{secrets.token_hex(3)}"
        ref = TaskRef(task_id, "scheduler")
        cluster.scheduler = ref
        self.book.index[task_id] = spec.cluster_id
        loop = asyncio.get_running_loop()
        cluster.starting = starting = loop.create_future()
        self._enqueue(TaskRequest(
            task_id=task_id, cluster_id=spec.cluster_id, tenant=spec.tenant, kind="scheduler",
            role=spec.role, cpus=mesos_cpus(spec.scheduler_cores),
            mem=mesos_mem(spec.scheduler_memory), options=scheduler_options(spec),
            env=dict(spec.env), image=spec.image, python=spec.python, ports=2,  # Dask's port and the HTTP server's
        ))
        await self._save(spec.cluster_id)
        try:
            await starting
            await self._reachable(cluster, ref)
        finally:
            if cluster.starting is starting:
                cluster.starting = None
        return ref

    async def _reachable(self, cluster: ClusterTasks, ref: TaskRef) -> None:
        """RUNNING means the process started; wait until it accepts connections."""
        while True:
            if cluster.scheduler is not ref or ref.state in TERMINAL:
                raise LaunchError(f"scheduler task {ref.state} before accepting connections")
            try:
                _, writer = await asyncio.wait_for(
                    asyncio.open_connection(ref.host, ref.port), 2)
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
                return
            except (OSError, TimeoutError):
                await asyncio.sleep(0.2)

    async def start_workers(self, spec: ClusterSpec, address: str, names: Sequence[str]) -> None:
        cluster = self.book.cluster(spec)
        await self._ensure_role(spec.role)
        for name in names:
            if name in cluster.workers:
                continue
            cluster.workers[name] = TaskRef(name, "worker")
            self.book.index[name] = spec.cluster_id
            self._queue(TaskRequest(
                task_id=name, cluster_id=spec.cluster_id, tenant=spec.tenant, kind="worker",
                role=spec.role, cpus=mesos_cpus(spec.worker_cores),
                mem=mesos_mem(spec.worker_memory),
                options=worker_options(spec, address, name, self.task_settings.death_timeout),
                env=dict(spec.env), image=spec.image, python=spec.python,
            ))
        self._spawn(self._sync_offers())  # once for the whole batch
        await self._save(spec.cluster_id)

    async def stop_workers(self, cluster_id: str, names: Sequence[str]) -> None:
        cluster = self.book.clusters.get(cluster_id)
        if cluster is None:
            return
        kills = []
        for name in names:
            ref = cluster.workers.get(name)
            if ref is None:
                continue
            if ref.state == TaskState.PENDING:
                self._pending.pop(name, None)
                cluster.workers.pop(name, None)
                self.book.index.pop(name, None)
            else:
                cluster.stopping.add(name)
                kills.append(self._kill(ref))
        await asyncio.gather(*kills)
        await self._save(cluster_id)
        self._spawn(self._sync_offers())

    async def stop_cluster(self, cluster_id: str) -> None:
        cluster = self.book.clusters.get(cluster_id)
        if cluster is None:
            await self._save(cluster_id)
            return
        cluster.stopped = True
        if cluster.starting is not None and not cluster.starting.done():
            cluster.starting.set_exception(LaunchError("cluster stopped while starting"))
            cluster.starting.exception()  # retrieved: nobody may be waiting any more
        for ref in cluster.tasks():
            if ref.state == TaskState.PENDING:
                self._pending.pop(ref.task_id, None)
                self.book.index.pop(ref.task_id, None)
                if ref is cluster.scheduler:
                    cluster.scheduler = None
                else:
                    cluster.workers.pop(ref.task_id, None)
        live = cluster.tasks()
        cluster.stopping.update(r.task_id for r in live)
        await asyncio.gather(*(self._kill(r) for r in live))
        deadline = time.monotonic() + self.task_settings.kill_grace + 10
        while cluster.tasks() and time.monotonic() < deadline:
            changed = cluster.changed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), max(0.1, deadline - time.monotonic()))
        if cluster.tasks():
            cluster_log(logger, cluster.spec.tenant, cluster_id).warning(
                "mesos: tasks %s not confirmed dead yet", [r.task_id for r in cluster.tasks()])
        else:
            self.book.clusters.pop(cluster_id, None)
        await self._save(cluster_id)
        self._spawn(self._sync_offers())

    def live_workers(self, cluster_id: str) -> set[str]:
        cluster = self.book.clusters.get(cluster_id)
        if cluster is None or cluster.stopped:
            return set()
        return set(cluster.workers) - cluster.stopping


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "nobody"
