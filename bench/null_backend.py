"""A backend that launches nothing, for measuring the control plane on its own.

Every cluster's "scheduler" is one shared in-process endpoint that answers the service's
report long-poll the way the real scheduler plugin does when nothing changes (hold the poll,
then return the same state), so the service keeps exactly the per-cluster connections and
tasks it keeps in production, with no process started.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from distributed.core import Server

from clusters.base import Backend, BackendEvents, ClusterSpec, SchedulerEndpoint


class ReportServer:
    """Answers ``provisioner_report`` for every cluster: busy, no changes, held until timeout."""

    def __init__(self) -> None:
        self.server = Server({"provisioner_report": self.report}, connection_limit=65536)
        self.address = ""

    async def start(self) -> str:
        await self.server.listen("tcp://127.0.0.1:0")
        self.address = self.server.address
        return self.address

    async def close(self) -> None:
        await self.server.close()

    async def report(self, version: int = -1, timeout: float = 30.0) -> dict[str, Any]:
        if version == 1:
            await asyncio.sleep(timeout)  # nothing ever changes
        return {"version": 1, "workers": [], "clients": 1, "busy": True, "idle_for": None,
                "no_client_for": None, "adaptive_target": 0}


class NullBackend(Backend):
    """Schedulers are "up" at once at the shared report endpoint; workers exist only by name."""

    name = "null"

    def __init__(self) -> None:
        self.reports = ReportServer()
        self._workers: dict[str, set[str]] = {}

    async def open(self, events: BackendEvents) -> None:
        await self.reports.start()

    async def close(self, stop_clusters: bool) -> None:
        await self.reports.close()

    async def recover(
        self, clusters: Sequence[tuple[ClusterSpec, dict[str, Any]]]
    ) -> dict[str, str | None]:
        return {spec.cluster_id: None for spec, _ in clusters}

    async def start_scheduler(self, spec: ClusterSpec) -> SchedulerEndpoint:
        return SchedulerEndpoint(self.reports.address)

    async def start_workers(self, spec: ClusterSpec, address: str, names: Sequence[str]) -> None:
        self._workers.setdefault(spec.cluster_id, set()).update(names)

    async def stop_workers(self, cluster_id: str, names: Sequence[str]) -> None:
        self._workers.get(cluster_id, set()).difference_update(names)

    async def stop_cluster(self, cluster_id: str) -> None:
        self._workers.pop(cluster_id, None)

    def live_workers(self, cluster_id: str) -> set[str]:
        return set(self._workers.get(cluster_id, ()))
