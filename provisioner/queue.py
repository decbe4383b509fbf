"""The queue: clusters that did not fit wait here, holding no quota, and are admitted in a
fair order as room frees.

Order: across tenants, the one holding the smallest weighted dominant share goes first (its
larger fraction of the pool's cores or memory, or of its own quota when no pool is set,
divided by its weight); within a tenant, first come first served: a tenant whose next cluster
does not fit waits as a whole, while other tenants go on. A pass runs whenever room may have
freed (a cluster ended or shrank, a queued one was deleted, the service started): every
change of what clusters hold goes through the records, which tell the queue. Each admission
is the store's check-and-write under the tenant's (and the pool's) lock, so a pass and
concurrent creates never admit past a limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from clusters.logs import cluster_log
from provisioner.models import ClusterRecord, Status
from provisioner.preemption import Take, plan, within_guarantee
from provisioner.quota import OverQuota, Pool, Usage, check_fits
from provisioner.records import Records
from provisioner.tenants import Quota, Tenant, TenantDirectory

logger = logging.getLogger("provisioner.queue")

#: Seconds before a pass that failed (the database away, say) is tried again.
RETRY = 5.0


def fits(quota: Quota, usage: Usage, record: ClusterRecord) -> bool:
    """Whether the cluster fits its tenant's own quota (then only the pool keeps it out)."""
    try:
        check_fits(quota, usage, cores=record.cores, memory=record.memory, clusters=1)
    except OverQuota:
        return False
    return True


def dominant_share(usage: Usage, tenant: Tenant, pool: Pool) -> float:
    """The larger of the tenant's fractions of cores and memory, over its weight."""
    cores = pool.cores if pool.cores is not None else tenant.quota.cores
    memory = pool.memory if pool.memory is not None else tenant.quota.memory
    return max(usage.cores / cores if cores else 0.0,
               usage.memory / memory if memory else 0.0) / tenant.weight


