"""Helpers for tests: subprocesses, free ports, bounded waits."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Iterator

import gevent

ROOT = Path(__file__).resolve().parent.parent


def gunicorn_no_control_socket() -> list[str]:
    """``["--no-control-socket"]`` where gunicorn has that flag (25.1+ opens a
    control socket by default), else ``[]``: gunicorn 23.0, our minimum, exits
    with a usage error on it."""
    import gunicorn.config

    flags = {flag for setting in gunicorn.config.KNOWN_SETTINGS for flag in setting.cli or ()}
    return ["--no-control-socket"] if "--no-control-socket" in flags else []


def run_python(source: str, *, timeout: float = 120, args: tuple[str, ...] = (),
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run *source* in a fresh interpreter (for monkey.patch_all scenarios).

    Returns the finished process; raises AssertionError with its output if it
    exited non-zero. The child is killed if it outlives *timeout*.
    """
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), *filter(None, [full_env.get("PYTHONPATH")])])
    full_env.update(env or {})
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(source), *args],
        capture_output=True, text=True, timeout=timeout, env=full_env, cwd=str(ROOT),
    )
    assert proc.returncode == 0, (
        f"subprocess failed ({proc.returncode})\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    return proc


def server_env(**extra: str) -> dict[str, str]:
    """The environment for a server under test: ours plus *extra*, with the
    repository and ``tests/`` first on ``PYTHONPATH`` (the server imports
    the package and the tests' apps from there)."""
    return dict(os.environ, **extra, PYTHONPATH=os.pathsep.join(
        filter(None, [str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH")])))


def stop_by_pid(proc: subprocess.Popen[bytes], stop: int, timeout: float) -> None:
    """Send *stop* to *proc* by its pid and wait *timeout* seconds for it to
    exit; SIGKILL it if it lingers."""
    proc.send_signal(stop)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def free_port() -> int:
    """An ephemeral loopback port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ListHandler(logging.Handler):
    """A logging handler that keeps every record it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def hub_exception_stream() -> Iterator[io.StringIO]:
    """Collect what the hub would print about failing greenlets/callbacks."""
    hub = gevent.get_hub()
    stream = io.StringIO()
    hub.exception_stream = stream
    try:
        yield stream
    finally:
        del hub.exception_stream


SCENARIOS = ROOT / "tests" / "scenarios"


def run_scenario(name: str, *, timeout: float = 120,
                 env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``tests/scenarios/<name>.py`` (a monkey-patched program) in a fresh
    interpreter; like :func:`run_python`, fail with its output on a non-zero exit."""
    return run_python((SCENARIOS / f"{name}.py").read_text(), timeout=timeout, env=env)
