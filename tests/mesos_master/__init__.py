"""A Mesos master (with simulated agents) for tests, speaking the real v1 scheduler HTTP API.

`MesosMaster` runs in the caller's event loop; `MesosMasterProcess` runs the CLI
(`python -m tests.mesos_master`) in a subprocess for services tested out of process.
"""

from .model import AgentSpec
from .process import MesosMasterProcess
from .server import MesosMaster

__all__ = ["AgentSpec", "MesosMaster", "MesosMasterProcess"]
