"""Put each local cluster process in a Linux control group of its own, and end whole clusters.

On the local backend every scheduler and worker is a process on the service's own machine.
Without cgroups one tenant's worker can take all the memory (the kernel's OOM killer then picks
any process, the service included), fork without end or take every core; and a process that
calls setsid() and forks twice slips out of any kill by process group or parent. A cgroup per
process caps its memory (tmpfs and shm pages it writes included, no swap beyond it), its tasks
and its CPU time, and a cluster's cgroup holds every process it ever started, however detached.

Each service gets one tree, below the cgroup the service itself runs in, so the limits of the
container or systemd unit around the service still hold around its clusters::

    <the service's cgroup>/<root, e.g. dask-provisioner/owner>/<cluster id>/<process>

Processes belong in leaves only: cgroup v2 lets no process live in a cgroup whose children
have controllers. That holds for the service's own cgroup too (a systemd unit's, which should
then have ``Delegate=yes``, or a container's): on v2, when processes live in it, :func:`detect`
moves them all into its child ``service`` (:data:`SERVICE_LEAF`), beside the tree.

:func:`detect` picks the kernel's interface: cgroup v2 when its memory, pids and cpu controllers
can be used below the service's cgroup, else cgroup v1 with the memory, pids, cpu and freezer
controllers mounted and writable; :func:`why_not` says why neither works.

Everything here is blocking file I/O on cgroupfs (callers run it in threads), and
:meth:`Cgroups.join` is plain ``os.open``/``os.write`` so a freshly forked child may call it.
With :mod:`subprocess`, ``preexec_fn`` runs after ``user=``/``group=`` took effect, too late
for a process that must still be root to join: join in a fork of your own, then drop root.
"""

from __future__ import annotations

import abc
import errno
import os
import re
import signal
import stat
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

V1_CONTROLLERS = ("memory", "pids", "cpu", "freezer")
V2_CONTROLLERS = ("memory", "pids", "cpu")
CFS_PERIOD_US = 100_000
MIN_QUOTA_US = 1_000  # the kernel refuses smaller CFS quotas
SERVICE_LEAF = "service"  # v2: where the service's own processes go, beside its tree

_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")
_V1_FILES = frozenset({"tasks", "notify_on_release", "release_agent"})  # no dot, like a name
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
_WRITE = os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC
_POLL = 0.005
_FREEZE_PATIENCE = 1.0  # seconds to wait for a freeze before killing what is still running


class CgroupError(OSError):
    """A cgroup could not be made, joined, limited, emptied or removed."""


@dataclass(frozen=True, slots=True)
class Limits:
    """What one cgroup (and everything below it) may use; None leaves that unlimited."""

    memory: int | None = None  # bytes of RAM, tmpfs/shm pages written included; no swap beyond
    cpus: float | None = None  # CPU time in cores (CFS quota per 100 ms period; 0.5 = half one)
    pids: int | None = None  # tasks: processes and threads

    def __post_init__(self) -> None:
        for name, value, floor in (("memory", self.memory, 1), ("pids", self.pids, 1)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < floor):
                raise ValueError(f"Limits.{name} must be a positive int or None, not {value!r}")
        if self.cpus is not None and (isinstance(self.cpus, bool) or not isinstance(self.cpus, int | float)
                                      or not 0 < self.cpus < float("inf")):
            raise ValueError(f"Limits.cpus must be a positive number or None, not {self.cpus!r}")

    def cfs_quota_us(self) -> int | None:
        """The CFS quota per :data:`CFS_PERIOD_US` for :attr:`cpus` (None: unlimited)."""
        return None if self.cpus is None else max(MIN_QUOTA_US, round(self.cpus * CFS_PERIOD_US))


