"""The versions that decide whether a client and a cluster understand each other: Python and
the packages that serialise tasks and data. Read here (the SDK's process) and, by the same
script, in another interpreter (a cluster environment's, at the service's start), and
compared in plain words before any task fails. No server dependencies: the SDK imports this.
"""

from __future__ import annotations

import functools
import inspect
import json
import subprocess
import textwrap

#: What a task and its data need on both sides (besides the user's own packages).
KEY_PACKAGES = ("dask", "distributed", "cloudpickle", "msgpack", "toolz", "numpy", "pandas",
                "pyarrow", "lz4")

def _collect(names: tuple[str, ...]) -> dict[str, str]:
    """Python's version and those of ``names`` that are installed (stdlib only: this function's
    text also runs in other interpreters, see ``SCRIPT``)."""
    import importlib.metadata
    import platform

    found = {"python": platform.python_version()}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


#: What another interpreter runs to print its versions as JSON.
SCRIPT = (textwrap.dedent(inspect.getsource(_collect)).replace(" -> dict[str, str]", "")
          .replace("names: tuple[str, ...]", "names")
          + f"\nimport json\nprint(json.dumps(_collect({KEY_PACKAGES!r})))\n")

#: Longest answer the script may give (a few hundred bytes in practice).
MAX_ANSWER = 16 * 1024


@functools.cache
def installed_versions() -> dict[str, str]:
    """This process's versions (read once: they do not change while it runs, and reading
    package metadata walks the disk)."""
    return _collect(KEY_PACKAGES)


def versions_of(python: str, timeout: float = 60) -> dict[str, str]:
    """Another interpreter's versions (blocking; isolated mode, so nothing of this process's
    environment leaks in). ValueError if it cannot tell."""
    try:
        done = subprocess.run([python, "-I", "-c", SCRIPT], capture_output=True, timeout=timeout,
                              env={"PATH": "/usr/bin:/bin"}, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ValueError(f"{python} could not be run: {exc}") from None
    if done.returncode != 0:
        raise ValueError(f"{python} exited with status {done.returncode}")
    return _parse(done.stdout[:MAX_ANSWER].decode("utf-8", "replace"))


def _parse(text: str) -> dict[str, str]:
    try:
        found = json.loads(text)
    except ValueError:
        raise ValueError("the versions are not JSON") from None
    if not isinstance(found, dict):
        raise ValueError("the versions are not a JSON object")
    return {str(k)[:64]: str(v)[:64] for k, v in found.items() if isinstance(v, str)}


def differences(client: dict[str, str], cluster: dict[str, str]) -> list[str]:
    """What differs, one phrase each, for what either side has: ``dask 2024.8.0 here,
    2024.1.1 on the cluster``, ``pandas 2.2.2 here, missing on the cluster``. Python's
    patch level is not a difference; a package neither side has is not either."""
    found = []
    for name in ("python", *KEY_PACKAGES):
        mine, theirs = client.get(name), cluster.get(name)
        if mine is None and theirs is None:
            continue
        if name == "python" and mine and theirs and mine.split(".")[:2] == theirs.split(".")[:2]:
            continue
        if mine != theirs:
            found.append(f"{name} {mine or 'missing'} here, {theirs or 'missing'} on the cluster")
    return found
