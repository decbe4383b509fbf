"""Unit tests of the Mesos client pieces: RecordIO, leader detection, offer matching, and the
HTTP client against the test master (chunked stream, stream ids, redirects, failover)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import pytest

from clusters.mesos.client import CallError, MesosClient, redirect_base
from clusters.mesos.detector import (
    Detector,
    DetectorError,
    address_from_info,
    leader_from_children,
    normalise,
)
from clusters.mesos.offers import OfferPool, match
from clusters.mesos.recordio import RecordIODecoder, RecordIOError, encode
from clusters.mesos.tasks import OPTIONS_VAR, TaskRequest, TaskSettings, mesos_cpus, mesos_mem, task_info
from tests.mesos_master import MesosMaster

# -- RecordIO ----------------------------------------------------------------------------------


def test_records_split_across_chunks_and_packed_in_one() -> None:
    records = [json.dumps({"type": "HEARTBEAT"}).encode(), b'{"type":"X","x":"\xc3\xa9"}', b"7"]
    stream = b"".join(encode(r) for r in records)
    for size in (1, 2, 3, 5, 7, len(stream)):
        decoder = RecordIODecoder()
        out: list[bytes] = []
        for i in range(0, len(stream), size):
            out += decoder.feed(stream[i:i + size])
        assert out == records, size
        assert decoder.pending == 0


def test_recordio_rejects_garbage() -> None:
    with pytest.raises(RecordIOError):
        RecordIODecoder().feed(b"abc\n{}")
    with pytest.raises(RecordIOError):
        RecordIODecoder().feed(b"1" * 30)
    with pytest.raises(RecordIOError):
        RecordIODecoder(max_record=10).feed(b"11\n")


# -- leader detection --------------------------------------------------------------------------


def test_zookeeper_leader_is_the_lowest_sequence() -> None:
    children = ["log_replicas", "json.info_0000000012", "json.info_0000000003", "info_0000000001"]
    assert leader_from_children(children) == "json.info_0000000003"
    assert leader_from_children(["log_replicas"]) is None
    info = {"address": {"hostname": "m2.example", "ip": "10.0.0.2", "port": 5050}}
    assert address_from_info(json.dumps(info).encode()) == "10.0.0.2:5050"
    info = {"address": {"hostname": "m3.example", "port": 5051}, "hostname": "x"}
    assert address_from_info(json.dumps(info).encode()) == "m3.example:5051"
    # IPv6 text in address.ip, bracketed or not, becomes a usable host:port and base URL.
    for ip in ("2001:db8::5", "[2001:db8::5]"):
        info = {"address": {"hostname": "m6", "ip": ip, "port": 5050}}
        assert address_from_info(json.dumps(info).encode()) == "[2001:db8::5]:5050"
    assert normalise("[2001:db8::5]:5050") == "http://[2001:db8::5]:5050"
    assert normalise("[2001:db8::5]") == "http://[2001:db8::5]:5050"
    # A node that is no MasterInfo is refused with a reason, never a crash.
    for bad in (b"[]", b"not json", b'{"address": {"ip": 7, "port": 5050}}',
                b'{"address": {"ip": "10.0.0.1", "port": 70000}}', b"{}", b" " * 70_000):
        with pytest.raises(DetectorError):
            address_from_info(bad)
    # Sequence numbers must be numbers: a stray json.info_x is no contender.
    assert leader_from_children(["json.info_x", "json.info_0000000004"]) == "json.info_0000000004"


def test_master_addresses() -> None:
    assert normalise("10.0.0.1:5050") == "http://10.0.0.1:5050"
    assert normalise("http://m:1/") == "http://m:1"
    assert normalise("m") == "http://m:5050"
    assert redirect_base("//m2:5050/api/v1/scheduler", "http://m1:5050") == "http://m2:5050"
    detector = Detector("zk://a:2181,b:2181/mesos")
    assert detector.uses_zookeeper and detector._zk_path == "/mesos"
    assert detector._zk_hosts == "a:2181,b:2181"


# -- offer matching ----------------------------------------------------------------------------


def offer(oid: str, role: str, cpus: float, mem: float, ports: tuple[int, int] = (31000, 31009),
          agent: str = "a1") -> dict[str, Any]:
    alloc = {"role": role}
    return {
        "id": {"value": oid}, "agent_id": {"value": agent}, "hostname": "h", "allocation_info": alloc,
        "resources": [
            {"name": "cpus", "type": "SCALAR", "scalar": {"value": cpus}, "role": "*",
             "allocation_info": alloc},
            {"name": "mem", "type": "SCALAR", "scalar": {"value": mem}, "role": "*",
             "allocation_info": alloc},
            {"name": "ports", "type": "RANGES", "role": "*", "allocation_info": alloc,
             "ranges": {"range": [{"begin": ports[0], "end": ports[1]}]}},
        ],
    }


def request(tid: str, role: str, cpus: float = 1, mem: float = 512) -> TaskRequest:
    return TaskRequest(tid, "c", role, "worker", role, cpus, mem, {})


def test_match_takes_what_fits_and_copies_offer_metadata() -> None:
    pools = [OfferPool.parse(offer("o1", "a", 2.5, 2048))]
    placed = match(pools, [request("t1", "a"), request("t2", "a"), request("t3", "a")], {})
    assert [p.request.task_id for p in placed] == ["t1", "t2"]
    first = placed[0].resources
    assert {r["name"] for r in first} == {"cpus", "mem", "ports"}
    assert all(r["allocation_info"] == {"role": "a"} for r in first)
    assert placed[0].ports != placed[1].ports
    assert pools[0].amount("cpus") == pytest.approx(0.5)


def test_match_serves_roles_by_weighted_dominant_share() -> None:
    pools = [OfferPool.parse(offer("oa", "a", 2, 8192)), OfferPool.parse(offer("ob", "b", 2, 8192))]
    pending = [request("a1", "a"), request("a2", "a"), request("b1", "b")]
    placed = match(pools, pending, {"a": (4.0, 2048.0)})
    assert [p.request.task_id for p in placed] == ["b1", "a1", "a2"]
    # A role only ever uses offers made to it.
    placed = match([OfferPool.parse(offer("oa", "a", 8, 8192))], [request("b1", "b")], {})
    assert placed == []


def test_task_info_is_a_command_task_with_options_in_the_environment() -> None:
    req = TaskRequest("c1-wabc", "c1", "acme", "worker", "acme", 1, 512,
                      {"address": "tls://h:1", "name": "c1-wabc", "credentials": {"key": "SECRET"}},
                      env={"A": "1"}, image="ghcr.io/acme/dask:1")
    resources = [{"name": "cpus", "type": "SCALAR", "scalar": {"value": 1}, "role": "*"}]
    info = task_info(req, "agent-1", "host-1", resources, [31007],
                     TaskSettings(command="python3 -m clusters.runner", kill_grace=3))
    assert info["task_id"] == {"value": "c1-wabc"} and info["agent_id"] == {"value": "agent-1"}
    assert info["command"]["value"] == f"exec python3 -m clusters.runner worker env:{OPTIONS_VAR}"
    assert "SECRET" not in info["command"]["value"]
    env = {v["name"]: v["value"] for v in info["command"]["environment"]["variables"]}
    options = json.loads(env[OPTIONS_VAR])
    assert options["host"] == "host-1" and options["port"] == 31007 and env["A"] == "1"
    assert info["kill_policy"] == {"grace_period": {"nanoseconds": 3_000_000_000}}
    assert info["container"] == {"type": "MESOS", "mesos": {"image": {
        "type": "DOCKER", "docker": {"name": "ghcr.io/acme/dask:1"}}}}
    # A cluster in a registered environment runs that interpreter, at its path on the agent.
    req.python = "/opt/envs/ml kit/bin/python"
    info = task_info(req, "agent-1", "host-1", resources, [31007], TaskSettings())
    assert info["command"]["value"] == \
        f"exec '/opt/envs/ml kit/bin/python' -m clusters.runner worker env:{OPTIONS_VAR}"


def test_units() -> None:
    assert mesos_mem(512 * 2**20) == 512.0
    assert mesos_mem(512 * 2**20 + 1) == 513.0
    assert mesos_cpus(0.1234) == 0.124


# -- the HTTP client against the test master ---------------------------------------------------


class Recorder:
    def __init__(self, roles: list[str] | None = None) -> None:
        self.roles = roles or ["tenant-a"]
        self.events: list[dict[str, Any]] = []
        self.subscribed_ids: list[str] = []
        self.disconnects = 0
        self.removed: list[str] = []
        self.changed = asyncio.Event()

    def subscription(self) -> tuple[dict[str, Any], list[str]]:
        info = {"user": "test", "name": "client-test", "roles": self.roles,
                "capabilities": [{"type": "MULTI_ROLE"}], "failover_timeout": 60.0}
        return info, []

    async def subscribed(self, framework_id: str, heartbeat_interval: float) -> None:
        self.subscribed_ids.append(framework_id)
        self.changed.set()

    async def event(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        self.changed.set()

    async def disconnected(self) -> None:
        self.disconnects += 1

    async def framework_removed(self, message: str) -> None:
        self.removed.append(message)


async def until(check: Any, timeout: float = 10.0) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        value = check()
        if value:
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {check}")


@contextlib.asynccontextmanager
async def running(client: MesosClient) -> Any:
    client.start()
    try:
        yield client
    finally:
        await client.stop()


async def test_subscribe_small_chunks_calls_and_offers() -> None:
    async with MesosMaster(agents=1, heartbeat_interval=0.3, chunk_size=5) as master:
        rec = Recorder()
        async with running(MesosClient(master.address, rec, backoff_min=0.1)) as client:
            await until(lambda: rec.subscribed_ids)
            offers = await until(lambda: [e for e in rec.events if e["type"] == "OFFERS"])
            got = offers[0]["offers"]["offers"]
            assert got[0]["allocation_info"] == {"role": "tenant-a"}
            await client.call("DECLINE", {"offer_ids": [got[0]["id"]],
                                          "filters": {"refuse_seconds": 60}})
            await client.call("SUPPRESS", {"roles": ["tenant-a"]})
            assert master.framework(client.framework_id).suppressed == {"tenant-a"}
            # A stale stream id is refused with 400, as Mesos does.
            client.stream_id = "not-the-stream"
            with pytest.raises(CallError) as err:
                await client.call("REVIVE", {"roles": ["tenant-a"]})
            assert err.value.status == 400
            # Heartbeats keep the stream alive well past several intervals.
            await asyncio.sleep(2.0)
            assert rec.disconnects == 0 and client.subscriptions == 1


async def test_resubscribes_with_same_id_after_the_stream_drops() -> None:
    async with MesosMaster(agents=1, heartbeat_interval=0.5) as master:
        rec = Recorder()
        async with running(MesosClient(master.address, rec, backoff_min=0.1)) as client:
            await until(lambda: rec.subscribed_ids)
            first_stream = client.stream_id
            master.drop_framework_stream(client.framework_id)
            await until(lambda: len(rec.subscribed_ids) == 2)
            assert rec.subscribed_ids[0] == rec.subscribed_ids[1]
            assert client.stream_id != first_stream and rec.disconnects == 1
            await client.call("SUPPRESS", {"roles": []})


async def test_follows_redirect_to_the_leader() -> None:
    async with MesosMaster(agents=1, heartbeat_interval=0.5) as leader:
        async with MesosMaster(agents=0, redirect_to=leader.address) as follower:
            rec = Recorder()
            async with running(MesosClient(follower.address, rec, backoff_min=0.1)) as client:
                await until(lambda: rec.subscribed_ids)
                assert client.base == leader.url
                assert client.framework_id in leader.state()["frameworks"][0]["id"]


async def test_silent_stream_is_dropped_after_missed_heartbeats() -> None:
    """A master that says SUBSCRIBED and then nothing: the client must give up on it."""
    connections = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length")))
        await reader.readexactly(length)
        event = json.dumps({"type": "SUBSCRIBED", "subscribed": {
            "framework_id": {"value": "fw-1"}, "heartbeat_interval_seconds": 0.2}}).encode()
        body = encode(event)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"Mesos-Stream-Id: s1\r\nTransfer-Encoding: chunked\r\n\r\n")
        writer.write(b"%x\r\n%s\r\n" % (len(body), body))
        await writer.drain()
        with contextlib.suppress(Exception):
            await reader.read()  # hold the connection open, silently
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        rec = Recorder()
        client = MesosClient(f"127.0.0.1:{port}", rec, missed_heartbeats=5, backoff_min=0.1)
        async with running(client):
            await until(lambda: rec.subscribed_ids)
            start = asyncio.get_running_loop().time()
            await until(lambda: rec.disconnects >= 1, timeout=5)
            assert asyncio.get_running_loop().time() - start < 3
            await until(lambda: connections >= 2, timeout=5)
    finally:
        server.close()


def test_ports_come_from_the_offered_ranges_without_reuse() -> None:
    raw = offer("o1", "a", 8, 8192)
    raw["resources"][2]["ranges"]["range"] = [{"begin": 1, "end": 65535}]
    pool = OfferPool.parse(raw)
    assert pool.free_ports() == 65535
    req = request("t1", "a")
    req.ports = 3
    resources, ports = pool.take(req)
    assert ports == [1, 2, 3] and pool.free_ports() == 65532
    ranges = next(r for r in resources if r["name"] == "ports")["ranges"]["range"]
    assert ranges == [{"begin": 1, "end": 1}, {"begin": 2, "end": 2}, {"begin": 3, "end": 3}]
    small = OfferPool.parse(offer("o2", "a", 8, 8192, ports=(5, 5)))
    assert small.fits(request("t2", "a"))
    small.take(request("t2", "a"))
    assert not small.fits(request("t3", "a"))


def test_a_task_state_this_code_does_not_know_is_no_end() -> None:
    from clusters.mesos.book import TaskState

    assert TaskState.of("TASK_FAILED").terminal and TaskState.of("TASK_UNKNOWN").terminal
    assert not TaskState.of("TASK_RUNNING").terminal
    assert TaskState.of("TASK_FROM_A_LATER_MESOS") == TaskState.OTHER
    assert not TaskState.of("TASK_FROM_A_LATER_MESOS").terminal and not TaskState.of(None).terminal
