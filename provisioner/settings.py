"""Service settings: command-line options, with ``PROVISIONER_*`` environment variables as defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from provisioner.sizes import parse_bytes


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PROVISIONER_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    tenants: Path | None = None
    data_dir: Path = Path("data")
    state: str | None = None
    backend: Literal["local", "mesos", "slurm"] = "local"
    mesos_master: str | None = None
    #: Command that starts a Dask scheduler or worker on a Mesos agent (runner arguments follow).
    mesos_command: str = "python -m clusters.runner"
    #: Seconds Mesos keeps the framework's tasks while the service is away (a week).
    mesos_failover_timeout: float = Field(default=7 * 24 * 3600, ge=0)
    #: Seconds a killed Mesos task gets between SIGTERM and SIGKILL.
    mesos_kill_grace: float = Field(default=10, ge=0)
    #: Send TEARDOWN (kills every task of the framework) when the service stops.
    mesos_teardown: bool = False
    #: Slurm partition for clusters whose tenant names none (unset: Slurm's default).
    slurm_partition: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    #: Where each Slurm cluster gets a folder (its ports file, its logs): on a filesystem
    #: the nodes share. Default: DATA_DIR/slurm.
    slurm_folder: Path | None = None
    #: Interpreter Slurm jobs run, at this path on every node. Default: the service's own.
    slurm_python: str | None = None
    #: Seconds between two ``squeue --json`` queries.
    slurm_poll_interval: float = Field(default=1.0, gt=0)
    keep_clusters: bool = False
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    tls: bool = True
    #: Bearer token that guards /metrics (tenant names and usage). Unset: the service makes
    #: one on first start and keeps it in <data_dir>/metrics-token. /metrics is never open.
    metrics_token: str | None = None
    #: The key (a Fernet key) cluster credentials are encrypted with in the state database,
    #: and other service keys are derived from. Unset: read from ``secret_key_file``.
    secret_key: SecretStr | None = None
    #: File holding the secret key; default <data_dir>/secret.key, made 0600 on first start.
    secret_key_file: Path | None = None
    #: Open connections served at once; requests beyond them are answered 503.
    max_connections: int = Field(default=1000, ge=1)
    #: Seconds a client has to send a request's headers (from connecting, or from the first
    #: byte of a next request on a kept-alive connection) before it is disconnected.
    header_timeout: float = Field(default=10, gt=0)
    #: Seconds a client has to send a request's whole body once its headers are in: 408.
    body_timeout: float = Field(default=30, gt=0)
    #: Seconds an idle kept-alive connection stays open.
    keep_alive_timeout: float = Field(default=5, gt=0)
    #: uvicorn's HTTP parser: httptools when installed ("auto"), else h11.
    http_parser: Literal["auto", "h11", "httptools"] = "auto"
    #: Address schedulers and workers listen on (local backend).
    cluster_host: str = "127.0.0.1"
    #: Confine local cluster processes (clusters.sandbox: cgroup, private root, own user,
    #: Landlock): "auto" applies what the machine can and warns for the rest; "on" refuses
    #: to start without every layer.
    local_sandbox: Literal["auto", "on", "off"] = "auto"
    #: Tenants' local cluster processes run as uids above this one, one per tenant.
    local_uid_base: int = Field(default=1_700_000_000, ge=1000, le=2**31 - 2**20)
    #: The capacity all tenants' clusters share (unset: only tenants' quotas limit them). A
    #: create past it (or past its tenant's quota) waits in a queue, unless it says not to.
    capacity_cores: float | None = Field(default=None, gt=0)
    capacity_memory: Annotated[int, BeforeValidator(parse_bytes), Field(gt=0)] | None = None
    #: Seconds between deciding to take borrowed workers back and retiring them.
    preemption_delay: float = Field(default=30, ge=0)
    #: Seconds a scheduler may take to come up before the cluster is failed.
    start_timeout: float = Field(default=120, gt=0)
    #: Seconds a scale-down must stay wanted before adaptive workers are retired.
    adapt_down_delay: float = Field(default=3, ge=0)
    #: Seconds between reaping checks of a running cluster.
    reap_interval: float = Field(default=1, gt=0)
    #: Seconds without word from the service after which a cluster applies its own idle
    #: rules and reaps itself (0: never), so a service that died for good leaves nothing.
    orphan_lease: float = Field(default=600, ge=0)
    #: Seconds the scheduler plugin holds a long-poll open when nothing changes.
    report_timeout: float = Field(default=15, gt=0)
    #: The service's origin as tenants reach it (``https://dask.example.com``) when it runs
    #: behind a proxy; dashboard links are built on it. Unset: each request's own base URL.
    #: An origin only: dashboards use absolute paths, so the service sits at its root.
    public_url: str | None = Field(default=None, pattern=r"^https?://[^\s/?#@]+/?$")
    #: Seconds a signed dashboard link (``GET /clusters/{id}/dashboard-link``) stays valid
    #: unless the request asks for another lifetime.
    dashboard_link_ttl: float = Field(default=900, ge=10, le=86400)
    #: Seconds the browser session a signed link opens (its cookie) stays valid.
    dashboard_session_ttl: float = Field(default=12 * 3600, ge=60, le=7 * 86400)

    def private_files(self) -> list[Path]:
        """The service's files that cluster processes must never see, besides its data folder:
        its tenants file, its key file and, on SQLite, its state file and the journals beside it."""
        files = [self.key_file, *([self.tenants] if self.tenants else [])]
        database = self.sqlite_file
        if database is not None:
            files += [database, *(database.with_name(database.name + suffix)
                                  for suffix in ("-wal", "-shm", "-journal"))]
        return files

    @property
    def sqlite_file(self) -> Path | None:
        """The state's SQLite file; None on PostgreSQL, in memory, or for a URL the store
        will refuse (it says what is wrong with it)."""
        try:
            url = make_url(self.state_url)
        except ArgumentError:
            return None
        if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
            return Path(url.database)
        return None

    @property
    def postgresql_url(self) -> str | None:
        """The state URL when the state is on PostgreSQL, else None."""
        try:
            backend = make_url(self.state_url).get_backend_name()
        except ArgumentError:
            return None
        return self.state_url if backend == "postgresql" else None

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("metrics_token", "secret_key", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        """``PROVISIONER_METRICS_TOKEN=`` means "not given", never "an empty token"."""
        if isinstance(value, str) and not value.strip():
            return None
        return value.strip() if isinstance(value, str) else value

    @property
    def key_file(self) -> Path:
        return self.secret_key_file or self.data_dir / "secret.key"

    @property
    def state_url(self) -> str:
        """The state's SQLAlchemy URL. A plain ``postgresql://`` (or ``postgres://``) URL, as
        PostgreSQL's own tools write them, means the driver this package installs (psycopg 3),
        not SQLAlchemy's default (psycopg2)."""
        if not self.state:
            return f"sqlite:///{(self.data_dir / 'provisioner.db').resolve()}"
        for plain in ("postgresql://", "postgres://"):
            if self.state.startswith(plain):
                return "postgresql+psycopg://" + self.state[len(plain):]
        return self.state
