"""Tests of the Mesos test master itself, over the real v1 scheduler HTTP wire protocol.

Short heartbeat / allocation / retry intervals keep the file fast; each test starts its own
master inside the test's event loop (no async fixtures, so loop scopes cannot clash).
"""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.mesos_master import AgentSpec, MesosMaster, MesosMasterProcess
from tests.mesos_master.client import Subscriber, command_task, framework_info, launch
from tests.mesos_master.recordio import Decoder, encode

pytestmark = pytest.mark.timeout(60)

FAST = {"heartbeat_interval": 0.5, "allocation_interval": 0.2, "update_retry_interval": 0.3}
JSON_HEADERS = {"Content-Type": "application/json"}


def make_master(agents: list[AgentSpec] | int = 1, **kwargs: Any) -> MesosMaster:
    return MesosMaster(agents, **{**FAST, **kwargs})


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); look at its state.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


async def wait_until(predicate: Any, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.05)


async def first_offer(sub: Subscriber, timeout: float = 5.0) -> dict[str, Any]:
    event = await sub.next("OFFERS", timeout=timeout)
    return event["offers"]["offers"][0]


async def run_to_running(sub: Subscriber, offer: dict[str, Any], task: dict[str, Any]) -> dict[str, Any]:
    """Launch `task`, acknowledging STARTING; returns the (acknowledged) RUNNING status."""
    assert (await sub.call("ACCEPT", launch(offer, task, refuse_seconds=0))).status_code == 202
    task_id = task["task_id"]["value"]
    starting = await sub.update(task_id, "TASK_STARTING")
    await sub.acknowledge(starting)
    running = await sub.update(task_id, "TASK_RUNNING")
    await sub.acknowledge(running)
    return running


def scalar(resources: list[dict[str, Any]], name: str) -> float:
    return sum(r["scalar"]["value"] for r in resources if r["name"] == name)


# --------------------------------------------------------------------------- RecordIO
def test_recordio_decoder_handles_any_split() -> None:
    events = [{"type": "HEARTBEAT"}, {"type": "ERROR", "error": {"message": "ü" * 40}}]
    data = b"".join(encode(e) for e in events)
    for size in (1, 2, 5, 7, len(data)):
        decoder = Decoder()
        out = []
        for i in range(0, len(data), size):
            out += decoder.feed_json(data[i : i + size])
        assert out == events
        assert decoder.pending == 0
    assert encode({"type": "HEARTBEAT"}) == b'20\n{"type":"HEARTBEAT"}'


@pytest.mark.asyncio
async def test_subscribe_stream_records_split_across_chunks() -> None:
    async with make_master(chunk_size=5) as master, Subscriber(master.url, framework_info()) as sub:
        assert sub.status_code == 200
        assert sub.headers is not None
        assert sub.headers["transfer-encoding"] == "chunked"
        assert sub.headers["content-type"] == "application/json"
        assert "content-length" not in sub.headers
        assert sub.stream_id and len(sub.stream_id) <= 128
        first = await sub.next(heartbeats=True)
        assert first["type"] == "SUBSCRIBED"
        subscribed = first["subscribed"]
        assert re.fullmatch(re.escape(master.master.id) + r"-\d{4}", subscribed["framework_id"]["value"])
        assert subscribed["heartbeat_interval_seconds"] == 0.5
        assert subscribed["master_info"]["version"] == "1.11.0"
        assert subscribed["master_info"]["address"]["port"] == master.port
        await sub.next("HEARTBEAT")
        await sub.next("HEARTBEAT")
        # 5-byte writes: many more HTTP chunks than records.
        assert sub.chunks > 3 * len(sub.history)


@pytest.mark.asyncio
async def test_version_endpoint() -> None:
    async with make_master() as master, httpx.AsyncClient() as http:
        resp = await http.get(f"{master.url}/version")
        assert resp.status_code == 200
        assert resp.json()["version"] == "1.11.0"


