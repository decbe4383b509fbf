"""Service settings: command-line options, with ``PROVISIONER_*`` environment variables as defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PROVISIONER_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    tenants: Path | None = None
    data_dir: Path = Path("data")
    state: str | None = None
    backend: Literal["local", "mesos"] = "local"
    mesos_master: str | None = None
    #: Command that starts a Dask scheduler or worker on a Mesos agent (runner arguments follow).
    mesos_command: str = "python -m clusters.runner"
    #: Seconds Mesos keeps the framework's tasks while the service is away (a week).
    mesos_failover_timeout: float = Field(default=7 * 24 * 3600, ge=0)
    #: Seconds a killed Mesos task gets between SIGTERM and SIGKILL.
    mesos_kill_grace: float = Field(default=10, ge=0)
    #: Send TEARDOWN (kills every task of the framework) when the service stops.
    mesos_teardown: bool = False
    keep_clusters: bool = False
    tls: bool = True
    #: Bearer token that guards /metrics (tenant names and usage); open when unset.
    metrics_token: str | None = None
    #: Address schedulers and workers listen on (local backend).
    cluster_host: str = "127.0.0.1"
    #: Confine local cluster processes with Landlock (clusters.sandbox): "auto" does when
    #: the kernel can and warns when it cannot; "on" refuses to start without it.
    local_sandbox: Literal["auto", "on", "off"] = "auto"
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

    @property
    def state_url(self) -> str:
        if self.state:
            return self.state
        return f"sqlite:///{(self.data_dir / 'provisioner.db').resolve()}"
