"""Confine a local cluster process before any tenant code runs in it.

Local clusters run on the service's own machine, as the service's own user (often root in a
container). Without this, a tenant's task could read the service's database (every cluster's
client key), another cluster's files or process environment, or signal another tenant's
processes. :func:`confine` closes those doors with what the kernel gives an unprivileged
process, in the process itself, just before it starts serving:

* Landlock (Linux 5.13+): everything may be read and executed except the service's data
  folder; only the cluster's own folder (its ``HOME`` and ``TMPDIR``) and ``/dev/shm`` may be
  written. A confined process may not ptrace (so not read ``/proc/<pid>/environ`` of) any
  process outside its own domain, and, from Landlock ABI 6, may not signal one either.
* ``no_new_privs`` and, when running as root, an empty capability set (bounding set too):
  root without capabilities cannot load kernel modules, mount, or change its user.

:func:`support` is what the service checks once at start-up (it says so loudly when the
kernel has no Landlock); a process asked to confine itself that cannot, refuses to run.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import struct
from pathlib import Path
from typing import Any

_SYS_CREATE_RULESET, _SYS_ADD_RULE, _SYS_RESTRICT_SELF = 444, 445, 446  # same on every arch
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH = 1
_PR_SET_NO_NEW_PRIVS, _PR_CAPBSET_DROP = 38, 24
_CAP_VERSION_3 = 0x20080522

_EXECUTE, _WRITE_FILE, _READ_FILE, _READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
_REMOVE_DIR, _REMOVE_FILE, _MAKE_CHAR, _MAKE_DIR = 1 << 4, 1 << 5, 1 << 6, 1 << 7
_MAKE_REG, _MAKE_SOCK, _MAKE_FIFO, _MAKE_BLOCK = 1 << 8, 1 << 9, 1 << 10, 1 << 11
_MAKE_SYM, _REFER, _TRUNCATE = 1 << 12, 1 << 13, 1 << 14
_SCOPE_ABSTRACT_UNIX_SOCKET, _SCOPE_SIGNAL = 1 << 0, 1 << 1

_FILE_RIGHTS = _EXECUTE | _WRITE_FILE | _READ_FILE | _TRUNCATE
READ = _EXECUTE | _READ_FILE | _READ_DIR
WRITE = (READ | _WRITE_FILE | _REMOVE_DIR | _REMOVE_FILE | _MAKE_DIR | _MAKE_REG | _MAKE_SOCK
         | _MAKE_FIFO | _MAKE_SYM | _REFER | _TRUNCATE)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class ConfinementError(OSError):
    """The process was asked to confine itself and could not."""


def _fail(what: str) -> ConfinementError:
    errno = ctypes.get_errno()
    return ConfinementError(errno, f"{what}: {os.strerror(errno)}")


def landlock_abi() -> int:
    """The kernel's Landlock ABI version; 0 when it has none (or it is disabled)."""
    version = _libc.syscall(_SYS_CREATE_RULESET, None, ctypes.c_size_t(0),
                            ctypes.c_uint32(_CREATE_RULESET_VERSION))
    return max(int(version), 0)


def support() -> str | None:
    """None when local cluster processes can be confined here, else why not."""
    abi = landlock_abi()
    if abi < 1:
        return "the kernel has no Landlock (Linux 5.13+ with the landlock LSM enabled)"
    return None


def _handled_fs(abi: int) -> int:
    rights = (_EXECUTE | _WRITE_FILE | _READ_FILE | _READ_DIR | _REMOVE_DIR | _REMOVE_FILE
              | _MAKE_CHAR | _MAKE_DIR | _MAKE_REG | _MAKE_SOCK | _MAKE_FIFO | _MAKE_BLOCK
              | _MAKE_SYM)
    if abi >= 2:
        rights |= _REFER
    if abi >= 3:
        rights |= _TRUNCATE
    return rights


