"""Where the leading Mesos master is: a fixed ``host:port`` or a ZooKeeper election.

With ``zk://hosts/path`` every master contender holds an ephemeral sequential node
``json.info_<seq>`` under ``path`` whose content is its MasterInfo as JSON; the lowest
sequence number is the leader. kazoo is blocking, so its calls run in a worker thread.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any
from urllib.parse import urlsplit

logger = logging.getLogger("provisioner.mesos.detector")

INFO_PREFIX = "json.info_"


class DetectorError(Exception):
    """No leader can be found right now (retry later)."""


def normalise(address: str) -> str:
    """``host:port`` or ``http(s)://host:port`` -> base URL without a trailing slash."""
    address = address.strip().rstrip("/")
    if "://" not in address:
        address = f"http://{address}"
    parts = urlsplit(address)
    if parts.port is None:
        address = f"{parts.scheme}://{parts.hostname}:5050"
    return address


def leader_from_children(children: list[str]) -> str | None:
    """The leader's node name among a Mesos ZK path's children (lowest sequence)."""
    infos = [c for c in children if c.startswith(INFO_PREFIX)]
    if not infos:
        return None
    return min(infos, key=lambda c: int(c[len(INFO_PREFIX):] or 0))


def address_from_info(data: bytes) -> str:
    """``host:port`` from a MasterInfo JSON node: ``address.ip`` (always usable), else a
    hostname."""
    info: dict[str, Any] = json.loads(data)
    address = info.get("address") or {}
    port = address.get("port") or info.get("port") or 5050
    host = address.get("ip") or address.get("hostname") or info.get("hostname")
    if not host:
        raise DetectorError("master info has no address")
    return f"{host}:{port}"


class Detector:
    """Answers ``leader()`` with the base URL of the current leading master."""

    def __init__(self, master: str, zk_timeout: float = 10.0) -> None:
        self.master = master
        self.zk_timeout = zk_timeout
        self._zk: Any = None
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
        return normalise(await asyncio.to_thread(self._zk_leader))

    def _zk_leader(self) -> str:
        from kazoo.client import KazooClient
        from kazoo.exceptions import NoNodeError

        try:
            if self._zk is None:
                self._zk = KazooClient(hosts=self._zk_hosts, timeout=self.zk_timeout,
                                       read_only=True)
                self._zk.start(timeout=self.zk_timeout)
            children = self._zk.get_children(self._zk_path)
            node = leader_from_children(children)
            if node is None:
                raise DetectorError(f"no master registered under {self._zk_path}")
            data, _ = self._zk.get(f"{self._zk_path}/{node}")
        except DetectorError:
            raise
        except NoNodeError as exc:
            raise DetectorError(f"no ZooKeeper node {self._zk_path}") from exc
        except Exception as exc:  # kazoo timeouts are not all KazooException
            self._close_zk()
            raise DetectorError(f"ZooKeeper: {exc!r}") from exc
        return address_from_info(data)

    def _close_zk(self) -> None:
        zk, self._zk = self._zk, None
        if zk is not None:
            try:
                zk.stop()
                zk.close()
            except Exception:  # best effort on a broken session
                logger.debug("closing ZooKeeper client failed", exc_info=True)

    async def close(self) -> None:
        if self._zk is not None:
            await asyncio.to_thread(self._close_zk)
