"""The provisioner command: tokens, and start-up refusing bad configuration with a clear message."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "provisioner.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_token_prints_token_and_its_hash() -> None:
    result = run("token")
    assert result.returncode == 0
    lines = dict(line.split(":", 1) for line in result.stdout.strip().splitlines())
    token, digest = lines["token"].strip(), lines["token_sha256"].strip()
    assert len(token) >= 40 and hashlib.sha256(token.encode()).hexdigest() == digest


@pytest.mark.parametrize(("content", "expected"), [
    ("tenants:\n  - name: acme\n    token_sha256: nothex\n    quota: {cores: 2, memory: 1GiB}\n",
     "tenant 'acme': token_sha256"),
    ("tenants:\n  - name: acme\n    token_sha256: '" + "a" * 64 + "'\n    quota: {cores: 2}\n",
     "tenant 'acme': quota.memory"),
    ("tenants: {\n", "not valid YAML"),
])
def test_bad_tenants_file_stops_startup_with_a_message(tmp_path: Path, content: str, expected: str) -> None:
    path = tmp_path / "tenants.yaml"
    path.write_text(content)
    result = run("serve", "--tenants", str(path), "--data-dir", str(tmp_path / "d"), "--port", "0")
    assert result.returncode == 2
    assert expected in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(("url", "expected"), [
    ("not a url", "not a valid SQLAlchemy URL"),
    ("nosuchdb://x/y", "state URL"),
    ("postgresql://nobody@127.0.0.1:1/none", "cannot open state"),
])
def test_bad_state_url_stops_startup_with_a_message(tmp_path: Path, url: str, expected: str) -> None:
    result = run("serve", "--state", url, "--data-dir", str(tmp_path / "d"), "--port", "0")
    assert result.returncode == 2
    assert expected in result.stderr and "Traceback" not in result.stderr


def test_unreachable_state_database_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "blocker").write_text("a file where a folder should be")
    result = run("serve", "--state", f"sqlite:///{tmp_path}/blocker/state.db",
                 "--data-dir", str(tmp_path / "d"), "--port", "0")
    assert result.returncode == 2, result.stderr
    assert "state" in result.stderr and "Traceback" not in result.stderr


def test_missing_tenants_file(tmp_path: Path) -> None:
    result = run("serve", "--tenants", str(tmp_path / "absent.yaml"), "--data-dir", str(tmp_path))
    assert result.returncode == 2 and "cannot read tenants file" in result.stderr
