"""A hostile tenant, holding only its own token, tries to take over the service and others.

Every class of attack found against the local backend is tried for real here, on both
launchers (fork server and spawn), from inside the tenant's own cluster processes, and every
attempt must fail: the service never unpickles or trusts what a scheduler sends; tenant input
reaches a process only after it confined itself; the service reads nothing a tenant can write
but one checked word; cluster processes run as their tenant's own user in a private root
with no capabilities; memory, tasks and CPU are limited by cgroups and nothing outlives its
cluster; no cluster process can take a port of its choosing.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from distributed import Client
from sqlalchemy.engine import make_url

from clusters import cgroups, sandbox
from clusters.local.backend import owner_key
from tests import hostile
from tests.intrusion import poisoned_reports_are_harmless
from tests.service import GiB, MiB, ServiceProcess, free_port, tenant, wait_until

FULLY_CONFINED = not sandbox.support().missing()
TENANTS = [
    tenant("alpha", cores=8, memory=16 * GiB, clusters=6, env={"TEAM": "alpha"}),
    tenant("beta", cores=4, memory=8 * GiB, clusters=3),
]


@pytest.fixture(scope="module", params=["fork", "spawn"])
def hostile_service(request: pytest.FixtureRequest, service: ServiceProcess,
                    tmp_path_factory: pytest.TempPathFactory,
                    state_db: Callable[[], str | None]) -> Iterator[ServiceProcess]:
    """The shared service (fork server), then one of this module's own that spawns."""
    if request.param == "fork":
        yield service
        return
    svc = ServiceProcess(tmp_path_factory.mktemp("spawning"), TENANTS,
                         env={"PROVISIONER_LOCAL_LAUNCHER": "spawn"}, state=state_db())
    try:
        yield svc.start()
    finally:
        svc.cleanup()


@pytest.fixture(scope="module")
def victims(hostile_service: ServiceProcess) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """A running cluster of alpha (the attacker) and one of beta (the victim), a worker each."""
    a = hostile_service.create("alpha", workers=1)
    b = hostile_service.create("beta", workers=1)
    try:
        yield a, b
    finally:
        for name, c in (("alpha", a), ("beta", b)):
            with hostile_service.client(name) as http:
                http.delete(f"/clusters/{c['id']}")


@contextlib.contextmanager
def connect(svc: ServiceProcess, name: str, cluster: dict[str, Any],
            workers: int = 1) -> Iterator[Client]:
    with Client(cluster["scheduler_address"], security=svc.security(name, cluster["id"]),
                timeout=30) as client:
        if workers:
            client.wait_for_workers(workers, timeout=60)
        yield client


def _tree(svc: ServiceProcess) -> cgroups.Cgroups:
    tree = cgroups.detect(f"dask-provisioner/{owner_key(svc.data_dir)}")
    assert tree is not None, cgroups.why_not()
    return tree


def _require_full_confinement(svc: ServiceProcess) -> bool:
    """Where the machine cannot confine, the service must say so loudly; tests of the
    layers then check that instead of the layers."""
    if FULLY_CONFINED:
        return True
    assert "WARNING: cluster processes run without" in svc.log.read_text()
    return False


# -- 1. nothing a scheduler sends is unpickled or trusted --------------------------------------


def test_poisoned_reports_are_never_unpickled_or_trusted(
        hostile_service: ServiceProcess, tmp_path: Path) -> None:
    svc = hostile_service
    c = svc.create("alpha", workers=1)
    try:
        poisoned_reports_are_harmless(svc, "alpha", c, tmp_path / "pwned")
    finally:
        with svc.client("alpha") as http:
            http.delete(f"/clusters/{c['id']}")


# -- 2. tenant input only after confinement ----------------------------------------------------


@pytest.mark.parametrize("name", ["LD_PRELOAD", "LD_LIBRARY_PATH", "DASK_LOGGING__VERSION",
                                  "DASK_CONFIG", "HOME", "TMPDIR", "PATH", "OPENSSL_CONF",
                                  "OPENSSL_MODULES", "GCONV_PATH", "LOCPATH", "NLSPATH",
                                  "GLIBC_TUNABLES", "PYTHONPATH", "PYTHONSTARTUP", "LC_ALL",
                                  "MALLOC_ARENA_MAX", "BASH_ENV"])
def test_runtime_variables_are_refused_by_name(service: ServiceProcess, name: str) -> None:
    with service.client("alpha") as http:
        r = http.post("/clusters", json={"env": {name: "/tmp/evil"}})
    assert r.status_code == 422, r.text
    assert name in r.json()["detail"] and "runtime" in r.json()["detail"]


