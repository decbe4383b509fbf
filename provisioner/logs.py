"""Structured logging: every line about a cluster carries ``tenant=`` and ``cluster=``.

Lines are logfmt-friendly (``key=value`` pairs after the message), so an operator can grep or
ship them by tenant or cluster without parsing prose.
"""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from typing import Any

FORMAT = "%(asctime)s level=%(levelname)s logger=%(name)s %(message)s"


class ClusterLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """A logger bound to one cluster of one tenant."""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        extra = self.extra or {}
        return f"{msg} tenant={extra.get('tenant')} cluster={extra.get('cluster')}", kwargs


def cluster_log(logger: logging.Logger, tenant: str, cluster_id: str) -> ClusterLog:
    return ClusterLog(logger, {"tenant": tenant, "cluster": cluster_id})


def configure(level: str) -> None:
    logging.basicConfig(level=level.upper(), format=FORMAT)
    # One line per Mesos call or SDK request is noise at INFO.
    for chatty in ("httpx", "httpcore"):
        logging.getLogger(chatty).setLevel(max(logging.WARNING, logging.getLogger().level))
