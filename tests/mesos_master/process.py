"""`MesosMasterProcess`: the CLI master in a subprocess, with the fault hooks over HTTP.

For tests whose service under test runs in another process, or that must not share an
event loop with the master.  The child asks Linux to SIGTERM it if the test process dies,
and `stop()` (also on `with` exit) sends SIGTERM, then SIGKILL if it lingers.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]


def _parent_death_signal() -> None:  # pragma: no cover - runs in the child
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


class MesosMasterProcess:
    """Runs `python -m tests.mesos_master` on a free port; `url` once it is listening."""

    def __init__(
        self,
        *,
        agents: int = 1,
        agent_cpus: float = 4.0,
        agent_mem: float = 8192.0,
        agent_disk: float = 10240.0,
        heartbeat: float = 15.0,
        allocation_interval: float = 1.0,
        retry_interval: float = 10.0,
        retry_max: float = 600.0,
        run_processes: bool = True,
        chunk_size: int | None = None,
        quotas: dict[str, dict[str, float]] | None = None,
        port: int = 0,
        extra_args: list[str] | None = None,
        startup_timeout: float = 30.0,
        env: dict[str, str] | None = None,
    ) -> None:
        args = [
            sys.executable, "-m", "tests.mesos_master",
            "--port", str(port),
            "--agents", str(agents),
            "--agent-cpus", str(agent_cpus),
            "--agent-mem", str(agent_mem),
            "--agent-disk", str(agent_disk),
            "--heartbeat", str(heartbeat),
            "--allocation-interval", str(allocation_interval),
            "--retry-interval", str(retry_interval),
            "--retry-max", str(retry_max),
        ]  # fmt: skip
        if not run_processes:
            args.append("--no-processes")
        if chunk_size:
            args += ["--chunk-size", str(chunk_size)]
        for role, limits in (quotas or {}).items():
            args += ["--quota", f"{role}:" + ",".join(f"{k}={v}" for k, v in limits.items())]
        self.args = args + list(extra_args or [])
        self.startup_timeout = startup_timeout
        self.env = env
        self.proc: subprocess.Popen[str] | None = None
        self.url: str = ""
        self.output: list[str] = []
        self._pump: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> MesosMasterProcess:
        env = dict(os.environ if self.env is None else self.env)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        self.proc = subprocess.Popen(
            self.args,
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            preexec_fn=_parent_death_signal,
        )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + self.startup_timeout
        found = threading.Event()

        def pump() -> None:
            assert self.proc is not None and self.proc.stdout is not None
            for line in self.proc.stdout:
                line = line.rstrip("\n")
                self.output.append(line)
                if not self.url and line.startswith("http://"):
                    self.url = line.strip()
                    found.set()
            found.set()

        self._pump = threading.Thread(target=pump, daemon=True, name="mesos-master-output")
        self._pump.start()
        found.wait(max(0.0, deadline - time.monotonic()))
        if not self.url:
            self.stop()
            raise RuntimeError("mesos test master did not start:\n" + "\n".join(self.output[-30:]))
        return self

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM (the master kills its tasks), SIGKILL after `timeout`."""
        if self.proc is None:
            return None
        groups: list[int] = []
        if self.proc.poll() is None:
            groups = self._task_groups()
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.returncode != 0:
            # The master did not clean up after itself: kill its tasks' groups here.
            for pgid in groups:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pgid, signal.SIGKILL)
        if self._pump is not None:
            self._pump.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode

    def _task_groups(self) -> list[int]:
        """Process groups of the master's live tasks (each task leads its own group)."""
        try:
            state = httpx.get(f"{self.url}/state", timeout=2).json()
        except (httpx.HTTPError, ValueError):
            return []
        frameworks = state.get("frameworks", [])
        return [t["pid"] for fw in frameworks for t in fw.get("tasks", []) if t.get("pid")]

    def __enter__(self) -> MesosMasterProcess:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def address(self) -> str:
        return self.url.removeprefix("http://")

    # ------------------------------------------------------------------ hooks over HTTP
    def _hook(self, name: str, **args: Any) -> dict[str, Any]:
        resp = httpx.post(f"{self.url}/test/{name}", json=args, timeout=10)
        if resp.status_code != 200:
            raise RuntimeError(f"test hook {name} failed: {resp.status_code} {resp.text}")
        return resp.json()

    def state(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/state", timeout=10).json()

    def drop_framework_stream(self, framework_id: str) -> None:
        self._hook("drop_framework_stream", framework_id=framework_id)

    def remove_agent(self, agent_id: str, reason: str = "REASON_AGENT_REMOVED") -> None:
        self._hook("remove_agent", agent_id=agent_id, reason=reason)

    def add_agent(
        self, cpus: float = 4.0, mem: float = 8192.0, disk: float = 10240.0, ports: list[tuple[int, int]] | None = None
    ) -> str:
        return self._hook("add_agent", cpus=cpus, mem=mem, disk=disk, ports=ports)["agent_id"]

    def kill_task_process(self, task_id: str, framework_id: str | None = None, sig: str = "SIGKILL") -> None:
        self._hook("kill_task_process", task_id=task_id, framework_id=framework_id, signal=sig)

    def set_quota(self, role: str, **limits: float) -> None:
        self._hook("set_quota", role=role, limits=limits or None)

    def fail_over(self) -> None:
        self._hook("fail_over")

    def rescind_offer(self, offer_id: str) -> None:
        self._hook("rescind_offer", offer_id=offer_id)

    def set_leader(self, leading: bool = True, redirect_to: str | None = None) -> None:
        self._hook("set_leader", leading=leading, redirect_to=redirect_to)
