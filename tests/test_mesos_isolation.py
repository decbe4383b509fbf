"""The isolation and fault guarantees again, on the Mesos backend: per-cluster TLS, the
tenant's environment only, and a killed scheduler task failing its cluster and freeing quota."""

from __future__ import annotations

from typing import Any

import pytest
from distributed import Client

from tests.conftest import SERVICE_SECRET
from tests.service import ServiceProcess, tenant, wait_until
from tests.test_mesos_backend import RUNNER, MakeMaster, MakeService, create, mesos, running_ids

__all__ = ["mesos"]  # the fixture, shared with the Mesos backend tests


def test_tls_env_and_scheduler_loss_on_mesos(mesos: MakeMaster, make_service: MakeService) -> None:
    master = mesos(agents=1, agent_cpus=4, agent_mem=4096)
    args = ["--backend", "mesos", "--mesos-master", master.address, "--mesos-command", RUNNER]
    svc: ServiceProcess = make_service(
        [tenant("red", cores=2, env={"TEAM": "red"}), tenant("blue", cores=2)], args=args,
        env={"PROVISIONER_MESOS_KILL_GRACE": "2", "SERVICE_SECRET": SERVICE_SECRET},
    ).start()
    red = create(svc, "red", workers=1, env={"MODEL": "v3"})
    blue = create(svc, "blue", workers=0)
    assert red["scheduler_address"].startswith("tls://")
    red_security = svc.security("red", red["id"])
    with Client(red["scheduler_address"], security=red_security, timeout=30) as client:
        client.wait_for_workers(1, timeout=60)
        # A lambda travels by value: the agents' sandboxes cannot import this test module.
        environ = lambda: dict(__import__("os").environ)  # noqa: E731
        envs: list[dict[str, Any]] = [client.submit(environ, pure=False).result(timeout=60),
                                      client.run_on_scheduler(environ)]
    for env in envs:
        assert env["TEAM"] == "red" and env["MODEL"] == "v3"
        assert not [k for k, v in env.items() if SERVICE_SECRET in v], "service env leaked"
    with pytest.raises((OSError, TypeError)):
        Client(red["scheduler_address"], timeout=3)
    with pytest.raises(OSError):
        Client(red["scheduler_address"], security=svc.security("blue", blue["id"]), timeout=3)

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
