"""dask-gateway measured as its users run it: a fresh Python process per run, nothing else in it.

A check on ``bench.start_latency``: each run is a new interpreter that builds a
``Gateway``, calls ``new_cluster()``, ``scale(n)``, ``get_client()`` and computes one task
(or waits for ``n`` workers), timed from the ``new_cluster()`` call, then shuts the cluster
down. Nothing else runs: no service of ours, no harness. If the harness measures the peer
slower than this (beyond noise), the harness is handicapping it. The run is written out here
on purpose rather than shared with the harness, so a mistake there does not repeat here;
only the server (``bench.harness.gateway_server``, the same settings) is shared.

    python -m bench.peer_driver --runs 10               # its own gateway server, like the harness's
    python -m bench.peer_driver --one URL PROXY --workers 1   # one run, prints JSON (used above)
"""

from __future__ import annotations

import argparse
import json
import operator
import statistics
import subprocess
import sys
import time

from bench.harness import GATEWAY_PASSWORD, dask_children, gateway_server


def one_run(url: str, proxy: str, workers: int) -> dict[str, float]:
    """One cluster, timed from ``new_cluster()``; the process is expected to exit afterwards."""
    from dask_gateway import BasicAuth, Gateway

    gateway = Gateway(url, proxy_address=proxy, auth=BasicAuth("bench", GATEWAY_PASSWORD))
    t0 = time.perf_counter()
    cluster = gateway.new_cluster()
    running = time.perf_counter() - t0
    try:
        cluster.scale(workers)
        with cluster.get_client(set_as_default=False) as client:
            if workers == 1:
                assert client.submit(operator.add, 1, 1, pure=False).result(timeout=60) == 2
            else:
                client.wait_for_workers(workers, timeout=60)
            done = time.perf_counter() - t0
    finally:
        cluster.shutdown()
        gateway.close()
    return {"scheduler": running, "task" if workers == 1 else "two_workers": done}


def run_fresh(url: str, proxy: str, workers: int, timeout: float = 180) -> dict[str, float]:
    """``one_run`` in a new interpreter; returns its timings."""
    out = subprocess.run([sys.executable, "-m", "bench.peer_driver", "--one", url, proxy,
                          "--workers", str(workers)], capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"run failed: {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--one", nargs=2, metavar=("URL", "PROXY"), help="one run against this server")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(one_run(*args.one, args.workers)), flush=True)
        return 0
    times: list[float] = []
    with gateway_server() as (url, proxy, pid):
        for i in range(args.warmup + args.runs):
            timings = run_fresh(url, proxy, args.workers)
            deadline = time.monotonic() + 60
            while dask_children(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.5)
            print(" ".join(f"{k}={v:.3f}s" for k, v in timings.items()), flush=True)
            if i >= args.warmup:
                times.append(timings["task" if args.workers == 1 else "two_workers"])
    print(f"median {statistics.median(times):.3f}s over {len(times)} runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
