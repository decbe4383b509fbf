"""`MesosMaster`: the test master running inside the caller's event loop.

    async with MesosMaster(agents=[AgentSpec(cpus=4, mem=8192)]) as master:
        ... talk to master.url ...

Leaving the context closes all streams and SIGKILLs every task process, also when the
test body raised.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from types import TracebackType

from .api import MasterAPI
from .httpserver import HTTPServer
from .master import Master, MasterConfig
from .model import AgentSpec, Framework, Task


class MesosMaster:
    """A Mesos master + agents double speaking the v1 scheduler HTTP API on loopback."""

    def __init__(
        self,
        agents: list[AgentSpec] | int = 1,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        heartbeat_interval: float = 15.0,
        allocation_interval: float = 1.0,
        update_retry_interval: float = 10.0,
        update_retry_max: float = 600.0,
        run_processes: bool = True,
        chunk_size: int | None = None,
        quotas: dict[str, dict[str, float]] | None = None,
        weights: dict[str, float] | None = None,
        allowed_roles: set[str] | None = None,
        redirect_to: str | None = None,
        credentials: dict[str, str] | None = None,
        work_dir: str | None = None,
        seed: int | None = None,
        offer_timeout: float | None = None,
    ) -> None:
        specs = [AgentSpec() for _ in range(agents)] if isinstance(agents, int) else list(agents)
        self.config = MasterConfig(
            heartbeat_interval=heartbeat_interval,
            allocation_interval=allocation_interval,
            update_retry_interval=update_retry_interval,
            update_retry_max=update_retry_max,
            run_processes=run_processes,
            chunk_size=chunk_size,
            allowed_roles=frozenset(allowed_roles) if allowed_roles is not None else None,
            hostname=host,
            seed=seed,
            offer_timeout=offer_timeout,
        )
        self._own_work_dir = work_dir is None
        if work_dir is not None:
            os.makedirs(work_dir, exist_ok=True)
            work_dir = tempfile.mkdtemp(prefix="mesos-master-", dir=work_dir)
        self.work_dir = work_dir or tempfile.mkdtemp(prefix="mesos-master-")
        self.master = Master(self.config, self.work_dir, specs, quotas, weights)
        if redirect_to is not None:
            self.master.leading = False
            self.master.redirect_to = redirect_to
        self._server = HTTPServer(MasterAPI(self.master, credentials), host, port)
        self.host = host
        self._started = False

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> MesosMaster:
        await self._server.start()
        self.master.port = self._server.port
        self.master.start()
        self._started = True
        return self

    async def close(self) -> None:
        """Idempotent: streams ended, task processes killed, port and work dir released."""
        if not self._started:
            return
        self._started = False
        try:
            await self.master.close()
        finally:
            await self._server.close()
            if self._own_work_dir:
                shutil.rmtree(self.work_dir, ignore_errors=True)

    async def __aenter__(self) -> MesosMaster:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @property
    def port(self) -> int:
        return self._server.port

    @property
    def address(self) -> str:
        """`host:port`, the form the service's settings take."""
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # ------------------------------------------------------------------ introspection
    @property
    def agent_ids(self) -> list[str]:
        return list(self.master.agents)

    def framework(self, framework_id: str) -> Framework:
        return self.master.frameworks[framework_id]

    def task(self, task_id: str, framework_id: str | None = None) -> Task:
        return self.master.find_task(task_id, framework_id)

    def task_pid(self, task_id: str, framework_id: str | None = None) -> int | None:
        executor = self.task(task_id, framework_id).executor
        return executor.pid if executor is not None else None

    def state(self) -> dict:
        return self.master.state()

    # ------------------------------------------------------------------ fault hooks
    def drop_framework_stream(self, framework_id: str) -> None:
        """Break the subscription connection (the framework becomes disconnected)."""
        self.master.drop_stream(framework_id)

    def remove_agent(self, agent_id: str, reason: str = "REASON_AGENT_REMOVED") -> None:
        """Lose an agent: FAILURE, TASK_LOST (no uuid) for its tasks, processes killed, RESCIND."""
        self.master.remove_agent(agent_id, reason)

    def add_agent(self, spec: AgentSpec | None = None) -> str:
        return self.master.add_agent(spec)

    def kill_task_process(self, task_id: str, framework_id: str | None = None, sig: int = signal.SIGKILL) -> None:
        """Make the task's process die on its own (-> TASK_FAILED)."""
        self.master.kill_task_process(task_id, framework_id, sig)

    def set_quota(self, role: str, **limits: float) -> None:
        """`set_quota("tenant-a", cpus=2, mem=4096)`; no limits removes the quota."""
        self.master.set_quota(role, limits or None)

    def fail_over(self) -> None:
        """Leader change: streams end, offers vanish, tasks keep running; re-SUBSCRIBE re-adopts."""
        self.master.fail_over()

    def rescind_offer(self, offer_id: str) -> None:
        self.master.rescind_offer(offer_id)

    def set_leader(self, leading: bool = True, redirect_to: str | None = None) -> None:
        """Non-leading: scheduler calls get 307 to `redirect_to`, or 503 without it."""
        self.master.leading = leading
        self.master.redirect_to = redirect_to
