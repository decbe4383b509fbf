"""The service's own files: a data folder only its user may enter, and secrets kept in files.

The data folder holds the state database (every cluster's client key, encrypted), the
default tenant's token, the metrics token and the secret key, so it is the service user's
alone: 0700, and the service runs with umask 077 so whatever it creates there is 0600.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger("provisioner.files")

#: Permission bits the service never gives anyone but its own user.
OTHERS = 0o077


def make_private() -> None:
    """Every file and folder this process creates from now on is for its own user alone
    (SQLite's -wal, -shm and -journal files included, which SQLite creates itself)."""
    os.umask(OTHERS)


def private_data_dir(path: Path) -> Path:
    """Create ``path`` if needed, make it 0700, and take group/other bits off the files
    directly in it (left by a release that did not run with umask 077).

    A folder owned by another user (a volume's mount point in a container, say) cannot be
    changed: that is said in a warning, and the files the service creates are 0600 anyway.
    """
    path.mkdir(parents=True, exist_ok=True)
    _private(path, 0o700)
    for entry in os.scandir(path):
        if entry.is_file(follow_symlinks=False):
            mode = stat.S_IMODE(entry.stat(follow_symlinks=False).st_mode)
            if mode & OTHERS:
                _private(Path(entry.path), mode & ~OTHERS)
    return path


def _private(path: Path, mode: int) -> None:
    try:
        os.chmod(path, mode)
    except PermissionError:
        logger.warning("cannot make %s private (mode %o): it belongs to another user; "
                       "files the service creates in it are still its own alone", path, mode)


class SecretFileError(ValueError):
    """A secret's file exists but cannot be used; the message names it."""


def keep_secret(path: Path, make: Callable[[], str]) -> str:
    """The secret kept in ``path``; on first use ``make()``'s, written there 0600.

    The file appears complete or not at all (written aside, then hard-linked into place),
    and an existing one is never overwritten, so two processes starting at once agree.
    """
    with contextlib.suppress(FileNotFoundError):
        return _read(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    value = make()
    aside = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(value + "\n")
        try:
            os.link(aside, path)
        except FileExistsError:  # another process made it first: theirs counts
            return _read(path)
    finally:
        aside.unlink(missing_ok=True)
    return value


def _read(path: Path) -> str:
    try:
        value = path.read_text().strip()
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
        raise SecretFileError(f"{path}: cannot be read ({exc.__class__.__name__})") from None
    if not value:
        # An empty secret would match an empty "Bearer " header: never accept one.
        raise SecretFileError(f"{path} is empty; delete it to have a new one made")
    return value