# --------------------------------------------------------------------------- status codes
@pytest.mark.asyncio
async def test_status_codes_of_the_scheduler_endpoint() -> None:
    async with make_master() as master, httpx.AsyncClient() as http:
        url = f"{master.url}/api/v1/scheduler"
        resp = await http.get(url)
        assert resp.status_code == 405 and resp.headers["allow"] == "POST"
        assert (await http.post(url, content=b'{"type":"TEARDOWN"}')).status_code == 400  # no Content-Type
        resp = await http.post(url, content=b"{not json", headers=JSON_HEADERS)
        assert resp.status_code == 400 and resp.text.startswith("Failed to parse body into JSON")
        resp = await http.post(url, json={"type": "TEARDOWN", "framework_id": {"value": 7}})
        assert resp.status_code == 400 and resp.text.startswith("Failed to convert JSON into Call protobuf")
        resp = await http.post(url, json={"type": "SUBSCRIBE", "subscribe": {"framework_info": {"name": "x"}}})
        assert resp.status_code == 400 and "user" in resp.text  # required field missing
        bad_ack = {"agent_id": {"value": "a"}, "task_id": {"value": "t"}, "uuid": "***"}
        resp = await http.post(
            url, json={"type": "ACKNOWLEDGE", "framework_id": {"value": "f"}, "acknowledge": bad_ack}
        )
        assert resp.status_code == 400  # bad base64
        resp = await http.post(url, content=b"{}", headers={"Content-Type": "text/plain"})
        assert resp.status_code == 415
        resp = await http.post(url, json={"type": "TEARDOWN"})
        assert resp.status_code == 400 and resp.text.startswith("Failed to validate scheduler::Call: ")
        resp = await http.post(url, json={"type": "KILL", "framework_id": {"value": "f"}})
        assert resp.status_code == 400 and "kill" in resp.text
        subscribe = {"type": "SUBSCRIBE", "subscribe": {"framework_info": framework_info()}}
        mismatch = {**subscribe, "framework_id": {"value": "other"}}
        assert (await http.post(url, json=mismatch)).status_code == 400
        assert (await http.post(url, json=subscribe, headers={"Accept": "text/html"})).status_code == 406
        assert (await http.post(url, json=subscribe, headers={"Mesos-Stream-Id": "x"})).status_code == 400
        # [doc bug] unknown framework: 400, not 403.
        resp = await http.post(url, json={"type": "TEARDOWN", "framework_id": {"value": "nope"}})
        assert resp.status_code == 400 and resp.text == "Framework cannot be found"

        info = framework_info(failover_timeout=30.0)
        async with Subscriber(master.url, info) as sub:
            await sub.next("SUBSCRIBED")
            assert (await sub.call("REVIVE", {}, **{"Mesos-Stream-Id": ""})).status_code == 400
            body = {"type": "REVIVE", "framework_id": {"value": sub.framework_id}}
            assert (await http.post(url, json=body)).status_code == 400  # no Mesos-Stream-Id at all
            resp = await sub.call("REVIVE", {}, **{"Mesos-Stream-Id": "wrong"})
            assert resp.status_code == 400 and "didn't match" in resp.text
            resp = await sub.call("REVIVE", {})
            assert resp.status_code == 202 and resp.content == b""
            assert (await sub.call("UNKNOWN")).status_code == 501
            fw_id, stream_id = sub.framework_id, sub.stream_id
        # Stream closed by the client: known but disconnected -> 403.
        await wait_until(lambda: not master.framework(fw_id).connected)
        body = {"type": "REVIVE", "framework_id": {"value": fw_id}}
        resp = await http.post(url, json=body, headers={"Mesos-Stream-Id": stream_id or ""})
        assert resp.status_code == 403

        master.set_leader(False, redirect_to="10.0.0.9:5050")
        resp = await http.post(url, json=subscribe)
        assert resp.status_code == 307 and resp.headers["location"] == "//10.0.0.9:5050/api/v1/scheduler"
        master.set_leader(False)
        assert (await http.post(url, json=subscribe)).status_code == 503