def check_name(name: str) -> str:
    """``name`` if it is a safe cgroup name (it can only ever be one directory), else ValueError."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name in _V1_FILES:
        raise ValueError(f"not a cgroup name: {name!r} (1-64 of A-Za-z0-9._-, not starting with '.')")
    return name


def _parts(path: Sequence[str]) -> tuple[str, ...]:
    if isinstance(path, str | bytes):  # a str is a Sequence[str] too: "ab" is not ("a", "b")
        raise ValueError(f"a cgroup path is a sequence of names, not {path!r}")
    return tuple(check_name(name) for name in path)


def _read(path: Path) -> str:
    fd = os.open(path, _READ)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks).decode()


def _write(path: Path, value: str) -> None:
    """One write() of ``value``: the kernel takes each cgroup setting whole or not at all."""
    try:
        fd = os.open(path, _WRITE)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)
    except OSError as e:
        raise CgroupError(e.errno, f"writing {value!r} to {path}: {e.strerror}") from None


def _keyed(path: Path, key: str) -> int | None:
    """The number after ``key`` in a flat-keyed file (memory.events, cgroup.events, ...)."""
    try:
        text = _read(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return int(value)
    return None


def _mkdir(path: Path) -> bool:
    """Make the cgroup ``path``; True if it is new. An existing non-directory is an error."""
    try:
        os.mkdir(path)
        return True
    except FileExistsError:
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            raise CgroupError(errno.ENOTDIR, f"{path} exists and is not a cgroup") from None
        return False
    except OSError as e:
        raise CgroupError(e.errno, f"creating cgroup {path}: {e.strerror}") from None


def _subdirs(path: Path) -> list[Path]:
    try:
        with os.scandir(path) as entries:
            return [Path(e.path) for e in entries if e.is_dir(follow_symlinks=False)]
    except (FileNotFoundError, NotADirectoryError):
        return []


def _tree(top: Path) -> list[Path]:
    """``top`` and every cgroup below it, each after its children (so rmdir can go in order)."""
    try:
        if not stat.S_ISDIR(os.lstat(top).st_mode):
            return []
    except (FileNotFoundError, NotADirectoryError):
        return []
    found: list[Path] = []
    for sub in _subdirs(top):
        found.extend(_tree(sub))
    found.append(top)
    return found


def _procs(path: Path) -> set[int]:
    try:
        return {int(pid) for pid in _read(path / "cgroup.procs").split()}
    except (FileNotFoundError, NotADirectoryError):
        return set()


def _sigkill(pids: Iterable[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Cgroups(abc.ABC):
    """One cgroup tree per service; ``root`` names its top, such as "dask-provisioner/<owner>".

    Paths below it are sequences of names, like ``(cluster_id, "worker-x")``; ``()`` is the
    root itself. Every name is checked (:func:`check_name`) so nothing can leave the tree.
    """

    version: int

    def __init__(self, root: str) -> None:
        self.root = _parts(root.split("/"))
        if self.root[0] == SERVICE_LEAF:
            raise ValueError(f"a root may not start with {SERVICE_LEAF!r}: the service's own processes go there")

    @abc.abstractmethod
    def _dirs(self, parts: tuple[str, ...]) -> list[Path]:
        """The cgroup's directory in each hierarchy used (one on v2)."""

    @abc.abstractmethod
    def where(self, controller: str, path: Sequence[str] = ()) -> Path:
        """The directory of that cgroup in the hierarchy holding ``controller``, to read its files."""

    @abc.abstractmethod
    def create(self, path: Sequence[str], limits: Limits | None = None) -> None:
        """Make the cgroup and its parents (idempotent). With ``limits``, set all three of them:
        each None is written as unlimited, so creating again changes them. Without, touch none."""

    @abc.abstractmethod
    def oom_kills(self, path: Sequence[str] = ()) -> int:
        """How many processes the kernel killed for memory in it and below it; 0 when unknown."""

    @abc.abstractmethod
    def _kill_round(self, parts: tuple[str, ...], deadline: float) -> None:
        """SIGKILL everything in the cgroup and below it once, without missing a fork."""

    def _empty(self, parts: tuple[str, ...]) -> bool:
        return not self._pids(parts)

    def join(self, path: Sequence[str], pid: int = 0) -> None:
        """Move ``pid`` (0: the caller) into the cgroup in every hierarchy used.

        Only os.open/os.write on precomputed paths: safe in a freshly forked, single-threaded
        child, which must still be root (or own the cgroup) when it calls this. A CgroupError
        may leave the process in some hierarchies only: a child should then exit.
        """
        for directory in self._dirs(_parts(path)):
            _write(directory / "cgroup.procs", str(pid))

    def _pids(self, parts: tuple[str, ...]) -> set[int]:
        found: set[int] = set()
        for directory in self._dirs(parts):
            for cgroup in _tree(directory):
                found |= _procs(cgroup)
        return found

    def pids(self, path: Sequence[str] = ()) -> set[int]:
        """Every process in the cgroup and in its descendants, in any hierarchy used."""
        return self._pids(_parts(path))

    def children(self, path: Sequence[str] = ()) -> list[str]:
        """The names of the cgroup's child cgroups, sorted (none when it does not exist)."""
        return sorted({sub.name for directory in self._dirs(_parts(path)) for sub in _subdirs(directory)})

    def kill(self, path: Sequence[str] = (), timeout: float = 5.0) -> None:
        """SIGKILL every process in the cgroup and below it, forks that race the kill included,
        and return once it is empty; CgroupError if it is not within ``timeout`` seconds.

        Killed processes stay zombies until their parents (or init, for orphans) reap them:
        they are no longer in cgroup.procs, but v1 still counts them in pids.current.
        """
        parts = _parts(path)
        deadline = time.monotonic() + timeout
        if os.getpid() in self._pids(parts):
            raise CgroupError(errno.EDEADLK, f"refusing to kill {self._name(parts)}: the caller is in it")
        while not self._empty(parts):
            if time.monotonic() > deadline:
                raise CgroupError(errno.EBUSY, f"{self._name(parts)} still has processes after {timeout} s: "
                                               f"{sorted(self._pids(parts))}")
            self._kill_round(parts, deadline)
            self._wait(lambda: self._empty(parts), min(deadline, time.monotonic() + 0.2))

    def remove(self, path: Sequence[str] = (), timeout: float = 5.0) -> None:
        """Kill everything in the cgroup, then remove it and its descendants (leaves first) in
        every hierarchy; a missing one is fine. ``()`` removes the root (not its parents)."""
        parts = _parts(path)
        deadline = time.monotonic() + timeout
        self.kill(parts, timeout)
        for directory in self._dirs(parts):
            for cgroup in _tree(directory):
                while True:
                    try:
                        os.rmdir(cgroup)
                        break
                    except FileNotFoundError:
                        break
                    except OSError as e:  # EBUSY: a killed task that has not quite left yet
                        if e.errno != errno.EBUSY or time.monotonic() > deadline:
                            raise CgroupError(e.errno, f"removing cgroup {cgroup}: {e.strerror}") from None
                        time.sleep(_POLL)

    def _name(self, parts: tuple[str, ...]) -> str:
        return "/".join((*self.root, *parts))

    @staticmethod
    def _wait(done: Callable[[], bool], deadline: float) -> bool:
        """Poll ``done()`` until it is true or ``deadline`` (monotonic) passes."""
        while not done():
            if time.monotonic() >= deadline:
                return False
            time.sleep(_POLL)
        return True


