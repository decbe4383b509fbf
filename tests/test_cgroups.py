"""clusters.cgroups against this machine's real cgroup filesystem, with real processes.

Needs root and the layout of the development machines: cgroup v1 controllers (memory, pids,
cpu, freezer) mounted apart, and beside them a cgroup v2 hierarchy that has no controllers,
because v1 holds them all. So the limits are tested on v1 only. CgroupsV2 is tested on that
empty v2 hierarchy for everything that needs no controller: creating, joining, listing,
killing (cgroup.kill, and cgroup.freeze as kernels before 5.14 must), removing, and moving
the processes out of a cgroup that must pass controllers on (evict). Its limits
(memory.max, memory.swap.max, cpu.max, pids.max, and enabling the controllers in
cgroup.subtree_control) cannot be exercised on this machine: only the values it would write
and its refusal to limit without the controllers are checked here.

Every test's cgroups live below a root of its own and are killed and removed after it, pass
or fail; every process it forks is killed and reaped.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import select
import signal
import subprocess
import sys
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import pytest

from clusters import cgroups
from clusters.cgroups import CgroupError, Cgroups, CgroupsV1, CgroupsV2, Limits

MiB, GiB = 1 << 20, 1 << 30
HERE = cgroups.hierarchies()

#: Why this machine cannot run these tests, or None. Not a skip: the service's resource
#: limits rest on this code, and CI runs as root on machines with this layout, so a machine
#: without it fails every test here with the reason instead of passing nothing in silence.
MISSING = ("not root" if os.geteuid() != 0 else cgroups.why_not()
           or (None if HERE.v2 is not None else "no cgroup v2 mount"))


@pytest.fixture(autouse=True)
def _machine_has_the_layout() -> None:
    if MISSING is not None:
        pytest.fail(f"needs root, cgroup v1 controllers and a cgroup v2 mount: {MISSING}",
                    pytrace=False)


class Forks:
    """Child processes forked from the test process: each runs a function, then _exit()s; all
    are SIGKILLed and reaped at teardown whatever happened."""

    def __init__(self) -> None:
        self.pids: list[int] = []

    def __call__(self, body: Callable[[], object]) -> int:
        pid = os.fork()
        if pid == 0:  # the child: never return into pytest
            code = 70
            try:
                body()
                code = 0
            except BaseException:
                with contextlib.suppress(BaseException):
                    traceback.print_exc()
            finally:
                os._exit(code)
        self.pids.append(pid)
        return pid

    def wait(self, pid: int, timeout: float = 10.0) -> int:
        """The child's wait status, once it has ended."""
        deadline = time.monotonic() + timeout
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                self.pids.remove(pid)
                return status
            assert time.monotonic() < deadline, f"child {pid} still running"
            time.sleep(0.01)

    def cleanup(self) -> None:
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)


