"""The agent's URI fetcher, reduced to what tests need: local paths, file:// and http(s)://.

Mesos fetches `CommandInfo.uris` into the sandbox before the executor starts; archives
are extracted unless `extract` is false, `executable` files are made executable, and a
fetch failure fails the task at the agent (no TASK_STARTING before it).
"""

from __future__ import annotations

import os
import shutil
import stat
import tarfile
import zipfile
from typing import Any
from urllib.parse import unquote, urlparse

import httpx

ARCHIVES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".zip")


class FetchError(RuntimeError):
    """A URI could not be fetched into the sandbox."""


def fetch_all(uris: list[dict[str, Any]], sandbox: str) -> None:
    """Fetch every URI (blocking; run it in a thread)."""
    for uri in uris:
        fetch_one(uri, sandbox)


def fetch_one(uri: dict[str, Any], sandbox: str) -> str:
    value = uri.get("value", "")
    parsed = urlparse(value)
    name = uri.get("output_file") or os.path.basename(unquote(parsed.path)) or "download"
    if os.path.isabs(name) or ".." in name.split("/"):
        raise FetchError(f"Invalid output file '{name}'")
    target = os.path.join(sandbox, name)
    try:
        if parsed.scheme in ("http", "https"):
            with httpx.stream("GET", value, follow_redirects=True, timeout=60) as resp:
                if resp.status_code != 200:
                    raise FetchError(f"Failed to fetch '{value}': HTTP {resp.status_code}")
                with open(target, "wb") as out:
                    for block in resp.iter_bytes():
                        out.write(block)
        elif parsed.scheme in ("", "file"):
            shutil.copyfile(unquote(parsed.path) if parsed.scheme else value, target)
        else:
            raise FetchError(f"Unsupported URI scheme in '{value}'")
    except (OSError, httpx.HTTPError) as exc:
        raise FetchError(f"Failed to fetch '{value}': {exc}") from exc
    if uri.get("executable"):
        os.chmod(target, os.stat(target).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    elif uri.get("extract", True) and name.endswith(ARCHIVES):
        try:
            if name.endswith(".zip"):
                with zipfile.ZipFile(target) as archive:
                    archive.extractall(sandbox)
            else:
                with tarfile.open(target) as archive:
                    archive.extractall(sandbox, filter="data")
        except (OSError, tarfile.TarError, zipfile.BadZipFile) as exc:
            raise FetchError(f"Failed to extract '{name}': {exc}") from exc
    return target
