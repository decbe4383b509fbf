"""Start latency on Slurm: dask-provisioner against dask-jobqueue's ``SLURMCluster`` and
dask-gateway's Slurm backend, on the same one-node Slurm, in the same run.

A real Slurm (munged, slurmctld, slurmd from Debian's packages, as the tests start it) runs
for the whole benchmark. Each run is a fresh process running one system's own client as its
users do (``bench.start_client``), timed from the create call, alternating systems run by run:

* ``task``: one worker -> a Client has computed one task;
* ``two_workers``: two workers -> a Client sees both connected;
* ``scheduler``: the create call returning with a scheduler (jobqueue's runs in the client).

After every run the queue is drained (no job pending, running or completing) for all alike:
on one node Slurm starts no job while another completes.

Each system runs as its users would: ours and dask-gateway submit as the tenant's own Unix user
(``runuser``; dask-gateway's ``sudo`` launcher, its documented way), jobqueue as the user
running the notebook. dask-gateway's jobs call its API back to report the scheduler; it uses
TLS as ours does; jobqueue's scheduler runs in the client's process, without TLS (its
default). Needs root, Slurm and sudo (Debian packages), and the ``bench`` extra.

    python -m bench.slurm_start --runs 8 --warmup 2
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import pwd
import shutil
import subprocess
import sys
import time
from pathlib import Path

import distributed

import clusters
from bench.harness import gateway_server, our_service, write_results
from bench.start_latency import System, measure, report
from tests.slurm import SlurmCluster, ensure_user, let_others_run

#: The Unix user both services submit as (with a home: dask-gateway stages files there).
USER = "dpt-bench"
USER_UID = 1_650_100

GATEWAY_SLURM = """
c.DaskGateway.backend_class = "dask_gateway_server.backends.jobqueue.slurm.SlurmBackend"
c.SlurmBackend.api_url = "http://{api}/api"
c.SlurmBackend.submit_command = "{root}/sbatch"
c.SlurmBackend.cancel_command = "{root}/scancel"
c.SlurmBackend.status_command = "{root}/squeue"
c.SlurmBackend.dask_gateway_jobqueue_launcher = %(launcher)r
c.SlurmClusterConfig.scheduler_cmd = [%(dask)r, "scheduler"]
c.SlurmClusterConfig.worker_cmd = [%(dask)r, "worker"]
"""


def slurm_commands(folder: Path, conf: Path) -> None:
    """sbatch, scancel and squeue that find this Slurm's configuration: dask-gateway runs them
    through its launcher with an environment of its own, where a site's Slurm has its
    configuration in /etc."""
    for name in ("sbatch", "scancel", "squeue"):
        path = folder / name
        path.write_text(f"#!/bin/sh\nSLURM_CONF={conf} exec {shutil.which(name)} \"$@\"\n")
        path.chmod(0o755)


def drained(slurm: SlurmCluster, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while slurm.live_jobs() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results/slurm_start.json"))
    parser.add_argument("--no-gateway", action="store_true")
    parser.add_argument("--no-jobqueue", action="store_true")
    args = parser.parse_args(argv)

    if not shutil.which("sudo") and not args.no_gateway:
        parser.error("dask-gateway's Slurm backend submits through sudo: install it "
                     "(apt-get install sudo) or pass --no-gateway")
    ensure_user(USER, USER_UID)
    home = Path(pwd.getpwnam(USER).pw_dir)
    if not home.is_dir() or home.stat().st_uid != USER_UID:  # dask-gateway stages files there
        home = Path("/home") / USER
        home.mkdir(parents=True, exist_ok=True)
        shutil.chown(home, USER)
        subprocess.run(["usermod", "-d", str(home), USER], check=True)
    let_others_run(sys.executable, sys.prefix, Path(clusters.__file__).parent)
    slurm = SlurmCluster()
    with contextlib.ExitStack() as stack:
        stack.callback(slurm.stop)
        slurm.start()
        jobs = slurm.root / "jobs"
        url = stack.enter_context(our_service(
            ["--backend", "slurm", "--slurm-folder", str(jobs)], slurm.env,
            tenant={"slurm_user": USER, "slurm_account": "bench"}))
        systems = [System("dask-provisioner", "ours", url)]
        if not args.no_jobqueue:
            os.environ.update(slurm.env)  # jobqueue's client submits from its own process
            os.environ["BENCH_JOBQUEUE_LOGS"] = str(slurm.root / "jobqueue-logs")
            systems.append(System("dask-jobqueue", "jobqueue", "slurm"))
        if not args.no_gateway:
            bin_dir = Path(sys.executable).parent
            slurm_commands(slurm.root, slurm.conf)
            extra = GATEWAY_SLURM % {
                "launcher": str(bin_dir / "dask-gateway-jobqueue-launcher"),
                "dask": str(bin_dir / "dask")}
            gw_url, proxy, _ = stack.enter_context(gateway_server(
                extra.replace("{root}", str(slurm.root)), slurm.env))
            # Its cluster processes are Slurm's, not its children: nothing to wait for there.
            systems.append(System("dask-gateway", "gateway", gw_url, proxy, 0, "--user", USER))
        print(f"Slurm start latency: {args.runs} runs after {args.warmup} warm-up", flush=True)
        results, failures = measure(systems, args.runs, args.warmup,
                                    settle=lambda: drained(slurm))
        out = report(results)
        out["failures"] = failures
    out["setup"] = {
        "runs": args.runs, "warmup": args.warmup, "cpus": os.cpu_count(),
        "python": platform.python_version(), "distributed": distributed.__version__,
        "slurm": slurm_version(), "platform": platform.platform(),
        "command": " ".join([Path(sys.executable).name, "-m", "bench.slurm_start",
                             *sys.argv[1:]]),
    }
    write_results(args.out, out)
    return 0


def slurm_version() -> str:
    done = subprocess.run(["sbatch", "--version"], capture_output=True, text=True, check=False)
    return done.stdout.strip()


if __name__ == "__main__":
    sys.exit(main())
