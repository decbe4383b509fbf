"""``provisioner clusters ...`` and ``provisioner usage`` against the real service."""

from __future__ import annotations

import functools
import itertools
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest
import typer
from typer.testing import CliRunner

from provisioner import cli_client
from provisioner.client import Provisioner
from tests.service import ServiceProcess, stopping_new_clusters, wait_until

#: Nothing here depends on the database: the SQLite pass covers it.
pytestmark = pytest.mark.state_agnostic


@pytest.fixture
def no_leaks(service: ServiceProcess) -> Iterator[None]:
    """Stop every cluster a test started, whether it passed or not."""
    with stopping_new_clusters(service, "beta", "tight"):
        yield


@pytest.fixture
def cli(service: ServiceProcess, no_leaks: None) -> Iterator[CliRunner]:
    """A runner whose environment points at the shared service as tenant beta."""
    yield CliRunner(env={"PROVISIONER_URL": service.url, "PROVISIONER_TOKEN": "token-beta",
                         "COLUMNS": "200"})


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    app = typer.Typer(pretty_exceptions_enable=False)

    @app.callback()
    def main() -> None:
        """The provisioner command, as cli.py builds it."""

    cli_client.register(app)
    return app


def run(cli: CliRunner, app: typer.Typer, *args: str, code: int = 0) -> tuple[str, str]:
    result = cli.invoke(app, list(args))
    assert result.exit_code == code, (result.stdout, result.stderr, result.exception)
    assert "Traceback" not in result.output
    return result.stdout, result.stderr


def test_cluster_commands(cli: CliRunner, app: typer.Typer, service: ServiceProcess) -> None:
    stdout, stderr = run(cli, app, "clusters", "create", "--workers", "1", "--project", "cli",
                         "--idle-timeout", "20m", "--env", "GREETING=hi", "--wait", "--timeout", "120")
    assert "running" in stdout and "cli" in stdout
    assert "workers" in stderr  # the live progress display's final state
    (cluster_id,) = [w for w in stdout.split() if w.startswith("c-")]
    with service.client("beta") as http:
        record = http.get(f"/clusters/{cluster_id}").json()
    assert record["status"] == "running" and record["workers"]["running"] == 1
    assert record["idle_timeout"] == 1200
    # Not a terminal, so only the display's last state is printed: scheduler up, 1 of 1 worker.
    (last,) = [line for line in stderr.splitlines() if cluster_id in line]
    frame = progress_frame(last)
    assert frame == (cluster_id, f"scheduler up at {record['scheduler_address']}; workers", 1, 1), last

    # Plain aligned lines, one cluster each, that fit 80 columns and survive a pipe.
    stdout, _ = run(cli, app, "clusters", "list")
    lines = stdout.splitlines()
    assert lines[0].split() == ["ID", "PROJECT", "STATUS", "WORKERS", "AGE"]
    (mine,) = [line for line in lines if line.startswith(cluster_id)]
    assert mine.split()[:4] == [cluster_id, "cli", "running", "1/1"]
    assert all(len(line) <= 80 for line in lines) and "\x1b" not in stdout
    stdout, _ = run(cli, app, "clusters", "list", "-o", "wide")
    (mine,) = [line for line in stdout.splitlines() if line.startswith(cluster_id)]
    assert mine.split()[-1] == record["scheduler_address"], "the address whole, on its line"
    stdout, _ = run(cli, app, "clusters", "list", "--json", "--project", "cli")
    assert cluster_id in {c["id"] for c in json.loads(stdout)}
    stdout, _ = run(cli, app, "clusters", "show", cluster_id)
    assert cluster_id in stdout and "scheduler" in stdout
    # The dashboard row is the service's proxy, never the scheduler's own address.
    assert f"{service.url}/clusters/{cluster_id}/dashboard/status" in stdout
    stdout, stderr = run(cli, app, "clusters", "dashboard", cluster_id, "--ttl", "120")
    link = stdout.strip()
    assert link.startswith(f"{service.url}/clusters/{cluster_id}/dashboard/status?token="), link
    assert "JupyterLab" in stderr and f"/clusters/{cluster_id}/dashboard/t/" in stderr
    with httpx.Client(follow_redirects=True, timeout=30) as browser:  # the link alone, no token
        assert browser.get(link).status_code == 200

    stdout, _ = run(cli, app, "clusters", "scale", cluster_id, "2")
    assert "2 workers requested" in stdout
    stdout, _ = run(cli, app, "clusters", "adapt", cluster_id, "--min", "0", "--max", "2")
    assert "adaptive 0-2" in stdout
    with service.client("beta") as http:
        assert http.get(f"/clusters/{cluster_id}").json()["adaptive"] == {"minimum": 0, "maximum": 2}

    stdout, _ = run(cli, app, "clusters", "delete", cluster_id, "--wait")
    assert stdout.strip() == f"{cluster_id}: stopped (user)"
    with service.client("beta") as http:
        assert http.get(f"/clusters/{cluster_id}").json()["stop_reason"] == "user"
    # Live clusters by default; --all shows the ended ones too.
    stdout, _ = run(cli, app, "clusters", "list", "--project", "cli")
    assert cluster_id not in stdout
    stdout, _ = run(cli, app, "clusters", "list", "--all", "--project", "cli")
    assert any(line.split()[:3] == [cluster_id, "cli", "stopped"] for line in stdout.splitlines())


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
FRAME = re.compile(r"(c-[0-9a-f]+): (.+?)[\s━╸╺]*(\d+)/(\d+)\s*$")


