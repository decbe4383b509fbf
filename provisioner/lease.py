"""One service at a time: the lease a service holds before it touches its database or clusters.

Two services on one state database (or one data folder) would each adopt, reap and stop the
other's clusters. So ``serve`` takes a lease before anything with a side effect: an
exclusive ``flock`` on ``<data_dir>/service.lock`` (the local backend's cluster folders and
an SQLite file live there; an SQLite file elsewhere gets its own ``<file>.lock``) and, on
PostgreSQL, a session advisory lock held on a connection of its own. A second service either
refuses at once, naming the holder, or (``--standby``) waits and takes over when the holder
dies: the kernel drops a dead process's ``flock`` and PostgreSQL the advisory lock of a closed
session, so no stale lease outlives its holder.

Both locks belong to this process alone: the fork server and spawned cluster processes are
started by ``posix_spawn`` and never inherit the lock file (it is close-on-exec), so a
cluster that outlives the service never holds its lease.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa

logger = logging.getLogger("provisioner.lease")

LOCK_FILE = "service.lock"
#: The advisory lock key every dask-provisioner service takes on its PostgreSQL database.
ADVISORY_KEY = 0x6461736B70726F76  # "daskprov"
#: What a holder's lock file or session says about it, at most this long.
HOLDER_BYTES = 200
#: Seconds between a standby's attempts, and between the holder's checks of its session.
RETRY = 0.5
CHECK = 2.0


class LeaseHeld(Exception):
    """Another service holds the lease; the message names it and what to do."""


def holder_text() -> str:
    return f"dask-provisioner pid {os.getpid()} on {socket.gethostname()}"[:HOLDER_BYTES]


class FileLease:
    """An exclusive ``flock`` on a lock file; the file says who holds it (for the message)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def try_acquire(self) -> str | None:
        """Take the lock; None when taken, else who holds it."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot open the lock file {self.path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                held_by = os.pread(fd, HOLDER_BYTES, 0).decode(errors="replace").strip()
            finally:
                os.close(fd)
            return held_by or "another process"
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder_text().encode() + b"\n", 0)
        self._fd = fd
        return None

    def alive(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing the last descriptor drops the lock
            self._fd = None


class PostgresLease:
    """A session advisory lock on a connection kept for as long as the lease is held."""

    def __init__(self, url: str) -> None:
        # Its own engine without a pool: the lease is one session, never shared or recycled.
        self.engine = sa.create_engine(
            url, poolclass=sa.NullPool,
            connect_args={"application_name": holder_text()[:63], "connect_timeout": 10,
                          # a holder whose host vanished is noticed by the server in ~30 s
                          "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5,
                          "keepalives_count": 3},
        )
        self._conn: sa.Connection | None = None

    def try_acquire(self) -> str | None:
        conn = self.engine.connect()
        try:
            got = conn.execute(sa.text("SELECT pg_try_advisory_lock(:k)"), {"k": ADVISORY_KEY}).scalar()
            conn.commit()
            if got:
                self._conn = conn
                return None
            held_by = conn.execute(sa.text(
                "SELECT a.application_name, a.client_addr FROM pg_locks l "
                "JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' "
                "AND l.granted AND l.objid = (:k & 4294967295) AND l.classid = (:k >> 32)"),
                {"k": ADVISORY_KEY}).first()
            conn.commit()
        except BaseException:
            conn.close()
            raise
        conn.close()
        if held_by is None:
            return "another session"
        name, addr = held_by
        return f"{name or 'a session'}{f' from {addr}' if addr else ''}"[:HOLDER_BYTES]

    def alive(self) -> bool:
        """Whether the session holding the lock is still there (a lost session lost the lock)."""
        if self._conn is None:
            return False
        try:
            self._conn.execute(sa.text("SELECT 1")).scalar()
            self._conn.commit()
        except Exception:
            return False
        return True

    def release(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()  # ending the session drops the lock
            self._conn = None
        self.engine.dispose()


class Lease:
    """Every lock one service needs, taken in one order (so two standbys never deadlock)."""

    def __init__(self, data_dir: Path, sqlite_file: Path | None = None,
                 postgresql_url: str | None = None) -> None:
        files = [data_dir / LOCK_FILE]
        if sqlite_file is not None and sqlite_file.resolve().parent != data_dir.resolve():
            files.append(sqlite_file.with_name(sqlite_file.name + ".lock"))
        self.parts: list[FileLease | PostgresLease] = [FileLease(p) for p in files]
        if postgresql_url is not None:
            self.parts.append(PostgresLease(postgresql_url))
        self._watch: threading.Thread | None = None
        self._stop = threading.Event()

    def acquire(self, wait: bool = False, on_wait: Callable[[str], Any] | None = None) -> None:
        """Take every part; held elsewhere: raise :class:`LeaseHeld`, or with ``wait`` retry
        until the holder is gone (``on_wait`` is told who holds it, once)."""
        told = False
        for part in self.parts:
            while (held_by := part.try_acquire()) is not None:
                if not wait:
                    self.release()
                    raise LeaseHeld(
                        f"another service is running on this state: {held_by} holds the lease. "
                        "Stop it first, or start this one with --standby to take over when it stops")
                if on_wait and not told:
                    on_wait(held_by)
                    told = True
                time.sleep(RETRY)

    def watch(self, on_lost: Callable[[], Any]) -> None:
        """Check the lease every few seconds in a thread; call ``on_lost`` once if it is lost
        (a PostgreSQL session that ended: another service may already hold it)."""
        def run() -> None:
            while not self._stop.wait(CHECK):
                if not all(part.alive() for part in self.parts):
                    on_lost()
                    return

        self._watch = threading.Thread(target=run, name="lease-watch", daemon=True)
        self._watch.start()

    def release(self) -> None:
        self._stop.set()
        for part in reversed(self.parts):
            part.release()
