"""A real gunicorn: per-request stores under load, and keep-alive isolation.

gunicorn runs as ``sys.executable -m gunicorn`` on a free loopback port,
serving :mod:`tests.gunicorn_app` (a Flask app). The clients are greenlets in
this process speaking HTTP/1.1 over :mod:`gevent.socket` (cooperative without
monkey-patching), some on keep-alive connections. Every server is stopped by
its pid in a ``finally``.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple

import gevent
import gevent.socket
import pytest

from helpers import ROOT, free_port, gunicorn_no_control_socket, server_env, stop_by_pid

WORKER = "asl_gevent.gunicorn.GeventWorker"
PYWSGI_WORKER = "asl_gevent.gunicorn.GeventPyWSGIWorker"
CONFIG = str(ROOT / "examples" / "gunicorn_conf.py")
KINDS = ("spawn", "pool", "executor", "thread", "threadpool")
LOGGED_KINDS = ("view", "spawn", "pool", "executor", "thread")


class HTTPConnection:
    """A minimal HTTP/1.1 client on one gevent socket (keep-alive capable)."""

    def __init__(self, port: int, timeout: float = 15) -> None:
        self.sock = gevent.socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buffer = b""

    def close(self) -> None:
        self.sock.close()

    def _fill(self) -> bool:
        chunk = self.sock.recv(65536)
        self.buffer += chunk
        return bool(chunk)

    def request(self, path: str, headers: Optional[Dict[str, str]] = None,
                close: bool = False) -> Tuple[int, Dict[str, str], bytes]:
        lines = [f"GET {path} HTTP/1.1", "Host: 127.0.0.1"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        if close:
            lines.append("Connection: close")
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        while b"\r\n\r\n" not in self.buffer:
            if not self._fill():
                raise ConnectionError(f"connection closed before the response to {path}")
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        status = int(status_line.split()[1])
        response_headers = {}
        for line in header_lines:
            key, _, value = line.partition(":")
            response_headers[key.strip().lower()] = value.strip()
        if "content-length" in response_headers:
            length = int(response_headers["content-length"])
            while len(self.buffer) < length:
                if not self._fill():
                    raise ConnectionError(f"connection closed inside the body of {path}")
            body, self.buffer = self.buffer[:length], self.buffer[length:]
        else:  # no length: the body runs to the end of the connection
            while self._fill():
                pass
            body, self.buffer = self.buffer, b""
        return status, response_headers, body


@contextlib.contextmanager
def gunicorn(tmp_path: Path, *, worker: str, app: str, workers: int = 2,
             config: Optional[str] = None,
             env: Optional[Dict[str, str]] = None) -> Iterator[int]:
    """Run gunicorn, wait until it answers, yield its port; stop it by pid.

    Its apps log to ``tmp_path / "logs"``; *env* adds environment variables.
    """
    port = free_port()
    log_dir = tmp_path / "logs"
    log_dir.mkdir(exist_ok=True)
    env = server_env(ASL_TEST_LOG_DIR=str(log_dir), **(env or {}))
    command = [sys.executable, "-m", "gunicorn", "-k", worker, "-w", str(workers),
               "-b", f"127.0.0.1:{port}", "--chdir", str(ROOT), *gunicorn_no_control_socket(),
               "--keep-alive", "10", "--graceful-timeout", "5", "--log-level", "warning"]
    if config is not None:
        command += ["-c", config]
    output = open(tmp_path / "gunicorn.out", "wb")
    proc = subprocess.Popen([*command, app], cwd=str(ROOT), env=env,
                            stdout=output, stderr=subprocess.STDOUT)
    try:
        wait_answering(proc, [port], tmp_path / "gunicorn.out", "gunicorn")
        yield port
    finally:
        stop_by_pid(proc, signal.SIGTERM, timeout=15)
        output.close()


def wait_answering(proc: subprocess.Popen[bytes], ports: Iterable[int], output: Path,
                   server: str, timeout: float = 30) -> None:
    """Poll ``/peek`` on each of *ports* until every one answers 200 (bounded
    by *timeout*); fail with the *server*'s *output* if one never does."""
    deadline = time.monotonic() + timeout
    pending = set(ports)
    while pending and time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        for port in sorted(pending):
            try:
                conn = HTTPConnection(port, timeout=2)
                try:
                    status, _, _ = conn.request("/peek", {"X-Request-ID": "ready"}, close=True)
                finally:
                    conn.close()
                if status == 200:
                    pending.discard(port)
            except OSError:
                pass
        if pending:
            gevent.sleep(0.1)
    if pending:
        pytest.fail(f"{server} not ready (exit code {proc.poll()}):\n"
                    f"{output.read_text(errors='replace')}")