def progress_frame(line: str) -> tuple[str, str, int, int]:
    """(cluster id, stage, workers done, workers wanted) of one line of the create display."""
    match = FRAME.search(ANSI.sub("", line))
    assert match, line
    return match[1], match[2], int(match[3]), int(match[4])


def test_create_shows_each_stage_live_on_a_terminal(service: ServiceProcess, no_leaks: None) -> None:
    """The installed command on a terminal (forced: output is a pipe here) redraws its line:
    first the new cluster's status, then the scheduler's address and workers n/m up."""
    env = {**os.environ, "PROVISIONER_URL": service.url, "PROVISIONER_TOKEN": "token-beta",
           "TTY_COMPATIBLE": "1", "TTY_INTERACTIVE": "1", "NO_COLOR": "1", "COLUMNS": "200"}
    proc = subprocess.run(
        [sys.executable, "-c", "from provisioner.cli import main; main()", "clusters", "create",
         "--workers", "2", "--json", "--timeout", "120"],
        capture_output=True, text=True, env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr
    cluster = json.loads(ANSI.sub("", proc.stdout))
    assert cluster["status"] == "running" and cluster["workers"]["running"] == 2
    cluster_id, address = cluster["id"], cluster["scheduler_address"]
    frames = [progress_frame(line) for line in ANSI.sub("", proc.stderr).splitlines()
              if cluster_id in line]
    assert len(frames) >= 2, proc.stderr
    # The first frame is drawn before any poll: the status POST /clusters answered.
    assert frames[0] == (cluster_id, "pending", 0, 2), proc.stderr
    assert frames[-1] == (cluster_id, f"scheduler up at {address}; workers", 2, 2), proc.stderr
    up = f"scheduler up at {address}; workers"
    for (_, stage, done, wanted), (_, next_stage, next_done, _) in itertools.pairwise(frames):
        assert stage in ("pending", "starting", up) and wanted == 2, proc.stderr
        assert (stage == up) <= (next_stage == up) and done <= next_done, proc.stderr
        assert done == 0 or stage == up, proc.stderr  # workers are counted once it is running


def test_create_quiet_no_wait(cli: CliRunner, app: typer.Typer, service: ServiceProcess) -> None:
    stdout, _ = run(cli, app, "clusters", "create", "-q", "--no-wait", "--workers", "0")
    cluster_id = stdout.strip()
    assert cluster_id.startswith("c-") and "\n" not in cluster_id
    stdout, _ = run(cli, app, "clusters", "delete", cluster_id)
    # Said as it is: stopping (or already stopped), never the status before the DELETE.
    assert stdout.strip() in {f"{cluster_id}: stopping", f"{cluster_id}: stopped (user)"}, stdout
    with service.client("beta") as http:
        wait_until(lambda: http.get(f"/clusters/{cluster_id}").json()["status"] in {"stopping", "stopped"},
                   60, what="stopping")


def test_errors_are_one_line(cli: CliRunner, app: typer.Typer) -> None:
    _, stderr = run(cli, app, "clusters", "show", "c-000000000000", code=1)
    assert stderr.strip() == "error: cluster c-000000000000 not found"
    _, stderr = run(cli, app, "clusters", "create", "--worker-memory", "lots", "--no-wait", code=1)
    assert stderr.startswith("error: worker_memory")
    _, stderr = run(cli, app, "clusters", "create", "--env", "NOEQUALS", code=2)
    assert "KEY=VALUE" in stderr
    _, stderr = run(cli, app, "clusters", "list", "--token", "nope", code=1)
    assert stderr.strip() == "error: invalid token"


def test_quota_error_from_the_installed_command(service: ServiceProcess, no_leaks: None) -> None:
    """The real ``provisioner`` entry point: message, non-zero exit, no traceback."""
    env = {**os.environ, "PROVISIONER_URL": service.url, "PROVISIONER_TOKEN": "token-tight"}
    proc = subprocess.run(
        [sys.executable, "-c", "from provisioner.cli import main; main()", "clusters", "create",
         "--workers", "3", "--worker-cores", "2"],
        capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode != 0
    assert proc.stderr.startswith("error: quota exceeded: cores"), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_usage(cli: CliRunner, app: typer.Typer) -> None:
    stdout, _ = run(cli, app, "usage", "--since", "7d")
    assert "beta" in stdout and "core seconds" in stdout.lower()
    stdout, _ = run(cli, app, "usage", "--json", "--since", "2026-01-01")
    data = json.loads(stdout)
    assert data["tenant"] == "beta" and isinstance(data["projects"], list)
    _, stderr = run(cli, app, "usage", "--since", "last tuesday", code=2)
    assert "--since" in stderr


def test_usage_falls_back_to_current_usage(cli: CliRunner, app: typer.Typer,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A service without GET /tenants/me/usage: show quota and usage from /tenants/me."""
    me = {"name": "beta", "quota": {"cores": 4, "memory": 8 * 2**30, "clusters": 3},
          "usage": {"cores": 1.5, "memory": 2**30, "clusters": 1, "workers": 1}, "defaults": {}}

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/tenants/me":
            return httpx.Response(200, json=me)
        return httpx.Response(404, json={"detail": "Not Found"})

    transport = httpx.MockTransport(handle)
    monkeypatch.setattr(cli_client, "Provisioner", functools.partial(Provisioner, transport=transport))
    stdout, stderr = run(cli, app, "usage")
    assert "not served" in stderr
    assert "cores" in stdout and "2.5" in stdout and "7.00 GiB" in stdout


def test_usage_tables_accept_either_shape() -> None:
    from rich.console import Console

    def render(data: dict[str, object]) -> str:
        console = Console(width=200, record=True)
        for table in cli_client.usage_tables(data):
            console.print(table)
        return console.export_text()

    listed = render({"tenant": "beta", "projects": [
        {"project": "forecast", "core_seconds": 3600.0, "memory_gib_seconds": 512.5}]})
    mapped = render({"projects": {"forecast": {"core_seconds": 3600.0}}})
    for text in (listed, mapped):
        assert "forecast" in text and "3,600.0" in text and "CORE SECONDS" in text
    assert "beta" in listed
