"""The master's state machine: frameworks, offers, tasks, agents — no HTTP here.

Calls arrive already converted and validated (see protocol.py / api.py); everything a
scheduler learns comes back as events on its subscription, in the order things happen.
Behaviour follows the project's reference on the v1 scheduler API (sections 5-11).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import time
import uuid
from dataclasses import dataclass
from typing import Any

from .allocator import allocate, top_level
from .executor import DEFAULT_GRACE, CommandExecutor, TaskContext
from .model import Agent, AgentSpec, Filter, Framework, Offer, Role, Task
from .resources import ResourceError, Resources
from .stream import Subscription
from .updates import TERMINAL_STATES, StatusUpdateStream, new_uuid

log = logging.getLogger(__name__)

VERSION = "1.11.0"
DEFAULT_REFUSE_SECONDS = 5.0
MAX_REFUSE_SECONDS = 365 * 24 * 3600.0
PARTITION_STATES = {"TASK_DROPPED", "TASK_UNREACHABLE", "TASK_GONE", "TASK_GONE_BY_OPERATOR", "TASK_UNKNOWN"}


@dataclass
class MasterConfig:
    """Tunables; defaults are Mesos's, tests shorten the intervals."""

    heartbeat_interval: float = 15.0
    allocation_interval: float = 1.0
    update_retry_interval: float = 10.0
    update_retry_max: float = 600.0
    run_processes: bool = True
    chunk_size: int | None = None
    allowed_roles: frozenset[str] | None = None
    hostname: str = "127.0.0.1"
    seed: int | None = None
    offer_timeout: float | None = None


def error_event(message: str) -> dict[str, Any]:
    return {"type": "ERROR", "error": {"message": message}}


def update_event(status: dict[str, Any]) -> dict[str, Any]:
    return {"type": "UPDATE", "update": {"status": status}}


def validate_role(role: str) -> str | None:
    """Role name rules of roles.md (with hierarchical roles allowed)."""
    if role == "*":
        return None
    if not role or role.startswith("/") or role.endswith("/") or "//" in role:
        return f"Role '{role}' is invalid"
    for part in role.split("/"):
        if part in (".", "..", "*") or part.startswith("-"):
            return f"Role '{role}' is invalid"
        if any(c.isspace() or c == "\b" for c in part):
            return f"Role '{role}' is invalid"
    return None


def validate_task_id(value: str) -> str | None:
    if not value:
        return "ID must not be empty"
    if value in (".", ".."):
        return "'.' and '..' are not allowed"
    if len(value) > 255:
        return "ID must not be longer than 255 characters"
    if "/" in value or "\\" in value or any(ord(c) < 32 or ord(c) == 127 for c in value):
        return "ID must not contain '/', '\\' or control characters"
    return None


