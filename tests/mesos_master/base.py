"""Shared state and vocabulary of the master's parts (see master.py for the whole).

The master is one object assembled from mixins, each in its own module: subscriptions
(frameworks and their streams), offers (allocation, ACCEPT/DECLINE), tasks (launch, status
updates, kills, reconciliation).  This base declares the state they share and the few
helpers every part uses, so each module can be read on its own.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from typing import Any

from .executor import CommandExecutor
from .model import Agent, Framework, Offer, Role, Task
from .resources import Resources

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


class MasterBase:
    """State shared by the master's mixins, and the hooks they call on each other."""

    config: MasterConfig
    work_dir: str
    id: str
    port: int
    frameworks: dict[str, Framework]
    removed_frameworks: set[str]
    orphans: dict[str, Framework]
    agents: dict[str, Agent]
    removed_agents: set[str]
    offers: dict[str, Offer]
    roles: dict[str, Role]
    completed_tasks: list[dict[str, Any]]
    leading: bool
    redirect_to: str | None
    _framework_counter: int
    _offer_counter: int
    _rng: random.Random
    _executors: set[CommandExecutor]
    _alloc_handle: asyncio.TimerHandle | None

    def all_frameworks(self) -> list[Framework]:
        return [*self.frameworks.values(), *self.orphans.values()]

    def role(self, name: str) -> Role:
        if name not in self.roles:
            self.roles[name] = Role(name)
        return self.roles[name]

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

    # Implemented by the mixins; declared here so each part type-checks alone.
    def trigger_allocation(self) -> None:
        raise NotImplementedError

    def _remove_offer(self, offer: Offer, rescind: bool) -> None:
        raise NotImplementedError

    def _discard_offers(self, fw: Framework, rescind: bool) -> None:
        raise NotImplementedError

    def usage(self) -> tuple[dict[str, Resources], dict[str, Resources]]:
        raise NotImplementedError

    def _release(self, task: Task) -> None:
        raise NotImplementedError

    def _validate_task(self, fw: Framework, agent: Agent, info: dict[str, Any], pool: Resources) -> str | None:
        raise NotImplementedError

    def _launch(self, fw: Framework, agent: Agent, role: str, info: dict[str, Any], resources: Resources) -> None:
        raise NotImplementedError

    def master_info(self) -> dict[str, Any]:
        raise NotImplementedError