def test_tenant_files_are_read_only_after_confinement(
        hostile_service: ServiceProcess, victims: tuple[dict[str, Any], dict[str, Any]]) -> None:
    """A Dask config file the tenant plants in its folder (with a worker preload) is read by
    the next worker only after that worker confined itself: the preload runs as the tenant,
    without the service's state in reach; and the config is honoured (read again after fork)."""
    svc = hostile_service
    a, _ = victims
    secret = str(make_url(svc.state).database) if svc.state.startswith("sqlite") \
        else str(svc.tenants_file)
    with connect(svc, "alpha", a) as client:
        home = client.submit(lambda: os.environ["HOME"], pure=False).result(timeout=30)
        report = f"{home}/preload-report.json"
        client.submit(hostile.plant_config, secret, report, pure=False).result(timeout=30)
        first = set(client.scheduler_info()["workers"])
        with svc.client("alpha") as http:
            assert http.post(f"/clusters/{a['id']}/scale", json={"workers": 2}).status_code == 200
        client.wait_for_workers(2, timeout=60)
        new = sorted(set(client.scheduler_info()["workers"]) - first)[0]
        found = client.submit(hostile.read_json, report, workers=[new], pure=False).result(timeout=30)
        allowed = client.submit(lambda: __import__("dask").config.get(
            "distributed.scheduler.allowed-failures"), workers=[new], pure=False).result(timeout=30)
        with svc.client("alpha") as http:
            http.post(f"/clusters/{a['id']}/scale", json={"workers": 1})
    assert allowed == 7, "the planted config must be read (again) by the new worker"
    if _require_full_confinement(svc):
        assert found["uid"] != 0 and found["secret"] == "absent", found


# -- 3. the service reads nothing a tenant writes but one checked word --------------------------


def _plant_and_die(kind: str, target: str) -> None:
    """On the scheduler: leave a trap where the service looks for the reaped reason, then die
    (not by reaping), so the service goes to read it."""
    path = os.path.join(os.environ["HOME"], ".reaped")
    if kind == "symlink":
        os.symlink(target, path)
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "huge":
        with open(path, "wb") as f:
            f.write(b"idle" + b"\n" * (50 * 2**20))
    elif kind == "forged":
        with open(path, "w") as f:
            f.write("idle\n2026-01-01 00:00:00,000 level=ERROR FORGED-LINE")
    os._exit(3)


@pytest.mark.parametrize("kind", ["symlink", "fifo", "huge", "forged"])
def test_traps_in_the_cluster_folder_are_never_followed_or_trusted(
        hostile_service: ServiceProcess, kind: str) -> None:
    svc = hostile_service
    assert svc.proc is not None
    c = svc.create("beta", workers=0)
    with connect(svc, "beta", c, workers=0) as client, contextlib.suppress(Exception):
        client.run_on_scheduler(_plant_and_die, kind, f"/proc/{svc.proc.pid}/environ")
    record = wait_until(lambda: (r := svc.get_cluster("beta", c["id"]))["status"] in ("failed", "stopped")
                        and r, timeout=60, what="the cluster to end")
    assert record["status"] == "failed", record
    reason = record["stop_reason"]
    assert reason.startswith("failed: scheduler process") and len(reason) < 200, reason
    assert "PROVISIONER" not in reason and "FORGED" not in reason
    assert svc.get_cluster("beta", c["id"])["status"] == "failed"
    assert "FORGED-LINE" not in svc.log.read_text()
    with svc.client("beta") as http:
        assert http.get("/healthz").status_code == 200


# -- 4. own user, private root, no capabilities -------------------------------------------------


def test_cluster_processes_run_as_their_tenant_in_a_private_root(
        hostile_service: ServiceProcess, victims: tuple[dict[str, Any], dict[str, Any]],
        tmp_path: Path) -> None:
    svc = hostile_service
    assert svc.proc is not None
    a, b = victims
    beta_pids = {f"beta process {i}": r.pid for i, r in enumerate(svc.processes_of(b["id"]))}
    paths = {"beta's log": str(svc.data_dir / "logs" / b["id"] / "scheduler.log"),
             "beta's folder": str(svc.data_dir / "clusters" / b["id"]),
             "the data folder": str(svc.data_dir), "/etc/shadow": "/etc/shadow",
             # The key that decrypts every cluster's credentials, and the metrics token.
             "the secret key": str(svc.data_dir / "secret.key"),
             "the metrics token": str(svc.data_dir / "metrics-token")}
    if svc.tenants_file is not None:
        paths["the tenants file"] = str(svc.tenants_file)
    if svc.state.startswith("sqlite"):
        paths["the state database"] = str(make_url(svc.state).database)
    for path in paths.values():
        assert Path(path).exists(), path  # else the probe proves nothing
    # A root-only UNIX socket, like a root terminal multiplexer's.
    folder = tmp_path / "root-only"
    folder.mkdir(mode=0o700)
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(folder / "sock"))
    listener.listen()
    args = (paths, {"the service": svc.proc.pid, **beta_pids}, str(folder / "sock"), free_port())
    try:
        with connect(svc, "alpha", a) as ca, connect(svc, "beta", b) as cb:
            alpha = [ca.submit(hostile.identity, pure=False).result(timeout=30),
                     ca.run_on_scheduler(hostile.identity)]
            reached = [ca.submit(hostile.reach, *args, pure=False).result(timeout=30),
                       ca.run_on_scheduler(hostile.reach, *args)]
            beta = cb.submit(hostile.identity, pure=False).result(timeout=30)
            alpha_shm = ca.submit(hostile.leave_shared_memory, "alpha-was-here", "secret",
                                  pure=False).result(timeout=30)
            beta_shm = cb.submit(hostile.leave_shared_memory, "beta-was-here", "secret",
                                 pure=False).result(timeout=30)
    finally:
        listener.close()
    if not _require_full_confinement(svc):
        return
    for who in alpha:
        assert who["uid"] == who["euid"] == who["gid"] == alpha[0]["uid"] >= 1000, who
        assert who["groups"] == [] and who["cap_eff"] == 0 and who["cap_bnd"] == 0, who
        assert who["no_new_privs"] == "1" and who["setuid_root"] == "denied", who
        assert who["home"] == sandbox.HOME_INSIDE == who["cwd"], who
    assert beta["uid"] not in (0, alpha[0]["uid"]), "each tenant runs as its own user"
    for found in reached:
        assert found.pop("write own folder") == found.pop("write /tmp") == "allowed", found
        assert found.pop("bind an ephemeral port") == "allowed", found
        assert found.pop("write /usr") in ("denied", "error 30"), found  # read-only
        for label in paths:
            assert found.pop(f"read {label}") in ("absent", "denied"), label
        for label in args[1]:
            assert found.pop(f"see {label}") == "no", label
            assert found.pop(f"environ of {label}") == "absent", label
            assert found.pop(f"signal {label}") in ("denied", "no such process"), label
        assert found == {"connect root's unix socket": "absent", "bind a chosen port": "denied",
                         "extra devices": "none", "block devices": "none"}, found
    assert "beta-was-here" not in alpha_shm and "alpha-was-here" not in beta_shm


