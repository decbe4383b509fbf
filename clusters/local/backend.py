"""Local backend: each scheduler and worker is its own OS process group on this machine.

Processes carry an owner marker in their environment so that, after a crash of the service,
a restart can tell its own leftovers from everything else: those it has records for are
re-adopted, the rest are killed. Nothing of the service's environment reaches them, and where
the kernel allows, each confines itself before serving (:mod:`clusters.sandbox`): it cannot
read the service's data folder or another cluster's, nor signal or inspect other processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from clusters.base import (
    REAP_EXIT_CODES,
    REAPED_FILE,
    WORKER_ENV,
    Backend,
    BackendEvents,
    ClusterSpec,
    LaunchError,
    Outcome,
    SchedulerEndpoint,
    StopReason,
)
from clusters.local.confinement import Confinement
from clusters.local.forkserver import ForkServerLauncher, default_launcher
from clusters.local.procs import (
    OWNER_VAR,
    ProcessRef,
    exit_reason,
    host_basics,
    is_alive,
    ref_for,
    terminate,
    wait_exit,
)
from clusters.local.spawn import ProcessLauncher
from clusters.runner import scheduler_options, worker_options
from clusters.tenant_files import read_word, remove_entry

logger = logging.getLogger("provisioner.local")


class Launcher(Protocol):
    async def launch(
        self, role: str, options: dict[str, Any], env: dict[str, str], log: Path,
        wait_ready: bool = True,
    ) -> tuple[ProcessRef, dict[str, Any]]: ...

    async def close(self) -> None: ...


@dataclass
class _Cluster:
    spec: ClusterSpec | None
    #: The cluster's own folder (its processes' HOME and TMPDIR): theirs to write, so the
    #: service reads nothing from it but one checked word (:func:`read_word`).
    directory: Path
    #: Its processes' logs, in a folder of the service's that they never see: each process
    #: gets its log as an open file.
    logs: Path
    scheduler: ProcessRef | None = None
    workers: dict[str, ProcessRef] = field(default_factory=dict)
    stopping: set[str] = field(default_factory=set)
    watchers: set[asyncio.Task[None]] = field(default_factory=set)

    def state(self) -> dict[str, Any]:
        return {
            "scheduler": self.scheduler.as_dict() if self.scheduler else None,
            "workers": {n: r.as_dict() for n, r in self.workers.items()},
        }


class LocalBackend(Backend):
    name = "local"

    def __init__(self, data_dir: Path, host: str = "127.0.0.1",
                 launcher: Launcher | None = None, worker_death_timeout: float = 60,
                 sandbox: bool | None = None, hidden: Sequence[Path] = (),
                 uid_base: int = 1_700_000_000) -> None:
        """``sandbox``: confine cluster processes (True: every layer or refuse to start; None:
        what the machine can, warning for the rest). ``hidden``: the service's files outside
        its data folder that cluster processes must not see (state file, tenants file)."""
        self.data_dir = Path(data_dir).resolve()
        self.host = host
        self.worker_death_timeout = worker_death_timeout
        self.owner = owner_key(self.data_dir)
        self.confinement = Confinement(self.data_dir, self.owner, sandbox,
                                       [Path(p).resolve() for p in hidden], uid_base)
        self.launcher: Launcher = launcher or default_launcher(self.owner, self.data_dir / "forkserver")
        #: One launcher per environment's interpreter (a fork server each, when ours is one).
        self._launchers: dict[str, Launcher] = {}
        self._clusters: dict[str, _Cluster] = {}
        self._events: BackendEvents | None = None

    # -- helpers ---------------------------------------------------------------------------

    def _cluster(self, cluster_id: str, spec: ClusterSpec | None = None) -> _Cluster:
        cluster = self._clusters.get(cluster_id)
        if cluster is None:
            cluster = self._clusters[cluster_id] = _Cluster(
                spec, self.data_dir / "clusters" / cluster_id, self.data_dir / "logs" / cluster_id)
        if spec is not None:
            cluster.spec = spec
        return cluster

    async def _launcher(self, spec: ClusterSpec) -> Launcher:
        """The launcher of the cluster's interpreter: ours, or its environment's."""
        if spec.python is None:
            return self.launcher
        found = self._launchers.get(spec.python)
        if found is None:
            runtime = {"PYTHONPATH": str(await asyncio.to_thread(runner_path))}
            if isinstance(self.launcher, ForkServerLauncher):
                home = self.data_dir / "forkserver" / hashlib.sha256(spec.python.encode()).hexdigest()[:12]
                found = ForkServerLauncher(self.owner, home, python=spec.python, runtime_env=runtime)
            else:
                found = ProcessLauncher(python=spec.python, runtime_env=runtime)
            self._launchers[spec.python] = found
        return found

    def environment(self, spec: ClusterSpec, worker: bool) -> dict[str, str]:
        """What a cluster process starts with: a few host basics and our marker. The tenant's
        variables come in its options and are set only once it has confined itself."""
        env = host_basics()
        env["HOME"] = env["TMPDIR"] = self.confinement.home(self._cluster(spec.cluster_id).directory)
        env["USER"] = env["LOGNAME"] = "dask"
        if worker:
            env.update(WORKER_ENV)
        env[OWNER_VAR] = f"{self.owner}:{spec.cluster_id}"
        return env

    async def _save(self, cluster_id: str) -> None:
        cluster = self._clusters.get(cluster_id)
        state = cluster.state() if cluster else {"scheduler": None, "workers": {}}
        if self._events:
            await self._events.state_changed(cluster_id, state)

    def _watch(self, cluster_id: str, name: str | None, ref: ProcessRef) -> None:
        cluster = self._cluster(cluster_id)
        task = asyncio.create_task(self._watch_one(cluster_id, name, ref))
        cluster.watchers.add(task)
        task.add_done_callback(cluster.watchers.discard)

    async def _watch_one(self, cluster_id: str, name: str | None, ref: ProcessRef) -> None:
        code = await wait_exit(ref)
        cluster = self._clusters.get(cluster_id)
        if cluster is None or self._events is None:
            return
        if name is None:
            if cluster.scheduler != ref or "scheduler" in cluster.stopping:
                return
            cluster.scheduler = None
            await self._save(cluster_id)
            outcome = await asyncio.to_thread(self._reaped_reason, cluster, code) \
                or Outcome.failed(f"scheduler {exit_reason(code)}")
            await self._events.scheduler_lost(cluster_id, outcome)
        else:
            if cluster.workers.get(name) != ref:
                return
            del cluster.workers[name]
            await self._save(cluster_id)
            oom = await asyncio.to_thread(self.confinement.oom_killed, cluster_id, name)
            await self.confinement.end_async(cluster_id, name)  # what it left behind goes too
            if name not in cluster.stopping:
                why = "killed by the kernel for using more memory than its limit" if oom \
                    else exit_reason(code)
                await self._events.worker_lost(cluster_id, name, f"worker {why}")
            cluster.stopping.discard(name)

    # -- Backend ---------------------------------------------------------------------------

    async def _options(self, spec: ClusterSpec, cluster: _Cluster, process: str,
                       memory: int, cores: float) -> dict[str, Any]:
        """The options every process gets from us: the tenant's env (applied once confined)
        and the plan by which it confines itself, its cgroup made meanwhile."""
        known = set(self.confinement.uids)
        plan = await asyncio.to_thread(self.confinement.plan, spec.cluster_id, process,
                                       cluster.directory, spec.tenant, memory, cores)
        if set(self.confinement.uids) != known and self._events is not None:
            await self._events.save_backend_state(self.confinement.state())
        return {"host": self.host, "env": dict(spec.env), "sandbox": plan}

    async def open(self, events: BackendEvents) -> None:
        self._events = events
        (self.data_dir / "clusters").mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(self.confinement.choose)
        self.confinement.load(await events.load_backend_state())
        start = getattr(self.launcher, "start", None)  # a fork server warms up meanwhile
        if start is not None:
            await start()

    async def close(self, stop_clusters: bool) -> None:
        if stop_clusters:
            await asyncio.gather(*(self.stop_cluster(cid) for cid in list(self._clusters)))
        for cluster in self._clusters.values():
            for task in list(cluster.watchers):
                task.cancel()
        self._events = None
        await asyncio.gather(self.launcher.close(), *(x.close() for x in self._launchers.values()))

    def _prepare(self, cluster: _Cluster, tenant: str) -> None:
        """Make the cluster's folders (blocking; run in a thread)."""
        self.confinement.prepare(cluster.directory, tenant)
        cluster.logs.mkdir(parents=True, exist_ok=True, mode=0o700)

    async def start_scheduler(self, spec: ClusterSpec,
                              workers: Sequence[str] = ()) -> SchedulerEndpoint:
        cluster = self._cluster(spec.cluster_id, spec)
        cluster.stopping.discard("scheduler")
        if cluster.scheduler and is_alive(cluster.scheduler):
            await terminate(cluster.scheduler, grace=1)
        await self.confinement.end_async(spec.cluster_id, "scheduler")
        await asyncio.to_thread(self._prepare, cluster, spec.tenant)
        await asyncio.to_thread(remove_entry, cluster.directory, REAPED_FILE)
        options = scheduler_options(
            spec, self.confinement.home(cluster.directory), port=0,
            **await self._options(spec, cluster, "scheduler", spec.scheduler_memory,
                                  spec.scheduler_cores))
        ref, info = await (await self._launcher(spec)).launch(
            "scheduler", options, self.environment(spec, worker=False),
            cluster.logs / "scheduler.log",
        )
        cluster.scheduler = ref
        await self._save(spec.cluster_id)
        self._watch(spec.cluster_id, None, ref)
        try:
            return SchedulerEndpoint.of(self.host, info.get("port"), info.get("http_port"),
                                        bool(spec.credentials))
        except LaunchError:
            await self.stop_cluster(spec.cluster_id)
            raise

    async def start_workers(self, spec: ClusterSpec, address: str, names: Sequence[str]) -> None:
        cluster = self._cluster(spec.cluster_id, spec)
        await asyncio.to_thread(self._prepare, cluster, spec.tenant)
        env = self.environment(spec, worker=True)
        launcher = await self._launcher(spec)

        async def one(name: str) -> None:
            options = worker_options(
                spec, address, name, self.worker_death_timeout,
                **await self._options(spec, cluster, name, spec.worker_memory, spec.worker_cores))
            ref, _ = await launcher.launch(
                "worker", options, env, cluster.logs / f"{name}.log", wait_ready=False
            )
            cluster.workers[name] = ref
            self._watch(spec.cluster_id, name, ref)

        results = await asyncio.gather(*(one(n) for n in names), return_exceptions=True)
        await self._save(spec.cluster_id)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise LaunchError(f"could not start {len(errors)} worker(s): {errors[0]}")

    async def stop_workers(self, cluster_id: str, names: Sequence[str]) -> None:
        cluster = self._clusters.get(cluster_id)
        if cluster is None:
            return
        refs = []
        for name in names:
            ref = cluster.workers.get(name)
            if ref is not None:
                cluster.stopping.add(name)
                refs.append(ref)
        await asyncio.gather(*(terminate(r) for r in refs))
        await asyncio.gather(*(self.confinement.end_async(cluster_id, n) for n in names))

    async def stop_cluster(self, cluster_id: str) -> None:
        cluster = self._clusters.get(cluster_id)
        if cluster is None:
            return
        cluster.stopping.update(cluster.workers)
        cluster.stopping.add("scheduler")
        refs = list(cluster.workers.values())
        await asyncio.gather(*(terminate(r, grace=3) for r in refs))
        if cluster.scheduler:
            await terminate(cluster.scheduler, grace=3)
        await self.confinement.end_async(cluster_id)  # whatever escaped its process group
        # Not the watcher calling this (a scheduler that ended by itself): cancelled, it would
        # never get to remove the folder below.
        current = asyncio.current_task()
        for task in list(cluster.watchers):
            if task is not current:
                task.cancel()
        self._clusters.pop(cluster_id, None)
        await self._save(cluster_id)
        # Its folder goes with it; its logs (the service's) stay for whoever investigates.
        await asyncio.to_thread(shutil.rmtree, cluster.directory, True)

    def live_workers(self, cluster_id: str) -> set[str]:
        cluster = self._clusters.get(cluster_id)
        if cluster is None:
            return set()
        return set(cluster.workers) - cluster.stopping

    async def recover(
        self, clusters: Sequence[tuple[ClusterSpec, dict[str, Any]]]
    ) -> dict[str, Outcome | None]:
        result: dict[str, Outcome | None] = {}
        known: set[int] = set()
        for spec, state in clusters:
            cluster = self._cluster(spec.cluster_id, spec)
            sched = state.get("scheduler")
            ref = ProcessRef.from_dict(sched) if sched else None
            if ref and is_alive(ref):
                cluster.scheduler = ref
                known.add(ref.pid)
                self._watch(spec.cluster_id, None, ref)
                result[spec.cluster_id] = None
            else:
                result[spec.cluster_id] = self._reaped_reason(cluster, None) \
                    or Outcome.failed("scheduler process gone while the service was down")
            for name, data in (state.get("workers") or {}).items():
                wref = ProcessRef.from_dict(data)
                if is_alive(wref) and result[spec.cluster_id] is None:
                    cluster.workers[name] = wref
                    known.add(wref.pid)
                    self._watch(spec.cluster_id, name, wref)
            await self._save(spec.cluster_id)
        await asyncio.to_thread(self._end_unaccounted, result)
        strays = await asyncio.to_thread(self._find_ours, known)
        if strays:
            logger.warning("killing %d unrecognised cluster process(es): %s", len(strays),
                           [r.pid for r in strays])
        await asyncio.gather(*(terminate(r, grace=2) for r in strays))
        await asyncio.to_thread(self._sweep_folders, set(result))  # nothing left to write there
        return result

    def _end_unaccounted(self, outcome: dict[str, Outcome | None]) -> None:
        """Kill, by cgroup, every process of ours that no record accounts for: clusters with
        no record or a dead scheduler, and processes a live cluster no longer knows."""
        for cluster_id in self.confinement.clusters_with_cgroups():
            cluster = self._clusters.get(cluster_id)
            if cluster is None or outcome.get(cluster_id) is not None:
                if self.confinement.pids_of(cluster_id):
                    logger.warning("killing the processes of cluster %s: no live record", cluster_id)
                self.confinement.end(cluster_id)
                continue
            known = {"scheduler", *cluster.workers}
            for process in self.confinement.processes_of(cluster_id):
                if process not in known:
                    self.confinement.end(cluster_id, process)

    def _sweep_folders(self, kept: set[str]) -> None:
        """Remove cluster folders no live record accounts for (a crash between a cluster's
        end and its folder's removal leaves one). Entries are never followed: a link or a
        file there is removed as itself; logs are the service's and stay."""
        root = self.data_dir / "clusters"
        try:
            entries = list(os.scandir(root))
        except OSError:
            return
        for entry in entries:
            if entry.name in kept:
                continue
            logger.info("removing the folder of ended cluster %r", entry.name[:64])
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)

    @staticmethod
    def _reaped_reason(cluster: _Cluster, code: int | None) -> Outcome | None:
        """Why a scheduler reaped itself (None: it did not): its exit status when this service
        was its parent's, else the one word it left in its folder."""
        for reason, reaped_code in REAP_EXIT_CODES.items():
            if code == reaped_code:
                return Outcome(reason)
        word = read_word(cluster.directory, REAPED_FILE, {r.value for r in REAP_EXIT_CODES})
        return Outcome(StopReason(word)) if word else None

    def _find_ours(self, known: set[int]) -> list[ProcessRef]:
        """Without cgroups, processes are known by the marker in their environment."""
        if self.confinement.tree is not None:
            return []
        return [r for r in owned_processes(self.owner) if r.pid not in known]


