"""What a hostile tenant's code tries from inside its own cluster processes.

Each function here runs in a scheduler or worker (``client.run_on_scheduler`` or a task) and
returns plain data saying what it could and could not do; the tests assert on it. They live
in a module of their own so that cluster processes import them by name (the module is on
the runtime's path), as tenants' own libraries would be.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import threading
from typing import Any

#: Devices a cluster process may see (everything else of the host's /dev is absent).
ALLOWED_DEVICES = {"null", "zero", "full", "random", "urandom", "tty", "pts", "ptmx", "shm",
                   "fd", "stdin", "stdout", "stderr"}


def outcome(action: Any) -> str:
    """``allowed`` or why not: ``denied`` (permission), ``absent`` (no such file), ``error N``."""
    try:
        action()
        return "allowed"
    except PermissionError:
        return "denied"
    except FileNotFoundError:
        return "absent"
    except ProcessLookupError:
        return "no such process"
    except OSError as exc:
        return f"error {exc.errno}"


def _read(path: str) -> None:
    if os.path.isdir(path):
        os.listdir(path)
    else:
        with open(path, "rb") as f:
            f.read(1)


def _status() -> dict[str, str]:
    with open("/proc/self/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def identity() -> dict[str, Any]:
    """Who the process is and what it may still do."""
    status = _status()
    return {"uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(),
            "groups": os.getgroups(), "cap_eff": int(status["CapEff"], 16),
            "cap_bnd": int(status["CapBnd"], 16), "no_new_privs": status.get("NoNewPrivs"),
            "setuid_root": outcome(lambda: os.setuid(0)),
            "home": os.environ.get("HOME"), "cwd": os.getcwd()}


def reach(paths: dict[str, str], pids: dict[str, int], socket_path: str,
          port: int) -> dict[str, str]:
    """Files, processes, sockets and ports of others: what can be read, signalled, bound."""
    found = {f"read {label}": outcome(lambda p=path: _read(p)) for label, path in paths.items()}
    for label, pid in pids.items():
        found[f"see {label}"] = "yes" if os.path.exists(f"/proc/{pid}") else "no"
        found[f"environ of {label}"] = outcome(lambda p=pid: _read(f"/proc/{p}/environ"))
        found[f"signal {label}"] = outcome(lambda p=pid: os.kill(p, 0))

    def connect_unix() -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(socket_path)

    found["connect root's unix socket"] = outcome(connect_unix)

    def bind(number: int) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", number))

    found["bind a chosen port"] = outcome(lambda: bind(port))
    found["bind an ephemeral port"] = outcome(lambda: bind(0))
    devices = os.listdir("/dev")
    found["extra devices"] = ",".join(sorted(set(devices) - ALLOWED_DEVICES)) or "none"
    found["block devices"] = ",".join(
        d for d in devices if stat.S_ISBLK(os.lstat(f"/dev/{d}").st_mode)) or "none"
    found["write own folder"] = outcome(
        lambda: open(os.path.join(os.environ["HOME"], "probe"), "w").write("x"))
    found["write /tmp"] = outcome(lambda: open("/tmp/probe", "w").write("x"))
    found["write /usr"] = outcome(lambda: open("/usr/probe", "w").write("x"))
    return found


def leave_shared_memory(name: str, marker: str) -> list[str]:
    """Write a POSIX shared memory object; return what else this process sees there."""
    with open(f"/dev/shm/{name}", "w") as f:
        f.write(marker)
    return sorted(os.listdir("/dev/shm"))


def fill(path: str, nbytes: int) -> str:
    """Write ``nbytes`` to ``path`` (a tmpfs file, say); ``done`` or the error's errno name."""
    chunk = b"x" * (1 << 20)
    try:
        with open(path, "wb") as f:
            for _ in range(nbytes // len(chunk)):
                f.write(chunk)
        return "done"
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc.errno))
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass


def allocate_in_child(nbytes: int) -> int:
    """A child process that touches ``nbytes`` of memory; its exit status (-9: killed)."""
    import subprocess
    import sys

    code = f"b = bytearray({nbytes})\nfor i in range(0, len(b), 4096): b[i] = 1\n"
    return subprocess.run([sys.executable, "-c", code], check=False).returncode


