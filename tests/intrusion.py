"""Attempts on a cluster from outside it, shared by the isolation tests of both backends.

Each helper asserts that the attempt fails, for the right reason, and leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import gc
import socket
import ssl
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