@functools.cache
def runner_path() -> Path:
    """A folder holding this package's ``clusters`` and nothing else, for another
    environment's interpreter to find the runner on (its own dask, distributed and the rest
    stay its own: the service's site-packages is not put on its path). Made once, in this
    Python's prefix, which cluster processes may read."""
    import clusters

    folder = Path(sys.prefix) / "share" / "dask-provisioner" / "runner"
    link = folder / "clusters"
    target = Path(clusters.__file__).resolve().parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink() or link.resolve() != target:
            with contextlib.suppress(FileNotFoundError):
                link.unlink()
            link.symlink_to(target, target_is_directory=True)
    except OSError as exc:
        raise LaunchError(f"cannot make the runner's folder for environments ({folder}): "
                          f"{exc.strerror}") from None
    return folder


def owner_key(data_dir: Path) -> str:
    """The marker shared by every process a service on ``data_dir`` starts."""
    return hashlib.sha256(str(Path(data_dir).resolve()).encode()).hexdigest()[:16]


def owned_processes(owner: str) -> list[ProcessRef]:
    """Group leaders carrying ``owner``'s marker: every cluster process of that service."""
    marker = f"{OWNER_VAR}={owner}:".encode()
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as f:
                environ = f.read(1 << 20)  # a process may rewrite its own: bounded
        except OSError:
            continue
        if any(item.startswith(marker) for item in environ.split(b"\0")):
            ref = ref_for(int(entry.name))
            with contextlib.suppress(OSError):
                if ref is not None and os.getpgid(ref.pid) == ref.pid:
                    found.append(ref)
    return found
