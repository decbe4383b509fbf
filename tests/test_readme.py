"""The README's first hour, run as written: its shell and Python blocks, taken from README.md
itself, in order, against a fresh service on the embedded default tenant (what ``provisioner
serve`` runs with no tenants file), so the README cannot drift from what works.

Run: the service (started as the README's first command says, on a free port instead of 8000),
"A first cluster", "Python SDK, CLI and notebook" and "Observability". Only placeholders are
filled in: the URL's port and the token ``serve`` printed. The other blocks need what this
machine has not (a Mesos master, Kubernetes, Docker, a PostgreSQL server of the reader's).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.service import ServiceProcess

#: Nothing here depends on the database: the SQLite pass runs it.
pytestmark = pytest.mark.state_agnostic

README = Path(__file__).resolve().parent.parent / "README.md"
RUN = ["A first cluster", "Python SDK, CLI and notebook", "Observability"]


def blocks(section: str) -> list[tuple[str, str]]:
    """(language, text) of every fenced block under the ``## section`` heading."""
    text = README.read_text()
    start = text.index(f"\n## {section}\n")
    end = text.find("\n## ", start + 1)
    part = text[start:end if end != -1 else None]
    return re.findall(r"^```(\w*)\n(.*?)^```", part, re.S | re.M)


def test_the_first_command_is_the_one_this_test_runs() -> None:
    intro = README.read_text().split("\n## ", 1)[0]
    (command,) = re.findall(r"```bash\n(python3 -m venv .*?)\n```", intro)
    assert command.endswith("&& .venv/bin/provisioner serve"), command


def test_the_readme_runs_as_written(make_service: Callable[..., ServiceProcess]) -> None:
    svc = make_service(None, sqlite=True).start()  # no --tenants: the default tenant
    printed = svc.log.read_text()
    (token,) = re.findall(r"export PROVISIONER_TOKEN=(\S+)", printed)
    assert f"export PROVISIONER_URL={svc.url}" in printed
    bin_dir = os.path.dirname(sys.executable)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "COLUMNS": "100",
           "PROVISIONER_URL": svc.url, "PROVISIONER_TOKEN": token}

    def fill(text: str) -> str:
        return (text.replace("http://127.0.0.1:8000", svc.url)
                .replace("<printed by serve>", token)
                .replace("PROVISIONER_TOKEN=...", f"PROVISIONER_TOKEN={token}"))

    ran = []
    for section in RUN:
        found = blocks(section)
        assert found, f"no blocks under {section!r}"
        exports = ""  # a section's exports carry on to its later blocks, as in one terminal
        for language, text in found:
            assert language in ("bash", "python"), (section, language)
            if language == "bash":
                argv = ["bash", "-euo", "pipefail", "-c", exports + fill(text)]
            else:
                argv = [sys.executable, "-c", fill(text)]
            done = subprocess.run(argv, cwd=svc.workdir, env=env, capture_output=True,
                                  text=True, timeout=600)
            assert done.returncode == 0, (section, text, done.stdout[-3000:], done.stderr[-3000:])
            assert "Traceback" not in done.stderr, (section, done.stderr[-3000:])
            ran.append((section, language, done.stdout))
            if language == "bash":
                exports += "".join(line + "\n" for line in fill(text).splitlines()
                                   if line.startswith("export "))
    outputs = "\n".join(out for _, _, out in ran)
    assert "6\n" in outputs, "the first cluster computed sum([1, 2, 3])"
    assert "quota exceeded: cores" in outputs, "the SDK block's refusal is printed"
    assert re.search(r"^provisioner_cores", outputs, re.M), "the metrics block's grep found them"
    assert len(ran) >= 6
