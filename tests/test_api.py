"""The REST contract against the real service: auth, validation, quotas, create/scale/delete."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from distributed import Client

from clusters.local.procs import is_alive
from provisioner.sizes import format_bytes
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


def test_healthz_needs_no_token_and_tells_nothing_of_tenants(service: ServiceProcess) -> None:
    with service.client(None) as http:
        r = http.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok", "backend": "local"}


def test_create_wait_returns_running_cluster_a_client_computes_on(
    service: ServiceProcess, alpha_cluster: dict[str, Any]
) -> None:
    c = alpha_cluster
    assert c["status"] == "running" and c["tenant"] == "alpha" and c["project"] == "api-tests"
    assert c["scheduler_address"].startswith("tls://") and c["tls"] is True
    assert c["workers"]["requested"] == 1
    assert c["worker_cores"] == 1 and c["worker_memory"] == 512 * 2**20
    for field in ("id", "dashboard_url", "adaptive", "idle_timeout", "created_at",
                  "stopped_at", "stop_reason", "outcome"):
        assert field in c
    assert c["wanted"] == "running" and c["outcome"] is None
    # The dashboard is the service's proxy of it, with the tenant's token; never the scheduler.
    assert c["dashboard_url"] == f"{service.url}/clusters/{c['id']}/dashboard/status"
    with service.client("alpha") as http:
        page = http.get(c["dashboard_url"])
    assert page.status_code == 200 and "Dask" in page.text, page.text[:300]
    assert service.upstream(c["id"]).startswith("https://127.0.0.1:")
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
            for cursor in ("c-nope", "c-\x00", "c-" + "0" * 12 + "'"):
                r = http.get("/clusters", params={"after": cursor})
                assert r.status_code == 422 and r.json()["detail"].startswith("after: "), r.text
            # Not a cluster id at all (a NUL byte PostgreSQL would refuse): not found.
            assert http.get("/clusters/c-%00beef").status_code == 404
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
    ({"env": {"LD_PRELOAD": "/tmp/x.so"}}, "env"),
    ({"env": {"PYTHONPATH": "/tmp"}}, "env"),
    ({"env": {"PYTHONSTARTUP": "/tmp/x.py"}}, "env"),
    ({"colour": "blue"}, "colour"),
])
def test_bad_input_is_422_naming_the_field(service: ServiceProcess, body: dict[str, Any],
                                           field: str) -> None:
    with service.client("alpha") as http:
        r = http.post("/clusters", json=body)
    assert r.status_code == 422, r.text
    assert field in r.json()["detail"]
    assert "Value error" not in r.json()["detail"], "pydantic's wording stays out"


def test_malformed_json_and_oversized_bodies(service: ServiceProcess) -> None:
    with service.client("alpha") as http:
        r = http.post("/clusters", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 422 and r.json()["detail"].startswith("body: "), r.text
        assert [e["field"] for e in r.json()["errors"]] == ["body"]
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


def _settled_usage(http: httpx.Client) -> dict[str, Any]:
    """The tenant's usage once none of its clusters is on its way up or down (so the numbers
    a quota message quotes cannot move between reading them and making the request)."""
    def settled() -> bool:
        clusters = http.get("/clusters").json()["clusters"]
        return all(c["status"] in ("running", "stopped", "failed") for c in clusters)

    wait_until(settled, what="no cluster starting or stopping")
    usage: dict[str, Any] = http.get("/tenants/me").json()["usage"]
    return usage


def _holds_for(seconds: float, check: Callable[[], bool]) -> bool:
    """True if ``check()`` stays true for ``seconds`` (long enough for the reconciler to act)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not check():
            return False
        time.sleep(0.2)
    return check()


