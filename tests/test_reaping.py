"""Idle reaping with short timeouts: idle, no client, and a long computation that survives."""

from __future__ import annotations

import time
from typing import Any

from distributed import Client

from tests.service import ServiceProcess, wait_until


def _final(service: ServiceProcess, cid: str, timeout: float = 60) -> dict[str, Any]:
    with service.client("alpha") as http:
        return wait_until(
            lambda: (c := http.get(f"/clusters/{cid}").json())["status"] in ("stopped", "failed") and c,
            timeout=timeout,
            what=f"{cid} stopped",
        )


def test_no_client_reap(service: ServiceProcess) -> None:
    c = service.create("alpha", project="reaping", workers=0, no_client_timeout=2, idle_timeout=600)
    try:
        pids = wait_until(lambda: service.processes_of(c["id"]), what="scheduler pid")
        final = _final(service, c["id"])
        assert final["status"] == "stopped" and final["stop_reason"] == "no-client"
        assert final["stopped_at"] - final["started_at"] >= 2
        assert wait_until(lambda: not any(service.processes_of(c["id"])) and pids, what="exit")
    finally:
        with service.client("alpha") as http:
            http.delete(f"/clusters/{c['id']}")


def test_idle_reap_with_a_client_connected(service: ServiceProcess) -> None:
    c = service.create("alpha", project="reaping", workers=1, idle_timeout=3, no_client_timeout=600)
    try:
        with Client(c["scheduler_address"], security=service.security("alpha", c["id"]), timeout=30) as client:
            client.wait_for_workers(1, timeout=60)
            assert client.submit(sum, [1, 2]).result() == 3
            final = _final(service, c["id"])
        assert final["stop_reason"] == "idle"
        assert final["stopped_at"] - final["started_at"] >= 3
    finally:
        with service.client("alpha") as http:
            http.delete(f"/clusters/{c['id']}")


def test_long_computation_is_never_reaped(service: ServiceProcess) -> None:
    c = service.create("alpha", project="reaping", workers=1, idle_timeout=2, no_client_timeout=2)
    try:
        with Client(c["scheduler_address"], security=service.security("alpha", c["id"]), timeout=30) as client:
            client.wait_for_workers(1, timeout=60)
            started = time.monotonic()
            # Four times the idle timeout, in one task and then as a queue of short ones.
            assert client.submit(time.sleep, 5, pure=False).result(timeout=60) is None
            futures = client.map(time.sleep, [0.5] * 8, pure=False)
            client.gather(futures)
            assert time.monotonic() - started >= 8
            with service.client("alpha") as http:
                assert http.get(f"/clusters/{c['id']}").json()["status"] == "running"
        # Once the client is gone and nothing runs, the no-client timeout applies.
        final = _final(service, c["id"])
        assert final["stop_reason"] in ("no-client", "idle")
    finally:
        with service.client("alpha") as http:
            http.delete(f"/clusters/{c['id']}")


def test_work_waiting_for_a_worker_is_not_idle(service: ServiceProcess) -> None:
    """A task with no worker to run it yet keeps the cluster alive past its idle timeout; the
    worker that comes has the requested cores as threads; once done, the cluster is idle."""
    c = service.create("alpha", project="reaping", workers=0, worker_cores=2, idle_timeout=2, no_client_timeout=600)
    try:
        with Client(c["scheduler_address"], security=service.security("alpha", c["id"]),
                    timeout=30) as client:
            waiting = client.submit(sum, [20, 22])
            time.sleep(6)  # three idle timeouts
            with service.client("alpha") as http:
                assert http.get(f"/clusters/{c['id']}").json()["status"] == "running"
                assert http.post(f"/clusters/{c['id']}/scale", json={"workers": 1}).status_code == 200
            assert waiting.result(timeout=60) == 42
            (worker,) = client.scheduler_info()["workers"].values()
            assert worker["nthreads"] == 2
            final = _final(service, c["id"])
        assert final["stop_reason"] == "idle"
        assert final["stopped_at"] - final["started_at"] >= 6
    finally:
        with service.client("alpha") as http:
            http.delete(f"/clusters/{c['id']}")
