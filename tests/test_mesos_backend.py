"""The Mesos backend end to end: the real service (``--backend mesos``) against the test
master in its own process, whose agents run every task as a real process on this machine.

Every test owns its master and its service; fixtures stop the service first (its clusters'
tasks are killed) and then the master (which SIGKILLs any task process left), so nothing
outlives a test, failed or not. Heartbeats and allocation are fast to keep tests short.
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from cryptography.fernet import Fernet
from distributed import Client

from clusters.base import ClusterSpec, LaunchError, Outcome
from clusters.mesos import MesosBackend
from tests.mesos_master import AgentSpec, MesosMaster, MesosMasterProcess
from tests.service import GiB, ServiceProcess, tenant, wait_until

MakeService = Callable[..., ServiceProcess]
MakeMaster = Callable[..., MesosMasterProcess]
#: The agents of the test master are this machine: run Dask with this very interpreter.
RUNNER = f"{sys.executable} -m clusters.runner"
LIVE = {"TASK_STAGING", "TASK_STARTING", "TASK_RUNNING", "TASK_KILLING"}


_HANDED_OUT: set[int] = set()


def port_block(size: int = 100) -> tuple[int, int]:
    """A range of free ports below the ephemeral range, away from the agents' default
    31000+ (other test runs on this machine may be using those). Never one handed out before:
    two agents sharing a range offer the same ports, and a task given a port another agent's
    task holds cannot bind it."""
    for _ in range(50):
        base = random.randrange(12000, 30000 - size, size)
        if base in _HANDED_OUT:
            continue
        try:
            for port in range(base, base + size):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        _HANDED_OUT.add(base)
        return base, base + size - 1
    raise RuntimeError("no free port block")


@pytest.fixture
def mesos() -> Iterator[MakeMaster]:
    """Starts a test master; ``agents=N`` agents each get their own free port range."""
    made: list[MesosMasterProcess] = []

    def make(agents: int = 1, agent_cpus: float = 4, agent_mem: float = 4096,
             **options: Any) -> MesosMasterProcess:
        begin, end = port_block()
        settings = {"heartbeat": 1.0, "allocation_interval": 0.3, "retry_interval": 2.0}
        master = MesosMasterProcess(agents=1, agent_cpus=agent_cpus, agent_mem=agent_mem,
                                    extra_args=["--agent-ports", f"{begin}-{end}"],
                                    **{**settings, **options})
        made.append(master)
        master.start()
        for _ in range(agents - 1):
            master.add_agent(cpus=agent_cpus, mem=agent_mem, ports=[port_block()])
        return master

    try:
        yield make
    finally:
        for master in made:
            master.stop()


def on_mesos(make_service: MakeService, master: MesosMasterProcess,
             tenants: list[dict[str, Any]], workdir: Any = None) -> ServiceProcess:
    args = ["--backend", "mesos", "--mesos-master", master.address, "--mesos-command", RUNNER]
    return make_service(tenants, args=args, env={"PROVISIONER_MESOS_KILL_GRACE": "2"},
                        workdir=workdir)


# -- helpers -----------------------------------------------------------------------------------


def framework(master: MesosMasterProcess) -> dict[str, Any]:
    frameworks = master.state()["frameworks"]
    assert len(frameworks) == 1, frameworks
    return frameworks[0]


def tasks(master: MesosMasterProcess, prefix: str = "", live: bool = True) -> list[dict[str, Any]]:
    found = []
    for fw in master.state()["frameworks"]:
        for task in fw["tasks"]:
            if task["task_id"].startswith(prefix) and (not live or task["state"] in LIVE):
                found.append(task)
    return found


def running_ids(master: MesosMasterProcess, prefix: str) -> set[str]:
    return {t["task_id"] for t in tasks(master, prefix) if t["state"] == "TASK_RUNNING"}


def scale(svc: ServiceProcess, name: str, cid: str, workers: int) -> None:
    with svc.client(name) as http:
        r = http.post(f"/clusters/{cid}/scale", json={"workers": workers})
        assert r.status_code == 200, r.text


def computes(svc: ServiceProcess, name: str, cluster: dict[str, Any],
             workers: int) -> set[str]:
    security = svc.security(name, cluster["id"])
    with Client(cluster["scheduler_address"], security=security, timeout=30) as client:
        client.wait_for_workers(workers, timeout=60)
        assert client.submit(lambda x: x * 7, 6).result(timeout=60) == 42
        names = {w["name"] for w in client.scheduler_info()["workers"].values()}
    return names


def status_is(svc: ServiceProcess, name: str, cid: str, *wanted: str) -> Any:
    c = svc.get_cluster(name, cid)
    return c if c["status"] in wanted else None


def backend_workers(svc: ServiceProcess, cid: str) -> set[str]:
    """The worker tasks the service's record of a cluster names (its backend_state)."""
    ((raw,),) = svc.sql("select backend_state from clusters where id = :id", id=cid)
    state = json.loads(raw) if isinstance(raw, str) else raw
    return set((state or {}).get("workers") or {})


