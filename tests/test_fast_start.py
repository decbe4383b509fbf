"""The fork-server fast path: isolation, exact environments, restart safety, clean-up, fallback.

These check behaviour, not speed (``bench/start_latency.py`` measures speed).
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from distributed import Client

from clusters.base import ClusterSpec
from clusters.local.backend import LocalBackend
from clusters.local.forkserver import ForkServerLauncher
from clusters.local.procs import ProcessRef, is_alive, ref_for, terminate
from clusters.local.spawn import ProcessLauncher
from tests.service import MiB, ServiceProcess, tenant, wait_until

#: Nothing here depends on the database: the SQLite pass covers it.
pytestmark = pytest.mark.state_agnostic

MakeService = Callable[..., ServiceProcess]
SECRET = "DASK_PROVISIONER_TEST_SECRET"


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("PPid:"))


def _pids(c: dict[str, Any], workers: int = 1) -> tuple[int, list[int]]:
    """Scheduler and worker pids as the cluster itself reports them."""
    with Client(c["scheduler_address"], timeout=30) as client:
        client.wait_for_workers(workers, timeout=60)
        scheduler = client.run_on_scheduler(os.getpid)
        workers_pids = sorted(client.run(os.getpid).values())
    return scheduler, workers_pids


def _memory_holds(pid: int, needle: bytes) -> bool:
    """Whether any readable mapping of ``pid`` contains ``needle`` (needs ptrace rights)."""
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            span, perms = line.split()[:2]
            if not perms.startswith("r"):
                continue
            start, end = (int(x, 16) for x in span.split("-"))
            with contextlib.suppress(OSError, ValueError, OverflowError):
                mem.seek(start)
                if needle in mem.read(end - start):
                    return True
    return False


def test_forked_processes_get_exactly_their_environment(make_service: MakeService) -> None:
    svc = make_service([tenant("acme")], args=["--no-tls"], env={SECRET: "hunter2"}).start()
    tenant_secret = os.urandom(12).hex()
    c = svc.create("acme", workers=1, env={"TENANT_SETTING": tenant_secret})
    with Client(c["scheduler_address"], timeout=30) as client:
        client.wait_for_workers(1, timeout=60)
        worker_env = client.submit(lambda: dict(os.environ), pure=False).result(timeout=60)
        scheduler_env = client.run_on_scheduler(lambda: dict(os.environ))
        scheduler_pid = client.run_on_scheduler(os.getpid)

    assert _parent(scheduler_pid) in svc.zygotes(), "the scheduler must come from the fork server"
    # What LocalBackend.environment() computes for this machine's confinement, plus the
    # tenant's own variables (which the process sets itself once confined).
    spec = ClusterSpec(cluster_id=c["id"], tenant="acme", role="acme", worker_cores=1,
                       worker_memory=512 * MiB, scheduler_cores=0.5, scheduler_memory=256 * MiB,
                       env={"TENANT_SETTING": tenant_secret})
    backend = LocalBackend(svc.data_dir, launcher=ProcessLauncher())
    backend.confinement.choose()
    assert worker_env == {**backend.environment(spec, worker=True), **spec.env}
    assert scheduler_env == {**backend.environment(spec, worker=False), **spec.env}
    assert SECRET not in worker_env and SECRET not in scheduler_env
    # The next cluster forks from the zygote: it must hold nothing of this one's request.
    # The zygote descends from this test process (test -> service -> zygote), so reading its
    # memory needs no privilege beyond the default ptrace scope; no skip.
    leaked = _memory_holds(svc.zygotes()[0], tenant_secret.encode())
    assert not leaked, "a tenant's environment reached the fork server's memory"


def test_clusters_are_distinct_sessions_and_survive_a_killed_service(make_service: MakeService) -> None:
    svc = make_service([tenant("acme"), tenant("zeta")], args=["--no-tls"]).start()
    clusters = [svc.create("acme", workers=1), svc.create("acme", workers=1),
                svc.create("zeta", workers=2)]
    pids = [_pids(c, workers=c["workers"]["requested"]) for c in clusters]
    every = [p for sched, workers in pids for p in (sched, *workers)]
    assert len(every) == len(set(every)) == 7, f"a process shared between clusters: {pids}"
    for pid in every:
        assert os.getpgid(pid) == pid and os.getsid(pid) == pid, "each leads its own session"
    zygotes = svc.zygotes()
    assert len(zygotes) == 1
    owned = {r.pid for r in svc.owned()}
    assert set(every) <= owned, "the restart sweep must see forked processes as ours"
    assert zygotes[0] not in owned, "the fork server is not a cluster process"

    refs = [ref_for(p) for p in every]
    svc.kill()
    wait_until(lambda: not svc.zygotes(), timeout=10, what="the fork server to follow the service")
    assert all(r is not None and is_alive(r) for r in refs), "clusters must outlive the service"

    svc.start()
    for c, (sched, workers) in zip(clusters, pids, strict=True):
        with svc.client(c["tenant"]) as http:
            assert http.get(f"/clusters/{c['id']}").json()["status"] == "running"
        assert _pids(c, workers=len(workers)) == (sched, workers), "re-adopted, not restarted"
    with Client(clusters[0]["scheduler_address"], timeout=30) as client:
        assert client.submit(lambda: 6 * 7).result(timeout=60) == 42

    for c in clusters:
        with svc.client(c["tenant"]) as http:
            assert http.delete(f"/clusters/{c['id']}").status_code == 200
    for c in clusters:
        with svc.client(c["tenant"]) as http:
            wait_until(lambda c=c, http=http: http.get(f"/clusters/{c['id']}").json()["status"]
                       == "stopped", what="cluster stopped")
    wait_until(lambda: not any(r is not None and is_alive(r) for r in refs), timeout=15,
               what="every cluster process gone")
    assert svc.signal(signal.SIGTERM) == 0
    wait_until(lambda: not svc.zygotes() and not svc.owned(), timeout=15,
               what="no fork server and no cluster process after shutdown")


async def test_launcher_falls_back_to_spawning(tmp_path: Path) -> None:
    """A fork server that does not come up in time costs speed, not clusters."""
    launcher = ForkServerLauncher("test", tmp_path / "fs", start_timeout=0.001)
    env = {"PATH": os.defpath, "HOME": str(tmp_path)}
    ref: ProcessRef | None = None
    try:
        ref, info = await launcher.launch("scheduler", {"host": "127.0.0.1", "port": 0}, env,
                                          tmp_path / "scheduler.log")
        assert isinstance(info["port"], int) and info["port"] > 0
        assert _parent(ref.pid) == os.getpid(), "spawned by us, not forked by a fork server"
        assert launcher.zygote_pid is None
    finally:
        if ref is not None:
            await terminate(ref, grace=2)
        await launcher.close()
    assert not any(b"clusters.local.zygote" in _cmdline(p) for p in _children())


def _children() -> list[int]:
    me = os.getpid()
    out = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError, StopIteration):
                if _parent(int(entry.name)) == me:
                    out.append(int(entry.name))
    return out


def _cmdline(pid: int) -> bytes:
    with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read()
    return b""


def test_spawned_processes_keep_keys_out_of_argv(make_service: MakeService) -> None:
    """The fallback launcher (a fresh interpreter per process): the cluster's TLS key never
    shows in a command line (readable by every user) nor stays in the environment.
    (tests/test_hostile_tenant.py checks its confinement, on both launchers.)"""
    svc = make_service([tenant("acme")], env={"PROVISIONER_LOCAL_LAUNCHER": "spawn"}).start()
    c = svc.create("acme", workers=1)
    # Running means the scheduler is up; its worker is launched right after.
    processes = wait_until(lambda: len(p := svc.processes_of(c["id"])) == 2 and p,
                           what="scheduler and worker processes")
    for ref in processes:
        assert _parent(ref.pid) == svc.proc.pid, "spawned by the service, not a fork server"
        cmdline = _cmdline(ref.pid)
        assert b"clusters.runner" in cmdline and b"PRIVATE KEY" not in cmdline, cmdline
    assert not svc.zygotes()
    with Client(c["scheduler_address"], security=svc.security("acme", c["id"]), timeout=30) as client:
        client.wait_for_workers(1, timeout=60)
        assert client.submit(lambda: 6 * 7).result(timeout=60) == 42
        options_env = client.submit(lambda: __import__("os").environ.get("DASK_PROVISIONER_OPTIONS"),
                                    pure=False).result(timeout=60)
    assert options_env is None, "the runner takes its options out of the environment"
