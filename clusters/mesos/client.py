"""A Mesos v1 scheduler HTTP API client on asyncio + httpx.

One long-lived SUBSCRIBE stream (chunked RecordIO of JSON events) and calls on a separate
connection carrying ``Mesos-Stream-Id``. The stream is watched for HEARTBEATs: silence for
``missed_heartbeats`` intervals means the connection is dead and it is dropped. Any loss is
followed by a re-subscription with the same framework id after an exponential backoff, to the
leader found by the :class:`Detector` (following 307 redirects); the backoff starts again from
its minimum after every successful SUBSCRIBED. With ZooKeeper, a change of leader is seen by
a watch and the stream is moved to the new leader after a random delay of at most
``LEADER_CHANGE_DELAY`` (as Mesos's own scheduler library does), without waiting for the old
stream to die. Shutting down never sends TEARDOWN: the master keeps the framework for its
failover timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from typing import Any, Protocol
from urllib.parse import urlsplit

import httpx

from clusters.mesos.detector import Detector, DetectorError
from clusters.mesos.recordio import RecordIODecoder, RecordIOError

logger = logging.getLogger("provisioner.mesos.client")

API_PATH = "/api/v1/scheduler"
MAX_CALLS_IN_FLIGHT = 32
JSON = "application/json"
#: How many redirects a call or subscription follows before giving up on this attempt.
MAX_REDIRECTS = 3
#: Most a re-subscription waits after a leader change (spreads frameworks out in time).
LEADER_CHANGE_DELAY = 0.5
#: How often the leader is looked up even without a ZooKeeper event (a safety net).
LEADER_POLL_INTERVAL = 10.0


class NotSubscribed(Exception):
    """There is no live subscription to send a call on (the call was not made)."""


class CallError(Exception):
    """The master refused a call (4xx/5xx); ``status`` is the HTTP code."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


class SubscribeError(Exception):
    """A subscription attempt failed before SUBSCRIBED (status code, ERROR event, ...)."""


class EventHandler(Protocol):
    """What the client tells its owner. Event handlers run in the stream's reading order."""

    def subscription(self) -> tuple[dict[str, Any], list[str]]:
        """FrameworkInfo (without ``id``) and suppressed roles for the next SUBSCRIBE."""

    async def subscribed(self, framework_id: str, heartbeat_interval: float) -> None: ...

    async def event(self, event: dict[str, Any]) -> None: ...

    async def disconnected(self) -> None: ...

    async def framework_removed(self, message: str) -> None:
        """The master refuses this framework id for good; a fresh one will be requested."""


def redirect_base(location: str, current: str) -> str:
    """Base URL from a 307 ``Location`` (Mesos sends protocol-relative ``//host:port/...``)."""
    scheme = urlsplit(current).scheme or "http"
    if location.startswith("//"):
        location = f"{scheme}:{location}"
    elif "://" not in location:
        location = f"{scheme}://{location.lstrip('/')}"
    parts = urlsplit(location)
    return f"{parts.scheme}://{parts.netloc}"