def no_offers_held(master: MesosMasterProcess) -> None:
    """Every offer was accepted or declined: none is outstanding for the framework and no
    agent has resources set aside as offered. The test master has no offer timeout, so an
    offer the service kept would stay outstanding (and its resources offered) for good."""
    def settled() -> bool:
        state = master.state()
        return not framework(master)["offers"] and not any(a["offered"] for a in state["agents"])

    wait_until(settled, timeout=10, what="no outstanding offers")


# -- tests -------------------------------------------------------------------------------------


def test_lifecycle_compute_scale_reap_delete(mesos: MakeMaster, make_service: MakeService) -> None:
    master = mesos(agents=1, agent_cpus=4, agent_mem=4096)
    svc = on_mesos(make_service, master, [tenant("acme", cores=4, memory=4 * GiB)]).start()

    c = svc.create("acme", workers=1)
    cid = c["id"]
    port = int(c["scheduler_address"].rsplit(":", 1)[1])
    assert c["scheduler_address"].startswith("tls://127.0.0.1:"), c
    offered = master.state()["agents"][0]["total"]
    ports = next(r["ranges"]["range"][0] for r in offered if r["name"] == "ports")
    assert ports["begin"] <= port <= ports["end"], (port, ports)  # a port from the offer
    # The dashboard listens on a second port of the offer (the record's upstream, which the
    # service proxies; tenants only see the proxy's URL).
    upstream = svc.upstream(cid)
    assert upstream.startswith("https://127.0.0.1:"), upstream
    dashboard_port = int(upstream.rsplit(":", 1)[1])
    assert ports["begin"] <= dashboard_port <= ports["end"] and dashboard_port != port
    assert c["dashboard_url"] == f"{svc.url}/clusters/{cid}/dashboard/status"
    with svc.client("acme") as http:
        assert http.get(c["dashboard_url"]).status_code == 200
    fw = framework(master)
    assert fw["roles"] == ["acme"] and "MULTI_ROLE" in fw["capabilities"]
    names = computes(svc, "acme", c, 1)
    # A worker's Dask name is its Mesos task id.
    assert names == running_ids(master, f"{cid}-w")
    assert {t["role"] for t in tasks(master, cid)} == {"acme"}

    scale(svc, "acme", cid, 2)
    computes(svc, "acme", c, 2)
    wait_until(lambda: len(running_ids(master, f"{cid}-w")) == 2, what="two worker tasks")
    scale(svc, "acme", cid, 1)
    wait_until(lambda: len(tasks(master, f"{cid}-w")) == 1, what="one worker task left")
    wait_until(lambda: svc.get_cluster("acme", cid)["workers"]["running"] == 1, what="one worker")
    # Nothing pending: the framework stops asking for offers.
    wait_until(lambda: framework(master)["suppressed_roles"] == ["acme"], what="suppressed")
    # Offers are never held: all of them were used or declined.
    no_offers_held(master)

    idle = svc.create("acme", workers=0, idle_timeout=3, image="ghcr.io/dask/dask:2026.8.0")
    reaped = wait_until(lambda: status_is(svc, "acme", idle["id"], "stopped"), timeout=60,
                        what="idle reap")
    assert reaped["stop_reason"] == "idle"
    wait_until(lambda: not tasks(master, idle["id"]), what="reaped cluster's tasks gone")

    # Adaptive: worker tasks follow Dask's target within [0, 2], and go when idle. With cid's
    # scheduler and worker the tenant's 4 cores (and the agent's 4 cpus) are exactly used up.
    ad = svc.create("acme", adaptive={"minimum": 0, "maximum": 2})
    aid = ad["id"]
    assert ad["adaptive"] == {"minimum": 0, "maximum": 2} and ad["workers"]["requested"] == 0
    assert not tasks(master, f"{aid}-w")
    with Client(ad["scheduler_address"], security=svc.security("acme", aid),
                timeout=30) as client:
        futures = client.map(time.sleep, [1.0] * 30, pure=False)
        wait_until(lambda: len(running_ids(master, f"{aid}-w")) == 2, timeout=90,
                   what="adaptive growth to two worker tasks")
        grown = wait_until(lambda: (x := svc.get_cluster("acme", aid))["workers"]["running"] == 2 and x,
                           timeout=60, what="two workers connected")
        assert grown["workers"]["requested"] == 2  # never above the maximum
        client.gather(futures, errors="raise")
        assert len(tasks(master, f"{aid}-w")) <= 2
        del futures  # nothing left to compute or to hold: no worker is needed
        wait_until(lambda: not tasks(master, f"{aid}-w"), timeout=90,
                   what="adaptive shrink to no worker task")
    shrunk = svc.get_cluster("acme", aid)
    assert shrunk["status"] == "running" and shrunk["workers"]["requested"] == 0, shrunk
    assert backend_workers(svc, aid) == set()
    assert len(running_ids(master, f"{cid}-w")) == 1  # the other cluster is untouched
    wait_until(lambda: framework(master)["suppressed_roles"] == ["acme"], what="suppressed again")
    no_offers_held(master)

    with svc.client("acme") as http:
        assert http.delete(f"/clusters/{aid}").status_code == 200
        assert http.delete(f"/clusters/{cid}").status_code == 200
    wait_until(lambda: status_is(svc, "acme", cid, "stopped"), what="stopped")
    wait_until(lambda: not tasks(master), what="every task gone")
    state = master.state()
    assert all(t["state"] == "TASK_KILLED" for t in state["completed_tasks"]
               if t.get("task_id", "").startswith(cid)), state["completed_tasks"]
    assert state["frameworks"][0]["connected"]