class CgroupsV1(Cgroups):
    """cgroup v1: one hierarchy per controller (or a few sharing one), each mounted apart.

    ``bases`` maps each of :data:`V1_CONTROLLERS` to the service's own cgroup directory in the
    hierarchy holding it; :func:`detect` finds them.
    """

    version = 1

    def __init__(self, root: str, bases: Mapping[str, Path]) -> None:
        super().__init__(root)
        missing = [c for c in V1_CONTROLLERS if c not in bases]
        if missing:
            raise ValueError(f"cgroup v1 needs the {', '.join(missing)} controller(s)")
        self.bases = {c: Path(bases[c]) for c in V1_CONTROLLERS}
        self._hierarchies = list(dict.fromkeys(self.bases.values()))  # co-mounted ones once

    def _dirs(self, parts: tuple[str, ...]) -> list[Path]:
        return [base.joinpath(*self.root, *parts) for base in self._hierarchies]

    def where(self, controller: str, path: Sequence[str] = ()) -> Path:
        if controller not in self.bases:
            raise ValueError(f"no {controller!r} hierarchy in use (only {', '.join(self.bases)})")
        return self.bases[controller].joinpath(*self.root, *_parts(path))

    def create(self, path: Sequence[str], limits: Limits | None = None) -> None:
        parts = self.root + _parts(path)
        for base in self._hierarchies:
            directory = base
            for name in parts:
                directory = directory / name
                if _mkdir(directory) and base == self.bases["memory"]:
                    self._hierarchical(directory)
        if limits is not None:
            self._limit(_parts(path), limits)

    @staticmethod
    def _hierarchical(directory: Path) -> None:
        """Make the memory cgroup count its children's memory (so limits nest): a new cgroup
        inherits memory.use_hierarchy, which can only change while it has no children. Always
        on since Linux 5.16 (where writing 0 fails)."""
        flag = directory / "memory.use_hierarchy"
        try:
            if _read(flag).strip() == "1":
                return
        except FileNotFoundError:
            return
        _write(flag, "1")

    def _limit(self, parts: tuple[str, ...], limits: Limits) -> None:
        memory = self.where("memory", parts)
        value = "-1" if limits.memory is None else str(limits.memory)
        memsw = memory / "memory.memsw.limit_in_bytes"  # absent without swap accounting
        if memsw.exists():
            # The kernel keeps memsw >= limit_in_bytes at every step: raise memsw first, lower it last.
            raising = limits.memory is None or limits.memory > int(_read(memsw))
            order = [memsw, memory / "memory.limit_in_bytes"]
            for file in order if raising else order[::-1]:
                _write(file, value)
        else:
            _write(memory / "memory.limit_in_bytes", value)
        cpu = self.where("cpu", parts)
        quota = limits.cfs_quota_us()
        _write(cpu / "cpu.cfs_period_us", str(CFS_PERIOD_US))
        _write(cpu / "cpu.cfs_quota_us", "-1" if quota is None else str(quota))
        _write(self.where("pids", parts) / "pids.max", "max" if limits.pids is None else str(limits.pids))

    def oom_kills(self, path: Sequence[str] = ()) -> int:
        """Summed over the subtree: v1 counts a kill in the victim's own cgroup only (v2 counts
        it up the tree), so the kills in a removed child are forgotten."""
        return sum(_keyed(cgroup / "memory.oom_control", "oom_kill") or 0
                   for cgroup in _tree(self.where("memory", path)))

    def _kill_round(self, parts: tuple[str, ...], deadline: float) -> None:
        """Freeze the subtree (v1 freezing is hierarchical), kill what is in it, thaw. Frozen
        processes cannot fork or exit, so the pids read are all there is and none is reused."""
        state = self.where("freezer", parts) / "freezer.state"

        def frozen() -> bool:
            try:
                _write(state, "FROZEN")  # writing again retries tasks that did not freeze yet
                return _read(state).strip() == "FROZEN"
            except (CgroupError, FileNotFoundError):
                return True  # gone: nothing left in it to freeze

        self._wait(frozen, min(deadline, time.monotonic() + _FREEZE_PATIENCE))
        try:
            _sigkill(self._pids(parts))
        finally:
            try:
                _write(state, "THAWED")  # the killed processes die once thawed
            except CgroupError as e:
                if e.errno != errno.ENOENT:
                    raise


