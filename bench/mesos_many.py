"""Many clusters on the Mesos backend: launch and stop throughput, CPU cost and fairness.

One MesosBackend starts W workers in each of N clusters over T tenants (roles) at once against
the test master with process-less tasks, so only the framework's own work is measured (roles,
offers, ACCEPT / DECLINE, status updates and their acknowledgements, kills): the cost per task
the service adds on a real Mesos cluster. Reported: time until every task is TASK_RUNNING, then
TASK_KILLED after ``stop_cluster`` (per the master, and as the backend heard it), tasks per
second, offers and calls by kind, CPU seconds of the backend's thread and of the master's (it
serves from its own thread and loop; it shares the GIL, so wall times are pessimistic). Also
whether a fresh framework ends up with every role when several tenants start at once, and
per-role counts when capacity is short, with weights given to the backend only, then to the
master too. Counts come from wrapping a few methods of both objects here; no product change.

    python -m bench.mesos_many --out bench/results/mesos_many.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import platform
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from bench.harness import write_results
from clusters.base import ClusterSpec, Outcome
from clusters.mesos import MesosBackend
from clusters.mesos.tasks import mesos_cpus, mesos_mem
from tests.mesos_master import AgentSpec, MesosMaster

R = TypeVar("R")
MiB = 2**20
#: Workers are told to connect here; with process-less tasks nothing ever does.
ADDRESS = "tcp://127.0.0.1:1"
#: Points of the launch (as fractions of the time to the last RUNNING) at which per-role
#: counts are reported.
FRACTIONS = (0.1, 0.25, 0.5, 0.75, 1.0)
PORTS_BASE = 20000


class Events:
    """The core's side of the backend (BackendEvents), reduced to remembering."""

    def __init__(self) -> None:
        self.saved: dict[str, Any] | None = None
        self.states: dict[str, dict[str, Any]] = {}
        self.lost: list[tuple[str, str, str]] = []

    async def state_changed(self, cluster_id: str, state: dict[str, Any]) -> None:
        self.states[cluster_id] = state

    async def scheduler_lost(self, cluster_id: str, outcome: Outcome) -> None:
        self.lost.append((cluster_id, "scheduler", outcome.summary()))

    async def worker_lost(self, cluster_id: str, name: str, reason: str) -> None:
        self.lost.append((cluster_id, name, reason))

    async def load_backend_state(self) -> dict[str, Any] | None:
        return self.saved

    async def save_backend_state(self, state: dict[str, Any] | None) -> None:
        self.saved = state


class MasterThread:
    """A :class:`MesosMaster` serving from its own thread and event loop."""

    def __init__(self, **options: Any) -> None:
        self.options = options
        self.loop = asyncio.new_event_loop()
        self.master: MesosMaster | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="mesos-master", daemon=True)

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._serve())
        finally:
            self.loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        try:
            async with MesosMaster(**self.options) as master:
                self.master = master
                self._ready.set()
                await self._stop.wait()
        except BaseException as exc:
            self._error = exc
        finally:
            self._ready.set()

    def __enter__(self) -> MasterThread:
        self._thread.start()
        self._ready.wait(60)
        if self.master is None:
            self._close()
            raise RuntimeError(f"the test master did not start: {self._error!r}")
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._close()

    def _close(self) -> None:
        """Leave the master's context (it closes streams and tasks), then end the thread."""
        if self._stop is not None and self._thread.is_alive():
            with contextlib.suppress(RuntimeError):  # its loop already ended
                self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(60)

    async def run(self, fn: Callable[[], R]) -> R:
        """``fn()`` on the master's thread (its state is not thread-safe), awaited here."""
        async def call() -> R:
            return fn()

        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(call(), self.loop))


