"""The leak watch (issue 9): a store still held after its request is named.

In-process with a real ``gevent.pywsgi`` server and the middleware, and under
load through a real gunicorn with the worker class: exactly the holders a
few known requests leave behind are reported, once each, with the right
request id, and never a request whose work ended. Delays are short (0.2 to
0.5 s) to keep the tests fast. Also the run-info dump with stores.
"""

from __future__ import annotations

import gc
import logging
import os
import re
import threading
import time
import weakref
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional

import gevent
import gevent.event
import pytest
from gevent.pywsgi import WSGIServer

from asl_gevent import _watch, run_detached
from asl_gevent.debug import format_run_info, install_signal_handler, uninstall_signal_handler
from asl_gevent.wsgi import RequestContextMiddleware, get_request_id
from helpers import ListHandler, run_python
from test_gunicorn import HTTPConnection, gunicorn

LEAK_LINE = re.compile(r"^request (\S+) ended [\d.]+ s ago, but its store is still held by "
                       r"(greenlet|thread) '([^']+)' running ")


@pytest.fixture(name="leak_log")
def _leak_log() -> Iterator[ListHandler]:
    handler = ListHandler()
    logger = logging.getLogger("asl_gevent.leak")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


class _App:
    """``/leak`` leaves a greenlet holding the request's store; ``/work``
    starts one that ends; ``/slow`` one that ends after the delay."""

    def __init__(self) -> None:
        self.never = gevent.event.Event()
        self.markers: List[Optional[object]] = []

    def __call__(self, environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        self.markers.append(_watch.request_marker.get())
        path = environ["PATH_INFO"]
        gevent.spawn(gevent.sleep, 0.001)
        if path == "/leak":
            gevent.spawn(self.never.wait).name = f"leaker-{get_request_id()}"
        start_response("200 OK", [])
        return iter([b"ok"])  # a streaming response: the request ends at close()


def _serve(app: Any, requests: List[str]) -> None:
    server = WSGIServer(("127.0.0.1", 0), app, log=None)
    server.start()
    try:
        for n, path in enumerate(requests):
            conn = HTTPConnection(server.server_port)
            try:
                status, _, _ = conn.request(path, {"X-Request-ID": f"r{n}"}, close=True)
                assert status == 200
            finally:
                conn.close()
    finally:
        server.stop(timeout=5)


def test_holders_are_named_once_each(leak_log: ListHandler) -> None:
    """200 requests, 3 of which leave a greenlet behind: exactly those 3 are
    reported, each once, with its request id, its name, its function and
    where it was spawned; more requests and more checks add nothing."""
    app = _App()
    leaking = {17, 90, 150}
    paths = ["/leak" if n in leaking else "/work" for n in range(200)]
    try:
        _serve(RequestContextMiddleware(app, leak_watch=0.2), paths)
        gevent.sleep(0.8)
        _serve(RequestContextMiddleware(app, leak_watch=0.2), ["/work"] * 20)
        gevent.sleep(0.8)
        lines = [record.getMessage() for record in leak_log.records]
        found = Counter((m.group(1), m.group(3)) for m in map(LEAK_LINE.match, lines) if m)
        assert found == Counter({(f"r{n}", f"leaker-r{n}"): 1 for n in leaking}), lines
        assert len(lines) == 3
        assert all(r.levelname == "WARNING" for r in leak_log.records)
        assert "running threading.Event.wait" in lines[0] or "running gevent" in lines[0]
        assert "test_leak_watch.py" in lines[0] and "in __call__" in lines[0]
        assert all(marker is not None for marker in app.markers)
    finally:
        app.never.set()


class _ClassRaises:
    """An object whose ``__class__`` raises, as Django's unconfigured
    ``settings`` (a ``LazySettings`` proxy) does once Django is imported."""

    @property  # type: ignore[misc]
    def __class__(self) -> type:
        raise RuntimeError("settings are not configured")


def test_watch_survives_objects_whose_class_raises(leak_log: ListHandler) -> None:
    """The checker scans every object the collector tracks; a proxy whose
    ``__class__`` raises (found when Django was merely imported, killing the
    checker greenlet so no leak was ever reported) is passed over, and the
    leaking request is still named."""
    hostile = _ClassRaises()
    app = _App()
    try:
        _serve(RequestContextMiddleware(app, leak_watch=0.2), ["/work", "/leak"])
        gevent.sleep(0.8)
        lines = [record.getMessage() for record in leak_log.records]
        found = [(m.group(1), m.group(3)) for m in map(LEAK_LINE.match, lines) if m]
        assert found == [("r1", "leaker-r1")], lines
    finally:
        app.never.set()
        del hostile


def test_watch_keeps_no_store_alive(leak_log: ListHandler) -> None:
    """With the watch on, a request's store (weakly watched here; the default
    plain dict cannot be) is freed as soon as its work ends."""
    class Store(dict):  # type: ignore[type-arg]
        pass

    refs: List["weakref.ReferenceType[Store]"] = []

    def factory(environ: Dict[str, Any]) -> Store:
        store = Store(request_id="x")
        refs.append(weakref.ref(store))
        return store

    _serve(RequestContextMiddleware(_App(), store_factory=factory, leak_watch=0.2), ["/work"] * 20)
    gevent.sleep(0.05)
    gc.collect()
    assert len(refs) == 20 and all(ref() is None for ref in refs)
    assert leak_log.records == []


def test_watch_off_costs_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Off (the default): no marker in the request's context, no checker."""
    monkeypatch.delenv(_watch.ENV, raising=False)
    app = _App()
    _serve(RequestContextMiddleware(app), ["/work"] * 5)
    assert app.markers == [None] * 5
    assert RequestContextMiddleware(app)._watch is None
    monkeypatch.setenv(_watch.ENV, "0")
    assert RequestContextMiddleware(app)._watch is None
    monkeypatch.setenv(_watch.ENV, "2.5")
    assert RequestContextMiddleware(app)._watch.delay == 2.5  # type: ignore[union-attr]
    assert RequestContextMiddleware(app, leak_watch=0)._watch is None


@pytest.mark.parametrize("value, error, message", [
    ("5", TypeError, r"^RequestContextMiddleware\(\) argument 'leak_watch' must be a number of seconds or None, not 'str'"),
    (-1, ValueError, r"^RequestContextMiddleware\(\) argument 'leak_watch' must be a finite number of seconds >= 0, not -1"),
    (float("nan"), ValueError, r"argument 'leak_watch' must be a finite number"),
])
def test_leak_watch_bad_input(value: Any, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        RequestContextMiddleware(_App(), leak_watch=value)


def test_leak_watch_bad_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(_watch.ENV, "soon")
    with pytest.raises(ValueError, match=r"^environment variable ASL_GEVENT_LEAK_WATCH must be a "
                                         r"number of seconds, not 'soon'"):
        RequestContextMiddleware(_App())


# -- under load, through a real gunicorn ----------------------------------------

REQUESTS = 2000
CLIENTS = 40
LEAKING = {3, 777, 1500, 1999}


def _gunicorn_load(tmp_path: Path, app: str,
                   worker: str = "asl_gevent.gunicorn.GeventWorker") -> List[str]:
    with gunicorn(tmp_path, worker=worker, app=app,
                  env={"ASL_GEVENT_LEAK_WATCH": "0.5"}) as port:
        per_client = REQUESTS // CLIENTS

        def client(k: int) -> None:
            conn = HTTPConnection(port)
            try:
                for j in range(per_client):
                    n = k * per_client + j
                    path = "/leak" if n in LEAKING else "/work"
                    status, headers, body = conn.request(path, {"X-Request-ID": f"q{n}"})
                    assert status == 200 and body == f"q{n}".encode()
                    if headers.get("connection", "").lower() == "close":
                        conn.close()
                        conn = HTTPConnection(port)
            finally:
                conn.close()

        with gevent.Timeout(90, AssertionError("load did not finish in 90 s")):
            gevent.joinall([gevent.spawn(client, k) for k in range(CLIENTS)], raise_error=True)
        time.sleep(2.0)  # the 0.5 s delay, a check period and then some
    log_dir = tmp_path / "logs"
    lines = []
    for path in sorted(log_dir.glob("leak-*.log")):
        lines += path.read_text().splitlines()
    return lines


@pytest.mark.slow
@pytest.mark.parametrize("app,worker", [
    ("leak_watch_app:app", "asl_gevent.gunicorn.GeventWorker"),
    ("leak_watch_app:bare_app", "asl_gevent.gunicorn.GeventWorker"),
    ("leak_watch_app:bare_app", "asl_gevent.gunicorn.GeventPyWSGIWorker"),
], ids=["middleware", "worker-class-alone", "pywsgi-worker-class-alone"])
def test_gunicorn_reports_exactly_the_leaking_holders(tmp_path: Path, app: str,
                                                      worker: str) -> None:
    """2,000 requests through gunicorn (2 workers, keep-alive), each starting a
    greenlet and a thread that end; 4 also start a greenlet and a thread that
    never end. Exactly those 8 holders are reported, once each, with their
    request's id; not one other request. The worker classes alone (no
    middleware; the app sets its own store) read ASL_GEVENT_LEAK_WATCH too,
    the gevent_pywsgi one included."""
    lines = _gunicorn_load(tmp_path, app, worker)
    found = Counter()
    for line in lines:
        assert line.startswith("WARNING request "), line
        m = LEAK_LINE.match(line[len("WARNING "):])
        assert m is not None, line
        found[(m.group(1), m.group(2), m.group(3))] += 1
    expected = Counter()
    for n in LEAKING:
        expected[(f"q{n}", "greenlet", f"leaker-greenlet-q{n}")] = 1
        expected[(f"q{n}", "thread", f"leaker-thread-q{n}")] = 1
    assert found == expected, lines


# -- run info with stores ------------------------------------------------------------


def test_run_info_shows_each_greenlets_stores() -> None:
    """Every live greenlet is listed with its stores, short and truncated."""
    from asl_gevent import AsyncLocalStorage

    request = AsyncLocalStorage[Dict[str, str]](name="request")
    user = AsyncLocalStorage[str](name="user")
    never = gevent.event.Event()

    def serve(n: int) -> None:
        user.enter_with("ada" * 100)
        never.wait()

    # Detached, so no store of the test runner's context shows up here.
    stuck = [run_detached(request.run, {"request_id": f"stuck-{n}"}, gevent.spawn, serve, n)
             for n in range(3)]
    try:
        gevent.sleep(0)
        lines = format_run_info(thread_stacks=False)
        stores = [line.split("Stores: ", 1)[1] for line in lines if "Stores: " in line]
        for n in range(3):
            mine = [s for s in stores if f"'stuck-{n}'" in s]
            assert len(mine) == 1, stores
            assert mine[0].startswith(f"request={{'request_id': 'stuck-{n}'}}, user='adaada")
            assert "..." in mine[0] and len(mine[0]) < 150  # never a full dump
        assert any("* Greenlets" in line for line in lines)
    finally:
        never.set()
        gevent.joinall(stuck, timeout=5)


def test_run_info_survives_a_destroyed_hub_still_referenced() -> None:
    """A hub another thread used and destroyed, still referenced (by a cache,
    a test), does not break the dump: gevent 24.2's Hub.__repr__ raises after
    destroy(), which broke gevent's own tree rendering; the node is shown as
    destroyed and every live greenlet's stores are still listed."""
    from asl_gevent import AsyncLocalStorage

    request = AsyncLocalStorage[str](name="request")
    kept: List[Any] = []

    def use_and_destroy_a_hub() -> None:
        hub = gevent.get_hub()
        hub.threadpool.spawn(lambda: 1).get()
        kept.append(hub)
        hub.destroy(destroy_loop=True)

    thread = threading.Thread(target=use_and_destroy_a_hub)
    thread.start()
    thread.join(10)
    never = gevent.event.Event()
    stuck = run_detached(request.run, "alive-req", gevent.spawn, never.wait)
    try:
        gevent.sleep(0)
        lines = format_run_info(thread_stacks=False)
        assert any("Stores: request='alive-req'" in line for line in lines), lines
    finally:
        never.set()
        stuck.join(5)
        kept.clear()


def test_signal_handler_prints_run_info() -> None:
    """Opt-in: after install_signal_handler(), the default signal (SIGPWR on
    Linux, which no common server uses) prints the run info with stores to
    stderr; uninstall puts the previous handler back."""
    proc = run_python("""
        import os, signal, gevent
        from asl_gevent import AsyncLocalStorage
        from asl_gevent.debug import DEFAULT_SIGNAL, install_signal_handler, uninstall_signal_handler
        als = AsyncLocalStorage(name="request")
        stuck = als.run({"request_id": "r-signal"}, gevent.spawn, gevent.sleep, 30)
        gevent.sleep(0)
        before = signal.getsignal(DEFAULT_SIGNAL)
        install_signal_handler()
        os.kill(os.getpid(), DEFAULT_SIGNAL)
        gevent.sleep(0.1)
        uninstall_signal_handler()
        print(signal.Signals(DEFAULT_SIGNAL).name, signal.getsignal(DEFAULT_SIGNAL) is before)
        stuck.kill()
    """)
    assert proc.stdout.strip() == "SIGPWR True"
    assert "Stores: request={'request_id': 'r-signal'}" in proc.stderr


def test_signal_handler_chains_to_the_handler_it_replaces() -> None:
    """A signal with a Python handler is shared: each arrival dumps the run
    info, then runs the replaced handler (a second install changes nothing);
    after uninstall only the replaced handler runs."""
    proc = run_python("""
        import os, signal, sys
        from asl_gevent.debug import install_signal_handler, uninstall_signal_handler
        seen = []
        signal.signal(signal.SIGUSR1, lambda signum, frame: seen.append(signum))
        install_signal_handler(signal.SIGUSR1)
        install_signal_handler(signal.SIGUSR1)
        for _ in range(2):
            os.kill(os.getpid(), signal.SIGUSR1)
        print("-- uninstalled", file=sys.stderr, flush=True)
        uninstall_signal_handler(signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGUSR1)
        print(seen == [signal.SIGUSR1] * 3)
    """)
    assert proc.stdout.strip() == "True"
    dumped, after = proc.stderr.split("-- uninstalled\n")
    assert dumped.count("* Greenlets, with the stores of asl_gevent") == 2
    assert "Greenlets" not in after


def test_signal_handler_refuses_a_signal_c_code_handles() -> None:
    """A handler installed by C code (faulthandler.register here; uWSGI's
    SIGUSR1/SIGUSR2 in its workers) cannot be chained and is invisible to
    signal.getsignal(): install_signal_handler() raises ValueError and
    changes nothing, so the signal keeps its owner."""
    proc = run_python("""
        import faulthandler, signal, sys
        from asl_gevent import debug
        faulthandler.register(signal.SIGUSR2, file=sys.stderr)
        try:
            debug.install_signal_handler(signal.SIGUSR2)
        except ValueError as exc:
            print(exc)
        print(signal.getsignal(signal.SIGUSR2) is signal.SIG_DFL, debug._os_handler(signal.SIGUSR2) > 1)
    """)
    message, state = proc.stdout.strip().splitlines()
    assert message == ("install_signal_handler() argument 'signum': SIGUSR2 already has a handler "
                       "installed outside Python (uWSGI's workers use SIGUSR1 and SIGUSR2; "
                       "faulthandler.register too), which cannot be chained; use a free signal, "
                       "e.g. the default, signal.SIGPWR")
    assert state == "True True"


def test_signal_handler_bad_input() -> None:
    with pytest.raises(TypeError, match=r"^install_signal_handler\(\) argument 'signum' must be a "
                                        r"signal number, not 'str'"):
        install_signal_handler("USR1")  # type: ignore[arg-type]
    uninstall_signal_handler()  # idempotent, nothing installed


# -- no running hub: the watch is off, says so once, keeps nothing (issue 16, point 6) --

NO_HUB_REQUESTS = 1500


def _no_hub_app(environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    body = (get_request_id() or "-").encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return iter([body])  # streaming: the request would end at close()


def _wsgiref_requests(app: Any, threaded: bool) -> List[bytes]:
    """NO_HUB_REQUESTS requests through a real wsgiref server running in its
    own OS thread (one thread per request if *threaded*), over real sockets."""
    import http.client
    import socketserver
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer as RefServer, make_server

    class Quiet(WSGIRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    class Threading(socketserver.ThreadingMixIn, RefServer):
        daemon_threads = True

    server = make_server("127.0.0.1", 0, app, server_class=Threading if threaded else RefServer,
                         handler_class=Quiet)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              name="wsgiref-server", daemon=True)
    thread.start()
    bodies = []
    try:
        deadline = time.monotonic() + 120
        for n in range(NO_HUB_REQUESTS):
            assert time.monotonic() < deadline, f"only {n} requests in 120 s"
            conn = http.client.HTTPConnection("127.0.0.1", server.server_port, timeout=15)
            try:
                conn.request("GET", "/", headers={"X-Request-ID": f"w{n}"})
                response = conn.getresponse()
                assert response.status == 200
                bodies.append(response.read())
            finally:
                conn.close()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
    return bodies


def _test_client_requests(app: Any, threaded: bool) -> List[bytes]:
    """The same through werkzeug's test client, called from the main greenlet."""
    from werkzeug.test import Client

    client = Client(app)
    return [client.get("/", headers={"X-Request-ID": f"w{n}"}).get_data()
            for n in range(NO_HUB_REQUESTS)]


@pytest.mark.parametrize("serve, threaded", [
    (_wsgiref_requests, False), (_wsgiref_requests, True), (_test_client_requests, False),
], ids=["wsgiref", "wsgiref-threading", "test-client"])
def test_watch_without_a_hub_keeps_nothing_and_says_so_once(
        leak_log: ListHandler, monkeypatch: pytest.MonkeyPatch,
        serve: Callable[[Any, bool], List[bytes]], threaded: bool) -> None:
    """1,500 requests through the middleware with the watch on, served where
    no gevent hub runs (wsgiref in an OS thread, a threading server, a test
    client in the main greenlet): nothing is queued or allocated by the watch
    for them (0.2 kept every one: ~247 KiB per 1,500), the app still sees its
    id, and one WARNING says the watch is off and why."""
    import itertools
    import tracemalloc

    monkeypatch.setattr(_watch, "_off_seen", itertools.count(), raising=False)
    app = RequestContextMiddleware(_no_hub_app, leak_watch=0.2)
    queued_before = sum(len(queue) for queue in _watch._pending.values())
    tracemalloc.start()
    try:
        watch_file = tracemalloc.Filter(True, _watch.__file__)
        before = tracemalloc.take_snapshot().filter_traces([watch_file])
        bodies = serve(app, threaded)
        gc.collect()
        after = tracemalloc.take_snapshot().filter_traces([watch_file])
    finally:
        tracemalloc.stop()
    kept = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    assert bodies == [f"w{n}".encode() for n in range(NO_HUB_REQUESTS)]
    assert sum(len(queue) for queue in _watch._pending.values()) == queued_before
    # Per thread, never per request: the server thread's main greenlet (made
    # by the first getcurrent() there, and counted against this module:
    # 288 B alone, up to ~1.1 KB after other tests) and the warning counter.
    # Anything kept per request would be at least 1,500 x 16 B = 24 KB.
    assert kept < 4096, f"the watch kept {kept} bytes for {NO_HUB_REQUESTS} requests"
    messages = [record.getMessage() for record in leak_log.records]
    assert len(messages) == 1, messages
    assert leak_log.records[0].levelname == "WARNING"
    assert messages[0].startswith("leak watch is off for requests served in thread '")
    assert "no gevent hub runs there (a threaded or sync server such as wsgiref" in messages[0]


# -- run info on a signal the server owns: logrotate under gunicorn (issue 16, point 8) --


def _get(port: int, path: str, request_id: str) -> bytes:
    conn = HTTPConnection(port)
    try:
        status, _, body = conn.request(path, {"X-Request-ID": request_id}, close=True)
        assert status == 200
        return body
    finally:
        conn.close()


@pytest.mark.parametrize("signame", ["SIGUSR1", ""], ids=["shared-SIGUSR1", "default"])
def test_logrotate_under_gunicorn_with_run_info_installed(tmp_path: Path, signame: str) -> None:
    """A real gunicorn gevent worker whose app called install_signal_handler()
    at import (after gunicorn set its handlers). logrotate renames the access
    log and sends SIGUSR1 to the master (its postrotate step), which reopens
    its files and signals the worker: the worker reopens its log too, so once
    a request lands in the new file, every later one does, and none in the old.
    With SIGUSR1 shared, the same signal also dumps the run info, with the
    store of the greenlet a request left behind; with the default signal
    (SIGPWR) SIGUSR1 dumps nothing and ``kill -PWR <worker>`` does."""
    import signal as signals

    access = tmp_path / "access.log"
    config = tmp_path / "gunicorn_conf.py"
    config.write_text(f"accesslog = {str(access)!r}\n")
    out = tmp_path / "gunicorn.out"
    with gunicorn(tmp_path, worker="gevent", app="run_info_app:app", workers=1,
                  config=str(config), env={"ASL_TEST_SIGNAL": signame}) as port:
        worker = int(_get(port, "/pid", "pid"))
        master = _master_of(worker)
        assert _get(port, "/hold", "held-1") == b"held-1"
        for n in range(3):
            assert _get(port, f"/before-{n}", f"before-{n}") == f"before-{n}".encode()
        access.rename(tmp_path / "access.log.1")  # logrotate: rename, then postrotate
        os.kill(master, signals.SIGUSR1)
        deadline = time.monotonic() + 20
        n = 0
        while time.monotonic() < deadline:  # bounded: until a request lands in the new file
            assert _get(port, f"/after-{n}", f"after-{n}") == f"after-{n}".encode()
            if access.exists() and "/after-" in access.read_text():
                break
            n += 1
            time.sleep(0.2)
        # The worker reopens its log when the master's signal reaches it: a
        # request served in between is in the old file (as with logrotate).
        # Every request after the first in the new file must be there too.
        for m in range(3):
            assert _get(port, f"/later-{m}", f"later-{m}") == f"later-{m}".encode()
        time.sleep(0.3)
        dumps_after_usr1 = out.read_text().count("* Greenlets, with the stores of asl_gevent")
        if not signame:
            os.kill(worker, signals.SIGPWR)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and "held-by-held-1" not in out.read_text():
                time.sleep(0.1)
            _get(port, "/peek", "alive")  # the worker lives on
    old, new, output = (tmp_path / "access.log.1").read_text(), access.read_text(), out.read_text()
    assert "/before-2" in old and "/before-2" not in new, old
    assert f"/after-{n} " in new and f"/after-{n} " not in old, (new, output)
    assert all(f"/later-{m} " in new and f"/later-{m} " not in old for m in range(3)), (old, new)
    assert "Stores: request={'request_id': 'held-1'}" in output, output
    assert dumps_after_usr1 == (1 if signame else 0), output


def _master_of(worker: int) -> int:
    with open(f"/proc/{worker}/stat") as stat:
        return int(stat.read().rsplit(")", 1)[1].split()[1])


@pytest.mark.parametrize("worker", ["sync", "gthread"])
def test_watch_off_under_gunicorn_sync_and_gthread(tmp_path: Path, worker: str) -> None:
    """gunicorn's sync and gthread workers run no gevent hub: with
    ASL_GEVENT_LEAK_WATCH on, each worker says once that the watch is off
    (naming its serving thread) and logs nothing else, however many
    requests it serves."""
    with gunicorn(tmp_path, worker=worker, app="leak_watch_app:app",
                  env={"ASL_GEVENT_LEAK_WATCH": "0.2"}) as port:
        for n in range(300):
            assert _get(port, "/work", f"s{n}") == f"s{n}".encode()
        time.sleep(0.5)
    # One file per worker, made at import: a worker that served nothing has it empty.
    logs = [path.read_text().splitlines() for path in (tmp_path / "logs").glob("leak-*.log")]
    assert any(logs), logs
    for lines in filter(None, logs):
        assert len(lines) == 1, lines
        assert re.match(r"^WARNING leak watch is off for requests served in thread '[^']+': no "
                        r"gevent hub runs there \(a threaded or sync server", lines[0]), lines
