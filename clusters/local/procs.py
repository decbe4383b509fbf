"""OS process handles that survive a restart of the service.

A process is named by (pid, start time in clock ticks) so a recycled pid is never mistaken
for ours. Exits are noticed with a pidfd on the event loop, which works for processes that
are not our children (re-adopted after a restart) and needs no polling.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from dataclasses import dataclass

#: Every process a local backend starts carries ``<owner>:<what>`` here, so a restarted
#: service tells its own processes (and its fork server) from everything else.
OWNER_VAR = "DASK_PROVISIONER_OWNER"
#: Harmless variables of the host passed through: where programs are, locale, and CPU quirks
#: some BLAS builds need to run correctly on this hardware.
PASS_THROUGH = ("PATH", "LANG", "LC_ALL", "TZ", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def host_basics() -> dict[str, str]:
    """The little of the host's environment a local process starts from."""
    env = {k: os.environ[k] for k in PASS_THROUGH if k in os.environ}
    env.setdefault("PATH", os.defpath)
    return env


@dataclass(frozen=True, slots=True)
class ProcessRef:
    pid: int
    start_ticks: int

    def as_dict(self) -> dict[str, int]:
        return {"pid": self.pid, "start_ticks": self.start_ticks}

    @classmethod
    def from_dict(cls, data: dict[str, int]) -> ProcessRef:
        return cls(int(data["pid"]), int(data["start_ticks"]))


def start_ticks(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat, or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses; split after the last ')'.
    rest = stat[stat.rindex(b")") + 2 :].split()
    if rest[0] == b"Z":
        return None  # a zombie has exited already
    return int(rest[19])


def ref_for(pid: int) -> ProcessRef | None:
    ticks = start_ticks(pid)
    return None if ticks is None else ProcessRef(pid, ticks)


def is_alive(ref: ProcessRef) -> bool:
    return start_ticks(ref.pid) == ref.start_ticks


def _reap(pid: int) -> int | None:
    """Collect the exit status if ``pid`` is our child; None otherwise."""
    try:
        waited, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return None
    if waited == 0:
        return None
    return os.waitstatus_to_exitcode(status)


async def wait_exit(ref: ProcessRef) -> int | None:
    """Wait until the process exits; its exit code if it was our child, else None."""
    loop = asyncio.get_running_loop()
    try:
        fd = os.pidfd_open(ref.pid)
    except ProcessLookupError:
        return _reap(ref.pid)
    try:
        if not is_alive(ref):
            return _reap(ref.pid)
        done = loop.create_future()
        def ready() -> None:
            if not done.done():
                done.set_result(None)

        loop.add_reader(fd, ready)
        try:
            await done
        finally:
            loop.remove_reader(fd)
    finally:
        os.close(fd)
    return _reap(ref.pid)


def signal_group(ref: ProcessRef, sig: int) -> None:
    """Signal the process group led by ``ref`` (each of our processes leads its own)."""
    if not is_alive(ref):
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(ref.pid, sig)


async def terminate(ref: ProcessRef, grace: float = 5.0) -> None:
    """SIGTERM the group, SIGKILL it after ``grace`` seconds, return once the leader is gone."""
    signal_group(ref, signal.SIGTERM)
    try:
        await asyncio.wait_for(wait_exit(ref), grace)
    except TimeoutError:
        pass
    # The group may hold children of the leader that outlived it: kill them all.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(ref.pid, signal.SIGKILL)
    if is_alive(ref):
        await wait_exit(ref)


def exit_reason(code: int | None) -> str:
    if code is None:
        return "process exited"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = str(-code)
        return f"process killed by {name}"
    return f"process exited with code {code}"