@dataclass
class Probe:
    """What the wrapped methods saw, with ``time.perf_counter`` stamps."""

    #: master side (its thread): task -> first time it went TASK_RUNNING / TASK_KILLED
    running: dict[str, float] = field(default_factory=dict)
    killed: dict[str, float] = field(default_factory=dict)
    other_states: Counter[str] = field(default_factory=Counter)
    roles: dict[str, str] = field(default_factory=dict)
    #: backend side: state -> task -> first time an UPDATE with it arrived
    heard: dict[str, dict[str, float]] = field(default_factory=dict)
    updates: Counter[str] = field(default_factory=Counter)
    calls: Counter[str] = field(default_factory=Counter)
    calls_ok: Counter[str] = field(default_factory=Counter)
    calls_failed: Counter[str] = field(default_factory=Counter)
    offers: Counter[str] = field(default_factory=Counter)
    #: seconds the event stream waited on the backend's handler, per event type
    handler_s: Counter[str] = field(default_factory=Counter)
    #: when each ACKNOWLEDGE call returned
    acked: list[float] = field(default_factory=list)
    #: framework roles of each UPDATE_FRAMEWORK: as the backend sent them, as the master
    #: applied them (in that order)
    roles_sent: list[list[str]] = field(default_factory=list)
    roles_applied: list[list[str]] = field(default_factory=list)

    def counters(self) -> dict[str, Counter[Any]]:
        return {"updates": self.updates, "calls": self.calls, "calls_ok": self.calls_ok,
                "calls_failed": self.calls_failed, "offers": self.offers,
                "handler_s": self.handler_s, "other_states": self.other_states}

    def snapshot(self) -> dict[str, Counter[Any]]:
        return {k: Counter(v) for k, v in self.counters().items()}

    def since(self, before: dict[str, Counter[Any]]) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for key, now in self.counters().items():
            diff = {k: v - before[key].get(k, 0) for k, v in now.items()}
            out[key] = {k: round(v, 4) if isinstance(v, float) else v
                        for k, v in sorted(diff.items()) if v}
        return out


def watch_master(probe: Probe, master: MesosMaster) -> None:
    """Stamp every task state change inside the (simulated) agents."""
    inner = master.master
    original = inner._on_task_state

    def on_task_state(task: Any, state: str, message: str | None, reason: str | None,
                      extra: dict[str, Any]) -> None:
        now = time.perf_counter()
        probe.roles[task.task_id] = task.role
        if state == "TASK_RUNNING":
            probe.running.setdefault(task.task_id, now)
        elif state == "TASK_KILLED":
            probe.killed.setdefault(task.task_id, now)
        else:
            probe.other_states[state] += 1
        original(task, state, message, reason, extra)

    inner._on_task_state = on_task_state  # type: ignore[method-assign]
    update_framework = inner.update_framework

    def on_update_framework(fw: Any, body: dict[str, Any]) -> str | None:
        probe.roles_applied.append(list((body.get("framework_info") or {}).get("roles") or []))
        return update_framework(fw, body)

    inner.update_framework = on_update_framework  # type: ignore[method-assign]


def watch_backend(probe: Probe, backend: MesosBackend) -> None:
    """Count the backend's calls, offers and updates, and time its event handling."""
    call = backend.client.call

    async def counted_call(kind: str, payload: dict[str, Any] | None = None) -> Any:
        probe.calls[kind] += 1
        if kind == "DECLINE" and payload:
            probe.offers["declined"] += len(payload.get("offer_ids") or [])
        elif kind == "ACCEPT" and payload:
            probe.offers["accepted"] += len(payload.get("offer_ids") or [])
            probe.offers["tasks_launched"] += sum(
                len((op.get("launch") or {}).get("task_infos") or [])
                for op in payload.get("operations") or [])
        elif kind == "UPDATE_FRAMEWORK" and payload:
            probe.roles_sent.append(list(payload["framework_info"].get("roles") or []))
        try:
            response = await call(kind, payload)
        except Exception:
            probe.calls_failed[kind] += 1
            raise
        probe.calls_ok[kind] += 1
        if kind == "ACKNOWLEDGE":
            probe.acked.append(time.perf_counter())
        return response

    backend.client.call = counted_call  # type: ignore[method-assign]

    event = backend.event

    async def timed_event(ev: dict[str, Any]) -> None:
        kind = str(ev.get("type"))
        if kind == "OFFERS":
            probe.offers["events"] += 1
            probe.offers["received"] += len((ev.get("offers") or {}).get("offers") or [])
        start = time.perf_counter()
        try:
            await event(ev)
        finally:
            probe.handler_s[kind] += time.perf_counter() - start

    backend.event = timed_event  # type: ignore[method-assign]

    on_update = backend._on_update

    async def heard(status: dict[str, Any]) -> None:
        state = str(status.get("state"))
        task_id = (status.get("task_id") or {}).get("value", "")
        probe.updates[state] += 1
        probe.heard.setdefault(state, {}).setdefault(task_id, time.perf_counter())
        await on_update(status)

    backend._on_update = heard  # type: ignore[method-assign]