class CgroupsV2(Cgroups):
    """cgroup v2: one hierarchy, ``base`` being the service's own cgroup directory in it.

    Killing uses cgroup.kill (Linux 5.14+); without it (or with ``use_kill_file=False``),
    cgroup.freeze (Linux 5.2+): freeze, kill, thaw.
    """

    version = 2

    def __init__(self, root: str, base: Path, *, use_kill_file: bool = True) -> None:
        super().__init__(root)
        self.base = Path(base)
        self.use_kill_file = use_kill_file

    def _dirs(self, parts: tuple[str, ...]) -> list[Path]:
        return [self.base.joinpath(*self.root, *parts)]

    def where(self, controller: str, path: Sequence[str] = ()) -> Path:
        """One hierarchy: the same directory for every controller."""
        return self.base.joinpath(*self.root, *_parts(path))

    def create(self, path: Sequence[str], limits: Limits | None = None) -> None:
        parts = _parts(path)
        directory = self.base
        for name in (*self.root, *parts):
            enable_controllers(directory)
            directory = directory / name
            _mkdir(directory)
        if limits is not None:
            for file, value, needed in v2_settings(limits):
                target = directory / file
                if needed or target.exists():
                    if not target.exists():
                        raise CgroupError(errno.ENOTSUP, f"cannot limit {directory}: no {file} (controller "
                                                         f"{file.split('.')[0]} not available there)")
                    _write(target, value)

    def oom_kills(self, path: Sequence[str] = ()) -> int:
        return _keyed(self.where("memory", path) / "memory.events", "oom_kill") or 0

    def _empty(self, parts: tuple[str, ...]) -> bool:
        return _keyed(self._dirs(parts)[0] / "cgroup.events", "populated") in (0, None)

    def _kill_round(self, parts: tuple[str, ...], deadline: float) -> None:
        directory = self._dirs(parts)[0]
        if self.use_kill_file and (directory / "cgroup.kill").exists():
            _write(directory / "cgroup.kill", "1")  # the kernel kills the subtree, forks in flight too
            return
        freeze = directory / "cgroup.freeze"
        if not freeze.exists():  # before Linux 5.2: kill in rounds until none is left
            _sigkill(self._pids(parts))
            return
        _write(freeze, "1")
        self._wait(lambda: _keyed(directory / "cgroup.events", "frozen") != 0,
                   min(deadline, time.monotonic() + _FREEZE_PATIENCE))
        try:
            _sigkill(self._pids(parts))  # SIGKILL ends frozen tasks on v2
        finally:
            _write(freeze, "0")


