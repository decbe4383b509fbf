"""/metrics in Prometheus format and usage accounting from the store."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.service import ServiceProcess, tenant, wait_until


def _samples(service: ServiceProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with service.client(None) as http:
        r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text) for s in family.samples
    }


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
