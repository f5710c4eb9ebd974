"""Real processes for the cross-process tests: redis-server and Celery workers.

Every process is started in its own session (so a prefork worker's children
go with it) and stopped by its pid in a ``finally``; every wait is bounded.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

from helpers import ROOT, free_port

TESTS = ROOT / "tests"


def wait_for(predicate: Callable[[], bool], timeout: float, what: str,
             output: Optional[Callable[[], str]] = None) -> None:
    """Poll *predicate* every 50 ms; fail after *timeout* seconds naming *what*."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}"
                                 + (f"\n--- output\n{output()}" if output else ""))
        time.sleep(0.05)


def stop(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """SIGTERM the process group led by *proc* (by its pid), SIGKILL if it lingers."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """A throwaway redis-server on a free loopback port; yields its URL prefix."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError(
            "redis-server is not installed: the Celery tests need a real Redis broker. "
            "Install Debian's package (apt-get install -y redis-server); .ci/run does.")
    datadir = tempfile.mkdtemp(prefix="asl-redis-")
    port = free_port()
    log = open(os.path.join(datadir, "redis.log"), "wb")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", datadir, "--databases", "64", "--protected-mode", "yes"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def up() -> bool:
            assert proc.poll() is None, Path(datadir, "redis.log").read_text()
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
            return False
        wait_for(up, 15, "redis-server to answer PING")
        yield f"redis://127.0.0.1:{port}"
    finally:
        stop(proc)
        log.close()
        shutil.rmtree(datadir, ignore_errors=True)


class Worker:
    """A real ``celery worker`` subprocess on the test app (tests/celery_app.py)."""

    def __init__(self, broker: str, pool: str, concurrency: int, workdir: Path,
                 install: bool = True, name: str = "w") -> None:
        self.broker, self.pool, self.concurrency = broker, pool, concurrency
        self.workdir, self.install, self.name = workdir, install, name
        self.log = workdir / "tasks.log"
        self.markers = workdir / "markers"
        self.markers.mkdir(exist_ok=True)
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self.out_path = workdir / f"worker-{name}.out"

    def env(self) -> Dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(TESTS)])
        env.update(ASL_TEST_BROKER=self.broker, ASL_TEST_LOG=str(self.log),
                   ASL_TEST_MARKERS=str(self.markers),
                   ASL_TEST_INSTALL="1" if self.install else "0")
        return env

    def output(self) -> str:
        return self.out_path.read_text(errors="replace") if self.out_path.exists() else ""

    def start(self) -> "Worker":
        out = open(self.out_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "celery_app", "worker",
             "-P", self.pool, "-c", str(self.concurrency), "-n", f"{self.name}@%h",
             "--without-heartbeat", "--without-mingle", "--without-gossip", "-l", "INFO"],
            cwd=str(TESTS), env=self.env(), stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True)
        out.close()
        proc = self.proc

        def ready() -> bool:
            assert proc.poll() is None, f"worker exited {proc.returncode}\n{self.output()}"
            return " ready." in self.output()
        wait_for(ready, 60, f"the {self.pool} worker to be ready", self.output)
        return self

    def kill(self) -> None:
        """SIGKILL the worker and its children (by its process group id)."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)

    def log_lines(self) -> List[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []


@contextlib.contextmanager
def worker(broker: str, pool: str, concurrency: int, *, install: bool = True,
           name: str = "w", workdir: Optional[Path] = None) -> Iterator[Worker]:
    """Start a :class:`Worker`; stop it (by pid) when the block ends."""
    own = workdir is None
    directory = Path(tempfile.mkdtemp(prefix="asl-celery-")) if workdir is None else workdir
    w = Worker(broker, pool, concurrency, directory, install=install, name=name)
    try:
        yield w.start()
    finally:
        w.stop()
        if own:
            shutil.rmtree(directory, ignore_errors=True)