def _read_logs(tmp_path: Path) -> List[str]:
    lines = []
    for path in sorted((tmp_path / "logs").glob("worker-*.log")):
        lines += path.read_text().splitlines()
    return lines


# -- load: 1,000 requests, 50 concurrent clients -------------------------------

REQUESTS = 1000
CLIENTS = 50


def _load(port: int) -> List[Tuple[str, int, Dict[str, str], Dict[str, Any]]]:
    """50 client greenlets, 20 requests each: even clients on one keep-alive
    connection, odd ones on a new connection per request."""
    results: List[Tuple[str, int, Dict[str, str], Dict[str, Any]]] = []
    per_client = REQUESTS // CLIENTS

    def client(k: int) -> None:
        keep_alive = k % 2 == 0
        conn: Optional[HTTPConnection] = None
        try:
            for j in range(per_client):
                request_id = f"c{k:02d}-r{j:02d}-{uuid.uuid4().hex[:8]}"
                if conn is None:
                    conn = HTTPConnection(port)
                status, headers, body = conn.request(
                    "/work", {"X-Request-ID": request_id}, close=not keep_alive)
                results.append((request_id, status, headers, json.loads(body)))
                if not keep_alive or headers.get("connection", "").lower() == "close":
                    conn.close()
                    conn = None
        finally:
            if conn is not None:
                conn.close()

    clients = [gevent.spawn(client, k) for k in range(CLIENTS)]
    with gevent.Timeout(60, AssertionError("load did not finish in 60 s")):
        gevent.joinall(clients, raise_error=True)
    return results


@pytest.mark.slow
@pytest.mark.parametrize("app, middleware", [
    ("tests.gunicorn_app:app", True),
    ("tests.gunicorn_app:bare_app", False),
], ids=["middleware", "worker-class-alone"])
def test_every_request_and_log_line_carries_only_its_own_id(
        tmp_path: Path, app: str, middleware: bool) -> None:
    """Under 1,000 requests from 50 concurrent clients, every response, every
    task the view spawns (greenlet, pool, executor, thread, OS thread-pool)
    and every log line carries exactly its own request's id, no other."""
    with gunicorn(tmp_path, worker=WORKER, app=app) as port:
        results = _load(port)
    # gunicorn has stopped: the workers flushed and closed their log files.
    lines = _read_logs(tmp_path)

    sent = [request_id for request_id, *_ in results]
    assert len(sent) == len(set(sent)) == REQUESTS
    bad = []
    for request_id, status, headers, body in results:
        expected_body = {
            "expected": request_id,
            "before": request_id if middleware else None,
            "seen": {kind: request_id for kind in KINDS},
            "after": request_id,
            "pid": body.get("pid"),
        }
        if status != 200 or body != expected_body:
            bad.append((request_id, status, body))
        if middleware and headers.get("x-request-id") != request_id:
            bad.append((request_id, "echoed", headers.get("x-request-id")))
    assert bad == []

    pattern = re.compile(r"^(?P<logged>\S+) (?:view|task=(?P<kind>\w+)) expected=(?P<expected>\S+)$")
    kinds_per_id: Dict[str, Counter[str]] = {}
    foreign = []
    for line in lines:
        match = pattern.match(line)
        assert match, f"unexpected log line {line!r}"
        if match["logged"] != match["expected"]:
            foreign.append(line)
        kinds_per_id.setdefault(match["expected"], Counter())[match["kind"] or "view"] += 1
    assert foreign == []
    assert set(kinds_per_id) == set(sent)
    one_each = Counter(LOGGED_KINDS)
    assert [i for i, kinds in kinds_per_id.items() if kinds != one_each] == []
    assert len(lines) == REQUESTS * len(LOGGED_KINDS)


