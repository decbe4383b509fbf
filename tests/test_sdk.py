"""The Python SDK against the real service: sync and async, scaling, closing, errors, TLS."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import dask.config
import httpx
import pytest
from distributed import Client
from distributed.deploy.cluster import Cluster
from distributed.security import Security

from provisioner.client import (
    AuthenticationError,
    ClusterNotFound,
    ProvisionedCluster,
    Provisioner,
    ProvisionerError,
    QuotaExceeded,
)
from tests.service import ServiceProcess, stopping_new_clusters, tenant, wait_until

#: Nothing here depends on the database: the SQLite pass covers it.
pytestmark = pytest.mark.state_agnostic


def status_of(service: ServiceProcess, name: str, cluster_id: str) -> str:
    with service.client(name) as http:
        return http.get(f"/clusters/{cluster_id}").json()["status"]


@pytest.fixture
def no_leaks(service: ServiceProcess) -> Iterator[None]:
    """Stop every cluster a test started, whether it passed or not."""
    with stopping_new_clusters(service, "alpha", "tight"):
        yield


@pytest.fixture
def prov(service: ServiceProcess, no_leaks: None) -> Iterator[Provisioner]:
    p = Provisioner(service.url, "token-alpha")
    try:
        yield p
    finally:
        p.close()


# (pydantic is not here: typer itself depends on it.)
SERVER_ONLY = {"fastapi", "sqlalchemy", "uvicorn", "api", "clusters", "starlette",
               "pydantic_settings", "kazoo", "prometheus_client", "cryptography", "bokeh",
               "websockets", "wsproto"}


def test_import_is_light() -> None:
    code = ("import json, sys, provisioner.client, provisioner.cli, provisioner.cli_client; "
            "print(json.dumps(sorted(m for m in sys.modules "
            f"if m.split('.')[0] in {sorted(SERVER_ONLY)!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


def test_sdk_install_does_not_pull_in_the_server() -> None:
    """The package's own metadata: server pieces only in the ``server`` extra."""
    base = [r for r in importlib.metadata.requires("dask-provisioner") or [] if "extra ==" not in r]
    names = {re.split(r"[\s<>=!;\[]", r, maxsplit=1)[0].lower().replace("_", "-") for r in base}
    assert names == {"dask", "distributed", "httpx", "typer", "rich"}, names


def test_cli_without_the_server_installed() -> None:
    """With the server's packages unimportable, tenant commands work and ``serve`` says what
    to install (instead of a traceback)."""
    blocker = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {sorted(SERVER_ONLY - {'api', 'clusters'})!r}:\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from provisioner.cli import main\n"
        "sys.argv[0] = 'provisioner'\n"
        "main()\n"
    )
    env = {**os.environ, "PROVISIONER_URL": "http://127.0.0.1:9", "PROVISIONER_TOKEN": "t"}
    helped = subprocess.run([sys.executable, "-c", blocker, "clusters", "--help"],
                            capture_output=True, text=True, env=env, timeout=60)
    assert helped.returncode == 0, helped.stderr
    assert "list" in helped.stdout
    served = subprocess.run([sys.executable, "-c", blocker, "serve"],
                            capture_output=True, text=True, env=env, timeout=60)
    assert served.returncode == 2, served.stderr
    assert "install the 'server' extra: pip install '.[server]'" in served.stderr
    assert "Traceback" not in served.stderr


def test_defaults_from_env_and_dask_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROVISIONER_URL", "http://env.example:1/")
    monkeypatch.setenv("PROVISIONER_TOKEN", "env-token")
    with Provisioner() as p:
        assert (p.url, p.token) == ("http://env.example:1", "env-token")
    monkeypatch.delenv("PROVISIONER_URL")
    monkeypatch.delenv("PROVISIONER_TOKEN")
    with dask.config.set({"provisioner.url": "http://cfg.example:2", "provisioner.token": "t"}), \
            Provisioner() as p:
        assert (p.url, p.token) == ("http://cfg.example:2", "t")
    with pytest.raises(ValueError, match="PROVISIONER_URL"):
        Provisioner()