def threads_until_refused(limit: int = 5000) -> int:
    """Start threads until the kernel refuses one (or ``limit``); how many were started."""
    release = threading.Event()
    started: list[threading.Thread] = []
    try:
        for _ in range(limit):
            thread = threading.Thread(target=release.wait, daemon=True)
            try:
                thread.start()
            except RuntimeError:
                break
            started.append(thread)
    finally:
        release.set()
        for thread in started:
            thread.join()
    return len(started)


def escape(seconds: int = 600) -> int:
    """Start a process in a session of its own with an empty environment; its pid."""
    import subprocess

    return subprocess.Popen(["sleep", str(seconds)], start_new_session=True, env={},
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL).pid


def plant_config(preload: str, report: str) -> str:
    """Write a Dask config file into HOME whose worker preload records how it ran; the next
    worker of this cluster reads it (after it confined itself, or the test fails)."""
    home = os.environ["HOME"]
    script = os.path.join(home, "planted_preload.py")
    with open(script, "w") as f:
        f.write(
            "import json, os\n"
            f"def check(p):\n"
            f"    try:\n        open(p, 'rb').read(1); return 'allowed'\n"
            f"    except FileNotFoundError: return 'absent'\n"
            f"    except PermissionError: return 'denied'\n"
            f"with open({report!r}, 'w') as out:\n"
            f"    json.dump({{'uid': os.getuid(), 'secret': check({preload!r})}}, out)\n")
    folder = os.path.join(home, ".config", "dask")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "planted.yaml"), "w") as f:
        f.write(f"distributed:\n  worker:\n    preload: [{script!r}]\n"
                f"  scheduler:\n    allowed-failures: 7\n")
    return script


def read_json(path: str) -> Any:
    import json

    with open(path) as f:
        return json.load(f)


class Pwn:
    """Unpickling this anywhere runs ``touch path``: the proof a pickle was loaded."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.path}",))


def poisoned_answers(canary: str) -> dict[str, bytes]:
    """What a tenant's scheduler can send the service instead of its plugin's report."""
    import json
    import pickle

    from distributed.protocol import dumps as dask_dumps

    pickled = pickle.dumps(Pwn(canary))
    frames = dask_dumps({"op": "reply", "value": Pwn(canary)})
    forged = "\n2026-01-01 00:00:00,000 level=ERROR logger=provisioner.forged FORGED-LINE"
    report = {"version": 7, "workers": [f"w{forged}"], "clients": 1, "busy": True,
              "idle_for": None, "no_client_for": None, "adaptive_target": 0}
    return {
        "pickle": pickled,
        "dask frames": b"".join(bytes(f) for f in frames),
        "json with pickle": json.dumps({"__Pickled__": pickled.hex(), **report}).encode(),
        "wrong types": json.dumps({**report, "version": "7", "workers": "all",
                                   "busy": "yes", "adaptive_target": 1e300}).encode(),
        "forged log line": json.dumps(report).encode(),
        "too many workers": json.dumps({**report, "workers": ["w"] * 200_000}).encode(),
        "huge": b'{"version": 7, "pad": "' + b"x" * (64 * 2**20) + b'"}',
    }


def poison_reports(body: bytes) -> None:
    """On the scheduler: answer the service's next report long-poll with ``body`` instead of
    the plugin's report, counting it in ``scheduler.poisoned`` (``client.run_on_scheduler``)."""
    from clusters import plugin

    original = getattr(plugin.ReportHandler, "original_get", plugin.ReportHandler.get)
    plugin.ReportHandler.original_get = original

    def get(self: Any) -> None:
        scheduler = self.plugin.scheduler
        scheduler.poisoned = getattr(scheduler, "poisoned", 0) + 1
        plugin.ReportHandler.get = original  # once: the next poll gets the truth again
        self.set_header("Content-Type", "application/json")
        self.finish(body)

    plugin.ReportHandler.get = get


def answers_poisoned(dask_scheduler: Any = None) -> int:
    return int(getattr(dask_scheduler, "poisoned", 0))
