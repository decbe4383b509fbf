"""Adaptive clusters follow Dask's target within [minimum, maximum] and the tenant's quota."""

from __future__ import annotations

import time

from distributed import Client

from tests.service import ServiceProcess, wait_until


def test_adaptive_grows_under_load_within_quota_and_shrinks_when_idle(service: ServiceProcess) -> None:
    with service.client("beta") as http:
        # beta: 4 cores; the scheduler takes 0.5, so at most 3 one-core workers fit.
        c = http.post("/clusters?wait=60", json={"adaptive": {"minimum": 0, "maximum": 6}}).json()
        cid = c["id"]
        try:
            assert c["adaptive"] == {"minimum": 0, "maximum": 6} and c["workers"]["requested"] == 0
            with Client(c["scheduler_address"], security=service.security("beta", cid),
                        timeout=30) as client:
                futures = client.map(time.sleep, [1.0] * 40, pure=False)
                grown = wait_until(
                    lambda: (x := http.get(f"/clusters/{cid}").json())["workers"]["running"] >= 2 and x,
                    timeout=90, what="adaptive growth")
                assert grown["workers"]["requested"] <= 3
                me = http.get("/tenants/me").json()
                assert me["usage"]["cores"] <= 4
                client.gather(futures)
                assert http.get(f"/clusters/{cid}").json()["workers"]["requested"] <= 3
                # Results held by the client pin one worker; once released, none is needed.
                wait_until(lambda: http.get(f"/clusters/{cid}").json()["workers"]["requested"] == 1,
                           timeout=90, what="shrink to the worker holding results")
                del futures
                shrunk = wait_until(
                    lambda: (x := http.get(f"/clusters/{cid}").json())["workers"]["requested"] == 0 and x,
                    timeout=90, what="adaptive shrink")
                assert shrunk["status"] == "running"
                wait_until(lambda: len(service.processes_of(cid)) == 1, what="workers retired")

            r = http.post(f"/clusters/{cid}/adapt", json={"minimum": 1, "maximum": 2})
            assert r.status_code == 200 and r.json()["adaptive"] == {"minimum": 1, "maximum": 2}
            wait_until(lambda: http.get(f"/clusters/{cid}").json()["workers"]["running"] == 1,
                       what="minimum honoured")
            r = http.post(f"/clusters/{cid}/adapt", json={"minimum": 3, "maximum": 2})
            assert r.status_code == 422 and "minimum" in r.json()["detail"]
            r = http.post(f"/clusters/{cid}/scale", json={"workers": 2})
            assert r.status_code == 200 and r.json()["adaptive"] is None
        finally:
            http.delete(f"/clusters/{cid}")
