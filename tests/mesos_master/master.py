"""The master: frameworks, offers, tasks and agents in one event loop — no HTTP here.

Calls arrive already converted and validated (see protocol.py / api.py); everything a
scheduler learns comes back as events on its subscription, in the order things happen.
Behaviour follows the project's reference on the v1 scheduler API (sections 5-11); the
parts live in subscriptions.py, offers.py and tasks.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from typing import Any

from .base import VERSION, MasterBase, MasterConfig, update_event
from .executor import CommandExecutor
from .model import Agent, AgentSpec, Framework, Offer, Role
from .offers import OffersMixin
from .resources import Resources
from .subscriptions import SubscriptionsMixin
from .tasks import TasksMixin

__all__ = ["VERSION", "Master", "MasterConfig"]


class Master(SubscriptionsMixin, OffersMixin, TasksMixin, MasterBase):
    """All master (and simulated agent) state, driven from one asyncio event loop."""

    def __init__(
        self,
        config: MasterConfig,
        work_dir: str,
        agents: list[AgentSpec] | None = None,
        quotas: dict[str, dict[str, float]] | None = None,
        weights: dict[str, float] | None = None,
    ) -> None:
        self.config = config
        self.work_dir = work_dir
        self.id = str(uuid.uuid4())
        self.port = 0
        self.start_time = time.time()
        self.frameworks: dict[str, Framework] = {}
        self.removed_frameworks: set[str] = set()
        # Frameworks with tasks that a (simulated) new leader has not heard from yet.
        self.orphans: dict[str, Framework] = {}
        self.agents: dict[str, Agent] = {}
        self.removed_agents: set[str] = set()
        self.offers: dict[str, Offer] = {}
        self.roles: dict[str, Role] = {}
        self.completed_tasks: list[dict[str, Any]] = []
        self.leading = True
        self.redirect_to: str | None = None
        self._framework_counter = 0
        self._agent_counter = 0
        self._offer_counter = 0
        self._rng = random.Random(config.seed)
        self._executors: set[CommandExecutor] = set()
        self._alloc_handle: asyncio.TimerHandle | None = None
        self._alloc_task: asyncio.Task[None] | None = None
        for spec in agents or []:
            self.add_agent(spec)
        for role, limits in (quotas or {}).items():
            self.role(role).limits = Resources(dict(limits)).pruned()
        for role, weight in (weights or {}).items():
            self.role(role).weight = weight

    def start(self) -> None:
        self._alloc_task = asyncio.get_running_loop().create_task(self._allocation_loop())

    async def close(self) -> None:
        """Close every stream and kill every task process (SIGKILL), then wait for them."""
        if self._alloc_task is not None:
            self._alloc_task.cancel()
            with contextlib.suppress(BaseException):
                await self._alloc_task
        if self._alloc_handle is not None:
            self._alloc_handle.cancel()
        for fw in self.all_frameworks():
            if fw.failover_timer is not None:
                fw.failover_timer.cancel()
            for task in fw.tasks.values():
                task.updates.close()
            if fw.subscription is not None:
                sub, fw.subscription = fw.subscription, None
                sub.close()
        for executor in list(self._executors):
            executor.destroy()
        for executor in list(self._executors):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(executor.wait(), 5)

    def master_info(self) -> dict[str, Any]:
        host = self.config.hostname
        ip_parts = [int(p) for p in "127.0.0.1".split(".")]
        ip_int = ip_parts[0] | ip_parts[1] << 8 | ip_parts[2] << 16 | ip_parts[3] << 24
        return {
            "id": self.id,
            "ip": ip_int,
            "port": self.port,
            "pid": f"master@127.0.0.1:{self.port}",
            "hostname": host,
            "version": VERSION,
            "address": {"hostname": host, "ip": "127.0.0.1", "port": self.port},
            "capabilities": [{"type": "AGENT_UPDATE"}, {"type": "AGENT_DRAINING"}, {"type": "QUOTA_V2"}],
        }

    def fail_over(self) -> None:
        """Simulate a leader change: new master ID, every stream ends, offers vanish; tasks
        keep running and their frameworks are re-adopted when they SUBSCRIBE again."""
        self.id = str(uuid.uuid4())
        self._framework_counter = 0
        for fw in list(self.frameworks.values()):
            if fw.failover_timer is not None:
                fw.failover_timer.cancel()
                fw.failover_timer = None
            self._discard_offers(fw, rescind=False)
            sub, fw.subscription = fw.subscription, None
            if sub is not None:
                sub.close()
            self.orphans[fw.id] = fw
        self.frameworks.clear()

    def add_agent(self, spec: AgentSpec | None = None) -> str:
        spec = spec or AgentSpec()
        agent_id = f"{self.id}-S{self._agent_counter}"
        agent = Agent.create(agent_id, spec, self._agent_counter)
        self._agent_counter += 1
        self.agents[agent_id] = agent
        self.trigger_allocation()
        return agent_id

    def remove_agent(self, agent_id: str, reason: str = "REASON_AGENT_REMOVED", message: str | None = None) -> None:
        """Agent lost: kill its processes, LOST (no uuid) for its tasks, RESCIND, FAILURE."""
        agent = self.agents.pop(agent_id, None)
        if agent is None:
            raise KeyError(f"unknown agent {agent_id}")
        self.removed_agents.add(agent_id)
        for offer in [o for o in self.offers.values() if o.agent_id == agent_id]:
            self._remove_offer(offer, rescind=True)
        text = message or f"Agent {agent.hostname} removed"
        for fw in self.all_frameworks():
            for task in [t for t in fw.tasks.values() if t.agent_id == agent_id]:
                if task.executor is not None:
                    task.executor.destroy()
                task.updates.close()
                task.released = True
                del fw.tasks[task.task_id]
                state = "TASK_GONE" if reason == "REASON_AGENT_REMOVED" else "TASK_UNREACHABLE"
                status = self._master_status(fw, task.task_id, state, reason, text, agent_id)
                task.state = status["state"]
                self._remember_completed(task)
                fw.send(update_event(status))
            if fw.connected:
                fw.send({"type": "FAILURE", "failure": {"agent_id": {"value": agent_id}}})
        self.trigger_allocation()

    def state(self) -> dict[str, Any]:
        """A compact JSON view of everything (for debugging and out-of-process tests)."""
        by_role, _ = self.usage()
        return {
            "id": self.id,
            "version": VERSION,
            "leading": self.leading,
            "agents": [
                {
                    "id": a.id,
                    "hostname": a.hostname,
                    "total": a.total.to_json(),
                    "used": a.used.to_json(),
                    "offered": a.offered.to_json(),
                }
                for a in self.agents.values()
            ],
            "frameworks": [
                {
                    "id": fw.id,
                    "name": fw.info.get("name"),
                    "roles": fw.roles,
                    "connected": fw.connected,
                    "suppressed_roles": sorted(fw.suppressed),
                    "capabilities": sorted(fw.capabilities),
                    "tasks": [
                        {
                            "task_id": t.task_id,
                            "agent_id": t.agent_id,
                            "role": t.role,
                            "state": t.state,
                            "status_update_state": t.status_update_state,
                            "pid": t.executor.pid if t.executor else None,
                            "sandbox": t.executor.ctx.sandbox if t.executor else None,
                            "pending_updates": t.updates.pending,
                        }
                        for t in fw.tasks.values()
                    ],
                    "offers": [o.id for o in self.offers.values() if o.framework_id == fw.id],
                }
                for fw in self.frameworks.values()
            ],
            "orphaned_frameworks": sorted(self.orphans),
            "removed_frameworks": sorted(self.removed_frameworks),
            "completed_tasks": self.completed_tasks[-100:],
            "roles": self.roles_json(by_role),
        }

    def roles_json(self, by_role: dict[str, Resources] | None = None) -> list[dict[str, Any]]:
        if by_role is None:
            by_role, _ = self.usage()
        allocated: dict[str, Resources] = {}
        for fw in self.frameworks.values():
            for task in fw.tasks.values():
                if not task.released:
                    allocated[task.role] = allocated.get(task.role, Resources()) + task.resources
        names = set(self.roles) | set(allocated)
        for fw in self.frameworks.values():
            names |= set(fw.roles)
        out = []
        for name in sorted(names):
            role = self.roles.get(name) or Role(name)
            used = allocated.get(name, Resources())
            out.append(
                {
                    "name": name,
                    "weight": role.weight,
                    "frameworks": [fw.id for fw in self.frameworks.values() if name in fw.roles],
                    "resources": used.scalars,
                    "allocated": used.scalars,
                    "offered": (by_role.get(name, Resources()) - used).scalars,
                    "quota": {
                        "role": name,
                        "limit": role.limits.scalars if role.limits else {},
                        "consumed": used.scalars,
                    },
                }
            )
        return out
