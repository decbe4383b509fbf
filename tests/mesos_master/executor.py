"""The built-in command executor of a simulated agent: runs one task as a real process.

Each task gets its own sandbox directory and process group, a clean environment (only
PATH/HOME/LANG of the master's, plus the MESOS_* variables and the task's own), and the
state sequence of Mesos's command executor: STARTING, RUNNING, then FINISHED / FAILED /
KILLED with the same messages.  A process-less mode keeps the states but runs nothing,
for benchmarks that simulate many clusters.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import os
import signal
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

from .fetcher import FetchError, fetch_all

DEFAULT_GRACE = 3.0
BASE_ENV_KEYS = ("PATH", "HOME", "LANG")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PR_SET_PDEATHSIG = 1

# emit(state, message, reason, extra fields) -> None
Emit = Callable[[str, str | None, str | None, dict[str, Any]], None]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Ask Linux to SIGKILL the task if the master process dies without cleaning up."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


# Process groups of live tasks, SIGKILLed at interpreter exit if nobody closed the master.
_LIVE_GROUPS: set[int] = set()


@atexit.register
def _kill_leftovers() -> None:
    for pid in list(_LIVE_GROUPS):
        _signal_group(pid, signal.SIGKILL)


def _signal_group(pid: int, sig: int) -> None:
    if pid <= 0:  # never signal our own process group by accident
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _open_logs(sandbox: str) -> tuple[BinaryIO, BinaryIO]:
    """The task's stdout/stderr files in its sandbox, as Mesos keeps them."""
    out = open(os.path.join(sandbox, "stdout"), "ab")
    err = open(os.path.join(sandbox, "stderr"), "ab")
    return out, err


def describe_exit(returncode: int) -> str:
    """Mesos's wording for a wait status."""
    if returncode < 0:
        return f"Command terminated with signal {signal.strsignal(-returncode)}"
    return f"Command exited with status {returncode}"


@dataclass
class TaskContext:
    """What the agent tells the executor about the task it runs."""

    task_info: dict[str, Any]
    framework_id: str
    agent_id: str
    agent_endpoint: str
    role: str
    sandbox: str
    run_processes: bool
    task_killing_state: bool


def build_environment(ctx: TaskContext) -> dict[str, str]:
    """Minimal base + agent variables + the task's command.environment (task wins)."""
    env = {k: os.environ[k] for k in BASE_ENV_KEYS if k in os.environ}
    env.setdefault("PATH", DEFAULT_PATH)
    task_id = ctx.task_info["task_id"]["value"]
    env.update(
        {
            "MESOS_SANDBOX": ctx.sandbox,
            "MESOS_DIRECTORY": ctx.sandbox,
            "MESOS_FRAMEWORK_ID": ctx.framework_id,
            "MESOS_EXECUTOR_ID": task_id,
            "MESOS_TASK_ID": task_id,
            "MESOS_AGENT_ID": ctx.agent_id,
            "MESOS_AGENT_ENDPOINT": ctx.agent_endpoint,
            "MESOS_ALLOCATION_ROLE": ctx.role,
        }
    )
    command = ctx.task_info.get("command") or {}
    for var in (command.get("environment") or {}).get("variables") or []:
        if var.get("type", "VALUE") in ("VALUE", "UNKNOWN") and "value" in var:
            env[var["name"]] = var["value"]
    return env


def build_argv(task_info: dict[str, Any]) -> list[str]:
    command = task_info.get("command") or {}
    if command.get("shell", True):
        return ["/bin/sh", "-c", command.get("value", "")]
    args = list(command.get("arguments") or [])
    value = command.get("value", "")
    return [value, *args[1:]] if args else [value]


