"""The few Linux calls the sandbox makes that Python's standard library does not wrap."""

from __future__ import annotations

import ctypes
import os
import platform

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long

#: pivot_root's number differs between architectures (the newer calls share one table).
_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "ppc64le": 203, "s390x": 217}


class ConfinementError(OSError):
    """The process was asked to confine itself and could not."""


def fail(what: str) -> ConfinementError:
    errno = ctypes.get_errno()
    return ConfinementError(errno, f"{what}: {os.strerror(errno)}")


def pivot_root(new_root: str, put_old: str) -> None:
    number = _PIVOT_ROOT.get(platform.machine())
    if number is None:
        raise ConfinementError(0, f"pivot_root: unknown on {platform.machine()}")
    if libc.syscall(ctypes.c_long(number), new_root.encode(), put_old.encode()) != 0:
        raise fail(f"pivot_root({new_root})")


def mount(source: str | None, target: str, fstype: str | None, flags: int,
          data: str | None = None) -> None:
    if libc.mount(source.encode() if source else None, target.encode(),
                  fstype.encode() if fstype else None, ctypes.c_ulong(flags),
                  data.encode() if data else None) != 0:
        raise fail(f"mount({source} on {target})")


def umount_detached(target: str) -> None:
    if libc.umount2(target.encode(), 2) != 0:  # MNT_DETACH
        raise fail(f"umount({target})")


def unshare(flags: int) -> None:
    if libc.unshare(ctypes.c_int(flags)) != 0:
        raise fail("unshare")


def prctl(option: int, arg: int = 0) -> int:
    return int(libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0))
