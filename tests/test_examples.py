"""Every example runs by itself and prints what its docstring promises.

Each script runs as ``python examples/X.py`` from an unrelated directory (so
no example leans on the current directory), must exit 0, and its output is
checked line by line: every log line carries its own request's id.
(``request_logger.py`` has a test of its own.)
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from collections import Counter
from typing import Dict, List

import pytest

from helpers import ROOT

EXAMPLES = ROOT / "examples"
TESTED_ELSEWHERE = {"request_logger.py"}

_runs: Dict[str, subprocess.CompletedProcess[str]] = {}


def run_example(name: str) -> subprocess.CompletedProcess[str]:
    """Run ``examples/<name>`` once per test session (bounded); cache the result."""
    if name not in _runs:
        with tempfile.TemporaryDirectory() as cwd:
            _runs[name] = subprocess.run([sys.executable, str(EXAMPLES / name)],
                                         capture_output=True, text=True, timeout=90, cwd=cwd)
    return _runs[name]


def output_lines(name: str) -> List[str]:
    proc = run_example(name)
    assert proc.returncode == 0, f"{name} failed\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    return proc.stdout.splitlines()


@pytest.mark.parametrize("name", sorted(
    path.name for path in EXAMPLES.glob("*.py") if path.name not in TESTED_ELSEWHERE))
def test_example_runs_and_exits_0(name: str) -> None:
    """Every example (and the gunicorn config recipe) runs standalone and
    exits 0 without writing to stderr."""
    proc = run_example(name)
    assert (proc.returncode, proc.stderr) == (0, ""), proc.stdout


def test_flask_gunicorn_logs_every_line_with_its_own_request_id() -> None:
    """Four concurrent requests through a real gunicorn with the worker class:
    each logs its five lines (view, greenlet, pool task, thread, done), all
    tagged with its own X-Request-ID, and nothing else is printed."""
    lines = output_lines("flask_gunicorn.py")
    per_id: Dict[str, Counter[str]] = {}
    for line in lines:
        match = re.fullmatch(r"\[(?P<id>[^\]]+)\] (?P<message>.+)", line)
        assert match, f"unexpected line {line!r}"
        per_id.setdefault(match["id"], Counter())[match["message"]] += 1
    expected = Counter(["GET /hello", "greenlet: loading the profile", "pool task: rendering",
                        "thread: sending the audit event", "done"])
    assert per_id == {f"req-{n}": expected for n in range(1, 5)}


def test_legacy_patched_jobs_carry_the_request_that_queued_them() -> None:
    """Under monkey.patch_all, request threads, the helper threads they start
    and the queue workers running bound/snapshot jobs all log the request's
    id; the one job queued bare logs '-' (the worker's own context)."""
    lines = output_lines("legacy_patched.py")
    seen = []
    for line in lines:
        match = re.fullmatch(r"\[(?P<id>[^\]]+)\] (?P<thread>[\w-]+): (?P<message>.+)", line)
        assert match, f"unexpected line {line!r}"
        thread = match["thread"]
        if re.fullmatch(r"worker-[12]", thread):
            thread = "worker"
        seen.append((match["id"], thread, match["message"]))
    expected = [("-", "worker", "unbound job (the worker's own context)")]
    for n in (1, 2, 3):
        expected += [
            (f"req-{n}", f"request-{n}", "start"),
            (f"req-{n}", f"helper-req-{n}", "checking permissions"),
            (f"req-{n}", "worker", f"sending mail to user{n}@example.com"),
            (f"req-{n}", "worker", f"writing audit record for request {n}"),
            (f"req-{n}", f"request-{n}", "done"),
        ]
    assert sorted(seen) == sorted(expected)


def test_otel_spans_prints_whole_trees() -> None:
    """Each of the three requests prints one tree; each child's parent id is
    the span id of the line it hangs under, down to the nested greenlet."""
    lines = output_lines("otel_spans.py")
    pattern = re.compile(r"(?P<indent> *)(?P<label>.+?)  span=(?P<span>[0-9a-f]{16}) "
                         r"parent=(?P<parent>[0-9a-f]{16}|-)")
    stack: List[str] = []
    shape = []
    for line in lines:
        match = pattern.fullmatch(line)
        assert match, f"unexpected line {line!r}"
        depth = len(match["indent"]) // 2
        del stack[depth:]
        assert match["parent"] == (stack[-1] if stack else "-"), line
        stack.append(match["span"])
        shape.append("  " * depth + match["label"])
    tree = [
        "GET /orders/{n}",
        "  cache.get[0]  (pool task)",
        "  cache.get[1]  (pool task)",
        "  db.query  (gevent.spawn)",
        "    db.connect  (nested gevent.spawn)",
        "  render  (OS thread, gevent ThreadPool)",
    ]
    assert shape == [row.replace("{n}", str(n)) for n in (1, 2, 3) for row in tree]