def test_two_tenants_share_a_small_pool_within_quotas(mesos: MakeMaster,
                                                     make_service: MakeService) -> None:
    # One agent with 3 cpus; Mesos caps role alpha at 1.5 cpus.
    master = mesos(agents=1, agent_cpus=3, agent_mem=4096,
                   quotas={"alpha": {"cpus": 1.5, "mem": 2048}})
    svc = on_mesos(make_service, master, [
        tenant("alpha", cores=3, memory=4 * GiB, clusters=2),
        tenant("beta", cores=3, memory=4 * GiB, clusters=1),
    ]).start()

    def role_cpus(role: str) -> float:
        total = 0.0
        for task in tasks(master):
            if task["role"] == role:
                total += 1.0 if "-w" in task["task_id"] else 0.5
        return total

    a = svc.create("alpha", workers=2)
    b = svc.create("beta", workers=2)
    # Mesos's quota: alpha gets its scheduler and one worker; beta what is left.
    wait_until(lambda: len(running_ids(master, f"{a['id']}-w")) == 1, what="alpha worker")
    wait_until(lambda: len(running_ids(master, f"{b['id']}-w")) == 1, what="beta worker")
    for _ in range(10):
        assert role_cpus("alpha") <= 1.5 and role_cpus("alpha") + role_cpus("beta") <= 3
        time.sleep(0.3)
    assert len(tasks(master, f"{a['id']}-w")) == 1  # the other worker waits for an offer
    computes(svc, "beta", b, 1)

    # A start that gets no offer (alpha's Mesos quota is full) ends at once on DELETE: stopped
    # by the user, not failed after the start timeout, its quota released, nothing launched.
    with svc.client("alpha") as http:
        r = http.post("/clusters", json={"workers": 0})
        assert r.status_code == 201, r.text
        stuck = r.json()["id"]
        time.sleep(1)
        assert http.get(f"/clusters/{stuck}").json()["status"] == "starting"
        held = http.get("/tenants/me").json()["usage"]["clusters"]
        assert http.delete(f"/clusters/{stuck}").status_code == 200
        wait_until(lambda: http.get(f"/clusters/{stuck}").json()["status"] == "stopped",
                   timeout=10, what="the stopped start")
        assert http.get(f"/clusters/{stuck}").json()["stop_reason"] == "user"
        assert http.get("/tenants/me").json()["usage"]["clusters"] == held - 1
    assert not tasks(master, stuck)

    # The service's own quota: 403 with the numbers, nothing launched.
    with svc.client("beta") as http:
        r = http.post("/clusters", json={"workers": 0})
        assert r.status_code == 403 and "clusters" in r.json()["detail"], r.text
    with svc.client("alpha") as http:
        r = http.post("/clusters", json={"workers": 3})
        assert r.status_code == 403 and "cores" in r.json()["detail"], r.text
        assert http.delete(f"/clusters/{a['id']}").status_code == 200
    # Alpha's resources go back to the pool and beta's waiting worker gets them.
    wait_until(lambda: len(running_ids(master, f"{b['id']}-w")) == 2, timeout=60,
               what="beta's second worker")
    computes(svc, "beta", b, 2)
    assert not tasks(master, a["id"])


