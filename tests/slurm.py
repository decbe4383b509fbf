"""A throwaway one-node Slurm for the Slurm backend's tests, from Debian's packages.

munged, slurmctld and slurmd run in the foreground of their own sessions (no systemd), on
free loopback ports, with every state, spool, log and pid file in a temporary folder; the
node has 8 CPUs on 2 real cores (``config_overrides``), and memory limits are Slurm's cgroups.
Clients find it through ``SLURM_CONF`` (:attr:`SlurmCluster.env`). ``stop`` cancels every
job and waits until none is left before stopping the daemons (slurmd leaves running jobs
behind otherwise).
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from tests.zookeeper import _free_port

DAEMONS = ("/usr/sbin/munged", "/usr/sbin/slurmctld", "/usr/sbin/slurmd")
#: The test tenants' Unix users start here (made once per machine, kept).
TEST_UID_BASE = 1_650_000


def ensure_user(name: str, uid: int) -> int:
    """A Unix user ``name`` (made with ``useradd`` when missing): Slurm runs a job as its
    submitter's uid, which every node must know by name."""
    with contextlib.suppress(KeyError):
        return pwd.getpwnam(name).pw_uid
    subprocess.run(["useradd", "--system", "--no-create-home", "--uid", str(uid),
                    "--shell", "/usr/sbin/nologin", name], check=True, capture_output=True)
    return pwd.getpwnam(name).pw_uid


def let_others_run(*paths: str | Path) -> None:
    """Let every user reach ``paths`` (the interpreter jobs run, through its links, and the
    project's code): they and their folders get o+x, passing only, like a site's shared
    software folder. A test machine's Python may live in a private home or temporary folder."""
    for path in paths:
        for target in {Path(os.path.abspath(path)), Path(path).resolve()}:
            for item in [target, *target.parents]:
                mode = item.stat().st_mode
                if not mode & 0o001:
                    os.chmod(item, (mode & 0o7777) | 0o001)


