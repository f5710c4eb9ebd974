"""uWSGI ``--gevent`` as a supported server (issue 16, point 1).

A real uWSGI (the ``pyuwsgi`` wheel: the ``uwsgi`` command with the gevent
loop engine built in) serves ``tests/uwsgi_app.py`` on 127.0.0.1: two
worker processes with 50 async cores each, forked from C after the app was
imported in the master (uWSGI's default), recycled by ``--max-requests``
while the load runs. Clients come in two ways at once: a fresh connection
per request on ``--http-socket`` (which closes after each response in gevent
mode), and keep-alive connections through uWSGI's HTTP router
(``--http --http-keepalive``, which talks to the workers over a uwsgi
socket). A third of the requests carry no ``X-Request-ID``.

Each request reports the id its view, ``gevent.spawn``,
``Greenlet(...).start()``, ``Pool.spawn`` and a monkey-patched thread saw:
every one must be the request's own (0 wrong), and every request must be
answered (0 missing). Once with the app calling ``monkey.patch_all()``
itself, once with ``--gevent-monkey-patch``; once with the middleware and
once with an app that makes its own store without it (which must never find
the previous request's store, nor a context variable it set, on the same
async core, even after a request that raised). The leak watch names exactly
the greenlets and threads a few requests leave behind.

uWSGI's master *reloads* on SIGTERM; it is stopped with SIGINT, by pid.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import gevent
import pytest

from helpers import ROOT, free_port, server_env, stop_by_pid
from test_gunicorn import HTTPConnection, wait_answering

UWSGI = shutil.which("uwsgi", path=os.path.dirname(sys.executable))
pytestmark = pytest.mark.skipif(UWSGI is None, reason="pyuwsgi is not installed (test extra)")

PROCESSES = 2
CORES = 50
MAX_REQUESTS = 250      # per worker: each recycled once or twice during the load below
CLIENTS = 20            # half on fresh connections, half keep-alive
PER_CLIENT = 60         # 1,200 requests per run
GENERATED = re.compile(r"^[0-9a-f]{32}$")


class UWSGI_:
    """A running uWSGI: its ports and master pid."""

    def __init__(self, proc: "subprocess.Popen[bytes]", socket_port: int, router_port: int,
                 output: Path) -> None:
        self.proc = proc
        self.socket_port = socket_port   # --http-socket: a fresh connection per request
        self.router_port = router_port   # --http router: keep-alive
        self.output = output


@contextlib.contextmanager
def uwsgi(tmp_path: Path, *, callable_: str, patch: str, max_requests: Optional[int] = None,
          env: Optional[Dict[str, str]] = None, wsgi_file: Optional[Path] = None,
          extra: Sequence[str] = (), processes: int = PROCESSES) -> Iterator[UWSGI_]:
    """Run uWSGI on three ephemeral loopback ports until it answers; stop it by pid.

    *callable_* names the app in *wsgi_file* (``tests/uwsgi_app.py`` by
    default; it must answer ``/peek``); *patch* is ``"option"`` for
    ``--gevent-monkey-patch`` or ``"app"`` for the app's own ``patch_all()``
    (``$ASL_TEST_PATCH``); *extra* adds uWSGI options (``--lazy-apps``, say);
    *processes* is the number of workers.
    Its output goes to ``tmp_path / "uwsgi.out"``, the apps' logs to
    ``tmp_path / "logs"`` (``$ASL_TEST_LOG_DIR``).
    """
    assert UWSGI is not None
    socket_port, router_port, backend_port = free_port(), free_port(), free_port()
    log_dir = tmp_path / "logs"
    log_dir.mkdir(exist_ok=True)
    full_env = server_env(ASL_TEST_LOG_DIR=str(log_dir), **(env or {}))
    command = [UWSGI, "--master", "--processes", str(processes), "--gevent", str(CORES),
               "--http-socket", f"127.0.0.1:{socket_port}",
               "--socket", f"127.0.0.1:{backend_port}",
               "--http", f"127.0.0.1:{router_port}", "--http-keepalive",
               "--http-to", f"127.0.0.1:{backend_port}",
               "--wsgi-file", str(wsgi_file or ROOT / "tests" / "uwsgi_app.py"),
               "--callable", callable_, *extra,
               "--need-app", "--disable-logging", "--worker-reload-mercy", "10",
               "--min-worker-lifetime", "0"]
    if patch == "option":
        command.append("--gevent-monkey-patch")
    else:
        full_env["ASL_TEST_PATCH"] = "app"
    if max_requests is not None:
        command += ["--max-requests", str(max_requests)]
    output = tmp_path / "uwsgi.out"
    with open(output, "wb") as out:
        proc = subprocess.Popen(command, cwd=str(tmp_path), env=full_env, stdout=out,
                                stderr=subprocess.STDOUT)
    server = UWSGI_(proc, socket_port, router_port, output)
    try:
        wait_answering(proc, [socket_port, router_port], output, "uWSGI")
        yield server
    finally:
        # SIGTERM would make the master reload; SIGINT stops it and its workers.
        stop_by_pid(proc, signal.SIGINT, timeout=20)


Result = Tuple[str, str, int, Dict[str, str], bytes]  # (path, sent id or "", status, headers, body)


def _load(server: UWSGI_, paths: List[str], with_header: List[bool]) -> List[Result]:
    """Send ``paths[n]`` (with id ``u<n>`` if ``with_header[n]``) from CLIENTS
    greenlets, half on fresh connections, half keep-alive; bounded in time."""
    results: List[Result] = []
    per_client = len(paths) // CLIENTS
    assert per_client * CLIENTS == len(paths)

    def client(k: int) -> None:
        keep_alive = k % 2 == 1
        port = server.router_port if keep_alive else server.socket_port
        conn: Optional[HTTPConnection] = None
        try:
            for j in range(per_client):
                n = k * per_client + j
                sent = f"u{n}" if with_header[n] else ""
                if conn is None:
                    conn = HTTPConnection(port)
                status, headers, body = conn.request(
                    paths[n], {"X-Request-ID": sent} if sent else {}, close=not keep_alive)
                results.append((paths[n], sent, status, headers, body))
                if not keep_alive or headers.get("connection", "").lower() == "close":
                    conn.close()
                    conn = None
        finally:
            if conn is not None:
                conn.close()

    with gevent.Timeout(120, AssertionError("the load did not finish in 120 s")):
        gevent.joinall([gevent.spawn(client, k) for k in range(CLIENTS)], raise_error=True)
    return results


def _check(results: List[Result], bare: bool) -> Tuple[int, Counter[str]]:
    """0 wrong, 0 missing; returns (requests answered, pids that answered)."""
    wrong = []
    pids: Counter[str] = Counter()
    for path, sent, status, headers, body in results:
        if path == "/raise":
            assert status == 500, (path, sent, status, body)
            continue
        assert status == 200, (path, sent, status, body)
        report = json.loads(body)
        pids[str(report["pid"])] += 1
        if sent:
            expected = sent
        elif bare:
            expected = "-"  # the bare app's own store for a request without an id
        else:
            expected = headers.get("x-request-id", "")
            assert GENERATED.match(expected), headers  # generated, and echoed
        seen = report["seen"]
        if set(seen.values()) != {expected}:
            wrong.append((sent, expected, seen))
        if report["found"] is not None and report["found"] != [None, None]:
            wrong.append((sent, "found a previous request's store", report["found"]))
        assert report["threading_patched"] is True
    assert wrong == [], wrong[:5]
    return len(results), pids


@pytest.mark.slow
@pytest.mark.parametrize("callable_", ["app", "bare_app"], ids=["middleware", "no-middleware"])
@pytest.mark.parametrize("patch", ["app", "option"], ids=["app-patches", "gevent-monkey-patch"])
def test_uwsgi_gevent_every_request_sees_its_own_id(tmp_path: Path, callable_: str,
                                                    patch: str) -> None:
    """1,200 requests (a third without X-Request-ID; some schedule a loop
    callback that sets a store and a context variable in the hub, which
    spawns every request's greenlet; the app without the middleware also
    gets requests that raise after setting its store) on two
    recycled workers with 50 async cores each, fresh and keep-alive
    connections: every request answered, every kind of work it started saw
    its id, and no request found a previous request's (or the hub's) store
    or context variable. With the middleware the leak watch
    is on and reports nothing: no request left work behind."""
    bare = callable_ == "bare_app"
    total = CLIENTS * PER_CLIENT
    paths = ["/raise" if bare and n % 37 == 5 else "/hub" if n % 41 == 7 else "/work"
             for n in range(total)]
    with_header = [n % 3 != 0 for n in range(total)]
    env = {} if bare else {"ASL_GEVENT_LEAK_WATCH": "0.3"}
    with uwsgi(tmp_path, callable_=callable_, patch=patch, max_requests=MAX_REQUESTS,
               env=env) as server:
        results = _load(server, paths, with_header)
        time.sleep(0.8)  # past the leak watch's delay and a check period
    answered, pids = _check(results, bare)
    assert answered == total
    # Recycling really happened during the load: more workers than processes.
    assert len(pids) > PROCESSES, pids
    leaks = [p.read_text() for p in (tmp_path / "logs").glob("leak-*.log")]
    assert leaks == [] or all(not text for text in leaks), leaks


LEAK_LINE = re.compile(r"^WARNING request (\S+) ended [\d.]+ s ago, but its store is still held by "
                       r"(greenlet|thread) '([^']+)' running ")
LEAKING = {7, 150, 333, 398}


@pytest.mark.slow
def test_uwsgi_leak_watch_names_the_holders(tmp_path: Path) -> None:
    """400 requests through uWSGI --gevent with the middleware and
    ASL_GEVENT_LEAK_WATCH=0.5: exactly the greenlet and the thread each of 4
    requests left behind are reported, once each, with their request's id."""
    total = 400
    paths = ["/leak" if n in LEAKING else "/work" for n in range(total)]
    with uwsgi(tmp_path, callable_="app", patch="option",
               env={"ASL_GEVENT_LEAK_WATCH": "0.5"}) as server:
        results = _load(server, paths, [True] * total)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # bounded: until all 8 are reported
            text = "".join(p.read_text() for p in (tmp_path / "logs").glob("leak-*.log"))
            if text.count("\n") >= 2 * len(LEAKING):
                break
            time.sleep(0.2)
        time.sleep(0.5)  # and nothing more
    _check(results, bare=False)
    found: Counter[Tuple[str, str, str]] = Counter()
    for path in sorted((tmp_path / "logs").glob("leak-*.log")):
        for line in path.read_text().splitlines():
            m = LEAK_LINE.match(line)
            assert m is not None, line
            found[(m.group(1), m.group(2), m.group(3))] += 1
    expected: Counter[Tuple[str, str, str]] = Counter()
    for n in LEAKING:
        expected[(f"u{n}", "greenlet", f"leaker-greenlet-u{n}")] = 1
        expected[(f"u{n}", "thread", f"leaker-thread-u{n}")] = 1
    assert found == expected


