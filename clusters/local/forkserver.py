"""Launch schedulers and workers by forking them from a warm fork server (the zygote).

A fresh ``python -m clusters.runner`` spends most of a second importing distributed before
it can listen. The zygote (:mod:`clusters.local.zygote`) pays that once and forks a new
process per request, so a cluster process is up in milliseconds. Everything else is the same
as :class:`~clusters.local.spawn.ProcessLauncher`: the same ready pipe and report, the same
handles, the same exit watching by pidfd. If the zygote cannot be started or dies, launches
fall back to spawning, so a broken fork server costs speed, never clusters.

The zygote carries the owner marker ``<owner>:forkserver`` in its environment. Its children
show that block in ``/proc/PID/environ`` (a forked process keeps its parent's initial
environment there, whatever ``os.environ`` says), so a restarted service still finds and
re-adopts them. The zygote itself is not a process-group leader, so it is never mistaken for
a cluster process, and it exits when the service's end of its socket closes.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import json
import logging
import os
import select
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from clusters.base import LaunchError
from clusters.local.procs import OWNER_VAR, ProcessRef, host_basics, ref_for, wait_exit
from clusters.local.spawn import LOG_FLAGS, ProcessLauncher, _read_line

logger = logging.getLogger("provisioner.local.forkserver")

ZYGOTE_FD = 3
LAUNCHER_VAR = "PROVISIONER_LOCAL_LAUNCHER"


class ZygoteError(Exception):
    """The fork server is not usable; launches fall back to spawning."""


class _Zygote:
    """One fork-server process and the service's end of its socket (blocking calls only)."""

    def __init__(self, python: str, env: dict[str, str], log: Path, start_timeout: float) -> None:
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            actions = [
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_OPEN, 1, str(log), LOG_FLAGS, 0o600),
                (os.POSIX_SPAWN_DUP2, 1, 2),
                (os.POSIX_SPAWN_DUP2, theirs.fileno(), ZYGOTE_FD),
            ]
            argv = [python, "-m", "clusters.local.zygote"]
            self.pid = os.posix_spawn(python, argv, env, file_actions=actions)
        except OSError:
            self.sock.close()
            raise
        finally:
            theirs.close()
        ready, _, _ = select.select([self.sock], [], [], start_timeout)
        hello = self.sock.recv(4096) if ready else b""
        if not hello:
            self.stop()
            raise ZygoteError(f"fork server did not start (see {log})")

    def fork(self, request: dict[str, Any], ready_fd: int) -> int:
        """Have the zygote fork; the request travels in a memfd that only the child reads."""
        payload = os.memfd_create("dask-provisioner-request", os.MFD_CLOEXEC)
        try:
            data = json.dumps(request).encode()
            written = 0
            while written < len(data):
                written += os.write(payload, data[written:])
            rights = array.array("i", [ready_fd, payload]).tobytes()
            self.sock.sendmsg([b"fork"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)])
        finally:
            os.close(payload)
        reply = self.sock.recv(4096)
        if not reply:
            raise ZygoteError("fork server closed its socket")
        answer = json.loads(reply)
        if "pid" not in answer:
            raise LaunchError(f"fork server: {answer.get('error', answer)}")
        return int(answer["pid"])

    def alive(self) -> bool:
        with contextlib.suppress(ChildProcessError):
            return os.waitpid(self.pid, os.WNOHANG)[0] == 0
        return False

    def stop(self, timeout: float = 5.0) -> None:
        """Close our end (the zygote exits on EOF) and reap it; SIGKILL if it lingers."""
        self.sock.close()
        deadline = time.monotonic() + timeout
        while self.alive():
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(self.pid, 0)
                return
            time.sleep(0.01)


