"""The master's bookkeeping records: agents, frameworks, offers, tasks, roles."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from .executor import CommandExecutor
from .resources import Interval, Resources, agent_resources
from .stream import Subscription
from .updates import TERMINAL_STATES, StatusUpdateStream


@dataclass
class AgentSpec:
    """Configuration of one simulated agent.  `ports=None` picks a distinct range per agent."""

    cpus: float = 4.0
    mem: float = 8192.0
    disk: float = 10240.0
    ports: Interval | list[Interval] | None = None
    hostname: str = "127.0.0.1"
    attributes: dict[str, str] = field(default_factory=dict)

    def port_ranges(self, index: int) -> list[Interval]:
        if self.ports is None:
            base = 31000 + 1000 * index
            return [(base, base + 999)]
        if isinstance(self.ports, tuple):
            return [self.ports]
        return list(self.ports)


@dataclass
class Agent:
    """A registered agent; `available` = total - used by tasks - outstanding offers."""

    id: str
    spec: AgentSpec
    total: Resources
    endpoint: str
    used: Resources = field(default_factory=Resources)
    offered: Resources = field(default_factory=Resources)

    @classmethod
    def create(cls, agent_id: str, spec: AgentSpec, index: int) -> Agent:
        total = agent_resources(spec.cpus, spec.mem, spec.disk, spec.port_ranges(index))
        return cls(agent_id, spec, total, f"{spec.hostname}:{5051 + index}")

    @property
    def hostname(self) -> str:
        return self.spec.hostname

    def available(self) -> Resources:
        return self.total - self.used - self.offered

    def attributes_json(self) -> list[dict[str, Any]]:
        return [{"name": k, "type": "TEXT", "text": {"value": v}} for k, v in sorted(self.spec.attributes.items())]


@dataclass
class Offer:
    id: str
    framework_id: str
    agent_id: str
    role: str
    resources: Resources
    created: float = field(default_factory=time.monotonic)


@dataclass
class Task:
    """A launched task as the master (and its simulated agent) know it."""

    framework_id: str
    task_id: str
    agent_id: str
    role: str
    info: dict[str, Any]
    resources: Resources
    updates: StatusUpdateStream
    executor: CommandExecutor | None = None
    state: str = "TASK_STAGING"  # latest state the agent reported
    status_update_state: str | None = None  # state of the latest update forwarded
    last_status: dict[str, Any] | None = None
    released: bool = False
    created: float = field(default_factory=time.time)

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    def grace_period(self) -> float | None:
        policy = self.info.get("kill_policy") or {}
        nanos = (policy.get("grace_period") or {}).get("nanoseconds")
        return None if nanos is None else int(nanos) / 1e9


@dataclass
class Filter:
    expires: float
    resources: Resources


@dataclass
class Framework:
    id: str
    info: dict[str, Any]
    roles: list[str]
    multi_role: bool
    capabilities: set[str]
    suppressed: set[str] = field(default_factory=set)
    subscription: Subscription | None = None
    failover_timer: Any = None
    filters: dict[tuple[str, str], Filter] = field(default_factory=dict)
    tasks: dict[str, Task] = field(default_factory=dict)
    registered_time: float = field(default_factory=time.time)

    @property
    def connected(self) -> bool:
        return self.subscription is not None and not self.subscription.closed

    @property
    def partition_aware(self) -> bool:
        return "PARTITION_AWARE" in self.capabilities

    def send(self, event: dict[str, Any]) -> None:
        """Events for a disconnected framework are dropped, as in Mesos."""
        if self.subscription is not None:
            self.subscription.send(event)


@dataclass
class Role:
    name: str
    weight: float = 1.0
    limits: Resources | None = None
