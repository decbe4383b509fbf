"""Structured logging: every line about a cluster carries ``tenant=`` and ``cluster=``.

Lines are logfmt-friendly (``key=value`` pairs after the message), so an operator can grep or
ship them by tenant or cluster without parsing prose. It lives with the backends, the lowest
layer, so they and the core tag their lines the same way.
"""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from typing import Any


class ClusterLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """A logger bound to one cluster of one tenant."""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        extra = self.extra or {}
        return f"{msg} tenant={extra.get('tenant')} cluster={extra.get('cluster')}", kwargs


def cluster_log(logger: logging.Logger, tenant: str, cluster_id: str) -> ClusterLog:
    return ClusterLog(logger, {"tenant": tenant, "cluster": cluster_id})
