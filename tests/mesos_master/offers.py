"""Offers: the allocation cycle, outstanding offers, ACCEPT / DECLINE, SUPPRESS / REVIVE,
quota changes.

Offers are made per (framework, role, agent) by allocator.allocate(); an offer's resources
stay out of the pool until it is accepted, declined, rescinded or discarded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from .allocator import allocate, top_level
from .base import DEFAULT_REFUSE_SECONDS, MAX_REFUSE_SECONDS, MasterBase, update_event
from .model import Filter, Framework, Offer
from .resources import Resources

log = logging.getLogger(__name__)


class OffersMixin(MasterBase):
    def trigger_allocation(self) -> None:
        """Run an allocation cycle soon (coalesced), as Mesos does on events."""
        with contextlib.suppress(RuntimeError):
            loop = asyncio.get_running_loop()
            if self._alloc_handle is None:
                self._alloc_handle = loop.call_later(0.01, self._triggered)

    def _triggered(self) -> None:
        self._alloc_handle = None
        self.allocate_now()

    async def _allocation_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.allocation_interval)
            try:
                self.allocate_now()
            except Exception:  # pragma: no cover - keep allocating after a bug
                log.exception("allocation failed")

    def usage(self) -> tuple[dict[str, Resources], dict[str, Resources]]:
        """(role -> allocated + offered, framework -> allocated + offered)."""
        by_role: dict[str, Resources] = {}
        by_fw: dict[str, Resources] = {}
        for fw in self.all_frameworks():
            for task in fw.tasks.values():
                if not task.released:
                    by_role[task.role] = by_role.get(task.role, Resources()) + task.resources
                    by_fw[fw.id] = by_fw.get(fw.id, Resources()) + task.resources
        for offer in self.offers.values():
            by_role[offer.role] = by_role.get(offer.role, Resources()) + offer.resources
            by_fw[offer.framework_id] = by_fw.get(offer.framework_id, Resources()) + offer.resources
        return by_role, by_fw

    def allocate_now(self) -> None:
        now = time.monotonic()
        timeout = self.config.offer_timeout
        if timeout is not None:
            for offer in [o for o in self.offers.values() if now - o.created >= timeout]:
                self._remove_offer(offer, rescind=True)
        for fw in self.frameworks.values():
            fw.filters = {k: f for k, f in fw.filters.items() if f.expires > now}
        if not self.leading:
            return
        by_role, by_fw = self.usage()
        grants = allocate(
            list(self.agents.values()), list(self.frameworks.values()), self.roles, by_role, by_fw, now, self._rng
        )
        batches: dict[str, list[dict[str, Any]]] = {}
        for grant in grants:
            offer_id = f"{self.id}-O{self._offer_counter}"
            self._offer_counter += 1
            offer = Offer(offer_id, grant.framework.id, grant.agent.id, grant.role, grant.resources)
            self.offers[offer_id] = offer
            grant.agent.offered = grant.agent.offered + grant.resources
            batches.setdefault(grant.framework.id, []).append(self._offer_json(offer))
        for fw_id, offers in batches.items():
            self.frameworks[fw_id].send({"type": "OFFERS", "offers": {"offers": offers}})

    def _offer_json(self, offer: Offer) -> dict[str, Any]:
        fw = self.frameworks[offer.framework_id]
        agent = self.agents[offer.agent_id]
        role = offer.role if fw.multi_role else None
        host, _, port = agent.endpoint.partition(":")
        data: dict[str, Any] = {
            "id": {"value": offer.id},
            "framework_id": {"value": fw.id},
            "agent_id": {"value": agent.id},
            "hostname": agent.hostname,
            "url": {
                "scheme": "http",
                "address": {"hostname": host, "ip": "127.0.0.1", "port": int(port)},
                "path": "/slave(1)",
            },
            "resources": offer.resources.to_json(role),
            "attributes": agent.attributes_json(),
            "executor_ids": [],
        }
        if role is not None:
            data["allocation_info"] = {"role": role}
        return data

    def _remove_offer(self, offer: Offer, rescind: bool) -> None:
        self.offers.pop(offer.id, None)
        agent = self.agents.get(offer.agent_id)
        if agent is not None:
            agent.offered = agent.offered - offer.resources
        fw = self.frameworks.get(offer.framework_id)
        if rescind and fw is not None:
            fw.send({"type": "RESCIND", "rescind": {"offer_id": {"value": offer.id}}})

    def _discard_offers(self, fw: Framework, rescind: bool) -> None:
        for offer in [o for o in self.offers.values() if o.framework_id == fw.id]:
            self._remove_offer(offer, rescind)

    def rescind_offer(self, offer_id: str) -> None:
        """Fault hook: take an outstanding offer back."""
        self._remove_offer(self.offers[offer_id], rescind=True)
        self.trigger_allocation()

    def set_quota(self, role: str, limits: dict[str, float] | None) -> None:
        """Set (or with None/{} remove) a top-level role's limits; rescind what exceeds."""
        self.role(role).limits = Resources(dict(limits)).pruned() if limits else None
        limit = self.roles[role].limits
        if limit is not None:
            by_role, _ = self.usage()
            offers = sorted(
                (o for o in self.offers.values() if top_level(o.role) == role), key=lambda o: o.id, reverse=True
            )
            for offer in offers:
                consumed = by_role_sum(by_role, role)
                if all(consumed.scalar(k) <= v for k, v in limit.scalars.items()):
                    break
                self._remove_offer(offer, rescind=True)
                by_role[offer.role] = by_role[offer.role] - offer.resources
        self.trigger_allocation()

    def accept(self, fw: Framework, body: dict[str, Any]) -> None:
        """ACCEPT (and DECLINE, which is ACCEPT without operations)."""
        offer_ids = [o["value"] for o in body.get("offer_ids") or []]
        operations = body.get("operations") or []
        refuse = (body.get("filters") or {}).get("refuse_seconds", DEFAULT_REFUSE_SECONDS)
        if not isinstance(refuse, (int, float)) or refuse != refuse:
            refuse = DEFAULT_REFUSE_SECONDS
        refuse = min(max(float(refuse), 0.0), MAX_REFUSE_SECONDS)
        launches = [
            t
            for op in operations
            if op.get("type") == "LAUNCH"
            for t in (op.get("launch") or {}).get("task_infos") or []
        ]

        error = self._validate_offers(fw, offer_ids)
        if error is not None:
            for offer_id in set(offer_ids):
                offer = self.offers.get(offer_id)
                if offer is not None and offer.framework_id == fw.id:
                    self._remove_offer(offer, rescind=False)
            for task_info in launches:
                fw.send(
                    update_event(
                        self._master_status(
                            fw,
                            task_info["task_id"]["value"],
                            "TASK_DROPPED",
                            "REASON_INVALID_OFFERS",
                            f"Task launched with invalid offers: {error}",
                            task_info["agent_id"]["value"],
                        )
                    )
                )
            self.trigger_allocation()
            return

        offers = [self.offers[i] for i in offer_ids]
        agent = self.agents[offers[0].agent_id]
        role = offers[0].role
        pool = Resources()
        for offer in offers:
            self._remove_offer(offer, rescind=False)
            pool = pool + offer.resources
        for op in operations:
            kind = op.get("type")
            if kind == "LAUNCH":
                for task_info in (op.get("launch") or {}).get("task_infos") or []:
                    problem = "Operation ID must not be set for LAUNCH" if "id" in op else None
                    problem = problem or self._validate_task(fw, agent, task_info, pool)
                    if problem is not None:
                        fw.send(
                            update_event(
                                self._master_status(
                                    fw,
                                    task_info["task_id"]["value"],
                                    "TASK_ERROR",
                                    "REASON_TASK_INVALID",
                                    problem,
                                    agent.id,
                                )
                            )
                        )
                        continue
                    resources = Resources.from_json(task_info.get("resources") or [])
                    pool = pool - resources
                    self._launch(fw, agent, role, task_info, resources)
            elif kind == "LAUNCH_GROUP":
                group = (op.get("launch_group") or {}).get("task_group") or {}
                for task_info in group.get("tasks") or []:
                    fw.send(
                        update_event(
                            self._master_status(
                                fw,
                                (task_info.get("task_id") or {}).get("value", ""),
                                "TASK_ERROR",
                                "REASON_TASK_INVALID",
                                "LAUNCH_GROUP is not supported by this test master",
                                agent.id,
                            )
                        )
                    )
            # Reservations and volumes are not simulated; their resources count as unused.
        if refuse > 0 and not pool.is_empty():
            fw.filters[(agent.id, role)] = Filter(time.monotonic() + refuse, pool)
        self.trigger_allocation()

    def _validate_offers(self, fw: Framework, offer_ids: list[str]) -> str | None:
        if not offer_ids:
            return "No offers specified"
        if len(set(offer_ids)) != len(offer_ids):
            return "Duplicate offers specified"
        agents, roles = set(), set()
        for offer_id in offer_ids:
            offer = self.offers.get(offer_id)
            if offer is None:
                return f"Offer {offer_id} is no longer valid"
            if offer.framework_id != fw.id:
                return f"Offer {offer_id} has invalid framework"
            agents.add(offer.agent_id)
            roles.add(offer.role)
        if len(agents) > 1:
            return "Aggregated offers must belong to one single agent"
        if len(roles) > 1:
            return "Aggregated offers must be allocated to the same role"
        return None

    def decline(self, fw: Framework, body: dict[str, Any]) -> None:
        offer_ids = [o["value"] for o in body.get("offer_ids") or []]
        known = [i for i in offer_ids if i in self.offers and self.offers[i].framework_id == fw.id]
        for offer_id in dict.fromkeys(known):
            self.accept(
                fw, {"offer_ids": [{"value": offer_id}], "operations": [], "filters": body.get("filters") or {}}
            )

    def revive(self, fw: Framework, roles: list[str]) -> None:
        targets = set(roles) if roles else set(fw.roles)
        fw.suppressed -= targets
        fw.filters = {k: v for k, v in fw.filters.items() if k[1] not in targets}
        self.trigger_allocation()

    def suppress(self, fw: Framework, roles: list[str]) -> None:
        fw.suppressed |= (set(roles) & set(fw.roles)) if roles else set(fw.roles)


def by_role_sum(by_role: dict[str, Resources], top: str) -> Resources:
    total = Resources()
    for name, res in by_role.items():
        if top_level(name) == top:
            total = total + res
    return total
