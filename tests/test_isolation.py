"""Tenants cannot reach each other: per-cluster TLS, and no leak of the service's environment."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from distributed import Client
from distributed.security import Security
from sqlalchemy.engine import make_url

from clusters import sandbox
from tests.conftest import SERVICE_SECRET
from tests.intrusion import client_refused, tls_without_client_certificate_refused, worker_cannot_join
from tests.service import ServiceProcess


@pytest.fixture(scope="module")
def two_clusters(service: ServiceProcess) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """A cluster of alpha (with its own env) and one of beta, both running with a worker."""
    with service.client("alpha") as a, service.client("beta") as b:
        ca = a.post("/clusters?wait=60", json={"workers": 1, "env": {"MODEL": "v3"}}).json()
        cb = b.post("/clusters?wait=60", json={"workers": 1}).json()
        try:
            assert ca["status"] == cb["status"] == "running"
            yield ca, cb
        finally:
            a.delete(f"/clusters/{ca['id']}")
            b.delete(f"/clusters/{cb['id']}")


def _environ() -> dict[str, str]:
    return dict(os.environ)


def test_processes_get_the_tenants_environment_only(
    service: ServiceProcess, two_clusters: tuple[dict[str, Any], dict[str, Any]]
) -> None:
    ca, _ = two_clusters
    with Client(ca["scheduler_address"], security=service.security("alpha", ca["id"]),
                timeout=30) as client:
        client.wait_for_workers(1, timeout=60)
        worker_env = client.submit(_environ, pure=False).result(timeout=60)
        scheduler_env = client.run_on_scheduler(_environ)
    # The service's own environment, as the kernel holds it (not as the harness built it).
    assert service.proc is not None
    raw = Path(f"/proc/{service.proc.pid}/environ").read_bytes().decode(errors="replace")
    service_env = dict(item.split("=", 1) for item in raw.split("\0") if "=" in item)
    assert service_env.get("SERVICE_SECRET") == SERVICE_SECRET  # it is the service's environment
    service_vars = sorted(k for k in service_env if k.startswith("PROVISIONER_"))
    # Where the service keeps its state: SQLite file, or PostgreSQL with PROVISIONER_TEST_DB.
    state = make_url(service.state)
    for env in (worker_env, scheduler_env):
        assert env["TEAM"] == "alpha" and env["MODEL"] == "v3"
        leaked = [k for k, v in env.items() if SERVICE_SECRET in v or k == "SERVICE_SECRET"]
        assert not leaked, leaked
        assert not any(k.startswith("PROVISIONER_") for k in env)
        assert not [k for k in service_vars if k in env], service_vars
        values = " ".join(env.values())
        assert str(service.data_dir / "provisioner.db") not in values
        assert service.state not in values
        assert state.database and state.database not in values


def _probe(secrets: list[str], processes: list[int], setuid_to: int) -> dict[str, str]:
    """Run inside a cluster process: what of the machine can tenant code get at?"""
    import os
    import tempfile

    def outcome(action: Any) -> str:
        try:
            action()
            return "allowed"
        except PermissionError:
            return "denied"
        except OSError as exc:
            return f"error {exc.errno}"

    found = {f"read {p}": outcome(lambda p=p: open(p, "rb").read(1)) for p in secrets}
    for pid in processes:
        found[f"environ of {pid}"] = outcome(lambda pid=pid: open(f"/proc/{pid}/environ", "rb").read(1))
        found[f"signal {pid}"] = outcome(lambda pid=pid: os.kill(pid, 0))
    found["setuid"] = outcome(lambda: os.setuid(setuid_to))
    home = os.environ["HOME"]
    found["own folder"] = outcome(lambda: open(os.path.join(home, "probe"), "w").write("x"))
    found["temp is own folder"] = "yes" if tempfile.gettempdir() == home else tempfile.gettempdir()
    return found


def test_tenant_code_is_confined_to_its_own_cluster(
    service: ServiceProcess, two_clusters: tuple[dict[str, Any], dict[str, Any]]
) -> None:
    """Tasks (and scheduler-side code) of alpha cannot read the service's state or beta's
    files, nor look into or signal the service or beta's processes; they can use their own
    folder. Where the kernel has no Landlock, the service says so loudly instead."""
    ca, cb = two_clusters
    assert service.proc is not None
    beta_pids = [p.pid for p in service.processes_of(cb["id"])]
    beta_dir = service.data_dir / "clusters" / cb["id"]
    # The key that decrypts every cluster's credentials and the metrics token, too.
    secrets = [str(beta_dir / "scheduler.log"), str(service.data_dir / "secret.key"),
               str(service.data_dir / "metrics-token")]
    if service.state.startswith("sqlite"):
        secrets.append(str(make_url(service.state).database))
    for path in secrets:
        assert Path(path).exists(), path  # the probe would be meaningless otherwise
    args = (secrets, [service.proc.pid, *beta_pids], 12345)
    with Client(ca["scheduler_address"], security=service.security("alpha", ca["id"]),
                timeout=30) as client:
        client.wait_for_workers(1, timeout=60)
        on_worker = client.submit(_probe, *args, pure=False).result(timeout=60)
        on_scheduler = client.run_on_scheduler(_probe, *args)
    if sandbox.support() is not None:
        assert "cluster processes run unconfined" in service.log.read_text()
        return
    # Landlock scopes signals from ABI 6 on; before that a process of the same user may still
    # signal one outside its domain (everything else holds from ABI 1).
    signals = "denied" if sandbox.landlock_abi() >= 6 else "allowed"
    for found in (on_worker, on_scheduler):
        assert found.pop("own folder") == "allowed" and found.pop("temp is own folder") == "yes"
        expected = {k: signals if k.startswith("signal ") else "denied" for k in found}
        assert found == expected
        assert len(found) == len(secrets) + 2 * len(args[1]) + 1, found


def test_no_credentials_or_another_clusters_credentials_cannot_connect(
    service: ServiceProcess, two_clusters: tuple[dict[str, Any], dict[str, Any]]
) -> None:
    ca, cb = two_clusters
    own = service.security("alpha", ca["id"])
    other = service.security("beta", cb["id"])
    assert own is not None and other is not None
    client_refused(ca["scheduler_address"], (OSError, TypeError))  # tls:// needs a context
    with service.client("alpha") as http:
        tls_without_client_certificate_refused(
            ca["scheduler_address"], http.get(f"/clusters/{ca['id']}/credentials").json()["tls_ca"])
    client_refused(ca["scheduler_address"].replace("tls://", "tcp://"))
    client_refused(ca["scheduler_address"], security=other)
    client_refused(ca["scheduler_address"], security=Security.temporary())  # self-signed
    with Client(ca["scheduler_address"], security=own, timeout=30) as client:
        assert client.submit(sum, [2, 3]).result(timeout=60) == 5


def test_a_worker_of_one_cluster_cannot_join_another(
    service: ServiceProcess, two_clusters: tuple[dict[str, Any], dict[str, Any]]
) -> None:
    ca, cb = two_clusters
    with service.client("beta") as http:
        worker_cannot_join(ca["scheduler_address"],
                           http.get(f"/clusters/{cb['id']}/credentials").json())
    with Client(ca["scheduler_address"], security=service.security("alpha", ca["id"]),
                timeout=30) as client:
        names = {w["name"] for w in client.scheduler_info()["workers"].values()}
        assert "intruder" not in names and len(names) == 1


def test_credentials_are_only_given_to_the_owner(
    service: ServiceProcess, two_clusters: tuple[dict[str, Any], dict[str, Any]]
) -> None:
    ca, _ = two_clusters
    with service.client("beta") as http:
        assert http.get(f"/clusters/{ca['id']}/credentials").status_code == 404
    with service.client("alpha") as http:
        creds = http.get(f"/clusters/{ca['id']}/credentials").json()
        assert creds["tls_ca"].startswith("-----BEGIN CERTIFICATE-----")
        assert "PRIVATE KEY" in creds["tls_key"]
        # The cluster JSON never carries key material or tokens.
        listing = http.get("/clusters").text
        assert "PRIVATE KEY" not in listing and "token-alpha" not in listing
    log = service.log.read_text()
    assert "token-alpha" not in log and "token-beta" not in log