# -- 5 and 6. resources, escapes and ports --------------------------------------------------------


def test_memory_tasks_and_cpu_are_limited_and_nothing_outlives_its_cluster(
        hostile_service: ServiceProcess) -> None:
    svc = hostile_service
    c = svc.create("alpha", workers=1, worker_cores=1.5, worker_memory="512MiB")
    try:
        with connect(svc, "alpha", c) as client:
            threads = set(client.nthreads().values())
            escaped = client.submit(hostile.escape, pure=False).result(timeout=30)
            child = client.submit(hostile.allocate_in_child, 1 * GiB, pure=False).result(timeout=120)
            shm = client.submit(hostile.fill, "/dev/shm/big", 1 * GiB, pure=False).result(timeout=120)
            started = client.submit(hostile.threads_until_refused, pure=False).result(timeout=120)
            assert client.submit(sum, [2, 3], pure=False).result(timeout=30) == 5, "worker alive"
        assert threads == {2}, "1.5 cores: two whole threads (and 1.5 cores of CPU time)"
        assert os.path.exists(f"/proc/{escaped}"), "the escaped process runs while its cluster does"
        if not _require_full_confinement(svc):
            return
        assert child == -9, "a child over the worker's memory is killed by the kernel"
        assert shm == "ENOSPC", "shared memory is bounded (and counted as the worker's)"
        assert started < 1024, "tasks (threads) are bounded"
        tree = _tree(svc)
        worker = next(p for p in tree.children([c["id"]]) if p != "scheduler")
        assert tree.oom_kills([c["id"], worker]) >= 1
        assert (tree.where("cpu", [c["id"], worker]) / "cpu.cfs_quota_us").read_text().strip() == "150000"
        limit = int((tree.where("memory", [c["id"], worker]) / "memory.limit_in_bytes").read_text())
        assert limit == 512 * MiB
    finally:
        with svc.client("alpha") as http:
            assert http.delete(f"/clusters/{c['id']}").status_code == 200
    wait_until(lambda: svc.get_cluster("alpha", c["id"])["status"] == "stopped", what="stopped")
    wait_until(lambda: not os.path.exists(f"/proc/{escaped}"), timeout=15,
               what="the escaped process to die with its cluster")
    if FULLY_CONFINED:
        assert c["id"] not in _tree(svc).children()


def test_fractions_of_a_core_are_charged_as_what_they_get(service: ServiceProcess) -> None:
    with service.client("alpha") as http:
        r = http.post("/clusters", json={"worker_cores": 1e-9})
    assert r.status_code == 422 and "worker_cores" in r.json()["detail"], r.text


def test_a_cluster_process_cannot_take_the_services_port(
        hostile_service: ServiceProcess, victims: tuple[dict[str, Any], dict[str, Any]]) -> None:
    """Even while the service is down (its port free), a tenant's process cannot bind it."""
    svc = hostile_service
    a, _ = victims

    def take(port: int) -> str:
        return hostile.outcome(lambda: socket.socket().bind(("127.0.0.1", port)))

    with connect(svc, "alpha", a) as client:
        result = client.submit(take, svc.port, pure=False).result(timeout=30)
    if _require_full_confinement(svc):
        assert result == "denied", result