class SlurmCluster:
    def __init__(self, cpus: int = 8, memory_mib: int = 8192) -> None:
        missing = [p for p in (*DAEMONS, "/usr/bin/sbatch") if not os.path.exists(p)]
        if missing:
            raise RuntimeError(f"Slurm not installed ({', '.join(missing)} missing): install "
                               "Debian's slurmctld, slurmd, slurm-client and munge (scripts/test "
                               "does this as root)")
        self.root = Path(tempfile.mkdtemp(prefix="provisioner-slurm-"))
        os.chmod(self.root, 0o755)
        self.cpus, self.memory_mib = cpus, memory_mib
        self.processes: list[subprocess.Popen[bytes]] = []
        self.conf = self.root / "slurm.conf"
        self.env = {"SLURM_CONF": str(self.conf)}

    def _write_config(self) -> None:
        r = self.root
        for folder in ("state", "spool", "munge"):
            (r / folder).mkdir(exist_ok=True)
        os.chmod(r / "munge", 0o755)  # munged refuses a socket folder others cannot enter
        ctld, slurmd = _free_port(), _free_port()
        self.conf.write_text(f"""\
ClusterName=provisioner-test
SlurmctldHost=localhost
SlurmctldPort={ctld}
SlurmdPort={slurmd}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={r / 'munge' / 'munge.socket'}
SlurmUser=root
SlurmdUser=root
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}
SlurmctldPidFile={r / 'slurmctld.pid'}
SlurmdPidFile={r / 'slurmd.pid'}
SlurmctldLogFile={r / 'slurmctld.log'}
SlurmdLogFile={r / 'slurmd.log'}
ProctrackType=proctrack/cgroup
TaskPlugin=task/cgroup
JobAcctGatherType=jobacct_gather/cgroup
JobAcctGatherFrequency=task=1
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=512
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=5
MinJobAge=300
MpiDefault=none
MailProg=/bin/true
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
NodeName=localhost NodeAddr=127.0.0.1 CPUs={self.cpus} Boards=1 SocketsPerBoard=1 \
CoresPerSocket={self.cpus} ThreadsPerCore=1 RealMemory={self.memory_mib} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
PartitionName=small Nodes=localhost MaxTime=INFINITE State=UP
""")
        (r / "cgroup.conf").write_text(
            "CgroupPlugin=cgroup/v1\nConstrainRAMSpace=yes\nConstrainCores=no\n"
            "ConstrainSwapSpace=no\nConstrainDevices=no\n")

    def _spawn(self, argv: list[str], log: str) -> None:
        with open(self.root / log, "ab") as out:
            self.processes.append(subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, **self.env}))

    def run(self, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """A Slurm client command against this cluster, as root."""
        return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **self.env}, check=False)

    def jobs(self) -> list[dict]:
        """Every job ``squeue --json`` lists (finished ones too, for ``MinJobAge``)."""
        out = self.run("squeue", "--json")
        if out.returncode != 0:
            raise RuntimeError(f"squeue failed: {out.stderr}")
        return list(json.loads(out.stdout).get("jobs") or [])

    def live_jobs(self) -> list[dict]:
        return [j for j in self.jobs()
                if j.get("job_state") in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING",
                                          "SUSPENDED")]

    def start(self, timeout: float = 60) -> SlurmCluster:
        self._write_config()
        key = self.root / "munge.key"
        subprocess.run(["mungekey", "-c", "-k", str(key)], check=True, capture_output=True)
        os.chmod(key, 0o600)
        r = self.root
        self._spawn(["munged", "-F", "--force", f"--key-file={key}",
                     f"--socket={r / 'munge' / 'munge.socket'}", f"--pid-file={r / 'munged.pid'}",
                     f"--seed-file={r / 'munge.seed'}", f"--log-file={r / 'munged.log'}"],
                    "munged.out")
        self._wait(lambda: (r / "munge" / "munge.socket").exists(), 15, "munged")
        self._spawn(["slurmctld", "-D", "-i", "-f", str(self.conf)], "slurmctld.out")
        self._wait(lambda: self.run("sinfo", "-h").returncode == 0, timeout, "slurmctld")
        self._spawn(["slurmd", "-D", "-f", str(self.conf), "-N", "localhost"], "slurmd.out")
        self._wait(lambda: "idle" in self.run("sinfo", "-h", "-o", "%T").stdout, timeout,
                   "slurmd")
        # A fresh slurmctld starts no job for a few seconds: one warm-up job, to the end.
        job = self.run("sbatch", "--parsable", f"--chdir={self.root}", "--output=/dev/null",
                       "--wrap", "true")
        if job.returncode != 0:
            raise RuntimeError(f"sbatch failed: {job.stderr}")
        self._wait(lambda: not self.live_jobs(), timeout, "the warm-up job")
        return self

    def _wait(self, check, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for p in self.processes:
                if p.poll() is not None:
                    raise RuntimeError(f"{p.args[0]} exited ({p.returncode}): {self.logs()}")
            with contextlib.suppress(Exception):
                if check():
                    return
            time.sleep(0.1)
        raise RuntimeError(f"{what} not ready after {timeout}s: {self.logs()}")

    def logs(self) -> str:
        parts = []
        for name in ("munged.log", "slurmctld.log", "slurmd.log", "slurmctld.out", "slurmd.out"):
            with contextlib.suppress(OSError):
                parts.append(f"--- {name}\n{(self.root / name).read_text()[-2000:]}")
        return "\n".join(parts)

    def cancel_all(self, timeout: float = 60) -> None:
        """Cancel every job and wait until none runs (their processes gone)."""
        self.run("scancel", "--full", "--state=PENDING")
        ids = [str(j["job_id"]) for j in self.live_jobs()]
        if ids:
            self.run("scancel", "--full", *ids)
        deadline = time.monotonic() + timeout
        while self.live_jobs() and time.monotonic() < deadline:
            time.sleep(0.2)

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            if self.processes and all(p.poll() is None for p in self.processes):
                self.cancel_all()
        for p in reversed(self.processes):
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
        shutil.rmtree(self.root, ignore_errors=True)


if __name__ == "__main__":  # start one by hand: python -m tests.slurm
    cluster = SlurmCluster().start()
    print(f"export SLURM_CONF={cluster.conf}", flush=True)
    try:
        signal.pause()
    finally:
        cluster.stop()
