"""The Mesos backend's book of tasks: every task of every cluster as the backend believes it
to be, the states a task passes through, and how a task's end reads as a cluster's outcome.

A task's state is one of Mesos's own (``TASK_RUNNING``, ...) or one of ours around them:
waiting for an offer, sent in an ACCEPT, read back from the database after a restart, or said
ended by reconciliation while recovery waits to learn how.
"""

from __future__ import annotations

import asyncio
import enum
import re
from dataclasses import dataclass, field
from typing import Any

from clusters.base import REAP_REASONS, ClusterSpec, Outcome
from clusters.mesos.tasks import Kind


class TaskState(enum.StrEnum):
    # Ours.
    PENDING = "PENDING"  # waiting for an offer
    LAUNCHED = "LAUNCHED"  # sent in an ACCEPT, no update yet
    RECOVERING = "RECOVERING"  # read back from the database, not confirmed yet
    ENDED_UNCONFIRMED = "ENDED_UNCONFIRMED"  # a scheduler reconciliation says ended: how, not yet
    # Mesos's (``TaskState`` in mesos.proto).
    STAGING = "TASK_STAGING"
    STARTING = "TASK_STARTING"
    RUNNING = "TASK_RUNNING"
    KILLING = "TASK_KILLING"
    UNREACHABLE = "TASK_UNREACHABLE"
    FINISHED = "TASK_FINISHED"
    FAILED = "TASK_FAILED"
    KILLED = "TASK_KILLED"
    ERROR = "TASK_ERROR"
    LOST = "TASK_LOST"
    DROPPED = "TASK_DROPPED"
    GONE = "TASK_GONE"
    GONE_BY_OPERATOR = "TASK_GONE_BY_OPERATOR"
    UNKNOWN = "TASK_UNKNOWN"
    OTHER = "OTHER"  # a state this code does not know (a later Mesos's): not an end

    @classmethod
    def of(cls, text: object) -> TaskState:
        """A state from an update; one this code does not know is no end of the task."""
        try:
            return cls(str(text))
        except ValueError:
            return cls.OTHER

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({
    TaskState.FINISHED, TaskState.FAILED, TaskState.KILLED, TaskState.ERROR, TaskState.LOST,
    TaskState.DROPPED, TaskState.GONE, TaskState.GONE_BY_OPERATOR, TaskState.UNKNOWN,
})


def describe(status: dict[str, Any]) -> str:
    """A short human reason from a TaskStatus: state, Mesos reason and message."""
    text = str(status.get("state", "TASK_UNKNOWN"))
    if status.get("reason") == "REASON_RECONCILIATION":
        return text + " (found by reconciliation)"
    if status.get("reason"):
        text += f" ({status['reason']})"
    if status.get("message"):
        text += f": {status['message']}"
    return text


def reaped_reason(status: dict[str, Any]) -> Outcome | None:
    """Why a scheduler task reaped itself, read from the exit status its executor reports
    (``clusters.base.REAP_EXIT_CODES``); None for any other end."""
    found = re.fullmatch(r"Command exited with status (\d{1,3})", str(status.get("message", "")))
    reason = REAP_REASONS.get(int(found.group(1))) if found else None
    return Outcome(reason) if reason else None


@dataclass
class TaskRef:
    """One task of a cluster as the backend believes it to be."""

    task_id: str
    kind: Kind
    agent_id: str | None = None
    host: str | None = None
    port: int | None = None
    dashboard_port: int | None = None
    state: TaskState = TaskState.PENDING
    #: monotonic time of the last status seen (reconciliation wants answers per round)
    seen: float = 0.0
    resources: tuple[float, float] = (0.0, 0.0)

    def as_dict(self) -> dict[str, Any]:
        return {"task_id": self.task_id, "agent_id": self.agent_id, "host": self.host,
                "port": self.port, "dashboard_port": self.dashboard_port,
                "cpus": self.resources[0], "mem": self.resources[1]}

    @classmethod
    def from_dict(cls, kind: Kind, data: dict[str, Any]) -> TaskRef:
        return cls(data["task_id"], kind, data.get("agent_id"), data.get("host"),
                   data.get("port"), data.get("dashboard_port"), state=TaskState.RECOVERING,
                   resources=(float(data.get("cpus") or 0), float(data.get("mem") or 0)))


@dataclass
class ClusterTasks:
    """One cluster's tasks and where its start, stop and recovery stand."""

    spec: ClusterSpec
    scheduler: TaskRef | None = None
    workers: dict[str, TaskRef] = field(default_factory=dict)
    #: task ids we asked to kill (or that were retired): their end is no loss
    stopping: set[str] = field(default_factory=set)
    starting: asyncio.Future[None] | None = None
    #: start_scheduler is in progress: a scheduler ending now is its failure, not a loss
    launching: bool = False
    stopped: bool = False
    recovering: bool = False
    #: how its scheduler ended, learnt while recovering
    lost: Outcome | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def tasks(self) -> list[TaskRef]:
        refs = list(self.workers.values())
        if self.scheduler is not None:
            refs.insert(0, self.scheduler)
        return refs

    def state(self) -> dict[str, Any]:
        return {
            "scheduler": self.scheduler.as_dict() if self.scheduler else None,
            "workers": {n: r.as_dict() for n, r in self.workers.items()},
        }

    def touch(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()


class TaskBook:
    """Every cluster's tasks, and which cluster each task id belongs to."""

    def __init__(self) -> None:
        self.clusters: dict[str, ClusterTasks] = {}
        self.index: dict[str, str] = {}  # task id -> cluster id

    def cluster(self, spec: ClusterSpec) -> ClusterTasks:
        """The cluster's entry (made on first use), with its spec brought up to date."""
        cluster = self.clusters.get(spec.cluster_id)
        if cluster is None:
            cluster = self.clusters[spec.cluster_id] = ClusterTasks(spec)
        cluster.spec = spec
        return cluster

    def ref(self, task_id: str) -> TaskRef | None:
        cluster_id = self.index.get(task_id)
        cluster = self.clusters.get(cluster_id) if cluster_id else None
        if cluster is None:
            return None
        if cluster.scheduler is not None and cluster.scheduler.task_id == task_id:
            return cluster.scheduler
        return cluster.workers.get(task_id)

    def used_by_role(self) -> dict[str, tuple[float, float]]:
        """CPUs and memory each role's launched tasks hold (for fair placement)."""
        used: dict[str, list[float]] = {}
        for cluster in self.clusters.values():
            for ref in cluster.tasks():
                if ref.state != TaskState.PENDING:
                    acc = used.setdefault(cluster.spec.role, [0.0, 0.0])
                    acc[0] += ref.resources[0]
                    acc[1] += ref.resources[1]
        return {role: (v[0], v[1]) for role, v in used.items()}
