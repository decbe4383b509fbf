"""The backend interface: a small set of operations that fit OS processes and Mesos tasks alike.

The core calls these; a backend reports exits and state changes back through
:class:`BackendEvents`. Operations are idempotent so the reconciler can repeat them after a
crash without harm.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol


class LaunchError(Exception):
    """A scheduler or worker could not be started; the message is the reason shown to users."""


@dataclass(frozen=True, slots=True)
class BatchPlacement:
    """Where a batch system (Slurm) runs a tenant's jobs, and as which Unix user."""

    user: str
    account: str
    partition: str | None = None
    qos: str | None = None


@dataclass(frozen=True, slots=True)
class ClusterSpec:
    """What to run for one cluster, in plain terms."""

    cluster_id: str
    tenant: str
    role: str
    worker_cores: float
    worker_memory: int
    scheduler_cores: float
    scheduler_memory: int
    env: dict[str, str] = field(default_factory=dict)
    image: str | None = None
    #: PEM texts for per-cluster TLS (``ca``, ``cert``, ``key``); empty means plain TCP.
    credentials: dict[str, str] = field(default_factory=dict)
    #: The cluster's own reaping rules, which its scheduler enforces by itself once the
    #: service has not been in touch for ``lease`` seconds (0: never), so a cluster is not
    #: left behind by a service that died for good.
    idle_timeout: float = 0
    no_client_timeout: float = 0
    lease: float = 0
    #: The interpreter its processes run (a registered environment's ``bin/python``); None:
    #: the service's own.
    python: str | None = None
    #: The tenant's Slurm user, account, partition and QOS (the Slurm backend's).
    batch: BatchPlacement | None = None


#: A worker that ended itself for using more memory than its limit exits with this status.
MEMORY_EXIT_CODE = 137

#: The variable a launched runner reads its options from (``env:`` on its command line):
#: they hold the cluster's TLS key, so they never go into argv, which anyone can read.
OPTIONS_VAR = "DASK_PROVISIONER_OPTIONS"

#: Like Dask's nanny: one BLAS thread per task thread, and memory given back to the OS.
WORKER_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MALLOC_TRIM_THRESHOLD_": "65536",
}

