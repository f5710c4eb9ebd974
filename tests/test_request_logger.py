"""The README's main demo: Node's request-logger example on gevent.pywsgi."""

from __future__ import annotations

import subprocess
import sys

import pytest

from helpers import ROOT


@pytest.mark.parametrize("requests", [2, 25])
def test_request_logger_demo(requests: int) -> None:
    """Every request logs `N: start` then `N: finish` with its own id, the
    finish line coming from a greenlet the handler spawned; nothing else."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "request_logger.py"), "--requests", str(requests)],
        capture_output=True, text=True, timeout=60, cwd="/",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    lines = proc.stdout.splitlines()
    assert sorted(lines) == sorted(f"{n}: {what}" for n in range(requests)
                                   for what in ("start", "finish"))
    for n in range(requests):
        assert lines.index(f"{n}: start") < lines.index(f"{n}: finish")
    # Concurrent, as in Node's output: every request started before any finished.
    assert lines[:requests] == [f"{n}: start" for n in range(requests)]


def test_request_logger_default_output_is_nodes() -> None:
    """With no arguments the output is exactly Node's documented output."""
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "request_logger.py")],
                          capture_output=True, text=True, timeout=60, cwd="/")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["0: start", "1: start", "0: finish", "1: finish"]
