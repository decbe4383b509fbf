"""Landlock: the kernel's unprivileged access control, the sandbox's last layer.

A Landlock ruleset grants (it cannot carve exceptions): read and execute where the process
may look, write only in its own folders, and TCP ``bind`` only to port 0 (an ephemeral port
the kernel picks; ABI 4+), so a tenant's process cannot take the service's port or any other
fixed one. A confined process may not ptrace (so not read ``/proc/<pid>/environ`` of) a
process outside its own domain and, from ABI 6, may not signal one or reach its abstract
UNIX sockets. Without the private root of :mod:`clusters.sandbox.mounts` (a service that is
not root), :func:`restrict` also takes a folder to leave out of the readable world.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import struct
from collections.abc import Sequence
from pathlib import Path

from clusters.sandbox.syscalls import ConfinementError, fail, libc

_SYS_CREATE_RULESET, _SYS_ADD_RULE, _SYS_RESTRICT_SELF = 444, 445, 446  # same on every arch
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH, _RULE_NET_PORT = 1, 2
_NET_BIND_TCP = 1 << 0

_EXECUTE, _WRITE_FILE, _READ_FILE, _READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
_REMOVE_DIR, _REMOVE_FILE, _MAKE_CHAR, _MAKE_DIR = 1 << 4, 1 << 5, 1 << 6, 1 << 7
_MAKE_REG, _MAKE_SOCK, _MAKE_FIFO, _MAKE_BLOCK = 1 << 8, 1 << 9, 1 << 10, 1 << 11
_MAKE_SYM, _REFER, _TRUNCATE = 1 << 12, 1 << 13, 1 << 14
_SCOPE_ABSTRACT_UNIX_SOCKET, _SCOPE_SIGNAL = 1 << 0, 1 << 1

_FILE_RIGHTS = _EXECUTE | _WRITE_FILE | _READ_FILE | _TRUNCATE
READ = _EXECUTE | _READ_FILE | _READ_DIR
WRITE = (READ | _WRITE_FILE | _REMOVE_DIR | _REMOVE_FILE | _MAKE_DIR | _MAKE_REG | _MAKE_SOCK
         | _MAKE_FIFO | _MAKE_SYM | _REFER | _TRUNCATE)

def landlock_abi() -> int:
    """The kernel's Landlock ABI version; 0 when it has none (or it is disabled)."""
    version = libc.syscall(_SYS_CREATE_RULESET, None, ctypes.c_size_t(0),
                            ctypes.c_uint32(_CREATE_RULESET_VERSION))
    return max(int(version), 0)


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
        if libc.syscall(_SYS_ADD_RULE, ctypes.c_int(ruleset), ctypes.c_int(_RULE_PATH_BENEATH),
                         ctypes.c_char_p(attr), ctypes.c_uint32(0)) != 0:
            raise fail(f"landlock_add_rule({path})")
    finally:
        os.close(fd)


def restrict(readable: Sequence[str], writable: Sequence[str], hidden: str | None = None,
             bind_ports: Sequence[int] = (0,)) -> None:
    """Confine this thread (and everything it starts) for good: read (and execute) beneath
    ``readable`` (everything around ``hidden`` when given), write beneath ``writable``, TCP
    bind to ``bind_ports`` only. Call it single-threaded: Landlock binds the calling thread."""
    abi = landlock_abi()
    if abi < 1:
        raise ConfinementError(0, "the kernel has no Landlock (Linux 5.13+ with the landlock LSM)")
    threads = len(os.listdir("/proc/self/task"))
    if threads != 1:
        raise ConfinementError(0, f"Landlock needs a single-threaded process, not {threads}")
    handled = _handled_fs(abi)
    net = _NET_BIND_TCP if abi >= 4 else 0
    scoped = (_SCOPE_ABSTRACT_UNIX_SOCKET | _SCOPE_SIGNAL) if abi >= 6 else 0
    attr = (struct.pack("=QQQ", handled, net, scoped) if abi >= 6
            else struct.pack("=QQ", handled, net) if abi >= 4 else struct.pack("=Q", handled))
    ruleset = libc.syscall(_SYS_CREATE_RULESET, ctypes.c_char_p(attr),
                           ctypes.c_size_t(len(attr)), ctypes.c_uint32(0))
    if ruleset < 0:
        raise fail("landlock_create_ruleset")
    try:
        paths = [Path(p) for p in readable]
        if hidden is not None:
            paths += _readable_around(Path(hidden).resolve())
        for path in paths:
            _add_rule(ruleset, path, READ, handled)
        _add_rule(ruleset, Path("/dev").resolve(), READ | _WRITE_FILE, handled)
        for folder in writable:
            _add_rule(ruleset, Path(folder).resolve(), WRITE, handled)
        for port in bind_ports if net else ():
            rule = struct.pack("=QQ", _NET_BIND_TCP, port)
            if libc.syscall(_SYS_ADD_RULE, ctypes.c_int(ruleset), ctypes.c_int(_RULE_NET_PORT),
                            ctypes.c_char_p(rule), ctypes.c_uint32(0)) != 0:
                raise fail(f"landlock_add_rule(bind port {port})")
        if libc.syscall(_SYS_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0)) != 0:
            raise fail("landlock_restrict_self")
    finally:
        os.close(ruleset)