@pytest.mark.asyncio
async def test_doc_bug_shapes_are_the_proto_ones() -> None:
    async with make_master() as master, Subscriber(master.url, framework_info()) as sub:
        await sub.next("SUBSCRIBED")
        event = await sub.next("OFFERS")
        assert isinstance(event["offers"], dict) and isinstance(event["offers"]["offers"], list)  # nested
        # REQUEST: nested request.requests is accepted; a top-level `requests` is not a request.
        req = {"requests": [{"resources": [{"name": "cpus", "type": "SCALAR", "scalar": {"value": 1}}]}]}
        assert (await sub.call("REQUEST", req)).status_code == 202
        async with httpx.AsyncClient() as http:
            body = {"type": "REQUEST", "framework_id": {"value": sub.framework_id}, **req}
            resp = await http.post(
                f"{master.url}/api/v1/scheduler", json=body, headers={"Mesos-Stream-Id": sub.stream_id or ""}
            )
            assert resp.status_code == 400
        # REVIVE takes `roles` (repeated): suppress everything, revive role "*" -> offers again.
        offer = event["offers"]["offers"][0]
        assert (await sub.call("SUPPRESS", {"roles": ["*"]})).status_code == 202
        assert (await sub.call("DECLINE", {"offer_ids": [offer["id"]]})).status_code == 202
        with pytest.raises(TimeoutError):
            await sub.next("OFFERS", timeout=0.8)
        assert (await sub.call("REVIVE", {"roles": ["*"]})).status_code == 202
        await sub.next("OFFERS", timeout=2)
    # [doc bug] ERROR is nested: error.message.
    async with make_master() as master:
        master.master.removed_frameworks.add("gone-0000")
        async with Subscriber(master.url, framework_info(), framework_id="gone-0000") as sub:
            assert sub.status_code == 200
            event = await sub.next("ERROR")
            assert event["error"] == {"message": "Framework has been removed"}
            await asyncio.wait_for(sub.closed.wait(), 5)


# --------------------------------------------------------------------------- tasks
@pytest.mark.asyncio
async def test_real_task_lifecycle_redelivery_and_kill() -> None:
    async with make_master() as master, Subscriber(master.url, framework_info()) as sub:
        await sub.next("SUBSCRIBED")
        offer = await first_offer(sub)
        agent_id = offer["agent_id"]["value"]
        task = command_task("t1", agent_id, "echo hi; sleep 30", cpus=1, mem=128)
        assert (await sub.call("ACCEPT", launch(offer, task, refuse_seconds=0))).status_code == 202
        starting = await sub.update("t1")
        assert starting["state"] == "TASK_STARTING"  # no STAGING update
        assert starting["source"] == "SOURCE_EXECUTOR" and starting["uuid"]
        assert starting["agent_id"]["value"] == agent_id
        # Not acknowledged: the same update comes again, RUNNING waits behind it.
        again = await sub.update("t1", timeout=3)
        assert again["state"] == "TASK_STARTING" and again["uuid"] == starting["uuid"]
        assert (await sub.acknowledge(starting)).status_code == 202
        running = await sub.update("t1", "TASK_RUNNING")
        assert running["uuid"] != starting["uuid"]
        pid = running["container_status"]["executor_pid"]
        assert alive(pid)
        await sub.acknowledge(running)
        sandbox = Path(master.state()["frameworks"][0]["tasks"][0]["sandbox"])
        await wait_until(lambda: (sandbox / "stdout").read_text() == "hi\n")
        assert (await sub.call("KILL", {"task_id": {"value": "t1"}})).status_code == 202
        killed = await sub.update("t1")
        assert killed["state"] == "TASK_KILLED"  # no TASK_KILLING without the capability
        assert killed["message"] == "Command terminated with signal Terminated"
        assert not alive(pid)
        await sub.acknowledge(killed)
        # Resources are released (when the terminal update reached the master) ...
        await wait_until(lambda: master.master.agents[agent_id].used.is_empty())
        # ... and the task is forgotten once its terminal update is acknowledged.
        await wait_until(lambda: not master.framework(sub.framework_id or "").tasks)


@pytest.mark.asyncio
async def test_task_exit_codes_and_exec_form() -> None:
    async with make_master() as master, Subscriber(master.url, framework_info()) as sub:
        await sub.next("SUBSCRIBED")
        offer = await first_offer(sub)
        agent_id = offer["agent_id"]["value"]
        ok = command_task("ok", agent_id, "exit 0")
        bad = command_task("bad", agent_id, "exit 3")
        exe = command_task("exe", agent_id, "")
        exe["command"] = {"shell": False, "value": "/bin/sh", "arguments": ["sh", "-c", "exit 4"]}
        assert (await sub.call("ACCEPT", launch(offer, ok, bad, exe))).status_code == 202
        finals = await sub.finals(3)
        assert finals["ok"]["state"] == "TASK_FINISHED"
        assert finals["ok"]["message"] == "Command exited with status 0"
        assert finals["bad"]["state"] == "TASK_FAILED"
        assert finals["bad"]["message"] == "Command exited with status 3"
        assert finals["exe"]["message"] == "Command exited with status 4"
        # The command executor exiting afterwards shows up as FAILURE with executor_id.
        await wait_until(
            lambda: any(
                e["type"] == "FAILURE" and e["failure"].get("executor_id") == {"value": "bad"} for e in sub.history
            )
        )


