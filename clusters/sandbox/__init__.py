"""Confine a local cluster process before anything a tenant influences runs or is read in it.

Local clusters run tenants' code on the service's own machine, whose user is often root.
A process confines itself, in layers, as the first thing it does (before it reads its
tenant's environment, Dask's config or any file a tenant could have written):

1. its cgroup (:mod:`clusters.cgroups`): memory (children and shared memory included),
   tasks and CPU limits, and the handle by which the service finds and kills all of it;
2. a private root (:mod:`clusters.sandbox.mounts`): the service's data folder, state file
   and tenants file are not there at all, nor block devices, other processes, or other
   clusters' shared memory, temporary files and UNIX sockets;
3. its tenant's own uid and gid, no capabilities, no new privileges
   (:mod:`clusters.sandbox.identity`);
4. Landlock (:mod:`clusters.sandbox.landlock`): writes only to its own folders, TCP bind only
   to ephemeral ports, no signals to or inspection of processes outside its own domain.

The service builds the plan (``options["sandbox"]``, see :func:`confine`) from what
:func:`support` says this machine can do; a process asked for a layer it cannot apply
refuses to run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from clusters.sandbox.landlock import landlock_abi, restrict
from clusters.sandbox.mounts import HOME_INSIDE, enter_private_root
from clusters.sandbox.syscalls import ConfinementError

__all__ = ["HOME_INSIDE", "ConfinementError", "Support", "confine", "confine_from",
           "landlock_abi", "support"]

_CAP_SYS_ADMIN, _CAP_SETUID, _CAP_SETGID = 21, 7, 6


@dataclass(frozen=True, slots=True)
class Support:
    """What this machine lets the sandbox do; each ``*_missing`` says why not (None: can)."""

    landlock_abi: int
    private_root_missing: str | None
    cgroups_missing: str | None

    @property
    def landlock_missing(self) -> str | None:
        if self.landlock_abi < 1:
            return "the kernel has no Landlock (Linux 5.13+ with the landlock LSM enabled)"
        if self.landlock_abi < 4:
            return f"Landlock ABI {self.landlock_abi} cannot limit TCP binds (needs Linux 6.7+)"
        return None

    def missing(self) -> list[str]:
        """Every layer this machine cannot apply, as sentences."""
        gaps = [("private root and own user", self.private_root_missing),
                ("cgroup limits", self.cgroups_missing), ("Landlock", self.landlock_missing)]
        return [f"{layer}: {why}" for layer, why in gaps if why]


def _effective_capabilities() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def support(cgroup_root: str = "dask-provisioner") -> Support:
    """What the sandbox can do here (checked once, by the service, at start-up)."""
    caps = _effective_capabilities()
    if os.geteuid() != 0:
        private = "the service does not run as root, so it cannot give processes their own user"
    elif not all(caps & (1 << c) for c in (_CAP_SYS_ADMIN, _CAP_SETUID, _CAP_SETGID)):
        private = "the service lacks CAP_SYS_ADMIN, CAP_SETUID or CAP_SETGID"
    elif not os.path.exists("/proc/self/ns/mnt") or not os.path.exists("/proc/self/ns/ipc"):
        private = "the kernel has no mount or IPC namespaces"
    else:
        private = None
    from clusters import cgroups

    return Support(landlock_abi(), private, cgroups.why_not())


def _join_cgroup(procs: str) -> None:
    try:
        fd = os.open(procs, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.write(fd, b"0")  # 0: the writing process
        finally:
            os.close(fd)
    except OSError as exc:
        raise ConfinementError(exc.errno, f"joining cgroup {procs}: {exc.strerror}") from None


def confine(plan: dict[str, Any]) -> None:
    """Apply ``plan`` to this (single-threaded) process, for good. Keys, each optional:

    ``cgroup``: the ``cgroup.procs`` files of its cgroup, one per hierarchy; ``root``: ``{"home": str, "hidden":
    [str, ...], "shm_bytes": int, "tmp_bytes": int}``; ``user``: ``{"uid": int, "gid": int}``;
    ``landlock``: ``{"writable": [str, ...], "hidden": str | None}`` (host paths, used
    without a private root; with one, the process may write its folder, /tmp and /dev/shm).
    """
    for procs in plan.get("cgroup") or []:  # cgroup.procs files, one per hierarchy
        _join_cgroup(procs)
    root = plan.get("root")
    if root:
        home = enter_private_root(root["home"], root.get("hidden") or [],
                                  int(root["shm_bytes"]), int(root["tmp_bytes"]))
        readable, writable, hidden = ["/"], [home, "/tmp", "/dev/shm"], None
    else:
        landlock = plan.get("landlock") or {}
        readable, writable = [], [*landlock.get("writable", []), "/dev/shm"]
        hidden = landlock.get("hidden")
    from clusters.sandbox.identity import become, drop_privileges

    user = plan.get("user")
    if user:
        become(int(user["uid"]), int(user["gid"]))
    else:
        drop_privileges()
    if plan.get("landlock") is not None or root:
        restrict(readable, writable, hidden)


def confine_from(options: dict[str, Any]) -> None:
    """Apply the ``sandbox`` entry of a runner's options, if the backend gave one."""
    plan = options.get("sandbox")
    if plan:
        confine(plan)
