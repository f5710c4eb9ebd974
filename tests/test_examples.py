"""Every example runs by itself and prints what its docstring promises.

Each script runs as ``python examples/X.py`` from an unrelated directory (so
no example leans on the current directory), must exit 0, and its output is
checked line by line: every log line carries its own request's id.
(``request_logger.py`` has a test of its own.)
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from collections import Counter
from typing import Any, Dict, List

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


def test_across_processes_prints_each_requests_lines_from_three_processes() -> None:
    """Three requests through gunicorn: each group holds the front's three
    lines, the stock service's line and the three task lines (the chain's
    second step names the first as its parent), all under the request's id;
    the task queued outside a request is under '-'."""
    groups: Dict[str, List[str]] = {}
    current = None
    for line in output_lines("across_processes.py"):
        if line.startswith("== "):
            current = line.split()[1]
            groups[current] = []
            continue
        assert current is not None, line
        groups[current].append(line)
    assert sorted(groups) == ["-", "req-1", "req-2", "req-3"]
    for n in (1, 2, 3):
        lines = groups[f"req-{n}"]
        messages = sorted(re.sub(r"\s+task=.*", "", line) for line in lines)
        assert messages == sorted([
            f"front     GET /order/{n}",
            f"front     asking the stock service for order {n}",
            f"front     queued receipt and reserve|charge for order {n}",
            f"stock     GET /stock/{n}",
            f"worker    send receipt for order {n}",
            f"worker    reserve stock for order {n}",
            f"worker    charge order {n}",
        ])
        tasks = {}
        for line in lines:
            match = re.fullmatch(r"worker +(\w+) .*task=(\S+) parent=(\S+)", line)
            if match:
                tasks[match[1]] = (match[2], match[3])
        assert tasks["send"][1] == "-" and tasks["reserve"][1] == "-"
        assert tasks["charge"][1] == tasks["reserve"][0]  # the chain's second step
    assert [re.sub(r"\s+task=.*", "", line) for line in groups["-"]] == [
        "worker    nightly report -1"]


def _across(*args: str) -> Dict[str, Any]:
    with tempfile.TemporaryDirectory() as cwd:
        proc = subprocess.run([sys.executable, str(EXAMPLES / "across_processes.py"),
                               "--summary", *args],
                              capture_output=True, text=True, timeout=240, cwd=cwd)
    assert proc.returncode == 0, f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


@pytest.mark.slow
def test_across_processes_load_every_line_carries_its_requests_id() -> None:
    """1,000 requests from 50 clients through gunicorn -w 2; each calls the
    stock service and queues a task and a two-step chain on a gevent worker
    (-c 50): 0 lines with a wrong id, 0 without one; the 5 tasks queued
    outside a request log no id."""
    summary = _across("--requests", "1000", "--clients", "50", "--outside", "5")
    assert summary["lines"] == {
        "front": {"ok": 3000, "wrong": 0, "missing": 0},
        "stock": {"ok": 1000, "wrong": 0, "missing": 0},
        "worker": {"ok": 3005, "wrong": 0, "missing": 0},
    }, summary


def test_across_processes_negative_control_without_the_integration() -> None:
    """Same stack without asl_gevent.http/celery: the stock service and the
    worker lose the id (the front still has it from its middleware)."""
    summary = _across("--requests", "20", "--clients", "10", "--outside", "2",
                      "--without-integration")
    assert summary["lines"] == {
        "front": {"ok": 60, "wrong": 0, "missing": 0},
        "stock": {"ok": 0, "wrong": 0, "missing": 20},
        "worker": {"ok": 2, "wrong": 0, "missing": 60},
    }, summary