def test_sync_cluster_lifecycle(prov: Provisioner, service: ServiceProcess) -> None:
    cluster = prov.new_cluster(workers=1, project="sdk")
    try:
        assert isinstance(cluster, Cluster)
        assert cluster.scheduler_address == cluster.info.scheduler_address
        assert cluster.scheduler_address.startswith("tls://" if cluster.info.tls else "tcp://")
        assert cluster.security.require_encryption == cluster.info.tls
        assert cluster.name == cluster.cluster_id
        assert cluster.info.status == "running" and cluster.info.project == "sdk"

        client = cluster.get_client()
        try:
            assert client.submit(lambda x: x * 7, 6).result(timeout=60) == 42
            assert cluster.get_client() is client
        finally:
            client.close()
        if cluster.info.tls:  # the one-liner for a plain distributed.Client
            security = prov.security(cluster.cluster_id)
            with Client(cluster.scheduler_address, security=security) as plain:
                assert plain.submit(lambda: "secure").result(timeout=60) == "secure"
        wait_until(lambda: cluster.scheduler_info["workers"], 30, what="worker in scheduler_info")
        # The dashboard through the service, as a signed link a browser opens without the
        # token (the link opens a session: a cookie, then the page).
        link = cluster.dashboard_link
        assert link.startswith(f"{service.url}/clusters/{cluster.cluster_id}/dashboard/status"
                               "?token="), link
        with httpx.Client(follow_redirects=True, timeout=30) as browser:
            page = browser.get(link)
            assert page.status_code == 200 and "Dask" in page.text
            assert browser.cookies.get("provisioner-dashboard")
        assert cluster.dashboard_link == link  # fetched again only near its expiry
        signed = prov.dashboard_link(cluster.cluster_id, ttl=60)
        assert signed.url != link and 0 < signed.expires_at - time.time() <= 60
        assert cluster.cluster_id in cluster._repr_html_()
        assert cluster.cluster_id in repr(cluster)

        info = cluster.scale(2)
        assert info.workers_requested == 2
        assert prov.get_cluster(cluster.cluster_id).workers_requested == 2

        info = cluster.adapt(minimum=0, maximum=3)
        assert info.adaptive == (0, 3)
        assert cluster._adaptive is None  # no local Adaptive loop
        with service.client("alpha") as http:
            assert http.get(f"/clusters/{cluster.cluster_id}").json()["adaptive"] == \
                {"minimum": 0, "maximum": 3}
        # No maximum: as many as alpha's quota allows beside the scheduler (8 - 0.5 cores).
        assert cluster.adapt(minimum=1).adaptive == (1, 7)

        # The Jupyter widget's buttons act on the service like the methods do.
        widget = cluster._widget()
        assert widget is not None, "ipywidgets is installed with the test extra"
        status, scaling = widget.children
        assert cluster.cluster_id in status.value
        (manual, adaptive) = scaling.children[1].children
        request, scale_button = manual.children
        request.value = 1
        scale_button.click()
        assert prov.get_cluster(cluster.cluster_id).workers_requested == 1
        minimum, maximum, adapt_button = adaptive.children
        minimum.value, maximum.value = 1, 2
        adapt_button.click()
        assert prov.get_cluster(cluster.cluster_id).adaptive == (1, 2)
    finally:
        cluster.close()
    assert cluster.status.name == "closed"
    wait_until(lambda: status_of(service, "alpha", cluster.cluster_id) == "stopped",
               60, what="cluster stopped")
    # Like dask-gateway's: live clusters by default, the ended ones when asked.
    assert all(c.id != cluster.cluster_id for c in prov.list_clusters())
    assert any(c.id == cluster.cluster_id and c.status == "stopped"
               for c in prov.list_clusters(include_stopped=True))


def test_connect_leaves_cluster_running(prov: Provisioner, service: ServiceProcess) -> None:
    with service.client("alpha") as http:
        created = http.post("/clusters", params={"wait": 60}, json={"workers": 0}).json()
    cluster_id = created["id"]
    cluster = prov.connect(cluster_id)
    assert isinstance(cluster, ProvisionedCluster)
    assert cluster.scheduler_address == created["scheduler_address"]
    assert cluster.shutdown_on_close is False
    cluster.close()
    assert status_of(service, "alpha", cluster_id) == "running"

    with prov.connect(cluster_id, shutdown_on_close=True) as again:
        assert again.info.id == cluster_id
    wait_until(lambda: status_of(service, "alpha", cluster_id) in {"stopping", "stopped"},
               30, what="cluster stopping")
    with pytest.raises(ProvisionerError, match=cluster_id):
        prov.connect(cluster_id, timeout=5)


def test_forgotten_cluster_stops_at_exit(service: ServiceProcess, no_leaks: None) -> None:
    """A kernel that exits without close() does not leave its cluster running."""
    code = ("import sys; from provisioner.client import Provisioner; "
            "c = Provisioner(sys.argv[1], 'token-alpha').new_cluster(workers=0); print(c.cluster_id)")
    out = subprocess.run([sys.executable, "-c", code, service.url], capture_output=True, text=True,
                         check=True, timeout=120)
    cluster_id = out.stdout.strip().splitlines()[-1]
    wait_until(lambda: status_of(service, "alpha", cluster_id) in {"stopping", "stopped"},
               30, what="forgotten cluster stopping")


async def test_async_mode(service: ServiceProcess, no_leaks: None) -> None:
    async with Provisioner(service.url, "token-alpha", asynchronous=True) as prov:
        cluster = await prov.new_cluster(adaptive=(1, 2))
        assert cluster.info.adaptive == (1, 2)
        async with cluster:
            async with Client(cluster, asynchronous=True) as client:
                assert await client.submit(sum, [1, 2, 3]) == 6
            info = await cluster.scale(0)
            assert info.workers_requested == 0 and info.adaptive is None
            listed = await prov.list_clusters()
            assert cluster.cluster_id in {c.id for c in listed}
        assert cluster.status.name == "closed"

        async def stopping() -> bool:
            return (await prov.get_cluster(cluster.cluster_id)).status in {"stopping", "stopped"}

        for _ in range(100):
            if await stopping():
                break
            await asyncio.sleep(0.2)
        assert await stopping()


