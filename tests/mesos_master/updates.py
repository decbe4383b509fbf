"""The agent's per-task status update stream: ordered, acknowledged, retried.

Mesos forwards only the oldest unacknowledged update of a task and re-sends it with
exponential backoff until the scheduler ACKNOWLEDGEs its uuid; newer updates wait behind
it.  Clients that forget to acknowledge therefore see STARTING again and never RUNNING,
which is exactly what a test double must reproduce.
"""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

TERMINAL_STATES = frozenset(
    {
        "TASK_FINISHED",
        "TASK_FAILED",
        "TASK_KILLED",
        "TASK_ERROR",
        "TASK_DROPPED",
        "TASK_GONE",
        "TASK_LOST",
        "TASK_GONE_BY_OPERATOR",
    }
)


def new_uuid() -> str:
    """A fresh status uuid, base64 as it appears in JSON."""
    return base64.b64encode(uuid.uuid4().bytes).decode()


class StatusUpdateStream:
    """Queue of one task's agent-generated updates; `forward` hands one to the master."""

    def __init__(
        self,
        forward: Callable[[dict[str, Any]], None],
        retry_interval: float,
        retry_max: float = 600.0,
    ) -> None:
        self._forward = forward
        self._retry_interval = retry_interval
        self._retry_max = max(retry_max, retry_interval)
        self._pending: deque[dict[str, Any]] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._backoff = retry_interval
        self.terminal_acknowledged = False
        self.closed = False

    def add(self, status: dict[str, Any]) -> None:
        """Queue an update (it must carry a uuid); send it now if nothing is pending."""
        if self.closed:
            return
        self._pending.append(status)
        if len(self._pending) == 1:
            self._backoff = self._retry_interval
            self._send()

    def acknowledge(self, uuid_b64: str) -> dict[str, Any] | None:
        """Release the head update if `uuid_b64` is its uuid; returns the acked status."""
        if not self._pending or self._pending[0]["uuid"] != uuid_b64:
            return None
        acked = self._pending.popleft()
        self._cancel()
        if acked["state"] in TERMINAL_STATES:
            self.terminal_acknowledged = True
        if self._pending:
            self._backoff = self._retry_interval
            self._send()
        return acked

    def close(self) -> None:
        self.closed = True
        self._cancel()
        self._pending.clear()

    @property
    def pending(self) -> int:
        return len(self._pending)

    def _send(self) -> None:
        head = self._pending[0]
        head = dict(head, timestamp=head.get("timestamp", time.time()))
        self._forward(head)
        self._cancel()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._backoff, self._retry)

    def _retry(self) -> None:
        self._timer = None
        if self.closed or not self._pending:
            return
        self._backoff = min(self._backoff * 2, self._retry_max)
        self._send()

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
