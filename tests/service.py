"""Run the real service (``provisioner serve``) in a subprocess for tests.

Each instance has its own data folder and tenants file; ``cleanup`` stops the service and
kills every cluster process it owns, even after a SIGKILL of the service, so a failing test
leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import yaml

from clusters import cgroups
from clusters.local.backend import OWNER_VAR, owned_processes, owner_key
from clusters.local.procs import ProcessRef, is_alive, ref_for
from provisioner.tenants import hash_token

MiB = 2**20
GiB = 2**30


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tenant(name: str, cores: float = 6, memory: int = 8 * GiB, clusters: int = 4,
           workers_per_cluster: int | None = None, env: dict[str, str] | None = None,
           queue: bool = False, **defaults: Any) -> dict[str, Any]:
    """A tenants-file entry whose token is ``token-<name>``; small processes by default.
    Creates past its quota are refused (403) unless ``queue``: most tests check refusals."""
    base = {"worker_cores": 1, "worker_memory": 512 * MiB, "scheduler_cores": 0.5,
            "scheduler_memory": 256 * MiB, "idle_timeout": 1800, "no_client_timeout": 1800}
    base.update(defaults)
    quota: dict[str, Any] = {"cores": cores, "memory": memory, "clusters": clusters}
    if workers_per_cluster is not None:
        quota["workers_per_cluster"] = workers_per_cluster
    entry = {"name": name, "token_sha256": hash_token(f"token-{name}"), "quota": quota,
             "defaults": base, "queue": queue}
    if env:
        entry["env"] = env
    return entry


class ServiceProcess:
    def __init__(self, workdir: Path, tenants: list[dict[str, Any]] | None,
                 args: list[str] | None = None, env: dict[str, str] | None = None,
                 state: str | None = None) -> None:
        self.workdir = workdir
        self.data_dir = workdir / "data"
        self.tenants_file: Path | None = None
        if tenants is not None:
            self.tenants_file = workdir / "tenants.yaml"
            self.tenants_file.write_text(yaml.safe_dump({"tenants": tenants}))
        self.state = state or f"sqlite:///{self.data_dir / 'provisioner.db'}"
        self.args = [*(args or []), "--state", self.state]
        self.env = env or {}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "service.log"

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "provisioner.cli", "serve", "--port", str(self.port),
               "--data-dir", str(self.data_dir), "--log-level", "info"]
        if self.tenants_file is not None:
            cmd += ["--tenants", str(self.tenants_file)]
        return cmd + self.args

    def start(self, timeout: float = 60) -> ServiceProcess:
        env = {**os.environ, **self.env}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                         env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"service exited: {self.log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return self
            time.sleep(0.1)
        raise RuntimeError(f"service not up after {timeout}s: {self.log.read_text()[-3000:]}")

    def client(self, name: str | None, token: str | None = None) -> httpx.Client:
        headers = {}
        if token is None and name is not None:
            token = f"token-{name}"
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return httpx.Client(base_url=self.url, headers=headers, timeout=120)

    def metrics_token(self) -> str:
        """The token /metrics needs: the one it was given, else the one it keeps in its data folder."""
        return self.env.get("PROVISIONER_METRICS_TOKEN") or \
            (self.data_dir / "metrics-token").read_text().strip()

    def create(self, name: str, wait: float = 90, **body: Any) -> dict[str, Any]:
        """Create a cluster of tenant ``name`` and wait until it runs (asserted)."""
        with self.client(name) as http:
            r = http.post("/clusters", params={"wait": wait}, json=body)
        assert r.status_code == 201, r.text
        assert r.json()["status"] == "running", r.json()
        return r.json()

    def get_cluster(self, name: str, cluster_id: str) -> dict[str, Any]:
        """Tenant ``name``'s record of one cluster."""
        with self.client(name) as http:
            return http.get(f"/clusters/{cluster_id}").json()

    def upstream(self, cluster_id: str) -> str:
        """The scheduler's own HTTP(S) URL, as the service keeps it for its dashboard proxy
        (never shown to tenants)."""
        ((url,),) = self.sql("select dashboard_url from clusters where id = :id", id=cluster_id)
        return url

    def signal(self, sig: int) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=60)

    def kill(self) -> None:
        """SIGKILL the service alone: its clusters keep running, as after a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def processes_of(self, cluster_id: str) -> list[ProcessRef]:
        """Live processes of ``cluster_id``, as the service recorded them in its database."""
        row = self.sql("select backend_state from clusters where id = :id", id=cluster_id)
        state = (json.loads(row[0][0]) if isinstance(row[0][0], str) else row[0][0]) if row else {}
        refs = []
        if state.get("scheduler"):
            refs.append(ProcessRef.from_dict(state["scheduler"]))
        refs += [ProcessRef.from_dict(w) for w in (state.get("workers") or {}).values()]
        return [r for r in refs if is_alive(r)]

    def sql(self, statement: str, **params: Any) -> list[Any]:
        """Run one statement on the service's state database (to inspect or to break it)."""
        import sqlalchemy as sa

        engine = sa.create_engine(self.state)
        try:
            with engine.begin() as conn:
                result = conn.execute(sa.text(statement), params)
                return list(result) if result.returns_rows else []
        finally:
            engine.dispose()

    def security(self, name: str, cluster_id: str) -> Any:
        """The Security a tenant's notebook would use for this cluster (None without TLS)."""
        from provisioner.client import security_from_credentials

        with self.client(name) as http:
            r = http.get(f"/clusters/{cluster_id}/credentials")
        if r.status_code == 409:
            return None
        r.raise_for_status()
        c = r.json()
        return security_from_credentials(c)

    def zygotes(self) -> list[int]:
        """This service's fork servers: marked as its own, running the zygote, no group leaders."""
        marker = f"{OWNER_VAR}={owner_key(self.data_dir)}:forkserver".encode()
        found = []
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            with contextlib.suppress(OSError):
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                if b"clusters.local.zygote" in cmdline and marker in environ \
                        and os.getpgid(pid) != pid and ref_for(pid) is not None:
                    found.append(pid)
        return found

    def owned(self) -> list[Any]:
        return owned_processes(owner_key(self.data_dir))

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for ref in self.owned():
            with contextlib.suppress(OSError):
                os.killpg(ref.pid, signal.SIGKILL)
        for pid in self.zygotes():  # it follows the service by itself; this is for certain
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while any(is_alive(r) for r in self.owned()) and time.monotonic() < deadline:
            time.sleep(0.1)
        tree = cgroups.detect(f"dask-provisioner/{owner_key(self.data_dir)}")
        if tree is not None:  # whatever a cluster's processes started, wherever it went
            tree.remove(())


def live_ids(service: ServiceProcess, name: str) -> set[str]:
    """Ids of the tenant's clusters that are not stopping or ended."""
    with service.client(name) as http:
        clusters = http.get("/clusters").json()["clusters"]
    return {c["id"] for c in clusters if c["status"] in ("pending", "starting", "running")}


@contextlib.contextmanager
def stopping_new_clusters(service: ServiceProcess, *names: str) -> Iterator[None]:
    """Stop every cluster of these tenants started inside the block, whatever happens in it."""
    before = {n: live_ids(service, n) for n in names}
    try:
        yield
    finally:
        for name in names:
            with service.client(name) as http:
                for cluster_id in live_ids(service, name) - before[name]:
                    http.delete(f"/clusters/{cluster_id}")


def wait_until(check: Any, timeout: float = 60, interval: float = 0.2, what: str = "") -> Any:
    """Poll ``check()`` until it returns something truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or check}: last={last!r}")
