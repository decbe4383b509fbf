"""Ready-made pytest fixtures; enable with `pytest_plugins = ["tests.mesos_master.pytest_plugin"]`.

`mesos_master_process` is a subprocess master with test-friendly intervals (a fresh one per
test, always stopped, task processes included); `mesos_master_factory` builds custom ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from .process import MesosMasterProcess

FAST = {"heartbeat": 1.0, "allocation_interval": 0.2, "retry_interval": 0.5, "retry_max": 2.0}


@pytest.fixture
def mesos_master_factory() -> Iterator[Callable[..., MesosMasterProcess]]:
    started: list[MesosMasterProcess] = []

    def make(**kwargs: Any) -> MesosMasterProcess:
        proc = MesosMasterProcess(**{**FAST, **kwargs})
        started.append(proc)
        return proc.start()

    yield make
    for proc in reversed(started):
        proc.stop()


@pytest.fixture
def mesos_master_process(mesos_master_factory: Callable[..., MesosMasterProcess]) -> MesosMasterProcess:
    return mesos_master_factory(agents=2)
