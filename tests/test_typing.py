"""The package type-checks under ``mypy --strict`` (setup.cfg [mypy])."""

from __future__ import annotations

import subprocess
import sys

from helpers import ROOT


def test_mypy_strict() -> None:
    """Public names carry full hints; py.typed promises users they are right."""
    proc = subprocess.run([sys.executable, "-m", "mypy", "--no-incremental"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