class WarningLog(logging.Handler):
    """Counts the backend's warnings (by message template) and keeps a few in full."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.counts: Counter[str] = Counter()
        self.samples: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.counts[f"{record.name}: {record.msg}"] += 1
        if len(self.samples) < 5:
            self.samples.append(f"{record.levelname} {record.name}: {record.getMessage()[:300]}")


def master_view(master: MesosMaster) -> dict[str, Any]:
    """The master's side of the framework (run on the master's thread)."""
    inner = master.master
    frameworks = list(inner.frameworks.values())
    tasks = [t for fw in frameworks for t in fw.tasks.values()]
    return {
        "frameworks": len(frameworks),
        "roles": sorted({r for fw in frameworks for r in fw.roles}),
        "suppressed_roles": sorted({r for fw in frameworks for r in fw.suppressed}),
        "outstanding_offers": len(inner.offers),
        "live_tasks": len(tasks),
        "unacknowledged_updates": sum(t.updates.pending for t in tasks),
    }


def backend_view(backend: MesosBackend) -> dict[str, int]:
    """The backend's own bookkeeping (what should be empty after every stop)."""
    return {"clusters": len(backend._clusters), "tasks": len(backend._tasks),
            "pending": len(backend._pending), "background": len(backend._background)}


async def until(check: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(interval)
    return True


@dataclass
class Cpu:
    """CPU seconds so far: this thread (the backend's loop), the master's thread, the process."""

    backend: float
    master: float
    process: float

    @classmethod
    async def now(cls, master: MasterThread) -> Cpu:
        return cls(time.thread_time(), await master.run(time.thread_time), time.process_time())

    def since(self, before: Cpu) -> dict[str, float]:
        return {"backend_thread_s": round(self.backend - before.backend, 3),
                "master_thread_s": round(self.master - before.master, 3),
                "process_s": round(self.process - before.process, 3)}


def _last(stamps: dict[str, float], ids: list[str], t0: float) -> float | None:
    if any(i not in stamps for i in ids):
        return None
    return round(max(stamps[i] for i in ids) - t0, 4)


def _heard(probe: Probe, state: str) -> dict[str, float]:
    return probe.heard.get(state, {})


def timeline(probe: Probe, ids: list[str], t0: float, end: float) -> list[dict[str, Any]]:
    """Per-role RUNNING counts (per the master) at fractions of the time to ``end``."""
    roles = sorted({probe.roles.get(i, "?") for i in ids})
    points = []
    for fraction in FRACTIONS:
        at = t0 + fraction * (end - t0)
        counts = dict.fromkeys(roles, 0)
        for task_id in ids:
            stamp = probe.running.get(task_id)
            if stamp is not None and stamp <= at:
                counts[probe.roles[task_id]] += 1
        points.append({"fraction": fraction, "t_s": round(at - t0, 4), "per_role": counts,
                       "min": min(counts.values()), "max": max(counts.values())})
    return points


def specs(clusters: int, tenants: int, worker_cores: float, worker_mem: int) -> list[ClusterSpec]:
    return [ClusterSpec(f"c{i:05d}", f"t{i % tenants}", f"t{i % tenants}",
                        worker_cores=worker_cores, worker_memory=worker_mem,
                        scheduler_cores=0.5, scheduler_memory=256 * MiB)
            for i in range(clusters)]


def agents(count: int, cpus: float, mem: float, tasks_each: int) -> list[AgentSpec]:
    """Agents with their own port ranges (nothing binds them: tasks run no process)."""
    width = max(16, tasks_each + 8)
    if PORTS_BASE + count * width > 65535:
        raise ValueError(f"{count} agents with {width} ports each do not fit the port space")
    return [AgentSpec(cpus=cpus, mem=mem,
                      ports=(PORTS_BASE + i * width, PORTS_BASE + (i + 1) * width - 1))
            for i in range(count)]


def new_backend(master: MesosMaster, **options: Any) -> MesosBackend:
    return MesosBackend(master.address, kill_grace=0.5, recover_timeout=10, backoff_max=1,
                        **options)


# -- the launch and stop of many clusters ------------------------------------------------------


def _acked_at(probe: Probe, first: int, count: int, t0: float) -> float | None:
    """Seconds from ``t0`` until ``count`` acknowledgements after the ``first`` returned."""
    if len(probe.acked) < first + count:
        return None
    return round(probe.acked[first + count - 1] - t0, 4)


async def phase(mt: MasterThread, probe: Probe, ids: list[str], state: str,
                action: Callable[[], Any], acks: int, timeout: float) -> dict[str, Any]:
    """Run ``action`` (starting or stopping everything); measure until the backend has heard
    ``state`` for every task of ``ids`` and ``acks`` acknowledgements more returned."""
    before, cpu0, first_ack = probe.snapshot(), await Cpu.now(mt), len(probe.acked)
    master_stamps = probe.running if state == "TASK_RUNNING" else probe.killed
    t0 = time.perf_counter()
    await action()
    returned = time.perf_counter() - t0
    done = await until(lambda: len(_heard(probe, state)) >= len(ids)
                       and len(probe.acked) - first_ack >= acks, timeout)
    cpu = (await Cpu.now(mt)).since(cpu0)
    last = _last(master_stamps, ids, t0)
    heard_all = _last(_heard(probe, state), ids, t0)
    return {
        "complete": done,
        "calls_returned_s": round(returned, 4),
        "first_s": round(min((master_stamps[i] for i in ids if i in master_stamps),
                             default=t0) - t0, 4),
        "master_all_s": last,
        "backend_heard_all_s": heard_all,
        "all_updates_acknowledged_s": _acked_at(probe, first_ack, acks, t0),
        "tasks_per_master": sum(i in master_stamps for i in ids),
        "tasks_per_s": round(len(ids) / last, 1) if last else None,
        "tasks_per_s_heard": round(len(ids) / heard_all, 1) if heard_all else None,
        "cpu": cpu,
        "backend_cpu_ms_per_task": round(cpu["backend_thread_s"] * 1000 / max(1, len(ids)), 3),
        "t0": t0,
        **probe.since(before),
    }


async def many(args: argparse.Namespace, warnings: WarningLog) -> dict[str, Any]:
    clusters = specs(args.clusters, args.tenants, args.worker_cores, args.worker_mem_mb * MiB)
    names = {s.cluster_id: [f"{s.cluster_id}-w{j}" for j in range(args.workers)]
             for s in clusters}
    ids = [n for group in names.values() for n in group]
    total = len(ids)
    cpus, mem = mesos_cpus(args.worker_cores), mesos_mem(args.worker_mem_mb * MiB)
    per_agent = math.ceil(total / args.agents * 1.25) + 1  # room to spare: nothing waits
    roles = [] if args.lazy_roles else sorted({s.role for s in clusters})
    probe = Probe()
    out: dict[str, Any] = {"tasks": total, "roles_known_at_start": not args.lazy_roles}
    with MasterThread(agents=agents(args.agents, per_agent * cpus, per_agent * mem, per_agent),
                      run_processes=False, heartbeat_interval=args.heartbeat,
                      allocation_interval=args.allocation_interval,
                      update_retry_interval=args.retry_interval) as mt:
        assert mt.master is not None
        master = mt.master
        watch_master(probe, master)
        # The tenants' roles are known from the start, as for a service that ran before
        # (they come back with the framework id); see cold_roles() for a fresh one.
        backend = new_backend(master, roles=roles)
        watch_backend(probe, backend)
        try:
            await backend.open(Events())
            await backend.recover([])
            await asyncio.sleep(0.5)
            cpu0 = await Cpu.now(mt)
            await asyncio.sleep(1.0)
            out["idle_cpu_per_s"] = (await Cpu.now(mt)).since(cpu0)

            print(f"launching {total} tasks: {len(clusters)} clusters x {args.workers} workers, "
                  f"{args.tenants} tenants, {args.agents} agents ...", flush=True)
            launch = await phase(mt, probe, ids, "TASK_RUNNING", lambda: asyncio.gather(
                *(backend.start_workers(s, ADDRESS, names[s.cluster_id]) for s in clusters)),
                2 * total, args.timeout)  # STARTING and RUNNING are acknowledged
            t0 = launch.pop("t0")
            out["launch"] = launch
            end = max((probe.running[i] for i in ids if i in probe.running), default=t0)
            out["fairness_launch"] = timeline(probe, ids, t0, end)
            # Nothing pending any more: every role suppressed, no offer held.
            await until(lambda: backend._suppressed == set(backend.roles), 10)
            await asyncio.sleep(0.5)
            out["after_launch"] = {"master": await mt.run(lambda: master_view(master)),
                                   "backend": backend_view(backend)}

            launched = [i for i in ids if i in probe.running]
            print(f"stopping {len(clusters)} clusters ({len(launched)} tasks) ...", flush=True)
            stop = await phase(mt, probe, launched, "TASK_KILLED", lambda: asyncio.gather(
                *(backend.stop_cluster(s.cluster_id) for s in clusters)),
                len(launched), args.timeout)
            stop.pop("t0")
            out["stop"] = stop
            await asyncio.sleep(0.5)
            out["after_stop"] = {"master": await mt.run(lambda: master_view(master)),
                                 "backend": backend_view(backend)}
        finally:
            await asyncio.wait_for(backend.close(stop_clusters=True), 60)
    out["warnings"] = dict(warnings.counts)
    out["warning_samples"] = list(warnings.samples)
    return out


async def cold_round(args: argparse.Namespace) -> dict[str, Any]:
    """One round of :func:`cold_roles` on a fresh master and backend."""
    per = args.cold_clusters_per_tenant
    clusters = specs(args.tenants * per, args.tenants, args.worker_cores,
                     args.worker_mem_mb * MiB)
    names = {s.cluster_id: [f"{s.cluster_id}-w{j}" for j in range(args.workers)]
             for s in clusters}
    ids = [n for group in names.values() for n in group]
    cpus, mem = mesos_cpus(args.worker_cores), mesos_mem(args.worker_mem_mb * MiB)
    each = len(ids) + 1
    roles = sorted({s.role for s in clusters})
    probe = Probe()
    with MasterThread(agents=agents(2, each * cpus, each * mem, each), run_processes=False,
                      heartbeat_interval=args.heartbeat,
                      allocation_interval=args.allocation_interval,
                      update_retry_interval=args.retry_interval) as mt:
        assert mt.master is not None
        master = mt.master
        watch_master(probe, master)
        backend = new_backend(master)
        watch_backend(probe, backend)
        try:
            await backend.open(Events())
            await backend.recover([])
            t0 = time.perf_counter()
            await asyncio.gather(*(backend.start_workers(s, ADDRESS, names[s.cluster_id])
                                   for s in clusters))
            done = await until(lambda: len(probe.running) >= len(ids), args.cold_timeout)
            view = await mt.run(lambda: master_view(master))
            running = Counter(probe.roles[i] for i in ids if i in probe.running)
            return {
                "all_running": done,
                "waited_s": round(time.perf_counter() - t0, 2),
                "tasks": len(ids), "running": sum(running.values()),
                "running_per_role": {r: running.get(r, 0) for r in roles},
                "backend_roles": sorted(backend.roles),
                "backend_believes_suppressed": sorted(backend._suppressed or []),
                "master_framework_roles": view["roles"],
                "master_suppressed_roles": view["suppressed_roles"],
                "pending_in_backend": len(backend._pending),
                "update_framework_roles_sent": probe.roles_sent,
                "update_framework_roles_applied": probe.roles_applied,
                "calls": dict(probe.calls),
            }
        finally:
            await asyncio.wait_for(backend.close(stop_clusters=True), 60)


async def cold_roles(args: argparse.Namespace) -> dict[str, Any]:
    """A fresh framework (no roles yet) gets the first clusters of every tenant at once.

    Each tenant's first cluster subscribes its role (UPDATE_FRAMEWORK) while its other
    clusters already ask for offers (REVIVE); what matters is that the master ends up with
    every role unsuppressed until its tasks run. Several rounds: it is a matter of timing."""
    print(f"cold roles: {args.cold_clusters_per_tenant} clusters of each of {args.tenants} "
          f"tenants at once on a fresh framework, {args.cold_rounds} rounds ...", flush=True)
    rounds = [await cold_round(args) for _ in range(args.cold_rounds)]
    return {"rounds": rounds, "rounds_all_running": sum(r["all_running"] for r in rounds),
            "clusters_per_tenant": args.cold_clusters_per_tenant,
            "timeout_s": args.cold_timeout}


# -- fairness under contention -----------------------------------------------------------------


def weighted_shares(capacity: float, demand: dict[str, float],
                    weights: dict[str, float]) -> dict[str, float]:
    """Weighted max-min fair shares of ``capacity`` (water-filling, capped by demand)."""
    share = dict.fromkeys(demand, 0.0)
    active = set(demand)
    left = float(capacity)
    while active and left > 1e-9:
        wsum = sum(weights.get(r, 1.0) for r in active)
        give = {r: left * weights.get(r, 1.0) / wsum for r in active}
        capped = {r for r in active if share[r] + give[r] >= demand[r]}
        if not capped:
            for r in active:
                share[r] += give[r]
            break
        for r in capped:
            left -= demand[r] - share[r]
            share[r] = demand[r]
            active.discard(r)
    return share


async def contended(args: argparse.Namespace, weights: dict[str, float],
                    master_weights: bool) -> dict[str, Any]:
    """All clusters at once on fewer agents than they need; who gets what, per role."""
    clusters = specs(args.clusters, args.tenants, args.worker_cores, args.worker_mem_mb * MiB)
    names = {s.cluster_id: [f"{s.cluster_id}-w{j}" for j in range(args.workers)]
             for s in clusters}
    ids = [n for group in names.values() for n in group]
    each = args.fair_agent_tasks
    count = max(1, int(len(ids) * args.fair_capacity) // each)
    capacity = count * each
    cpus, mem = mesos_cpus(args.worker_cores), mesos_mem(args.worker_mem_mb * MiB)
    roles = sorted({s.role for s in clusters})
    probe = Probe()
    label = "backend and master" if master_weights else "backend only"
    print(f"contended: {len(ids)} tasks wanted, room for {capacity} on {count} agents, "
          f"weights {weights} given to the {label} ...", flush=True)
    with MasterThread(agents=agents(count, each * cpus, each * mem, each), run_processes=False,
                      heartbeat_interval=args.heartbeat,
                      allocation_interval=args.allocation_interval,
                      update_retry_interval=args.retry_interval,
                      weights=weights if master_weights else None) as mt:
        assert mt.master is not None
        watch_master(probe, mt.master)
        # Roles known from the start (as after a restart), so the order in which the first
        # clusters of each tenant arrive does not decide.
        backend = new_backend(mt.master, weights=weights, roles=roles)
        watch_backend(probe, backend)
        try:
            await backend.open(Events())
            await backend.recover([])
            t0 = time.perf_counter()
            await asyncio.gather(*(backend.start_workers(s, ADDRESS, names[s.cluster_id])
                                   for s in clusters))
            full = await until(lambda: len(probe.running) >= capacity, args.timeout)
            await asyncio.sleep(1.0)  # nothing more should start
            end = max(probe.running.values(), default=t0)
        finally:
            await asyncio.wait_for(backend.close(stop_clusters=True), 60)
    demand = Counter(s.role for s in clusters)
    expected = weighted_shares(capacity, {r: float(demand[r] * args.workers) for r in roles},
                               weights)
    final = Counter(probe.roles[i] for i in ids if i in probe.running)
    off = {r: final.get(r, 0) - expected[r] for r in roles}
    return {
        "weights_given_to": label, "weights": weights, "capacity_tasks": capacity,
        "agents": count, "tasks_per_agent": each, "demand_tasks": len(ids), "filled": full,
        "time_to_last_running_s": round(end - t0, 4),
        "final_per_role": {r: final.get(r, 0) for r in roles},
        "expected_per_role": {r: round(expected[r], 1) for r in roles},
        "max_abs_error_tasks": round(max(abs(v) for v in off.values()), 1),
        "misplaced_fraction": round(sum(abs(v) for v in off.values()) / 2 / capacity, 3),
        "timeline": timeline(probe, [i for i in ids if i in probe.running], t0, end),
        "offers": dict(probe.offers), "calls": dict(probe.calls),
    }


# -- report ------------------------------------------------------------------------------------


def report(out: dict[str, Any]) -> None:
    launch, stop = out["many"]["launch"], out["many"]["stop"]

    def row(name: str, a: Any, b: Any) -> None:
        print(f"  {name:34}{'-' if a is None else a!s:>14}{'-' if b is None else b!s:>14}")

    print(f"\n{out['many']['tasks']} tasks{'':22}{'launch':>14}{'stop':>14}")
    row("complete", launch["complete"], stop["complete"])
    row("tasks", launch["tasks_per_master"], stop["tasks_per_master"])
    row("start_workers / stop_cluster (s)", launch["calls_returned_s"], stop["calls_returned_s"])
    row("master: first RUNNING / KILLED (s)", launch["first_s"], stop["first_s"])
    row("master: all RUNNING / KILLED (s)", launch["master_all_s"], stop["master_all_s"])
    row("backend heard all (s)", launch["backend_heard_all_s"], stop["backend_heard_all_s"])
    row("all updates acknowledged (s)", launch["all_updates_acknowledged_s"],
        stop["all_updates_acknowledged_s"])
    row("tasks per s (master has them)", launch["tasks_per_s"], stop["tasks_per_s"])
    row("tasks per s (backend heard)", launch["tasks_per_s_heard"], stop["tasks_per_s_heard"])
    for key in ("backend_thread_s", "master_thread_s", "process_s"):
        row(f"CPU {key[:-2]} (s)", launch["cpu"][key], stop["cpu"][key])
    row("backend CPU per task (ms)", launch["backend_cpu_ms_per_task"],
        stop["backend_cpu_ms_per_task"])
    offers = launch.get("offers", {})
    row("offers received / events", f"{offers.get('received', 0)}/{offers.get('events', 0)}",
        f"{stop.get('offers', {}).get('received', 0)}/{stop.get('offers', {}).get('events', 0)}")
    row("offers accepted / declined",
        f"{offers.get('accepted', 0)}/{offers.get('declined', 0)}",
        f"{stop.get('offers', {}).get('accepted', 0)}/{stop.get('offers', {}).get('declined', 0)}")
    kinds = sorted(set(launch["calls"]) | set(stop["calls"]))
    for kind in kinds:
        row(f"calls {kind}", launch["calls"].get(kind, 0), stop["calls"].get(kind, 0))
    for kind in sorted(set(launch["handler_s"]) | set(stop["handler_s"])):
        row(f"stream blocked in {kind} handler (s)", launch["handler_s"].get(kind),
            stop["handler_s"].get(kind))
    if launch["calls_failed"] or stop["calls_failed"]:
        row("failed calls", launch["calls_failed"], stop["calls_failed"])
    idle = out["many"]["idle_cpu_per_s"]
    print(f"  idle CPU per s before: backend {idle['backend_thread_s']}, "
          f"master {idle['master_thread_s']}")
    print(f"  after launch, master: {out['many']['after_launch']['master']}")
    print(f"  after stop, backend bookkeeping: {out['many']['after_stop']['backend']}")
    if out["many"]["warnings"]:
        print(f"  warnings: {out['many']['warnings']}")

    print("\nper-role RUNNING along the launch (equal weights):")
    for point in out["many"]["fairness_launch"]:
        print(f"  {point['fraction']:>5.0%} t={point['t_s']:.3f}s  "
              f"min {point['min']:>4} max {point['max']:>4}  "
              + " ".join(f"{r}={n}" for r, n in point["per_role"].items()))
    cold = out.get("cold_roles")
    if cold:
        print(f"\ncold roles: all tasks running in {cold['rounds_all_running']} of "
              f"{len(cold['rounds'])} rounds (waiting up to {cold['timeout_s']:g}s)")
        for i, r in enumerate(cold["rounds"], 1):
            print(f"  round {i}: {r['running']}/{r['tasks']} running after {r['waited_s']}s; "
                  f"master's framework roles {r['master_framework_roles']}, suppressed "
                  f"{r['master_suppressed_roles']}; backend has {len(r['backend_roles'])} "
                  f"roles, believes suppressed {r['backend_believes_suppressed']}")
            if not r["all_running"]:
                print(f"    UPDATE_FRAMEWORK roles as sent {r['update_framework_roles_sent']}")
                print(f"    ... as the master applied them {r['update_framework_roles_applied']}")
    for run in out.get("contended", []):
        print(f"\ncontended, weights to the {run['weights_given_to']}: {run['capacity_tasks']} "
              f"of {run['demand_tasks']} tasks fit; misplaced {run['misplaced_fraction']:.1%}, "
              f"worst role off by {run['max_abs_error_tasks']} tasks")
        print("  role     " + " ".join(f"{r:>6}" for r in run["final_per_role"]))
        print("  got      " + " ".join(f"{n:>6}" for n in run["final_per_role"].values()))
        print("  expected " + " ".join(f"{n:>6}" for n in run["expected_per_role"].values()))


def parse_weights(text: str) -> dict[str, float]:
    weights = {}
    for item in filter(None, text.split(",")):
        role, _, value = item.partition("=")
        weights[role.strip()] = float(value)
    return weights


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    warnings = WarningLog()
    log = logging.getLogger("provisioner")
    log.addHandler(warnings)
    try:
        out: dict[str, Any] = {"many": await many(args, warnings)}
        if args.cold_timeout > 0:
            out["cold_roles"] = await cold_roles(args)
        if args.fair_capacity > 0:
            weights = parse_weights(args.weights)
            out["contended"] = [await contended(args, weights, master_weights=False),
                                await contended(args, weights, master_weights=True)]
    finally:
        log.removeHandler(warnings)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clusters", type=int, default=200, help="N clusters")
    parser.add_argument("--workers", type=int, default=3, help="W workers per cluster")
    parser.add_argument("--tenants", type=int, default=10, help="T tenants (roles)")
    parser.add_argument("--agents", type=int, default=20, help="A agents")
    parser.add_argument("--worker-cores", type=float, default=1.0)
    parser.add_argument("--worker-mem-mb", type=int, default=512)
    parser.add_argument("--heartbeat", type=float, default=1.0, help="master heartbeat, s")
    parser.add_argument("--allocation-interval", type=float, default=0.1, help="seconds")
    parser.add_argument("--retry-interval", type=float, default=10.0,
                        help="the agents' first status update retry, s (Mesos's default)")
    parser.add_argument("--timeout", type=float, default=60.0, help="per phase, s")
    parser.add_argument("--lazy-roles", action="store_true",
                        help="the backend learns the roles from the clusters (as a fresh "
                             "service does) instead of knowing them from the start")
    parser.add_argument("--cold-timeout", type=float, default=5.0,
                        help="cold-roles check: how long to wait per round (0: skip it)")
    parser.add_argument("--cold-rounds", type=int, default=5)
    parser.add_argument("--cold-clusters-per-tenant", type=int, default=2)
    parser.add_argument("--weights", default="t0=2,t1=1.5",
                        help="ROLE=W,... for the contended runs (others 1)")
    parser.add_argument("--fair-capacity", type=float, default=0.5,
                        help="contended runs: capacity as a fraction of demand (0: skip them)")
    parser.add_argument("--fair-agent-tasks", type=int, default=5,
                        help="contended runs: workers one agent holds")
    parser.add_argument("--out", type=Path, default=Path("bench/results/mesos_many.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    out = asyncio.run(measure(args))
    report(out)
    out["setup"] = {
        "clusters": args.clusters, "workers": args.workers, "tenants": args.tenants,
        "agents": args.agents, "lazy_roles": args.lazy_roles, "worker_cores": args.worker_cores,
        "worker_mem_mb": args.worker_mem_mb, "heartbeat_s": args.heartbeat,
        "allocation_interval_s": args.allocation_interval,
        "retry_interval_s": args.retry_interval, "cpus": os.cpu_count(),
        "python": platform.python_version(), "platform": platform.platform(),
        "command": " ".join([Path(sys.executable).name, "-m", "bench.mesos_many", *sys.argv[1:]]),
    }
    write_results(args.out, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
