"""One timed cluster start, as a user's own Python process does it; prints its timings as JSON.

``bench.start_latency`` runs this as a fresh process for every run of either system, so each
side's client code runs alone in its process, as its users run it: no event loop, thread,
connection or leftover state is shared with the harness, the other system's client or
earlier runs. The timer starts at the create call (imports and client objects come before,
for both sides alike) and stops once a Client has computed one task or sees the workers.

    python -m bench.start_client ours URL --workers 1
    python -m bench.start_client gateway URL PROXY SERVER_PID --workers 2
    python -m bench.start_client jobqueue slurm --workers 2
"""

from __future__ import annotations

import argparse
import json
import operator
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from distributed import Client

from bench.harness import GATEWAY_PASSWORD, TOKEN, dask_children
from provisioner.client import security_from_credentials


def wait_until(check: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.05)


def use(client: Client, workers: int) -> None:
    """What both sides wait for: one task computed (one worker) or all workers connected."""
    if workers == 1:
        assert client.submit(operator.add, 1, 1, pure=False).result(timeout=60) == 2
    else:
        client.wait_for_workers(workers, timeout=60)


def ours(url: str, workers: int) -> dict[str, float]:
    """REST create (waiting until running), credentials, ``Client(address)``; then delete."""
    import httpx

    with httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        t0 = time.perf_counter()
        response = http.post("/clusters", params={"wait": 60}, json={"workers": workers})
        response.raise_for_status()
        cluster = response.json()
        running = time.perf_counter() - t0
        try:
            if cluster["status"] != "running":
                raise RuntimeError(f"cluster not running: {cluster}")
            security = None
            if cluster.get("tls"):
                creds = http.get(f"/clusters/{cluster['id']}/credentials").json()
                security = security_from_credentials(creds)
            with Client(cluster["scheduler_address"], security=security, timeout=30,
                        set_as_default=False) as client:
                use(client, workers)
                done = time.perf_counter() - t0
        finally:
            http.delete(f"/clusters/{cluster['id']}")
            wait_until(lambda: http.get(f"/clusters/{cluster['id']}").json()["status"]
                       in ("stopped", "failed"))
    return {"scheduler": running, "task" if workers == 1 else "two_workers": done}


def gateway(url: str, proxy: str, server_pid: int, workers: int,
            user: str = "bench") -> dict[str, float]:
    """``new_cluster()``, ``scale(n)``, ``get_client()`` as dask-gateway's docs show; then shutdown."""
    from dask_gateway import BasicAuth, Gateway

    with Gateway(url, proxy_address=proxy, auth=BasicAuth(user, GATEWAY_PASSWORD)) as gw:
        t0 = time.perf_counter()
        cluster = gw.new_cluster()
        running = time.perf_counter() - t0
        try:
            cluster.scale(workers)
            with cluster.get_client(set_as_default=False) as client:
                use(client, workers)
                done = time.perf_counter() - t0
        finally:
            cluster.shutdown()
    # shutdown() returns before the processes are gone; the next run must not share the CPU
    wait_until(lambda: not dask_children(server_pid))
    return {"scheduler": running, "task" if workers == 1 else "two_workers": done}


def jobqueue(workers: int) -> dict[str, float]:
    """dask-jobqueue's ``SLURMCluster`` as its docs show: the scheduler in this process,
    ``scale(n)`` submits one job per worker; loopback only here, hence ``interface="lo"``."""
    from dask_jobqueue import SLURMCluster

    t0 = time.perf_counter()
    cluster = SLURMCluster(cores=1, memory="1GiB", processes=1, interface="lo",
                           log_directory=os.environ.get("BENCH_JOBQUEUE_LOGS"))
    running = time.perf_counter() - t0
    try:
        cluster.scale(workers)
        with Client(cluster, set_as_default=False) as client:
            use(client, workers)
            done = time.perf_counter() - t0
    finally:
        cluster.close()
    return {"scheduler": running, "task" if workers == 1 else "two_workers": done}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("system", choices=("ours", "gateway", "jobqueue"))
    parser.add_argument("target", nargs="+", help="ours: URL; gateway: URL PROXY SERVER_PID")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--user", default="bench",
                        help="gateway: the user to log in as (on Slurm, the Unix user jobs run as)")
    args = parser.parse_args(argv)
    timings: dict[str, Any]
    if args.system == "ours":
        (url,) = args.target
        timings = ours(url, args.workers)
    elif args.system == "jobqueue":
        timings = jobqueue(args.workers)
    else:
        url, proxy, pid = args.target
        timings = gateway(url, proxy, int(pid), args.workers, args.user)
    print(json.dumps(timings), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