class Master:
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

    # ================================================================ lifecycle
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

    def all_frameworks(self) -> list[Framework]:
        return [*self.frameworks.values(), *self.orphans.values()]

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

    def role(self, name: str) -> Role:
        if name not in self.roles:
            self.roles[name] = Role(name)
        return self.roles[name]

    # ================================================================ agents
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

    # ================================================================ subscription
    def subscribe(self, call: dict[str, Any]) -> Subscription:
        """SUBSCRIBE: new framework, failover of a known one, or a refusal ERROR stream."""
        body = call["subscribe"]
        info = dict(body["framework_info"])
        fw_id = (info.get("id") or {}).get("value")
        sub = Subscription(self.config.chunk_size)
        roles, multi, caps, error = self._framework_roles(info)
        suppressed = set(body.get("suppressed_roles") or [])
        if error is None and fw_id in self.removed_frameworks:
            error = "Framework has been removed"
        if error is None and not suppressed <= set(roles):
            error = f"Suppressed roles {sorted(suppressed - set(roles))} are not contained in roles"
        if error is not None:
            sub.send(error_event(error))
            sub.close()
            return sub

        if fw_id in self.orphans:
            self.frameworks[fw_id] = self.orphans.pop(fw_id)
        fw = self.frameworks.get(fw_id) if fw_id else None
        if fw is not None and info.get("principal") != fw.info.get("principal"):
            sub.send(error_event("Changing framework's principal is not allowed"))
            sub.close()
            return sub
        if fw is not None:
            old, fw.subscription = fw.subscription, None
            if old is not None and not old.closed:
                old.send(error_event("Framework failed over"))
                old.close()
            if fw.failover_timer is not None:
                fw.failover_timer.cancel()
                fw.failover_timer = None
            self._discard_offers(fw, rescind=False)
            info["user"] = fw.info.get("user", info.get("user"))
            if "checkpoint" in fw.info:
                info["checkpoint"] = fw.info["checkpoint"]
            self._apply_framework_info(fw, info, roles, multi, caps, suppressed)
        else:
            if not fw_id:
                fw_id = f"{self.id}-{self._framework_counter:04d}"
                self._framework_counter += 1
            info["id"] = {"value": fw_id}
            fw = Framework(fw_id, info, roles, multi, caps, suppressed)
            self.frameworks[fw_id] = fw
        fw.info["id"] = {"value": fw_id}
        sub._on_closed = lambda s, fid=fw_id: self._on_stream_closed(fid, s)
        fw.subscription = sub
        sub.send(
            {
                "type": "SUBSCRIBED",
                "subscribed": {
                    "framework_id": {"value": fw_id},
                    "heartbeat_interval_seconds": float(self.config.heartbeat_interval),
                    "master_info": self.master_info(),
                },
            }
        )
        sub.start_heartbeats(self.config.heartbeat_interval)
        self.trigger_allocation()
        return sub

    def _framework_roles(self, info: dict[str, Any]) -> tuple[list[str], bool, set[str], str | None]:
        caps = {c["type"] for c in info.get("capabilities") or [] if "type" in c}
        multi = "MULTI_ROLE" in caps
        if multi:
            if "role" in info:
                return [], multi, caps, "'FrameworkInfo.role' must not be set when MULTI_ROLE"
            roles = list(info.get("roles") or [])
        else:
            if info.get("roles"):
                return [], multi, caps, "'FrameworkInfo.roles' is set without MULTI_ROLE"
            roles = [info.get("role", "*")]
        if len(set(roles)) != len(roles):
            return [], multi, caps, f"'FrameworkInfo.roles' contains duplicate items: {roles}"
        for role in roles:
            err = validate_role(role)
            if err:
                return [], multi, caps, err
            allowed = self.config.allowed_roles
            if allowed is not None and role != "*" and role not in allowed:
                return [], multi, caps, f"Role '{role}' is not present in the master's --roles"
        return roles, multi, caps, None

    def _apply_framework_info(
        self, fw: Framework, info: dict[str, Any], roles: list[str], multi: bool, caps: set[str], suppressed: set[str]
    ) -> None:
        removed_roles = set(fw.roles) - set(roles)
        for offer in [o for o in self.offers.values() if o.framework_id == fw.id]:
            if offer.role in removed_roles:
                self._remove_offer(offer, rescind=True)
        unsuppressed = fw.suppressed - suppressed
        fw.filters = {k: v for k, v in fw.filters.items() if k[1] not in unsuppressed and k[1] in roles}
        info["id"] = {"value": fw.id}
        fw.info, fw.roles, fw.multi_role, fw.capabilities = info, roles, multi, caps
        fw.suppressed = suppressed

    def update_framework(self, fw: Framework, body: dict[str, Any]) -> str | None:
        """UPDATE_FRAMEWORK; returns an error message for a 400, None on success."""
        info = dict(body["framework_info"])
        for key in ("principal", "user", "checkpoint"):
            if info.get(key) != fw.info.get(key) and (key in info or key in fw.info):
                if not (key == "checkpoint" and not info.get(key) and not fw.info.get(key)):
                    return f"Updating 'FrameworkInfo.{key}' is unsupported"
        roles, multi, caps, error = self._framework_roles(info)
        if error:
            return error
        suppressed = set(body.get("suppressed_roles") or [])
        if not suppressed <= set(roles):
            return "Suppressed roles are not contained in roles"
        self._apply_framework_info(fw, info, roles, multi, caps | fw.capabilities, suppressed)
        self.trigger_allocation()
        return None

    def _on_stream_closed(self, fw_id: str, sub: Subscription) -> None:
        fw = self.frameworks.get(fw_id)
        if fw is None or fw.subscription is not sub:
            return
        self._disconnect(fw)

    def _disconnect(self, fw: Framework) -> None:
        """Stream broke: deactivate, drop offers, start the failover timer."""
        fw.subscription = None
        self._discard_offers(fw, rescind=False)
        timeout = float(fw.info.get("failover_timeout") or 0.0)
        loop = asyncio.get_running_loop()
        fw.failover_timer = loop.call_later(max(0.0, min(timeout, 1e9)), self._failover_expired, fw.id)

    def _failover_expired(self, fw_id: str) -> None:
        fw = self.frameworks.get(fw_id)
        if fw is not None and not fw.connected:
            log.info("framework %s failover timeout expired", fw_id)
            self.remove_framework(fw)

    def drop_stream(self, fw_id: str) -> None:
        """Fault hook: break the framework's subscription connection."""
        fw = self.frameworks[fw_id]
        if fw.subscription is not None:
            fw.subscription.abort()

    def remove_framework(self, fw: Framework) -> None:
        """TEARDOWN or failover expiry: kill its tasks, forget it, close its stream."""
        if fw.failover_timer is not None:
            fw.failover_timer.cancel()
            fw.failover_timer = None
        self._discard_offers(fw, rescind=False)
        for task in list(fw.tasks.values()):
            task.updates.close()
            if task.executor is not None:
                grace = task.grace_period()
                task.executor.kill(DEFAULT_GRACE if grace is None else grace)
            self._release(task)
            self._remember_completed(task)
        fw.tasks.clear()
        del self.frameworks[fw.id]
        self.removed_frameworks.add(fw.id)
        sub, fw.subscription = fw.subscription, None
        if sub is not None:
            sub.close()
        self.trigger_allocation()

    # ================================================================ offers
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

    # ================================================================ calls
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

    def _validate_task(self, fw: Framework, agent: Agent, info: dict[str, Any], pool: Resources) -> str | None:
        task_id = info["task_id"]["value"]
        problem = validate_task_id(task_id)
        if problem:
            return f"Task ID '{task_id}' is invalid: {problem}"
        if task_id in fw.tasks:
            return f"Task has duplicate ID: {task_id}"
        if info["agent_id"]["value"] != agent.id:
            return f"Task uses agent ID {info['agent_id']['value']} which does not match the offer's agent {agent.id}"
        if ("command" in info) == ("executor" in info):
            return "Task should have at least one (but not both) of CommandInfo or ExecutorInfo present"
        if "executor" in info:
            return "Custom executors are not supported by this test master"
        nanos = ((info.get("kill_policy") or {}).get("grace_period") or {}).get("nanoseconds")
        if nanos is not None and int(nanos) < 0:
            return "Task's 'kill_policy.grace_period' must be non-negative"
        raw = info.get("resources") or []
        if not raw:
            return "Task uses no resources"
        for item in raw:
            if item.get("role", "*") != "*" or item.get("reservations") or item.get("revocable") is not None:
                return (
                    f"Total resources {raw} required by task and its executor is more than available {pool.summary()}"
                )
            alloc = (item.get("allocation_info") or {}).get("role")
            if alloc is not None and fw.multi_role and alloc not in fw.roles:
                return f"Resource allocated to role '{alloc}' the framework is not subscribed to"
        try:
            resources = Resources.from_json(raw)
        except ResourceError as exc:
            return f"Invalid resources: {exc}"
        if resources.is_empty():
            return "Task uses no resources"
        if not pool.contains(resources):
            return (
                f"Total resources {resources.summary()} required by task and its executor "
                f"is more than available {pool.summary()}"
            )
        return None

    def _launch(self, fw: Framework, agent: Agent, role: str, info: dict[str, Any], resources: Resources) -> None:
        task_id = info["task_id"]["value"]
        container = str(uuid.uuid4())
        sandbox = os.path.join(
            self.work_dir, "agents", agent.id, "frameworks", fw.id, "executors", task_id, "runs", container
        )
        os.makedirs(sandbox, exist_ok=True)
        holder: list[Task] = []
        updates = StatusUpdateStream(
            lambda s: self._forward(holder[0], s), self.config.update_retry_interval, self.config.update_retry_max
        )
        task = Task(fw.id, task_id, agent.id, role, info, resources, updates)
        holder.append(task)
        fw.tasks[task_id] = task
        agent.used = agent.used + resources
        ctx = TaskContext(
            info,
            fw.id,
            agent.id,
            agent.endpoint,
            role,
            sandbox,
            self.config.run_processes,
            "TASK_KILLING_STATE" in fw.capabilities,
        )
        executor = CommandExecutor(
            ctx, lambda state, msg, reason, extra: self._on_task_state(task, state, msg, reason, extra)
        )
        task.executor = executor
        self._executors.add(executor)
        executor.start()
        assert executor._task is not None
        executor._task.add_done_callback(lambda _f: self._executors.discard(executor))

    def _on_task_state(
        self, task: Task, state: str, message: str | None, reason: str | None, extra: dict[str, Any]
    ) -> None:
        """A state change inside the (simulated) agent: record it and queue an update."""
        fw = self.frameworks.get(task.framework_id) or self.orphans.get(task.framework_id)
        if fw is None or fw.tasks.get(task.task_id) is not task:
            return  # framework removed / task gone: nobody to tell
        from_agent = reason in ("REASON_CONTAINER_LAUNCH_FAILED", "REASON_TASK_KILLED_DURING_LAUNCH")
        status: dict[str, Any] = {
            "task_id": {"value": task.task_id},
            "state": state,
            "source": "SOURCE_AGENT" if from_agent else "SOURCE_EXECUTOR",
            "agent_id": {"value": task.agent_id},
            "timestamp": time.time(),
            "uuid": new_uuid(),
        }
        if not from_agent:
            status["executor_id"] = {"value": task.task_id}
        if message is not None:
            status["message"] = message
        if reason is not None:
            status["reason"] = reason
        status.update(extra)
        task.state = state
        if state in TERMINAL_STATES:
            self._release(task)
        task.updates.add(status)
        if state in TERMINAL_STATES and not from_agent:
            # The command executor exits (status 0) once its task is terminal; the agent
            # reports that as an ExitedExecutorMessage, i.e. FAILURE with executor_id.
            asyncio.get_running_loop().call_later(0.1, self._executor_exited, task)

    def _executor_exited(self, task: Task) -> None:
        fw = self.frameworks.get(task.framework_id)
        if fw is not None and fw.connected and task.agent_id in self.agents:
            failure = {"agent_id": {"value": task.agent_id}, "executor_id": {"value": task.task_id}, "status": 0}
            fw.send({"type": "FAILURE", "failure": failure})

    def _forward(self, task: Task, status: dict[str, Any]) -> None:
        """The agent (re)sends the oldest unacknowledged update through the master."""
        fw = self.frameworks.get(task.framework_id) or self.orphans.get(task.framework_id)
        if fw is None or fw.tasks.get(task.task_id) is not task:
            return
        task.status_update_state = status["state"]
        task.last_status = status
        fw.send(update_event(status))

    def _release(self, task: Task) -> None:
        if task.released:
            return
        task.released = True
        agent = self.agents.get(task.agent_id)
        if agent is not None:
            agent.used = agent.used - task.resources
        self.trigger_allocation()

    def _remember_completed(self, task: Task) -> None:
        self.completed_tasks.append(
            {
                "framework_id": task.framework_id,
                "task_id": task.task_id,
                "agent_id": task.agent_id,
                "state": task.state,
            }
        )
        del self.completed_tasks[:-1000]

    def _master_status(
        self, fw: Framework, task_id: str, state: str, reason: str, message: str, agent_id: str | None = None
    ) -> dict[str, Any]:
        """A master-generated update: no uuid, never acknowledged."""
        if state in PARTITION_STATES and not fw.partition_aware:
            state = "TASK_LOST"
        status: dict[str, Any] = {
            "task_id": {"value": task_id},
            "state": state,
            "source": "SOURCE_MASTER",
            "reason": reason,
            "message": message,
            "timestamp": time.time(),
        }
        if agent_id is not None:
            status["agent_id"] = {"value": agent_id}
        return status

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

    def kill(self, fw: Framework, body: dict[str, Any]) -> None:
        task_id = body["task_id"]["value"]
        agent_id = (body.get("agent_id") or {}).get("value")
        task = fw.tasks.get(task_id)
        if task is None:
            self.reconcile(
                fw, [{"task_id": {"value": task_id}, **({"agent_id": {"value": agent_id}} if agent_id else {})}]
            )
            return
        if task.terminal or task.executor is None:
            return
        nanos = ((body.get("kill_policy") or {}).get("grace_period") or {}).get("nanoseconds")
        grace = int(nanos) / 1e9 if nanos is not None else task.grace_period()
        task.executor.kill(DEFAULT_GRACE if grace is None else grace)

    def acknowledge(self, fw: Framework, body: dict[str, Any]) -> None:
        task = fw.tasks.get(body["task_id"]["value"])
        if task is None or task.agent_id != body["agent_id"]["value"]:
            return
        acked = task.updates.acknowledge(body["uuid"])
        if acked is not None and task.updates.terminal_acknowledged:
            task.updates.close()
            del fw.tasks[task.task_id]
            self._remember_completed(task)

    def reconcile(self, fw: Framework, tasks: list[dict[str, Any]]) -> None:
        if not tasks:
            for task in fw.tasks.values():
                fw.send(update_event(self._reconcile_known(fw, task)))
            return
        for item in tasks:
            task_id = item["task_id"]["value"]
            agent_id = (item.get("agent_id") or {}).get("value")
            task = fw.tasks.get(task_id)
            if task is not None:
                status = self._reconcile_known(fw, task)
            elif agent_id is not None and agent_id in self.agents:
                status = self._master_status(
                    fw,
                    task_id,
                    "TASK_GONE",
                    "REASON_RECONCILIATION",
                    "Reconciliation: Task is unknown to the agent",
                    agent_id,
                )
            else:
                status = self._master_status(
                    fw, task_id, "TASK_UNKNOWN", "REASON_RECONCILIATION", "Reconciliation: Task is unknown", agent_id
                )
            fw.send(update_event(status))

    def _reconcile_known(self, fw: Framework, task: Task) -> dict[str, Any]:
        state = task.status_update_state or task.state
        status = self._master_status(
            fw, task.task_id, state, "REASON_RECONCILIATION", "Reconciliation: Latest task state", task.agent_id
        )
        if task.last_status and "container_status" in task.last_status:
            status["container_status"] = task.last_status["container_status"]
        return status

    # ================================================================ fault hooks
    def find_task(self, task_id: str, framework_id: str | None = None) -> Task:
        for fw in self.all_frameworks():
            if framework_id is not None and fw.id != framework_id:
                continue
            if task_id in fw.tasks:
                return fw.tasks[task_id]
        raise KeyError(f"unknown task {task_id}")

    def kill_task_process(self, task_id: str, framework_id: str | None = None, sig: int = signal.SIGKILL) -> None:
        """Fault hook: the task's process dies (-> TASK_FAILED), not a scheduler KILL."""
        task = self.find_task(task_id, framework_id)
        if task.executor is None or not task.executor.signal_process(sig):
            raise RuntimeError(f"task {task_id} has no running process")

    # ================================================================ views
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


def by_role_sum(by_role: dict[str, Resources], top: str) -> Resources:
    total = Resources()
    for name, res in by_role.items():
        if top_level(name) == top:
            total = total + res
    return total
