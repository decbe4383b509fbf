"""Restart safety: SIGKILL and restart, graceful stop, and --keep-clusters re-adoption."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import Any

from distributed import Client

from clusters.local.procs import is_alive
from tests.service import ServiceProcess, tenant, wait_until

MakeService = Callable[..., ServiceProcess]


def _computes(svc: ServiceProcess, c: dict[str, Any], workers: int) -> None:
    with Client(c["scheduler_address"], security=svc.security("acme", c["id"]), timeout=30) as client:
        client.wait_for_workers(workers, timeout=60)
        assert client.submit(lambda: 6 * 7).result(timeout=60) == 42


def test_sigkill_and_restart_keeps_clusters_managed(make_service: MakeService) -> None:
    svc = make_service([tenant("acme", cores=8)]).start()
    kept = svc.create("acme", workers=1)
    doomed = svc.create("acme", workers=1)
    reaped = svc.create("acme", workers=0, no_client_timeout=6)
    wait_until(lambda: len(svc.processes_of(doomed["id"])) == 2, what="doomed workers")
    wait_until(lambda: len(svc.processes_of(kept["id"])) == 2, what="kept workers")
    kept_pids = svc.processes_of(kept["id"])
    doomed_pids = svc.processes_of(doomed["id"])
    with svc.client("acme") as http:
        usage_before = http.get("/tenants/me").json()["usage"]

    svc.kill()
    # While the service is down the scheduler of one cluster dies.
    os.kill(doomed_pids[0].pid, signal.SIGKILL)
    wait_until(lambda: not is_alive(doomed_pids[0]), what="doomed scheduler exit")
    assert all(is_alive(p) for p in kept_pids), "cluster processes must outlive the service"

    # A folder a crash left behind (its cluster ended, no record accounts for it), holding a
    # link out of it: swept at start, the link removed as itself, never followed.
    outside = svc.workdir / "not-a-cluster-file"
    outside.write_text("keep me")
    orphan = svc.data_dir / "clusters" / "c-0123456789ab"
    (orphan / "sub").mkdir(parents=True)
    (orphan / "sub" / "leftover").write_text("x")
    (orphan / "link").symlink_to(outside)
    (svc.data_dir / "clusters" / "c-0000000000aa").symlink_to(svc.workdir)

    svc.start()
    assert not orphan.exists() and not (svc.data_dir / "clusters" / "c-0000000000aa").is_symlink()
    assert outside.read_text() == "keep me" and svc.workdir.is_dir()
    assert (svc.data_dir / "clusters" / kept["id"]).is_dir(), "a live cluster's folder stays"
    after = svc.get_cluster("acme", kept["id"])
    assert after["status"] == "running" and after["scheduler_address"] == kept["scheduler_address"]
    assert sorted(p.pid for p in svc.processes_of(kept["id"])) == sorted(p.pid for p in kept_pids)
    _computes(svc, kept, 1)

    failed = svc.get_cluster("acme", doomed["id"])
    assert failed["status"] == "failed" and "scheduler" in failed["stop_reason"]
    assert failed["stop_reason"].startswith("failed: ")
    wait_until(lambda: not any(is_alive(p) for p in doomed_pids), what="doomed worker killed")
    with svc.client("acme") as http:
        usage = http.get("/tenants/me").json()["usage"]
        assert usage["clusters"] == usage_before["clusters"] - 1
        assert usage["cores"] == usage_before["cores"] - 1.5

        # Still managed: scale, reap and delete all work on re-adopted clusters.
        assert http.post(f"/clusters/{kept['id']}/scale", json={"workers": 2}).status_code == 200
        _computes(svc, kept, 2)
        final = wait_until(lambda: (c := svc.get_cluster("acme", reaped["id"]))["status"] == "stopped" and c,
                           what="reap after restart")
        assert final["stop_reason"] == "no-client"
        pids = svc.processes_of(kept["id"])
        assert http.delete(f"/clusters/{kept['id']}").status_code == 200
        wait_until(lambda: svc.get_cluster("acme", kept["id"])["status"] == "stopped", what="stopped")
        assert not any(is_alive(p) for p in pids)
    assert svc.owned() == []


def test_graceful_stop_stops_every_cluster(make_service: MakeService) -> None:
    svc = make_service([tenant("acme")]).start()
    c = svc.create("acme", workers=1)
    wait_until(lambda: len(svc.processes_of(c["id"])) == 2, what="worker up")
    pids = svc.processes_of(c["id"])
    assert svc.signal(signal.SIGTERM) == 0
    assert not any(is_alive(p) for p in pids)
    assert svc.owned() == []
    assert f"shutdown: stopped 1 cluster(s): {c['id']}" in svc.log.read_text()  # says what it did
    svc.start()
    stopped = svc.get_cluster("acme", c["id"])
    assert stopped["status"] == "stopped" and stopped["stop_reason"] == "service-shutdown"


def test_keep_clusters_leaves_them_running_and_readopts(make_service: MakeService) -> None:
    svc = make_service([tenant("acme")], args=["--keep-clusters"]).start()
    c = svc.create("acme", workers=1)
    wait_until(lambda: len(svc.processes_of(c["id"])) == 2, what="worker up")
    pids = svc.processes_of(c["id"])
    assert svc.signal(signal.SIGINT) == 0
    assert all(is_alive(p) for p in pids)
    assert (f"shutdown: left 1 cluster(s) running for the next start to adopt: {c['id']}"
            in svc.log.read_text())
    svc.start()
    assert svc.get_cluster("acme", c["id"])["status"] == "running"
    _computes(svc, c, 1)
    with svc.client("acme") as http:
        assert http.delete(f"/clusters/{c['id']}").status_code == 200
    wait_until(lambda: svc.get_cluster("acme", c["id"])["status"] == "stopped", what="stopped")
    assert not any(is_alive(p) for p in pids)


def test_strays_without_records_are_killed_on_start(make_service: MakeService) -> None:
    """A process started just before a crash, with no record of it, is not left orphaned."""
    svc = make_service([tenant("acme")]).start()
    c = svc.create("acme", workers=0)
    (sched,) = svc.processes_of(c["id"])
    svc.kill()
    # Forget the record's process state, as if the crash came between spawn and save.
    svc.sql("update clusters set backend_state = :s where id = :id",
            s='{"scheduler": null, "workers": {}}', id=c["id"])
    svc.start()
    wait_until(lambda: not is_alive(sched), what="stray killed")
    assert svc.get_cluster("acme", c["id"])["status"] == "failed"


def test_a_cluster_reaps_itself_when_the_service_is_gone(make_service: MakeService) -> None:
    """Never left behind: with no word from the service, a cluster applies its own idle rules
    (the lease counts from the end of the service's last long-poll)."""
    svc = make_service([tenant("acme")], env={"PROVISIONER_ORPHAN_LEASE": "2"}).start()
    idle = svc.create("acme", workers=1, no_client_timeout=20, idle_timeout=600)
    busy = svc.create("acme", workers=1, no_client_timeout=4, idle_timeout=600)
    idle_pids = wait_until(lambda: (p := svc.processes_of(idle["id"])) and len(p) == 2 and p,
                           what="idle cluster's worker")
    busy_pids = wait_until(lambda: (p := svc.processes_of(busy["id"])) and len(p) == 2 and p,
                           what="busy cluster's worker")
    with Client(busy["scheduler_address"], security=svc.security("acme", busy["id"]),
                timeout=30) as client:
        client.wait_for_workers(1, timeout=60)
        job = client.submit(time.sleep, 40, pure=False)
        svc.kill()
        # The idle one goes on its own; the computing one stays while it computes.
        wait_until(lambda: not is_alive(idle_pids[0]), timeout=60, what="self-reap")
        assert all(is_alive(p) for p in busy_pids)
        assert not job.done()
        job.cancel()
    # With its client gone and nothing running, the other one goes too.
    wait_until(lambda: not is_alive(busy_pids[0]), timeout=60, what="second self-reap")
    svc.start()
    for c in (idle, busy):
        reaped = svc.get_cluster("acme", c["id"])
        assert reaped["status"] == "stopped" and reaped["stop_reason"] == "no-client", reaped
    wait_until(lambda: not any(is_alive(p) for p in idle_pids + busy_pids), what="workers gone")
    with svc.client("acme") as http:
        assert http.get("/tenants/me").json()["usage"]["clusters"] == 0