class MesosClient:
    """Keeps one framework subscribed and sends its calls."""

    def __init__(
        self,
        master: str,
        handler: EventHandler,
        *,
        framework_id: str | None = None,
        missed_heartbeats: float = 5,
        backoff_min: float = 0.5,
        backoff_max: float = 15.0,
        connect_timeout: float = 10.0,
        call_timeout: float = 30.0,
    ) -> None:
        self.detector = Detector(master)
        self.handler = handler
        self.framework_id = framework_id
        self.stream_id: str | None = None
        self.base: str | None = None
        self.heartbeat_interval = 15.0
        self.missed_heartbeats = missed_heartbeats
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.connect_timeout = connect_timeout
        self.subscribed = asyncio.Event()
        self.subscriptions = 0
        self._stream_http = httpx.AsyncClient(
            timeout=httpx.Timeout(connect=connect_timeout, read=None, write=connect_timeout,
                                  pool=connect_timeout),
            follow_redirects=False,
        )
        self._calls_http = httpx.AsyncClient(timeout=call_timeout, follow_redirects=False)
        # Calls come in bursts (an ACKNOWLEDGE per update, a KILL per task): a bounded number
        # in flight keeps the connection pool from rescanning a queue of hundreds each time.
        self._call_slots = asyncio.Semaphore(MAX_CALLS_IN_FLIGHT)
        self._runner: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._reconnect = asyncio.Event()
        #: The leader the detector named for the current subscription attempt.
        self._leader: str | None = None
        self._leader_changed = asyncio.Event()

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        if self._runner is None:
            self._runner = asyncio.create_task(self._run(), name="mesos-subscription")
        if self._watcher is None and self.detector.uses_zookeeper:
            self._watcher = asyncio.create_task(self._follow_leader(), name="mesos-leader")

    async def stop(self) -> None:
        """Drop the stream without TEARDOWN: the framework and its tasks stay in Mesos."""
        for task in (self._watcher, self._runner):
            if task is not None:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        self._runner = self._watcher = None
        self.subscribed.clear()
        await self._stream_http.aclose()
        await self._calls_http.aclose()
        await self.detector.close()

    def reconnect(self) -> None:
        """Drop the current stream and subscribe again (e.g. after a 403 on a call)."""
        self._reconnect.set()

    async def _follow_leader(self) -> None:
        """Look the leader up whenever ZooKeeper says the election may have changed (or now
        and then); a new one moves the subscription at once."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.detector.changed.wait(), LEADER_POLL_INTERVAL)
            self.detector.changed.clear()
            try:
                leader = await self.detector.leader()
            except DetectorError as exc:
                logger.debug("mesos: leader lookup: %s", exc)
                continue
            if leader != self._leader:
                # A new leader, or one found while the subscription waits to try again.
                logger.warning("mesos: the leading master is now %s (was %s)", leader,
                               self._leader or "unknown")
                self._leader_changed.set()
                self.reconnect()

    async def _run(self) -> None:
        failures = 0
        while True:
            before = self.subscriptions
            try:
                await self._subscribe_once()
                failures = 0
            except asyncio.CancelledError:
                raise
            except (httpx.HTTPError, OSError, DetectorError, SubscribeError, RecordIOError,
                    ValueError) as exc:
                logger.warning("mesos subscription: %s", exc or repr(exc))
                failures = 1 if self.subscriptions > before else failures + 1
            except Exception:
                logger.exception("mesos subscription failed")
                failures = 1 if self.subscriptions > before else failures + 1
            if self.subscribed.is_set():
                self.subscribed.clear()
                self.stream_id = None
                with contextlib.suppress(Exception):
                    await self.handler.disconnected()
            if not self._leader_changed.is_set():
                delay = min(self.backoff_max, self.backoff_min * 2 ** max(0, failures - 1))
                delay *= random.uniform(0.8, 1.2)
                logger.info("mesos: re-subscribing in %.2fs", delay)
                with contextlib.suppress(TimeoutError):  # a new leader cuts the wait short
                    await asyncio.wait_for(self._leader_changed.wait(), delay)
            if self._leader_changed.is_set():
                self._leader_changed.clear()
                failures = 0
                await asyncio.sleep(random.uniform(0, LEADER_CHANGE_DELAY))

    # -- the subscription stream -------------------------------------------------------------

    def _subscribe_body(self) -> dict[str, Any]:
        info, suppressed = self.handler.subscription()
        info = dict(info)
        body: dict[str, Any] = {"type": "SUBSCRIBE",
                                "subscribe": {"framework_info": info,
                                              "suppressed_roles": suppressed}}
        if self.framework_id:
            info["id"] = {"value": self.framework_id}
            body["framework_id"] = {"value": self.framework_id}
        return body

    async def _subscribe_once(self) -> None:
        base = self._leader = await self.detector.leader()
        self._reconnect.clear()
        for _ in range(MAX_REDIRECTS + 1):
            request = self._stream_http.build_request(
                "POST", base + API_PATH, content=json.dumps(self._subscribe_body()).encode(),
                headers={"Content-Type": JSON, "Accept": JSON},
            )
            response = await self._stream_http.send(request, stream=True)
            try:
                if response.status_code == 307:
                    base = redirect_base(response.headers.get("location", ""), base)
                    logger.info("mesos: leader is %s", base)
                    continue
                if response.status_code != 200:
                    body = (await response.aread()).decode(errors="replace")[:500]
                    raise SubscribeError(f"SUBSCRIBE answered {response.status_code}: {body}")
                self.base = base
                await self._read_stream(response)
                return
            finally:
                await response.aclose()
        raise SubscribeError("too many redirects")

    async def _read_stream(self, response: httpx.Response) -> None:
        decoder = RecordIODecoder()
        stream_id = response.headers.get("mesos-stream-id")
        chunks = response.aiter_raw()
        reconnect = asyncio.ensure_future(self._reconnect.wait())
        read: asyncio.Future[bytes] | None = None
        try:
            while True:
                timeout = self.heartbeat_interval * self.missed_heartbeats
                read = asyncio.ensure_future(chunks.__anext__())
                done, _ = await asyncio.wait({read, reconnect}, timeout=timeout,
                                             return_when=asyncio.FIRST_COMPLETED)
                if read not in done:
                    read.cancel()
                    with contextlib.suppress(BaseException):
                        await read
                    if reconnect in done:
                        logger.info("mesos: dropping the stream to re-subscribe")
                        return
                    raise SubscribeError(f"no heartbeat for {timeout:g}s: stream presumed dead")
                try:
                    chunk = read.result()
                except StopAsyncIteration:
                    logger.warning("mesos: the master closed the event stream")
                    return
                for record in decoder.feed(chunk):
                    await self._dispatch(json.loads(record), stream_id)
        finally:
            reconnect.cancel()
            if read is not None and not read.done():
                read.cancel()
                with contextlib.suppress(BaseException):
                    await read

    async def _dispatch(self, event: dict[str, Any], stream_id: str | None) -> None:
        kind = event.get("type")
        if kind == "SUBSCRIBED":
            sub = event.get("subscribed") or {}
            self.framework_id = sub["framework_id"]["value"]
            self.heartbeat_interval = float(sub.get("heartbeat_interval_seconds") or 15.0)
            self.stream_id = stream_id
            self.subscriptions += 1
            self.subscribed.set()
            logger.info("mesos: subscribed as framework %s (stream %s)", self.framework_id,
                        stream_id)
            await self.handler.subscribed(self.framework_id, self.heartbeat_interval)
        elif kind == "HEARTBEAT":
            return
        elif kind == "ERROR":
            message = (event.get("error") or {}).get("message", "")
            logger.warning("mesos: ERROR event: %s", message)
            if "removed" in message.lower():
                self.framework_id = None
                await self.handler.framework_removed(message)
            raise SubscribeError(f"master sent ERROR: {message}")
        else:
            try:
                await self.handler.event(event)
            except Exception:  # one event handled badly must not cost the subscription
                logger.exception("mesos: handling %s failed", kind)

    # -- calls -------------------------------------------------------------------------------

    async def call(self, kind: str, payload: dict[str, Any] | None = None) -> httpx.Response:
        """Send one call on the side connection; 2xx returns, other codes raise CallError."""
        if not self.subscribed.is_set() or not self.framework_id or not self.base:
            raise NotSubscribed(kind)
        body: dict[str, Any] = {"type": kind, "framework_id": {"value": self.framework_id}}
        if payload is not None:
            body[kind.lower()] = payload
        headers = {"Content-Type": JSON, "Accept": JSON}
        if self.stream_id:
            headers["Mesos-Stream-Id"] = self.stream_id
        async with self._call_slots:
            response = await self._calls_http.post(self.base + API_PATH,
                                                   content=json.dumps(body), headers=headers)
        if response.status_code in (200, 202):
            return response
        message = response.text[:500]
        if response.status_code in (307, 403, 503):
            # Not the leader any more, or the master thinks we are not subscribed.
            self.reconnect()
        raise CallError(response.status_code, message)
