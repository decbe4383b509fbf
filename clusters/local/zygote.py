"""The fork server process: distributed imported once, a fresh fork for every scheduler and worker.

``python -m clusters.local.zygote`` is started by :class:`~clusters.local.forkserver.ForkServerLauncher`
with one end of a SOCK_SEQPACKET socket pair on fd 3. It imports everything a cluster process
needs, then blocks in ``recvmsg`` (no threads, no event loop, no timers: an idle machine stays
idle). Each request is the message ``fork`` with two descriptors attached: the ready pipe's
write end and a memfd holding the JSON request (role, options, env, log path). The zygote
forks without reading the request, and the child reads it and becomes the cluster process:

* it leads its own session (``setsid``), so it is signalled as a group and outlives the service;
* ``os.environ`` is replaced by exactly the environment the service gave it;
* stdin is /dev/null, stdout and stderr go to the log file, every other inherited fd is closed;
* it runs :func:`clusters.runner.run`, the code a spawned ``python -m clusters.runner`` runs:
  it confines itself when asked (:mod:`clusters.sandbox`), only then takes the tenant's
  environment and collects Dask's config again from it, serves, and reports readiness as one
  JSON line on the ready fd.

The zygote itself never runs a cluster, so no state passes from one cluster to the next; its
children are reaped by the kernel (SIGCHLD ignored). It exits when the service's end of the
socket closes, which happens however the service dies.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import signal
import socket
import sys
import tempfile
import traceback
from typing import Any

import dask.config

from clusters.local.spawn import LOG_FLAGS
from clusters.runner import run
from clusters.sandbox.mounts import runtime_paths

CONTROL_FD = 3
READY_FD = 3


def _preload() -> None:
    """Import what a scheduler or worker would otherwise import lazily on its first start."""
    names = [
        "distributed", "clusters.plugin", "clusters.daskconfig", "psutil", "tornado.ioloop",  # runner
        *dask.config.get("distributed.scheduler.http.routes", []),
        *dask.config.get("distributed.worker.http.routes", []),
        "distributed.diagnostics.websocket", "distributed.http.proxy", "distributed.http.statics",
        "distributed.dashboard.scheduler",  # the bokeh dashboard, when bokeh is installed
        "tornado.platform.asyncio", "prometheus_client",
        # reading package metadata (entry points of comm backends and plugins) needs these
        "email.policy", "email.headerregistry", "email.contentmanager",
        "importlib_metadata._adapters",
    ]
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as exc:  # an optional extra is missing: it is imported later, if at all
            print(f"fork server: not preloading {name}: {exc!r}", file=sys.stderr)
    runtime_paths()  # what a private root binds, found once for every fork


def _fresh_randomness() -> None:
    """Python's ``random`` reseeds itself after fork; NumPy's global generator does not."""
    numpy_random = sys.modules.get("numpy.random")
    if numpy_random is not None:
        numpy_random.seed()


def _read_request(fd: int) -> dict[str, Any]:
    chunks = []
    offset = 0
    while chunk := os.pread(fd, 1 << 16, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return json.loads(b"".join(chunks))


def _become_cluster_process(ready: int, payload: int, synced: int) -> int:
    """In the forked child: detach, read the request, take its environment and log, then serve."""
    os.setsid()
    os.write(synced, b"s")
    os.close(synced)
    request = _read_request(payload)
    for sig in (signal.SIGCHLD, signal.SIGINT, signal.SIGTERM):  # SIGPIPE stays ignored, as in Python
        signal.signal(sig, signal.SIG_DFL)

    devnull = os.open(os.devnull, os.O_RDONLY)
    log = os.open(request["log"], LOG_FLAGS, 0o600)
    os.dup2(devnull, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.dup2(ready, READY_FD)  # also drops the control socket, which sat on this fd
    os.closerange(READY_FD + 1, os.sysconf("SC_OPEN_MAX"))

    os.environ.clear()
    os.environ.update(request["env"])
    tempfile.tempdir = None  # found again from TMPDIR and friends of the new environment
    _fresh_randomness()
    gc.unfreeze()
    return run(request["role"], request["options"], READY_FD)


def _fork(ready: int, payload: int) -> int:
    """Fork one cluster process; return its pid once it leads its own session.

    The request (a tenant's environment, TLS key, ...) is read by the child alone: the zygote
    never has it in its memory, so no later fork can find a trace of it.
    """
    sync_r, sync_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(sync_r)
            code = _become_cluster_process(ready, payload, sync_w)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    os.close(sync_w)
    try:
        os.read(sync_r, 1)  # b"" means the child died before setsid: its exit is seen anyway
    finally:
        os.close(sync_r)
    return pid


def _serve_requests(control: socket.socket) -> None:
    while True:
        try:
            data, ancdata, _flags, _addr = control.recvmsg(64, socket.CMSG_SPACE(8))
        except InterruptedError:
            continue
        if not data:
            return  # the service is gone
        fds = [
            fd
            for level, kind, payload in ancdata
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS
            for fd in memoryview(payload).cast("i")
        ]
        try:
            if data != b"fork" or len(fds) != 2:
                raise ValueError("expected b'fork' with a ready fd and a request fd")
            reply: dict[str, int | str] = {"pid": _fork(*fds)}
        except Exception as exc:
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            for fd in fds:
                os.close(fd)
        control.send(json.dumps(reply).encode())


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the service; we follow it out
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps our children
    control = socket.socket(fileno=CONTROL_FD)
    _preload()
    gc.collect()
    gc.freeze()  # keep the imported modules' pages shared with the children
    control.send(json.dumps({"ready": os.getpid()}).encode())
    try:
        _serve_requests(control)
    except (ConnectionError, OSError):
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
