"""/metrics in Prometheus format and usage accounting from the store."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from distributed import Client
from prometheus_client.parser import text_string_to_metric_families

from tests.service import ServiceProcess, tenant, wait_until


def _samples(service: ServiceProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with service.client(None, token=service.metrics_token()) as http:
        r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text) for s in family.samples
    }


def _count(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
           **labels: str) -> float:
    """A counter's value; 0 before its first increment (labelled series appear only then)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0)


REAPS = "provisioner_reaps_total"
STOPS = "provisioner_cluster_stops_total"
ERRORS = "provisioner_backend_errors_total"


def test_metrics_and_usage_follow_a_cluster(service: ServiceProcess) -> None:
    before = _samples(service)
    stops_key = ("provisioner_cluster_stops_total", (("reason", "user"), ("tenant", "beta")))
    with service.client("beta") as http:
        c = http.post("/clusters?wait=60", json={"workers": 1, "project": "books"}).json()
        try:
            assert c["status"] == "running"
            m = _samples(service)
            assert m[("provisioner_clusters", (("status", "running"), ("tenant", "beta")))] >= 1
            assert m[("provisioner_cores", (("kind", "quota"), ("tenant", "beta")))] == 4
            assert m[("provisioner_cores", (("kind", "used"), ("tenant", "beta")))] >= 1.5
            assert m[("provisioner_memory_bytes", (("kind", "quota"), ("tenant", "beta")))] == 8 * 2**30
            count = ("provisioner_cluster_start_seconds_count", (("tenant", "beta"),))
            assert m[count] >= before.get(count, 0) + 1
            wait_until(lambda: _samples(service)[
                ("provisioner_workers", (("state", "running"), ("tenant", "beta")))] >= 1,
                what="running workers gauge")

            time.sleep(1)
            first = http.get("/tenants/me/usage", params={"since": time.time() - 3600}).json()
            (books,) = [p for p in first["projects"] if p["project"] == "books"]
            # 1.5 cores (scheduler 0.5 + one worker) held for at least a second.
            assert books["core_seconds"] >= 1.5
            assert books["memory_gib_seconds"] >= 0.75
            time.sleep(1)
            second = http.get("/tenants/me/usage").json()
            (again,) = [p for p in second["projects"] if p["project"] == "books"]
            assert again["core_seconds"] >= books["core_seconds"] + 1.4
            assert second["tenant"] == "beta"
        finally:
            http.delete(f"/clusters/{c['id']}")
        wait_until(lambda: http.get(f"/clusters/{c['id']}").json()["status"] == "stopped", what="stop")
        after = _samples(service)
        assert after[stops_key] == before.get(stops_key, 0) + 1
        # Held quota ends with the cluster: usage stops growing.
        done = http.get("/tenants/me/usage").json()["core_seconds"]
        time.sleep(1)
        assert http.get("/tenants/me/usage").json()["core_seconds"] == done
        assert http.get("/tenants/me/usage", params={"since": "yesterday"}).status_code == 422
        future = http.get("/tenants/me/usage", params={"since": time.time() + 3600})
        assert future.status_code == 422 and "since" in future.json()["detail"]
    # Structured logs: every line of ours about this cluster names its tenant and cluster.
    lines = [line for line in service.log.read_text().splitlines()
             if c["id"] in line and "logger=provisioner" in line]
    assert any("created project=books" in line for line in lines)
    assert any("stopped reason=user" in line for line in lines)
    assert all(f"tenant=beta cluster={c['id']}" in line for line in lines), lines
    with service.client("alpha") as http:
        assert "books" not in {p["project"] for p in http.get("/tenants/me/usage").json()["projects"]}


def test_metrics_token_guards_metrics(make_service: Any) -> None:
    svc = make_service([tenant("acme")], env={"PROVISIONER_METRICS_TOKEN": "ops-secret"}).start()
    for token in (None, "token-acme", "ops-secre"):
        with svc.client(None, token=token) as http:
            assert http.get("/metrics").status_code == 401
    with svc.client(None, token="ops-secret") as http:
        r = http.get("/metrics")
    assert r.status_code == 200 and "provisioner_cores" in r.text
    assert not (svc.data_dir / "metrics-token").exists()  # the given token is the only one


def test_reaps_and_backend_errors_are_counted(service: ServiceProcess) -> None:
    """Operators alert on these: an idle reap, a lost worker and a dead scheduler each count."""
    before = _samples(service)
    with service.client("beta") as http:
        ids: list[str] = []
        try:
            # Two reaps at once, one per reason: nobody connects to one, a client idles on the other.
            for timeouts in ({"no_client_timeout": 2, "idle_timeout": 600},
                             {"no_client_timeout": 600, "idle_timeout": 2}):
                r = http.post("/clusters?wait=60", json={"workers": 0, **timeouts})
                assert r.status_code == 201 and r.json()["status"] == "running", r.text
                ids.append(r.json()["id"])

            def reaped() -> list[str] | None:
                clusters = [http.get(f"/clusters/{i}").json() for i in ids]
                if all(c["status"] in ("stopped", "failed") for c in clusters):
                    return [c["stop_reason"] for c in clusters]
                return None

            idle = http.get(f"/clusters/{ids[1]}").json()
            with Client(idle["scheduler_address"], security=service.security("beta", ids[1]),
                        timeout=30):
                reasons = wait_until(reaped, what="both reaped")
            assert reasons == ["no-client", "idle"]
            after = _samples(service)
            for reason in ("no-client", "idle"):
                assert _count(after, REAPS, tenant="beta", reason=reason) == _count(
                    before, REAPS, tenant="beta", reason=reason) + 1, reason
                assert _count(after, STOPS, tenant="beta", reason=reason) == _count(
                    before, STOPS, tenant="beta", reason=reason) + 1, reason

            # Real SIGKILLs: first a worker (replaced), then the scheduler (the cluster fails).
            r = http.post("/clusters?wait=60", json={"workers": 1})
            assert r.status_code == 201 and r.json()["status"] == "running", r.text
            cid = r.json()["id"]
            ids.append(cid)
            scheduler, worker = wait_until(
                lambda: (p := service.processes_of(cid)) and len(p) == 2 and p,
                what="scheduler and worker")
            before = _samples(service)
            os.kill(worker.pid, signal.SIGKILL)
            wait_until(lambda: _count(_samples(service), ERRORS, kind="worker-lost")
                       == _count(before, ERRORS, kind="worker-lost") + 1, what="worker-lost counted")
            wait_until(lambda: (p := service.processes_of(cid)) and len(p) == 2
                       and worker not in p, what="replacement worker")

            before = _samples(service)
            os.kill(scheduler.pid, signal.SIGKILL)
            final = wait_until(
                lambda: (x := http.get(f"/clusters/{cid}").json())["status"] == "failed" and x,
                what="failed")
            assert final["stop_reason"].startswith("failed: scheduler")
            after = _samples(service)
            assert _count(after, ERRORS, kind="cluster-failed") == _count(
                before, ERRORS, kind="cluster-failed") + 1
            assert _count(after, STOPS, tenant="beta", reason="failed") == _count(
                before, STOPS, tenant="beta", reason="failed") + 1
            # A failure is not a reap.
            for reason in ("no-client", "idle"):
                assert _count(after, REAPS, tenant="beta", reason=reason) == _count(
                    before, REAPS, tenant="beta", reason=reason), reason
        finally:
            for cluster_id in ids:
                http.delete(f"/clusters/{cluster_id}")