class CommandExecutor:
    """Runs one command task and reports its states through `emit`."""

    def __init__(self, ctx: TaskContext, emit: Emit) -> None:
        self.ctx = ctx
        self._emit = emit
        self.pid: int | None = None
        self._started = False
        self._grace = DEFAULT_GRACE
        self.container_id = str(uuid.uuid4())
        self._killing = False
        self._kill_requested = asyncio.Event()
        self._destroyed = False
        self._expired = False
        self._escalation: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    @property
    def done(self) -> bool:
        return self._task is None or self._task.done()

    async def wait(self) -> None:
        if self._task is not None:
            with contextlib.suppress(BaseException):
                await self._task

    # ------------------------------------------------------------------ control
    def kill(self, grace: float) -> None:
        """KILL from the scheduler: TASK_KILLING (if capable), SIGTERM, SIGKILL after grace."""
        if self._killing or self._destroyed:
            return
        self._killing = True
        self._grace = grace
        if self.ctx.task_killing_state and self._started:
            self._emit("TASK_KILLING", None, None, {})
        self._kill_requested.set()
        if self.pid is not None and self.pid > 0:
            _signal_group(self.pid, signal.SIGTERM)
            pid = self.pid
            self._escalation = asyncio.get_running_loop().call_later(
                max(grace, 0.0), _signal_group, pid, signal.SIGKILL
            )

    def signal_process(self, sig: int = signal.SIGKILL) -> bool:
        """Fault hook: signal the task's process group as if it died on its own."""
        if not self._started or self.done:
            return False
        if self.pid is not None and self.pid > 0:
            _signal_group(self.pid, sig)
        else:
            self._kill_requested.set()
        return True

    def destroy(self) -> None:
        """Agent gone or shutting down: SIGKILL now and report nothing more."""
        self._destroyed = True
        self._kill_requested.set()
        if self.pid is not None and self.pid > 0:
            _signal_group(self.pid, signal.SIGKILL)

    # ------------------------------------------------------------------ lifecycle
    def _report(self, state: str, message: str | None = None, reason: str | None = None, **extra: Any) -> None:
        if not self._destroyed:
            self._emit(state, message, reason, extra)

    def _container_status(self) -> dict[str, Any]:
        status: dict[str, Any] = {
            "container_id": {"value": self.container_id},
            "network_infos": [{"ip_addresses": [{"ip_address": "127.0.0.1"}]}],
        }
        if self.pid is not None:
            status["executor_pid"] = self.pid
        return status

    async def _run(self) -> None:
        try:
            await self._run_inner()
        finally:
            if self._escalation is not None:
                self._escalation.cancel()

    async def _run_inner(self) -> None:
        if self._destroyed:
            return
        if self._killing:
            self._report("TASK_KILLED", "Task killed before it was launched", "REASON_TASK_KILLED_DURING_LAUNCH")
            return
        if not self.ctx.run_processes:
            self._report("TASK_STARTING")
            await self._run_without_process()
            return
        uris = (self.ctx.task_info.get("command") or {}).get("uris") or []
        if uris:
            try:
                await asyncio.to_thread(fetch_all, uris, self.ctx.sandbox)
            except FetchError as exc:
                self._report(
                    "TASK_FAILED",
                    f"Failed to launch container: Failed to fetch all URIs for container '{self.container_id}': {exc}",
                    "REASON_CONTAINER_LAUNCH_FAILED",
                )
                return
        if self._destroyed:
            return
        self._report("TASK_STARTING")
        env = build_environment(self.ctx)
        argv = build_argv(self.ctx.task_info)
        out, err = _open_logs(self.ctx.sandbox)
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                cwd=self.ctx.sandbox,
                env=env,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        except OSError as exc:
            self._report("TASK_FAILED", f"Failed to launch container: {exc}", "REASON_CONTAINER_LAUNCH_FAILED")
            return
        finally:
            out.close()
            err.close()
        self.pid = proc.pid
        _LIVE_GROUPS.add(proc.pid)
        self._started = True
        if self._destroyed:
            _signal_group(proc.pid, signal.SIGKILL)
        elif self._killing:
            self._killing = False
            self.kill(self._grace)
        else:
            self._report("TASK_RUNNING", container_status=self._container_status())
        deadline = self._max_completion_timer()
        try:
            returncode = await proc.wait()
        except asyncio.CancelledError:
            _signal_group(proc.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(proc.wait(), 2)
            _LIVE_GROUPS.discard(proc.pid)
            raise
        finally:
            if deadline is not None:
                deadline.cancel()
        # Like a container being destroyed: nothing of the task outlives its main process.
        _signal_group(proc.pid, signal.SIGKILL)
        _LIVE_GROUPS.discard(proc.pid)
        message = describe_exit(returncode)
        if self._expired:
            self._report(
                "TASK_FAILED", "Task has exceeded its max completion time", "REASON_MAX_COMPLETION_TIME_REACHED"
            )
        elif self._killing:
            self._report("TASK_KILLED", message)
        elif returncode == 0:
            self._report("TASK_FINISHED", message)
        else:
            self._report("TASK_FAILED", message)

    def _max_completion_timer(self) -> asyncio.TimerHandle | None:
        nanos = (self.ctx.task_info.get("max_completion_time") or {}).get("nanoseconds")
        if nanos is None:
            return None

        def expire() -> None:
            if not self._killing and not self._destroyed:
                self._expired = True
                self._killing = True
                self._kill_requested.set()
                if self.pid:
                    _signal_group(self.pid, signal.SIGTERM)
                    asyncio.get_running_loop().call_later(self._grace, _signal_group, self.pid, signal.SIGKILL)

        return asyncio.get_running_loop().call_later(max(0.0, int(nanos) / 1e9), expire)

    async def _run_without_process(self) -> None:
        self._started = True
        self._report("TASK_RUNNING", container_status=self._container_status())
        deadline = self._max_completion_timer()
        await self._kill_requested.wait()
        if deadline is not None:
            deadline.cancel()
        if self._expired:
            self._report(
                "TASK_FAILED", "Task has exceeded its max completion time", "REASON_MAX_COMPLETION_TIME_REACHED"
            )
        elif self._killing:
            self._report("TASK_KILLED", "Command terminated with signal Terminated")
        else:
            self._report("TASK_FAILED", "Command terminated with signal Killed")
