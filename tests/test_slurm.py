"""The Slurm backend against a real Slurm (munged, slurmctld, slurmd started by these tests):
clusters as jobs of each tenant's own Unix user, scale, adapt, reaping, memory, restart, and
what a hostile tenant can leave for the service to read.

Slurm does not care which database holds the service's state: these run on the SQLite pass.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from distributed import Client

from tests.service import GiB, MiB, ServiceProcess, tenant, wait_until
from tests.slurm import TEST_UID_BASE, SlurmCluster, ensure_user, let_others_run

pytestmark = pytest.mark.state_agnostic

USERS = {"alpha": "dpt-alpha", "beta": "dpt-beta"}


@pytest.fixture(scope="module")
def slurm() -> Iterator[SlurmCluster]:
    for offset, user in enumerate(USERS.values()):
        ensure_user(user, TEST_UID_BASE + offset)
    import sys

    import clusters

    let_others_run(sys.executable, sys.prefix, Path(clusters.__file__).parent)
    cluster = SlurmCluster()
    try:
        yield cluster.start()
    finally:
        cluster.stop()


def slurm_tenants() -> list[dict[str, Any]]:
    alpha = tenant("alpha", cores=8, memory=8 * GiB, clusters=4)
    alpha.update(slurm_user=USERS["alpha"], slurm_account="acct-alpha")
    beta = tenant("beta", cores=4, memory=4 * GiB, clusters=2)
    beta.update(slurm_user=USERS["beta"], slurm_account="acct-beta", slurm_partition="small")
    return [alpha, beta]


def slurm_service(directory: Path, slurm: SlurmCluster) -> ServiceProcess:
    return ServiceProcess(
        directory, slurm_tenants(), env=slurm.env,
        args=["--backend", "slurm", "--slurm-folder", str(slurm.root / "jobs")])


@pytest.fixture(scope="module")
def svc(slurm: SlurmCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    service = slurm_service(tmp_path_factory.mktemp("slurm-service"), slurm)
    try:
        yield service.start()
    finally:
        service.cleanup()
        slurm.cancel_all()


def jobs_of(slurm: SlurmCluster, cluster_id: str, live: bool = True) -> list[dict[str, Any]]:
    """The cluster's jobs in Slurm's queue (by our comment marker's cluster id)."""
    jobs = slurm.live_jobs() if live else slurm.jobs()
    return [j for j in jobs if f" {cluster_id} " in j.get("comment", "")]


def computes(svc: ServiceProcess, name: str, c: dict[str, Any], workers: int) -> Client:
    client = Client(c["scheduler_address"], security=svc.security(name, c["id"]), timeout=30)
    client.wait_for_workers(workers, timeout=60)
    assert client.submit(lambda x: x * 7, 6).result(timeout=60) == 42
    return client


def running_workers(svc: ServiceProcess, name: str, cluster_id: str) -> int:
    return int(svc.get_cluster(name, cluster_id)["workers"]["running"])


def delete_and_check_gone(svc: ServiceProcess, slurm: SlurmCluster, name: str,
                          cluster_id: str) -> None:
    with svc.client(name) as http:
        assert http.delete(f"/clusters/{cluster_id}").status_code == 200
    wait_until(lambda: svc.get_cluster(name, cluster_id)["status"] == "stopped",
               what="stopped")
    assert svc.get_cluster(name, cluster_id)["outcome"]["reason"] == "user"
    assert jobs_of(slurm, cluster_id) == [], "no job of a stopped cluster is left in squeue"


def test_clusters_are_jobs_of_each_tenants_user_and_account(svc: ServiceProcess,
                                                            slurm: SlurmCluster) -> None:
    a = svc.create("alpha", workers=1)
    b = svc.create("beta", workers=1)
    assert a["scheduler_address"].startswith("tls://127.0.0.1:")
    with computes(svc, "alpha", a, 1), computes(svc, "beta", b, 1):
        pass
    for name, c, account, partition in (("alpha", a, "acct-alpha", "debug"),
                                        ("beta", b, "acct-beta", "small")):
        jobs = jobs_of(slurm, c["id"])
        assert len(jobs) == 2, jobs
        assert {j["user_name"] for j in jobs} == {USERS[name]}
        assert {j["account"] for j in jobs} == {account}
        assert {j["partition"] for j in jobs} == {partition}
        names = {j["name"] for j in jobs}
        assert f"dask-{c['id']}-scheduler" in names
        assert any(n.startswith(f"dask-{c['id']}-w") for n in names), names
        worker = next(j for j in jobs if "-w" in j["name"])
        assert worker["memory_per_node"] == 512 and worker["cpus"] == 1
    # The kernel keeps them apart too: beta's user cannot enter alpha's cluster folder.
    folder = slurm.root / "jobs" / a["id"]
    assert folder.stat().st_uid != 0 and (folder.stat().st_mode & 0o777) == 0o700
    peek = subprocess.run(["runuser", "-u", USERS["beta"], "--", "ls", str(folder)],
                          capture_output=True, text=True)
    assert peek.returncode != 0 and "Permission denied" in peek.stderr
    # Alpha's own code leaves links out of its folder; removing the folder never follows them.
    outside = slurm.root / "not-alpha-s"
    (outside / "sub").mkdir(parents=True)
    (outside / "sub" / "keep").write_text("keep me")
    for link, target in (("to-file", outside / "sub" / "keep"), ("to-dir", outside),
                         ("scheduler.address", outside / "sub" / "keep")):
        made = subprocess.run(["runuser", "-u", USERS["alpha"], "--", "ln", "-sfn", str(target),
                               str(folder / link)], capture_output=True, text=True)
        assert made.returncode == 0, made.stderr
    delete_and_check_gone(svc, slurm, "beta", b["id"])
    delete_and_check_gone(svc, slurm, "alpha", a["id"])
    assert not folder.exists()
    assert (outside / "sub" / "keep").read_text() == "keep me"


def test_scale_adapt_and_idle_reap(svc: ServiceProcess, slurm: SlurmCluster) -> None:
    c = svc.create("alpha", workers=0, idle_timeout=8)
    with svc.client("alpha") as http:
        assert http.post(f"/clusters/{c['id']}/scale", json={"workers": 2}).status_code == 200
    with computes(svc, "alpha", c, 2) as client:
        assert len(client.scheduler_info()["workers"]) == 2
        wait_until(lambda: running_workers(svc, "alpha", c["id"]) == 2, what="2 running")
        assert len(jobs_of(slurm, c["id"])) == 3
        with svc.client("alpha") as http:
            assert http.post(f"/clusters/{c['id']}/scale", json={"workers": 1}).status_code == 200
        wait_until(lambda: len(jobs_of(slurm, c["id"])) == 2, what="a worker job cancelled")
        wait_until(lambda: len(client.scheduler_info()["workers"]) == 1, what="1 worker")
        # Adaptive: a burst of work grows it, quiet shrinks it again.
        with svc.client("alpha") as http:
            r = http.post(f"/clusters/{c['id']}/adapt", json={"minimum": 0, "maximum": 2})
            assert r.status_code == 200, r.text
        futures = client.map(lambda x: time.sleep(1.5) or x, range(16))
        wait_until(lambda: len(jobs_of(slurm, c["id"])) == 3, timeout=60, what="adapt up")
        assert sum(client.gather(futures)) == sum(range(16))
        del futures
        wait_until(lambda: len(jobs_of(slurm, c["id"])) == 1, timeout=90, what="adapt down")
    # Idle: nobody computes, so it reaps itself; no job is left behind.
    wait_until(lambda: svc.get_cluster("alpha", c["id"])["status"] == "stopped", timeout=90,
               what="idle reap")
    assert svc.get_cluster("alpha", c["id"])["outcome"]["reason"] == "idle"
    wait_until(lambda: jobs_of(slurm, c["id"]) == [], timeout=30, what="jobs gone")


def test_a_cluster_nobody_connects_to_is_reaped(svc: ServiceProcess, slurm: SlurmCluster) -> None:
    c = svc.create("beta", workers=1, no_client_timeout=4)
    wait_until(lambda: svc.get_cluster("beta", c["id"])["status"] == "stopped", timeout=60,
               what="no-client reap")
    assert svc.get_cluster("beta", c["id"])["outcome"]["reason"] == "no-client"
    wait_until(lambda: jobs_of(slurm, c["id"]) == [], timeout=30, what="jobs gone")


def test_worker_over_its_memory_is_replaced(svc: ServiceProcess, slurm: SlurmCluster) -> None:
    c = svc.create("alpha", workers=1, worker_memory=300 * MiB)
    with computes(svc, "alpha", c, 1) as client:
        (first,) = client.scheduler_info()["workers"].values()

        def hog() -> int:
            block = bytearray(900 * 2**20)  # three times its limit, at once
            return len(block)

        client.submit(hog, pure=False)
        wait_until(lambda: "OUT_OF_MEMORY" in svc.log.read_text(), timeout=60,
                   what="Slurm's out-of-memory end, in the service's log")
        ended = [j for j in jobs_of(slurm, c["id"], live=False)
                 if j["job_state"] == "OUT_OF_MEMORY"]
        assert ended and ended[0]["name"] == f"dask-{first['name']}"

        def replaced() -> bool:
            names = {w["name"] for w in client.scheduler_info()["workers"].values()}
            return len(names) == 1 and first["name"] not in names
        wait_until(replaced, timeout=60, what="a new worker")
        assert client.submit(lambda: 1 + 1, pure=False).result(timeout=60) == 2
    delete_and_check_gone(svc, slurm, "alpha", c["id"])


def test_scheduler_cancelled_from_outside_fails_the_cluster(svc: ServiceProcess,
                                                            slurm: SlurmCluster) -> None:
    c = svc.create("alpha", workers=1)
    wait_until(lambda: len(jobs_of(slurm, c["id"])) == 2, what="worker job")
    (scheduler,) = [j for j in jobs_of(slurm, c["id"]) if j["name"].endswith("-scheduler")]
    assert slurm.run("scancel", str(scheduler["job_id"])).returncode == 0
    wait_until(lambda: svc.get_cluster("alpha", c["id"])["status"] == "failed", timeout=60,
               what="failed")
    outcome = svc.get_cluster("alpha", c["id"])["outcome"]
    assert outcome["reason"] == "failed"
    assert f"Slurm job {scheduler['job_id']} CANCELLED" in outcome["detail"]
    wait_until(lambda: jobs_of(slurm, c["id"]) == [], timeout=30, what="its worker cancelled")


def test_a_waiting_cluster_says_slurms_reason(svc: ServiceProcess, slurm: SlurmCluster) -> None:
    blocker = slurm.run("sbatch", "--parsable", "--output=/dev/null", f"--chdir={slurm.root}",
                        "--cpus-per-task=8", "--mem=100M", "--wrap", "sleep 300")
    assert blocker.returncode == 0, blocker.stderr
    try:
        wait_until(lambda: any(j["job_state"] == "RUNNING" for j in slurm.live_jobs()),
                   what="the blocker runs")
        with svc.client("beta") as http:
            r = http.post("/clusters", json={"workers": 0})
            assert r.status_code == 201, r.text
            cid = r.json()["id"]
            # Before Slurm first looks at it, a job pends for no reason yet; then for Resources.
            seen = wait_until(lambda: "Resources" in (waiting := http.get(
                f"/clusters/{cid}").json()["waiting"] or "") and waiting, timeout=30,
                              what="Slurm's pending reason")
        assert seen.startswith("scheduler (Slurm job ") and seen.endswith("pending: Resources")
        assert svc.get_cluster("beta", cid)["status"] == "starting"
    finally:
        slurm.run("scancel", blocker.stdout.strip())
    wait_until(lambda: svc.get_cluster("beta", cid)["status"] == "running", timeout=60,
               what="running once the node frees")
    assert svc.get_cluster("beta", cid)["waiting"] is None
    delete_and_check_gone(svc, slurm, "beta", cid)


def test_sigkill_and_restart_readopts_fails_and_cancels(slurm: SlurmCluster,
                                                        tmp_path: Path) -> None:
    svc = slurm_service(tmp_path, slurm)
    try:
        svc.start()
        kept = svc.create("alpha", workers=1)
        doomed = svc.create("beta", workers=0)
        wait_until(lambda: len(jobs_of(slurm, kept["id"])) == 2, what="kept's worker")
        svc.kill()
        # Jobs outlive the service; while it is away one scheduler is cancelled, and a job
        # carrying the service's marker appears that no record accounts for.
        assert len(jobs_of(slurm, kept["id"])) == 2 and len(jobs_of(slurm, doomed["id"])) == 1
        (sched,) = jobs_of(slurm, doomed["id"])
        slurm.run("scancel", str(sched["job_id"]))
        service_id = json.loads(svc.sql("select value from meta where key = 'backend:slurm'")
                                [0][0])["service_id"]
        stray = slurm.run("runuser", "-u", USERS["alpha"], "--", "sbatch", "--parsable",
                          "--output=/dev/null", "--chdir=/", "--wrap", "sleep 300",
                          f"--comment=dask-provisioner {service_id} c-0123 scheduler")
        assert stray.returncode == 0, stray.stderr
        stray_id = int(stray.stdout.strip())
        mine = slurm.run("runuser", "-u", USERS["alpha"], "--", "sbatch", "--parsable",
                         "--output=/dev/null", "--chdir=/", "--wrap", "sleep 300",
                         "--comment=a job of alpha's own")
        wait_until(lambda: jobs_of(slurm, doomed["id"]) == [], what="doomed scheduler gone")

        svc.start()
        after = svc.get_cluster("alpha", kept["id"])
        assert after["status"] == "running"
        assert after["scheduler_address"] == kept["scheduler_address"]
        with computes(svc, "alpha", after, 1):
            pass
        failed = svc.get_cluster("beta", doomed["id"])
        assert failed["status"] == "failed" and "CANCELLED" in failed["outcome"]["detail"]
        live = {j["job_id"] for j in slurm.live_jobs()}
        wait_until(lambda: stray_id not in {j["job_id"] for j in slurm.live_jobs()},
                   what="the stray job of ours cancelled")
        assert int(mine.stdout.strip()) in live, "a tenant's own job is not ours to cancel"
        slurm.run("scancel", mine.stdout.strip())
        delete_and_check_gone(svc, slurm, "alpha", kept["id"])
    finally:
        svc.cleanup()


def test_tenants_need_their_own_existing_non_root_users(slurm: SlurmCluster,
                                                        make_service: Callable[..., ServiceProcess]
                                                        ) -> None:
    cases = {
        "root": [{**tenant("a"), "slurm_user": "root"}],
        "does not exist": [{**tenant("a"), "slurm_user": "no-such-user-here"}],
        "share the Unix user": [{**tenant("a"), "slurm_user": USERS["alpha"]},
                                {**tenant("b"), "slurm_user": USERS["alpha"]}],
    }
    for message, tenants in cases.items():
        svc = make_service(tenants, args=["--backend", "slurm", "--slurm-folder",
                                          str(slurm.root / "refused")], env=slurm.env)
        with pytest.raises(RuntimeError, match=message):
            svc.start(timeout=30)


def test_a_hostile_ports_file_is_never_followed_or_trusted(tmp_path: Path) -> None:
    """What a scheduler job writes in its folder is the tenant's: links, FIFOs, huge files,
    wrong shapes and bad ports are all refused without blocking."""
    from clusters.tenant_files import read_ports

    keys = ("port", "http_port")
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps({"port": 1, "http_port": 2}))
    (tmp_path / "link.json").symlink_to(secret)
    os.mkfifo(tmp_path / "fifo.json")
    (tmp_path / "huge.json").write_text(" " * 10_000 + json.dumps({"port": 1, "http_port": 2}))
    for name, text in {"extra.json": {"port": 1, "http_port": 2, "host": "evil"},
                       "string.json": {"port": "1", "http_port": 2},
                       "bool.json": {"port": True, "http_port": 2},
                       "range.json": {"port": 70000, "http_port": 2},
                       "list.json": [1, 2]}.items():
        (tmp_path / name).write_text(json.dumps(text))
    (tmp_path / "broken.json").write_text('{"port": 1,')
    for name in ("link.json", "fifo.json", "huge.json", "extra.json", "string.json",
                 "bool.json", "range.json", "list.json", "broken.json", "missing.json"):
        assert read_ports(tmp_path, name, keys) is None, name
    assert read_ports(tmp_path, "secret.json", keys) == {"port": 1, "http_port": 2}


