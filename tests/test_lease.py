"""One service per state: a second one refuses before any side effect, or stands by and takes
over when the first dies (SIGKILL during a stream of creates and scales), losing no cluster."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import httpx
import pytest
from distributed import Client

from clusters.local.procs import is_alive
from tests.service import ServiceProcess, free_port, tenant, wait_until

MakeService = Callable[..., ServiceProcess]


def _second(svc: ServiceProcess, *extra: str, port: int | None = None) -> subprocess.CompletedProcess[str]:
    """``provisioner serve`` on ``svc``'s data folder and state, run to its end."""
    cmd = [sys.executable, "-m", "provisioner.cli", "serve", "--port", str(port or free_port()),
           "--data-dir", str(svc.data_dir), "--state", svc.state, *extra]
    if svc.tenants_file is not None:
        cmd += ["--tenants", str(svc.tenants_file)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def test_a_second_service_on_the_same_state_refuses_and_touches_nothing(
        make_service: MakeService) -> None:
    svc = make_service([tenant("acme")]).start()
    cluster = svc.create("acme", workers=1)
    wait_until(lambda: len(svc.processes_of(cluster["id"])) == 2, what="cluster processes")
    before = svc.processes_of(cluster["id"])

    second = _second(svc)
    assert second.returncode == 2, second.stderr
    assert "holds the lease" in second.stderr and "--standby" in second.stderr
    assert "token" not in second.stderr.lower()
    # The first service and its cluster are as they were.
    assert all(is_alive(p) for p in before)
    after = svc.get_cluster("acme", cluster["id"])
    assert after["status"] == "running" and after["stop_reason"] is None
    with Client(cluster["scheduler_address"], security=svc.security("acme", cluster["id"]),
                timeout=30) as client:
        assert client.submit(lambda: 6 * 7).result(timeout=60) == 42
    assert "is not allowed" not in svc.log.read_text()


def test_a_busy_port_fails_before_anything_starts(make_service: MakeService) -> None:
    """With the lease free but the port taken, ``serve`` says so and recovers nothing."""
    svc = make_service([tenant("acme")]).start()
    cluster = svc.create("acme", workers=0)
    svc.kill()  # the lease is free again; the cluster keeps running
    processes = svc.processes_of(cluster["id"])
    assert processes and all(is_alive(p) for p in processes)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        second = _second(svc, port=busy.getsockname()[1])
    assert second.returncode == 2
    assert "cannot listen on" in second.stderr and "in use" in second.stderr
    assert "token" not in second.stderr.lower()
    assert all(is_alive(p) for p in processes), "a failed start must not stop clusters"
    svc.start()
    assert svc.get_cluster("acme", cluster["id"])["status"] == "running"


def test_another_backend_refuses_the_clusters_this_one_runs(make_service: MakeService) -> None:
    """A Mesos service on a state whose live clusters are local processes stops at start,
    saying so, instead of failing them while their processes run on."""
    svc = make_service([tenant("acme")]).start()
    cluster = svc.create("acme", workers=0)
    svc.kill()
    processes = svc.processes_of(cluster["id"])
    other = _second(svc, "--backend", "mesos", "--mesos-master", "127.0.0.1:1")
    assert other.returncode == 2, other.stderr
    assert "run on the local backend" in other.stderr and cluster["id"] in other.stderr
    assert "Traceback" not in other.stderr
    assert processes and all(is_alive(p) for p in processes)
    svc.start()
    assert svc.get_cluster("acme", cluster["id"])["status"] == "running"


def _stream(svc: ServiceProcess, acked: list[str], scales: list[tuple[int, bool]],
            stop: threading.Event) -> None:
    """Create clusters and scale the first, one call after another, until told to stop; keep
    what the service acknowledged (201/200) and each scale asked (and whether it was answered);
    calls cut off by the service's death end the stream."""
    with svc.client("acme") as http:
        while not stop.is_set():
            try:
                r = http.post("/clusters", json={"workers": 0})
                if r.status_code == 201:
                    acked.append(r.json()["id"])
                if acked:
                    want = len(acked) % 2
                    scales.append((want, False))
                    r = http.post(f"/clusters/{acked[0]}/scale", json={"workers": want})
                    if r.status_code == 200:
                        scales[-1] = (want, True)
            except httpx.HTTPError:
                return  # the service died under us
            time.sleep(0.2)


def test_a_standby_takes_over_when_the_active_service_is_killed(
        make_service: MakeService) -> None:
    active = make_service([tenant("acme", cores=12, clusters=10)]).start()
    standby = ServiceProcess(active.workdir, [tenant("acme", cores=12, clusters=10)],
                             args=["--standby"], state=active.state)
    starting = threading.Thread(target=standby.start, kwargs={"timeout": 180}, daemon=True)
    try:
        starting.start()
        wait_until(lambda: "holds the lease" in standby.log.read_text(), what="standby waiting")
        assert standby.proc is not None and standby.proc.poll() is None
        # Alive for a liveness probe, not ready, and serving no request meanwhile.
        assert httpx.get(standby.url + "/livez", timeout=5).status_code == 200
        assert httpx.get(standby.url + "/healthz", timeout=5).status_code == 503
        with standby.client("acme") as http:
            refused = http.post("/clusters", json={"workers": 0})
        assert refused.status_code == 503 and "standby" in refused.json()["detail"]

        acked: list[str] = []
        scales: list[tuple[int, bool]] = []
        stop = threading.Event()
        stream = threading.Thread(target=_stream, args=(active, acked, scales, stop), daemon=True)
        stream.start()
        wait_until(lambda: len(acked) >= 3, what="clusters created")
        active.kill()
        killed = time.monotonic()
        stop.set()
        stream.join(30)
        starting.join(60)
        took = time.monotonic() - killed
        assert standby.proc.poll() is None, standby.log.read_text()[-2000:]
        assert httpx.get(standby.url + "/healthz", timeout=5).status_code == 200
        assert took < 15, f"standby served {took:.1f}s after the active service died"
        print(f"\nstandby serving {took:.1f}s after the active service was SIGKILLed, "
              f"{len(acked)} acknowledged clusters, {len(scales)} scales sent")

        with standby.client("acme") as http:
            listed = http.get("/clusters", params={"limit": 100}).json()["clusters"]
        ids = [c["id"] for c in listed]
        assert len(ids) == len(set(ids))
        assert set(acked) <= set(ids), "a cluster the dead service acknowledged was lost"
        # The first cluster's size is the last scale answered, or one sent but cut off.
        answered = [want for want, ok in scales if ok]
        allowed = {answered[-1] if answered else 0, *(want for want, ok in scales[-1:] if not ok)}
        for cid in acked:
            wait_until(lambda cid=cid: standby.get_cluster("acme", cid)["status"] == "running",
                       what=f"{cid} running under the new service")
            want = standby.get_cluster("acme", cid)["workers"]["requested"]
            assert want in (allowed if cid == acked[0] else {0})
            wait_until(lambda cid=cid, want=want: len(standby.processes_of(cid)) == 1 + want,
                       what=f"{cid}: one scheduler and {want} workers")
        # Every cluster still one scheduler: none started twice by the two services.
        unique = {p.pid for cid in ids for p in standby.processes_of(cid)}
        assert len(unique) == sum(len(standby.processes_of(cid)) for cid in ids)
        # Managed by the new service: it scales a re-adopted cluster, which then computes.
        with standby.client("acme") as http:
            assert http.post(f"/clusters/{acked[0]}/scale", json={"workers": 1}).status_code == 200
        first = standby.get_cluster("acme", acked[0])
        with Client(first["scheduler_address"], security=standby.security("acme", acked[0]),
                    timeout=30) as client:
            assert client.submit(lambda: 6 * 7).result(timeout=60) == 42
    finally:
        standby.cleanup()
        active.cleanup()


@pytest.mark.postgresql_only
def test_a_service_that_loses_its_database_session_stops_and_leaves_clusters(
        make_service: MakeService) -> None:
    """Its lease may be another service's by now: it exits at once, touching no cluster."""
    svc = make_service([tenant("acme")]).start()
    cluster = svc.create("acme", workers=0)
    processes = svc.processes_of(cluster["id"])
    assert svc.proc is not None
    ended = svc.sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name = :name",
                    name=f"dask-provisioner pid {svc.proc.pid} on {socket.gethostname()}"[:63])
    assert ended == [(True,)]
    assert svc.proc.wait(timeout=30) == 75
    assert "lost the service lease" in svc.log.read_text()
    assert processes and all(is_alive(p) for p in processes), "clusters are the next holder's"
    svc.start()
    assert svc.get_cluster("acme", cluster["id"])["status"] == "running"
