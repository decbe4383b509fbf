"""How the local backend confines its cluster processes: the layers, the plans, the cgroups.

At start-up :meth:`Confinement.choose` asks the machine what it can do
(:func:`clusters.sandbox.support`) and settles the layers: all of them when it can, refused
outright with ``sandbox=True`` when it cannot, the possible ones with a loud warning for each
missing one when left to ``auto``. Then, per process, :meth:`Confinement.plan` makes its
cgroup (with limits from what its tenant's quota is charged) and describes what the process
applies to itself before anything else (:func:`clusters.sandbox.confine`).

Each tenant runs under a uid of its own, allocated once from ``uid_base`` and kept in the
backend's state in the service's database, so a uid never passes from one tenant to another.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clusters import cgroups
from clusters.base import LaunchError
from clusters.sandbox import HOME_INSIDE, Support
from clusters.sandbox import support as sandbox_support

logger = logging.getLogger("provisioner.local")

#: Tasks (processes and threads) one scheduler or worker may have.
PROCESS_TASKS = 1024
#: The smallest memory a process's cgroup is given, whatever it was charged.
MIN_MEMORY = 64 * 2**20


@dataclass(frozen=True, slots=True)
class Layers:
    """The layers in force: cgroups, a private root with the tenant's own uid, Landlock."""

    cgroups: bool = False
    private_root: bool = False
    landlock: bool = False

    @property
    def any(self) -> bool:
        return self.cgroups or self.private_root or self.landlock


class Confinement:
    def __init__(self, data_dir: Path, owner: str, mode: bool | None,
                 hidden: list[Path] | None = None, uid_base: int = 1_700_000_000) -> None:
        """``mode``: True requires every layer, None uses what the machine has (warning for
        the rest), False confines nothing. ``hidden``: files of the service's outside its
        data folder that no cluster process may see (its state file, its tenants file)."""
        self.data_dir = data_dir
        self.mode = mode
        self.hidden = [data_dir, *(hidden or [])]
        self.uid_base = uid_base
        self.layers = Layers()
        self.uids: dict[str, int] = {}
        self.tree: cgroups.Cgroups | None = None
        self.cgroup_root = f"dask-provisioner/{owner}"

    def choose(self, found: Support | None = None) -> Layers:
        """Settle the layers for this machine (blocking: probes the kernel)."""
        if self.mode is False:
            logger.warning("WARNING: cluster processes run unconfined (local_sandbox=off): a "
                           "tenant's code runs as this service's user with its rights")
            return self.layers
        found = found or sandbox_support()
        missing = found.missing()
        if self.mode is True and missing:
            raise LaunchError("cluster processes cannot be confined here: " + "; ".join(missing))
        for gap in missing:
            logger.warning("WARNING: cluster processes run without %s", gap)
        self.layers = Layers(cgroups=found.cgroups_missing is None,
                             private_root=found.private_root_missing is None,
                             landlock=found.landlock_abi >= 1)
        if self.layers.cgroups:
            self.tree = cgroups.detect(self.cgroup_root)
        return self.layers

    # -- per tenant and per cluster ---------------------------------------------------------

    def uid_for(self, tenant: str) -> int:
        """The tenant's uid (and gid), allocated on first use; see :meth:`state`."""
        uid = self.uids.get(tenant)
        if uid is None:
            uid = self.uids[tenant] = max(self.uids.values(), default=self.uid_base) + 1
        return uid

    def state(self) -> dict[str, Any]:
        return {"uids": dict(self.uids)}

    def load(self, state: dict[str, Any] | None) -> None:
        uids = (state or {}).get("uids") or {}
        self.uids = {str(t): int(u) for t, u in uids.items()}

    def home(self, directory: Path) -> str:
        """A cluster folder's path as its processes see it."""
        return HOME_INSIDE if self.layers.private_root else str(directory)

    def prepare(self, directory: Path, tenant: str) -> None:
        """Make the cluster's folder its tenant's alone (blocking)."""
        directory.mkdir(parents=True, exist_ok=True)
        if self.layers.private_root:
            uid = self.uid_for(tenant)
            os.chown(directory, uid, uid)
            os.chmod(directory, 0o700)

    def plan(self, cluster_id: str, process: str, directory: Path, tenant: str,
             memory: int, cores: float) -> dict[str, Any]:
        """Make the process's cgroup and return what it applies to itself (blocking)."""
        plan: dict[str, Any] = {}
        if self.tree is not None:
            memory = max(memory, MIN_MEMORY)
            self.tree.create([cluster_id, process],
                             cgroups.Limits(memory=memory, cpus=cores, pids=PROCESS_TASKS))
            plan["cgroup"] = sorted({str(self.tree.where(c, [cluster_id, process]) / "cgroup.procs")
                                     for c in cgroups.V1_CONTROLLERS})
        if self.layers.private_root:
            uid = self.uid_for(tenant)
            plan["user"] = {"uid": uid, "gid": uid}
            # Files on these memory file systems count against the process's memory; half of
            # it each leaves room for the process itself to report the full disk, not die.
            plan["root"] = {"home": str(directory), "hidden": [str(p) for p in self.hidden],
                            "shm_bytes": memory // 2, "tmp_bytes": memory // 2}
        elif self.layers.landlock:
            plan["landlock"] = {"writable": [str(directory)], "hidden": str(self.data_dir)}
        return plan

    # -- finding and ending processes -----------------------------------------------------------

    def oom_killed(self, cluster_id: str, process: str) -> bool:
        """Whether the kernel killed that process for memory (blocking)."""
        if self.tree is None:
            return False
        try:
            return self.tree.oom_kills([cluster_id, process]) > 0
        except (OSError, ValueError):
            return False

    def end(self, cluster_id: str, process: str | None = None) -> None:
        """Kill everything in a cluster's (or one process's) cgroup, then remove it; blocking."""
        if self.tree is None:
            return
        path = [cluster_id] if process is None else [cluster_id, process]
        try:
            self.tree.remove(path)
        except OSError as exc:
            logger.warning("could not empty cgroup %s: %s", "/".join(path), exc)

    def clusters_with_cgroups(self) -> list[str]:
        return self.tree.children() if self.tree is not None else []

    def pids_of(self, cluster_id: str) -> set[int]:
        return self.tree.pids([cluster_id]) if self.tree is not None else set()

    async def end_async(self, cluster_id: str, process: str | None = None) -> None:
        await asyncio.to_thread(self.end, cluster_id, process)

    def processes_of(self, cluster_id: str) -> list[str]:
        """Names of the cluster's process cgroups (its scheduler, its workers)."""
        return self.tree.children([cluster_id]) if self.tree is not None else []
