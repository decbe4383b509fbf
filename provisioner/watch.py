"""Talk to a running cluster's scheduler: long-poll its plugin, retire workers.

Backend-agnostic: anything with a scheduler address (and the cluster's TLS credentials)
is observed and scaled down the same way.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from distributed.core import rpc

from clusters.runner import security_from

logger = logging.getLogger("provisioner.watch")


class SchedulerLink:
    """One RPC handle to a cluster's scheduler."""

    def __init__(self, address: str, connection_args: dict[str, Any]) -> None:
        self._rpc = rpc(address, connection_args=connection_args, timeout=10)

    @classmethod
    async def open(cls, address: str, credentials: dict[str, str] | None = None) -> SchedulerLink:
        """A link using the cluster's TLS credentials. Dask writes them to files and loads
        them into an SSL context: blocking work, done off the event loop."""
        security = security_from(credentials)
        args = await asyncio.to_thread(security.get_connection_args, "client") if security else {}
        return cls(address, args)

    async def close(self) -> None:
        await self._rpc.close_rpc()

    async def report(self, version: int, timeout: float) -> dict[str, Any]:
        return await self._rpc.provisioner_report(version=version, timeout=timeout)

    async def workers_to_close(self, n: int) -> list[str]:
        names = await self._rpc.workers_to_close(n=n, attribute="name")
        return [str(x) for x in names]

    async def retire(self, names: list[str]) -> None:
        """Retire gracefully: their data moves to other workers first, then they close."""
        await self._rpc.retire_workers(names=names, close_workers=True, remove=True)


async def follow(
    link: SchedulerLink, on_report: Callable[[dict[str, Any]], Awaitable[None]],
    hold: float,
) -> None:
    """Feed every state change of the cluster to ``on_report`` until cancelled."""
    version = -1
    delay = 0.1
    while True:
        try:
            report = await link.report(version, hold)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # scheduler restarting, unreachable, closing
            logger.debug("report failed: %r", exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5)
            continue
        delay = 0.1
        version = report["version"]
        await on_report(report)