def v2_settings(limits: Limits) -> list[tuple[str, str, bool]]:
    """(file, value, required) for ``limits`` on cgroup v2. A required file missing is an
    error; an unlimited one missing is fine (nothing to reset). memory.swap.max is absent
    without swap accounting: then no swap is accounted, and none can be limited either."""
    quota = limits.cfs_quota_us()
    return [
        ("memory.max", "max" if limits.memory is None else str(limits.memory), limits.memory is not None),
        ("memory.swap.max", "max" if limits.memory is None else "0", False),
        ("cpu.max", f"{'max' if quota is None else quota} {CFS_PERIOD_US}", quota is not None),
        ("pids.max", "max" if limits.pids is None else str(limits.pids), limits.pids is not None),
    ]


def enable_controllers(directory: Path, wanted: Iterable[str] = V2_CONTROLLERS) -> None:
    """Pass the ``wanted`` controllers that ``directory`` has on to its children (cgroup v2);
    ones it does not have are left out. Fails (EBUSY) if processes live in ``directory``
    itself, unless it is the hierarchy's root."""
    available = _read(directory / "cgroup.controllers").split()
    enabled = _read(directory / "cgroup.subtree_control").split()
    missing = [c for c in wanted if c in available and c not in enabled]
    if missing:
        _write(directory / "cgroup.subtree_control", " ".join(f"+{c}" for c in missing))


@dataclass(frozen=True, slots=True)
class Hierarchies:
    """Where this process's own cgroup is in each mounted hierarchy."""

    v2: Path | None  # in the cgroup2 filesystem, if one is mounted where it can be seen
    v1: dict[str, Path]  # controller name -> directory, for each v1 controller mounted


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def hierarchies(mountinfo: str | None = None, own: str | None = None) -> Hierarchies:
    """Find this process's cgroup directories from /proc/self/mountinfo and /proc/self/cgroup
    (or the texts given, to check other layouts). A mount shows a cgroup only when its root
    is that cgroup or one of its parents (containers often mount their own cgroup as root)."""
    mountinfo = _read(Path("/proc/self/mountinfo")) if mountinfo is None else mountinfo
    own = _read(Path("/proc/self/cgroup")) if own is None else own
    paths: dict[str, str] = {}  # "" for v2, else each controller of a v1 hierarchy
    for line in own.splitlines():
        number, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if number == "0" and not controllers:
            paths[""] = path
        else:
            paths.update((c, path) for c in controllers.split(",") if c)
    v2: Path | None = None
    v1: dict[str, Path] = {}
    for line in mountinfo.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        dash = fields.index("-")
        if len(fields) < dash + 4 or dash < 5:
            continue
        root, point = _unescape(fields[3]), _unescape(fields[4])
        fstype, options = fields[dash + 1], fields[dash + 3].split(",")
        if fstype == "cgroup2" and v2 is None and "" in paths:
            v2 = _inside(point, root, paths[""])
        elif fstype == "cgroup":
            for controller in options:
                if controller in paths and controller not in v1:
                    directory = _inside(point, root, paths[controller])
                    if directory is not None:
                        v1[controller] = directory
    return Hierarchies(v2, v1)


