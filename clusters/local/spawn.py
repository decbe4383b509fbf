"""Start one scheduler or worker as a fresh OS process and learn when it is ready.

The process leads its own session (so the whole group can be signalled and it outlives a
killed service), writes its output to a log file, gets exactly the environment it is given,
and reports its address as one JSON line on a pipe before closing it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from clusters.base import OPTIONS_VAR, LaunchError
from clusters.local.procs import ProcessRef, exit_reason, ref_for, terminate, wait_exit

READY_FD = 3
#: How a process's log is opened: in a folder of the service's, never through a link.
LOG_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW


#: The most a process's ready report may hold; a longer one is refused.
MAX_REPORT = 4096


def _tail(path: Path, limit: int = 2048, lines: int = 5) -> str:
    """The last lines of a process's log, for an error message: its end only, never a link
    followed, every character outside printable ASCII escaped (the text is the tenant's)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return ""
    try:
        size = os.fstat(fd).st_size
        data = os.pread(fd, limit, max(0, size - limit))
    except OSError:
        return ""
    finally:
        os.close(fd)
    text = data.decode("utf-8", "replace").strip().splitlines()[-lines:]
    return " | ".join(printable(line) for line in text)


def printable(text: str, limit: int = 500) -> str:
    """``text`` cut to ``limit`` characters with anything but printable ASCII escaped, so text
    from a cluster process cannot forge a line of a log or a terminal's control sequences."""
    escaped = text[:limit].encode("ascii", "backslashreplace").decode("ascii")
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in escaped)


def parse_report(line: bytes) -> dict[str, Any]:
    """A ready report: a JSON object, or LaunchError."""
    try:
        report = json.loads(line)
    except ValueError:
        report = None
    if not isinstance(report, dict):
        raise LaunchError(f"process sent an invalid ready report: {printable(repr(line[:100]))}")
    return report


async def _read_line(fd: int, limit: int = MAX_REPORT) -> bytes:
    """Read one line from a pipe without blocking the loop; b'' if it closed first or sent
    more than ``limit`` bytes without one."""
    loop = asyncio.get_running_loop()
    os.set_blocking(fd, False)
    buf = bytearray()
    done: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        try:
            chunk = os.read(fd, limit + 1)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        buf.extend(chunk)
        if (not chunk or b"\n" in buf or len(buf) > limit) and not done.done():
            done.set_result(None)

    loop.add_reader(fd, readable)
    try:
        await done
    finally:
        loop.remove_reader(fd)
    line, newline, _ = bytes(buf).partition(b"\n")
    return line if newline and len(line) <= limit else b""


class ProcessLauncher:
    """Launches ``python -m clusters.runner`` with posix_spawn (no fork of the service)."""

    def __init__(self, python: str = sys.executable, ready_timeout: float = 120.0,
                 runtime_env: dict[str, str] | None = None) -> None:
        """``runtime_env``: variables of ours every process of this interpreter needs (where
        another environment's interpreter finds the runner)."""
        self.python = python
        self.ready_timeout = ready_timeout
        self.runtime_env = dict(runtime_env or {})

    async def close(self) -> None:
        return None

    def _spawn(self, role: str, options: dict[str, Any], env: dict[str, str], log: Path,
               write_fd: int) -> int:
        # Options travel in the environment (the runner takes them out of it), not in argv,
        # which every user of the machine can read: they hold the cluster's TLS key.
        env = {**env, **self.runtime_env, OPTIONS_VAR: json.dumps(options)}
        argv = [self.python, "-m", "clusters.runner", role, f"env:{OPTIONS_VAR}", str(READY_FD)]
        actions = [
            (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
            (os.POSIX_SPAWN_OPEN, 1, str(log), LOG_FLAGS, 0o600),
            (os.POSIX_SPAWN_DUP2, 1, 2),
            (os.POSIX_SPAWN_DUP2, write_fd, READY_FD),
        ]
        return os.posix_spawn(self.python, argv, env, file_actions=actions, setsid=True)

    async def launch(
        self, role: str, options: dict[str, Any], env: dict[str, str], log: Path,
        wait_ready: bool = True,
    ) -> tuple[ProcessRef, dict[str, Any]]:
        """Start the process; with ``wait_ready``, return its ready report too."""
        read_fd, write_fd = os.pipe()
        spawning = asyncio.ensure_future(
            asyncio.to_thread(self._spawn, role, options, env, log, write_fd))
        try:
            pid = await asyncio.shield(spawning)
        except asyncio.CancelledError:
            # A start cancelled (a stop asked meanwhile) must not lose the process it made.
            with contextlib.suppress(Exception):
                pid = await spawning
                await terminate(ref_for(pid) or ProcessRef(pid, -1), grace=0)
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        ref = ref_for(pid) or ProcessRef(pid, -1)
        if not wait_ready:
            os.close(read_fd)
            return ref, {}
        try:
            line_task = asyncio.ensure_future(_read_line(read_fd))
            exit_task = asyncio.ensure_future(wait_exit(ref))
            try:
                done, _ = await asyncio.wait(
                    [line_task, exit_task], timeout=self.ready_timeout,
                    return_when=asyncio.FIRST_COMPLETED,
                )
            except asyncio.CancelledError:
                line_task.cancel()
                exit_task.cancel()
                await terminate(ref, grace=0)
                raise
            if line_task in done and line_task.result():
                exit_task.cancel()
                try:
                    return ref, parse_report(line_task.result())
                except LaunchError:
                    await terminate(ref, grace=2)
                    raise
            line_task.cancel()
            if line_task in done and exit_task not in done:
                # The pipe closed without a report: the process is on its way out.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(exit_task), 10)
                done = {exit_task} if exit_task.done() else done
            if exit_task not in done:
                exit_task.cancel()
                await terminate(ref, grace=2)
                raise LaunchError(
                    f"{role} not ready after {self.ready_timeout:g}s: {_tail(log)}"
                )
            raise LaunchError(
                f"{role} {exit_reason(exit_task.result())} before it was ready: {_tail(log)}"
            )
        finally:
            os.close(read_fd)
