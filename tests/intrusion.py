"""Attempts on a cluster from outside it, shared by the isolation tests of both backends.

Each helper asserts that the attempt fails, for the right reason, and leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import gc
import socket
import ssl
import time
from pathlib import Path
from typing import Any

import pytest
from distributed import Client, Worker
from distributed.security import Security


def client_refused(address: str, errors: tuple[type[BaseException], ...] = (OSError,),
                   **kwargs: Any) -> None:
    """A Client to ``address`` cannot connect. The failed Client is finalised at once: left
    to the cyclic garbage collector, its ``__del__`` may run inside distributed's class-wide
    LoopRunner lock while the next Client starts, and deadlock."""
    with pytest.raises(errors):
        Client(address, timeout=3, **kwargs)
    gc.collect()


def tls_without_client_certificate_refused(address: str, ca_pem: str) -> None:
    """Below distributed: a TLS handshake that trusts the cluster's CA but shows no client
    certificate is rejected by the scheduler."""
    host, port = address.removeprefix("tls://").rsplit(":", 1)
    context = ssl.create_default_context(cadata=ca_pem)
    context.check_hostname = False
    with pytest.raises((ssl.SSLError, OSError)):
        with socket.create_connection((host, int(port)), timeout=5) as raw:
            with context.wrap_socket(raw) as tls:
                tls.sendall(b"hello")
                assert tls.recv(1) != b""  # the server closes: no client certificate


def security_of(credentials: dict[str, str]) -> Security:
    """Everything a holder of a cluster's credentials could present, in every role."""
    return Security(
        tls_ca_file=credentials["tls_ca"], require_encryption=True,
        **{f"tls_{role}_{part}": credentials[f"tls_{part}"]
           for role in ("worker", "client", "scheduler") for part in ("cert", "key")},
    )


def worker_cannot_join(address: str, credentials: dict[str, str]) -> None:
    """A worker named ``intruder`` holding another cluster's credentials cannot join."""

    async def join() -> None:
        worker = Worker(address, security=security_of(credentials), nthreads=1,
                        death_timeout=3, name="intruder")
        try:
            await worker
        finally:
            await worker.close()

    with pytest.raises((OSError, TimeoutError, RuntimeError)) as info:
        asyncio.run(join())
    chain: list[BaseException] = []
    exc: BaseException | None = info.value
    while exc is not None:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    assert any(isinstance(e, (OSError, TimeoutError)) for e in chain), chain


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def poisoned_reports_are_harmless(svc: Any, name: str, cluster: dict[str, Any],
                                  canary: Path) -> None:
    """From the tenant's own scheduler, answer the service's report long-polls with a pickle,
    Dask's pickled frames, wrong types, a forged log line, a flood of workers and 64 MiB:
    nothing runs in the service, it buffers none of it, its record and log stay sane, and the
    cluster still computes."""
    import cloudpickle

    from tests import hostile
    from tests.service import MiB, wait_until

    cloudpickle.register_pickle_by_value(hostile)  # Mesos agents cannot import the tests
    assert svc.proc is not None
    answers = hostile.poisoned_answers(str(canary))
    rss_before = _rss(svc.proc.pid)
    with Client(cluster["scheduler_address"], security=svc.security(name, cluster["id"]),
                timeout=30) as client:
        client.wait_for_workers(1, timeout=60)
        for label, body in answers.items():
            seen = client.run_on_scheduler(hostile.answers_poisoned)
            client.run_on_scheduler(hostile.poison_reports, body)
            # A change of state ends the poll in flight; the next one gets the poison.
            client.submit(time.sleep, 0.3, pure=False).result(timeout=30)
            wait_until(lambda s=seen: client.run_on_scheduler(hostile.answers_poisoned) > s,
                       timeout=60, what=f"the service to read the {label} answer")
            assert not canary.exists(), f"the service ran the tenant's code ({label})"
            with svc.client(name) as http:
                assert http.get("/healthz").status_code == 200
                record = http.get(f"/clusters/{cluster['id']}").json()
            assert record["status"] == "running", (label, record)
            assert record["workers"]["running"] in (0, 1), (label, record)
        assert client.submit(sum, [1, 2]).result(timeout=30) == 3  # still the tenant's own
    assert not canary.exists()
    grown = _rss(svc.proc.pid) - rss_before
    assert grown < 48 * MiB, f"the service buffered a tenant's answer: RSS grew {grown} bytes"
    forged = [x for x in svc.log.read_text().splitlines() if x.startswith("2026-01-01")]
    assert not forged, "a tenant forged a line of the service's log"
