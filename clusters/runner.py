"""Run one Dask scheduler or worker in this process, the way every backend starts them.

``python -m clusters.runner scheduler|worker '<json options>'`` is the command line used for
child processes and Mesos tasks; :func:`serve` is also called directly in processes forked
from a warm server, so both paths run exactly the same code.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.util
import json
import math
import os
import signal
import sys
from typing import TYPE_CHECKING, Any

from clusters.base import MEMORY_EXIT_CODE, ClusterSpec
from clusters.sandbox import confine_from

# Dask is imported where it is used, not here: a spawned runner confines itself first, while
# it is still single-threaded (importing Dask starts threads, e.g. numpy's BLAS pool), and
# Landlock binds only the thread that asks. A fork server has imported it all already.
if TYPE_CHECKING:
    from distributed import Scheduler, Worker
    from distributed.security import Security


def security_from(credentials: dict[str, str] | None) -> Security | None:
    """A Security that requires TLS with this cluster's own CA, or None for plain TCP."""
    if not credentials:
        return None
    from distributed.security import Security

    return Security(
        tls_ca_file=credentials["ca"],
        tls_scheduler_cert=credentials["cert"],
        tls_scheduler_key=credentials["key"],
        tls_worker_cert=credentials["cert"],
        tls_worker_key=credentials["key"],
        tls_client_cert=credentials["cert"],
        tls_client_key=credentials["key"],
        require_encryption=True,
    )


def dashboard_prefix(cluster_id: str) -> str:
    """Where a scheduler serves its dashboard: the path the service's proxy forwards as is."""
    return f"/clusters/{cluster_id}/dashboard"


def scheduler_options(spec: ClusterSpec, reap_folder: str | None = None,
                      **extra: Any) -> dict[str, Any]:
    """What a backend passes to start ``spec``'s scheduler (plus host/port of its choosing)."""
    reap = {"idle_timeout": spec.idle_timeout, "no_client_timeout": spec.no_client_timeout,
            "lease": spec.lease, "folder": reap_folder}
    return {"credentials": spec.credentials or None, "reap": reap,
            "http_prefix": dashboard_prefix(spec.cluster_id), **extra}


def worker_threads(cores: float) -> int:
    """Task threads for a worker of ``cores`` cores: whole threads, at least one."""
    return max(1, math.ceil(cores - 1e-9))


def worker_options(spec: ClusterSpec, address: str, name: str, death_timeout: float,
                   **extra: Any) -> dict[str, Any]:
    """What a backend passes to start one worker of ``spec`` named ``name``."""
    return {
        "address": address, "name": name, "nthreads": worker_threads(spec.worker_cores),
        "memory_limit": spec.worker_memory, "death_timeout": death_timeout,
        "credentials": spec.credentials or None, **extra,
    }


HAVE_BOKEH = importlib.util.find_spec("bokeh") is not None


def protocol_for(credentials: dict[str, str] | None) -> str:
    """A cluster with credentials speaks TLS only; one without (``--no-tls``) plain TCP."""
    return "tls://" if credentials else "tcp://"


def require_client_certificates(server: Any, ca_pem: str) -> None:
    """Make the server's HTTPS (dashboard and the service's JSON control routes) accept only
    clients holding a certificate of the cluster's own CA. Dask's own TLS option for the
    dashboard encrypts but asks no client for a certificate."""
    import ssl

    context = getattr(getattr(server, "http_server", None), "ssl_options", None)
    if not isinstance(context, ssl.SSLContext):
        raise RuntimeError("the scheduler's HTTP server is not using TLS")
    context.load_verify_locations(cadata=ca_pem)
    context.verify_mode = ssl.CERT_REQUIRED