class Pipe:
    """Messages from children to the test, one line each."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()
        self.buffer = b""

    def send(self, text: str) -> None:
        os.write(self.w, text.encode())

    def line(self, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            assert left > 0 and select.select([self.r], [], [], left)[0], "no message from the child"
            chunk = os.read(self.r, 65536)
            assert chunk, "the children closed the pipe without a message"
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line.decode()

    def drain(self) -> str:
        """Everything sent, once every writer is gone (the test's own copy is closed here)."""
        os.close(self.w)
        while chunk := os.read(self.r, 65536):
            self.buffer += chunk
        return self.buffer.decode()

    def close(self) -> None:
        for fd in (self.r, self.w):
            with contextlib.suppress(OSError):
                os.close(fd)


def _make(kind: str) -> Cgroups:
    root = f"dp-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    if kind == "v1":
        return CgroupsV1(root, HERE.v1)
    assert HERE.v2 is not None
    return CgroupsV2(root, HERE.v2, use_kill_file=kind == "v2")


def _dirs(cg: Cgroups, path: tuple[str, ...] = ()) -> list[Path]:
    controllers = cgroups.V1_CONTROLLERS if cg.version == 1 else ("memory",)
    return [cg.where(c, path) for c in controllers]


@contextlib.contextmanager
def _tree(kind: str) -> Iterator[Cgroups]:
    cg = _make(kind)
    try:
        yield cg
    finally:
        cg.remove((), timeout=10)
        assert not any(d.exists() for d in _dirs(cg)), "the test root is still there"


@pytest.fixture
def forks() -> Iterator[Forks]:
    made = Forks()
    try:
        yield made
    finally:
        made.cleanup()


@pytest.fixture
def pipe() -> Iterator[Pipe]:
    made = Pipe()
    try:
        yield made
    finally:
        made.close()


@pytest.fixture(params=["v1", "v2", "v2-freeze"])
def cg(request: pytest.FixtureRequest, forks: Forks) -> Iterator[Cgroups]:
    """Each implementation: v1 with its controllers, v2 (cgroup.kill, or cgroup.freeze)
    on the controller-less v2 hierarchy. Torn down before ``forks``, so it kills first."""
    with _tree(request.param) as made:
        yield made


@pytest.fixture
def v1(forks: Forks) -> Iterator[Cgroups]:
    with _tree("v1") as made:
        yield made


def _sleep_forever() -> None:
    while True:
        time.sleep(60)


def _ended(pid: int, timeout: float = 5.0) -> Callable[[], bool]:
    """Watch a process (not necessarily a child) through a pidfd: call to learn whether it
    has ended within ``timeout`` (a pid reused meanwhile cannot fool it)."""
    fd = os.pidfd_open(pid)

    def ended() -> bool:
        try:
            return bool(select.select([fd], [], [], timeout)[0])
        finally:
            os.close(fd)
    return ended


def _until(done: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Whether ``done()`` comes true within ``timeout`` seconds (polled)."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _own_cgroups(pid: int) -> str:
    return Path(f"/proc/{pid}/cgroup").read_text()


# --- names, limits and layouts: nothing on disk -------------------------------------------

BAD_NAMES = ["", ".", "..", "../x", "a/b", "/a", "x" * 65, "a b", "é", "a\n", "a\x00", ".hidden", "tasks"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_invalid_names_are_refused_before_anything_is_touched(name: str) -> None:
    cg = _make("v1")
    calls: list[Callable[[], object]] = [
        partial(cg.create, (name,)), partial(cg.create, ("c-1", name), Limits(memory=MiB)),
        partial(cg.join, (name,)), partial(cg.pids, ("c-1", name)), partial(cg.children, (name,)),
        partial(cg.kill, (name,)), partial(cg.remove, (name,)), partial(cg.oom_kills, (name,)),
        partial(cg.where, "memory", (name,)),
    ]
    if "/" not in name:  # a root may have several parts: "a/b" is a fine one
        calls += [partial(cgroups.detect, name), partial(cgroups.detect, f"dp/{name}"),
                  partial(CgroupsV2, name, HERE.v2)]
    for call in calls:
        with pytest.raises(ValueError):
            call()
    assert not any(d.exists() for d in _dirs(cg))


def test_a_path_must_be_a_sequence_of_names_not_a_string() -> None:
    cg = _make("v1")
    with pytest.raises(ValueError):
        cg.create("c-1")  # would otherwise be ("c", "-", "1")
    good = ["c-1a2b", "worker-x", "w.1_A", "x" * 64]
    assert [cgroups.check_name(n) for n in good] == good


@pytest.mark.parametrize("bad", [{"memory": 0}, {"memory": True}, {"memory": 1.5}, {"pids": 0},
                                 {"pids": -1}, {"cpus": 0}, {"cpus": -0.5}, {"cpus": float("nan")},
                                 {"cpus": float("inf")}, {"cpus": "1"}])
def test_limits_are_checked(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Limits(**bad)  # type: ignore[arg-type]


def test_v2_settings_are_what_cgroup_v2_expects() -> None:
    assert cgroups.v2_settings(Limits(memory=GiB, cpus=1.5, pids=100)) == [
        ("memory.max", str(GiB), True), ("memory.swap.max", "0", False),
        ("cpu.max", "150000 100000", True), ("pids.max", "100", True)]
    assert cgroups.v2_settings(Limits(cpus=0.001)) == [
        ("memory.max", "max", False), ("memory.swap.max", "max", False),
        ("cpu.max", "1000 100000", True), ("pids.max", "max", False)]


PURE_V2 = """\
24 30 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
30 24 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate
"""
CONTAINER_V1 = """\
700 690 0:40 /docker/abc /sys/fs/cgroup/memory ro,nosuid - cgroup cgroup rw,memory
701 690 0:41 / /mnt/my\\040cg rw - cgroup cgroup rw,cpu,cpuacct
702 690 0:42 /elsewhere /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids
"""


def test_hierarchies_are_found_from_mountinfo_and_the_process_cgroups() -> None:
    pure = cgroups.hierarchies(PURE_V2, "0::/system.slice/dp.service\n")
    assert pure == cgroups.Hierarchies(Path("/sys/fs/cgroup/system.slice/dp.service"), {})
    boxed = cgroups.hierarchies(CONTAINER_V1, "5:memory:/docker/abc/svc\n3:cpu,cpuacct:/\n2:pids:/x\n0::/\n")
    assert boxed.v2 is None
    assert boxed.v1 == {"memory": Path("/sys/fs/cgroup/memory/svc"), "cpu": Path("/mnt/my cg"),
                        "cpuacct": Path("/mnt/my cg")}  # pids: its mount does not show /x
    assert HERE.v1["memory"].is_dir() and (HERE.v1["memory"] / "memory.limit_in_bytes").exists()


def test_detect_picks_v1_on_this_machine_and_creates_nothing() -> None:
    assert cgroups.why_not() is None
    cg = cgroups.detect("dp-test-detect/inner")
    assert isinstance(cg, CgroupsV1) and cg.version == 1
    assert cg.root == ("dp-test-detect", "inner")
    assert not cg.where("memory").parent.exists()
    with pytest.raises(ValueError):
        cg.where("blkio")


# --- every implementation: join, list, kill, remove --------------------------------------

def test_join_from_a_freshly_forked_child_then_drop_root(cg: Cgroups, forks: Forks, pipe: Pipe) -> None:
    path = ("c-1a2b", "worker-x")
    cg.create(path)

    def child() -> None:
        cg.join(path)  # pid 0: the caller
        os.setgid(65534)
        os.setuid(65534)
        pipe.send(f"{os.getuid()}\n")
        _sleep_forever()

    pid = forks(child)
    assert pipe.line() == "65534"
    assert cg.pids(path) == cg.pids(("c-1a2b",)) == cg.pids() == {pid}
    where = "/" + "/".join((*cg.root, *path))
    lines = [line for line in _own_cgroups(pid).splitlines() if line.endswith(where)]
    assert len(lines) == (4 if cg.version == 1 else 1), _own_cgroups(pid)

    other = forks(_sleep_forever)  # and a pid given by its parent
    cg.join(path, other)
    assert cg.pids(path) == {pid, other}


def test_join_as_a_subprocess_preexec_fn(cg: Cgroups, forks: Forks) -> None:
    path = ("c-1", "scheduler")
    cg.create(path)
    out = subprocess.run([sys.executable, "-c", "print(open('/proc/self/cgroup').read())"],
                         preexec_fn=partial(cg.join, path), capture_output=True, text=True, check=True)
    assert "/" + "/".join((*cg.root, *path)) in out.stdout
    with pytest.raises(CgroupError) as missing:
        cg.join(("c-1", "nowhere"), forks(_sleep_forever))
    assert missing.value.errno == errno.ENOENT


def test_pids_and_children_see_descendants(cg: Cgroups, forks: Forks, pipe: Pipe) -> None:
    cg.create(("c-1", "scheduler"))
    cg.create(("c-1", "workers", "worker-1"))
    cg.create(("c-2",))

    def scheduler() -> None:
        cg.join(("c-1", "scheduler"))
        _sleep_forever()

    def worker() -> None:
        cg.join(("c-1", "workers", "worker-1"))
        nanny = os.fork()  # a process of its own, in its cgroup without being put there
        if nanny == 0:
            _sleep_forever()
        pipe.send(f"{nanny}\n")
        _sleep_forever()

    a, b = forks(scheduler), forks(worker)
    b_child = int(pipe.line())
    assert _until(lambda: a in cg.pids(("c-1", "scheduler")))
    assert cg.pids(("c-1",)) == cg.pids() == {a, b, b_child}
    assert cg.pids(("c-1", "workers")) == {b, b_child}
    assert cg.pids(("c-1", "scheduler")) == {a}
    assert cg.pids(("c-2",)) == cg.pids(("c-3",)) == set()
    assert cg.children() == ["c-1", "c-2"]
    assert cg.children(("c-1",)) == ["scheduler", "workers"]
    assert cg.children(("c-1", "scheduler")) == cg.children(("c-3",)) == []


def test_kill_gets_a_grandchild_that_setsid_and_double_forked(cg: Cgroups, forks: Forks, pipe: Pipe) -> None:
    path = ("c-1", "worker-x")
    cg.create(path)

    def child() -> None:
        cg.join(path)
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                pipe.send(f"{os.getpid()}\n")
                _sleep_forever()
            os._exit(0)
        os._exit(0)

    direct = forks(child)
    detached = int(pipe.line())
    assert os.WIFEXITED(forks.wait(direct))  # its parent and grandparent are gone
    assert os.getsid(detached) != os.getsid(0)
    ended = _ended(detached)
    assert _until(lambda: cg.pids(("c-1",)) == {detached})  # the middle one is gone too
    cg.kill(("c-1",))
    assert ended(), "the detached process survived"
    assert cg.pids(("c-1",)) == set()


def test_kill_gets_processes_that_keep_forking(cg: Cgroups, forks: Forks, pipe: Pipe) -> None:
    path = ("c-1", "worker-x")
    cg.create(path)

    def hopper() -> None:  # a new pid every few ms: the old one exits as soon as it forked
        while True:
            if os.fork():
                os._exit(0)

    def spawner() -> None:  # a steady stream of short-lived children
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps them
        while True:
            if os.fork() == 0:
                os._exit(0)

    def child(body: Callable[[], None]) -> None:
        cg.join(path)
        pipe.send("in\n")
        body()

    first = forks(partial(child, hopper))
    forks(partial(child, spawner))
    assert pipe.line() == pipe.line() == "in"
    assert _until(lambda: first not in cg.pids(path)), "the hopper did not hop"
    assert len(cg.pids(path)) >= 2
    cg.kill(("c-1",), timeout=5)
    assert cg.pids(("c-1",)) == set()
    time.sleep(0.2)  # nothing forked during the kill survived it
    assert cg.pids() == set()


def test_kill_of_a_missing_or_empty_cgroup_returns(cg: Cgroups) -> None:
    cg.kill(("missing",))
    cg.create(("c-1",))
    cg.kill(("c-1",), timeout=0.5)
    assert cg.children() == ["c-1"]


def test_kill_refuses_to_kill_its_caller(cg: Cgroups, forks: Forks, pipe: Pipe) -> None:
    path = ("c-1", "worker-x")
    cg.create(path)

    def child() -> None:
        cg.join(path)
        try:
            cg.kill(("c-1",))
        except CgroupError as e:
            pipe.send(f"{e.errno}\n")
        _sleep_forever()

    forks(child)
    assert int(pipe.line()) == errno.EDEADLK
    cg.kill(("c-1",))
    assert cg.pids() == set()


@pytest.mark.parametrize("kind", ["v1", "v2-freeze"])
def test_a_kill_that_cannot_empty_the_cgroup_fails_and_leaves_it_thawed(
        kind: str, forks: Forks, pipe: Pipe, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the signals lost (as for a process stuck in the kernel), kill() gives up after its
    timeout with CgroupError, and does not leave the processes frozen."""
    with _tree(kind) as cg:
        path = ("c-1", "worker-x")
        cg.create(path)

        def child() -> None:
            cg.join(path)
            pipe.send("in\n")
            while True:
                pipe.send(".\n")
                time.sleep(0.01)

        forks(child)
        assert pipe.line() == "in"
        with monkeypatch.context() as patch:
            patch.setattr(cgroups, "_sigkill", lambda pids: None)
            started = time.monotonic()
            with pytest.raises(CgroupError, match="still has processes"):
                cg.kill(("c-1",), timeout=0.3)
            assert time.monotonic() - started < 3
        if cg.version == 1:
            assert _read(cg, "freezer", ("c-1",), "freezer.state") == "THAWED"
        else:
            assert _read(cg, "memory", ("c-1",), "cgroup.freeze") == "0"
            assert _read(cg, "memory", ("c-1",), "cgroup.events").endswith("frozen 0")
        while select.select([pipe.r], [], [], 0)[0]:  # what it wrote before: not proof
            os.read(pipe.r, 65536)
        pipe.buffer = b""
        assert pipe.line() == "."  # it runs on


def test_remove_leaves_no_directory_behind(cg: Cgroups, forks: Forks, pipe: Pipe) -> None:
    for path in [("c-1", "scheduler"), ("c-1", "workers", "worker-1"), ("c-2", "scheduler")]:
        cg.create(path)

    def child() -> None:
        cg.join(("c-1", "workers", "worker-1"))
        pipe.send("in\n")
        _sleep_forever()

    pid = forks(child)
    assert pipe.line() == "in"
    ended = _ended(pid)
    cg.remove(("c-1",))
    assert ended()
    assert not any(d.exists() for d in _dirs(cg, ("c-1",)))
    assert cg.children() == ["c-2"]
    cg.remove(("c-1",))  # gone already: fine
    cg.remove(())
    assert not any(d.exists() for d in _dirs(cg))


def test_v2_refuses_limits_its_controllers_cannot_hold() -> None:
    """On this machine's v2 hierarchy no controller is available: asking for a limit is an
    error that says so, never a cgroup that silently is not limited."""
    cg = _make("v2")
    try:
        cg.create(("c-1",), Limits())  # nothing to set, nothing missing
        for limits in (Limits(memory=64 * MiB), Limits(cpus=0.5), Limits(pids=10)):
            with pytest.raises(CgroupError, match="not available"):
                cg.create(("c-1", "worker-x"), limits)
    finally:
        cg.remove(())


def test_evict_empties_a_v2_cgroup_into_its_service_leaf(forks: Forks, pipe: Pipe) -> None:
    """What detect() does on v2 when processes live in the service's own cgroup (a systemd
    unit's, a container's), so that it may pass controllers on; here on a stand-in for it."""
    with _tree("v2") as cg:
        cg.create(("unit",))
        unit = cg.where("memory", ("unit",))

        def child(body: Callable[[], None]) -> None:
            cg.join(("unit",))
            pipe.send("in\n")
            body()

        def spawner() -> None:  # keeps forking into the cgroup being emptied
            signal.signal(signal.SIGCHLD, signal.SIG_IGN)
            while True:
                if os.fork() == 0:
                    time.sleep(0.01)
                    os._exit(0)
                time.sleep(0.001)

        sleepers = {forks(partial(child, _sleep_forever)) for _ in range(2)}
        forks(partial(child, spawner))
        assert [pipe.line() for _ in range(3)] == ["in"] * 3
        leaf = cgroups.evict(unit)
        assert leaf == unit / cgroups.SERVICE_LEAF
        assert (unit / "cgroup.procs").read_text() == ""
        assert sleepers <= cg.pids(("unit", cgroups.SERVICE_LEAF))
        assert cgroups.evict(unit) == leaf  # again: nothing to move, fine
        with pytest.raises(ValueError):
            CgroupsV2(f"{cgroups.SERVICE_LEAF}/x", unit)


# --- v1: the limits hold ---------------------------------------------------------------------

def _read(cg: Cgroups, controller: str, path: tuple[str, ...], file: str) -> str:
    return (cg.where(controller, path) / file).read_text().strip()


def _stat(cg: Cgroups, controller: str, path: tuple[str, ...], file: str, key: str) -> int:
    for line in _read(cg, controller, path, file).splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return int(value)
    raise AssertionError(f"no {key} in {file}")


def test_limits_are_written_and_can_be_changed(v1: Cgroups) -> None:
    path = ("c-1", "worker-x")
    memsw = (v1.where("memory", path).parent / "memory.memsw.limit_in_bytes").exists()
    v1.create(path, Limits(memory=64 * MiB, cpus=0.25, pids=20))
    assert _read(v1, "memory", path, "memory.limit_in_bytes") == str(64 * MiB)
    if memsw:
        assert _read(v1, "memory", path, "memory.memsw.limit_in_bytes") == str(64 * MiB)
    assert _read(v1, "memory", path, "memory.use_hierarchy") == "1"
    assert _read(v1, "cpu", path, "cpu.cfs_period_us") == "100000"
    assert _read(v1, "cpu", path, "cpu.cfs_quota_us") == "25000"
    assert _read(v1, "pids", path, "pids.max") == "20"
    assert _read(v1, "cpu", ("c-1",), "cpu.cfs_quota_us") == "-1"  # parents are left unlimited

    v1.create(path, Limits(memory=128 * MiB, cpus=0.001))  # raising memory: memsw first
    assert _read(v1, "memory", path, "memory.limit_in_bytes") == str(128 * MiB)
    assert _read(v1, "cpu", path, "cpu.cfs_quota_us") == "1000"  # the kernel's smallest
    assert _read(v1, "pids", path, "pids.max") == "max"
    v1.create(path, Limits(memory=32 * MiB))  # lowering: limit_in_bytes first
    assert _read(v1, "memory", path, "memory.limit_in_bytes") == str(32 * MiB)
    if memsw:
        assert _read(v1, "memory", path, "memory.memsw.limit_in_bytes") == str(32 * MiB)
    v1.create(path)  # no limits given: none touched
    assert _read(v1, "memory", path, "memory.limit_in_bytes") == str(32 * MiB)
    v1.create(path, Limits())
    assert int(_read(v1, "memory", path, "memory.limit_in_bytes")) > 1 << 60
    assert _read(v1, "cpu", path, "cpu.cfs_quota_us") == "-1"


def test_over_its_memory_limit_a_process_is_oom_killed_and_counted(v1: Cgroups, forks: Forks, pipe: Pipe) -> None:
    path = ("c-1", "worker-x")
    v1.create(path, Limits(memory=64 * MiB))

    def child() -> None:
        v1.join(path)
        hoard = []
        for _ in range(1024):
            hoard.append(b"\x01" * MiB)  # every page written
            pipe.send(".")

    pid = forks(child)
    status = forks.wait(pid)
    allocated = len(pipe.drain())
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
    assert 0 < allocated < 64
    assert v1.oom_kills(path) == 1
    assert v1.oom_kills(("c-1",)) == v1.oom_kills() == 1  # v1 counts in the victim's cgroup only: summed
    assert v1.oom_kills(("c-2",)) == 0


_libc = ctypes.CDLL(None, use_errno=True)
_CLONE_NEWNS, _MS_REC, _MS_PRIVATE = 0x00020000, 0x4000, 1 << 18


def _private_tmpfs(where: Path, size: str) -> None:
    """Mount a tmpfs in a mount namespace of the calling process's own: it is gone, pages
    and all, when that process ends, whatever happens to the test."""
    for ok in (_libc.unshare(_CLONE_NEWNS) == 0,
               _libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None) == 0,
               _libc.mount(b"tmpfs", str(where).encode(), b"tmpfs", 0, f"size={size}".encode()) == 0):
        if not ok:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))


def test_tmpfs_pages_written_count_toward_the_memory_limit(v1: Cgroups, forks: Forks, pipe: Pipe,
                                                          tmp_path: Path) -> None:
    path = ("c-1", "worker-x")
    v1.create(path, Limits(memory=32 * MiB))
    mount = tmp_path / "tmpfs"
    mount.mkdir()

    def child() -> None:
        v1.join(path)
        _private_tmpfs(mount, "256m")  # room for 8 times the limit
        chunk = b"\x01" * MiB
        fd = os.open(mount / "fill", os.O_WRONLY | os.O_CREAT)
        try:
            for _ in range(256):
                os.write(fd, chunk)
                pipe.send(".")
        except OSError as e:
            pipe.send(f"refused: {errno.errorcode[e.errno]}")
            os._exit(3)

    pid = forks(child)
    status = forks.wait(pid)
    report = pipe.drain()
    written = report.count(".")
    killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    refused = os.WIFEXITED(status) and os.WEXITSTATUS(status) == 3
    assert killed or refused, (status, report)
    assert 8 <= written < 32, report  # stopped by the cgroup, not by the tmpfs size
    assert _stat(v1, "memory", path, "memory.oom_control", "oom_kill") == (1 if killed else 0)
    peak = int(_read(v1, "memory", path, "memory.max_usage_in_bytes"))
    assert written * MiB <= peak <= 32 * MiB  # the file's pages were charged, up to the limit
    assert not os.path.ismount(mount)  # it was the child's alone


def test_a_fork_bomb_stops_at_pids_max_and_is_killed(v1: Cgroups, forks: Forks, pipe: Pipe) -> None:
    path = ("c-1", "worker-x")
    v1.create(path, Limits(pids=12))
    os.set_blocking(pipe.w, False)

    def bomb() -> None:
        """Every process forks on; bounded (4 children each, 4 generations: 341 processes at
        most) in case the limit does not hold."""
        generation, made = 0, 0
        while True:
            if generation >= 4 or made >= 4:
                time.sleep(0.05)
                continue
            try:
                pid = os.fork()
            except OSError as e:
                with contextlib.suppress(OSError):
                    pipe.send("EAGAIN\n" if e.errno == errno.EAGAIN else f"{e!r}\n")
                time.sleep(0.005)  # and try again, as a bomb does
                continue
            if pid == 0:
                generation, made = generation + 1, 0
            else:
                made += 1

    def child() -> None:
        v1.join(path)
        bomb()

    bomber = forks(child)
    assert pipe.line() == "EAGAIN"
    assert len(v1.pids(path)) <= 12
    assert int(_read(v1, "pids", path, "pids.current")) <= 12
    assert _stat(v1, "pids", path, "pids.events", "max") > 0
    v1.kill(path)
    assert v1.pids(path) == set()
    forks.wait(bomber)  # zombies still count in pids.current until reaped (by init, the others)
    assert _until(lambda: _read(v1, "pids", path, "pids.current") == "0")


def test_a_busy_loop_is_throttled_to_its_cpu_quota(v1: Cgroups, forks: Forks) -> None:
    path = ("c-1", "worker-x")
    v1.create(path, Limits(cpus=0.1))

    def child() -> None:
        v1.join(path)
        while True:
            pass

    forks(child)
    assert _until(lambda: _stat(v1, "cpu", path, "cpu.stat", "nr_throttled") > 0)
    assert _stat(v1, "cpu", path, "cpu.stat", "nr_throttled") > 0
    assert _stat(v1, "cpu", path, "cpu.stat", "throttled_time") > 0
    v1.kill(path)
