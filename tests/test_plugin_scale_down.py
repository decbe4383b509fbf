"""Scale-down questions to a real scheduler's plugin, in one process: an adaptive scale-down asks
which workers Dask would let go now, so a worker holding the only copy of a result a client
still holds is never among them; an explicit scale-down gets the n best whatever they hold."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from distributed import Client, Scheduler, Worker

from clusters.plugin import ProvisionerPlugin
from provisioner.watch import SchedulerLink


@contextlib.asynccontextmanager
async def scheduler_with_plugin() -> AsyncIterator[Scheduler]:
    """In the test's own loop (a fixture's loop would sit still while the test runs)."""
    s = Scheduler(host="127.0.0.1", port=0, dashboard_address="127.0.0.1:0")
    s.add_plugin(ProvisionerPlugin())
    async with s:
        yield s


async def test_an_idle_only_question_spares_a_worker_holding_a_result() -> None:
    async with scheduler_with_plugin() as scheduler:
        link = await SchedulerLink.open(f"http://127.0.0.1:{scheduler.http_server.port}")
        try:
            async with Worker(scheduler.address, name="w-data", nthreads=1) as worker, \
                    Worker(scheduler.address, name="w-empty", nthreads=1), \
                    Client(scheduler.address, asynchronous=True) as client:
                held = client.submit(sum, [1, 2], workers=[worker.address])
                assert await held == 3
                # Asked for both: by Dask's own rules the empty worker may go, the one holding
                # the only copy of a result its client still holds may not.
                assert await link.workers_to_close(2, idle_only=True) == ["w-empty"]
                assert sorted(await link.workers_to_close(2)) == ["w-data", "w-empty"]
                assert await link.workers_to_close(0, idle_only=True) == []
                del held
        finally:
            await link.close()
