"""Shared fixtures: one service for most tests; more only where a test needs its own."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.postgres import PostgresServer
from tests.service import GiB, ServiceProcess, tenant

SERVICE_SECRET = "hunter2-do-not-leak"


@pytest.fixture(scope="session")
def state_db() -> Iterator[Callable[[], str | None]]:
    """Where services keep state: SQLite files, or with PROVISIONER_TEST_DB=postgresql a
    database on a PostgreSQL server these tests start themselves (one database per service)."""
    if os.environ.get("PROVISIONER_TEST_DB", "sqlite") != "postgresql":
        yield lambda: None
        return
    server = PostgresServer().start()
    try:
        yield server.new_database
    finally:
        server.stop()


@pytest.fixture(scope="session")
def service(tmp_path_factory: pytest.TempPathFactory,
            state_db: Callable[[], str | None]) -> Iterator[ServiceProcess]:
    """The shared service: tenants alpha and beta (roomy) and tight (small quota)."""
    tenants = [
        tenant("alpha", cores=8, memory=16 * GiB, clusters=6, env={"TEAM": "alpha"}),
        tenant("beta", cores=4, memory=8 * GiB, clusters=3),
        tenant("tight", cores=3, memory=4 * GiB, clusters=2, workers_per_cluster=4),
    ]
    # A secret in the service's own environment: cluster processes must never see it.
    svc = ServiceProcess(tmp_path_factory.mktemp("service"), tenants,
                         env={"SERVICE_SECRET": SERVICE_SECRET}, state=state_db())
    try:
        yield svc.start()
    finally:
        svc.cleanup()


@pytest.fixture
def make_service(tmp_path: Path,
                 state_db: Callable[[], str | None]) -> Iterator[Callable[..., ServiceProcess]]:
    """A factory for services of a test's own (restarts, kills); all cleaned up after."""
    made: list[ServiceProcess] = []

    def make(tenants: list[dict[str, Any]] | None = None, args: list[str] | None = None,
             env: dict[str, str] | None = None, workdir: Path | None = None,
             sqlite: bool = False) -> ServiceProcess:
        """``sqlite``: state in an SQLite file in its data folder, whatever PROVISIONER_TEST_DB."""
        directory = workdir or tmp_path / f"svc{len(made)}"
        directory.mkdir(exist_ok=True)
        svc = ServiceProcess(directory, tenants, args=args, env=env,
                             state=None if sqlite else state_db())
        made.append(svc)
        return svc

    try:
        yield make
    finally:
        for svc in made:
            svc.cleanup()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "state_agnostic: what the test checks cannot depend on which database holds "
        "the state (HTTP limits, proxying, launchers); run on the SQLite pass only")
    config.addinivalue_line(
        "markers", "postgresql_only: checks what only PostgreSQL has (a database session to "
        "lose); run on the PostgreSQL pass only")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On the PostgreSQL pass (PROVISIONER_TEST_DB=postgresql) run what the database can change:
    tests whose service keeps state in it. The rest already ran on the SQLite pass and would
    only repeat it; they are deselected (pytest counts them as such, not as passed). On the
    SQLite pass, the tests of what only PostgreSQL has are deselected the same way."""
    postgresql = os.environ.get("PROVISIONER_TEST_DB", "sqlite") == "postgresql"
    keep, drop = [], []
    for item in items:
        if postgresql:
            uses_state = "state_db" in getattr(item, "fixturenames", ())
            wanted = uses_state and not item.get_closest_marker("state_agnostic")
        else:
            wanted = not item.get_closest_marker("postgresql_only")
        (keep if wanted else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