def test_killed_worker_task_is_replaced(mesos: MakeMaster, make_service: MakeService) -> None:
    master = mesos()
    svc = on_mesos(make_service, master, [tenant("acme", cores=4)]).start()
    c = svc.create("acme", workers=2)
    wait_until(lambda: len(running_ids(master, f"{c['id']}-w")) == 2, what="workers")
    before = running_ids(master, f"{c['id']}-w")
    victim = sorted(before)[0]
    master.kill_task_process(victim)
    wait_until(lambda: (ids := running_ids(master, f"{c['id']}-w")) and len(ids) == 2
               and victim not in ids, timeout=60, what="a replacement worker")
    assert svc.get_cluster("acme", c["id"])["status"] == "running"
    names = computes(svc, "acme", c, 2)
    assert victim not in names


def test_agent_loss_heals_workers_and_fails_on_scheduler_loss(
        mesos: MakeMaster, make_service: MakeService) -> None:
    master = mesos(agents=3, agent_cpus=2, agent_mem=2048)
    svc = on_mesos(make_service, master, [tenant("acme", cores=6)]).start()
    c = svc.create("acme", workers=2)
    wait_until(lambda: len(running_ids(master, f"{c['id']}-w")) == 2, what="workers")
    placed = {t["task_id"]: t["agent_id"] for t in tasks(master, c["id"])}
    sched_agent = next(a for t, a in placed.items() if "-scheduler-" in t)
    worker_agents = {a for t, a in placed.items() if "-w" in t} - {sched_agent}
    assert worker_agents, placed  # 2 cpus per agent: a worker sits elsewhere

    lost_agent = sorted(worker_agents)[0]
    lost = {t for t, a in placed.items() if a == lost_agent}
    master.remove_agent(lost_agent)
    wait_until(lambda: (ids := running_ids(master, f"{c['id']}-w")) and len(ids) == 2
               and not ids & lost, timeout=60, what="workers replaced on other agents")
    assert svc.get_cluster("acme", c["id"])["status"] == "running"
    computes(svc, "acme", c, 2)

    master.remove_agent(sched_agent)
    failed = wait_until(lambda: status_is(svc, "acme", c["id"], "failed"), timeout=60,
                        what="cluster failed")
    assert "TASK_LOST" in failed["stop_reason"] and "AGENT" in failed["stop_reason"], failed
    wait_until(lambda: not tasks(master, c["id"]), what="its workers killed")
    with svc.client("acme") as http:
        assert http.get("/tenants/me").json()["usage"]["clusters"] == 0