@pytest.mark.asyncio
async def test_invalid_offers_and_invalid_tasks() -> None:
    async with make_master() as master, Subscriber(master.url, framework_info()) as sub:
        await sub.next("SUBSCRIBED")
        offer = await first_offer(sub)
        agent_id = offer["agent_id"]["value"]
        bogus = {**offer, "id": {"value": "no-such-offer"}}
        await sub.call("ACCEPT", launch(bogus, command_task("lost", agent_id, "true")))
        lost = await sub.update("lost")
        assert lost["state"] == "TASK_LOST" and lost["reason"] == "REASON_INVALID_OFFERS"
        assert lost["source"] == "SOURCE_MASTER" and "uuid" not in lost
        too_big = command_task("big", agent_id, "true", cpus=64)
        dup1 = command_task("dup", agent_id, "sleep 30")
        dup2 = command_task("dup", agent_id, "sleep 30")
        await sub.call("ACCEPT", launch(offer, too_big, dup1, dup2))
        big = await sub.update("big")
        assert big["state"] == "TASK_ERROR" and big["reason"] == "REASON_TASK_INVALID"
        assert "more than available" in big["message"]
        error = await sub.update("dup", "TASK_ERROR")
        assert "duplicate" in error["message"] and "uuid" not in error
        # The used offer is gone: launching on it again is an invalid-offer LOST.
        await sub.call("ACCEPT", launch(offer, command_task("again", agent_id, "true")))
        assert (await sub.update("again"))["state"] == "TASK_LOST"


@pytest.mark.asyncio
async def test_kill_unknown_task_and_reconciliation() -> None:
    async with make_master() as master, Subscriber(master.url, framework_info()) as sub:
        await sub.next("SUBSCRIBED")
        await sub.call("KILL", {"task_id": {"value": "ghost"}})
        ghost = await sub.update("ghost")
        assert ghost["state"] == "TASK_LOST" and ghost["reason"] == "REASON_RECONCILIATION"
        assert "uuid" not in ghost
        offer = await first_offer(sub)
        agent_id = offer["agent_id"]["value"]
        await run_to_running(sub, offer, command_task("r1", agent_id, "sleep 30"))
        await sub.call("RECONCILE", {"tasks": [{"task_id": {"value": "r1"}}, {"task_id": {"value": "nope"}}]})
        r1 = await sub.update("r1")
        assert r1["state"] == "TASK_RUNNING" and r1["source"] == "SOURCE_MASTER"
        assert r1["reason"] == "REASON_RECONCILIATION" and r1["message"].startswith("Reconciliation:")
        assert "uuid" not in r1
        nope = await sub.update("nope")
        assert nope["state"] == "TASK_LOST" and nope["message"].startswith("Reconciliation:")
        await sub.call("RECONCILE", {"tasks": []})
        implicit = await sub.update("r1")
        assert implicit["state"] == "TASK_RUNNING" and "uuid" not in implicit


@pytest.mark.asyncio
async def test_task_killing_state_and_grace_period_escalation() -> None:
    info = framework_info(capabilities=[{"type": "TASK_KILLING_STATE"}])
    async with make_master() as master, Subscriber(master.url, info) as sub:
        await sub.next("SUBSCRIBED")
        offer = await first_offer(sub)
        task = command_task("stubborn", offer["agent_id"]["value"], "trap '' TERM; while true; do sleep 0.1; done")
        running = await run_to_running(sub, offer, task)
        pid = running["container_status"]["executor_pid"]
        await asyncio.sleep(0.2)  # let the shell install its trap
        policy = {"grace_period": {"nanoseconds": 500_000_000}}
        await sub.call("KILL", {"task_id": {"value": "stubborn"}, "kill_policy": policy})
        killing = await sub.update("stubborn")
        assert killing["state"] == "TASK_KILLING"
        await sub.acknowledge(killing)
        killed = await sub.update("stubborn", timeout=5)
        assert killed["state"] == "TASK_KILLED"
        assert killed["message"] == "Command terminated with signal Killed"
        assert not alive(pid)


@pytest.mark.asyncio
async def test_fault_hook_kills_process_task_failed() -> None:
    async with make_master() as master, Subscriber(master.url, framework_info()) as sub:
        await sub.next("SUBSCRIBED")
        offer = await first_offer(sub)
        await run_to_running(sub, offer, command_task("victim", offer["agent_id"]["value"], "sleep 30"))
        master.kill_task_process("victim")
        failed = await sub.update("victim")
        assert failed["state"] == "TASK_FAILED" and failed["message"] == "Command terminated with signal Killed"