@contextlib.contextmanager
def _dashboard_tls(credentials: dict[str, str] | None) -> Any:
    """Dask config that serves the HTTP server over TLS with the cluster's certificate; Dask
    reads PEM files, written to a private folder only while the scheduler is built."""
    if not credentials:
        yield
        return
    import tempfile

    import dask.config

    with tempfile.TemporaryDirectory(prefix="dashboard-tls-") as folder:
        paths = {}
        for part in ("ca", "cert", "key"):
            paths[part] = os.path.join(folder, f"{part}.pem")
            fd = os.open(paths[part], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(credentials[part])
        with dask.config.set({"distributed.scheduler.dashboard.tls.ca-file": paths["ca"],
                              "distributed.scheduler.dashboard.tls.cert": paths["cert"],
                              "distributed.scheduler.dashboard.tls.key": paths["key"]}):
            yield


async def _scheduler(options: dict[str, Any]) -> Scheduler:
    from distributed import Scheduler

    from clusters.plugin import ProvisionerPlugin

    host = listen_host(options)
    credentials = options.get("credentials")
    with _dashboard_tls(credentials):
        scheduler = Scheduler(
            host=host,
            port=options.get("port", 0),
            protocol=protocol_for(credentials),
            security=security_from(credentials),
            # The HTTP server always runs (the service's control routes, health): on our
            # host and a port we chose, never Dask's default of 8787 on every interface.
            dashboard=HAVE_BOKEH,
            dashboard_address=f"{host}:{options.get('dashboard_port') or 0}",
            http_prefix=options.get("http_prefix") or "/",
            validate=False,
        )
    # The HTTP server listens already, but the event loop has not run since: no connection
    # is accepted before this takes effect.
    if credentials:
        require_client_certificates(scheduler, credentials["ca"])
    scheduler.add_plugin(ProvisionerPlugin(reap=options.get("reap")))
    await scheduler
    return scheduler


async def _worker(options: dict[str, Any]) -> Worker:
    import dask.config
    from distributed import Worker
    from tornado.ioloop import PeriodicCallback

    address = options.get("address") or await _scheduler_address(
        options["address_file"], float(options.get("address_wait") or 60))
    # A worker's HTTP server would show its logs and call stacks to anyone who can reach it,
    # with no client certificate asked: it serves nothing (the dashboard is the scheduler's).
    with dask.config.set({"distributed.worker.http.routes": []}):
        worker = Worker(
            address,
            name=options["name"],
            nthreads=int(options.get("nthreads", 1)),
            memory_limit=int(options.get("memory_limit", 0)) or "auto",
            host=listen_host(options),
            port=options.get("port"),
            security=security_from(options.get("credentials")),
            death_timeout=options.get("death_timeout", 60),
            dashboard=False,
            validate=False,
        )
        await worker
    if worker.memory_manager.memory_limit and options.get("memory_guard", True):
        worker.periodic_callbacks["provisioner-memory-guard"] = PeriodicCallback(
            functools.partial(_memory_guard, worker), MEMORY_GUARD_INTERVAL * 1000)
        worker.periodic_callbacks["provisioner-memory-guard"].start()
    return worker


#: Like Dask's nanny (which we do without: it would cost a second process per worker), a
#: worker past this fraction of its memory limit is ended; the service then replaces it.
MEMORY_TERMINATE_FRACTION = 0.95
MEMORY_GUARD_INTERVAL = 0.25


def _memory_guard(worker: Worker) -> None:
    """Keep the memory limit honest: end this worker if it uses more than it was given."""
    import psutil

    limit = worker.memory_manager.memory_limit or 0
    rss = psutil.Process().memory_info().rss
    if limit and rss > MEMORY_TERMINATE_FRACTION * limit:
        print(f"worker {worker.name}: {rss} bytes in use, over {MEMORY_TERMINATE_FRACTION:.0%} of "
              f"its {limit}-byte limit: ending it", file=sys.stderr, flush=True)
        os._exit(MEMORY_EXIT_CODE)


def _head(path: str, limit: int) -> str:
    with open(path) as f:
        return f.read(limit)


async def _scheduler_address(path: str, timeout: float) -> str:
    """A worker started along with its scheduler (a batch job) waits for the address the
    scheduler writes in their cluster's folder (their tenant's own, as the worker is)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        with contextlib.suppress(OSError, UnicodeDecodeError):
            address = (await asyncio.to_thread(_head, path, 300)).strip()
            if address.startswith(("tls://", "tcp://")):
                return address
        if asyncio.get_running_loop().time() > deadline:
            raise SystemExit(f"no scheduler address in {path} after {timeout:g}s")
        await asyncio.sleep(0.05)


def _report_ready(fd: int | None, info: dict[str, Any]) -> None:
    if fd is None:
        return
    with contextlib.suppress(OSError):
        os.write(fd, (json.dumps(info) + "\n").encode())
        os.close(fd)


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


#: ``host`` meaning "this batch node's own address": the name Slurm gave the node
#: (``SLURMD_NODENAME``, else the host name), resolved here as the service resolves it.
NODE_HOST = "batch-node"


def listen_host(options: dict[str, Any]) -> str:
    host = options.get("host") or "127.0.0.1"
    if host != NODE_HOST:
        return str(host)
    import socket

    return socket.gethostbyname(os.environ.get("SLURMD_NODENAME") or socket.gethostname())


def _write_file(template: str | None, text: str) -> None:
    """Report to a file (batch jobs have no parent to tell): ``%j`` in the name is the Slurm
    job's id; the file appears whole (written aside, then renamed)."""
    if not template:
        return
    path = template.replace("%j", os.environ.get("SLURM_JOB_ID", "0"))
    aside = f"{path}.{os.getpid()}.tmp"
    with open(aside, "w") as f:
        f.write(text)
    os.replace(aside, path)


async def serve(role: str, options: dict[str, Any], ready_fd: int | None = None) -> int:
    """Start the server, report readiness on ``ready_fd``, run until closed or SIGTERM.

    The report holds ports only: the backend knows the host it asked for and builds the
    addresses itself, so nothing the process says becomes an address unchecked.
    """
    loop = asyncio.get_running_loop()
    server: Scheduler | Worker
    if role == "scheduler":
        server = await _scheduler(options)
        http = server.http_server.port if server.http_server is not None else None
        ports = {"port": _port(server.address), "http_port": http}
        _report_ready(ready_fd, ports)
        _write_file(options.get("ready_file"), json.dumps(ports))
        _write_file(options.get("address_file"), server.address)
    elif role == "worker":
        server = await _worker(options)
        _report_ready(ready_fd, {"port": _port(server.address)})
    else:
        raise SystemExit(f"unknown role {role!r}")

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    closed = asyncio.ensure_future(server.finished())
    stopper = asyncio.ensure_future(stop.wait())
    await asyncio.wait([closed, stopper], return_when=asyncio.FIRST_COMPLETED)
    if stop.is_set() and not closed.done():
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.close(), 10)
    stopper.cancel()
    if stop.is_set() or role == "worker":
        return 0
    # A scheduler that reaped itself says why in its exit status (clusters.base.REAP_EXIT_CODES);
    # closed any other way (a client's shutdown, an error) it says so with status 3.
    from clusters.plugin import ProvisionerPlugin

    plugin = server.plugins.get(ProvisionerPlugin.name)
    code = plugin.exit_code() if isinstance(plugin, ProvisionerPlugin) else None
    return code if code is not None else 3


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2:
        print("usage: python -m clusters.runner scheduler|worker '<json options>'|env:VAR [ready-fd]",
              file=sys.stderr)
        return 2
    # ``env:NAME`` reads the options from that variable (and takes it out of the environment
    # the cluster's code sees): keeps TLS keys out of argv, which every local user can read.
    raw = os.environ.pop(argv[1][4:], "") if argv[1].startswith("env:") else argv[1]
    role, options = argv[0], json.loads(raw)
    ready_fd = int(argv[2]) if len(argv) > 2 else None
    return run(role, options, ready_fd)


def run(role: str, options: dict[str, Any], ready_fd: int | None = None) -> int:
    """Confine the process when the backend asked to, and only then take in what a tenant
    influences (its environment, Dask's config from it and from files), then serve."""
    confine_from(options)
    os.environ.update(options.get("env") or {})
    if "dask" in sys.modules:  # a forked process: Dask read its config before the tenant's env
        from clusters.daskconfig import reload_config

        reload_config()
    return asyncio.run(serve(role, options, ready_fd))


if __name__ == "__main__":
    sys.exit(main())