def test_sigkill_restart_resubscribes_reconciles_and_keeps_managing(
        mesos: MakeMaster, make_service: MakeService) -> None:
    master = mesos(agents=1, agent_cpus=4, agent_mem=4096)
    svc = on_mesos(make_service, master,
                   [{**tenant("acme", cores=4), "mesos_role": "eng/acme"}])
    # A fresh machine has only the database and what the operator gives every replica (the
    # secret key, from a Secret): the key file of the data folder goes below.
    svc.env["PROVISIONER_SECRET_KEY"] = Fernet.generate_key().decode()
    svc.start()
    kept = svc.create("acme", workers=1)
    doomed = svc.create("acme", workers=0)
    fw_id = framework(master)["id"]
    assert framework(master)["roles"] == ["eng/acme"]
    wait_until(lambda: len(running_ids(master, f"{kept['id']}-w")) == 1, what="worker")
    assert {t["role"] for t in tasks(master)} == {"eng/acme"}
    kept_tasks = running_ids(master, kept["id"])

    svc.kill()
    wait_until(lambda: not framework(master)["connected"], what="framework disconnected")
    # The framework id is kept with the rest of the state, in the database: a fresh machine
    # (nothing left of the data folder but the database) is the same framework.
    (saved,) = svc.sql("select value from meta where key = 'backend:mesos'")
    assert json.loads(saved[0]) == {"framework_id": fw_id, "roles": ["eng/acme"]}
    for entry in svc.data_dir.iterdir() if svc.data_dir.exists() else ():
        if not entry.name.startswith("provisioner.db"):
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    # While the service is away: one scheduler dies, and the record of a worker is lost
    # (the task becomes one the service does not recognise).
    doomed_sched = next(iter(running_ids(master, doomed["id"])))
    master.kill_task_process(doomed_sched)
    stray = next(iter(running_ids(master, f"{kept['id']}-w")))
    ((raw,),) = svc.sql("select backend_state from clusters where id = :id", id=kept["id"])
    state = json.loads(raw) if isinstance(raw, str) else raw
    # ... and the record names a worker task Mesos has never heard of (same agent).
    made_up = f"{kept['id']}-wdeadbe"
    state["workers"][made_up] = {**state["workers"][stray], "task_id": made_up}
    del state["workers"][stray]
    svc.sql("update clusters set backend_state = :s where id = :id", s=json.dumps(state),
            id=kept["id"])
    assert running_ids(master, kept["id"]) == kept_tasks  # tasks outlive the service

    svc.start()
    fw = framework(master)
    assert fw["id"] == fw_id and fw["connected"], fw  # same framework, not a new one
    after = svc.get_cluster("acme", kept["id"])
    assert after["status"] == "running"
    assert after["scheduler_address"] == kept["scheduler_address"]
    # The unrecognised task is killed and the cluster gets a new worker in its place.
    wait_until(lambda: stray not in running_ids(master, ""), what="stray task killed")
    wait_until(lambda: len(running_ids(master, f"{kept['id']}-w")) == 1, what="new worker")
    # Explicit reconciliation: Mesos does not know the made-up task, so it is not counted as
    # the cluster's worker; the record ends up naming exactly the one real worker task.
    wait_until(lambda: backend_workers(svc, kept["id"])
               == running_ids(master, f"{kept['id']}-w"), what="record of real tasks only")
    assert made_up not in backend_workers(svc, kept["id"])
    assert made_up not in {t["task_id"] for t in tasks(master, "", live=False)}
    wait_until(lambda: svc.get_cluster("acme", kept["id"])["workers"]["running"] == 1,
               what="one connected worker")
    failed = wait_until(lambda: status_is(svc, "acme", doomed["id"], "failed"), what="doomed")
    assert "scheduler" in failed["stop_reason"] and "TASK_FAILED" in failed["stop_reason"]

    # Still managed: scale and delete work on the re-adopted cluster.
    scale(svc, "acme", kept["id"], 2)
    names = computes(svc, "acme", kept, 2)
    assert names == running_ids(master, f"{kept['id']}-w") == backend_workers(svc, kept["id"])
    assert made_up not in names
    with svc.client("acme") as http:
        assert http.delete(f"/clusters/{kept['id']}").status_code == 200
    wait_until(lambda: not tasks(master), what="every task gone")


def test_a_cluster_on_mesos_reaps_itself_when_the_service_is_gone(
        mesos: MakeMaster, make_service: MakeService) -> None:
    """With no word from the service for the orphan lease, the scheduler applies its own idle
    rules and exits with a code that says so; after a restart the record says why."""
    master = mesos(agents=1, agent_cpus=4, agent_mem=4096)
    args = ["--backend", "mesos", "--mesos-master", master.address, "--mesos-command", RUNNER]
    svc = make_service([tenant("acme", cores=4)], args=args,
                       env={"PROVISIONER_MESOS_KILL_GRACE": "2", "PROVISIONER_ORPHAN_LEASE": "2"}).start()
    c = svc.create("acme", workers=1, no_client_timeout=3, idle_timeout=600)
    svc.kill()
    wait_until(lambda: not running_ids(master, f"{c['id']}"), timeout=90,
               what="scheduler and worker tasks end on their own")
    svc.start()
    reaped = wait_until(lambda: status_is(svc, "acme", c["id"], "stopped"), what="stopped")
    # The exit status says why: no client (the idle timeout is far longer).
    assert reaped["stop_reason"] == "no-client", reaped
    with svc.client("acme") as http:
        assert http.get("/tenants/me").json()["usage"]["clusters"] == 0


