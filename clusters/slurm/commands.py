"""Slurm's own commands, run as child processes without blocking the event loop.

The service runs as root and submits each tenant's jobs as that tenant's Unix user with
``runuser -u USER -- sbatch``: munge then vouches for the real uid, so Slurm's accounting, its
limits and the kernel's permissions all see the tenant, not a shared service account, and it
works with every Slurm release (``sbatch --uid`` is gone from recent ones; slurmrestd needs a
JWT plugin, a token per user and paths that change with each release). Queries and cancels
need no such care: root sees and cancels every job.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil

from clusters.base import LaunchError
from clusters.slurm.jobs import Job, parse_queue

#: ``squeue --json`` of a busy site is large; more than this is not read.
QUEUE_LIMIT = 64 * 2**20


class SlurmError(LaunchError):
    """A Slurm command failed; the message is Slurm's own first error line."""


def require_commands() -> None:
    """Refuse to start without Slurm's commands (and runuser) on PATH."""
    missing = [c for c in ("sbatch", "squeue", "scancel", "runuser") if shutil.which(c) is None]
    if missing:
        raise RuntimeError(f"--backend slurm: {', '.join(missing)} not found on PATH "
                           "(install Slurm's client commands, e.g. Debian's slurm-client)")


async def _run(argv: list[str], stdin: bytes | None = None, env: dict[str, str] | None = None,
               timeout: float = 60, limit: int = 2**20) -> bytes:
    process = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env, cwd="/")
    try:
        out, err = await asyncio.wait_for(process.communicate(stdin), timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        raise SlurmError(f"{argv[0]} did not answer in {timeout:g}s") from None
    if process.returncode != 0:
        raise SlurmError(_first_error(argv, err))
    if len(out) > limit:
        raise SlurmError(f"{argv[0]} answered more than {limit} bytes")
    return out


def _first_error(argv: list[str], err: bytes) -> str:
    """The line of Slurm's error output that says what went wrong (its last error line)."""
    lines = [line.strip() for line in err.decode("utf-8", "replace").splitlines() if line.strip()]
    name = os.path.basename(argv[0]) if argv[0] != "runuser" else "sbatch"
    text = lines[-1] if lines else "failed"
    prefix = f"{name}: error: "
    if text.startswith(prefix):
        text = text[len(prefix):]
    return f"{name}: {text[:300]}"


def base_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """What Slurm's commands need from ours: PATH, the locale and ``SLURM_CONF``."""
    env = {k: v for k, v in os.environ.items()
           if k in ("PATH", "LANG", "LC_ALL", "SLURM_CONF", "TZ")}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
    return {**env, **(extra or {})}


async def submit(user: str, options: list[str], script: str, env: dict[str, str]) -> int:
    """Submit a batch job as ``user`` (its script on stdin, ``env`` its environment:
    ``--export=ALL`` of a clean one); the job's id."""
    argv = ["runuser", "-u", user, "--", "sbatch", "--parsable", "--export=ALL", *options]
    out = await _run(argv, stdin=script.encode(), env=env)
    text = out.decode("ascii", "replace").strip().split(";")[0]
    if not text.isdigit():
        raise SlurmError(f"sbatch answered {text[:40]!r}, not a job id")
    return int(text)


async def cancel(job_ids: list[int]) -> None:
    """Cancel these jobs (root may cancel any); ids Slurm no longer knows, or that ended
    already, are no error; any other failure (slurmctld away) raises SlurmError."""
    if not job_ids:
        return
    with contextlib.suppress(SlurmError):
        await _run(["scancel", *map(str, job_ids)], env=base_env())
        return
    # One unknown id fails the whole call: cancel one by one, ignoring those.
    for job_id in job_ids:
        try:
            await _run(["scancel", str(job_id)], env=base_env())
        except SlurmError as exc:
            if not any(word in str(exc) for word in GONE):
                raise


#: What scancel says of a job it no longer has to cancel.
GONE = ("Invalid job id", "already completing or completed", "Job/step already")


async def queue() -> dict[int, Job]:
    """Every job Slurm lists (running, pending and recently ended), in one query."""
    out = await _run(["squeue", "--json"], env=base_env(), limit=QUEUE_LIMIT)
    try:
        return await asyncio.to_thread(parse_queue, out)
    except ValueError as exc:
        raise SlurmError(f"squeue --json answered something that is not JSON: {exc}") from None