def _get(port: int, path: str, request_id: str) -> Tuple[int, bytes]:
    conn = HTTPConnection(port)
    try:
        status, _, body = conn.request(path, {"X-Request-ID": request_id}, close=True)
        return status, body
    finally:
        conn.close()


def test_uwsgi_run_info_on_its_own_signal(tmp_path: Path) -> None:
    """Installed in each uWSGI worker by a ``@postfork`` function, the
    default signal works: ``kill -PWR <worker>`` prints the run info with the
    store of a greenlet a request left behind, and the worker goes on
    serving. SIGUSR1, which uWSGI handles in C in its workers, is refused
    (ValueError) instead of being silently taken."""
    # One worker: the probe must reach the worker that holds sig-1's greenlet
    # (with two, the kernel may hand every probe to the other one).
    with uwsgi(tmp_path, callable_="app", patch="option", env={"ASL_TEST_RUN_INFO": "1"},
               processes=1) as server:
        status, body = _get(server.socket_port, "/leak", "sig-1")
        assert status == 200
        pid = json.loads(body)["pid"]
        status, body = _get(server.socket_port, "/signals", "sig-probe")
        report = json.loads(body)
        assert status == 200 and report["pid"] == pid
        assert report["signals"]["default"] == "installed"
        assert report["signals"]["SIGUSR1"].startswith(
            "ValueError: install_signal_handler() argument 'signum': SIGUSR1 already has a "
            "handler installed outside Python (uWSGI's workers use SIGUSR1 and SIGUSR2;")
        os.kill(report["pid"], signal.SIGPWR)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and \
                "Stores: request={'request_id': 'sig-1'}" not in server.output.read_text():
            time.sleep(0.1)
        # Dumped by the signal itself, with no request to wake the worker.
        assert "Stores: request={'request_id': 'sig-1'}" in server.output.read_text()
        assert _get(server.socket_port, "/work", "sig-2")[0] == 200
        assert server.proc.poll() is None
    output = server.output.read_text()
    assert "Stores: request={'request_id': 'sig-1'}" in output, output
    assert "leaker-greenlet-sig-1" in output