def test_dropped_stream_resubscribes_and_carries_on(mesos: MakeMaster,
                                                    make_service: MakeService) -> None:
    master = mesos()
    svc = on_mesos(make_service, master, [tenant("acme", cores=4)]).start()
    c = svc.create("acme", workers=1)
    fw_id = framework(master)["id"]
    before = running_ids(master, c["id"])

    master.drop_framework_stream(fw_id)
    wait_until(lambda: framework(master)["connected"], what="re-subscribed")
    assert framework(master)["id"] == fw_id
    scale(svc, "acme", c["id"], 2)  # needs offers again: revive on the new stream
    computes(svc, "acme", c, 2)
    assert before <= running_ids(master, c["id"])  # nothing restarted

    # A leader change: every stream ends, the new leader re-adopts the framework.
    master.fail_over()
    wait_until(lambda: master.state()["frameworks"] and framework(master)["connected"],
               what="re-subscribed to the new leader")
    assert framework(master)["id"] == fw_id
    scale(svc, "acme", c["id"], 1)
    wait_until(lambda: len(tasks(master, f"{c['id']}-w")) == 1, what="scaled down")
    assert svc.get_cluster("acme", c["id"])["status"] == "running"


# -- the backend in-process, tasks without processes: bookkeeping edge cases -------------------


class Events:
    """Records what the backend reports to the core; ``saved`` stands for the database row of
    the backend's own state (pass one Events' ``saved`` to the next to model a restart)."""

    def __init__(self, saved: dict[str, Any] | None = None) -> None:
        self.saved: dict[str, Any] = saved if saved is not None else {}
        self.states: dict[str, dict[str, Any]] = {}
        self.schedulers_lost: list[tuple[str, Outcome]] = []
        self.workers_lost: list[tuple[str, str, str]] = []

    async def state_changed(self, cluster_id: str, state: dict[str, Any]) -> None:
        self.states[cluster_id] = state

    async def scheduler_lost(self, cluster_id: str, outcome: Outcome) -> None:
        self.schedulers_lost.append((cluster_id, outcome))

    async def worker_lost(self, cluster_id: str, name: str, reason: str) -> None:
        self.workers_lost.append((cluster_id, name, reason))

    async def load_backend_state(self) -> dict[str, Any] | None:
        return self.saved.get("backend")

    async def save_backend_state(self, state: dict[str, Any] | None) -> None:
        self.saved["backend"] = state


def spec(cluster_id: str = "c1", role: str = "acme") -> ClusterSpec:
    return ClusterSpec(cluster_id, role, role, worker_cores=1, worker_memory=512 * 2**20,
                       scheduler_cores=0.5, scheduler_memory=256 * 2**20)


async def eventually(check: Callable[[], Any], timeout: float = 10) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {check}")


def task_states(master: MesosMaster) -> dict[str, str]:
    state = master.state()
    found = {t["task_id"]: t["state"] for t in state["completed_tasks"]}
    for fw in state["frameworks"]:
        found.update({t["task_id"]: t["state"] for t in fw["tasks"]})
    return found


def backend_for(master: MesosMaster, **options: Any) -> MesosBackend:
    settings = {"kill_grace": 0.5, "recover_timeout": 3, "backoff_max": 1}
    return MesosBackend(master.address, **{**settings, **options})


