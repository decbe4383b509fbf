"""Start latency: dask-provisioner against dask-gateway (local backend), in the same run.

For each system, after a warm-up, runs alternate between the two (so load on the machine
hits both alike). Every run is a fresh process running that system's own client as its users
do (``bench.start_client``), timed from the create call:

* ``task``: one worker requested -> a Client is connected and has computed one task;
* ``two_workers``: two workers requested -> a Client sees both connected;
* ``scheduler``: the create call returning with a running scheduler (for reference).

Then 20 clusters are created at once on our service while ``GET /healthz`` is polled, to show
the event loop never blocks. Prints medians, p95 and our/their ratios; writes JSON.

    python -m bench.start_latency --runs 10 --out bench/results/start_latency.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import distributed
import httpx

from bench.harness import TOKEN, gateway_server, our_service, write_results
from bench.start_client import wait_until

SCENARIOS = ("task", "two_workers", "scheduler")
#: Pause after every run (both systems alike) so exiting processes do not load the next run.
SETTLE = 0.5


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summary(values: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(values) if values else float("nan"),
            "p95": percentile(values, 0.95), "min": min(values, default=float("nan")),
            "max": max(values, default=float("nan")), "runs": [round(v, 4) for v in values]}


class System:
    """One measured system: each run is ``python -m bench.start_client CLIENT TARGET...``.

    Both systems' client code runs in a fresh process per run, as their users run it: the
    harness shares no event loop, thread, connection or state with either client, so neither
    side carries the other's or its own earlier runs' leftovers. (dask-gateway's client used
    to run in a worker thread here, on one IO loop kept for the whole benchmark, with every
    cluster object kept alive, next to our client; that is not how its users run it.)
    """

    def __init__(self, name: str, client: str, *target: object) -> None:
        self.name = name
        self.argv = [sys.executable, "-m", "bench.start_client", client, *map(str, target)]

    def run(self, workers: int, timeout: float = 180) -> dict[str, float]:
        """One timed start in a new process; its last stdout line holds the timings."""
        try:
            done = subprocess.run([*self.argv, "--workers", str(workers)], capture_output=True,
                                  text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise TimeoutError(f"run still going after {timeout:g}s") from exc
        if done.returncode != 0:
            raise RuntimeError(f"exit {done.returncode}: {done.stderr.strip()[-2000:]}")
        return json.loads(done.stdout.splitlines()[-1])


def measure(systems: list[System], runs: int, warmup: int,
            settle: Callable[[], None] = lambda: time.sleep(SETTLE),
            ) -> tuple[dict[str, dict[str, list[float]]], dict[str, list[str]]]:
    """Alternate systems run by run; return each system's timings per scenario, and failures.
    ``settle`` runs after every run (both systems alike)."""
    results: dict[str, dict[str, list[float]]] = {s.name: {k: [] for k in SCENARIOS}
                                                  for s in systems}
    failures: dict[str, list[str]] = {s.name: [] for s in systems}
    for i in range(warmup + runs):
        for workers in (1, 2):
            for system in systems:
                label = "warm-up" if i < warmup else f"run {i - warmup + 1}/{runs}"
                try:
                    timings = system.run(workers)
                except Exception as exc:
                    failures[system.name].append(f"{label} workers={workers}: {exc!r}")
                    print(f"  {label:12} {system.name:17} workers={workers} FAILED: {exc!r}",
                          flush=True)
                    settle()
                    continue
                if i >= warmup:
                    for key, value in timings.items():
                        if key == "scheduler" and workers == 2:
                            continue  # one scheduler figure per run is enough
                        results[system.name][key].append(value)
                shown = " ".join(f"{k}={v:.3f}s" for k, v in timings.items())
                print(f"  {label:12} {system.name:17} workers={workers} {shown}", flush=True)
                settle()
    return results, failures


@contextlib.contextmanager
def _probe(url: str, interval: float = 0.005) -> Iterator[list[float]]:
    """Poll GET /healthz from a separate process while the block runs; yields the latencies."""
    latencies: list[float] = []
    probe = subprocess.Popen([sys.executable, "-m", "bench.healthz_probe", url, str(interval)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        time.sleep(0.3)
        yield latencies
    finally:
        out, _ = probe.communicate(b"", timeout=60)
        latencies.extend(latency for _, latency in json.loads(out or b"[]"))


def healthz_under_load(url: str, clusters: int = 20) -> dict[str, Any]:
    """Create ``clusters`` clusters at once (one worker each) and watch /healthz meanwhile."""
    http = httpx.Client(base_url=url, timeout=120, headers={"Authorization": f"Bearer {TOKEN}"})
    ids: list[str] = []
    try:
        with _probe(url) as latencies:
            t0 = time.perf_counter()
            with ThreadPoolExecutor(clusters) as pool:
                created = list(pool.map(
                    lambda _: http.post("/clusters", json={"workers": 1}).json(), range(clusters)
                ))
            ids = [c["id"] for c in created]

            def all_up() -> bool:
                listed = http.get("/clusters", params={"status": "running"}).json()["clusters"]
                up = [c for c in listed if c["id"] in ids and c["workers"]["running"] >= 1]
                return len(up) == len(ids)

            wait_until(all_up, timeout=120)
            elapsed = time.perf_counter() - t0
    finally:
        for cid in ids:
            http.delete(f"/clusters/{cid}")
        with contextlib.suppress(TimeoutError):
            wait_until(lambda: not http.get("/clusters", params={"status": "running"}).json()["clusters"]
                  and not http.get("/clusters", params={"status": "stopping"}).json()["clusters"])
        http.close()
    return {"clusters": clusters, "all_running_with_a_worker_s": elapsed,
            "healthz_requests": len(latencies),
            "healthz_p50_ms": percentile(latencies, 0.5) * 1000,
            "healthz_p99_ms": percentile(latencies, 0.99) * 1000,
            "healthz_max_ms": max(latencies) * 1000}


def report(results: dict[str, dict[str, list[float]]], ours: str = "dask-provisioner",
           ) -> dict[str, Any]:
    """Medians and spreads per system and scenario, and each peer's median over ours."""
    out: dict[str, Any] = {name: {k: summary(v) for k, v in per.items()}
                           for name, per in results.items()}
    peers = [name for name in results if name != ours]
    out["ratio_over_ours"] = {
        peer: {k: out[peer][k]["median"] / out[ours][k]["median"] for k in SCENARIOS}
        for peer in peers}
    print(f"\n{'scenario':14}{'system':18}{'median':>9}{'p95':>9}{'min':>9}{'max':>9}")
    for k in SCENARIOS:
        for name in results:
            s = out[name][k]
            print(f"{k:14}{name:18}{s['median']:9.3f}{s['p95']:9.3f}{s['min']:9.3f}{s['max']:9.3f}")
        for peer in peers:
            print(f"{'':14}{peer + '/ours':18}{out['ratio_over_ours'][peer][k]:8.1f}x")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results/start_latency.json"))
    parser.add_argument("--no-gateway", action="store_true", help="measure our service only")
    parser.add_argument("--launcher", choices=("fork", "spawn"), default="fork",
                        help="our local launcher: the fork server (default) or plain spawn")
    parser.add_argument("--no-tls", action="store_true", help="our clusters without TLS")
    parser.add_argument("--load-clusters", type=int, default=20,
                        help="clusters started at once for the /healthz measurement (0: skip)")
    args = parser.parse_args(argv)

    env = {"PROVISIONER_LOCAL_LAUNCHER": args.launcher}
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(our_service(["--no-tls"] if args.no_tls else [], env))
        systems = [System("dask-provisioner", "ours", url)]
        if not args.no_gateway:
            systems.append(System("dask-gateway", "gateway", *stack.enter_context(gateway_server())))
        time.sleep(2)  # let both finish starting (our fork server imports distributed)
        print(f"start latency: {args.runs} runs after {args.warmup} warm-up, "
              f"launcher={args.launcher}, tls={not args.no_tls}", flush=True)
        results, failures = measure(systems, args.runs, args.warmup)
        out = report(results)
        out["failures"] = failures
        if args.load_clusters:
            print(f"\n{args.load_clusters} clusters at once, GET /healthz meanwhile ...", flush=True)
            load = healthz_under_load(url, args.load_clusters)
            out["healthz_under_load"] = load
            print(f"  all running with a worker after {load['all_running_with_a_worker_s']:.2f}s; "
                  f"/healthz p50 {load['healthz_p50_ms']:.1f} ms, p99 {load['healthz_p99_ms']:.1f} ms, "
                  f"max {load['healthz_max_ms']:.1f} ms over {load['healthz_requests']} requests")
    out["setup"] = {
        "runs": args.runs, "warmup": args.warmup, "launcher": args.launcher,
        "tls": not args.no_tls, "cpus": os.cpu_count(), "python": platform.python_version(),
        "distributed": distributed.__version__, "platform": platform.platform(),
        "command": " ".join([Path(sys.executable).name, "-m", "bench.start_latency", *sys.argv[1:]]),
    }
    write_results(args.out, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
