"""The shipped code type-checks: mypy in its default mode over what pyproject.toml names."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_mypy_finds_no_errors() -> None:
    root = Path(__file__).parent.parent
    result = subprocess.run([sys.executable, "-m", "mypy"], cwd=root,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
    assert "Success: no issues found" in result.stdout
