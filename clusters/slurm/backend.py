"""Slurm backend: each scheduler and each worker is a batch job of the tenant's own Unix user.

Jobs are submitted as the tenant (:mod:`.commands`), charged to its account, partition and
QOS, sized from the cluster spec, and named and commented with a marker saying which service,
cluster and process they are. One ``squeue --json`` a poll interval tells every job's state:
a worker that ends unasked is reported lost (the core replaces it), a scheduler that ends
unasked ends its cluster with Slurm's reason (or the reap its exit status names), and a job
that waits says why (Slurm's pending reason, shown in the cluster's JSON).

A scheduler binds kernel-picked ports on its node and writes them to a file in its cluster's
folder, which must be on a filesystem the nodes share with the service (as Slurm sites
have): no port range to manage or to collide in, and no route from the job back to the
service or its database. The service reads that file as hostile input (no links, a small
bound, two port numbers) and takes the host from Slurm, never from the job.

Job ids live in the service's database, so a restarted service re-adopts running jobs, fails
clusters whose scheduler job ended meanwhile and cancels jobs with its marker that no record
accounts for; the marker is a random id kept in the database too. Jobs outlive the service.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import pwd
import secrets
import shlex
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clusters.base import (
    BACKEND_KEY,
    OPTIONS_VAR,
    REAP_EXIT_CODES,
    REAPED_FILE,
    WORKER_ENV,
    Backend,
    BackendEvents,
    BatchPlacement,
    ClusterSpec,
    LaunchError,
    Outcome,
    SchedulerEndpoint,
    StopReason,
)
from clusters.runner import NODE_HOST, scheduler_options, worker_options
from clusters.slurm import commands
from clusters.slurm.jobs import Job, JobState, marker
from clusters.tenant_files import read_ports, read_word, remove_entry

logger = logging.getLogger("provisioner.slurm")

MiB = 2**20
READY_POLL = 0.05
#: The scheduler's Dask address, which it writes in its folder for workers started with it.
ADDRESS_FILE = "scheduler.address"
#: Seconds a worker submitted with its scheduler waits for that address at most.
ADDRESS_WAIT = 900.0
#: Seconds a stop waits for Slurm to end a cluster's jobs before it counts as failed (retried).
STOP_TIMEOUT = 60.0


@dataclass(slots=True)
class _JobRef:
    """One submitted job: its id, what the last query said, and whether we asked it to end."""

    job_id: int
    state: JobState = JobState.PENDING
    reason: str | None = None  # the pending reason, while it pends
    node: str = ""
    stopping: bool = False
    reported: bool = False  # its unasked end was told to the core
    detail: str = ""  # how it ended, in Slurm's terms
    #: When it was submitted (monotonic): a query begun before that cannot know it yet.
    submitted: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"job_id": self.job_id, "node": self.node}

    @classmethod
    def from_dict(cls, raw: Any) -> _JobRef | None:
        job_id = raw.get("job_id") if isinstance(raw, dict) else None
        if isinstance(job_id, bool) or not isinstance(job_id, int) or job_id <= 0:
            return None
        node = raw.get("node")
        return cls(job_id, JobState.OTHER, node=node if isinstance(node, str) else "")


@dataclass(slots=True)
class _Cluster:
    folder: Path
    spec: ClusterSpec | None = None
    scheduler: _JobRef | None = None
    workers: dict[str, _JobRef] = field(default_factory=dict)

    def jobs(self) -> list[_JobRef]:
        return [*([self.scheduler] if self.scheduler else []), *self.workers.values()]

    def state(self) -> dict[str, Any]:
        return {BACKEND_KEY: "slurm",
                "scheduler": self.scheduler.to_dict() if self.scheduler else None,
                "workers": {name: ref.to_dict() for name, ref in self.workers.items()}}


class SlurmBackend(Backend):
    """Runs clusters as Slurm batch jobs (see the module docstring)."""

    name = "slurm"

    def __init__(self, folder: Path, *, partition: str | None = None, python: str | None = None,
                 poll_interval: float = 1.0, worker_death_timeout: float = 60.0) -> None:
        """``folder``: where each cluster gets a folder of its own, shared with the nodes.
        ``python``: the interpreter jobs run (the same path on every node); default ours."""
        self.folder = Path(folder).resolve()
        self.partition = partition
        self.python = python or sys.executable
        self.poll_interval = poll_interval
        self.worker_death_timeout = worker_death_timeout
        self.service_id = ""
        self._clusters: dict[str, _Cluster] = {}
        self._events: BackendEvents | None = None
        self._poller: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._polled = asyncio.Event()  # set after each query
        self._uids: dict[str, int] = {}

    # -- life ------------------------------------------------------------------------------

    async def open(self, events: BackendEvents) -> None:
        commands.require_commands()
        self._events = events
        saved = await events.load_backend_state() or {}
        service_id = saved.get("service_id")
        if not (isinstance(service_id, str) and len(service_id) == 16):
            service_id = secrets.token_hex(8)
            await events.save_backend_state({"service_id": service_id})
        self.service_id = service_id
        await asyncio.to_thread(self._make_folder)
        self._poller = asyncio.ensure_future(self._poll_loop())

    def _make_folder(self) -> None:
        """The clusters' folder: ours; others may pass through it (not list it) to reach
        their cluster's own folder, so every folder above it must let them pass too. The
        interpreter must be reachable as well (a warning: group rights may allow it)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        os.chmod(self.folder, 0o711)
        closed = _closed_to_others(self.folder)
        if closed is not None:
            raise RuntimeError(f"--slurm-folder {self.folder}: tenants' jobs cannot reach it, "
                               f"{closed} does not let others pass (chmod o+x it, or choose "
                               "another folder)")
        python = Path(self.python)
        closed = _closed_to_others(python.resolve(), executable=True)
        if closed is not None:
            logger.warning("slurm: jobs run as tenants' users, and %s is not theirs to run "
                           "(%s lacks o+x): set --slurm-python", self.python, closed)

    async def close(self, stop_clusters: bool) -> None:
        if stop_clusters:
            await asyncio.gather(*(self.stop_cluster(c) for c in list(self._clusters)),
                                 return_exceptions=True)
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        self._events = None

    # -- polling ---------------------------------------------------------------------------

    async def _poll_loop(self) -> None:
        while True:
            try:
                await self.poll()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Slurm away for a while: try again next round
                logger.warning("slurm: squeue failed: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_interval)
            self._wake.clear()

    async def poll(self) -> dict[int, Job]:
        """One query for every job; apply what it says to every cluster's jobs."""
        began = time.monotonic()
        jobs = await commands.queue()
        for cluster_id, cluster in list(self._clusters.items()):
            await self._apply(cluster_id, cluster, jobs, began)
        self._polled.set()
        self._polled = asyncio.Event()
        return jobs

    async def _fresh_poll(self) -> None:
        """Wait for a query started from now on."""
        polled = self._polled
        self._wake.set()
        await polled.wait()

    async def _apply(self, cluster_id: str, cluster: _Cluster, jobs: dict[int, Job],
                     began: float) -> None:
        for ref in cluster.jobs():
            job = jobs.get(ref.job_id)
            if job is None:  # gone from the queue: ended longer ago than Slurm keeps jobs
                if ref.state.ended or ref.submitted >= began:
                    continue  # (or submitted after this query began: not in it yet)
                ref.state, ref.reason = JobState.COMPLETED, None
                if ref.stopping:
                    continue
            else:
                ref.state, ref.reason = job.state, job.pending_reason
                ref.node = job.node or ref.node
                ref.detail = job.describe() if job.state.ended else ""
            if not ref.state.ended or ref.stopping or ref.reported or self._events is None:
                continue
            ref.reported = True
            if ref is cluster.scheduler:
                outcome = await self._scheduler_end(cluster, job, ref)
                await self._events.scheduler_lost(cluster_id, outcome)
            else:
                name = next((n for n, r in cluster.workers.items() if r is ref), None)
                if name is not None:
                    del cluster.workers[name]
                    await self._events.worker_lost(cluster_id, name, _worker_end(job, ref))

    async def _scheduler_end(self, cluster: _Cluster, job: Job | None, ref: _JobRef) -> Outcome:
        if job is not None:
            return job.scheduler_outcome()
        word = await asyncio.to_thread(read_word, cluster.folder, REAPED_FILE,
                                       {r.value for r in REAP_EXIT_CODES})
        if word:
            return Outcome(StopReason(word))
        return Outcome.failed(f"scheduler: Slurm job {ref.job_id} ended; Slurm no longer "
                              "lists it")

    # -- helpers ---------------------------------------------------------------------------

    def _cluster(self, cluster_id: str, spec: ClusterSpec | None = None) -> _Cluster:
        cluster = self._clusters.get(cluster_id)
        if cluster is None:
            cluster = self._clusters[cluster_id] = _Cluster(self.folder / cluster_id)
        if spec is not None:
            cluster.spec = spec
        return cluster

    async def _save(self, cluster_id: str) -> None:
        cluster = self._clusters.get(cluster_id)
        if cluster is not None and self._events is not None:
            await self._events.state_changed(cluster_id, cluster.state())

    def _placement(self, spec: ClusterSpec) -> BatchPlacement:
        return spec.batch or BatchPlacement(user=spec.tenant, account=spec.tenant)

    def _uid(self, user: str) -> int:
        uid = self._uids.get(user)
        if uid is None:
            try:
                uid = pwd.getpwnam(user).pw_uid
            except KeyError:
                raise LaunchError(f"Slurm user {user!r} does not exist on this machine") from None
            if uid == 0:
                raise LaunchError("a tenant's Slurm user must not be root")
            self._uids[user] = uid
        return uid

    def _prepare(self, cluster: _Cluster, user: str) -> None:
        """The cluster's folder, the tenant's alone (blocking; run in a thread)."""
        uid = self._uid(user)
        gid = pwd.getpwnam(user).pw_gid
        with contextlib.suppress(FileExistsError):
            os.mkdir(cluster.folder, 0o700)
        info = os.lstat(cluster.folder)
        if not os.path.isdir(cluster.folder) or os.path.islink(cluster.folder):
            raise LaunchError(f"cluster folder {cluster.folder.name} is not a folder")
        if info.st_uid != uid:
            os.chown(cluster.folder, uid, gid, follow_symlinks=False)
        os.chmod(cluster.folder, 0o700, follow_symlinks=False)

    async def _submit(self, spec: ClusterSpec, cluster: _Cluster, process: str,
                      options: dict[str, Any], cores: float, memory: int,
                      extra_env: dict[str, str] | None = None) -> int:
        place = self._placement(spec)
        args = [
            # A worker's name holds its cluster's id already.
            f"--job-name=dask-{spec.cluster_id}-scheduler" if process == "scheduler"
            else f"--job-name=dask-{process}",
            f"--comment={marker(self.service_id, spec.cluster_id, process)}",
            f"--account={place.account}",
            f"--cpus-per-task={max(1, math.ceil(cores - 1e-9))}",
            f"--mem={max(1, math.ceil(memory / MiB))}M",
            "--nodes=1", "--ntasks=1", "--no-requeue",
            f"--chdir={cluster.folder}",
            f"--output={cluster.folder / (process + '-%j.log')}",
        ]
        partition = place.partition or self.partition
        if partition:
            args.append(f"--partition={partition}")
        if place.qos:
            args.append(f"--qos={place.qos}")
        python = spec.python or self.python
        script = (f"#!/bin/sh\nexec {shlex.quote(python)} -m clusters.runner "
                  f"{'scheduler' if process == 'scheduler' else 'worker'} env:{OPTIONS_VAR}\n")
        env = commands.base_env({OPTIONS_VAR: json.dumps(options), **(extra_env or {})})
        if spec.python is not None:
            from clusters.local.backend import runner_path

            env["PYTHONPATH"] = str(await asyncio.to_thread(runner_path))
        submitting = asyncio.ensure_future(commands.submit(place.user, args, script, env))
        try:
            return await asyncio.shield(submitting)
        except asyncio.CancelledError:
            # Cancelled (a stop, a start timeout) while sbatch ran: the job may exist already.
            with contextlib.suppress(Exception):
                await commands.cancel([await submitting])
            raise

    # -- the interface ---------------------------------------------------------------------

    async def start_scheduler(self, spec: ClusterSpec,
                              workers: Sequence[str] = ()) -> SchedulerEndpoint:
        """Submit the scheduler and ``workers`` at once: Slurm starts them in the same
        scheduling pass, and the workers wait for the scheduler's address in the cluster's
        folder, so their start (a Python and Dask import each) overlaps the scheduler's."""
        cluster = self._cluster(spec.cluster_id, spec)
        if cluster.jobs():
            await self._cancel(cluster, cluster.jobs())
            cluster.workers.clear()
        await asyncio.to_thread(self._prepare, cluster, self._placement(spec).user)
        await asyncio.to_thread(remove_entry, cluster.folder, ADDRESS_FILE)
        options = scheduler_options(spec, str(cluster.folder), host=NODE_HOST, port=0,
                                    ready_file=str(cluster.folder / "scheduler-%j.json"),
                                    address_file=str(cluster.folder / ADDRESS_FILE))
        job_id = await self._submit(spec, cluster, "scheduler", options, spec.scheduler_cores,
                                    spec.scheduler_memory)
        ref = cluster.scheduler = _JobRef(job_id, reported=True,  # its start reports its end
                                          submitted=time.monotonic())
        if workers:  # those not submitted, the core asks for again once the scheduler runs
            try:
                await self._submit_workers(spec, cluster, workers,
                                           address_file=str(cluster.folder / ADDRESS_FILE))
            except LaunchError as exc:
                logger.warning("slurm: cluster %s: workers not submitted with its scheduler: %s",
                               spec.cluster_id, exc)
        await self._save(spec.cluster_id)
        self._wake.set()
        ready_file = f"scheduler-{job_id}.json"
        while True:
            ports = await asyncio.to_thread(read_ports, cluster.folder, ready_file,
                                            ("port", "http_port"))
            if ports is not None:
                break
            if ref.state.ended:
                raise LaunchError(_start_failure(ref))
            await asyncio.sleep(READY_POLL)
        if not ref.node:
            await self._fresh_poll()
        if not ref.node:
            raise LaunchError(f"Slurm job {job_id} reported ports but Slurm names no node")
        try:
            host = await _resolve(ref.node)
        except OSError as exc:
            raise LaunchError(f"cannot resolve the scheduler's node {ref.node!r}: {exc}") from None
        ref.reported = False
        await self._save(spec.cluster_id)
        return SchedulerEndpoint.of(host, ports["port"], ports["http_port"], bool(spec.credentials))

    async def start_workers(self, spec: ClusterSpec, address: str, names: Sequence[str]) -> None:
        cluster = self._cluster(spec.cluster_id, spec)
        await asyncio.to_thread(self._prepare, cluster, self._placement(spec).user)
        try:
            await self._submit_workers(spec, cluster, names, address=address)
        finally:
            await self._save(spec.cluster_id)
            self._wake.set()

    async def _submit_workers(self, spec: ClusterSpec, cluster: _Cluster, names: Sequence[str],
                              **where: str) -> None:
        """One job per worker, all submitted at once; ``where``: the scheduler's ``address``,
        or the ``address_file`` it will write. A worker that runs before its scheduler waits
        for that file up to ``ADDRESS_WAIT`` (the service cancels it sooner if the start
        fails). Not ``--dependency=after``: Slurm weighs dependencies on its slow scheduling
        cycle, which made a start take 13 s instead of 1.5 here."""

        async def one(name: str) -> None:
            # Slurm's cgroup holds the worker to its memory; no guard of ours in between.
            options = worker_options(spec, where.get("address", ""), name,
                                     self.worker_death_timeout, host=NODE_HOST,
                                     memory_guard=False, address_file=where.get("address_file"),
                                     address_wait=ADDRESS_WAIT)
            job_id = await self._submit(spec, cluster, name, options, spec.worker_cores,
                                        spec.worker_memory, WORKER_ENV)
            cluster.workers[name] = _JobRef(job_id, submitted=time.monotonic())

        results = await asyncio.gather(*(one(n) for n in names), return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            raise LaunchError(str(failed[0]))

    async def stop_workers(self, cluster_id: str, names: Sequence[str]) -> None:
        cluster = self._clusters.get(cluster_id)
        if cluster is None:
            return
        refs = [cluster.workers[n] for n in names if n in cluster.workers]
        await self._cancel(cluster, refs)  # raises if Slurm cannot be told: kept, retried
        for name in names:
            cluster.workers.pop(name, None)
        await self._save(cluster_id)

    async def _cancel(self, cluster: _Cluster, refs: list[_JobRef]) -> None:
        for ref in refs:
            ref.stopping = True
        await commands.cancel([r.job_id for r in refs if not r.state.ended])

    async def stop_cluster(self, cluster_id: str) -> None:
        cluster = self._clusters.get(cluster_id)
        if cluster is None:
            return
        refs = cluster.jobs()
        await self._cancel(cluster, refs)
        deadline = time.monotonic() + STOP_TIMEOUT
        while any(not r.state.ended for r in refs):
            if time.monotonic() > deadline:
                raise LaunchError(f"Slurm has not ended jobs {[r.job_id for r in refs]} "
                                  f"after {STOP_TIMEOUT:g}s")
            await asyncio.sleep(0.2)
            await self._fresh_poll()
        self._clusters.pop(cluster_id, None)
        await asyncio.to_thread(shutil.rmtree, cluster.folder, True)

    def live_workers(self, cluster_id: str) -> set[str]:
        cluster = self._clusters.get(cluster_id)
        if cluster is None:
            return set()
        return {n for n, r in cluster.workers.items() if not r.state.ended}

    def waiting(self, cluster_id: str) -> str | None:
        cluster = self._clusters.get(cluster_id)
        if cluster is None:
            return None
        parts = []
        if cluster.scheduler and cluster.scheduler.reason:
            parts.append(f"scheduler (Slurm job {cluster.scheduler.job_id}) pending: "
                         f"{cluster.scheduler.reason}")
        reasons: dict[str, int] = {}
        for ref in cluster.workers.values():
            if ref.reason:
                reasons[ref.reason] = reasons.get(ref.reason, 0) + 1
        for reason, count in sorted(reasons.items()):
            parts.append(f"{count} worker{'s' if count != 1 else ''} pending in Slurm: {reason}")
        return "; ".join(parts) or None

    async def recover(self, clusters: Sequence[tuple[ClusterSpec, dict[str, Any]]],
                      ) -> dict[str, Outcome | None]:
        jobs = await commands.queue()
        outcome: dict[str, Outcome | None] = {}
        known: set[int] = set()
        for spec, state in clusters:
            cluster = self._cluster(spec.cluster_id, spec)
            state = state if isinstance(state, dict) else {}
            cluster.scheduler = _JobRef.from_dict(state.get("scheduler"))
            raw_workers = state.get("workers")
            for name, raw in (raw_workers.items() if isinstance(raw_workers, dict) else []):
                ref = _JobRef.from_dict(raw)
                if ref is not None and isinstance(name, str):
                    cluster.workers[name] = ref
            known.update(r.job_id for r in cluster.jobs())
            for ref in cluster.jobs():  # what the queue says; ended workers are dropped
                job = jobs.get(ref.job_id)
                ref.state = job.state if job else JobState.COMPLETED
                ref.reason = job.pending_reason if job else None
                ref.node = (job.node if job else "") or ref.node
            cluster.workers = {n: r for n, r in cluster.workers.items() if not r.state.ended}
            sched = cluster.scheduler
            if sched is None:
                outcome[spec.cluster_id] = Outcome.failed("no scheduler job on record")
            elif sched.state.ended:
                sched.reported = True
                outcome[spec.cluster_id] = await self._scheduler_end(
                    cluster, jobs.get(sched.job_id), sched)
            else:
                outcome[spec.cluster_id] = None
            await self._save(spec.cluster_id)
        strays = [j.job_id for j in jobs.values()
                  if not j.state.ended and j.job_id not in known and j.ours(self.service_id)]
        if strays:
            logger.warning("slurm: cancelling %d job(s) of ours that no record accounts for: %s",
                           len(strays), strays)
            await commands.cancel(strays)
        await asyncio.to_thread(self._sweep_folders, {s.cluster_id for s, _ in clusters})
        return outcome

    def _sweep_folders(self, kept: set[str]) -> None:
        """Remove cluster folders no live record accounts for (never following links)."""
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.folder):
                if entry.name in kept:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)


def _start_failure(ref: _JobRef) -> str:
    return f"scheduler ended before it served: {ref.detail or f'Slurm job {ref.job_id}'}"


def _worker_end(job: Job | None, ref: _JobRef) -> str:
    if job is None:
        return f"Slurm job {ref.job_id} ended; Slurm no longer lists it"
    if job.state == JobState.OUT_OF_MEMORY:
        return f"out of memory: {job.describe()}"
    return job.describe()


def _closed_to_others(path: Path, executable: bool = False) -> Path | None:
    """The first of ``path`` (if ``executable``) and its folders that others cannot pass."""
    for item in ([path] if executable else []) + list(path.parents):
        try:
            if not item.stat().st_mode & 0o001:
                return item
        except OSError:
            return item
    return None


async def _resolve(node: str) -> str:
    """The node's address, resolved as a job on it resolves its own name."""
    import socket

    infos = await asyncio.get_running_loop().getaddrinfo(node, None, family=socket.AF_INET,
                                                         type=socket.SOCK_STREAM)
    return str(infos[0][4][0])
