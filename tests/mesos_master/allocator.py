"""One allocation cycle: which (framework, role) gets which agent's free resources.

A simplified hierarchical allocator: agents in random order; for each agent, roles in
weighted-DRF order and frameworks within a role in DRF order; each candidate receives all
that is still free on the agent, capped by its role's quota limit headroom
(limit - allocated - outstanding offers), unless a DECLINE/ACCEPT filter covers it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .model import Agent, Framework, Role
from .resources import Resources

SHARE_RESOURCES = ("cpus", "mem", "disk")


def top_level(role: str) -> str:
    """Quota is set per top-level role; `a/b` consumes from `a`."""
    return role.split("/", 1)[0]


@dataclass
class Grant:
    framework: Framework
    role: str
    agent: Agent
    resources: Resources


def dominant_share(usage: Resources, total: Resources) -> float:
    shares = [usage.scalar(name) / total.scalar(name) for name in SHARE_RESOURCES if total.scalar(name) > 0]
    return max(shares, default=0.0)


def quota_headroom(role: str, roles: dict[str, Role], usage: dict[str, Resources]) -> Resources | None:
    """What the role's top-level quota still allows, or None when it has no limit."""
    top = top_level(role)
    limits = roles[top].limits if top in roles else None
    if limits is None:
        return None
    consumed = Resources()
    for name, res in usage.items():
        if top_level(name) == top:
            consumed = consumed + res
    return Resources({k: max(0.0, round(v - consumed.scalar(k), 3)) for k, v in limits.scalars.items()})


def cap(offer: Resources, headroom: Resources | None) -> Resources:
    if headroom is None:
        return offer
    out = offer.copy()
    for name, allowed in headroom.scalars.items():
        if name in out.scalars:
            out.scalars[name] = min(out.scalars[name], allowed)
    return out.pruned()


def allocate(
    agents: list[Agent],
    frameworks: list[Framework],
    roles: dict[str, Role],
    role_usage: dict[str, Resources],
    framework_usage: dict[str, Resources],
    now: float,
    rng: random.Random,
) -> list[Grant]:
    """Compute this cycle's grants; the caller turns them into offers."""
    total = Resources()
    for agent in agents:
        total = total + agent.total
    role_usage = {k: v.copy() for k, v in role_usage.items()}
    framework_usage = {k: v.copy() for k, v in framework_usage.items()}
    order = list(agents)
    rng.shuffle(order)
    grants: list[Grant] = []
    for agent in order:
        available = agent.available()
        if not available.allocatable():
            continue
        candidates = [(role, fw) for fw in frameworks if fw.connected for role in fw.roles if role not in fw.suppressed]

        def key(item: tuple[str, Framework]) -> tuple[float, float, float]:
            role, fw = item
            weight = roles[role].weight if role in roles else 1.0
            role_share = dominant_share(role_usage.get(role, Resources()), total) / weight
            fw_share = dominant_share(framework_usage.get(fw.id, Resources()), total)
            return (role_share, fw_share, fw.registered_time)

        candidates.sort(key=key)
        for role, fw in candidates:
            if not available.allocatable():
                break
            offer = cap(available, quota_headroom(role, roles, role_usage))
            if not offer.allocatable():
                continue
            refused = fw.filters.get((agent.id, role))
            if refused is not None and refused.expires > now and refused.resources.contains(offer):
                continue
            grants.append(Grant(fw, role, agent, offer))
            available = available - offer
            role_usage[role] = role_usage.get(role, Resources()) + offer
            framework_usage[fw.id] = framework_usage.get(fw.id, Resources()) + offer
    return grants