class StopReason(enum.StrEnum):
    """Why a cluster ended: the one list every path that ends a cluster chooses from."""

    USER = "user"
    IDLE = "idle"
    NO_CLIENT = "no-client"
    SHUTDOWN = "service-shutdown"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a cluster ended: a reason and, for a failure, what happened (plain text the
    service wrote, from the backend's facts; never text a cluster process sent)."""

    reason: StopReason
    detail: str | None = None

    @classmethod
    def failed(cls, detail: str) -> Outcome:
        return cls(StopReason.FAILED, detail)

    @property
    def is_failure(self) -> bool:
        return self.reason == StopReason.FAILED

    def summary(self) -> str:
        """One line for people: ``idle``, ``failed: scheduler exited with status 1``."""
        return f"{self.reason.value}: {self.detail}" if self.detail else self.reason.value


#: A scheduler that reaped itself exits with one of these statuses (any other end is a kill,
#: or status 3); a small enum, since everything a cluster process says is the tenant's to forge.
REAP_EXIT_CODES = {StopReason.IDLE: 80, StopReason.NO_CLIENT: 81}
REAP_REASONS = {code: reason for reason, code in REAP_EXIT_CODES.items()}
#: The local backend may be away when a scheduler reaps itself (its exit status then reaches
#: no one), so the scheduler also writes its reason, one word, to this file in its folder.
REAPED_FILE = ".reaped"


@dataclass(frozen=True, slots=True)
class SchedulerEndpoint:
    """Where a scheduler listens: Dask's address, and the base URL of its HTTP server (the
    dashboard, under :func:`clusters.runner.dashboard_prefix`, and the service's control
    routes of :mod:`clusters.plugin`)."""

    address: str
    http_url: str | None = None

    @classmethod
    def of(cls, host: str, port: object, http_port: object, tls: bool) -> SchedulerEndpoint:
        """Build the endpoint from a host the backend chose and ports a process reported:
        the ports are checked (the process runs tenant code), the rest is ours."""
        from distributed.comm.addressing import unparse_host_port

        for value in (port, http_port):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
                raise LaunchError(f"scheduler reported an invalid port {str(value)[:20]!r}")
        assert isinstance(port, int) and isinstance(http_port, int)
        scheme = "tls" if tls else "tcp"
        return cls(f"{scheme}://{unparse_host_port(host, port)}",
                   f"{'https' if tls else 'http'}://{unparse_host_port(host, http_port)}")


#: Key of a cluster's saved backend state naming the backend that made it.
BACKEND_KEY = "backend"


def backend_of(state: dict[str, Any] | None) -> str | None:
    """Which backend made a cluster's saved state: its ``backend`` tag, or, for a state saved
    before tags, its shape (Mesos tasks have task ids, local processes pids); None when
    nothing was launched yet (any backend may start it)."""
    if not isinstance(state, dict):
        return None
    tag = state.get(BACKEND_KEY)
    if isinstance(tag, str):
        return tag
    refs = [state.get("scheduler"), *((state.get("workers") or {}).values()
                                      if isinstance(state.get("workers"), dict) else [])]
    for ref in refs:
        if isinstance(ref, dict):
            if "job_id" in ref:
                return "slurm"
            if "task_id" in ref:
                return "mesos"
            if "pid" in ref:
                return "local"
    return None


class BackendEvents(Protocol):
    """How a backend tells the core what happened. All are safe to call more than once."""

    async def state_changed(self, cluster_id: str, state: dict[str, Any]) -> None:
        """Persist the backend's state of this cluster (process ids, task ids, ...)."""

    async def scheduler_lost(self, cluster_id: str, outcome: Outcome) -> None:
        """The scheduler is gone without being asked to stop: reaped itself, or failed."""

    async def worker_lost(self, cluster_id: str, name: str, reason: str) -> None:
        """A worker is gone without being asked to stop."""

    async def load_backend_state(self) -> dict[str, Any] | None:
        """The backend's own state (not a cluster's: a Mesos framework id), kept in the
        service's database so that a fresh machine with the same database carries on."""

    async def save_backend_state(self, state: dict[str, Any] | None) -> None:
        """Replace the backend's own state; None forgets it."""


class Backend(abc.ABC):
    """Starts and stops the processes (or tasks) of clusters."""

    name: str = "abstract"

    @abc.abstractmethod
    async def open(self, events: BackendEvents) -> None:
        """Connect (to Mesos, to a fork server, ...) and start reporting events."""

    @abc.abstractmethod
    async def close(self, stop_clusters: bool) -> None:
        """Stop reporting; stop every cluster's processes too if ``stop_clusters``."""

    @abc.abstractmethod
    async def recover(self, clusters: Sequence[tuple[ClusterSpec, dict[str, Any]]],
                      ) -> dict[str, Outcome | None]:
        """Re-adopt clusters after a restart; kill anything of ours not in ``clusters``.

        Returns, per cluster id, None if its scheduler is alive (and now watched again) or
        how it ended.
        """

    @abc.abstractmethod
    async def start_scheduler(self, spec: ClusterSpec,
                              workers: Sequence[str] = ()) -> SchedulerEndpoint:
        """Start the scheduler and return once it accepts connections. A backend may start
        ``workers`` (Dask names) along with it, to find it on their own: those it started are
        in :meth:`live_workers` after; the others the core starts once it runs."""

    @abc.abstractmethod
    async def start_workers(self, spec: ClusterSpec, address: str, names: Sequence[str]) -> None:
        """Ask for workers with these Dask names; they connect to ``address`` on their own."""

    @abc.abstractmethod
    async def stop_workers(self, cluster_id: str, names: Sequence[str]) -> None:
        """Stop these workers (already retired in Dask, or being replaced)."""

    @abc.abstractmethod
    async def stop_cluster(self, cluster_id: str) -> None:
        """Stop the scheduler and every worker of the cluster; idempotent."""

    @abc.abstractmethod
    def live_workers(self, cluster_id: str) -> set[str]:
        """Names of workers launched and not known to have exited."""

    def waiting(self, cluster_id: str) -> str | None:
        """Why some of the cluster's processes wait to run (a batch queue's reason), if any."""
        return None
