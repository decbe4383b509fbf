"""Execute the tenants' notebooks end to end against the real service."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from tests.service import ServiceProcess, wait_until

#: Nothing here depends on the database: the SQLite pass covers it.
pytestmark = pytest.mark.state_agnostic

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
LIVE = {"pending", "starting", "running"}


def clusters(service: ServiceProcess) -> dict[str, dict[str, object]]:
    with service.client("alpha") as http:
        return {c["id"]: c for c in http.get("/clusters").json()["clusters"]}


@pytest.fixture
def no_leaks(service: ServiceProcess) -> Iterator[None]:
    """Stop whatever the notebook started, even when a cell fails."""
    before = {i for i, c in clusters(service).items() if c["status"] in LIVE}
    try:
        yield
    finally:
        with service.client("alpha") as http:
            for cluster_id, c in clusters(service).items():
                if c["status"] in LIVE and cluster_id not in before:
                    http.delete(f"/clusters/{cluster_id}")


def test_quickstart(service: ServiceProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                    no_leaks: None) -> None:
    monkeypatch.setenv("PROVISIONER_URL", service.url)
    monkeypatch.setenv("PROVISIONER_TOKEN", "token-alpha")
    nb = nbformat.read(NOTEBOOKS / "quickstart.ipynb", as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()

    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(o.output_type != "error" for c in code for o in c.outputs)
    assert any("image/png" in o.get("data", {}) for c in code for o in c.outputs), "no plot"
    last = "".join(o.text for o in code[-1].outputs if o.output_type == "stream")
    summary = json.loads(last.strip().splitlines()[-1])
    assert summary["closed"] is True
    assert (summary["stores"], summary["partitions"], summary["horizon"]) == (120, 6, 28)
    assert 0 <= summary["mape"] < 0.05

    cluster = clusters(service)[summary["cluster"]]
    assert cluster["project"] == "quickstart"
    wait_until(lambda: clusters(service)[summary["cluster"]]["status"] == "stopped", 60,
               what="the notebook's cluster to stop")
    assert clusters(service)[summary["cluster"]]["stop_reason"] == "user"
