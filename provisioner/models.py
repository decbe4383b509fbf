"""Cluster records and the state machine they move through.

A record is the service's memory of one cluster, in two halves kept apart: what is wanted
(``wanted``, and the worker count or adaptive bounds), which only requests and the reaper
change, and what is (``status``, running workers, addresses), which only the reconciler
writes from what it observed. The reconciler drives the second toward the first.
"""

from __future__ import annotations

import enum
import secrets
import time
from dataclasses import dataclass, field, replace
from typing import Any

from clusters.base import Outcome, StopReason


class Status(enum.StrEnum):
    QUEUED = "queued"  # waiting for capacity: holds no quota, starts once admitted
    PENDING = "pending"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"

    @property
    def terminal(self) -> bool:
        return self in (Status.STOPPED, Status.FAILED)


#: Which status may follow which. Anything not listed is a bug in the caller.
TRANSITIONS: dict[Status, frozenset[Status]] = {
    Status.QUEUED: frozenset({Status.PENDING, Status.STOPPING, Status.STOPPED, Status.FAILED}),
    Status.PENDING: frozenset({Status.STARTING, Status.STOPPING, Status.FAILED, Status.STOPPED}),
    Status.STARTING: frozenset({Status.RUNNING, Status.STOPPING, Status.FAILED}),
    Status.RUNNING: frozenset({Status.STOPPING, Status.FAILED}),
    Status.STOPPING: frozenset({Status.STOPPED, Status.FAILED}),
    Status.STOPPED: frozenset(),
    Status.FAILED: frozenset(),
}

LIVE = (Status.PENDING, Status.STARTING, Status.RUNNING, Status.STOPPING)


class Wanted(enum.StrEnum):
    """What the cluster should be doing. Suspended (no workers, scheduler kept) and queued
    (waiting for capacity) are the next states this list is meant to take."""

    RUNNING = "running"
    STOPPED = "stopped"


#: What every cluster id looks like; anything else is known not to exist without asking the
#: database (PostgreSQL refuses a NUL in a string outright).
CLUSTER_ID_PATTERN = r"^c-[0-9a-f]{1,32}$"


def new_cluster_id() -> str:
    return "c-" + secrets.token_hex(6)


@dataclass(frozen=True, slots=True)
class ClusterRecord:
    """One cluster as stored. Immutable: changes go through ``evolve`` and the store."""

    id: str
    tenant: str
    project: str
    status: Status
    worker_cores: float
    worker_memory: int
    scheduler_cores: float
    scheduler_memory: int
    workers_requested: int
    idle_timeout: float
    no_client_timeout: float
    adaptive_minimum: int | None = None
    adaptive_maximum: int | None = None
    env: dict[str, str] = field(default_factory=dict)
    image: str | None = None
    #: The named Python environment its processes run (None: the service's own).
    environment: str | None = None
    scheduler_address: str | None = None
    dashboard_url: str | None = None
    workers_running: int = 0
    wanted: Wanted = Wanted.RUNNING
    #: Why it ended (set when a stop is asked, or at the end), and for a failure what happened.
    stop_reason: StopReason | None = None
    stop_detail: str | None = None
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    stopped_at: float | None = None
    backend_state: dict[str, Any] = field(default_factory=dict)
    credentials: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.stop_reason is not None and not isinstance(self.stop_reason, StopReason):
            object.__setattr__(self, "stop_reason", StopReason(self.stop_reason))
        if not isinstance(self.wanted, Wanted):
            object.__setattr__(self, "wanted", Wanted(self.wanted))

    @property
    def stop_wanted(self) -> bool:
        return self.wanted == Wanted.STOPPED

    @property
    def outcome(self) -> Outcome | None:
        return Outcome(self.stop_reason, self.stop_detail) if self.stop_reason else None

    @property
    def adaptive(self) -> bool:
        return self.adaptive_maximum is not None

    @property
    def cores(self) -> float:
        """What this cluster holds of its tenant's quota."""
        if self.status.terminal:
            return 0.0
        return self.scheduler_cores + self.workers_requested * self.worker_cores

    @property
    def memory(self) -> int:
        if self.status.terminal:
            return 0
        return self.scheduler_memory + self.workers_requested * self.worker_memory

    def evolve(self, **changes: Any) -> ClusterRecord:
        if "status" in changes:
            new = Status(changes["status"])
            if new != self.status and new not in TRANSITIONS[self.status]:
                raise ValueError(f"cluster {self.id}: {self.status} -> {new} is not allowed")
            if new.terminal and self.stopped_at is None:
                changes.setdefault("stopped_at", time.time())
        return replace(self, **changes)
