"""Real kills: a worker is replaced, a dead scheduler fails its cluster and releases its quota."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

import pytest
from distributed import Client

from clusters.local.procs import is_alive
from tests.service import ServiceProcess, tenant, wait_until


def test_killed_worker_is_replaced(service: ServiceProcess) -> None:
    with service.client("alpha") as http:
        c = http.post("/clusters?wait=60", json={"workers": 2, "project": "faults"}).json()
        cid = c["id"]
        try:
            procs = wait_until(lambda: (p := service.processes_of(cid)) and len(p) == 3 and p,
                               what="scheduler and two workers")
            with Client(c["scheduler_address"], security=service.security("alpha", cid),
                        timeout=30) as client:
                client.wait_for_workers(2, timeout=60)
                before = {w["name"] for w in client.scheduler_info()["workers"].values()}
                victim = procs[1]  # a worker (the scheduler is recorded first)
                os.kill(victim.pid, signal.SIGKILL)
                wait_until(lambda: not is_alive(victim), what="victim gone")
                after = wait_until(
                    lambda: (n := {w["name"] for w in client.scheduler_info()["workers"].values()})
                    and len(n) == 2 and n != before and n,
                    what="replacement worker")
                assert len(after & before) == 1
                assert client.submit(sum, [1, 1]).result(timeout=60) == 2
            assert http.get(f"/clusters/{cid}").json()["status"] == "running"
        finally:
            http.delete(f"/clusters/{cid}")


def test_killed_scheduler_fails_the_cluster_and_releases_quota(service: ServiceProcess) -> None:
    with service.client("beta") as http:
        base = http.get("/tenants/me").json()["usage"]
        c = http.post("/clusters?wait=60", json={"workers": 1, "project": "faults"}).json()
        cid = c["id"]
        try:
            procs = wait_until(lambda: (p := service.processes_of(cid)) and len(p) == 2 and p,
                               what="scheduler and worker")
            assert http.get("/tenants/me").json()["usage"]["clusters"] == base["clusters"] + 1
            os.kill(procs[0].pid, signal.SIGKILL)
            final = wait_until(lambda: (x := http.get(f"/clusters/{cid}").json())["status"] == "failed"
                               and x, what="failed")
            assert final["stop_reason"].startswith("failed: scheduler")
            assert "SIGKILL" in final["stop_reason"] or "exited" in final["stop_reason"]
            wait_until(lambda: not any(is_alive(p) for p in procs), what="worker stopped")
            # Its folder goes with it (the service's logs of it stay).
            wait_until(lambda: not (service.data_dir / "clusters" / cid).exists(),
                       what="cluster folder removed")
            assert (service.data_dir / "logs" / cid).is_dir()
            assert http.get("/tenants/me").json()["usage"] == base
            r = http.post(f"/clusters/{cid}/scale", json={"workers": 2})
            assert r.status_code == 409
        finally:
            http.delete(f"/clusters/{cid}")


def _hog(megabytes: int) -> int:
    import time

    data = b"\1" * (megabytes << 20)  # really written, so really resident
    time.sleep(3)
    return len(data)


def test_memory_limit_is_enforced(service: ServiceProcess) -> None:
    """A worker that outgrows its limit is ended (as Dask's nanny would) and replaced."""
    from distributed.scheduler import KilledWorker

    with service.client("alpha") as http:
        c = http.post("/clusters?wait=60", json={"workers": 1, "worker_memory": "300MiB",
                                                 "project": "faults"}).json()
        cid = c["id"]
        try:
            with Client(c["scheduler_address"], security=service.security("alpha", cid),
                        timeout=30) as client:
                client.wait_for_workers(1, timeout=60)
                first = client.run(os.getpid)
                assert client.submit(_hog, 50, pure=False).result(timeout=60) == 50 << 20
                with pytest.raises(KilledWorker):
                    client.submit(_hog, 400, pure=False).result(timeout=120)
                client.wait_for_workers(1, timeout=60)
                assert set(client.run(os.getpid).values()).isdisjoint(first.values())
                assert client.submit(sum, [1, 2]).result(timeout=60) == 3
            assert http.get(f"/clusters/{cid}").json()["status"] == "running"
        finally:
            http.delete(f"/clusters/{cid}")


def test_delete_right_after_create_leaves_nothing(make_service: Callable[..., ServiceProcess]) -> None:
    """A DELETE that lands while the scheduler starts (or before) ends the cluster stopped by
    the user with no process left, whatever moment of the start it interrupts."""
    svc = make_service([tenant("acme", cores=6, clusters=4)]).start()
    before = {p.pid for p in svc.owned()}
    ids = []
    with svc.client("acme") as http:
        for delay in (0, 0.02, 0.05, 0.1, 0.2):
            r = http.post("/clusters", json={"workers": 1})
            assert r.status_code == 201, r.text
            ids.append(r.json()["id"])
            time.sleep(delay)
            assert http.delete(f"/clusters/{ids[-1]}").status_code == 200
        for cid in ids:
            wait_until(lambda cid=cid: http.get(f"/clusters/{cid}").json()["status"]
                       in ("stopped", "failed"), what=f"{cid} ended")
            ended = http.get(f"/clusters/{cid}").json()
            assert (ended["status"], ended["stop_reason"]) == ("stopped", "user"), ended
        assert http.get("/tenants/me").json()["usage"]["clusters"] == 0
    wait_until(lambda: {p.pid for p in svc.owned()} <= before, what="no cluster process left")
