"""A backend that launches nothing, for measuring the control plane on its own.

Every cluster's "scheduler" is one shared in-process endpoint that answers the service's
report long-poll the way the real scheduler plugin does when nothing changes (hold the poll,
then return the same state), so the service keeps exactly the per-cluster connections and
tasks it keeps in production, with no process started.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any

from tornado import web
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from clusters.base import Backend, BackendEvents, ClusterSpec, SchedulerEndpoint
from clusters.plugin import CONTROL_PREFIX


class _Report(web.RequestHandler):
    async def get(self) -> None:
        if self.get_query_argument("version", "-1") == "1":
            await asyncio.sleep(float(self.get_query_argument("timeout", "30")))  # nothing changes
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"version": 1, "workers": [], "clients": 1, "busy": True,
                                "idle_for": None, "no_client_for": None, "adaptive_target": 0}))


class ReportServer:
    """Answers the report long-poll of every cluster over plain HTTP, as a scheduler's plugin
    does (clusters.plugin): busy, no changes, held until the timeout."""

    def __init__(self) -> None:
        self.server = HTTPServer(web.Application([(CONTROL_PREFIX + "/report", _Report)]))
        self.url = ""

    async def start(self) -> str:
        sockets = bind_sockets(0, "127.0.0.1")
        self.server.add_sockets(sockets)
        self.url = f"http://127.0.0.1:{sockets[0].getsockname()[1]}"
        return self.url

    async def close(self) -> None:
        self.server.stop()
        await self.server.close_all_connections()


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

    async def start_scheduler(self, spec: ClusterSpec,
                              workers: Sequence[str] = ()) -> SchedulerEndpoint:
        return SchedulerEndpoint("tcp://127.0.0.1:1", self.reports.url)

    async def start_workers(self, spec: ClusterSpec, address: str, names: Sequence[str]) -> None:
        self._workers.setdefault(spec.cluster_id, set()).update(names)

    async def stop_workers(self, cluster_id: str, names: Sequence[str]) -> None:
        self._workers.get(cluster_id, set()).difference_update(names)

    async def stop_cluster(self, cluster_id: str) -> None:
        self._workers.pop(cluster_id, None)

    def live_workers(self, cluster_id: str) -> set[str]:
        return set(self._workers.get(cluster_id, ()))
