"""One SUBSCRIBE connection: an event queue written out as RecordIO over HTTP chunks.

Events are queued synchronously by the master (so their order is the order things
happened) and written by the connection's own task.  Optionally every record is cut into
small HTTP chunks so clients are tested against records that span chunk boundaries.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable
from typing import Any

from . import recordio
from .httpserver import ChunkSender, StreamResponse

_END = b""
_ABORT = b"!"


class Subscription:
    """The event stream of one subscription (identified by its Mesos-Stream-Id)."""

    def __init__(
        self,
        chunk_size: int | None = None,
        on_closed: Callable[[Subscription], None] | None = None,
    ) -> None:
        self.stream_id = str(uuid.uuid4())
        self.chunk_size = chunk_size
        self.closed = False
        self._on_closed = on_closed
        self._queue: asyncio.Queue[bytes] = asyncio.Queue()
        self._heartbeat: asyncio.Task[None] | None = None

    # ------------------------------------------------------------ master side
    def send(self, event: dict[str, Any]) -> None:
        if not self.closed:
            self._queue.put_nowait(recordio.encode(event))

    def close(self) -> None:
        """End the stream after the queued events (terminating zero chunk)."""
        if not self.closed:
            self._queue.put_nowait(_END)
            self._mark_closed()

    def abort(self) -> None:
        """Drop the connection abruptly, as a network failure would."""
        if not self.closed:
            self._queue.put_nowait(_ABORT)
            self._mark_closed()

    def start_heartbeats(self, interval: float) -> None:
        async def beat() -> None:
            while not self.closed:
                self.send({"type": "HEARTBEAT"})
                await asyncio.sleep(interval)

        self._heartbeat = asyncio.get_running_loop().create_task(beat())

    def _mark_closed(self) -> None:
        self.closed = True
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        if self._on_closed is not None:
            callback, self._on_closed = self._on_closed, None
            callback(self)

    # ------------------------------------------------------------ HTTP side
    def response(self) -> StreamResponse:
        headers = {
            "Content-Type": "application/json",
            "Mesos-Stream-Id": self.stream_id,
            "Cache-Control": "no-cache",
        }
        return StreamResponse(200, headers, self._produce)

    async def _produce(self, send: ChunkSender, peer_closed: asyncio.Event) -> None:
        closed_waiter = asyncio.ensure_future(peer_closed.wait())
        try:
            while True:
                getter = asyncio.ensure_future(self._queue.get())
                done, _ = await asyncio.wait({getter, closed_waiter}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    return
                item = getter.result()
                if item == _END:
                    return
                if item == _ABORT:
                    raise ConnectionAbortedError("stream dropped by fault hook")
                await self._write(send, item)
        finally:
            closed_waiter.cancel()
            with contextlib.suppress(BaseException):
                await closed_waiter
            self._mark_closed()

    async def _write(self, send: ChunkSender, record: bytes) -> None:
        if not self.chunk_size:
            await send(record)
            return
        for start in range(0, len(record), self.chunk_size):
            await send(record[start : start + self.chunk_size])