def _readable_around(hidden: Path) -> list[Path]:
    """Every path next to ``hidden`` and next to each of its parents: together, everything
    on the machine but ``hidden`` itself (Landlock grants, it cannot carve exceptions).

    Rules bind to inodes, not names, so a symbolic link or a bind mount that is ``hidden``
    or one of its parents under another name would grant it all again: links are left out
    (their targets have rules of their own) and so is anything that is one of those inodes.
    """
    parts = hidden.parts
    ancestry = set()
    for depth in range(1, len(parts) + 1):
        with contextlib.suppress(OSError):
            st = os.stat(Path(*parts[:depth]))
            ancestry.add((st.st_dev, st.st_ino))
    found: list[Path] = []
    for depth in range(1, len(parts)):
        parent, keep = Path(*parts[:depth]), parts[depth]
        try:
            entries = list(os.scandir(parent))
        except OSError:
            continue
        for entry in entries:
            with contextlib.suppress(OSError):
                if entry.name == keep or entry.is_symlink():
                    continue
                st = entry.stat(follow_symlinks=False)
                if (st.st_dev, st.st_ino) not in ancestry:
                    found.append(Path(entry.path))
    return found


def _add_rule(ruleset: int, path: Path, access: int, handled: int) -> None:
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return  # gone, or a dangling link: nothing to grant
    try:
        if not os.path.isdir(f"/proc/self/fd/{fd}"):
            access &= _FILE_RIGHTS
        attr = struct.pack("=Qi", access & handled, fd)
        if _libc.syscall(_SYS_ADD_RULE, ctypes.c_int(ruleset), ctypes.c_int(_RULE_PATH_BENEATH),
                         ctypes.c_char_p(attr), ctypes.c_uint32(0)) != 0:
            raise _fail(f"landlock_add_rule({path})")
    finally:
        os.close(fd)


def _drop_capabilities() -> None:
    if os.geteuid() != 0:
        return  # an unprivileged process has none to drop
    for cap in range(64):
        if _libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and ctypes.get_errno() != 22:
            raise _fail(f"dropping capability {cap} from the bounding set")
    header = struct.pack("=Ii", _CAP_VERSION_3, 0)
    data = bytes(24)  # effective, permitted, inheritable: all empty (two 32-bit halves)
    if _libc.capset(ctypes.c_char_p(header), ctypes.c_char_p(data)) != 0:
        raise _fail("capset")


def confine(hidden: str, writable: list[str]) -> None:
    """Confine this process (and everything it starts) for good; see the module docstring."""
    abi = landlock_abi()
    if abi < 1:
        raise ConfinementError(0, support() or "no Landlock")
    threads = len(os.listdir("/proc/self/task"))
    if threads != 1:  # Landlock and capabilities bind the calling thread (and later ones) only
        raise ConfinementError(0, f"confine() needs a single-threaded process, not {threads}")
    handled = _handled_fs(abi)
    scoped = (_SCOPE_ABSTRACT_UNIX_SOCKET | _SCOPE_SIGNAL) if abi >= 6 else 0
    attr = struct.pack("=QQQ", handled, 0, scoped) if abi >= 6 else struct.pack("=Q", handled)
    ruleset = _libc.syscall(_SYS_CREATE_RULESET, ctypes.c_char_p(attr),
                            ctypes.c_size_t(len(attr)), ctypes.c_uint32(0))
    if ruleset < 0:
        raise _fail("landlock_create_ruleset")
    try:
        for path in _readable_around(Path(hidden).resolve()):
            _add_rule(ruleset, path, READ, handled)
        _add_rule(ruleset, Path("/dev").resolve(), READ | _WRITE_FILE, handled)
        for path in [*writable, "/dev/shm"]:
            _add_rule(ruleset, Path(path).resolve(), WRITE, handled)
        if _libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise _fail("prctl(PR_SET_NO_NEW_PRIVS)")
        _drop_capabilities()
        if _libc.syscall(_SYS_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0)) != 0:
            raise _fail("landlock_restrict_self")
    finally:
        os.close(ruleset)


def confine_from(options: dict[str, Any]) -> None:
    """Apply the ``sandbox`` entry of a runner's options, if the backend gave one."""
    sandbox = options.get("sandbox")
    if sandbox:
        confine(sandbox["hidden"], list(sandbox["writable"]))
