"""Collect Dask's config again in a process that imported Dask before its environment was final.

A forked cluster process inherits the fork server's Dask config, read from the fork server's
environment. Once it has its own environment (and, after confinement, the tenant's), it reads
the config files and ``DASK_*`` variables again, and sets logging up again if that changed.
"""

from __future__ import annotations

import importlib
import logging
import os
from typing import Any

import dask.config


def _logging_settings() -> tuple[Any, ...]:
    keys = ("logging", "logging-file-config", "distributed.logging", "distributed.admin.log-format")
    return tuple(dask.config.get(key, None) for key in keys)


def _reset_logging() -> None:
    """Configure logging again as ``import distributed`` does, from the config now in force."""
    distributed_config = importlib.import_module("distributed.config")  # the package's .config is a dict
    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        if isinstance(logger, logging.Logger):
            logger.handlers.clear()
            logger.setLevel(logging.NOTSET if logger.name != "root" else logging.WARNING)
            logger.propagate = True
    distributed_config.initialize_logging(dask.config.config)


def reload_config() -> None:
    """Collect Dask's config again from the files and DASK_* variables of this environment."""
    logging_before = _logging_settings()
    get_paths = getattr(dask.config, "_get_paths", None)
    paths = get_paths() if get_paths is not None else list(dask.config.paths)
    dask.config.paths = paths
    dask.config.PATH = os.environ.get(
        "DASK_CONFIG", os.path.join(os.path.expanduser("~"), ".config", "dask")
    )
    dask.config.refresh(paths=paths)
    if _logging_settings() != logging_before:
        _reset_logging()
