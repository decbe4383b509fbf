"""The ``provisioner`` command: run the service, make tokens, and talk to a running service.

The server's modules are imported only by the commands that run it, so the tenant-side
commands work from the SDK's install alone (no FastAPI, SQLAlchemy or backends).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn, Optional

import typer

if TYPE_CHECKING:
    from provisioner.settings import Settings

SERVER_EXTRA = "pip install 'dask-provisioner[server]'"

app = typer.Typer(help="Per-tenant Dask clusters on demand.", no_args_is_help=True,
                  pretty_exceptions_enable=False)


def _fail(message: str) -> NoReturn:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _default_token(data_dir: Path) -> str:
    """The embedded default tenant's token, kept in the data folder so it survives restarts."""
    from provisioner.tenants import new_token

    path = data_dir / "default-token"
    if path.exists():
        return path.read_text().strip()
    data_dir.mkdir(parents=True, exist_ok=True)
    token, _ = new_token()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


def build(settings: Settings):  # type: ignore[no-untyped-def]
    """Everything ``serve`` runs, assembled from settings (also used by tests)."""
    from clusters.base import Backend
    from provisioner.service import Provisioner
    from provisioner.store import Store
    from provisioner.tenants import TenantDirectory, hash_token, load_tenants, machine_tenant

    token = None
    if settings.tenants is not None:
        tenants = load_tenants(settings.tenants)
    else:
        token = _default_token(settings.data_dir)
        tenants = [machine_tenant(hash_token(token))]
    backend: Backend
    if settings.backend == "mesos":
        from clusters.mesos import MesosBackend

        if not settings.mesos_master:
            raise ValueError("--mesos-master is required with --backend mesos")
        backend = MesosBackend(
            settings.mesos_master, command=settings.mesos_command,
            failover_timeout=settings.mesos_failover_timeout,
            kill_grace=settings.mesos_kill_grace, teardown_on_close=settings.mesos_teardown,
        )
    else:
        from clusters.local import LocalBackend

        sandbox = {"auto": None, "on": True, "off": False}[settings.local_sandbox]
        backend = LocalBackend(settings.data_dir, host=settings.cluster_host, sandbox=sandbox)
    store = Store(settings.state_url)
    store.check()
    return Provisioner(settings, TenantDirectory(tenants), store, backend), token


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 8000,
    tenants: Annotated[Optional[Path], typer.Option(help="tenants YAML file")] = None,  # noqa: UP045
    state: Annotated[Optional[str], typer.Option(help="SQLAlchemy URL of the state database")] = None,  # noqa: UP045
    data_dir: Annotated[Path, typer.Option(help="folder for the SQLite file and cluster logs")] = Path("data"),
    backend: Annotated[str, typer.Option(help="local or mesos")] = "local",
    mesos_master: Annotated[Optional[str], typer.Option(help="HOST:PORT or zk://HOST:2181/mesos")] = None,  # noqa: UP045
    mesos_command: Annotated[Optional[str], typer.Option(help="command starting Dask on a Mesos agent")] = None,  # noqa: UP045
    keep_clusters: Annotated[bool, typer.Option(help="leave clusters running on shutdown")] = False,
    tls: Annotated[bool, typer.Option(help="per-cluster TLS (--no-tls only for trusted single-user setups)")] = True,
    public_url: Annotated[Optional[str], typer.Option(help="URL tenants reach the service at, behind a proxy")] = None,  # noqa: UP045
    log_level: Annotated[str, typer.Option(help="debug, info, warning")] = "info",
) -> None:
    """Run the service (local backend and an SQLite file unless told otherwise)."""
    try:
        import uvicorn
        from pydantic import ValidationError

        from api.app import create_app
        from provisioner.logs import configure as configure_logging
        from provisioner.settings import Settings
        from provisioner.store import StoreError
        from provisioner.tenants import TenantsFileError
    except ImportError as exc:
        _fail(f"the server is not installed ({exc.name} is missing): {SERVER_EXTRA}")

    configure_logging(log_level)
    overrides = {
        "host": host, "port": port, "tenants": tenants, "state": state, "data_dir": data_dir,
        "backend": backend, "mesos_master": mesos_master, "mesos_command": mesos_command,
        "keep_clusters": keep_clusters,
        "tls": tls, "public_url": public_url,
    }
    try:
        settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
        provisioner, token = build(settings)
    except ValidationError as exc:
        _fail("; ".join(f"--{'-'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()))
    except (TenantsFileError, StoreError, ValueError) as exc:
        _fail(str(exc))
    if not settings.tls:
        typer.secho(
            "WARNING: --no-tls: clusters accept plain TCP connections from anyone who can reach "
            "them. Use this only on a trusted single-user machine.",
            fg=typer.colors.YELLOW, err=True, bold=True,
        )
    if not settings.metrics_token and settings.host not in ("127.0.0.1", "localhost", "::1"):
        typer.secho(
            f"WARNING: /metrics (every tenant's name, quota and usage) is open to anyone who "
            f"can reach {settings.host}:{settings.port}; set PROVISIONER_METRICS_TOKEN.",
            fg=typer.colors.YELLOW, err=True, bold=True,
        )
    if token:
        typer.echo(f"tenant 'default' token: {token}", err=True)
        # Bound to every interface: this machine reaches it on loopback.
        near = {"0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(settings.host, settings.host)
        typer.echo(f"  export PROVISIONER_URL=http://{near}:{settings.port}", err=True)
        typer.echo(f"  export PROVISIONER_TOKEN={token}", err=True)
    # uvicorn re-raises the stop signal once it has shut down gracefully; with these handlers
    # in place that ends the process with status 0 instead of "killed by SIGTERM".
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: sys.exit(0))
    # The standard asyncio loop, not uvloop: process exits are watched with pidfds on the
    # loop, and uvloop (libuv) defers closing a poll handle, so a new pidfd that reuses the
    # number of one just closed can lose its registration and its exit is never seen.
    # Websockets (dashboards) with wsproto: uvicorn's websockets implementation logs an
    # error for every handshake refused with an HTTP answer (401, 404, ...).
    uvicorn.run(create_app(provisioner), host=settings.host, port=settings.port,
                log_level=log_level.lower(), timeout_graceful_shutdown=30, loop="asyncio",
                ws="wsproto")


@app.command()
def token() -> None:
    """Print a new random token and its SHA-256 (the hash goes into the tenants file)."""
    from provisioner.tenants import new_token

    value, digest = new_token()
    typer.echo(f"token:        {value}")
    typer.echo(f"token_sha256: {digest}")


def main() -> None:
    try:
        from provisioner import cli_client

        cli_client.register(app)
    except ImportError:
        pass
    app(prog_name="provisioner")


if __name__ == "__main__":
    sys.exit(main())
