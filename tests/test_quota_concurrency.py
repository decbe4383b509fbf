"""Admission is atomic: a burst of concurrent creates and scales never exceeds the quota."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import httpx

from tests.service import ServiceProcess, wait_until

QUOTA_CORES = 3.0
QUOTA_MEMORY = 4 * 2**30
QUOTA_CLUSTERS = 2


async def _burst(service: ServiceProcess) -> tuple[Counter[int], list[dict[str, float]], list[str]]:
    headers = {"Authorization": "Bearer token-tight"}
    statuses: Counter[int] = Counter()
    samples: list[dict[str, float]] = []
    created: list[str] = []
    rng = random.Random(7)
    stop = asyncio.Event()
    async with httpx.AsyncClient(base_url=service.url, headers=headers, timeout=60) as http:

        async def sample() -> None:
            while not stop.is_set():
                samples.append((await http.get("/tenants/me")).json()["usage"])
                await asyncio.sleep(0.02)

        async def create() -> None:
            r = await http.post("/clusters", json={"workers": rng.randint(0, 3)})
            statuses[r.status_code] += 1
            if r.status_code == 201:
                created.append(r.json()["id"])

        async def scale() -> None:
            await asyncio.sleep(rng.random() * 0.3)
            for cid in list(created):
                r = await http.post(f"/clusters/{cid}/scale", json={"workers": rng.randint(0, 4)})
                statuses[r.status_code] += 1

        sampler = asyncio.create_task(sample())
        await asyncio.gather(*(create() for _ in range(16)), *(scale() for _ in range(16)))
        samples.append((await http.get("/tenants/me")).json()["usage"])
        stop.set()
        await sampler
    return statuses, samples, created


def test_concurrent_creates_and_scales_hold_the_quota(service: ServiceProcess) -> None:
    statuses, samples, created = asyncio.run(_burst(service))
    try:
        assert statuses[500] == 0 and set(statuses) <= {200, 201, 403}, statuses
        assert statuses[201] >= 1 and statuses[403] >= 1, statuses
        assert len(created) <= QUOTA_CLUSTERS
        assert samples, "no usage samples"
        for usage in samples:
            assert usage["cores"] <= QUOTA_CORES + 1e-9, usage
            assert usage["memory"] <= QUOTA_MEMORY, usage
            assert usage["clusters"] <= QUOTA_CLUSTERS, usage
        # What runs matches what was admitted: no more processes than records allow.
        with service.client("tight") as http:
            for cid in created:
                c = http.get(f"/clusters/{cid}?wait=60").json()
                assert c["status"] == "running", c
                want = c["workers"]["requested"]
                wait_until(lambda cid=cid, want=want: len(service.processes_of(cid)) == 1 + want,
                           what=f"{cid} has {want} workers")
    finally:
        with service.client("tight") as http:
            for cid in created:
                http.delete(f"/clusters/{cid}")
            wait_until(lambda: http.get("/tenants/me").json()["usage"]["clusters"] == 0,
                       what="quota released")
            assert http.get("/tenants/me").json()["usage"] == {
                "clusters": 0, "cores": 0.0, "memory": 0, "workers": 0}
