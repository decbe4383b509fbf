"""Memory of one cluster's processes, forked from the fork server versus spawned.

Dask's memory limit acts on a worker's resident set (RSS), which counts pages shared with
the fork server as well, so a forked worker meets its limit as early as a spawned one does;
PSS (shared pages split among their users) shows what the machine really spends.

    python -m bench.process_memory --out bench/results/process_memory.json
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import httpx
from distributed import Client

from bench.harness import TOKEN, our_service, write_results


def smaps(pid: int) -> dict[str, int]:
    """Rss, Pss and private bytes of ``pid`` from /proc/PID/smaps_rollup."""
    wanted = {"Rss", "Pss", "Private_Clean", "Private_Dirty"}
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in wanted:
                out[name] = int(rest.split()[0]) * 1024
    return out


def parent(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("PPid:"))


def measure(launcher: str, clusters: int) -> dict[str, Any]:
    with our_service(["--no-tls"], {"PROVISIONER_LOCAL_LAUNCHER": launcher}) as url:
        http = httpx.Client(base_url=url, timeout=120, headers={"Authorization": f"Bearer {TOKEN}"})
        found: list[dict[str, Any]] = []
        for _ in range(clusters):
            c = http.post("/clusters", params={"wait": 60}, json={"workers": 1}).json()
            with Client(c["scheduler_address"], timeout=30) as client:
                client.wait_for_workers(1, timeout=60)
                sched = client.run_on_scheduler(os.getpid)
                worker = next(iter(client.run(os.getpid).values()))
            found.append({"scheduler": sched, "worker": worker})
        result: dict[str, Any] = {"launcher": launcher, "clusters": found, "processes": {}}
        for i, c in enumerate(found):
            for role, pid in c.items():
                result["processes"][f"cluster{i}-{role}"] = smaps(pid)
        if launcher == "fork":
            zygote = parent(found[0]["scheduler"])
            result["processes"]["fork-server"] = smaps(zygote)
        http.close()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clusters", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results/process_memory.json"))
    args = parser.parse_args(argv)
    out = {launcher: measure(launcher, args.clusters) for launcher in ("fork", "spawn")}
    print(f"{'launcher':9}{'process':22}{'RSS MiB':>9}{'PSS MiB':>9}{'private MiB':>13}")
    for launcher, result in out.items():
        for name, m in result["processes"].items():
            private = (m["Private_Clean"] + m["Private_Dirty"]) / 2**20
            print(f"{launcher:9}{name:22}{m['Rss'] / 2**20:9.1f}{m['Pss'] / 2**20:9.1f}{private:13.1f}")
    write_results(args.out, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
