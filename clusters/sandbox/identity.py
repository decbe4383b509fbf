"""Leave root: another user, no capabilities, no way back.

Tenant code must not run as the service's user (root, in most containers): root reads
everything Unix permissions guard (``/etc/shadow``, other tenants' folders) whatever else
fences it. :func:`become` switches to the tenant's own uid and gid with no supplementary
groups; a uid change from root clears every capability, the bounding set is emptied first so
none can come back through an executable's file capabilities, and ``no_new_privs`` stops
setuid programs. :func:`drop_privileges` is the same without a user to become (a service
that is not root keeps its uid but still gives up what it can).
"""

from __future__ import annotations

import ctypes
import os
import struct

from clusters.sandbox.syscalls import ConfinementError, fail, libc, prctl

_PR_SET_NO_NEW_PRIVS, _PR_CAPBSET_DROP = 38, 24
_CAP_VERSION_3 = 0x20080522
_EINVAL = 22


def _empty_bounding_set() -> None:
    for cap in range(64):
        if prctl(_PR_CAPBSET_DROP, cap) != 0 and ctypes.get_errno() != _EINVAL:
            raise fail(f"dropping capability {cap} from the bounding set")


def _no_new_privs() -> None:
    if prctl(_PR_SET_NO_NEW_PRIVS, 1) != 0:
        raise fail("prctl(PR_SET_NO_NEW_PRIVS)")


def become(uid: int, gid: int) -> None:
    """Switch this process to ``uid``/``gid`` for good (it must be root to start with)."""
    if uid <= 0 or gid <= 0:
        raise ConfinementError(0, f"refusing to run tenant code as uid {uid} / gid {gid}")
    _empty_bounding_set()
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    _no_new_privs()
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid) or os.getgroups():
        raise ConfinementError(0, "the user switch did not take")


def drop_privileges() -> None:
    """No new privileges and, for root, an empty capability set (bounding set too)."""
    _no_new_privs()
    if os.geteuid() != 0:
        return
    _empty_bounding_set()
    header = struct.pack("=Ii", _CAP_VERSION_3, 0)
    data = bytes(24)  # effective, permitted, inheritable: all empty (two 32-bit halves)
    if libc.capset(ctypes.c_char_p(header), ctypes.c_char_p(data)) != 0:
        raise fail("capset")