@pytest.mark.asyncio
async def test_task_environment_does_not_leak_master_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MASTER_ONLY_SECRET", "do-not-leak")
    async with make_master() as master, Subscriber(master.url, framework_info()) as sub:
        await sub.next("SUBSCRIBED")
        offer = await first_offer(sub)
        task = command_task("env", offer["agent_id"]["value"], 'env > "$MESOS_SANDBOX/env.txt"')
        task["command"]["environment"] = {"variables": [{"name": "TENANT", "value": "a"}]}
        await sub.call("ACCEPT", launch(offer, task))
        sandbox = Path(master.state()["frameworks"][0]["tasks"][0]["sandbox"])
        while (status := await sub.update("env"))["state"] != "TASK_FINISHED":
            await sub.acknowledge(status)
        env = dict(line.split("=", 1) for line in (sandbox / "env.txt").read_text().splitlines() if "=" in line)
        assert "MASTER_ONLY_SECRET" not in env
        assert env["TENANT"] == "a"
        assert env["MESOS_SANDBOX"] == str(sandbox) == env["MESOS_DIRECTORY"]
        assert env["MESOS_FRAMEWORK_ID"] == sub.framework_id
        assert env["MESOS_EXECUTOR_ID"] == env["MESOS_TASK_ID"] == "env"
        assert env["MESOS_ALLOCATION_ROLE"] == "*" and env["MESOS_AGENT_ENDPOINT"]
        allowed_extra = {"PATH", "HOME", "LANG", "PWD", "OLDPWD", "SHLVL", "_", "TENANT"}
        assert {k for k in env if not k.startswith("MESOS_")} <= allowed_extra


# --------------------------------------------------------------------------- offers, quota
@pytest.mark.asyncio
async def test_decline_filter_suppress_and_revive() -> None:
    async with make_master() as master, Subscriber(master.url, framework_info()) as sub:
        await sub.next("SUBSCRIBED")
        offer = await first_offer(sub)
        await sub.call("DECLINE", {"offer_ids": [offer["id"]], "filters": {"refuse_seconds": 60}})
        with pytest.raises(TimeoutError):
            await sub.next("OFFERS", timeout=0.8)
        await sub.call("REVIVE")  # clears filters for all roles
        offer = await first_offer(sub, timeout=2)
        await sub.call("DECLINE", {"offer_ids": [offer["id"]], "filters": {"refuse_seconds": 0}})
        await first_offer(sub, timeout=2)  # no filter: offered again on the next cycle


@pytest.mark.asyncio
async def test_quota_limits_offers_multi_role() -> None:
    agents = [AgentSpec(cpus=4, mem=8192), AgentSpec(cpus=4, mem=8192)]
    info = framework_info(roles=["tenant-a"], capabilities=[{"type": "MULTI_ROLE"}])
    async with make_master(agents, quotas={"tenant-a": {"cpus": 3, "mem": 4096}}) as master:
        async with Subscriber(master.url, info) as sub:
            await sub.next("SUBSCRIBED")
            event = await sub.next("OFFERS")
            offers = event["offers"]["offers"]
            await asyncio.sleep(0.5)  # later cycles must not add more while these are outstanding
            while not sub.events.empty():
                extra = sub.events.get_nowait()
                if extra and extra["type"] == "OFFERS":
                    offers += extra["offers"]["offers"]
            assert sum(scalar(o["resources"], "cpus") for o in offers) <= 3
            assert sum(scalar(o["resources"], "mem") for o in offers) <= 4096
            for offer in offers:
                assert offer["allocation_info"] == {"role": "tenant-a"}
                assert all(r["allocation_info"] == {"role": "tenant-a"} for r in offer["resources"])
            # Use 2 cpus, decline the rest: later offers stay within limit - allocated.
            first = offers[0]
            task = command_task("q1", first["agent_id"]["value"], "sleep 30", cpus=2, mem=1024)
            await sub.call("ACCEPT", launch(first, task, refuse_seconds=0))
            await sub.call("DECLINE", {"offer_ids": [o["id"] for o in offers[1:]], "filters": {"refuse_seconds": 0}})
            later = await sub.next("OFFERS", timeout=3)
            assert sum(scalar(o["resources"], "cpus") for o in later["offers"]["offers"]) <= 1
            # Lowering the limit rescinds outstanding offers.
            master.set_quota("tenant-a", cpus=2, mem=4096)
            await sub.next("RESCIND", timeout=2)
        async with httpx.AsyncClient() as http:
            resp = await http.post(f"{master.url}/api/v1", json={"type": "GET_QUOTA"})
            configs = resp.json()["get_quota"]["status"]["configs"]
            assert configs == [{"role": "tenant-a", "limits": {"cpus": {"value": 2.0}, "mem": {"value": 4096.0}}}]
            update = {"quota_configs": [{"role": "tenant-b", "limits": {"cpus": {"value": 1}}}]}
            resp = await http.post(f"{master.url}/api/v1", json={"type": "UPDATE_QUOTA", "update_quota": update})
            assert resp.status_code == 200
            roles = (await http.get(f"{master.url}/roles")).json()["roles"]
            assert {r["name"] for r in roles} >= {"tenant-a", "tenant-b"}


