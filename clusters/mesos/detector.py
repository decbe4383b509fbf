"""Where the leading Mesos master is: a fixed ``host:port`` or a ZooKeeper election.

With ``zk://hosts/path`` every master contender holds an ephemeral sequential node
``json.info_<seq>`` under ``path`` whose content is its MasterInfo as JSON; the lowest
sequence number is the leader. The detector keeps one ZooKeeper session, reconnecting with a
backoff capped at one second however long ZooKeeper was away, and a watch on the path: any
change of its children, and any reconnection, sets :attr:`Detector.changed` so the Mesos
client can look again at once instead of waiting for its stream to die. kazoo is blocking, so
its calls run in a worker thread, each bounded by a timeout.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import threading
from typing import Any
from urllib.parse import urlsplit

from distributed.comm.addressing import unparse_host_port

logger = logging.getLogger("provisioner.mesos.detector")

INFO_PREFIX = "json.info_"
#: Longest a MasterInfo node is read (they are a few hundred bytes).
MAX_INFO_BYTES = 64 * 1024
#: Most a reconnection to ZooKeeper waits between attempts, however long it was away.
RECONNECT_MAX_DELAY = 1.0


class DetectorError(Exception):
    """No leader can be found right now (retry later)."""


def normalise(address: str) -> str:
    """``host:port`` or ``http(s)://host:port`` -> base URL without a trailing slash."""
    address = address.strip().rstrip("/")
    if "://" not in address:
        address = f"http://{address}"
    parts = urlsplit(address)
    if parts.port is None:
        address = f"{parts.scheme}://{unparse_host_port(parts.hostname or '', 5050)}"
    return address


def leader_from_children(children: list[str]) -> str | None:
    """The leader's node name among a Mesos ZK path's children (lowest sequence); children
    whose suffix is not a number (``log_replicas``) are not contenders."""
    infos = [c for c in children if c.startswith(INFO_PREFIX) and c[len(INFO_PREFIX):].isdigit()]
    if not infos:
        return None
    return min(infos, key=lambda c: int(c[len(INFO_PREFIX):]))


def address_from_info(data: bytes) -> str:
    """``host:port`` from a MasterInfo JSON node: ``address.ip`` (always usable, IPv4 or
    IPv6 text), else a hostname. Anything else in the node is ignored."""
    if len(data) > MAX_INFO_BYTES:
        raise DetectorError(f"master info is over {MAX_INFO_BYTES} bytes")
    try:
        info = json.loads(data)
    except ValueError:
        raise DetectorError("master info is not JSON") from None
    if not isinstance(info, dict):
        raise DetectorError("master info is not a JSON object")
    found = info.get("address")
    address: dict[str, Any] = found if isinstance(found, dict) else {}
    port = address.get("port") or info.get("port") or 5050
    host = address.get("ip") or address.get("hostname") or info.get("hostname")
    if not isinstance(host, str) or not host or isinstance(port, bool) \
            or not isinstance(port, int) or not 0 < port < 65536:
        raise DetectorError("master info has no usable address")
    host = host.strip("[]")
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        pass  # a hostname
    return unparse_host_port(host, port)


class Detector:
    """Answers ``leader()`` with the base URL of the current leading master."""

    def __init__(self, master: str, zk_timeout: float = 10.0, call_timeout: float = 5.0) -> None:
        self.master = master
        self.zk_timeout = zk_timeout
        self.call_timeout = call_timeout
        #: Set (in the event loop) when the election may have changed; cleared by the reader.
        self.changed = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._zk: Any = None
        self._zk_lock = threading.Lock()
        self._connected = threading.Event()
        self._closed = False
        self._zk_path = ""
        if master.startswith("zk://"):
            rest = master[len("zk://"):]
            hosts, _, path = rest.partition("/")
            if "@" in hosts:  # credentials are not supported by plain kazoo digest here
                hosts = hosts.split("@", 1)[1]
            self._zk_hosts = hosts
            self._zk_path = "/" + path.strip("/") if path else "/mesos"

    @property
    def uses_zookeeper(self) -> bool:
        return self.master.startswith("zk://")

    async def leader(self) -> str:
        if not self.uses_zookeeper:
            return normalise(self.master)
        self._loop = asyncio.get_running_loop()
        return normalise(await asyncio.to_thread(self._zk_leader))

    # -- ZooKeeper (worker threads) -----------------------------------------------------------

    def _notify(self, *_: Any) -> None:
        """From kazoo's threads: tell the event loop to look again."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self.changed.set)

    def _on_state(self, state: str) -> None:
        if state == "CONNECTED":
            logger.info("ZooKeeper: connected")
            self._connected.set()
            self._notify()  # watches may have been missed while away
        else:
            self._connected.clear()
            logger.warning("ZooKeeper: %s", state.lower())

    def _client(self) -> Any:
        """The one session, started without waiting (it keeps reconnecting by itself)."""
        from kazoo.client import KazooClient
        from kazoo.retry import KazooRetry

        with self._zk_lock:
            if self._closed:
                raise DetectorError("the detector is closed")
            if self._zk is None:
                retry = {"max_tries": -1, "delay": 0.1, "backoff": 2,
                         "max_delay": RECONNECT_MAX_DELAY}
                self._zk = KazooClient(hosts=self._zk_hosts, timeout=self.zk_timeout,
                                       read_only=True, connection_retry=KazooRetry(**retry))
                self._zk.add_listener(self._on_state)
                self._zk.start_async()
            return self._zk

    def _zk_leader(self) -> str:
        from kazoo.exceptions import NoNodeError

        zk = self._client()
        # A lookup made while ZooKeeper is away waits for it (and goes on the moment it is
        # back) rather than queueing a request that may time out after the reconnection.
        if not self._connected.wait(self.call_timeout):
            raise DetectorError(f"ZooKeeper not connected ({zk.state.lower()})")
        try:
            children = zk.get_children_async(self._zk_path, watch=self._notify).get(
                timeout=self.call_timeout)
            node = leader_from_children(children)
            if node is None:
                raise DetectorError(f"no master registered under {self._zk_path}")
            data, _ = zk.get_async(f"{self._zk_path}/{node}").get(timeout=self.call_timeout)
        except DetectorError:
            raise
        except NoNodeError:
            raise DetectorError(f"no ZooKeeper node {self._zk_path}") from None
        except Exception as exc:  # kazoo's timeouts and connection losses
            raise DetectorError(f"ZooKeeper ({zk.state.lower()}): {exc!r}") from None
        return address_from_info(data)

    def _close_zk(self) -> None:
        with self._zk_lock:
            self._closed = True  # a lookup still running in a thread starts no new session
            zk, self._zk = self._zk, None
        if zk is not None:
            try:
                zk.stop()
                zk.close()
            except Exception:  # best effort on a broken session
                logger.debug("closing ZooKeeper client failed", exc_info=True)

    async def close(self) -> None:
        self._loop = None
        await asyncio.to_thread(self._close_zk)