# -- keep-alive isolation ------------------------------------------------------


def _keep_alive_sequence(port: int) -> Tuple[List[Dict[str, Any]], List[int], Dict[str, Any]]:
    """On ONE connection: peek, leak a, peek, leak b and raise, peek.

    Returns the three peeks, every status, and the first leak's body.
    """
    conn = HTTPConnection(port)
    try:
        statuses, peeks = [], []

        def peek(n: int) -> None:
            status, _, body = conn.request("/peek", {"X-Request-ID": f"peek-{n}"})
            statuses.append(status)
            peeks.append(json.loads(body))

        peek(1)
        status, _, body = conn.request("/leak?tag=a", {"X-Request-ID": "leak-a"})
        statuses.append(status)
        first_leak = json.loads(body)
        peek(2)
        status, _, _ = conn.request("/leak?tag=b&raise=1", {"X-Request-ID": "leak-b"})
        statuses.append(status)
        peek(3)
    finally:
        conn.close()
    return peeks, statuses, first_leak


def _expected_clean(n: int, middleware: bool) -> Dict[str, Any]:
    store = {"request_id": f"peek-{n}"} if middleware else None
    return {"store": store, "var": None}


@pytest.mark.parametrize("worker, app, config, middleware", [
    (WORKER, "tests.gunicorn_app:bare_app", None, False),
    ("gevent", "tests.gunicorn_app:app", CONFIG, True),
    (PYWSGI_WORKER, "tests.gunicorn_app:bare_app", None, False),
], ids=["worker-class-alone", "stock-gevent+middleware+config", "pywsgi-worker-class"])
def test_keep_alive_request_never_sees_the_previous_ones(
        tmp_path: Path, worker: str, app: str, config: Optional[str],
        middleware: bool) -> None:
    """On a keep-alive connection, a request sees neither the store nor the
    contextvar that the previous request set with enter_with/set, also after
    a request whose view raised; nor does a greenlet it spawns."""
    with gunicorn(tmp_path, worker=worker, app=app, workers=1, config=config) as port:
        peeks, statuses, first_leak = _keep_alive_sequence(port)

    assert statuses == [200, 200, 200, 500, 200]
    # One greenlet served them all: the isolation is per request, not per connection.
    assert len({p["greenlet"] for p in peeks} | {first_leak["greenlet"]}) == 1
    assert first_leak["here"] == {"store": {"request_id": "leak-a"} if middleware else None,
                                  "var": None}
    for n, seen in enumerate(peeks, 1):
        assert (n, seen["here"]) == (n, _expected_clean(n, middleware))
        assert (n, seen["spawned"]) == (n, _expected_clean(n, middleware))


def test_stock_worker_alone_leaks_between_keep_alive_requests(tmp_path: Path) -> None:
    """Negative control: the stock gevent worker without the middleware runs
    keep-alive requests in one context, so what request 1 set is visible to
    request 2 (the hooks alone cannot tell requests apart there)."""
    with gunicorn(tmp_path, worker="gevent", app="tests.gunicorn_app:bare_app",
                  workers=1) as port:
        peeks, statuses, _ = _keep_alive_sequence(port)

    assert statuses == [200, 200, 200, 500, 200]
    assert [p["here"] for p in peeks] == [
        {"store": None, "var": None},
        {"store": {"request_id": "leaked-a"}, "var": "leaked-a"},
        {"store": {"request_id": "leaked-b"}, "var": "leaked-b"},
    ]