# --------------------------------------------------------------------------- failover, teardown, agents
@pytest.mark.asyncio
async def test_failover_and_resubscribe_with_same_id() -> None:
    info = framework_info(failover_timeout=30.0)
    async with make_master() as master:
        async with Subscriber(master.url, info) as sub:
            await sub.next("SUBSCRIBED")
            offer = await first_offer(sub)
            running = await run_to_running(sub, offer, command_task("keep", offer["agent_id"]["value"], "sleep 30"))
            pid = running["container_status"]["executor_pid"]
            fw_id, old_stream = sub.framework_id, sub.stream_id
            assert fw_id is not None
            master.drop_framework_stream(fw_id)
            await asyncio.wait_for(sub.closed.wait(), 5)
            assert (await sub.call("REVIVE")).status_code == 403
        assert alive(pid)  # tasks survive a framework disconnect
        async with Subscriber(master.url, info, framework_id=fw_id) as sub2:
            event = await sub2.next("SUBSCRIBED")
            assert event["subscribed"]["framework_id"]["value"] == fw_id
            assert sub2.stream_id != old_stream
            await sub2.call("RECONCILE", {"tasks": [{"task_id": {"value": "keep"}}]})
            assert (await sub2.update("keep"))["state"] == "TASK_RUNNING"
            # A newer subscription replaces an open one: the old stream gets ERROR and ends.
            async with Subscriber(master.url, info, framework_id=fw_id) as sub3:
                await sub3.next("SUBSCRIBED")
                error = await sub2.next("ERROR")
                assert error["error"]["message"] == "Framework failed over"
                await asyncio.wait_for(sub2.closed.wait(), 5)
                assert (await sub2.call("REVIVE")).status_code == 400  # stale stream id
                assert (await sub3.call("REVIVE")).status_code == 202
        assert alive(pid)


@pytest.mark.asyncio
async def test_failover_timeout_expiry_tears_down() -> None:
    info = framework_info(failover_timeout=0.3)
    async with make_master() as master:
        async with Subscriber(master.url, info) as sub:
            await sub.next("SUBSCRIBED")
            offer = await first_offer(sub)
            running = await run_to_running(sub, offer, command_task("doomed", offer["agent_id"]["value"], "sleep 30"))
            pid = running["container_status"]["executor_pid"]
            fw_id = sub.framework_id
            assert fw_id is not None
        await wait_until(lambda: fw_id in master.master.removed_frameworks, timeout=5)
        await wait_until(lambda: not alive(pid), timeout=5)


@pytest.mark.asyncio
async def test_teardown_kills_tasks_and_forbids_resubscribe() -> None:
    async with make_master() as master:
        async with Subscriber(master.url, framework_info()) as sub:
            await sub.next("SUBSCRIBED")
            offer = await first_offer(sub)
            running = await run_to_running(sub, offer, command_task("td", offer["agent_id"]["value"], "sleep 30"))
            pid = running["container_status"]["executor_pid"]
            assert (await sub.call("TEARDOWN")).status_code == 202
            await asyncio.wait_for(sub.closed.wait(), 5)
            await wait_until(lambda: not alive(pid), timeout=5)
            assert (await sub.call("REVIVE")).status_code == 400  # framework cannot be found
            fw_id = sub.framework_id
        async with Subscriber(master.url, framework_info(), framework_id=fw_id) as again:
            event = await again.next("ERROR")
            assert event["error"]["message"] == "Framework has been removed"
            await asyncio.wait_for(again.closed.wait(), 5)


