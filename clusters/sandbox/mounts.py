"""A private root for a cluster process: only what it needs to run, read-only, and its folder.

In a mount namespace of its own (and an IPC namespace: System V shared memory of its own),
the process gets a fresh file-system root on a small tmpfs holding, read-only, the system
(``/usr``, ``/etc`` and the root's links into ``/usr``) and the runtime (the interpreter, its
libraries, the folders on ``sys.path`` and those of the imported top-level packages, each at
its own path so imports work unchanged); a minimal ``/dev`` (null, zero, full, random,
urandom, tty, a private ``pts`` and ``/dev/shm``); a private ``/tmp``; its own ``/proc``
in which other users' processes are invisible; and its cluster's folder, writable, as
``HOME_INSIDE``. The service's data folder, its state file and its tenants file are simply
not there; where one lies inside a runtime folder (a ``data`` folder in the working
directory, say) it is covered by an empty read-only mount.

This needs root (``CAP_SYS_ADMIN``) and runs before the process gives root up; building the
root takes a few milliseconds.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Iterable

from clusters.sandbox.syscalls import mount, pivot_root, umount_detached, unshare

#: Where a cluster's own folder appears inside its private root (its HOME and TMPDIR).
HOME_INSIDE = "/home/dask"

_CLONE_NEWNS, _CLONE_NEWIPC = 0x00020000, 0x08000000
_RDONLY, _NOSUID, _NODEV, _NOEXEC = 1, 2, 4, 8
_REMOUNT, _BIND, _REC, _PRIVATE = 32, 4096, 16384, 1 << 18
_OLD = "/.old-root"
_SYSTEM = ("/usr", "/etc")
_ROOT_LINKS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
#: Never bound whole, whatever ``sys.path`` says: the root itself and the kernel's own trees.
_NEVER = ("/", "/proc", "/sys", "/dev", "/run", "/tmp", "/home", "/root", "/var")


@functools.cache
def runtime_paths() -> tuple[str, ...]:
    """Folders (and zip files) this Python needs, as absolute paths: those on ``sys.path``,
    the prefixes, and the folders of imported top-level packages (editable installs live
    outside ``sys.path``). Found once per process: a fork server finds them for every fork."""
    found = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
             os.path.dirname(os.path.realpath(sys.executable))}
    found.update(os.path.abspath(p or os.getcwd()) for p in sys.path)
    for name, module in list(sys.modules.items()):
        if "." in name or module is None:
            continue
        locations = list(getattr(module, "__path__", None) or [])
        file = getattr(module, "__file__", None)
        if not locations and isinstance(file, str):
            locations = [os.path.dirname(file)]
        found.update(os.path.abspath(str(p)) for p in locations)
    resolved = {os.path.realpath(p) for p in found}
    return tuple(sorted(p for p in found | resolved if os.path.exists(p) and p not in _NEVER))


def _bind_read_only(source: str, target: str) -> None:
    if os.path.isdir(source):
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if not os.path.exists(target):
            with open(target, "w"):
                pass
    mount(source, target, None, _BIND)
    mount(None, target, None, _REMOUNT | _BIND | _RDONLY | _NOSUID | _NODEV)


def _under(path: str, roots: Iterable[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def _devices(shm_bytes: int) -> None:
    os.makedirs("/dev", mode=0o755)
    for name in _DEVICES:
        if os.path.exists(f"{_OLD}/dev/{name}"):
            with open(f"/dev/{name}", "w"):
                pass
            mount(f"{_OLD}/dev/{name}", f"/dev/{name}", None, _BIND)
    os.mkdir("/dev/pts")
    mount("devpts", "/dev/pts", "devpts", _NOSUID | _NOEXEC, "newinstance,ptmxmode=0666,mode=620")
    os.symlink("pts/ptmx", "/dev/ptmx")
    os.mkdir("/dev/shm")
    mount("tmpfs", "/dev/shm", "tmpfs", _NOSUID | _NODEV, f"mode=1777,size={shm_bytes}")
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"/dev/{name}")


def enter_private_root(home: str, hidden: Iterable[str], shm_bytes: int, tmp_bytes: int) -> str:
    """Move this process into its private root (see the module docstring); returns the
    cluster folder's path inside it. ``home`` and ``hidden`` are paths of the host."""
    home = os.path.realpath(home)
    runtime = runtime_paths()
    umask = os.umask(0o022)  # the folders made here must be open to the tenant's user
    try:
        return _build(home, runtime, hidden, shm_bytes, tmp_bytes)
    finally:
        os.umask(umask)


def _build(home: str, runtime: tuple[str, ...], hidden: Iterable[str], shm_bytes: int,
           tmp_bytes: int) -> str:
    unshare(_CLONE_NEWNS | _CLONE_NEWIPC)
    mount(None, "/", None, _REC | _PRIVATE)  # nothing done here reaches the host
    # A tmpfs over /tmp becomes the new root; the old one stays reachable (with its own
    # /tmp uncovered) under _OLD until everything is bound, then it is let go.
    mount("tmpfs", "/tmp", "tmpfs", _NOSUID | _NODEV, "mode=0755,size=16m")
    os.mkdir("/tmp" + _OLD)
    pivot_root("/tmp", "/tmp" + _OLD)
    os.chdir("/")
    for link in _ROOT_LINKS:
        old = _OLD + link
        if os.path.islink(old):
            os.symlink(os.readlink(old), link)
        elif os.path.isdir(old):
            _bind_read_only(old, link)
    for path in _SYSTEM:
        _bind_read_only(_OLD + path, path)
    os.mkdir("/tmp", 0o1777)
    mount("tmpfs", "/tmp", "tmpfs", _NOSUID | _NODEV, f"mode=1777,size={tmp_bytes}")
    bound = [*_SYSTEM]
    for path in runtime:  # sorted: a folder comes before what lies in it
        if not _under(path, bound):
            _bind_read_only(_OLD + path, path)
            bound.append(path)
    for path in hidden:
        inside = os.path.abspath(path)
        if not os.path.lexists(inside):
            continue
        if os.path.isdir(inside) and not os.path.islink(inside):
            mount("tmpfs", inside, "tmpfs", _RDONLY | _NOSUID | _NODEV | _NOEXEC, "mode=000,size=4k")
        else:
            mount(f"{_OLD}/dev/null", inside, None, _BIND)
    os.mkdir("/proc")
    mount("proc", "/proc", "proc", _NOSUID | _NODEV | _NOEXEC, "hidepid=invisible")
    _devices(shm_bytes)
    os.makedirs(HOME_INSIDE)
    mount(_OLD + home, HOME_INSIDE, None, _BIND)
    mount(None, HOME_INSIDE, None, _REMOUNT | _BIND | _NOSUID | _NODEV)
    umount_detached(_OLD)
    os.rmdir(_OLD)
    mount(None, "/", None, _REMOUNT | _RDONLY | _NOSUID | _NODEV)
    os.chdir(HOME_INSIDE)
    return HOME_INSIDE