def test_squeue_fields_a_tenant_controls_are_checked() -> None:
    """Names and comments are the tenant's to choose (its own jobs share the queue)."""
    from clusters.slurm.jobs import JobState, parse_queue

    raw = {"jobs": [
        {"job_id": 7, "job_state": "RUNNING", "comment": "dask-provisioner 0123456789abcdef "
         "c-1 scheduler", "batch_host": "n1", "exit_code": 0, "state_reason": "None"},
        {"job_id": "8", "job_state": "RUNNING"},  # not an int id: ignored
        {"job_id": 9, "job_state": "SOMETHING_NEW", "comment": "x" * 10_000,
         "batch_host": ["n1"], "exit_code": 80 << 8},
        {"job_id": 10, "job_state": "FAILED", "exit_code": 81 << 8},
        "not a job",
    ]}
    jobs = parse_queue(json.dumps(raw))
    assert sorted(jobs) == [7, 9, 10]
    assert jobs[7].ours("0123456789abcdef") == ("c-1", "scheduler")
    assert jobs[7].ours("fedcba9876543210") is None
    assert jobs[9].state == JobState.OTHER and not jobs[9].state.ended
    assert len(jobs[9].comment) <= 200 and jobs[9].node == ""
    assert jobs[10].scheduler_outcome().reason.value == "no-client"
    assert parse_queue("[]") == {}
    # Slurm 23.02 and later: states are lists, exit codes objects.
    newer = parse_queue(json.dumps({"jobs": [
        {"job_id": 11, "job_state": ["FAILED"], "exit_code": {
            "status": ["EXITED"], "return_code": {"set": True, "number": 80}}},
        {"job_id": 12, "job_state": ["CANCELLED", "COMPLETING"], "exit_code": {
            "status": ["SIGNALED"], "return_code": {"set": True, "number": 0},
            "signal": {"id": {"set": True, "number": 15}, "name": "TERM"}}},
    ]}))
    assert newer[11].scheduler_outcome().reason.value == "idle"
    assert newer[12].state == JobState.CANCELLED and newer[12].signal == 15


def test_sigterm_of_a_running_service_leaves_nothing(slurm: SlurmCluster, tmp_path: Path) -> None:
    svc = slurm_service(tmp_path, slurm)
    try:
        svc.start()
        c = svc.create("alpha", workers=1)
        wait_until(lambda: len(jobs_of(slurm, c["id"])) == 2, what="its worker")
        assert svc.signal(signal.SIGTERM) == 0
        assert jobs_of(slurm, c["id"]) == [], "a service that stops stops its clusters' jobs"
    finally:
        svc.cleanup()