@pytest.mark.asyncio
async def test_agent_loss() -> None:
    agents = [AgentSpec(cpus=2, mem=2048), AgentSpec(cpus=2, mem=2048)]
    async with make_master(agents) as master, Subscriber(master.url, framework_info()) as sub:
        await sub.next("SUBSCRIBED")
        event = await sub.next("OFFERS")
        offers = {o["agent_id"]["value"]: o for o in event["offers"]["offers"]}
        while len(offers) < 2:
            more = await sub.next("OFFERS")
            offers.update({o["agent_id"]["value"]: o for o in more["offers"]["offers"]})
        lost_agent = master.agent_ids[0]
        task = command_task("on-lost", lost_agent, "sleep 30", cpus=1, mem=256)
        running = await run_to_running(sub, offers[lost_agent], task)
        pid = running["container_status"]["executor_pid"]
        # The unused part of that agent is offered again (the event may already be behind us).
        await wait_until(lambda: any(o.agent_id == lost_agent for o in master.master.offers.values()))
        remainder_id = {"value": next(o.id for o in master.master.offers.values() if o.agent_id == lost_agent)}
        master.remove_agent(lost_agent)
        seen: dict[str, dict[str, Any]] = {}
        while len(seen) < 3:
            event = await sub.next("FAILURE", "UPDATE", "RESCIND")
            seen[event["type"]] = event
        assert seen["FAILURE"]["failure"] == {"agent_id": {"value": lost_agent}}
        status = seen["UPDATE"]["update"]["status"]
        assert status["state"] == "TASK_LOST" and status["reason"] == "REASON_AGENT_REMOVED"
        assert status["source"] == "SOURCE_MASTER" and "uuid" not in status
        assert seen["RESCIND"]["rescind"]["offer_id"] == remainder_id
        await wait_until(lambda: not alive(pid))
        new_agent = master.add_agent(AgentSpec(cpus=1, mem=512))
        await sub.wait_for(
            lambda e: e["type"] == "OFFERS" and any(o["agent_id"]["value"] == new_agent for o in e["offers"]["offers"])
        )


# --------------------------------------------------------------------------- out of process
@pytest.mark.asyncio
async def test_cli_subprocess_without_processes() -> None:
    proc = MesosMasterProcess(agents=2, heartbeat=0.5, allocation_interval=0.2, run_processes=False, chunk_size=7)
    with proc:
        assert proc.url.startswith("http://127.0.0.1:")
        async with Subscriber(proc.url, framework_info(capabilities=[{"type": "TASK_KILLING_STATE"}])) as sub:
            await sub.next("SUBSCRIBED")
            offer = await first_offer(sub)
            await run_to_running(sub, offer, command_task("sim", offer["agent_id"]["value"], "ignored"))
            state = await asyncio.to_thread(proc.state)
            assert state["frameworks"][0]["tasks"][0]["state"] == "TASK_RUNNING"
            await asyncio.to_thread(proc.kill_task_process, "sim")
            assert (await sub.update("sim"))["state"] == "TASK_FAILED"
    assert proc.proc is not None and proc.proc.returncode == 0


# --------------------------------------------------------------------------- fetcher, limits, master failover
@pytest.mark.asyncio
async def test_uris_are_fetched_and_max_completion_time(tmp_path: Path) -> None:
    script = tmp_path / "hello.sh"
    script.write_text("echo fetched\n")
    async with make_master() as master, Subscriber(master.url, framework_info()) as sub:
        await sub.next("SUBSCRIBED")
        offer = await first_offer(sub)
        agent_id = offer["agent_id"]["value"]
        fetch = command_task("fetch", agent_id, "sh hello.sh > out.txt")
        fetch["command"]["uris"] = [{"value": script.as_uri(), "extract": False}]
        missing = command_task("missing", agent_id, "true")
        missing["command"]["uris"] = [{"value": str(tmp_path / "nope.tar.gz")}]
        slow = command_task("slow", agent_id, "sleep 30")
        slow["max_completion_time"] = {"nanoseconds": 300_000_000}
        await sub.call("ACCEPT", launch(offer, fetch, missing, slow))
        finals = await sub.finals(3)
        assert finals["fetch"]["state"] == "TASK_FINISHED"
        assert finals["missing"]["state"] == "TASK_FAILED"
        assert finals["missing"]["reason"] == "REASON_CONTAINER_LAUNCH_FAILED"
        assert finals["missing"]["source"] == "SOURCE_AGENT"
        assert finals["slow"]["state"] == "TASK_FAILED"
        assert finals["slow"]["reason"] == "REASON_MAX_COMPLETION_TIME_REACHED"


