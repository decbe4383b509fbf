"""The ``provisioner`` command: run the service, make tokens, and talk to a running service.

The server's modules are imported only by the commands that run it, so the tenant-side
commands work from the SDK's install alone (no FastAPI, SQLAlchemy or backends).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, Optional

import typer

if TYPE_CHECKING:
    from provisioner.settings import Settings
    from provisioner.store import Store
    from provisioner.tenants import Environment, TenantDirectory

SERVER_EXTRA = "install the 'server' extra: pip install '.[server]' in a clone of the repository"

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
    store.migrate()  # under the lease, before anything reads the tables
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
    from provisioner.service import ClusterService
    from provisioner.tenants import (
        TenantDirectory,
        check_slurm_users,
        hash_token,
        load_environments,
        load_tenants,
        machine_tenant,
    )

    token = None
    environments: list[Environment] = []
    if settings.tenants is not None:
        tenants = load_tenants(settings.tenants)
        environments = load_environments(settings.tenants, tenants)
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
    elif settings.backend == "slurm":
        from clusters.slurm import SlurmBackend
        from clusters.slurm.commands import require_commands

        require_commands()
        check_slurm_users(tenants)
        if settings.slurm_folder is None:  # in the data folder: others may pass, not list
            os.chmod(settings.data_dir, 0o711)
        backend = SlurmBackend(settings.slurm_folder or settings.data_dir / "slurm",
                               partition=settings.slurm_partition, python=settings.slurm_python,
                               poll_interval=settings.slurm_poll_interval)
    else:
        from clusters.local import LocalBackend

        sandbox = {"auto": None, "on": True, "off": False}[settings.local_sandbox]
        backend = LocalBackend(settings.data_dir, host=settings.cluster_host, sandbox=sandbox,
                               hidden=settings.private_files(), uid_base=settings.local_uid_base)
    directory = TenantDirectory(tenants, environments)
    _read_versions(directory, local=settings.backend == "local")
    store = _open_store(settings)
    _check_backend_owns(store, backend.name)
    return ClusterService(settings, directory, store, backend), token


def _read_versions(directory: TenantDirectory, local: bool) -> None:
    """Each environment's versions, read once from its interpreter; on the local backend an
    environment whose interpreter cannot run stops start-up (on Mesos it lives on the agents,
    and its versions are known only where the same path exists here)."""
    from provisioner.tenants import TenantsFileError
    from provisioner.versions import installed_versions, versions_of

    directory.versions[""] = installed_versions()  # the service's own: clusters with none
    for env in directory.environments.values():
        if env.python is None:
            continue
        try:
            directory.versions[env.name] = versions_of(env.python)
        except ValueError as exc:
            if local:
                raise TenantsFileError(f"environment {env.name!r}: {exc}") from None


def _check_backend_owns(store: Store, backend: str) -> None:
    """Refuse to start on live clusters another backend runs: this one could neither adopt
    nor stop them, and would fail them while their processes or tasks ran on."""
    from clusters.base import backend_of

    foreign: dict[str, list[str]] = {}
    for cluster_id, state in store.live_backend_states():
        owner = backend_of(state)
        if owner is not None and owner != backend:
            foreign.setdefault(owner, []).append(cluster_id)
    if foreign:
        owner, ids = next(iter(foreign.items()))
        shown = ", ".join(ids[:5]) + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")
        raise ValueError(
            f"{len(ids)} live cluster(s) in this state run on the {owner} backend ({shown}); "
            f"this service was started with --backend {backend}. Start it with --backend "
            f"{owner} and stop them first, or give this backend its own --state and --data-dir")


def _lease_lost() -> None:
    """The lease is gone (its database session ended): another service may be taking over.
    Stop at once, touching nothing: the clusters are the new holder's to adopt."""
    logging.getLogger("provisioner.lease").critical(
        "lost the service lease (database session ended); exiting so one service manages clusters")
    logging.shutdown()
    os._exit(75)


