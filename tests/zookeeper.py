"""A throwaway ZooKeeper server for the Mesos leader-election tests, from Debian's package.

It runs Debian's ``zookeeper`` (3.8) through its Java main class, without systemd, on a free
loopback port with its data in a temporary folder, and can be stopped and started again on the
same port and data (a ZooKeeper restart or outage). Masters are announced the way Mesos
masters do it: an ephemeral sequential ``json.info_`` node holding MasterInfo JSON, each in its
own session, so that ending a session is a master's crash.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

JARS = ("/usr/share/java/zookeeper.jar",)
CONF = "/etc/zookeeper/conf"  # its log4j settings
MAIN = "org.apache.zookeeper.server.quorum.QuorumPeerMain"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ZooKeeperServer:
    def __init__(self) -> None:
        missing = [p for p in (*JARS, shutil.which("java") or "java") if not os.path.exists(p)]
        if missing:
            raise RuntimeError(f"ZooKeeper not installed ({', '.join(missing)} missing): install "
                               "Debian's 'zookeeper' package (scripts/test does this as root)")
        self.root = Path(tempfile.mkdtemp(prefix="provisioner-zk-"))
        self.port = _free_port()
        (self.root / "data").mkdir()
        (self.root / "zoo.cfg").write_text(
            "tickTime=200\n"  # sessions may be as short as 2 ticks: fast expiry in tests
            "minSessionTimeout=400\n"
            f"dataDir={self.root / 'data'}\n"
            f"clientPort={self.port}\nclientPortAddress=127.0.0.1\n"
            "admin.enableServer=false\n4lw.commands.whitelist=ruok\n")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def hosts(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> ZooKeeperServer:
        log = open(self.root / "server.log", "ab")
        self.process = subprocess.Popen(
            ["java", "-Xmx256m", "-cp", ":".join((CONF, *JARS)), MAIN, str(self.root / "zoo.cfg")],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ZooKeeper exited: {(self.root / 'server.log').read_text()[-2000:]}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 1) as s:
                s.sendall(b"ruok")
                if s.recv(4) == b"imok":
                    return self
            time.sleep(0.1)
        raise RuntimeError(f"ZooKeeper not up after {timeout}s")

    def stop(self) -> None:
        """Kill the server (its data stays, for a restart)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)
        self.process = None

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def master_info(address: str, port: int, hostname: str = "localhost") -> bytes:
    """MasterInfo as a Mesos master writes it (``include/mesos/mesos.proto``)."""
    return json.dumps({
        "id": f"master-{port}", "ip": 16777343, "port": port, "pid": f"master@{address}:{port}",
        "hostname": hostname, "version": "1.11.0",
        "address": {"hostname": hostname, "ip": address, "port": port},
    }).encode()


class Contender:
    """One master's candidacy: a process with its own ZooKeeper session holding its
    ``json.info_`` node. ``withdraw()`` ends it cleanly (the node goes at once), ``crash()``
    kills it (the node goes when its session expires), ``hang()`` stops it (likewise)."""

    def __init__(self, zk: ZooKeeperServer, path: str, address: str, port: int,
                 session_timeout: float = 2.0) -> None:
        self.hosts = zk.hosts
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.zookeeper", zk.hosts, path, address, str(port),
             str(session_timeout)],
            stdout=subprocess.PIPE, cwd=Path(__file__).parent.parent, start_new_session=True)
        assert self.process.stdout is not None
        line = self.process.stdout.readline().decode().strip()
        if not line.startswith(path + "/json.info_"):
            self.process.kill()
            raise RuntimeError(f"contender did not announce itself: {line!r}")
        self.node = line

    def withdraw(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(15)

    def crash(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(15)

    def hang(self) -> None:
        os.kill(self.process.pid, signal.SIGSTOP)

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.process.pid, signal.SIGCONT)
        self.crash()


def _contend(hosts: str, path: str, address: str, port: str, session_timeout: str) -> None:
    from kazoo.client import KazooClient
    from kazoo.retry import KazooRetry

    client = KazooClient(hosts=hosts, timeout=float(session_timeout),
                         connection_retry=KazooRetry(max_tries=-1, delay=0.1, max_delay=0.5))
    client.start(timeout=15)
    client.ensure_path(path)
    node = client.create(f"{path}/json.info_", master_info(address, int(port)),
                         ephemeral=True, sequence=True)
    print(node, flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    done.wait()
    client.stop()
    client.close()


if __name__ == "__main__":
    _contend(*sys.argv[1:6])
