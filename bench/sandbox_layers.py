"""What each layer of a local cluster process's confinement costs, measured where it runs.

Forks, from a process that imported distributed (as the fork server has), a child that
applies the layers one after the other as a cluster process does (clusters.sandbox.confine):
cgroup (joining one the parent made with limits, and making it), private root (mount and IPC
namespaces, bind mounts, pivot_root), own user (uid switch, capabilities, no_new_privs),
Landlock. Each child times its steps and reports them; medians and p95 over the runs.
Needs root, as the service does for these layers.

    python -m bench.sandbox_layers --runs 50 --out bench/results/sandbox_layers.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import distributed  # noqa: F401  (the child forks from a process that has it, like the zygote)

from bench.harness import write_results
from clusters import cgroups
from clusters.sandbox import HOME_INSIDE, confine
from clusters.sandbox.identity import become
from clusters.sandbox.landlock import restrict
from clusters.sandbox.mounts import enter_private_root, runtime_paths

UID = 1_700_000_999
LAYERS = ("cgroup create", "cgroup join", "private root", "own user", "landlock", "all (confine)")


def _child(tree: cgroups.Cgroups, home: str, hidden: str, write: int) -> None:
    times: dict[str, float] = {}
    t = time.perf_counter()
    for procs in sorted({str(tree.where(c, ["c", "p"]) / "cgroup.procs")
                         for c in cgroups.V1_CONTROLLERS}):
        with open(procs, "w") as f:
            f.write("0")
    times["cgroup join"] = time.perf_counter() - t
    t = time.perf_counter()
    enter_private_root(home, [hidden], 2**27, 2**27)
    times["private root"] = time.perf_counter() - t
    t = time.perf_counter()
    become(UID, UID)
    times["own user"] = time.perf_counter() - t
    t = time.perf_counter()
    restrict(["/"], [HOME_INSIDE, "/tmp", "/dev/shm"])
    times["landlock"] = time.perf_counter() - t
    os.write(write, json.dumps(times).encode())
    os._exit(0)


def _child_whole(plan: dict[str, Any], write: int) -> None:
    t = time.perf_counter()
    confine(plan)
    os.write(write, json.dumps({"all (confine)": time.perf_counter() - t}).encode())
    os._exit(0)


def _run(target: Any, *args: Any) -> dict[str, float]:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            target(*args, write)
        finally:
            os._exit(1)
    os.close(write)
    data = os.read(read, 65536)
    os.close(read)
    os.waitpid(pid, 0)
    return json.loads(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    tree = cgroups.detect(f"dask-provisioner-bench/{uuid.uuid4().hex[:8]}")
    if tree is None or os.geteuid() != 0:
        raise SystemExit(f"needs root and cgroups: {cgroups.why_not()}")
    runtime_paths()  # as the fork server does once, before any fork
    home = tempfile.mkdtemp(prefix="sandbox-bench-")
    os.chown(home, UID, UID)
    hidden = tempfile.mkdtemp(prefix="sandbox-bench-hidden-")
    samples: dict[str, list[float]] = {layer: [] for layer in LAYERS}
    try:
        for _ in range(args.runs):
            t = time.perf_counter()
            tree.create(["c", "p"], cgroups.Limits(memory=2**30, cpus=1, pids=1024))
            samples["cgroup create"].append(time.perf_counter() - t)
            for layer, seconds in _run(_child, tree, home, hidden).items():
                samples[layer].append(seconds)
            tree.remove(["c", "p"])
            tree.create(["c", "p"], cgroups.Limits(memory=2**30, cpus=1, pids=1024))
            plan = {"cgroup": sorted({str(tree.where(c, ["c", "p"]) / "cgroup.procs")
                                      for c in cgroups.V1_CONTROLLERS}),
                    "root": {"home": home, "hidden": [hidden], "shm_bytes": 2**27,
                             "tmp_bytes": 2**27},
                    "user": {"uid": UID, "gid": UID}}
            samples["all (confine)"] += _run(_child_whole, plan).values()
            tree.remove(["c", "p"])
    finally:
        tree.remove(())
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(hidden, ignore_errors=True)
    result = {}
    for layer in LAYERS:
        values = sorted(samples[layer])
        p95 = values[min(len(values) - 1, int(0.95 * len(values)))]
        result[layer] = {"median_ms": round(statistics.median(values) * 1000, 2),
                         "p95_ms": round(p95 * 1000, 2)}
        print(f"{layer:>16}: median {result[layer]['median_ms']:6.2f} ms   p95 {result[layer]['p95_ms']:6.2f} ms")
    if args.out:
        write_results(Path(args.out), {"runs": args.runs, "layers": result})


if __name__ == "__main__":
    main()
