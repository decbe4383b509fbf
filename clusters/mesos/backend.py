"""Mesos backend: the service is one framework; schedulers and workers are command tasks.

Each tenant's clusters run under the tenant's role (MULTI_ROLE), so Mesos applies its own
quota and weighted DRF between tenants. Task status updates drive the clusters: RUNNING (and
reachable) completes a scheduler start, a failed or lost worker is reported so the core can
replace it, a lost scheduler fails its cluster with Mesos's reason. The framework id is kept
in the data folder and the failover timeout is long, so a restarted service re-subscribes,
reconciles the tasks its records name and kills any other task of the framework.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import logging
import re
import secrets
import socket
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

from clusters.base import (
    REAP_REASONS,
    Backend,
    BackendEvents,
    ClusterSpec,
    LaunchError,
    Outcome,
    SchedulerEndpoint,
)
from clusters.logs import cluster_log
from clusters.mesos.client import CallError, MesosClient, NotSubscribed
from clusters.mesos.offers import OfferPool, match
from clusters.mesos.tasks import (
    Kind,
    TaskRequest,
    TaskSettings,
    mesos_cpus,
    mesos_mem,
    task_info,
)
from clusters.runner import scheduler_options, worker_options

logger = logging.getLogger("provisioner.mesos")

WEEK = 7 * 24 * 3600.0
TERMINAL = frozenset({
    "TASK_FINISHED", "TASK_FAILED", "TASK_KILLED", "TASK_ERROR", "TASK_LOST", "TASK_DROPPED",
    "TASK_GONE", "TASK_GONE_BY_OPERATOR", "TASK_UNKNOWN",
})
#: Our own marker for a task waiting for an offer, and for one sent in an ACCEPT.
PENDING, LAUNCHED = "PENDING", "LAUNCHED"
#: Updates held before recovery at most (more are left unacknowledged for Mesos to resend).
EARLY_LIMIT = 10_000


def describe(status: dict[str, Any]) -> str:
    """A short human reason from a TaskStatus: state, Mesos reason and message."""
    text = status.get("state", "TASK_UNKNOWN")
    if status.get("reason") == "REASON_RECONCILIATION":
        return text + " (found by reconciliation)"
    if status.get("reason"):
        text += f" ({status['reason']})"
    if status.get("message"):
        text += f": {status['message']}"
    return text


#: A scheduler that reconciliation says ended, while recovery waits to learn how.
UNCONFIRMED_END = "ENDED_UNCONFIRMED"


def reaped_reason(status: dict[str, Any]) -> Outcome | None:
    """Why a scheduler task reaped itself, read from the exit status its executor reports
    (``clusters.base.REAP_EXIT_CODES``); None for any other end."""
    found = re.fullmatch(r"Command exited with status (\d{1,3})", str(status.get("message", "")))
    reason = REAP_REASONS.get(int(found.group(1))) if found else None
    return Outcome(reason) if reason else None


@dataclass
class TaskRef:
    """One task of a cluster as the backend believes it to be."""

    task_id: str
    kind: Kind
    agent_id: str | None = None
    host: str | None = None
    port: int | None = None
    dashboard_port: int | None = None
    state: str = PENDING
    #: monotonic time of the last status seen (reconciliation wants answers per round)
    seen: float = 0.0
    resources: tuple[float, float] = (0.0, 0.0)

    def as_dict(self) -> dict[str, Any]:
        return {"task_id": self.task_id, "agent_id": self.agent_id, "host": self.host,
                "port": self.port, "dashboard_port": self.dashboard_port,
                "cpus": self.resources[0], "mem": self.resources[1]}

    @classmethod
    def from_dict(cls, kind: Kind, data: dict[str, Any]) -> TaskRef:
        return cls(data["task_id"], kind, data.get("agent_id"), data.get("host"),
                   data.get("port"), data.get("dashboard_port"), state="RECOVERING",
                   resources=(float(data.get("cpus") or 0), float(data.get("mem") or 0)))


@dataclass
class _Cluster:
    spec: ClusterSpec
    scheduler: TaskRef | None = None
    workers: dict[str, TaskRef] = field(default_factory=dict)
    #: task ids we asked to kill (or that were retired): their end is no loss
    stopping: set[str] = field(default_factory=set)
    starting: asyncio.Future[None] | None = None
    #: start_scheduler is in progress: a scheduler ending now is its failure, not a loss
    launching: bool = False
    stopped: bool = False
    recovering: bool = False
    #: how its scheduler ended, learnt while recovering
    lost: Outcome | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def tasks(self) -> list[TaskRef]:
        refs = list(self.workers.values())
        if self.scheduler is not None:
            refs.insert(0, self.scheduler)
        return refs

    def state(self) -> dict[str, Any]:
        return {
            "scheduler": self.scheduler.as_dict() if self.scheduler else None,
            "workers": {n: r.as_dict() for n, r in self.workers.items()},
        }

    def touch(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()


class MesosBackend(Backend):
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
        self._clusters: dict[str, _Cluster] = {}
        self._tasks: dict[str, str] = {}  # task id -> cluster id
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

    # -- framework id ----------------------------------------------------------------------

    async def _load(self, events: BackendEvents) -> None:
        """The framework id and roles from the service's database, so a re-subscription (from
        this machine or a fresh one) is the same framework with the same roles."""
        saved = await events.load_backend_state() or {}
        self.roles.update(saved.get("roles") or [])
        self.client.framework_id = saved.get("framework_id") or None

    async def _persist(self, framework_id: str | None) -> None:
        """Save the framework id and roles (None: forget the framework), one write at a time."""
        async with self._persist_lock:
            if self._events is not None:
                await self._events.save_backend_state(
                    None if framework_id is None
                    else {"framework_id": framework_id, "roles": sorted(self.roles)})

    # -- EventHandler (called by the client) -----------------------------------------------

    def framework_info(self, roles: set[str] | None = None) -> dict[str, Any]:
        info: dict[str, Any] = {
            "user": self.user,
            "name": self.framework_name,
            "roles": sorted(self.roles if roles is None else roles),
            "capabilities": [{"type": "MULTI_ROLE"}],
            "failover_timeout": self.failover_timeout,
            "checkpoint": True,
            "hostname": socket.gethostname(),
        }
        if self.principal:
            info["principal"] = self.principal
        return info

    def _wanted_roles(self) -> set[str]:
        return {r.role for r in self._pending.values()}

    def subscription(self) -> tuple[dict[str, Any], list[str]]:
        suppressed = sorted(self.roles - self._wanted_roles())
        self._suppressed = set(suppressed)
        return self.framework_info(), suppressed

    async def subscribed(self, framework_id: str, heartbeat_interval: float) -> None:
        await self._persist(framework_id)
        # Launches whose ACCEPT was lost with the old stream are found by reconciliation.
        self._start_reconcile()

    async def disconnected(self) -> None:
        self._suppressed = None
        logger.warning("mesos: disconnected from the master; re-subscribing")

    async def framework_removed(self, message: str) -> None:
        logger.error("mesos: framework removed by the master (%s); subscribing anew", message)
        await self._persist(None)

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

    # -- calls -----------------------------------------------------------------------------

    async def _call(self, kind: str, payload: dict[str, Any] | None = None) -> bool:
        """Make a call; False (logged) when there is no subscription or the master refused."""
        try:
            await self.client.call(kind, payload)
            return True
        except NotSubscribed:
            logger.debug("mesos: %s skipped: not subscribed", kind)
        except CallError as exc:
            logger.warning("mesos: %s refused: %s", kind, exc)
        except Exception as exc:  # transport errors: the stream watchdog handles the rest
            logger.warning("mesos: %s failed: %r", kind, exc)
        return False

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _kill(self, ref: TaskRef) -> bool:
        payload: dict[str, Any] = {
            "task_id": {"value": ref.task_id},
            "kill_policy": {"grace_period": {
                "nanoseconds": int(self.task_settings.kill_grace * 1e9)}},
        }
        if ref.agent_id:
            payload["agent_id"] = {"value": ref.agent_id}
        return await self._call("KILL", payload)

    # -- offers, suppress and revive -------------------------------------------------------

    def _used_by_role(self) -> dict[str, tuple[float, float]]:
        used: dict[str, list[float]] = {}
        for cluster in self._clusters.values():
            for ref in cluster.tasks():
                if ref.state != PENDING:
                    acc = used.setdefault(cluster.spec.role, [0.0, 0.0])
                    acc[0] += ref.resources[0]
                    acc[1] += ref.resources[1]
        return {role: (v[0], v[1]) for role, v in used.items()}

    async def _on_offers(self, offers: list[dict[str, Any]]) -> None:
        async with self._offer_lock:
            pools = [OfferPool.parse(o) for o in offers]
            placements = match(pools, list(self._pending.values()), self._used_by_role(),
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
                    ref = self._ref(request.task_id)
                    if ref is None:
                        continue
                    ref.agent_id, ref.host = pool.agent_id, pool.hostname
                    ref.port = p.ports[0] if p.ports else None
                    ref.dashboard_port = p.ports[1] if len(p.ports) > 1 else None
                    ref.state = LAUNCHED
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
                        ref = self._ref(p.request.task_id)
                        if ref is not None and ref.state == LAUNCHED:
                            ref.state = PENDING
                            self._pending[p.request.task_id] = p.request
            for p in placements:
                cluster_log(logger, p.request.tenant, p.request.cluster_id).info(
                    "mesos: launched task=%s agent=%s", p.request.task_id, p.offer.hostname)
        await self._sync_offers()

    async def _sync_offers(self) -> None:
        """SUPPRESS roles with nothing pending and REVIVE those that have pending tasks."""
        async with self._offer_lock:
            if not self.client.subscribed.is_set():
                return
            wanted = self._wanted_roles() & self.roles
            suppress = self.roles - wanted
            current = self._suppressed
            revive = wanted if current is None else wanted & (current | self._fresh)
            self._fresh.clear()
            to_suppress = suppress if current is None else suppress - current
            ok = True
            if revive:
                ok = await self._call("REVIVE", {"roles": sorted(revive)}) and ok
            if to_suppress:
                ok = await self._call("SUPPRESS", {"roles": sorted(to_suppress)}) and ok
            self._suppressed = suppress if ok else None

    async def _ensure_role(self, role: str) -> None:
        """Subscribe the framework to a tenant's role the first time a cluster needs it.

        UPDATE_FRAMEWORK replaces the framework's whole role list (and its suppressed roles),
        so these calls go one at a time, under the lock SUPPRESS and REVIVE take, each with
        the list as it is then: two first clusters of two new tenants at once must not let an
        older, shorter list land last and leave a role without offers.
        """
        if role in self.roles:
            return
        async with self._offer_lock:
            if role in self.roles:
                return
            if not self.client.subscribed.is_set():
                self.roles.add(role)
                return  # the next SUBSCRIBE carries it (and SUBSCRIBED saves it)
            roles = self.roles | {role}
            suppressed = sorted(roles - self._wanted_roles())
            info = dict(self.framework_info(roles), id={"value": self.client.framework_id})
            try:
                await self.client.call("UPDATE_FRAMEWORK", {"framework_info": info,
                                                            "suppressed_roles": suppressed})
            except CallError as exc:
                raise LaunchError(f"Mesos refused role {role!r}: {exc}") from exc
            except NotSubscribed:
                self.roles.add(role)
                return
            self.roles.add(role)
            self._suppressed = set(suppressed)
        # Saved only once Mesos took it: a refused role must not be in every later SUBSCRIBE.
        await self._persist(self.client.framework_id)

    def _queue(self, request: TaskRequest) -> None:
        """Wait for an offer for this task (its role is revived at the next sync)."""
        self._pending[request.task_id] = request
        self._fresh.add(request.role)

    def _enqueue(self, request: TaskRequest) -> None:
        self._queue(request)
        self._spawn(self._sync_offers())

    # -- status updates --------------------------------------------------------------------

    def _ref(self, task_id: str) -> TaskRef | None:
        cluster_id = self._tasks.get(task_id)
        cluster = self._clusters.get(cluster_id) if cluster_id else None
        if cluster is None:
            return None
        if cluster.scheduler is not None and cluster.scheduler.task_id == task_id:
            return cluster.scheduler
        return cluster.workers.get(task_id)

    async def _on_update(self, status: dict[str, Any]) -> None:
        task_id = (status.get("task_id") or {}).get("value", "")
        agent_id = (status.get("agent_id") or {}).get("value")
        if not self._recovered and self._ref(task_id) is None:
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
        state = status.get("state", "")
        ref = self._ref(task_id)
        if ref is None:
            if state not in TERMINAL:
                logger.warning("mesos: killing unrecognised task %s", task_id)
                self._spawn(self._kill(TaskRef(task_id, "worker", agent_id)))
            return
        cluster = self._clusters[self._tasks[task_id]]
        ref.seen = time.monotonic()
        if agent_id:
            ref.agent_id = agent_id
        if state not in TERMINAL:
            ref.state = state
            if state == "TASK_RUNNING" and ref is cluster.scheduler and cluster.starting \
                    and not cluster.starting.done():
                cluster.starting.set_result(None)
            if task_id in cluster.stopping and status.get("reason") == "REASON_RECONCILIATION":
                self._spawn(self._kill(ref))  # a kill lost while disconnected
            cluster.touch()
            return
        reason = describe(status)
        if ref is cluster.scheduler and cluster.recovering and state == "TASK_FAILED" \
                and status.get("reason") == "REASON_RECONCILIATION" and task_id not in cluster.stopping:
            # Reconciliation keeps the state alone; how it ended (its exit status, which says
            # whether it reaped itself) comes with the agent's own update, which the agent
            # sends again until acknowledged: recovery waits a while for it.
            ref.state = UNCONFIRMED_END
            cluster.lost = Outcome.failed(f"scheduler task {reason}")
            return
        reaped = reaped_reason(status) if ref is cluster.scheduler else None
        lost = reaped or Outcome.failed(f"scheduler task {reason}")
        ref.state = state
        self._tasks.pop(task_id, None)
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
            if not wanted_end and state != "TASK_FINISHED" and self._events is not None \
                    and not cluster.recovering:
                self._spawn(self._events.worker_lost(cluster.spec.cluster_id, task_id,
                                                     f"worker task {reason}"))
        cluster.touch()
        if cluster.stopped and not cluster.tasks():
            self._clusters.pop(cluster.spec.cluster_id, None)
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
        believed = [r for c in self._clusters.values() for r in c.tasks() if r.state != PENDING]
        for attempt in range(6):
            if attempt:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
            refs = [r for r in believed if r.seen < started and self._ref(r.task_id) is r]
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
        cluster = self._clusters.get(cluster_id)
        state = cluster.state() if cluster and not cluster.stopped \
            else {"scheduler": None, "workers": {}}
        if self._events is not None:
            await self._events.state_changed(cluster_id, state)

    def _cluster(self, spec: ClusterSpec) -> _Cluster:
        cluster = self._clusters.get(spec.cluster_id)
        if cluster is None:
            cluster = self._clusters[spec.cluster_id] = _Cluster(spec)
        cluster.spec = spec
        return cluster

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
            await asyncio.gather(*(self.stop_cluster(c) for c in list(self._clusters)),
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
        recovering: list[_Cluster] = []
        for spec, state in clusters:
            cluster = self._cluster(spec)
            cluster.recovering = True
            sched = (state or {}).get("scheduler")
            if sched:
                cluster.scheduler = TaskRef.from_dict("scheduler", sched)
                self._tasks[cluster.scheduler.task_id] = spec.cluster_id
            for name, data in ((state or {}).get("workers") or {}).items():
                ref = TaskRef.from_dict("worker", data)
                cluster.workers[name] = ref
                self._tasks[ref.task_id] = spec.cluster_id
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
            if all(c.scheduler is None or c.scheduler.state not in ("RECOVERING", UNCONFIRMED_END)
                   for c in recovering):
                break
            await asyncio.sleep(0.1)
        result: dict[str, Outcome | None] = {}
        for cluster in recovering:
            cid = cluster.spec.cluster_id
            cluster.recovering = False
            if cluster.scheduler is not None and cluster.scheduler.state == UNCONFIRMED_END:
                self._tasks.pop(cluster.scheduler.task_id, None)
                cluster.scheduler = None
            if cluster.scheduler is None:
                result[cid] = cluster.lost or Outcome.failed("no scheduler task")
            else:
                # RUNNING, or no answer yet: assume alive, a later answer will tell.
                result[cid] = None
            # Workers found gone during recovery are simply not live any more.
            await self._save(cid)
        return result

    async def start_scheduler(self, spec: ClusterSpec) -> SchedulerEndpoint:
        cluster = self._cluster(spec)
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

    async def _run_scheduler(self, cluster: _Cluster, spec: ClusterSpec) -> TaskRef:
        """Launch one scheduler task; return once it runs and accepts connections."""
        if cluster.scheduler is not None:  # an earlier attempt: make way
            old, cluster.scheduler = cluster.scheduler, None
            self._pending.pop(old.task_id, None)
            self._tasks.pop(old.task_id, None)  # from now on a stray, killed if seen alive
            if old.state != PENDING:
                await self._kill(old)
        task_id = f"{spec.cluster_id}-scheduler-{secrets.token_hex(3)}"
        ref = TaskRef(task_id, "scheduler")
        cluster.scheduler = ref
        self._tasks[task_id] = spec.cluster_id
        loop = asyncio.get_running_loop()
        cluster.starting = starting = loop.create_future()
        self._enqueue(TaskRequest(
            task_id=task_id, cluster_id=spec.cluster_id, tenant=spec.tenant, kind="scheduler",
            role=spec.role, cpus=mesos_cpus(spec.scheduler_cores),
            mem=mesos_mem(spec.scheduler_memory), options=scheduler_options(spec),
            env=dict(spec.env), image=spec.image, ports=2,  # Dask's port and the HTTP server's
        ))
        await self._save(spec.cluster_id)
        try:
            await starting
            await self._reachable(cluster, ref)
        finally:
            if cluster.starting is starting:
                cluster.starting = None
        return ref

    async def _reachable(self, cluster: _Cluster, ref: TaskRef) -> None:
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
        cluster = self._cluster(spec)
        await self._ensure_role(spec.role)
        for name in names:
            if name in cluster.workers:
                continue
            cluster.workers[name] = TaskRef(name, "worker")
            self._tasks[name] = spec.cluster_id
            self._queue(TaskRequest(
                task_id=name, cluster_id=spec.cluster_id, tenant=spec.tenant, kind="worker",
                role=spec.role, cpus=mesos_cpus(spec.worker_cores),
                mem=mesos_mem(spec.worker_memory),
                options=worker_options(spec, address, name, self.task_settings.death_timeout),
                env=dict(spec.env), image=spec.image,
            ))
        self._spawn(self._sync_offers())  # once for the whole batch
        await self._save(spec.cluster_id)

    async def stop_workers(self, cluster_id: str, names: Sequence[str]) -> None:
        cluster = self._clusters.get(cluster_id)
        if cluster is None:
            return
        kills = []
        for name in names:
            ref = cluster.workers.get(name)
            if ref is None:
                continue
            if ref.state == PENDING:
                self._pending.pop(name, None)
                cluster.workers.pop(name, None)
                self._tasks.pop(name, None)
            else:
                cluster.stopping.add(name)
                kills.append(self._kill(ref))
        await asyncio.gather(*kills)
        await self._save(cluster_id)
        self._spawn(self._sync_offers())

    async def stop_cluster(self, cluster_id: str) -> None:
        cluster = self._clusters.get(cluster_id)
        if cluster is None:
            await self._save(cluster_id)
            return
        cluster.stopped = True
        if cluster.starting is not None and not cluster.starting.done():
            cluster.starting.set_exception(LaunchError("cluster stopped while starting"))
            cluster.starting.exception()  # retrieved: nobody may be waiting any more
        for ref in cluster.tasks():
            if ref.state == PENDING:
                self._pending.pop(ref.task_id, None)
                self._tasks.pop(ref.task_id, None)
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
            self._clusters.pop(cluster_id, None)
        await self._save(cluster_id)
        self._spawn(self._sync_offers())

    def live_workers(self, cluster_id: str) -> set[str]:
        cluster = self._clusters.get(cluster_id)
        if cluster is None or cluster.stopped:
            return set()
        return set(cluster.workers) - cluster.stopping


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "nobody"