def test_errors_carry_the_service_message(service: ServiceProcess, no_leaks: None) -> None:
    with Provisioner(service.url, "token-tight") as tight:
        with pytest.raises(QuotaExceeded) as excinfo:
            tight.new_cluster(workers=3, worker_cores=2)
        assert excinfo.value.status_code == 403
        assert str(excinfo.value).startswith("quota exceeded:")
        with pytest.raises(ProvisionerError, match="worker_memory") as bad:
            tight.create_cluster(worker_memory="lots")
        assert bad.value.status_code == 422
        with pytest.raises(ClusterNotFound, match="c-doesnotexist"):
            tight.connect("c-doesnotexist")
    with Provisioner(service.url, "wrong-token") as stranger, \
            pytest.raises(AuthenticationError, match="invalid token"):
        stranger.list_clusters()
    with Provisioner("http://127.0.0.1:9", "x") as nowhere, \
            pytest.raises(ProvisionerError, match="cannot reach"):
        nowhere.list_clusters()


def _fake_service(pems: dict[str, str]) -> Callable[[httpx.Request], httpx.Response]:
    def handle(request: httpx.Request) -> httpx.Response:
        assert request.headers["authorization"] == "Bearer tok"
        if request.url.path == "/clusters/c-1/credentials":
            return httpx.Response(200, json={"scheduler_address": "tls://10.0.0.1:8786", **pems})
        return httpx.Response(404, json={"detail": "cluster c-2 not found"})
    return handle


def test_security_from_credentials_endpoint() -> None:
    temp = Security.temporary()
    pems = {"tls_ca": temp.tls_ca_file, "tls_cert": temp.tls_client_cert,
            "tls_key": temp.tls_client_key}
    transport = httpx.MockTransport(_fake_service(pems))
    with Provisioner("http://svc", "tok", transport=transport) as prov:
        security = prov.security("c-1")
        assert security.require_encryption
        assert security.tls_ca_file == pems["tls_ca"]
        assert security.tls_client_cert == pems["tls_cert"]
        assert security.get_connection_args("client")["ssl_context"] is not None
        with pytest.raises(ClusterNotFound, match="c-2"):
            prov.security("c-2")


def test_plain_tcp_cluster(make_service: Callable[..., ServiceProcess]) -> None:
    """A service run with --no-tls: no credentials to fetch, plain tcp:// comms."""
    svc = make_service([tenant("alpha")], args=["--no-tls"]).start()
    with Provisioner(svc.url, "token-alpha") as prov:
        with prov.new_cluster(workers=1) as cluster:
            assert not cluster.info.tls
            assert cluster.scheduler_address.startswith("tcp://")
            with cluster.get_client() as client:
                assert client.submit(lambda: "plain").result(timeout=60) == "plain"
        with pytest.raises(ProvisionerError, match="does not use TLS") as excinfo:
            prov.security(cluster.cluster_id)
        assert excinfo.value.status_code == 409


def test_dask_gateway_habits_work(prov: Provisioner, service: ServiceProcess) -> None:
    """What a dask-gateway user types first: address=, cluster_options(), positional and
    argument-less adapt(), get_client(set_as_default=False), close(shutdown=True), .name."""
    assert Provisioner(address=service.url, token="token-alpha").url == service.url
    options = prov.cluster_options()
    assert options["worker_cores"] == 1 and options["worker_memory"] == 512 * 2**20
    options.update(workers=0, project="habits")
    cluster = prov.new_cluster(options, shutdown_on_close=False)
    try:
        assert cluster.info.project == "habits" and cluster.info.workers_requested == 0
        cluster.adapt(0, 2)
        assert prov.get_cluster(cluster.cluster_id).adaptive == (0, 2)
        # alpha: 8 cores, workers of 1, a scheduler of 0.5: at most 7 workers.
        cluster.adapt()
        assert prov.get_cluster(cluster.cluster_id).adaptive == (0, 7)
        cluster.adapt(active=False)
        assert prov.get_cluster(cluster.cluster_id).adaptive is None
        client = cluster.get_client(set_as_default=False)
        try:
            assert client.run_on_scheduler(lambda: 7) == 7
            with contextlib.suppress(ValueError):  # no default client at all is fine too
                assert Client.current(allow_global=True) is not client
        finally:
            client.close()
        (info,) = [i for i in prov.list_clusters() if i.id == cluster.cluster_id]
        assert info.name == info.id and info.dashboard_link == info.dashboard_url
    finally:
        cluster.close(shutdown=True)
    wait_until(lambda: status_of(service, "alpha", cluster.cluster_id) in {"stopping", "stopped"},
               30, what="close(shutdown=True) stops it")
