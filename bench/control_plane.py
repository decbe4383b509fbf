"""Control-plane scale: the service alone (a backend that launches nothing) with 1,000 clusters.

Measures requests/s and p50/p99 latency of ``GET /clusters/{id}`` and ``POST /clusters``, and
the service's memory per tracked cluster (resident set growth from 0 to 1,000 running
clusters, each with its runner task and its report long-poll connection).

The service runs in its own process, built like ``provisioner serve`` builds it but with
:class:`bench.null_backend.NullBackend`; the load comes from :mod:`bench.loadgen`.

    python -m bench.control_plane --clusters 1000 --out bench/results/control_plane.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from bench.harness import free_port, write_results
from bench.loadgen import Result, request, run
from bench.start_latency import percentile
from provisioner.tenants import hash_token

TENANTS = 4
GiB = 2**30


def _tenants(per_tenant: int) -> list[dict[str, Any]]:
    return [{
        "name": f"t{i}", "token_sha256": hash_token(f"token-t{i}"),
        "quota": {"cores": 10 * per_tenant, "memory": 10 * GiB * per_tenant,
                  "clusters": 10 * per_tenant},
        "defaults": {"worker_cores": 1, "worker_memory": GiB, "scheduler_cores": 1,
                     "scheduler_memory": GiB, "idle_timeout": 3600, "no_client_timeout": 3600},
    } for i in range(TENANTS)]


def serve(port: int, data_dir: Path, tenants: Path) -> None:
    """The service with the null backend, as ``provisioner serve`` would run it (in this process)."""
    from api.app import create_app
    from api.server import run as run_server
    from bench.null_backend import NullBackend
    from provisioner.secrets import Keyring, load_or_create_key
    from provisioner.service import ClusterService
    from provisioner.settings import Settings
    from provisioner.store import Store
    from provisioner.tenants import TenantDirectory, load_tenants

    settings = Settings(port=port, data_dir=data_dir, tenants=tenants, tls=False, log_level="warning")
    data_dir.mkdir(parents=True, exist_ok=True)
    provisioner = ClusterService(settings, TenantDirectory(load_tenants(tenants)),
                              Store(settings.state_url, Keyring(load_or_create_key(settings))),
                              NullBackend())
    run_server(create_app(provisioner), settings)


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kb * 1024


def summary(result: Result) -> dict[str, Any]:
    return {"requests": len(result.latencies), "seconds": result.elapsed,
            "requests_per_s": result.rate,
            "p50_ms": percentile(result.latencies, 0.5) * 1000,
            "p99_ms": percentile(result.latencies, 0.99) * 1000,
            "statuses": {str(k): v for k, v in result.statuses.items()}}


def _create_body(i: int) -> bytes:
    return request("POST", "/clusters", f"token-t{i % TENANTS}", b'{"workers": 1}')


def _wait_running(url: str, total: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        running = 0
        for i in range(TENANTS):
            r = httpx.get(f"{url}/clusters", params={"status": "running"}, timeout=60,
                          headers={"Authorization": f"Bearer token-t{i}"})
            running += len(r.json()["clusters"])
        if running >= total:
            return
        time.sleep(0.5)
    raise TimeoutError(f"fewer than {total} clusters running after {timeout}s")


def measure(clusters: int, seconds: float, posts: int, concurrency: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-control-") as tmp:
        root = Path(tmp)
        tenants = root / "tenants.yaml"
        per_tenant = max(1, (clusters + posts) // TENANTS + 1)
        tenants.write_text(yaml.safe_dump({"tenants": _tenants(per_tenant)}))
        port = free_port()
        log = open(root / "service.log", "ab")  # closed in the finally below
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.control_plane", "--serve", str(port),
             str(root / "data"), str(tenants)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                        break
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError((root / "service.log").read_text()[-2000:])
                time.sleep(0.1)
            for i in range(TENANTS):  # warm every route once before the baseline
                httpx.get(f"{url}/clusters", headers={"Authorization": f"Bearer token-t{i}"})
            time.sleep(1)
            rss_empty = rss_bytes(proc.pid)

            print(f"creating {clusters} clusters ...", flush=True)
            seeded = asyncio.run(run("127.0.0.1", port, _create_body, concurrency, count=clusters))
            _wait_running(url, clusters)
            time.sleep(2)  # let every runner settle into its long-poll
            rss_full = rss_bytes(proc.pid)

            ids: list[tuple[str, str]] = []
            for i in range(TENANTS):
                r = httpx.get(f"{url}/clusters", timeout=60,
                              headers={"Authorization": f"Bearer token-t{i}"})
                ids += [(c["id"], f"token-t{i}") for c in r.json()["clusters"]]
            rng = random.Random(1)
            picks = [rng.choice(ids) for _ in range(4096)]

            def get_one(i: int) -> bytes:
                cid, token = picks[i % len(picks)]
                return request("GET", f"/clusters/{cid}", token)

            print(f"GET /clusters/{{id}} for {seconds:g}s ...", flush=True)
            gets = asyncio.run(run("127.0.0.1", port, get_one, concurrency, duration=seconds))
            print(f"POST /clusters x{posts} ...", flush=True)
            created = asyncio.run(run("127.0.0.1", port, _create_body, concurrency, count=posts))
            rss_after = rss_bytes(proc.pid)
        finally:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
    return {
        "clusters_in_store": clusters,
        "get_cluster": summary(gets),
        "post_clusters": summary(created),
        "seed_post_clusters": summary(seeded),
        "memory": {
            "rss_empty_bytes": rss_empty, "rss_with_clusters_bytes": rss_full,
            "rss_after_posts_bytes": rss_after,
            "per_tracked_cluster_bytes": (rss_full - rss_empty) / clusters,
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=10, help="duration of the GET run")
    parser.add_argument("--posts", type=int, default=500, help="POST /clusters requests measured")
    parser.add_argument("--concurrency", type=int, default=16, help="connections")
    parser.add_argument("--out", type=Path, default=Path("bench/results/control_plane.json"))
    parser.add_argument("--serve", nargs=3, metavar=("PORT", "DATA_DIR", "TENANTS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(int(args.serve[0]), Path(args.serve[1]), Path(args.serve[2]))
        return 0

    out = measure(args.clusters, args.seconds, args.posts, args.concurrency)
    g, p, m = out["get_cluster"], out["post_clusters"], out["memory"]
    print(f"\nwith {args.clusters} clusters in the store, {args.concurrency} connections:")
    print(f"  GET /clusters/{{id}}  {g['requests_per_s']:8.0f} req/s  p50 {g['p50_ms']:.1f} ms  "
          f"p99 {g['p99_ms']:.1f} ms  {g['statuses']}")
    print(f"  POST /clusters      {p['requests_per_s']:8.0f} req/s  p50 {p['p50_ms']:.1f} ms  "
          f"p99 {p['p99_ms']:.1f} ms  {p['statuses']}")
    print(f"  memory: {m['rss_empty_bytes'] / 2**20:.0f} MiB empty, "
          f"{m['rss_with_clusters_bytes'] / 2**20:.0f} MiB with {args.clusters} clusters: "
          f"{m['per_tracked_cluster_bytes'] / 1024:.1f} KiB per tracked cluster")
    out["setup"] = {"concurrency": args.concurrency, "cpus": os.cpu_count(),
                    "python": platform.python_version(), "platform": platform.platform(),
                    "command": " ".join(["python", "-m", "bench.control_plane", *sys.argv[1:]])}
    write_results(args.out, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