class AdmissionQueue:
    def __init__(self, records: Records, tenants: TenantDirectory, pool: Pool,
                 admitted: Callable[[ClusterRecord], None], preemption_delay: float = 30.0,
                 preempted: Callable[[ClusterRecord, int, str], None] = lambda *_: None,
                 ) -> None:
        self.records = records
        self.tenants = tenants
        self.pool = pool
        self.admitted = admitted
        self.preemption_delay = preemption_delay
        self.preempted = preempted
        #: Per queued cluster within its guarantee: when, and which borrowed workers go.
        self._preempting: dict[str, tuple[float, list[Take]]] = {}
        #: Each queued cluster's place (1: next) and why it waits, as of the last pass.
        self.positions: dict[str, int] = {}
        self.reasons: dict[str, str] = {}
        self._again = False
        self._stopped = False
        self._timers: list[asyncio.TimerHandle] = []
        self._task: asyncio.Task[None] | None = None
        records.listeners.append(self._on_change)

    def _on_change(self, previous: ClusterRecord | None, record: ClusterRecord) -> None:
        """Room may have freed: a cluster ended or shrank, or a queued one went. Nothing to
        do when nothing waits (the last pass placed none, and none was queued since): no
        query on every cluster's end."""
        if previous is None or not self.positions:
            return
        if record.status.terminal or record.cores < previous.cores or \
                record.memory < previous.memory:
            self.kick()

    def kick(self) -> None:
        """Run a pass soon (another one after the current, if one runs)."""
        if self._stopped:
            return  # shutting down: the clusters ending now free room for no one
        self._again = True
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._drain())

    def _kick_later(self, delay: float) -> None:
        self._timers.append(asyncio.get_running_loop().call_later(delay, self.kick))

    def note(self, record: ClusterRecord, reason: str) -> None:
        """A cluster just queued, and why (until the next pass says where it stands)."""
        self.reasons[record.id] = reason
        self.positions[record.id] = len(self.positions) + 1
        self.kick()

    def start(self) -> None:
        self.kick()

    async def stop(self) -> None:
        self._stopped = True
        self._again = False
        for timer in self._timers:
            timer.cancel()
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _drain(self) -> None:
        while self._again:
            self._again = False
            try:
                await self.admit_waiting()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("queue pass failed; again in %gs", RETRY)
                self._kick_later(RETRY)

    async def admit_waiting(self) -> list[ClusterRecord]:
        """One pass: admit what fits in the fair order; note where the rest stand."""
        queued = sorted(await self.records.store.clusters(statuses=[Status.QUEUED]),
                        key=lambda r: (r.created_at, r.id))
        lines: dict[str, deque[ClusterRecord]] = {}
        for record in queued:
            lines.setdefault(record.tenant, deque()).append(record)
        shares: dict[str, float] = {}
        for name in lines:
            tenant = self.tenants.get(name)
            shares[name] = dominant_share(await self.records.usage(name), tenant, self.pool) \
                if tenant is not None else float("inf")
        admitted: list[ClusterRecord] = []
        blocked: set[str] = {name for name in lines if self.tenants.get(name) is None}
        reasons: dict[str, str] = {}
        while True:
            open_lines = [n for n, line in lines.items() if line and n not in blocked]
            if not open_lines:
                break
            name = min(open_lines, key=lambda n: (shares[n], lines[n][0].created_at))
            tenant = self.tenants.get(name)
            assert tenant is not None
            head = lines[name][0]
            promoted, reason = await self.records.promote(head.id, tenant.quota, self.pool)
            if promoted is None and reason is not None:
                if await self._preempt_for(head, tenant):
                    continue  # borrowed workers went: try it again now
                pending = self._preempting.get(head.id)
                if pending is not None:
                    wait = max(0.0, pending[0] - time.monotonic())
                    taken = sum(t.workers for t in pending[1])
                    reason += f"; taking {taken} borrowed worker(s) back in {wait:.0f}s"
                reasons[head.id] = reason
                blocked.add(name)
                continue
            lines[name].popleft()
            if promoted is not None:
                admitted.append(promoted)
                shares[name] += dominant_share(Usage.of([promoted]), tenant, self.pool)
                cluster_log(logger, name, promoted.id).info("admitted from the queue")
                self.admitted(promoted)
        self._place(lines, shares, reasons)
        for cluster_id in set(self._preempting) - set(self.positions):
            del self._preempting[cluster_id]  # admitted or gone meanwhile
        return admitted

    async def _preempt_for(self, head: ClusterRecord, tenant: Tenant) -> bool:
        """For a queued cluster within its tenant's guarantee that only the pool keeps out:
        plan which borrowed workers go; once the delay is over, plan again from what holds
        then and shrink those clusters (whose runners retire the workers through Dask).
        One plan at a time, so two never count the same workers. True when workers went."""
        usage = await self.records.usage(tenant.name)
        if not self.pool.limited or not within_guarantee(tenant, usage, head) \
                or not fits(tenant.quota, usage, head):
            self._preempting.pop(head.id, None)
            return False
        pending = self._preempting.get(head.id)
        if pending is None and self._preempting:
            return False  # another cluster's plan first
        live = [r for r in self.records.live() if r.status != Status.QUEUED]
        takes = plan(head, self.pool, Usage.of(live), live, {t.name: t for t in self.tenants})
        if not takes:
            self._preempting.pop(head.id, None)
            return False
        if pending is None:
            self._preempting[head.id] = (time.monotonic() + self.preemption_delay, takes)
            self._kick_later(self.preemption_delay + 0.05)
            cluster_log(logger, head.tenant, head.id).info(
                "preempting in %gs: %s", self.preemption_delay,
                " ".join(f"{t.cluster_id}:{t.workers}" for t in takes))
            return False
        if time.monotonic() < pending[0]:
            self._preempting[head.id] = (pending[0], takes)  # as things stand now
            return False
        del self._preempting[head.id]
        for take in takes:
            victim = self.records.cached(take.cluster_id)
            owner = self.tenants.get(take.tenant)
            if victim is None or owner is None or victim.status.terminal or victim.stop_wanted:
                continue
            workers = max(0, victim.workers_requested - take.workers)
            changes: dict[str, Any] = {}
            if victim.adaptive:  # it must not grow straight back into what it gave up
                changes["adaptive_maximum"] = workers
                changes["adaptive_minimum"] = min(victim.adaptive_minimum or 0, workers)
            shrunk = await self.records.resize(victim.id, owner.quota, workers, **changes)
            cluster_log(logger, victim.tenant, victim.id).info(
                "preempted workers=%d for tenant=%s", take.workers, head.tenant)
            self.preempted(shrunk, take.workers, head.tenant)
        return True

    def _place(self, lines: dict[str, deque[ClusterRecord]], shares: dict[str, float],
               reasons: dict[str, str]) -> None:
        """Positions of what still waits: the order the next passes would take it in."""
        positions: dict[str, int] = {}
        shares = dict(shares)
        lines = {n: deque(line) for n, line in lines.items() if line}
        while lines:
            name = min(lines, key=lambda n: (shares[n], lines[n][0].created_at))
            record = lines[name].popleft()
            positions[record.id] = len(positions) + 1
            tenant = self.tenants.get(name)
            if tenant is not None:
                shares[name] += dominant_share(Usage.of([record.evolve(
                    status=Status.PENDING)]), tenant, self.pool)
            if not lines[name]:
                del lines[name]
        for cluster_id in positions:
            if cluster_id not in reasons:
                reasons[cluster_id] = self.reasons.get(cluster_id) or \
                    "behind this tenant's clusters queued before it"
        self.positions, self.reasons = positions, reasons

    def where(self, record: ClusterRecord) -> tuple[int | None, str | None]:
        """A queued cluster's place in the queue and why it waits."""
        if record.status != Status.QUEUED:
            return None, None
        return self.positions.get(record.id), self.reasons.get(record.id)
