"""The service's log format (logfmt-friendly); cluster lines are tagged by ``cluster_log``."""

from __future__ import annotations

import logging

from clusters.logs import ClusterLog, cluster_log

__all__ = ["FORMAT", "ClusterLog", "cluster_log", "configure"]

FORMAT = "%(asctime)s level=%(levelname)s logger=%(name)s %(message)s"


def configure(level: str) -> None:
    logging.basicConfig(level=level.upper(), format=FORMAT)
    # One line per Mesos call or SDK request is noise at INFO.
    for chatty in ("httpx", "httpcore"):
        logging.getLogger(chatty).setLevel(max(logging.WARNING, logging.getLogger().level))
