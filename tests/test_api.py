"""The REST contract against the real service: auth, validation, quotas, create/scale/delete."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from distributed import Client

from clusters.local.procs import is_alive
from tests.service import ServiceProcess, wait_until


@pytest.fixture(scope="module")
def alpha_cluster(service: ServiceProcess) -> Iterator[dict[str, Any]]:
    """One running cluster of tenant alpha with one worker, shared by this module."""
    with service.client("alpha") as http:
        r = http.post("/clusters?wait=60", json={"workers": 1, "project": "api-tests"})
        assert r.status_code == 201, r.text
        cluster = r.json()
        try:
            yield cluster
        finally:
            http.delete(f"/clusters/{cluster['id']}")


def test_healthz_needs_no_token(service: ServiceProcess) -> None:
    with service.client(None) as http:
        r = http.get("/healthz")
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_create_wait_returns_running_cluster_a_client_computes_on(
    service: ServiceProcess, alpha_cluster: dict[str, Any]
) -> None:
    c = alpha_cluster
    assert c["status"] == "running" and c["tenant"] == "alpha" and c["project"] == "api-tests"
    assert c["scheduler_address"].startswith("tls://") and c["tls"] is True
    assert c["workers"]["requested"] == 1
    assert c["worker_cores"] == 1 and c["worker_memory"] == 512 * 2**20
    for field in ("id", "dashboard_url", "adaptive", "idle_timeout", "created_at",
                  "stopped_at", "stop_reason"):
        assert field in c
    assert c["dashboard_url"].startswith("http://127.0.0.1:")
    assert httpx.get(c["dashboard_url"], timeout=30, follow_redirects=True).status_code == 200
    security = service.security("alpha", c["id"])
    with Client(c["scheduler_address"], security=security, timeout=30) as client:
        client.wait_for_workers(1, timeout=60)
        assert client.submit(lambda x: x + 1, 41).result(timeout=60) == 42
        info = client.scheduler_info()
        (worker,) = info["workers"].values()
        assert worker["nthreads"] == 1 and worker["memory_limit"] == 512 * 2**20
    with service.client("alpha") as http:
        got = wait_until(lambda: http.get(f"/clusters/{c['id']}").json()["workers"]["running"] == 1,
                         what="running worker count")
        assert got


def test_list_filters_and_order(service: ServiceProcess, alpha_cluster: dict[str, Any]) -> None:
    with service.client("alpha") as http:
        mine = http.get("/clusters", params={"project": "api-tests"}).json()["clusters"]
        assert [c["id"] for c in mine][-1] == alpha_cluster["id"]
        running = http.get("/clusters", params={"status": "running"}).json()["clusters"]
        assert all(c["status"] == "running" for c in running)
        assert alpha_cluster["id"] in {c["id"] for c in running}
        stopped = http.get("/clusters", params={"status": "stopped", "project": "api-tests"})
        assert alpha_cluster["id"] not in {c["id"] for c in stopped.json()["clusters"]}
        created = [c["created_at"] for c in http.get("/clusters").json()["clusters"]]
        assert created == sorted(created, reverse=True)
        assert http.get("/clusters", params={"status": "bogus"}).status_code == 422


def test_list_pages_follow_next_to_the_same_list(
    service: ServiceProcess, alpha_cluster: dict[str, Any]
) -> None:
    with service.client("alpha") as http:
        extra = http.post("/clusters", json={"workers": 0, "project": "paging"}).json()
        try:
            whole = http.get("/clusters").json()
            assert whole["next"] is None and len(whole["clusters"]) >= 2
            paged: list[str] = []
            params: dict[str, Any] = {"limit": 1}
            while True:
                page = http.get("/clusters", params=params).json()
                assert len(page["clusters"]) == 1
                paged += [c["id"] for c in page["clusters"]]
                if page["next"] is None:
                    break
                assert page["next"] == paged[-1]
                params["after"] = page["next"]
            assert paged == [c["id"] for c in whole["clusters"]]
            for bad in ({"limit": 0}, {"limit": 1001}, {"limit": "ten"}):
                r = http.get("/clusters", params=bad)
                assert r.status_code == 422 and "limit" in r.json()["detail"], (bad, r.text)
            r = http.get("/clusters", params={"after": "c-nope"})
            assert r.status_code == 422 and r.json()["detail"].startswith("after: "), r.text
        finally:
            http.delete(f"/clusters/{extra['id']}")
    with service.client("beta") as http:  # another tenant's id is no cursor either
        r = http.get("/clusters", params={"after": alpha_cluster["id"]})
        assert r.status_code == 422 and "after" in r.json()["detail"], r.text


ENDPOINTS = [
    ("GET", "/clusters/{id}", None),
    ("GET", "/clusters/{id}/credentials", None),
    ("POST", "/clusters/{id}/scale", {"workers": 1}),
    ("POST", "/clusters/{id}/adapt", {"minimum": 0, "maximum": 1}),
    ("DELETE", "/clusters/{id}", None),
]


@pytest.mark.parametrize(("method", "path", "body"), [
    *ENDPOINTS, ("GET", "/clusters", None), ("POST", "/clusters", {}), ("GET", "/tenants/me", None),
    ("GET", "/tenants/me/usage", None),
])
def test_every_endpoint_refuses_missing_and_wrong_tokens(
    service: ServiceProcess, alpha_cluster: dict[str, Any], method: str, path: str, body: Any
) -> None:
    url = path.format(id=alpha_cluster["id"])
    for token in (None, "not-a-token", "token-alpha0"):
        with service.client(None, token=token) as http:
            r = http.request(method, url, json=body)
        assert r.status_code == 401, (token, r.text)
        assert "token" in r.json()["detail"]


@pytest.mark.parametrize(("method", "path", "body"), ENDPOINTS)
def test_another_tenants_cluster_is_not_found(
    service: ServiceProcess, alpha_cluster: dict[str, Any], method: str, path: str, body: Any
) -> None:
    with service.client("beta") as http:
        r = http.request(method, path.format(id=alpha_cluster["id"]), json=body)
        assert r.status_code == 404, r.text
        assert r.json()["detail"] == f"cluster {alpha_cluster['id']} not found"
        listed = http.get("/clusters").json()["clusters"]
        assert alpha_cluster["id"] not in {c["id"] for c in listed}
    with service.client("alpha") as http:
        assert http.get(f"/clusters/{alpha_cluster['id']}").json()["status"] == "running"


@pytest.mark.parametrize(("body", "field"), [
    ({"workers": -1}, "workers"),
    ({"workers": 10**18}, "workers"),
    ({"workers": "many"}, "workers"),
    ({"worker_memory": "-1GiB"}, "worker_memory"),
    ({"worker_memory": -5}, "worker_memory"),
    ({"worker_memory": [1, 2]}, "worker_memory"),
    ({"worker_memory": True}, "worker_memory"),
    ({"no_client_timeout": {"s": 1}}, "no_client_timeout"),
    ({"no_client_timeout": 90000}, "no_client_timeout"),
    ({"worker_cores": "NaN"}, "worker_cores"),
    ({"worker_cores": 0}, "worker_cores"),
    ({"project": "../../etc/passwd"}, "project"),
    ({"project": "caf\u00e9\u202e"}, "project"),
    ({"project": ""}, "project"),
    ({"idle_timeout": "forever"}, "idle_timeout"),
    ({"idle_timeout": 10**9}, "idle_timeout"),
    ({"idle_timeout": 90000}, "idle_timeout"),
    ({"adaptive": {"minimum": 3, "maximum": 1}}, "adaptive"),
    ({"env": {"BAD NAME": "x"}}, "env"),
    ({"env": {"DASK_PROVISIONER_OWNER": "x"}}, "env"),
    ({"colour": "blue"}, "colour"),
])
def test_bad_input_is_422_naming_the_field(service: ServiceProcess, body: dict[str, Any],
                                           field: str) -> None:
    with service.client("alpha") as http:
        r = http.post("/clusters", json=body)
    assert r.status_code == 422, r.text
    assert field in r.json()["detail"]


def test_malformed_json_and_oversized_bodies(service: ServiceProcess) -> None:
    with service.client("alpha") as http:
        r = http.post("/clusters", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 422
        r = http.post("/clusters", json={"env": {f"V{i}": "x" * 4000 for i in range(40)}})
        assert r.status_code == 422 and r.json()["detail"].startswith("body: ")
        assert "larger than" in r.json()["detail"]
        r = http.post("/clusters", content=b'{"project": "\xff\xfe"}',
                      headers={"content-type": "application/json"})
        assert r.status_code == 422 and r.json()["detail"].startswith("body: "), r.text


def test_quota_refusals_name_the_limit_and_start_nothing(service: ServiceProcess) -> None:
    with service.client("alpha") as http:
        before = http.get("/tenants/me").json()["usage"]
        r = http.post("/clusters", json={"workers": 40})
        assert r.status_code == 403
        assert r.json()["detail"].startswith("quota exceeded: cores 40.5 requested,")
        r = http.post("/clusters", json={"workers": 1, "worker_memory": "64GiB"})
        assert r.status_code == 403 and "quota exceeded: memory" in r.json()["detail"]
        assert http.get("/tenants/me").json()["usage"] == before
    with service.client("tight") as http:
        r = http.post("/clusters", json={"workers": 5})
        assert r.status_code == 403
        assert r.json()["detail"] == "quota exceeded: workers_per_cluster 5 requested, limit is 4"


def test_tenants_me(service: ServiceProcess) -> None:
    with service.client("tight") as http:
        me = http.get("/tenants/me").json()
    assert me["name"] == "tight"
    assert me["quota"] == {"cores": 3.0, "memory": 4 * 2**30, "clusters": 2, "workers_per_cluster": 4}
    assert set(me["usage"]) == {"clusters", "cores", "memory", "workers"}
    assert me["defaults"]["worker_memory"] == 512 * 2**20


def test_scale_up_down_retires_gracefully_and_delete_stops_everything(service: ServiceProcess) -> None:
    with service.client("beta") as http:
        c = http.post("/clusters?wait=60", json={"workers": 2}).json()
        cid = c["id"]
        try:
            security = service.security("beta", cid)
            with Client(c["scheduler_address"], security=security, timeout=30) as client:
                client.wait_for_workers(2, timeout=60)
                workers = list(client.scheduler_info()["workers"])
                futures = [client.submit(lambda i: bytes(1000) * i, i, workers=[w], pure=False)
                           for i, w in enumerate(workers * 3)]
                client.gather(futures)
                r = http.post(f"/clusters/{cid}/scale", json={"workers": 1})
                assert r.status_code == 200 and r.json()["workers"]["requested"] == 1
                wait_until(lambda: len(client.scheduler_info()["workers"]) == 1, what="scale down")
                # Every result is still there: the retired worker's data moved first.
                assert [len(x) for x in client.gather(futures)] == [1000 * i for i in range(6)]
                r = http.post(f"/clusters/{cid}/scale", json={"workers": 3})
                assert r.status_code == 200
                client.wait_for_workers(3, timeout=60)
            wait_until(lambda: len(service.processes_of(cid)) == 4, what="4 processes")
            pids = service.processes_of(cid)
            r = http.delete(f"/clusters/{cid}")
            assert r.status_code == 200 and r.json()["stop_reason"] == "user"
            done = wait_until(lambda: (x := http.get(f"/clusters/{cid}").json())["status"] == "stopped"
                              and x, what="stopped")
            assert done["stopped_at"] is not None and done["workers"]["running"] == 0
            assert not [p for p in pids if is_alive(p)]
            again = http.delete(f"/clusters/{cid}")
            assert again.status_code == 200 and again.json()["status"] == "stopped"
            r = http.post(f"/clusters/{cid}/scale", json={"workers": 1})
            assert r.status_code == 409 and "stopped" in r.json()["detail"]
        finally:
            http.delete(f"/clusters/{cid}")


def test_unknown_cluster_is_404(service: ServiceProcess) -> None:
    with service.client("alpha") as http:
        assert http.get("/clusters/c-000000000000").status_code == 404
        assert http.delete("/clusters/nope").status_code == 404