def _inside(point: str, root: str, path: str) -> Path | None:
    """Where cgroup ``path`` is under a mount of cgroup ``root`` at ``point`` (None: not there)."""
    root = root.rstrip("/")
    if path != root and not path.startswith(root + "/"):
        return None
    return Path(point, path[len(root):].lstrip("/"))


def _v2_problem(base: Path | None) -> str | None:
    if base is None:
        return "no cgroup2 filesystem mounted that shows this process's cgroup"
    try:
        available = _read(base / "cgroup.controllers").split()
    except OSError as e:
        return f"cannot read {base / 'cgroup.controllers'}: {e.strerror}"
    missing = [c for c in V2_CONTROLLERS if c not in available]
    if missing:
        return f"{base} lacks the {', '.join(missing)} controller(s) (held by cgroup v1, or not delegated)"
    if not os.access(base / "cgroup.subtree_control", os.W_OK) or not os.access(base, os.W_OK):
        return f"{base} is not writable by this process"
    try:
        try:
            enable_controllers(base)
        except CgroupError as e:
            if e.errno != errno.EBUSY:
                raise
            evict(base)  # processes live in it: v2 passes controllers on only from an empty cgroup
            enable_controllers(base)
    except CgroupError as e:
        return f"cannot enable {', '.join(V2_CONTROLLERS)} below {base}: {e}"
    return None


def evict(base: Path, timeout: float = 5.0) -> Path:
    """Move every process of cgroup v2 ``base`` into its child :data:`SERVICE_LEAF` (made if
    need be), and return that child: a cgroup may pass controllers on to its children only once
    no process lives in it. Repeated while processes fork into ``base`` meanwhile."""
    leaf = base / SERVICE_LEAF
    _mkdir(leaf)
    deadline = time.monotonic() + timeout
    while pids := _procs(base):
        if time.monotonic() > deadline:
            raise CgroupError(errno.EBUSY, f"processes keep appearing in {base}: {sorted(pids)}")
        for pid in pids:
            try:
                _write(leaf / "cgroup.procs", str(pid))
            except CgroupError as e:
                if e.errno != errno.ESRCH:  # gone meanwhile: fine
                    raise
    return leaf


def _v1_problem(bases: Mapping[str, Path]) -> str | None:
    missing = [c for c in V1_CONTROLLERS if c not in bases]
    if missing:
        return f"the {', '.join(missing)} controller(s) are not mounted"
    for controller in V1_CONTROLLERS:
        if not os.access(bases[controller] / "cgroup.procs", os.W_OK) or not os.access(bases[controller], os.W_OK):
            return f"{bases[controller]} ({controller}) is not writable by this process"
    return None


def _choose() -> tuple[Callable[[str], Cgroups] | None, str | None]:
    """How to make the service's Cgroups here, or why it cannot be done."""
    try:
        found = hierarchies()
    except OSError as e:
        return None, f"cannot read this process's mounts and cgroups in /proc: {e.strerror}"
    v2_problem = _v2_problem(found.v2)
    if v2_problem is None and found.v2 is not None:
        base = found.v2
        return (lambda root: CgroupsV2(root, base)), None
    v1_problem = _v1_problem(found.v1)
    if v1_problem is None:
        bases = found.v1
        return (lambda root: CgroupsV1(root, bases)), None
    return None, f"no usable cgroups: v2: {v2_problem}; v1: {v1_problem}"


def detect(root: str) -> Cgroups | None:
    """The cgroups this machine can give the service, with its tree at ``root``; None if none.

    cgroup v2 is chosen when memory, pids and cpu can be enabled below the service's own
    cgroup: this enables them there (the tree needs them anyway), first moving the processes
    that live in it to :data:`SERVICE_LEAF` (see :func:`evict`) if the kernel refuses for them.
    Else cgroup v1, when memory, pids, cpu and freezer are mounted and writable.
    """
    _parts(root.split("/"))
    make, _ = _choose()
    return None if make is None else make(root)


def why_not() -> str | None:
    """None when :func:`detect` would succeed, else one line saying why not, for a loud warning.
    It probes as :func:`detect` does, so on v2 it may make the same changes."""
    return _choose()[1]
