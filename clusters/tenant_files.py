"""Reading what a tenant's processes leave in their folders, which the service must treat as
hostile: never follow a link, never wait on a FIFO or a device, never read past a small bound,
and accept only values of a known shape.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from pathlib import Path
from typing import Any


def _read_small(folder: Path, name: str, limit: int) -> bytes | None:
    """At most ``limit`` bytes of the regular file ``folder/name`` (blocking); None for
    anything else (missing, a link, a FIFO, a device, larger than ``limit``)."""
    try:
        folder_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=folder_fd)
    except OSError:
        return None
    finally:
        os.close(folder_fd)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > limit:
            return None
        return os.read(fd, limit)
    except OSError:
        return None
    finally:
        os.close(fd)


def read_word(folder: Path, name: str, allowed: set[str], limit: int = 32) -> str | None:
    """One of ``allowed`` read from ``folder/name`` (blocking), or None."""
    raw = _read_small(folder, name, limit)
    word = raw.strip().decode("ascii", "replace") if raw is not None else None
    return word if word in allowed else None


def read_ports(folder: Path, name: str, keys: tuple[str, ...], limit: int = 256,
               ) -> dict[str, int] | None:
    """A JSON object of exactly ``keys``, each a port number, from ``folder/name``
    (blocking); None until the file is complete and of that shape."""
    raw = _read_small(folder, name, limit)
    if raw is None:
        return None
    try:
        data: Any = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(data, dict) or set(data) != set(keys):
        return None
    for value in data.values():
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
            return None
    return {key: data[key] for key in keys}


def remove_entry(folder: Path, name: str) -> None:
    """Remove ``folder/name`` whatever it is (a link is removed, not followed); blocking."""
    with contextlib.suppress(OSError):
        folder_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                os.unlink(name, dir_fd=folder_fd)
        finally:
            os.close(folder_fd)