@app.command()
def serve(
    host: Annotated[Optional[str], typer.Option(help="address to listen on [default: 127.0.0.1]")] = None,  # noqa: UP045
    port: Annotated[Optional[int], typer.Option(help="port to listen on [default: 8000]")] = None,  # noqa: UP045
    tenants: Annotated[Optional[Path], typer.Option(help="tenants YAML file")] = None,  # noqa: UP045
    state: Annotated[Optional[str], typer.Option(help="SQLAlchemy URL of the state database")] = None,  # noqa: UP045
    data_dir: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        help="folder for the SQLite file and cluster logs [default: data]")] = None,
    secret_key_file: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        help="key file sealing credentials at rest (default DATA_DIR/secret.key)")] = None,
    backend: Annotated[Optional[str], typer.Option(help="local, mesos or slurm [default: local]")] = None,  # noqa: UP045
    mesos_master: Annotated[Optional[str], typer.Option(help="HOST:PORT or zk://HOST:2181/mesos")] = None,  # noqa: UP045
    mesos_command: Annotated[Optional[str], typer.Option(help="command starting Dask on a Mesos agent")] = None,  # noqa: UP045
    slurm_partition: Annotated[Optional[str], typer.Option(help="Slurm partition of tenants that name none")] = None,  # noqa: UP045
    slurm_folder: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        help="folder shared with the Slurm nodes for clusters' files [default: DATA_DIR/slurm]")] = None,
    capacity_cores: Annotated[Optional[float], typer.Option(  # noqa: UP045
        help="cores all clusters share; past it creates queue [default: unlimited]")] = None,
    capacity_memory: Annotated[Optional[str], typer.Option(  # noqa: UP045
        help="memory all clusters share, e.g. 64GiB [default: unlimited]")] = None,
    keep_clusters: Annotated[Optional[bool], typer.Option(  # noqa: UP045
        "--keep-clusters/--no-keep-clusters",
        help="leave clusters running on shutdown [default: no-keep-clusters]")] = None,
    tls: Annotated[Optional[bool], typer.Option(  # noqa: UP045
        "--tls/--no-tls",
        help="per-cluster TLS (--no-tls only for trusted single-user setups) [default: tls]")] = None,
    max_connections: Annotated[Optional[int], typer.Option(  # noqa: UP045
        help="connections served at once; more are answered 503 [default: 1000]")] = None,
    header_timeout: Annotated[Optional[float], typer.Option(  # noqa: UP045
        help="seconds a client has to send a request's headers [default: 10]")] = None,
    body_timeout: Annotated[Optional[float], typer.Option(  # noqa: UP045
        help="seconds a client has to send a request's body [default: 30]")] = None,
    public_url: Annotated[Optional[str], typer.Option(help="URL tenants reach the service at, behind a proxy")] = None,  # noqa: UP045
    standby: Annotated[bool, typer.Option(
        help="when another service holds this state, wait and take over once it stops")] = False,
    log_level: Annotated[Optional[str], typer.Option(help="debug, info, warning [default: info]")] = None,  # noqa: UP045
) -> None:
    """Run the service (local backend and an SQLite file unless told otherwise)."""
    try:
        from pydantic import ValidationError
        from sqlalchemy.exc import SQLAlchemyError

        from api.app import create_app
        from api.server import listen_socket
        from api.server import run as run_server
        from api.standby import Placeholder
        from provisioner.files import make_private, private_data_dir
        from provisioner.lease import Lease, LeaseHeld
        from provisioner.logs import configure as configure_logging
        from provisioner.settings import Settings
        from provisioner.store import StoreError
        from provisioner.tenants import TenantsFileError
    except ImportError as exc:
        _fail(f"the server is not installed ({exc.name} is missing): {SERVER_EXTRA}")

    overrides: dict[str, Any] = {
        "host": host, "port": port, "tenants": tenants, "state": state, "data_dir": data_dir,
        "backend": backend, "mesos_master": mesos_master, "mesos_command": mesos_command,
        "slurm_partition": slurm_partition, "slurm_folder": slurm_folder,
        "capacity_cores": capacity_cores, "capacity_memory": capacity_memory,
        "keep_clusters": keep_clusters, "tls": tls, "secret_key_file": secret_key_file,
        "max_connections": max_connections, "header_timeout": header_timeout,
        "body_timeout": body_timeout, "public_url": public_url, "log_level": log_level,
    }
    # Options given on the command line win; the rest come from PROVISIONER_* variables.
    try:
        settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        _fail("; ".join(f"--{'-'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}"
                        for e in exc.errors()))
    configure_logging(settings.log_level)
    # Before anything is created: the data folder and everything in it is ours alone.
    make_private()
    try:
        private_data_dir(settings.data_dir)
        # One service per state, before any side effect: a second one must never adopt,
        # reap or stop the clusters of the one that runs.
        lease = Lease(settings.data_dir, settings.sqlite_file, settings.postgresql_url)
        if standby:
            # Listening from the start: /livez answers, everything else 503, until it serves.
            listener = listen_socket(settings.host, settings.port)
            placeholder = Placeholder(listener, "standby")
            lease.acquire(wait=True, on_wait=lambda holder: typer.echo(
                f"standby: {holder} holds the lease; taking over when it stops", err=True))
            placeholder.become("starting")
        else:
            lease.acquire()
            # The port next: a busy one fails here, before clusters are recovered or tokens shown.
            listener = listen_socket(settings.host, settings.port)
            # Answering at once, while the service starts (a backend may take a while).
            placeholder = Placeholder(listener, "starting")
        provisioner, token = build(settings)
    except (LeaseHeld, OSError, TenantsFileError, StoreError, ValueError) as exc:
        _fail(str(exc))
    except SQLAlchemyError as exc:
        _fail(f"cannot open state {settings.state_url!r}: {getattr(exc, 'orig', None) or exc}")
    lease.watch(_lease_lost)
    settings = settings.model_copy(update={"port": listener.getsockname()[1]})
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
    run_server(create_app(provisioner, on_started=placeholder.stop), settings, listener)


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
    main()
