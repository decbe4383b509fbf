"""The provisioner command: tokens, start-up refusing bad configuration with a clear message,
and the default tenant a service without a tenants file makes for the machine."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.service import ServiceProcess, wait_until


def run(*args: str, timeout: float = 60,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "provisioner.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


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


def test_a_state_from_a_newer_release_stops_startup(tmp_path: Path) -> None:
    from cryptography.fernet import Fernet

    from provisioner import migrations
    from provisioner.secrets import Keyring
    from provisioner.store import Store

    url = f"sqlite:///{tmp_path / 'state.db'}"
    store = Store(url, Keyring(Fernet.generate_key(), "a test key"))
    store.migrate()
    store._set_meta(migrations.VERSION_KEY, "99")
    store.engine.dispose()
    result = run("serve", "--state", url, "--data-dir", str(tmp_path / "d"), "--port", "0")
    assert result.returncode == 2, result.stderr
    assert "schema version 99, newer than this release's" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_tenants_file(tmp_path: Path) -> None:
    result = run("serve", "--tenants", str(tmp_path / "absent.yaml"), "--data-dir", str(tmp_path))
    assert result.returncode == 2 and "cannot read tenants file" in result.stderr


def test_settings_come_from_the_environment_when_not_given(tmp_path: Path) -> None:
    """``PROVISIONER_*`` variables are the defaults of ``serve``'s options, not ignored."""
    env = {"PROVISIONER_TENANTS": str(tmp_path / "absent.yaml"),
           "PROVISIONER_DATA_DIR": str(tmp_path / "d"), "PROVISIONER_PORT": "0"}
    result = run("serve", env=env)
    assert result.returncode == 2 and "cannot read tenants file" in result.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        busy_env = {"PROVISIONER_DATA_DIR": str(tmp_path / "d"), "PROVISIONER_PORT": str(port)}
        result = run("serve", env=busy_env)
        assert result.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in result.stderr
        # An option given wins over its variable: --port 0 is free, so the missing tenants
        # file is what stops it now.
        result = run("serve", "--port", "0", "--tenants", str(tmp_path / "absent.yaml"),
                     env=busy_env)
    assert result.returncode == 2 and "cannot read tenants file" in result.stderr
    result = run("serve", "--log-level", "nonsense", env={"PROVISIONER_DATA_DIR": str(tmp_path / "d")})
    assert result.returncode == 2 and "--log-level:" in result.stderr


def start_keeping_stderr(svc: ServiceProcess, name: str) -> str:
    """Start ``svc`` as ServiceProcess.start does, with its stderr kept apart; return that.

    The process is ``svc.proc``, so the make_service fixture stops it whatever happens."""
    stderr = svc.workdir / f"{name}.stderr"
    with open(svc.log, "ab") as out, open(stderr, "wb") as err:
        svc.proc = subprocess.Popen(svc.command(), stdout=out, stderr=err,
                                    env={**os.environ, **svc.env}, start_new_session=True)

    def up() -> bool:
        assert svc.proc is not None
        if svc.proc.poll() is not None:
            raise AssertionError(f"service exited: {stderr.read_text()[-3000:]}")
        try:
            return httpx.get(svc.url + "/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(up, timeout=60, what="service up")
    return stderr.read_text()


def test_without_tenants_file_a_default_tenant_sized_to_the_machine_keeps_its_token(
    make_service: Callable[..., ServiceProcess],
) -> None:
    svc = make_service(None)  # no --tenants
    assert "--tenants" not in svc.command()
    cores = float(os.cpu_count() or 1)
    machine_quota = {"cores": max(cores * 4, 8),
                     "memory": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
                     "clusters": 10, "workers_per_cluster": None}
    token_file = svc.data_dir / "default-token"

    def check_token_accepted(stderr: str) -> str:
        token = token_file.read_text().strip()
        assert len(token) >= 40 and token_file.stat().st_mode & 0o777 == 0o600
        assert f"tenant 'default' token: {token}\n" in stderr, stderr
        assert f"export PROVISIONER_TOKEN={token}\n" in stderr, stderr
        assert f"export PROVISIONER_URL={svc.url}\n" in stderr, stderr
        with svc.client(None, token=token) as http:
            r = http.get("/tenants/me")
            assert r.status_code == 200, r.text
            assert r.json()["name"] == "default" and r.json()["quota"] == machine_quota
            # The README's first hour fits: two 2-worker clusters, one scaled to 4 workers.
            defaults = r.json()["defaults"]
            assert defaults["scheduler_cores"] == 0.5 and defaults["worker_cores"] == 1
            assert 2 * (defaults["scheduler_cores"] + 2) + 2 <= machine_quota["cores"]
        with svc.client(None, token=token[:-1]) as http:
            assert http.get("/tenants/me").status_code == 401
        return token

    first = start_keeping_stderr(svc, "first")
    token = check_token_accepted(first)
    assert "--no-tls" not in first  # TLS is on by default: no warning
    # /metrics is never open: the service made its own token and says how to use it.
    metrics_token = svc.data_dir / "metrics-token"
    assert metrics_token.stat().st_mode & 0o777 == 0o600
    assert (f'curl -H "Authorization: Bearer $(cat {metrics_token.resolve()})" {svc.url}/metrics'
            in first), first
    assert metrics_token.read_text().strip() not in first  # said where, not printed
    assert svc.signal(signal.SIGTERM) == 0

    svc.args = ["--no-tls", *svc.args, "--host", "0.0.0.0"]
    second = start_keeping_stderr(svc, "second")
    assert check_token_accepted(second) == token  # the same tenant after a restart
    assert svc.metrics_token() == metrics_token.read_text().strip()  # and the same metrics token
    with svc.client(None, token=svc.metrics_token()) as http:
        assert http.get("/metrics").status_code == 200
    warnings = [line for line in second.splitlines() if "WARNING: --no-tls:" in line]
    assert len(warnings) == 1 and "trusted single-user machine" in warnings[0], second
    # Reachable beyond this machine: /metrics is still guarded, by the same token.
    assert "/metrics needs the metrics token" in second and "WARNING: /metrics" not in second
    assert f"$(cat {metrics_token.resolve()})" in second, second
