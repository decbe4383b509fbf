"""Start the services a benchmark measures: ours (``provisioner serve``) and dask-gateway's.

Each runs as a subprocess on loopback with its own temporary folder and config, and is
stopped, with every process it started, when the ``with`` block ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import yaml

from clusters.local.backend import owned_processes, owner_key
from provisioner.tenants import hash_token

GiB = 2**30
TOKEN = "bench-token"
GATEWAY_PASSWORD = "bench-password"


def write_results(path: Path, out: dict[str, Any]) -> None:
    """Save a benchmark's numbers as JSON (results are per machine, so git ignores them)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    print(f"\nwrote {path}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:4]} exited: {log.read_text()[-2000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{url} not up after {timeout}s: {log.read_text()[-2000:]}")


def _stop(proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # anything left in its process group


def bench_tenant(clusters: int = 40) -> dict[str, Any]:
    """One roomy tenant (token ``bench-token``) with gateway-like small processes."""
    return {
        "name": "bench", "token_sha256": hash_token(TOKEN),
        "quota": {"cores": 4 * clusters, "memory": 4 * GiB * clusters, "clusters": clusters},
        "defaults": {"worker_cores": 1, "worker_memory": GiB, "scheduler_cores": 1,
                     "scheduler_memory": GiB, "idle_timeout": 3600, "no_client_timeout": 3600},
    }


@contextlib.contextmanager
def our_service(args: list[str] | None = None, env: dict[str, str] | None = None,
                clusters: int = 40, tenant: dict[str, Any] | None = None) -> Iterator[str]:
    """``provisioner serve`` (the local backend unless ``args`` say otherwise); yields its
    URL. ``tenant``: settings added to the bench tenant's entry."""
    with tempfile.TemporaryDirectory(prefix="bench-ours-") as tmp:
        root = Path(tmp)
        tenants = root / "tenants.yaml"
        tenants.write_text(yaml.safe_dump({"tenants": [{**bench_tenant(clusters),
                                                        **(tenant or {})}]}))
        port = free_port()
        data = root / "data"
        log = root / "service.log"
        cmd = [sys.executable, "-m", "provisioner.cli", "serve", "--port", str(port),
               "--data-dir", str(data), "--tenants", str(tenants), "--log-level", "warning",
               *(args or [])]
        with open(log, "ab") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                    env={**os.environ, **(env or {})}, start_new_session=True)
        try:
            url = f"http://127.0.0.1:{port}"
            _wait_http(url + "/healthz", proc, log)
            yield url
        finally:
            _stop(proc)
            for ref in owned_processes(owner_key(data)):
                with contextlib.suppress(OSError):
                    os.killpg(ref.pid, signal.SIGKILL)


GATEWAY_CONFIG = """\
# dask-gateway-server config written by bench/harness.py: local processes, loopback only.
import os
c.DaskGateway.address = {api!r}
c.Proxy.address = {proxy!r}
c.Proxy.tcp_address = {tcp!r}
c.DaskGateway.backend_class = "dask_gateway_server.backends.local.UnsafeLocalBackend"
c.DaskGateway.authenticator_class = "dask_gateway_server.auth.SimpleAuthenticator"
c.SimpleAuthenticator.password = {password!r}
c.LocalBackend.clusters_directory = {clusters!r}
# Current distributed ships the ``dask`` command, not the old dask-scheduler/dask-worker scripts.
c.ClusterConfig.scheduler_cmd = [{dask!r}, "scheduler"]
c.ClusterConfig.worker_cmd = [{dask!r}, "worker"]
c.ClusterConfig.worker_cores = 1
c.ClusterConfig.worker_memory = "1 G"
c.ClusterConfig.scheduler_cores = 1
c.ClusterConfig.scheduler_memory = "1 G"
"""


@contextlib.contextmanager
def gateway_server(extra_config: str = "", env: dict[str, str] | None = None,
                   ) -> Iterator[tuple[str, str, int]]:
    """dask-gateway-server with its local backend (or what ``extra_config``, Python appended to
    its config file, says); yields its HTTP and proxy addresses and pid."""
    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as tmp:
        root = Path(tmp)
        (root / "clusters").mkdir()
        api, proxy, tcp = free_port(), free_port(), free_port()
        dask_cli = str(Path(sys.executable).with_name("dask"))
        config = root / "dask_gateway_config.py"
        config.write_text(GATEWAY_CONFIG.format(
            api=f"127.0.0.1:{api}", proxy=f"127.0.0.1:{proxy}", tcp=f"127.0.0.1:{tcp}",
            password=GATEWAY_PASSWORD, clusters=str(root / "clusters"), dask=dask_cli,
        ) + extra_config.format(api=f"127.0.0.1:{api}", root=str(root)))
        log = root / "gateway.log"
        cmd = [sys.executable, "-m", "dask_gateway_server", "-f", str(config)]
        with open(log, "ab") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=root,
                                    env={**os.environ, **(env or {})}, start_new_session=True)
        try:
            url = f"http://127.0.0.1:{proxy}"
            _wait_http(url + "/api/health", proc, log)
            yield url, f"gateway://127.0.0.1:{tcp}", proc.pid
        finally:
            _stop(proc)


def dask_children(pid: int) -> list[int]:
    """Children of ``pid`` running a Dask scheduler or worker (dask-gateway's cluster processes)."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, StopIteration, ValueError):
            with open(f"/proc/{entry.name}/status") as f:
                ppid = next(int(line.split()[1]) for line in f if line.startswith("PPid:"))
            if ppid != pid:
                continue
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            if any(a in (b"scheduler", b"worker") for a in argv):
                found.append(int(entry.name))
    return found
