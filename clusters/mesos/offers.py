"""Matching pending tasks to offers, tenants served in weighted-DRF order.

Each offer belongs to one agent and one role, so a task can only use offers of its own role.
Among roles with pending work the one with the lowest weighted dominant share goes first,
one task at a time, so a tenant with many pending workers cannot starve a tenant whose
first scheduler is waiting. Task resources copy the offer's resource entries (role,
reservations, allocation_info) and only change the amounts.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from clusters.mesos.tasks import TaskRequest

EPS = 1e-9


def _r3(value: float) -> float:
    return round(value + EPS, 3)


@dataclass
class _Scalar:
    entry: dict[str, Any]
    left: float


@dataclass
class OfferPool:
    """What is left of one offer while tasks are carved out of it."""

    id: str
    agent_id: str
    hostname: str
    role: str
    scalars: dict[str, list[_Scalar]] = field(default_factory=dict)
    #: per ports entry of the offer, its still free ``[begin, end]`` intervals
    ports: list[tuple[dict[str, Any], list[list[int]]]] = field(default_factory=list)

    @classmethod
    def parse(cls, offer: dict[str, Any]) -> OfferPool:
        role = (offer.get("allocation_info") or {}).get("role", "*")
        pool = cls(offer["id"]["value"], offer["agent_id"]["value"], offer.get("hostname", ""),
                   role)
        for res in offer.get("resources") or []:
            if res.get("revocable") is not None:
                continue  # not asked for (no REVOCABLE_RESOURCES); never mix it in
            if res.get("type") == "SCALAR":
                pool.scalars.setdefault(res["name"], []).append(
                    _Scalar(res, float(res["scalar"]["value"])))
            elif res.get("type") == "RANGES" and res.get("name") == "ports":
                free = [[int(r["begin"]), int(r["end"])] for r in res["ranges"].get("range") or []]
                pool.ports.append((res, free))
        return pool

    def amount(self, name: str) -> float:
        return sum(s.left for s in self.scalars.get(name, []))

    def free_ports(self) -> int:
        return sum(end - begin + 1 for _, free in self.ports for begin, end in free)

    def fits(self, request: TaskRequest) -> bool:
        return request.fits(self.amount("cpus"), self.amount("mem"), self.free_ports())

    def take(self, request: TaskRequest) -> tuple[list[dict[str, Any]], list[int]]:
        """Carve the request's resources out (caller checked ``fits``)."""
        resources: list[dict[str, Any]] = []
        for name, want in (("cpus", request.cpus), ("mem", request.mem)):
            for scalar in self.scalars.get(name, []):
                if want <= EPS:
                    break
                got = min(want, scalar.left)
                if got <= EPS:
                    continue
                entry = copy.deepcopy(scalar.entry)
                entry["scalar"] = {"value": _r3(got)}
                resources.append(entry)
                scalar.left -= got
                want -= got
        ports: list[int] = []
        for entry, free in self.ports:
            taken: list[int] = []
            while free and len(ports) + len(taken) < request.ports:
                interval = free[0]
                taken.append(interval[0])
                interval[0] += 1
                if interval[0] > interval[1]:
                    free.pop(0)
            if taken:
                item = copy.deepcopy(entry)
                item["ranges"] = {"range": [{"begin": p, "end": p} for p in taken]}
                resources.append(item)
                ports.extend(taken)
            if len(ports) >= request.ports:
                break
        return resources, ports


@dataclass
class Placement:
    request: TaskRequest
    offer: OfferPool
    resources: list[dict[str, Any]]
    ports: list[int]


def dominant_share(used: tuple[float, float], total: tuple[float, float],
                   weight: float) -> float:
    cpus = used[0] / total[0] if total[0] > 0 else 0.0
    mem = used[1] / total[1] if total[1] > 0 else 0.0
    return max(cpus, mem) / max(weight, EPS)


def match(offers: Iterable[OfferPool], pending: Iterable[TaskRequest],
          used: dict[str, tuple[float, float]], weights: dict[str, float] | None = None,
          ) -> list[Placement]:
    """Place as many pending tasks as the offers hold, roles in weighted-DRF order.

    ``used`` is what each role's running tasks hold; the total against which shares are
    measured is that plus everything on offer now, the best view a framework has of the
    cluster.
    """
    offers = list(offers)
    weights = weights or {}
    queues: dict[str, list[TaskRequest]] = {}
    for request in pending:
        queues.setdefault(request.role, []).append(request)
    usage = {role: list(used.get(role, (0.0, 0.0))) for role in queues}
    total = (
        sum(u[0] for u in used.values()) + sum(o.amount("cpus") for o in offers),
        sum(u[1] for u in used.values()) + sum(o.amount("mem") for o in offers),
    )
    placements: list[Placement] = []
    while queues:
        role = min(queues, key=lambda r: (
            dominant_share((usage[r][0], usage[r][1]), total, weights.get(r, 1.0)), r))
        placed = None
        for request in queues[role]:
            offer = next((o for o in offers if o.role == role and o.fits(request)), None)
            if offer is not None:
                resources, ports = offer.take(request)
                placed = Placement(request, offer, resources, ports)
                break
        if placed is None:
            del queues[role]  # nothing more of this role fits this round
            continue
        placements.append(placed)
        queues[role].remove(placed.request)
        if not queues[role]:
            del queues[role]
        usage[role][0] += placed.request.cpus
        usage[role][1] += placed.request.mem
    return placements
