"""TaskInfo for Dask schedulers and workers as executor-less Mesos command tasks.

The runner's options (with TLS keys for secure clusters) travel in an environment variable
that the runner reads itself (``env:NAME``), so they do not show up in process listings.
"""

from __future__ import annotations

import json
import math
import shlex
from dataclasses import dataclass, field
from typing import Any, Literal

from clusters.base import OPTIONS_VAR, WORKER_ENV

MiB = 2**20

Kind = Literal["scheduler", "worker"]


@dataclass
class TaskRequest:
    """A task waiting for an offer: what it needs and how to describe it once placed."""

    task_id: str
    cluster_id: str
    tenant: str
    kind: Kind
    role: str
    cpus: float
    mem: float  # MB, as Mesos counts memory
    options: dict[str, Any]
    env: dict[str, str] = field(default_factory=dict)
    image: str | None = None
    ports: int = 1
    #: The interpreter on the agent (a registered environment's); None: the backend's command.
    python: str | None = None

    def fits(self, cpus: float, mem: float, ports: int) -> bool:
        return self.cpus <= cpus + 1e-9 and self.mem <= mem + 1e-9 and self.ports <= ports


def mesos_mem(nbytes: int) -> float:
    """Bytes -> whole MB (Mesos's unit), never below what the process is promised."""
    return float(max(32, math.ceil(nbytes / MiB)))


def mesos_cpus(cores: float) -> float:
    """Mesos keeps three decimals; round up so the task never gets less than asked."""
    return math.ceil(cores * 1000 - 1e-6) / 1000


@dataclass(frozen=True)
class TaskSettings:
    """The backend's knobs that shape every TaskInfo."""

    command: str = "python -m clusters.runner"
    kill_grace: float = 10.0
    death_timeout: float = 60.0


def command_of(request: TaskRequest, settings: TaskSettings) -> str:
    """What starts the runner: the environment's interpreter when the cluster names one."""
    if request.python:
        return f"{shlex.quote(request.python)} -m clusters.runner"
    return settings.command


def task_info(request: TaskRequest, agent_id: str, hostname: str,
              resources: list[dict[str, Any]], ports: list[int],
              settings: TaskSettings) -> dict[str, Any]:
    """The TaskInfo JSON to LAUNCH ``request`` on this agent with these offer resources."""
    options = dict(request.options, host=hostname)
    if ports:
        options["port"] = ports[0]
    if request.kind == "scheduler" and len(ports) > 1:
        options["dashboard_port"] = ports[1]
    env = {}
    if request.kind == "worker":
        env.update(WORKER_ENV)
    env.update(request.env)
    env[OPTIONS_VAR] = json.dumps(options, separators=(",", ":"))
    info: dict[str, Any] = {
        "name": f"dask-{request.kind}-{request.cluster_id}",
        "task_id": {"value": request.task_id},
        "agent_id": {"value": agent_id},
        "resources": resources,
        "command": {
            "shell": True,
            "value": f"exec {command_of(request, settings)} {request.kind} env:{OPTIONS_VAR}",
            "environment": {"variables": [{"name": k, "value": v} for k, v in env.items()]},
        },
        "kill_policy": {"grace_period": {"nanoseconds": int(settings.kill_grace * 1e9)}},
        "labels": {"labels": [
            {"key": "dask-provisioner.cluster", "value": request.cluster_id},
            {"key": "dask-provisioner.tenant", "value": request.tenant},
            {"key": "dask-provisioner.kind", "value": request.kind},
        ]},
    }
    if request.image:
        info["container"] = {
            "type": "MESOS",
            "mesos": {"image": {"type": "DOCKER", "docker": {"name": request.image}}},
        }
    return info
