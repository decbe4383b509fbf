"""A deliberately small v1 scheduler client (httpx) for the double's own tests.

It is not the service's Mesos client: it exists so the double's tests can speak the wire
protocol directly — subscribe, decode RecordIO from raw chunks, send calls on a separate
connection — and assert on exactly what the master sent.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import httpx

from .recordio import Decoder

Event = dict[str, Any]


def framework_info(name: str = "test", **extra: Any) -> dict[str, Any]:
    info: dict[str, Any] = {"user": "nobody", "name": name}
    info.update(extra)
    return info


class Subscriber:
    """One SUBSCRIBE stream; events are decoded in the background into a queue."""

    def __init__(
        self, url: str, info: dict[str, Any], framework_id: str | None = None, suppressed_roles: list[str] | None = None
    ) -> None:
        self.url = url
        self.info = dict(info)
        if framework_id is not None:
            self.info["id"] = {"value": framework_id}
        self.suppressed_roles = suppressed_roles
        self.framework_id: str | None = framework_id
        self.stream_id: str | None = None
        self.status_code: int | None = None
        self.headers: httpx.Headers | None = None
        self.events: asyncio.Queue[Event | None] = asyncio.Queue()
        self.history: list[Event] = []
        self.chunks = 0
        self.closed = asyncio.Event()
        self._stream_client = httpx.AsyncClient(timeout=httpx.Timeout(10, read=None))
        self._calls = httpx.AsyncClient(timeout=10)
        self._reader: asyncio.Task[None] | None = None
        self._response: httpx.Response | None = None
        self._cm: Any = None

    async def __aenter__(self) -> Subscriber:
        body: dict[str, Any] = {"type": "SUBSCRIBE", "subscribe": {"framework_info": self.info}}
        if self.suppressed_roles:
            body["subscribe"]["suppressed_roles"] = self.suppressed_roles
        if "id" in self.info:
            body["framework_id"] = self.info["id"]
        self._cm = self._stream_client.stream(
            "POST", f"{self.url}/api/v1/scheduler", json=body, headers={"Accept": "application/json"}
        )
        self._response = await self._cm.__aenter__()
        self.status_code = self._response.status_code
        self.headers = self._response.headers
        self.stream_id = self._response.headers.get("mesos-stream-id")
        self._reader = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        assert self._response is not None
        decoder = Decoder()
        try:
            async for chunk in self._response.aiter_raw():
                self.chunks += 1
                for event in decoder.feed_json(chunk):
                    if event.get("type") == "SUBSCRIBED":
                        self.framework_id = event["subscribed"]["framework_id"]["value"]
                    self.history.append(event)
                    await self.events.put(event)
        except (httpx.HTTPError, OSError):
            pass
        finally:
            self.closed.set()
            await self.events.put(None)

    async def next(self, *types: str, timeout: float = 5.0, heartbeats: bool = False) -> Event:
        """The next event (of one of `types`, if given); HEARTBEATs skipped unless asked."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"no {types or 'event'} within {timeout}s")
            event = await asyncio.wait_for(self.events.get(), remaining)
            if event is None:
                await self.events.put(None)
                raise ConnectionError("event stream closed")
            if event["type"] == "HEARTBEAT" and not heartbeats and "HEARTBEAT" not in types:
                continue
            if not types or event["type"] in types:
                return event

    async def update(self, task_id: str, state: str | None = None, timeout: float = 5.0) -> dict[str, Any]:
        """The next UPDATE status for `task_id` (optionally in `state`)."""
        return await self.wait_for(
            lambda e: (
                e["type"] == "UPDATE"
                and e["update"]["status"]["task_id"]["value"] == task_id
                and (state is None or e["update"]["status"]["state"] == state)
            ),
            timeout,
        )

    async def finals(self, count: int, timeout: float = 5.0) -> dict[str, dict[str, Any]]:
        """Acknowledge updates until ``count`` tasks have reached a terminal state; their last
        status by task id."""
        found: dict[str, dict[str, Any]] = {}
        while len(found) < count:
            status = await self.wait_for(lambda e: e["type"] == "UPDATE", timeout)
            await self.acknowledge(status)
            if status["state"] not in ("TASK_STARTING", "TASK_RUNNING"):
                found[status["task_id"]["value"]] = status
        return found

    async def wait_for(self, predicate: Callable[[Event], bool], timeout: float = 5.0) -> Any:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            event = await self.next(timeout=max(0.01, deadline - loop.time()))
            if predicate(event):
                return event["update"]["status"] if event["type"] == "UPDATE" else event

    async def call(self, call_type: str, payload: dict[str, Any] | None = None, **headers: str) -> httpx.Response:
        """Send a non-SUBSCRIBE call on a separate connection."""
        body: dict[str, Any] = {"type": call_type, "framework_id": {"value": self.framework_id}}
        if payload is not None:
            body[call_type.lower()] = payload
        hdrs = {"Mesos-Stream-Id": self.stream_id or ""}
        hdrs.update(headers)
        return await self._calls.post(f"{self.url}/api/v1/scheduler", json=body, headers=hdrs)

    async def acknowledge(self, status: dict[str, Any]) -> httpx.Response:
        return await self.call(
            "ACKNOWLEDGE",
            {"agent_id": status["agent_id"], "task_id": status["task_id"], "uuid": status["uuid"]},
        )

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(BaseException):
                await self._reader
        if self._cm is not None:
            with contextlib.suppress(Exception):
                await self._cm.__aexit__(None, None, None)
        await self._stream_client.aclose()
        await self._calls.aclose()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def command_task(
    task_id: str, agent_id: str, command: str, cpus: float = 0.1, mem: float = 32.0, **extra: Any
) -> dict[str, Any]:
    """A TaskInfo for a shell command task."""
    task: dict[str, Any] = {
        "name": task_id,
        "task_id": {"value": task_id},
        "agent_id": {"value": agent_id},
        "resources": [
            {"name": "cpus", "type": "SCALAR", "scalar": {"value": cpus}},
            {"name": "mem", "type": "SCALAR", "scalar": {"value": mem}},
        ],
        "command": {"shell": True, "value": command},
    }
    task.update(extra)
    return task


def launch(offer: dict[str, Any], *tasks: dict[str, Any], refuse_seconds: float | None = None) -> dict[str, Any]:
    """An ACCEPT payload launching `tasks` on `offer`."""
    body: dict[str, Any] = {
        "offer_ids": [offer["id"]],
        "operations": [{"type": "LAUNCH", "launch": {"task_infos": list(tasks)}}],
    }
    if refuse_seconds is not None:
        body["filters"] = {"refuse_seconds": refuse_seconds}
    return body