def test_pre_request_hook_runs_in_the_request_context(tmp_path: Path) -> None:
    """With the worker class, gunicorn's pre_request hook runs inside the
    request's own context: a store it enters is what the app (and what the
    app spawns) sees, and the next keep-alive request gets only its own. The
    config imports the storage at load time, so the hooks are installed in
    the master before the worker's monkey.patch_all; that works too."""
    config = tmp_path / "pre_request_conf.py"
    config.write_text(textwrap.dedent("""
        from asl_gevent.wsgi import request_storage

        def pre_request(worker, req):
            request_id = dict(req.headers)["X-REQUEST-ID"]
            request_storage.enter_with({"request_id": "pre-" + request_id})
    """))
    with gunicorn(tmp_path, worker=WORKER, app="tests.gunicorn_app:bare_app",
                  workers=1, config=str(config)) as port:
        peeks, statuses, first_leak = _keep_alive_sequence(port)

    assert statuses == [200, 200, 200, 500, 200]
    assert len({p["greenlet"] for p in peeks} | {first_leak["greenlet"]}) == 1
    assert first_leak["here"] == {"store": {"request_id": "pre-leak-a"}, "var": None}
    for n, seen in enumerate(peeks, 1):
        expected = {"store": {"request_id": f"pre-peek-{n}"}, "var": None}
        assert (n, seen["here"], seen["spawned"]) == (n, expected, expected)


# -- what the README says about access logs and server hooks -------------------

_ACCESS_CONFIG = """
import os

_dir = os.environ["ASL_TEST_LOG_DIR"]
# The README's recipe: the id the middleware left in the environ; and the
# one it echoed, read from the response (not with gevent_pywsgi: gunicorn 27
# keys pywsgi's response headers by their bytes).
access_log_format = '"%(r)s" %(s)s id=%({asl_gevent.request_id}e)s echoed=%({x-request-id}o)s'
logconfig_dict = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"request": {"()": "asl_gevent.logfilter.StoreFilter"}},
    "formatters": {"habit": {"format": "%(request_id)s %(message)s"},
                   "plain": {"format": "%(message)s"}},
    "handlers": {
        # A user's habit: StoreFilter on gunicorn's access logger's handler.
        "habit": {"class": "logging.FileHandler", "filters": ["request"],
                  "formatter": "habit", "filename": os.path.join(_dir, "access-habit.log")},
        "recipe": {"class": "logging.FileHandler", "formatter": "plain",
                   "filename": os.path.join(_dir, "access-recipe.log")},
    },
    "loggers": {"gunicorn.access": {"level": "INFO", "handlers": ["habit", "recipe"],
                                    "propagate": False}},
    "root": {"level": "WARNING", "handlers": []},
}
"""


@pytest.mark.parametrize("worker", [WORKER, PYWSGI_WORKER, "gevent"])
def test_access_log_shows_the_id_through_the_response_header(
        tmp_path: Path, worker: str) -> None:
    """gunicorn writes the access log outside the app's call: a StoreFilter
    there logs '-' for every request (the README explains why), except under
    our GeventWorker, whose per-request context the middleware now shares,
    while ``%({asl_gevent.request_id}e)s`` in ``access_log_format`` logs the
    id the middleware used (the client's, or the generated one), with every
    worker class; ``%({x-request-id}o)s`` does too, except with gunicorn's
    gevent_pywsgi worker."""
    config = tmp_path / "access_conf.py"
    config.write_text(_ACCESS_CONFIG)
    echoed = {}
    with gunicorn(tmp_path, worker=worker, app="tests.gunicorn_app:app", workers=1,
                  config=str(config)) as port:
        conn = HTTPConnection(port)
        try:
            for n, sent in enumerate(["acc-1", None, "bad id", "acc-4"]):
                status, headers, _ = conn.request(
                    f"/peek?n={n}", {"X-Request-ID": sent} if sent else None)
                assert status == 200
                echoed[n] = headers["x-request-id"]
        finally:
            conn.close()
    assert echoed[0] == "acc-1" and echoed[3] == "acc-4"
    assert echoed[1] != echoed[2] and all(len(echoed[n]) == 32 for n in (1, 2))

    logs = tmp_path / "logs"
    recipe = [line for line in (logs / "access-recipe.log").read_text().splitlines()
              if "/peek?n=" in line]
    pywsgi = worker == PYWSGI_WORKER
    assert recipe == [f'"GET /peek?n={n} HTTP/1.1" 200 id={echoed[n]} '
                      f'echoed={"-" if pywsgi else echoed[n]}' for n in range(4)]
    habit = (logs / "access-habit.log").read_text().splitlines()
    assert len(habit) == 5  # the readiness probe, then our four
    if worker == WORKER:
        # 0.3: under our GeventWorker the middleware sets the store in the
        # worker's per-request context, where gunicorn also writes the access
        # log, so the habit works there too.
        assert [line.split(" ", 1)[0] for line in habit] == ["ready"] + [echoed[n] for n in range(4)]
    else:
        assert [line.split(" ", 1)[0] for line in habit] == ["-"] * 5