def _refused_changing_nothing(service: ServiceProcess, http: httpx.Client, cluster_id: str,
                              refusals: list[tuple[str, dict[str, int], str]]) -> None:
    """Each (path, body, detail) is a 403 with exactly that detail; afterwards the cluster's
    record, the tenant's usage and the cluster's processes are what they were."""
    record = http.get(f"/clusters/{cluster_id}").json()
    usage = http.get("/tenants/me").json()["usage"]
    processes = set(service.processes_of(cluster_id))
    assert processes and len(processes) == 1 + record["workers"]["requested"], processes
    for path, body, detail in refusals:
        r = http.post(f"/clusters/{cluster_id}/{path}", json=body)
        assert r.status_code == 403, (path, body, r.text)
        assert r.json()["detail"] == detail, (path, body)
    after = http.get(f"/clusters/{cluster_id}").json()
    assert (after["workers"]["requested"], after["adaptive"]) == \
        (record["workers"]["requested"], record["adaptive"])
    assert http.get("/tenants/me").json()["usage"] == usage
    assert _holds_for(3, lambda: set(service.processes_of(cluster_id)) == processes), \
        (processes, service.processes_of(cluster_id))


def test_scale_and_adapt_beyond_the_cores_quota_are_refused_and_start_nothing(
    service: ServiceProcess, alpha_cluster: dict[str, Any]
) -> None:
    """alpha (8 cores) holds 1.5 cores in alpha_cluster: 39 more 1-core workers do not fit."""
    cid = alpha_cluster["id"]
    with service.client("alpha") as http:
        usage = _settled_usage(http)
        quota = http.get("/tenants/me").json()["quota"]
        assert http.get(f"/clusters/{cid}").json()["workers"]["requested"] == 1
        free = round(quota["cores"] - usage["cores"], 6)
        assert 0 < free < 39
        cores = f"quota exceeded: cores 39 requested, {free:g} of {quota['cores']:g} free"
        _refused_changing_nothing(service, http, cid, [
            ("scale", {"workers": 40}, cores),
            ("adapt", {"minimum": 40, "maximum": 50}, cores),
            ("adapt", {"minimum": 40, "maximum": 40}, cores),
        ])


def test_scale_and_adapt_beyond_workers_per_cluster_or_memory_are_refused_and_start_nothing(
    service: ServiceProcess,
) -> None:
    """tight: 3 cores, 4GiB, at most 4 workers a cluster. A cluster of 2GiB workers with none
    running yet: 5 workers break workers_per_cluster, 2 workers break memory, not cores."""
    with service.client("tight") as http:
        _settled_usage(http)
        r = http.post("/clusters?wait=60", json={"workers": 0, "worker_cores": 0.5,
                                                 "worker_memory": "2GiB", "project": "api-tests"})
        assert r.status_code == 201, r.text
        cid = r.json()["id"]
        try:
            assert r.json()["status"] == "running", r.text
            me = http.get("/tenants/me").json()
            quota, usage = me["quota"], me["usage"]
            assert quota["cores"] - usage["cores"] >= 1  # so cores is not what refuses 2 workers
            free = quota["memory"] - usage["memory"]
            memory = (f"quota exceeded: memory 4GiB requested, {format_bytes(free)} of "
                      f"{format_bytes(quota['memory'])} free")
            per_cluster = "quota exceeded: workers_per_cluster 5 requested, limit is 4"
            _refused_changing_nothing(service, http, cid, [
                ("scale", {"workers": 5}, per_cluster),
                ("adapt", {"minimum": 5, "maximum": 6}, per_cluster),
                ("scale", {"workers": 2}, memory),
                ("adapt", {"minimum": 2, "maximum": 4}, memory),
            ])
        finally:
            http.delete(f"/clusters/{cid}")


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
            assert r.json()["wanted"] == "stopped", "the DELETE's answer shows what is now wanted"
            done = wait_until(lambda: (x := http.get(f"/clusters/{cid}").json())["status"] == "stopped"
                              and x, what="stopped")
            assert done["stopped_at"] is not None and done["workers"]["running"] == 0
            assert done["outcome"] == {"reason": "user", "detail": None}
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