@pytest.mark.asyncio
async def test_master_failover_keeps_tasks_for_resubscribing_framework() -> None:
    info = framework_info(failover_timeout=60.0)
    async with make_master() as master:
        async with Subscriber(master.url, info) as sub:
            await sub.next("SUBSCRIBED")
            offer = await first_offer(sub)
            running = await run_to_running(sub, offer, command_task("survivor", offer["agent_id"]["value"], "sleep 30"))
            fw_id = sub.framework_id
            old_master_id = master.master.id
            master.fail_over()
            await asyncio.wait_for(sub.closed.wait(), 5)
            assert (await sub.call("REVIVE")).status_code == 400  # the new leader does not know it yet
        async with Subscriber(master.url, info, framework_id=fw_id) as sub2:
            event = await sub2.next("SUBSCRIBED")
            assert event["subscribed"]["master_info"]["id"] != old_master_id
            await sub2.call("RECONCILE", {"tasks": []})
            assert (await sub2.update("survivor"))["state"] == "TASK_RUNNING"
            assert alive(running["container_status"]["executor_pid"])


@pytest.mark.asyncio
async def test_update_framework_changes_roles() -> None:
    info = framework_info(roles=["a"], capabilities=[{"type": "MULTI_ROLE"}])
    async with make_master() as master, Subscriber(master.url, info) as sub:
        await sub.next("SUBSCRIBED")
        offer = await first_offer(sub)
        assert offer["allocation_info"]["role"] == "a"
        new_info = {**info, "id": {"value": sub.framework_id}, "roles": ["b"]}
        resp = await sub.call("UPDATE_FRAMEWORK", {"framework_info": new_info})
        assert resp.status_code == 200
        rescind = await sub.next("RESCIND")  # offers for a role the framework left
        assert rescind["rescind"]["offer_id"] == offer["id"]
        assert (await first_offer(sub))["allocation_info"]["role"] == "b"
        bad = {**new_info, "user": "someone-else"}
        assert (await sub.call("UPDATE_FRAMEWORK", {"framework_info": bad})).status_code == 400


@pytest.mark.asyncio
async def test_http_basic_authentication() -> None:
    async with make_master(credentials={"svc": "s3cret"}) as master, httpx.AsyncClient() as http:
        subscribe = {"type": "SUBSCRIBE", "subscribe": {"framework_info": framework_info(principal="svc")}}
        resp = await http.post(f"{master.url}/api/v1/scheduler", json=subscribe)
        assert resp.status_code == 401 and resp.headers["www-authenticate"].startswith("Basic")
        resp = await http.post(f"{master.url}/api/v1/scheduler", json=subscribe, auth=("svc", "wrong"))
        assert resp.status_code == 401
        async with http.stream(
            "POST", f"{master.url}/api/v1/scheduler", json=subscribe, auth=("svc", "s3cret")
        ) as stream:
            assert stream.status_code == 200


@pytest.mark.asyncio
async def test_offer_timeout_rescinds() -> None:
    async with make_master(offer_timeout=0.3) as master, Subscriber(master.url, framework_info()) as sub:
        await sub.next("SUBSCRIBED")
        offer = await first_offer(sub)
        rescind = await sub.next("RESCIND", timeout=3)
        assert rescind["rescind"]["offer_id"] == offer["id"]
        await sub.call("ACCEPT", launch(offer, command_task("late", offer["agent_id"]["value"], "true")))
        late = await sub.update("late")
        assert late["state"] == "TASK_LOST" and late["reason"] == "REASON_INVALID_OFFERS"


@pytest.mark.asyncio
async def test_semantic_subscribe_refusals_are_error_events() -> None:
    async with make_master(allowed_roles={"tenant-a"}) as master:
        for info in (
            framework_info(roles=["tenant-b"], capabilities=[{"type": "MULTI_ROLE"}]),
            framework_info(roles=["bad role"], capabilities=[{"type": "MULTI_ROLE"}]),
            framework_info(roles=["tenant-a"]),  # roles without MULTI_ROLE
        ):
            async with Subscriber(master.url, info) as sub:
                assert sub.status_code == 200
                event = await sub.next(heartbeats=True)
                assert event["type"] == "ERROR" and event["error"]["message"]
                await asyncio.wait_for(sub.closed.wait(), 5)
                assert [e["type"] for e in sub.history] == ["ERROR"]
        assert not master.master.frameworks