_SERVER_HOOKS_CONFIG = """
import os


def _note(what, req):
    path = os.path.join(os.environ["ASL_TEST_LOG_DIR"], f"hooks-{os.getpid()}.txt")
    with open(path, "a") as out:
        out.write(f"{what} {dict(req.headers).get('X-REQUEST-ID')}\\n")


def pre_request(worker, req):
    _note("pre", req)


def post_request(worker, req, environ, resp):
    _note("post", req)
"""


@pytest.mark.parametrize("worker, called", [
    (WORKER, True), (PYWSGI_WORKER, False), ("gevent_pywsgi", False),
], ids=["GeventWorker", "GeventPyWSGIWorker", "stock-gevent_pywsgi"])
def test_pre_and_post_request_hooks_run_only_with_the_gevent_worker(
        tmp_path: Path, worker: str, called: bool) -> None:
    """As the README says: gunicorn calls ``pre_request``/``post_request``
    around every request with ``GeventWorker``, and never with the
    ``gevent_pywsgi`` worker, ours or gunicorn's own (gunicorn's pywsgi
    handler does not go through its request loop)."""
    config = tmp_path / "hooks_conf.py"
    config.write_text(_SERVER_HOOKS_CONFIG)
    with gunicorn(tmp_path, worker=worker, app="tests.gunicorn_app:app", workers=1,
                  config=str(config)) as port:
        conn = HTTPConnection(port)
        try:
            for n in range(3):
                assert conn.request("/peek", {"X-Request-ID": f"hook-{n}"})[0] == 200
        finally:
            conn.close()
    lines = [line for path in sorted((tmp_path / "logs").glob("hooks-*.txt"))
             for line in path.read_text().splitlines()]
    if called:
        assert lines == ["pre ready", "post ready"] + [
            f"{what} hook-{n}" for n in range(3) for what in ("pre", "post")]
    else:
        assert lines == []


# -- the middleware passes through what gunicorn recognises by identity ------------


@pytest.mark.parametrize("worker", [WORKER, "gevent"])
def test_already_handled_and_file_wrapper_pass_through_under_real_gunicorn(
        tmp_path: Path, worker: str) -> None:
    """An app behind the middleware that writes its own response on
    gunicorn.socket and returns ALREADY_HANDLED: the client gets exactly that
    response (with the request's id, read from the store) and nothing after
    it on the keep-alive connection, and gunicorn logs no error. A wsgi.file_wrapper response is sent
    whole (gunicorn's sendfile path needs the very object)."""
    expected_file = (ROOT / "tests" / "passthrough_app.py").read_bytes()
    with gunicorn(tmp_path, worker=worker, app="tests.passthrough_app:app",
                  workers=1) as port:
        for n in range(3):
            conn = HTTPConnection(port)
            try:
                status, _, body = conn.request("/handled", {"X-Request-ID": f"took-{n}"})
                assert (status, body) == (200, f"handled took-{n}".encode())
                # Nothing of gunicorn's own follows (no error response): the
                # next bytes on this keep-alive connection answer the next request.
                status, _, body = conn.request("/peek")
                assert (status, body) == (200, b"ok")
            finally:
                conn.close()
        conn = HTTPConnection(port)
        try:
            status, headers, body = conn.request("/file", {"X-Request-ID": "file-1"}, close=True)
        finally:
            conn.close()
        assert (status, headers["x-request-id"], body) == (200, "file-1", expected_file)
    output = (tmp_path / "gunicorn.out").read_text(errors="replace")
    assert "Error handling request" not in output and "Traceback" not in output, output
