"""Named Python environments: an operator registers one in the tenants file, a cluster picks
it, its processes run that interpreter (confined as any other), the service reports its
versions, and the SDK says plainly at connect what differs from the client's.

The environment here is a real venv of its own: its own interpreter and a package only it has
(``provisioner_env_marker``), a distribution this client lacks (``lz4`` 9.9.9, metadata only),
and the rest (dask, distributed, ...) reached through a ``.pth`` file, as a conda or venv
prefix an operator prepares would carry them.
"""

from __future__ import annotations

import site
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from distributed import Client

from provisioner.client import Provisioner, VersionMismatch
from tests.service import GiB, ServiceProcess, tenant

#: Nothing here depends on the database: the SQLite pass runs it.
pytestmark = pytest.mark.state_agnostic


@pytest.fixture(scope="module")
def environment(tmp_path_factory: pytest.TempPathFactory) -> Path:
    prefix = tmp_path_factory.mktemp("envs") / "ml"
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--without-pip", str(prefix)], check=True, timeout=120)
    (purelib,) = (prefix / "lib").glob("python3*/site-packages")
    (purelib / "shared-libraries.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    (purelib / "provisioner_env_marker.py").write_text('__version__ = "1.2.3"\n')
    meta = purelib / "lz4-9.9.9.dist-info"
    meta.mkdir()
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: lz4\nVersion: 9.9.9\n")
    return prefix


@pytest.fixture(scope="module")
def service_with_environment(tmp_path_factory: pytest.TempPathFactory,
                             environment: Path) -> Any:
    import yaml

    workdir = tmp_path_factory.mktemp("svc-env")
    svc = ServiceProcess(workdir, [tenant("acme", cores=6, memory=8 * GiB),
                                   tenant("other", cores=4, memory=4 * GiB)])
    assert svc.tenants_file is not None
    data = yaml.safe_load(svc.tenants_file.read_text())
    data["environments"] = [{"name": "ml", "prefix": str(environment), "tenants": ["acme"]}]
    svc.tenants_file.write_text(yaml.safe_dump(data))
    try:
        yield svc.start()
    finally:
        svc.cleanup()


def _in_cluster(svc: ServiceProcess, c: dict[str, Any], fn: Callable[[], Any]) -> Any:
    with Client(c["scheduler_address"], security=svc.security(c["tenant"], c["id"]),
                timeout=30) as client:
        client.wait_for_workers(1, timeout=60)
        return client.submit(fn, pure=False).result(timeout=60)


def _marker() -> tuple[str, str]:
    import sys

    import provisioner_env_marker  # type: ignore[import-not-found]

    return provisioner_env_marker.__version__, sys.executable


def _has_marker() -> bool:
    import importlib.util

    return importlib.util.find_spec("provisioner_env_marker") is not None


def test_a_cluster_runs_the_environment_it_names(service_with_environment: ServiceProcess,
                                                 environment: Path) -> None:
    svc = service_with_environment
    with svc.client("acme") as http:
        listed = http.get("/environments").json()
    (ml,) = listed["environments"]
    assert ml["name"] == "ml" and ml["versions"]["lz4"] == "9.9.9"
    assert ml["versions"]["dask"] == listed["default"]["dask"]
    c = svc.create("acme", workers=1, environment="ml")
    try:
        assert c["environment"] == "ml"
        version, python = _in_cluster(svc, c, _marker)
        assert version == "1.2.3" and python.startswith(str(environment)), python
        # The scheduler too, and confined as any other process (its own uid, not root).
        with Client(c["scheduler_address"], security=svc.security("acme", c["id"]),
                    timeout=30) as client:
            assert client.run_on_scheduler(_has_marker) is True
            assert client.run_on_scheduler(lambda: __import__("os").getuid()) != 0
        # The SDK says at connect what differs, before any task fails.
        prov = Provisioner(svc.url, "token-acme")
        try:
            with pytest.warns(VersionMismatch, match=r"environment 'ml'.*lz4 missing here, "
                                                     r"9\.9\.9 on the cluster"):
                cluster = prov.connect(c["id"])
            cluster.close()
        finally:
            prov.close()
    finally:
        with svc.client("acme") as http:
            http.delete(f"/clusters/{c['id']}")


def test_without_an_environment_a_cluster_runs_the_services_own(
        service_with_environment: ServiceProcess) -> None:
    svc = service_with_environment
    c = svc.create("acme", workers=1)
    try:
        assert c["environment"] is None
        assert _in_cluster(svc, c, _has_marker) is False
        prov = Provisioner(svc.url, "token-acme")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", VersionMismatch)  # the same versions: quiet
                prov.connect(c["id"]).close()
        finally:
            prov.close()
    finally:
        with svc.client("acme") as http:
            http.delete(f"/clusters/{c['id']}")


def test_an_environment_another_tenant_may_not_use_is_refused(
        service_with_environment: ServiceProcess) -> None:
    svc = service_with_environment
    with svc.client("other") as http:
        assert http.get("/environments").json()["environments"] == []
        r = http.post("/clusters", json={"environment": "ml"})
        assert r.status_code == 422
        assert r.json()["detail"] == ("environment: no environment 'ml' for this tenant; "
                                      "there are: none")
        r = http.post("/clusters", json={"environment": "../../bin"})
        assert r.status_code == 422 and r.json()["detail"].startswith("environment: ")
        assert http.get("/clusters", params={"live": "true"}).json()["clusters"] == []


def test_the_cli_lists_environments_and_creates_in_one(
        service_with_environment: ServiceProcess) -> None:
    import os

    svc = service_with_environment
    env = {**os.environ, "PROVISIONER_URL": svc.url, "PROVISIONER_TOKEN": "token-acme"}

    def cli(*args: str) -> str:
        done = subprocess.run([sys.executable, "-c", "from provisioner.cli import main; main()",
                               *args], capture_output=True, text=True, env=env, timeout=180)
        assert done.returncode == 0, done.stderr
        return done.stdout

    lines = cli("environments").splitlines()
    assert lines[0].startswith("(default): python ") and lines[0].endswith("(same as this client)")
    assert lines[1].startswith("ml: ") and "lz4 missing here, 9.9.9 on the cluster" in lines[1]
    cluster_id = cli("clusters", "create", "--environment", "ml", "--workers", "0", "-q").strip()
    try:
        with svc.client("acme") as http:
            assert http.get(f"/clusters/{cluster_id}").json()["environment"] == "ml"
    finally:
        cli("clusters", "delete", cluster_id)
