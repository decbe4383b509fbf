"""The ``provisioner`` command: run the service, make tokens, and talk to a running service.

The server's modules are imported only by the commands that run it, so the tenant-side
commands work from the SDK's install alone (no FastAPI, SQLAlchemy or backends).
"""

from __future__ import annotations

import logging
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


#: Files in the data folder holding secrets the service made for itself (0600).
DEFAULT_TOKEN_FILE = "default-token"
METRICS_TOKEN_FILE = "metrics-token"


def _new_token() -> str:
    from provisioner.tenants import new_token

    return new_token()[0]


def _open_store(settings: Settings):  # type: ignore[no-untyped-def]
    """The store, with the secret key checked against what the database holds.

    A key file made just now (it was missing) that cannot open the credentials already
    stored is removed again, and the error says the key is missing rather than wrong.
    """
    from provisioner.secrets import Keyring, WrongKey, key_source, load_or_create_key
    from provisioner.store import Store

    made_now = settings.secret_key is None and not settings.key_file.exists()
    store = Store(settings.state_url, Keyring(load_or_create_key(settings), key_source(settings)))
    store.check()
    try:
        sealed = store.seal_credentials()
    except WrongKey as exc:
        if not made_now:
            raise
        settings.key_file.unlink(missing_ok=True)
        raise WrongKey(f"{exc}. The key file did not exist: restore it, or set "
                       "PROVISIONER_SECRET_KEY to the key") from None
    if sealed:
        logging.getLogger("provisioner.cli").info(
            "encrypted the credentials of %d cluster(s) stored in clear by an earlier release",
            sealed)
    return store


def build(settings: Settings):  # type: ignore[no-untyped-def]
    """Everything ``serve`` runs, assembled from settings (also used by tests).

    Returns the service and the default tenant's token (None with a tenants file). The
    service's settings carry the metrics token: the one given, or else the one kept in the
    data folder (made on first start): /metrics always needs one.
    """
    from clusters.base import Backend
    from provisioner.files import keep_secret
    from provisioner.service import Provisioner
    from provisioner.tenants import TenantDirectory, hash_token, load_tenants, machine_tenant

    token = None
    if settings.tenants is not None:
        tenants = load_tenants(settings.tenants)
    else:
        token = keep_secret(settings.data_dir / DEFAULT_TOKEN_FILE, _new_token)
        tenants = [machine_tenant(hash_token(token))]
    if not settings.metrics_token:
        settings = settings.model_copy(update={
            "metrics_token": keep_secret(settings.data_dir / METRICS_TOKEN_FILE, _new_token)})
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
        backend = LocalBackend(settings.data_dir, host=settings.cluster_host, sandbox=sandbox,
                               hidden=settings.private_files(), uid_base=settings.local_uid_base)
    store = _open_store(settings)
    return Provisioner(settings, TenantDirectory(tenants), store, backend), token


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 8000,
    tenants: Annotated[Optional[Path], typer.Option(help="tenants YAML file")] = None,  # noqa: UP045
    state: Annotated[Optional[str], typer.Option(help="SQLAlchemy URL of the state database")] = None,  # noqa: UP045
    data_dir: Annotated[Path, typer.Option(help="folder for the SQLite file and cluster logs")] = Path("data"),
    secret_key_file: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        help="key file sealing credentials at rest (default DATA_DIR/secret.key)")] = None,
    backend: Annotated[str, typer.Option(help="local or mesos")] = "local",
    mesos_master: Annotated[Optional[str], typer.Option(help="HOST:PORT or zk://HOST:2181/mesos")] = None,  # noqa: UP045
    mesos_command: Annotated[Optional[str], typer.Option(help="command starting Dask on a Mesos agent")] = None,  # noqa: UP045
    keep_clusters: Annotated[bool, typer.Option(help="leave clusters running on shutdown")] = False,
    tls: Annotated[bool, typer.Option(help="per-cluster TLS (--no-tls only for trusted single-user setups)")] = True,
    max_connections: Annotated[Optional[int], typer.Option(  # noqa: UP045
        help="connections served at once; more are answered 503 [default: 1000]")] = None,
    header_timeout: Annotated[Optional[float], typer.Option(  # noqa: UP045
        help="seconds a client has to send a request's headers [default: 10]")] = None,
    body_timeout: Annotated[Optional[float], typer.Option(  # noqa: UP045
        help="seconds a client has to send a request's body [default: 30]")] = None,
    public_url: Annotated[Optional[str], typer.Option(help="URL tenants reach the service at, behind a proxy")] = None,  # noqa: UP045
    log_level: Annotated[str, typer.Option(help="debug, info, warning")] = "info",
) -> None:
    """Run the service (local backend and an SQLite file unless told otherwise)."""
    try:
        from pydantic import ValidationError

        from api.app import create_app
        from api.server import run as run_server
        from provisioner.files import make_private, private_data_dir
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
        "keep_clusters": keep_clusters, "tls": tls, "secret_key_file": secret_key_file,
        "max_connections": max_connections, "header_timeout": header_timeout,
        "body_timeout": body_timeout, "public_url": public_url,
    }
    try:
        settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        _fail("; ".join(f"--{'-'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()))
    # Before anything is created: the data folder and everything in it is ours alone.
    make_private()
    try:
        private_data_dir(settings.data_dir)
        provisioner, token = build(settings)
    except (OSError, TenantsFileError, StoreError, ValueError) as exc:
        _fail(str(exc))
    if not settings.tls:
        typer.secho(
            "WARNING: --no-tls: clusters accept plain TCP connections from anyone who can reach "
            "them. Use this only on a trusted single-user machine.",
            fg=typer.colors.YELLOW, err=True, bold=True,
        )
    # Bound to every interface: this machine reaches it on loopback.
    near = {"0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(settings.host, settings.host)
    url = f"http://{near}:{settings.port}"
    if token:
        typer.echo(f"tenant 'default' token: {token}", err=True)
        typer.echo(f"  export PROVISIONER_URL={url}", err=True)
        typer.echo(f"  export PROVISIONER_TOKEN={token}", err=True)
    # The metrics token itself is not printed (logs travel further than the data folder).
    # ``settings`` is as given: without a token there, build() made or read the file's.
    if settings.metrics_token:
        bearer = "$PROVISIONER_METRICS_TOKEN"
    else:
        bearer = f"$(cat {(settings.data_dir / METRICS_TOKEN_FILE).resolve()})"
    typer.echo("/metrics needs the metrics token:", err=True)
    typer.echo(f"  curl -H \"Authorization: Bearer {bearer}\" {url}/metrics", err=True)
    # uvicorn re-raises the stop signal once it has shut down gracefully; with these handlers
    # in place that ends the process with status 0 instead of "killed by SIGTERM".
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: sys.exit(0))
    run_server(create_app(provisioner), settings, log_level)


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