async def test_backend_acks_kills_and_restarts_without_teardown() -> None:
    async with MesosMaster(agents=1, heartbeat_interval=0.5, allocation_interval=0.1,
                           run_processes=False, update_retry_interval=1) as master:
        events = Events()
        backend = backend_for(master)
        try:
            await backend.open(events)
            assert await backend.recover([]) == {}
            await backend.start_workers(spec(), "tcp://127.0.0.1:1", ["c1-w1", "c1-w2"])
            fw_id = backend.client.framework_id
            assert events.saved["backend"] == {"framework_id": fw_id, "roles": ["acme"]}
            await eventually(lambda: task_states(master).get("c1-w1") == "TASK_RUNNING"
                             and task_states(master).get("c1-w2") == "TASK_RUNNING")
            # Every update with a uuid is acknowledged: nothing waits for a retry.
            await eventually(lambda: all(t["pending_updates"] == 0
                                         for t in master.state()["frameworks"][0]["tasks"]))
            assert set(events.states["c1"]["workers"]) == {"c1-w1", "c1-w2"}
            await eventually(lambda: master.state()["frameworks"][0]["suppressed_roles"] == ["acme"])

            await backend.stop_workers("c1", ["c1-w1"])
            await eventually(lambda: task_states(master).get("c1-w1") == "TASK_KILLED")
            await eventually(lambda: "c1-w1" not in events.states["c1"]["workers"])
            assert backend.live_workers("c1") == {"c1-w2"} and events.workers_lost == []
        finally:
            await backend.close(stop_clusters=False)
        # No TEARDOWN: the framework waits for its failover, its task keeps running.
        await eventually(lambda: not master.state()["frameworks"][0]["connected"])
        assert master.state()["frameworks"][0]["id"] == fw_id
        assert task_states(master)["c1-w2"] == "TASK_RUNNING"

        # A restart whose records no longer name c1-w2: same framework, stray task killed.
        again = backend_for(master)
        try:
            await again.open(Events(events.saved))
            assert again.client.framework_id == fw_id
            assert master.state()["frameworks"][0]["roles"] == ["acme"]  # kept with the id
            assert await again.recover([(spec(), {"scheduler": None, "workers": {}})]) == {
                "c1": Outcome.failed("no scheduler task")}
            await eventually(lambda: task_states(master)["c1-w2"] == "TASK_KILLED")
        finally:
            await again.close(stop_clusters=False)
        assert master.state()["frameworks"][0]["id"] == fw_id


async def test_first_clusters_of_many_new_tenants_at_once_all_get_offers(
        mesos: MakeMaster) -> None:
    """UPDATE_FRAMEWORK replaces the whole role list: ten new roles at once must all end up
    subscribed (not an older, shorter list landing last) and every task must run. The master
    runs in its own process, so concurrent calls really race."""
    roles = [f"t{i}" for i in range(10)]
    master = mesos(agents=4, agent_cpus=8, agent_mem=8192, run_processes=False)
    backend = backend_for(master)
    try:
        await backend.open(Events())
        await backend.recover([])
        await asyncio.gather(*(
            backend.start_workers(spec(f"c-{role}", role), "tcp://127.0.0.1:1",
                                  [f"c-{role}-w{i}" for i in range(2)])
            for role in roles))
        await eventually(lambda: sorted(master.state()["frameworks"][0]["roles"]) == roles)
        await eventually(lambda: sum(s == "TASK_RUNNING" for s in task_states(master).values())
                         == 2 * len(roles), timeout=20)
    finally:
        await backend.close(stop_clusters=True)


async def test_backend_stop_while_waiting_for_offers_and_teardown() -> None:
    async with MesosMaster(agents=[AgentSpec(cpus=0.25, mem=128)], heartbeat_interval=0.5,
                           allocation_interval=0.1, run_processes=False) as master:
        events = Events()
        backend = backend_for(master, teardown_on_close=True)
        try:
            await backend.open(events)
            await backend.recover([])
            starting = asyncio.create_task(backend.start_scheduler(spec()))
            await eventually(lambda: master.state()["frameworks"][0]["roles"] == ["acme"])
            await asyncio.sleep(0.5)  # offers come and go: the scheduler does not fit
            assert not starting.done()
            await backend.stop_cluster("c1")
            with pytest.raises(LaunchError):
                await starting
            assert events.states["c1"] == {"scheduler": None, "workers": {}}
            await eventually(lambda: master.state()["frameworks"][0]["suppressed_roles"] == ["acme"])
            assert task_states(master) == {}
            fw_id = backend.client.framework_id
        finally:
            await backend.close(stop_clusters=True)
        # Asked for explicitly: TEARDOWN removes the framework, and its saved id goes.
        assert fw_id in master.state()["removed_frameworks"]
        assert events.saved["backend"] is None
