"""The isolation and fault guarantees again, on the Mesos backend: per-cluster TLS, the
tenant's environment only, and a killed scheduler task failing its cluster and freeing quota."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distributed import Client
from sqlalchemy.engine import make_url

from tests.conftest import SERVICE_SECRET
from tests.intrusion import (
    client_refused,
    poisoned_reports_are_harmless,
    tls_without_client_certificate_refused,
    worker_cannot_join,
)
from tests.service import ServiceProcess, tenant, wait_until
from tests.test_mesos_backend import RUNNER, MakeMaster, MakeService, mesos, running_ids

__all__ = ["mesos"]  # the fixture, shared with the Mesos backend tests


def test_tls_env_and_scheduler_loss_on_mesos(mesos: MakeMaster, make_service: MakeService) -> None:
    master = mesos(agents=1, agent_cpus=4, agent_mem=4096)
    args = ["--backend", "mesos", "--mesos-master", master.address, "--mesos-command", RUNNER]
    svc: ServiceProcess = make_service(
        [tenant("red", cores=2, env={"TEAM": "red"}), tenant("blue", cores=2)], args=args,
        env={"PROVISIONER_MESOS_KILL_GRACE": "2", "SERVICE_SECRET": SERVICE_SECRET},
    ).start()
    red = svc.create("red", workers=1, env={"MODEL": "v3"})
    blue = svc.create("blue", workers=0)
    assert red["scheduler_address"].startswith("tls://")
    red_security = svc.security("red", red["id"])
    with Client(red["scheduler_address"], security=red_security, timeout=30) as client:
        client.wait_for_workers(1, timeout=60)
        # A lambda travels by value: the agents' sandboxes cannot import this test module.
        environ = lambda: dict(__import__("os").environ)  # noqa: E731
        envs: list[dict[str, Any]] = [client.submit(environ, pure=False).result(timeout=60),
                                      client.run_on_scheduler(environ)]
    # The service's own environment as the kernel holds it: it has PROVISIONER_ variables.
    assert svc.proc is not None
    raw = Path(f"/proc/{svc.proc.pid}/environ").read_bytes().decode(errors="replace")
    service_env = dict(item.split("=", 1) for item in raw.split("\0") if "=" in item)
    assert service_env.get("PROVISIONER_MESOS_KILL_GRACE") == "2", sorted(service_env)
    state = make_url(svc.state)  # where the service keeps its state
    assert state.database
    for env in envs:
        assert env["TEAM"] == "red" and env["MODEL"] == "v3"
        assert not [k for k, v in env.items() if SERVICE_SECRET in v], "service env leaked"
        # No service setting, and not the runner's options (TLS key included) either.
        assert not [k for k in env if "PROVISIONER_" in k], sorted(env)
        values = " ".join(env.values())
        assert svc.state not in values and state.database not in values
        assert "PRIVATE KEY" not in values
    client_refused(red["scheduler_address"], (OSError, TypeError))
    client_refused(red["scheduler_address"], security=svc.security("blue", blue["id"]))
    with svc.client("red") as http:
        tls_without_client_certificate_refused(
            red["scheduler_address"], http.get(f"/clusters/{red['id']}/credentials").json()["tls_ca"])
    # A worker holding blue's credentials, in every role, cannot join red's cluster.
    with svc.client("blue") as http:
        worker_cannot_join(red["scheduler_address"],
                           http.get(f"/clusters/{blue['id']}/credentials").json())
    with Client(red["scheduler_address"], security=red_security, timeout=30) as client:
        names = {w["name"] for w in client.scheduler_info()["workers"].values()}
    assert names == running_ids(master, f"{red['id']}-w") and "intruder" not in names, names

    with svc.client("red") as http:
        assert http.get("/tenants/me").json()["usage"]["clusters"] == 1
        scheduler_task = next(t for t in running_ids(master, red["id"]) if "-w" not in t)
        master.kill_task_process(scheduler_task)
        final = wait_until(lambda: (c := http.get(f"/clusters/{red['id']}").json())["status"]
                           == "failed" and c, what="red failed")
        assert final["stop_reason"].startswith("failed: scheduler task TASK_FAILED")
        wait_until(lambda: not running_ids(master, red["id"]), what="red's worker killed")
        assert http.get("/tenants/me").json()["usage"] == {
            "clusters": 0, "cores": 0.0, "memory": 0, "workers": 0}
    with svc.client("blue") as http:
        assert http.get(f"/clusters/{blue['id']}").json()["status"] == "running"


def test_poisoned_reports_from_a_mesos_scheduler_are_harmless(
        mesos: MakeMaster, make_service: MakeService, tmp_path: Path) -> None:
    """Class 1 of the hostile-tenant tests on Mesos: what a scheduler task sends the service
    is never unpickled or trusted (tests/intrusion.py has the attempts)."""
    master = mesos(agents=1, agent_cpus=4, agent_mem=4096)
    args = ["--backend", "mesos", "--mesos-master", master.address, "--mesos-command", RUNNER]
    svc: ServiceProcess = make_service([tenant("red", cores=3)], args=args,
                                       env={"PROVISIONER_MESOS_KILL_GRACE": "2"}).start()
    c = svc.create("red", workers=1)
    poisoned_reports_are_harmless(svc, "red", c, tmp_path / "pwned")
