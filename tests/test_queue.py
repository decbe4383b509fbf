"""Queue instead of refuse: a create that does not fit the shared pool (or its tenant's quota)
waits, holding nothing, and is admitted in fair order as room frees; a real service with real
clusters on the local backend.

Clusters here are a scheduler of 0.5 core and a worker of 1 (1.5 cores); the pool has 3.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest

from tests.service import ServiceProcess, tenant, wait_until

MakeService = Callable[..., ServiceProcess]


def post(svc: ServiceProcess, name: str, **body: Any) -> dict[str, Any]:
    with svc.client(name) as http:
        r = http.post("/clusters", json={"workers": 1, **body})
    assert r.status_code == 201, r.text
    return r.json()


def status(svc: ServiceProcess, name: str, cluster_id: str) -> dict[str, Any]:
    return svc.get_cluster(name, cluster_id)


def delete(svc: ServiceProcess, name: str, cluster_id: str) -> dict[str, Any]:
    with svc.client(name) as http:
        r = http.delete(f"/clusters/{cluster_id}")
    assert r.status_code == 200, r.text
    return r.json()


def running(svc: ServiceProcess, name: str, cluster_id: str) -> bool:
    return status(svc, name, cluster_id)["status"] == "running"


def test_pool_queue_fair_order_delete_and_restart(make_service: MakeService) -> None:
    tenants = [tenant("a", cores=8, queue=True), tenant("b", cores=8, queue=True),
               tenant("c", cores=8)]  # c refuses rather than queue (its setting)
    svc = make_service(tenants, args=["--capacity-cores", "3"]).start()
    a1, a2 = post(svc, "a"), post(svc, "a")
    wait_until(lambda: running(svc, "a", a1["id"]) and running(svc, "a", a2["id"]),
               what="a's two clusters")
    # The pool is full: more waits, holding nothing.
    a3 = post(svc, "a")
    assert a3["status"] == "queued" and a3["queue_position"] == 1, a3
    assert a3["waiting_for"].startswith("pool full: cores 1.5 requested, 0 of 3 free")
    a4 = post(svc, "a")
    b1 = post(svc, "b")
    # b holds nothing and a holds the whole pool: b goes first, then a's in their order.
    wait_until(lambda: status(svc, "b", b1["id"])["queue_position"] == 1, what="b first")
    assert [status(svc, "a", c["id"])["queue_position"] for c in (a3, a4)] == [2, 3]
    with svc.client("a") as http:
        usage = http.get("/tenants/me").json()["usage"]
        assert usage["clusters"] == 2 and usage["cores"] == 3, "queued clusters hold nothing"
    # Refused rather than queued: by the request, and by c's own setting.
    with svc.client("a") as http:
        r = http.post("/clusters", json={"workers": 1, "queue": False})
        assert r.status_code == 403 and "pool full" in r.json()["detail"], r.text
    with svc.client("c") as http:
        r = http.post("/clusters", json={"workers": 1})
        assert r.status_code == 403 and "pool full" in r.json()["detail"], r.text
        r = http.post("/clusters", json={"workers": 1, "queue": True})
        assert r.status_code == 201 and r.json()["status"] == "queued", r.text
        c1 = r.json()

    # A queued cluster can be deleted: it ends at once, nothing ever ran.
    gone = delete(svc, "a", a4["id"])
    assert gone["status"] == "stopped" and gone["outcome"]["reason"] == "user"

    def kinds(name: str, cluster_id: str) -> list[tuple[str, str | None]]:
        with svc.client(name) as http:
            r = http.get(f"/clusters/{cluster_id}/events")
        assert r.status_code == 200, r.text
        return [(e["kind"], e["detail"]) for e in r.json()["events"]]

    assert [k for k, _ in kinds("a", a4["id"])] == ["queued", "stopped"]

    # The queue survives a restart (SIGKILL): same order after.
    svc.kill()
    svc.start()
    wait_until(lambda: status(svc, "b", b1["id"])["queue_position"] == 1, what="b first again")
    assert status(svc, "a", a3["id"])["status"] == "queued"
    assert running(svc, "a", a1["id"]), "running clusters are re-adopted"

    # Room frees: b (the smallest share) is admitted and runs; a's waits on.
    delete(svc, "a", a1["id"])
    wait_until(lambda: running(svc, "b", b1["id"]), what="b admitted and running")
    assert status(svc, "a", a3["id"])["status"] == "queued"
    # c holds nothing, a half the pool: c is next, ahead of a's older cluster.
    wait_until(lambda: status(svc, "c", c1["id"])["queue_position"] == 1, what="c next")
    assert status(svc, "a", a3["id"])["queue_position"] == 2
    delete(svc, "b", b1["id"])
    wait_until(lambda: running(svc, "c", c1["id"]), what="c admitted")
    assert status(svc, "a", a3["id"])["status"] == "queued"
    delete(svc, "a", a2["id"])
    wait_until(lambda: running(svc, "a", a3["id"]), what="a's queued cluster admitted at last")
    for name, c in (("a", a3), ("c", c1)):
        delete(svc, name, c["id"])

    # What happened, and why: the queued-then-admitted (across a restart).
    wait_until(lambda: kinds("b", b1["id"])[-1][0] == "stopped", what="b's end recorded")
    b_events = kinds("b", b1["id"])
    assert [k for k, _ in b_events] == ["queued", "admitted", "running", "stopping", "stopped"]
    assert b_events[0][1].startswith("pool full: cores 1.5 requested")
    assert b_events[-1][1] == "user"
    assert [k for k, _ in kinds("a", a1["id"])][:2] == ["created", "running"]
    with svc.client("b") as http:  # another tenant's cluster is not found
        assert http.get(f"/clusters/{a1['id']}/events").status_code == 404
    shown = subprocess.run(
        [sys.executable, "-m", "provisioner.cli", "clusters", "events", b1["id"]],
        env={**os.environ, "PROVISIONER_URL": svc.url, "PROVISIONER_TOKEN": "token-b"},
        capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert "admitted" in shown.stdout and "pool full" in shown.stdout


def test_a_tenant_past_its_own_quota_queues_for_itself(make_service: MakeService) -> None:
    svc = make_service([tenant("solo", cores=2, clusters=2, queue=True)]).start()
    first = post(svc, "solo")
    second = post(svc, "solo")
    assert second["status"] == "queued"
    assert second["waiting_for"].startswith("quota exceeded: cores 1.5 requested, 0.5 of 2 free")
    # As many may wait as its quota of clusters could run; more are refused.
    third = post(svc, "solo")
    assert third["status"] == "queued" and third["queue_position"] == 2
    with svc.client("solo") as http:
        r = http.post("/clusters", json={"workers": 1})
    assert r.status_code == 403 and "queue full" in r.json()["detail"], r.text
    # The SDK and the CLI say why it waits; a live listing shows queued clusters.
    from provisioner.client import Provisioner, ProvisionerError

    with Provisioner(svc.url, "token-solo") as p:
        info = p.get_cluster(second["id"])
        assert info.why_waiting == f"#1 in the queue: {second['waiting_for']}"
        assert {c.id for c in p.list_clusters()} == {first["id"], second["id"], third["id"]}
        with pytest.raises(ProvisionerError, match=r"status queued; #2 in the queue: behind"):
            p.connect(third["id"], timeout=1)
    shown = subprocess.run(
        [sys.executable, "-m", "provisioner.cli", "clusters", "show", second["id"]],
        env={**os.environ, "PROVISIONER_URL": svc.url, "PROVISIONER_TOKEN": "token-solo",
             "COLUMNS": "200"}, capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert "waiting" in shown.stdout and "#1 in the queue: quota exceeded" in shown.stdout
    # A scale of a queued cluster changes what it will ask for, nothing else.
    with svc.client("solo") as http:
        r = http.post(f"/clusters/{second['id']}/scale", json={"workers": 0})
    assert r.status_code == 200 and r.json()["status"] == "queued"
    # A cluster bigger than the whole quota would wait forever: refused, never queued.
    with svc.client("solo") as http:
        r = http.post("/clusters", json={"workers": 5})
    assert r.status_code == 403 and "quota exceeded: cores 5.5" in r.json()["detail"], r.text
    # The scale made second fit (0.5 + 1.5 = 2): admitted; third still waits behind.
    wait_until(lambda: running(svc, "solo", second["id"]), what="second admitted")
    assert status(svc, "solo", second["id"])["workers"]["requested"] == 0
    assert status(svc, "solo", third["id"])["status"] == "queued"
    # A graceful stop ends what runs and leaves the queue as it is, for the next start.
    assert svc.signal(signal.SIGTERM) == 0
    rows = dict(svc.sql("select id, status from clusters"))
    assert rows[first["id"]] == rows[second["id"]] == "stopped", rows
    assert rows[third["id"]] == "queued", rows
    assert not svc.owned(), "nothing of a queued cluster was started on the way out"
    svc.start()
    wait_until(lambda: running(svc, "solo", third["id"]), what="third admitted after the restart")
    delete(svc, "solo", third["id"])


def test_borrowed_workers_are_taken_back_gracefully(make_service: MakeService) -> None:
    """Pool of 4 cores; a and b each guaranteed 2, ceiling 4; workers of half a core. a
    borrows the whole pool; b asks within its guarantee: after the delay a's borrowed workers
    are retired through Dask, b runs, and a's computation finishes right, its client still
    connected. a, now at its guarantee, cannot take them back."""
    from distributed import Client

    def guaranteed(name: str) -> dict[str, Any]:
        entry = tenant(name, cores=4, queue=True, worker_cores=0.5, worker_memory=256 * 2**20)
        entry["quota"]["guaranteed"] = {"cores": 2, "memory": "4GiB"}
        return entry

    svc = make_service([guaranteed("a"), guaranteed("b")], args=["--capacity-cores", "4"],
                       env={"PROVISIONER_PREEMPTION_DELAY": "2"}).start()
    big = post(svc, "a", workers=7)
    wait_until(lambda: status(svc, "a", big["id"])["workers"]["running"] == 7, timeout=90,
               what="a's 7 workers")
    big = status(svc, "a", big["id"])
    with Client(big["scheduler_address"], security=svc.security("a", big["id"]),
                timeout=30) as client:
        client.wait_for_workers(7, timeout=60)

        def slow_inc(x: int) -> int:
            import time

            time.sleep(0.25)
            return x + 1

        futures = client.map(slow_inc, range(80))
        wanted = post(svc, "b", workers=3)
        assert wanted["status"] == "queued", wanted
        wait_until(lambda: "taking 4 borrowed worker(s) back" in (
            status(svc, "b", wanted["id"])["waiting_for"] or ""), what="the plan, said")
        wait_until(lambda: running(svc, "b", wanted["id"]), timeout=30, what="b admitted")
        assert sum(client.gather(futures)) == sum(range(1, 81)), "a's computation completes"
        assert client.status == "running", "a's client never disconnected"
        wait_until(lambda: len(client.scheduler_info()["workers"]) == 3, what="a down to 3")
    after = status(svc, "a", big["id"])
    assert after["status"] == "running" and after["workers"]["requested"] == 3
    with svc.client("a") as http:
        events = http.get(f"/clusters/{big['id']}/events").json()["events"]
    assert ("preempted", "4 worker(s) taken back for tenant b") in \
        [(e["kind"], e["detail"]) for e in events]
    wait_until(lambda: status(svc, "b", wanted["id"])["workers"]["running"] == 3,
               what="b's workers")
    import httpx

    metrics = httpx.get(svc.url + "/metrics", timeout=30,
                        headers={"Authorization": f"Bearer {svc.metrics_token()}"}).text
    assert 'provisioner_preempted_workers_total{for_tenant="b",tenant="a"} 4.0' in metrics
    assert 'provisioner_queue_wait_seconds_count{tenant="b"} 1.0' in metrics
    assert 'provisioner_borrowed_cores{tenant="a"} 0.0' in metrics  # back at its guarantee

    # a, now at its guarantee, asks for more: it waits, and takes nothing back from b.
    more = post(svc, "a", workers=0)
    assert more["status"] == "queued"
    import time

    time.sleep(3)  # more than the delay
    assert "taking" not in (status(svc, "a", more["id"])["waiting_for"] or "")
    assert status(svc, "b", wanted["id"])["workers"]["requested"] == 3
    assert status(svc, "a", more["id"])["status"] == "queued"
    for name, c in (("a", more), ("a", big), ("b", wanted)):
        delete(svc, name, c["id"])
