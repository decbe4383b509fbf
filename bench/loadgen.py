"""A small HTTP/1.1 keep-alive load generator on asyncio, lean enough not to be the bottleneck.

General clients spend more CPU per request than the service under test; on a 2-core machine
that would measure the client. This one writes prepared requests on persistent connections
and reads ``Content-Length`` bodies, nothing more.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Result:
    latencies: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    elapsed: float = 0.0

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.elapsed if self.elapsed else 0.0


def request(method: str, path: str, token: str, body: bytes = b"") -> bytes:
    head = [f"{method} {path} HTTP/1.1", "Host: bench", f"Authorization: Bearer {token}"]
    if body or method in ("POST", "PUT"):
        head += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    if length:
        await reader.readexactly(length)
    return status


async def run(host: str, port: int, make: Callable[[int], bytes], concurrency: int,
              duration: float | None = None, count: int | None = None) -> Result:
    """Send ``make(i)`` requests on ``concurrency`` connections for ``duration`` s or ``count`` requests."""
    result = Result()
    issued = 0
    start = time.perf_counter()
    deadline = start + duration if duration is not None else float("inf")

    def next_index() -> int | None:
        nonlocal issued
        if (count is not None and issued >= count) or time.perf_counter() >= deadline:
            return None
        issued += 1
        return issued - 1

    async def connection() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while (i := next_index()) is not None:
                t = time.perf_counter()
                writer.write(make(i))
                status = await _read_response(reader)
                result.latencies.append(time.perf_counter() - t)
                result.statuses[status] = result.statuses.get(status, 0) + 1
        finally:
            writer.close()

    await asyncio.gather(*(connection() for _ in range(concurrency)))
    result.elapsed = time.perf_counter() - start
    return result