class ForkServerLauncher(ProcessLauncher):
    """A :class:`ProcessLauncher` whose processes are forked by the zygote instead of spawned.

    Requests to the zygote are short blocking socket calls made from a worker thread (like
    ``posix_spawn`` in the parent class), one at a time under a lock.

    At most ``starting`` processes are between fork and ready at once. A start is short but
    CPU-bound, and each cluster process leads its own session (its own scheduling group on
    kernels with autogroup), so twenty clusters started together would otherwise take the
    service's share of the CPU from it. Queued starts wait on the event loop, not in a thread.
    """

    #: Longest a worker that was not waited for may hold a start slot.
    WORKER_SLOT_HOLD = 5.0

    def __init__(self, owner: str, home: Path, python: str = sys.executable,
                 ready_timeout: float = 120.0, start_timeout: float = 60.0,
                 starting: int | None = None, runtime_env: dict[str, str] | None = None) -> None:
        super().__init__(python=python, ready_timeout=ready_timeout, runtime_env=runtime_env)
        self.owner = owner
        self.home = Path(home)
        self.start_timeout = start_timeout
        self.starting = starting or max(2, os.cpu_count() or 1)
        self._slots: asyncio.Semaphore | None = None
        self._holders: set[asyncio.Task[None]] = set()
        self._zygote: _Zygote | None = None
        self._broken = False
        self._lock = threading.Lock()
        self._warming: asyncio.Future[None] | None = None

    def zygote_environment(self) -> dict[str, str]:
        env = host_basics()
        env.update(self.runtime_env)
        env["HOME"] = str(self.home)
        env[OWNER_VAR] = f"{self.owner}:forkserver"
        return env

    @property
    def zygote_pid(self) -> int | None:
        return self._zygote.pid if self._zygote is not None else None

    def _ensure_zygote(self) -> _Zygote | None:
        """The running zygote, started if needed; None once it has failed to start."""
        if self._zygote is not None and not self._zygote.alive():
            logger.warning("fork server (pid %d) died; starting a new one", self._zygote.pid)
            self._zygote.stop()
            self._zygote = None
        if self._zygote is None and not self._broken:
            self.home.mkdir(parents=True, exist_ok=True)
            try:
                self._zygote = _Zygote(self.python, self.zygote_environment(),
                                       self.home / "forkserver.log", self.start_timeout)
            except (OSError, ZygoteError) as exc:
                logger.warning("fork server unavailable, spawning processes instead: %s", exc)
                self._broken = True
        return self._zygote

    def warm(self) -> None:
        """Start the zygote now so the first cluster does not wait for its imports."""
        with self._lock:
            self._ensure_zygote()

    async def start(self) -> None:
        """Begin warming in the background; launches queue behind it on the lock."""
        self._warming = asyncio.ensure_future(asyncio.to_thread(self.warm))

    def _spawn(self, role: str, options: dict[str, Any], env: dict[str, str], log: Path,
               write_fd: int) -> int:
        request = {"role": role, "options": options, "env": env, "log": str(log)}
        with self._lock:
            zygote = self._ensure_zygote()
            if zygote is not None:
                try:
                    return zygote.fork(request, write_fd)
                except (OSError, ZygoteError) as exc:
                    logger.warning("fork server failed (%s); spawning this %s instead", exc, role)
                    zygote.stop()
                    self._zygote = None
        return super()._spawn(role, options, env, log, write_fd)

    async def launch(
        self, role: str, options: dict[str, Any], env: dict[str, str], log: Path,
        wait_ready: bool = True,
    ) -> tuple[ProcessRef, dict[str, Any]]:
        """As :meth:`ProcessLauncher.launch`, holding a start slot until the process is ready."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.starting)
        await self._slots.acquire()
        if wait_ready:
            try:
                return await super().launch(role, options, env, log, wait_ready=True)
            finally:
                self._slots.release()
        try:
            read_fd, write_fd = os.pipe()
            try:
                pid = await asyncio.to_thread(self._spawn, role, options, env, log, write_fd)
            finally:
                os.close(write_fd)
        except BaseException:
            self._slots.release()
            with contextlib.suppress(NameError, OSError):
                os.close(read_fd)
            raise
        ref = ref_for(pid) or ProcessRef(pid, -1)
        holder = asyncio.ensure_future(self._hold_until_ready(ref, read_fd))
        self._holders.add(holder)
        holder.add_done_callback(self._holders.discard)
        return ref, {}

    async def _hold_until_ready(self, ref: ProcessRef, read_fd: int) -> None:
        assert self._slots is not None
        try:
            ready = asyncio.ensure_future(_read_line(read_fd))
            exited = asyncio.ensure_future(wait_exit(ref))
            await asyncio.wait([ready, exited], timeout=self.WORKER_SLOT_HOLD,
                               return_when=asyncio.FIRST_COMPLETED)
            for task in (ready, exited):
                task.cancel()
            await asyncio.gather(ready, exited, return_exceptions=True)
        finally:
            os.close(read_fd)
            self._slots.release()

    async def close(self) -> None:
        for holder in list(self._holders):
            holder.cancel()

        def stop() -> None:
            with self._lock:
                if self._zygote is not None:
                    self._zygote.stop()
                    self._zygote = None

        await asyncio.to_thread(stop)


def default_launcher(owner: str, home: Path) -> ProcessLauncher:
    """The fork server unless ``PROVISIONER_LOCAL_LAUNCHER=spawn`` asks for plain spawning."""
    if os.environ.get(LAUNCHER_VAR, "fork").strip().lower() == "spawn":
        return ProcessLauncher()
    return ForkServerLauncher(owner, home)
