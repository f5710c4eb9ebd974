"""Server handlers with the hooks alone (no middleware).

``gevent.server.StreamServer`` and ``gevent.pywsgi.WSGIServer`` handlers get
the context that was current where the server was started, never what code
run by the hub left behind; pywsgi keep-alive requests each get their own
copy of the connection's context. The last test repeats the WSGI scenario
under ``monkey.patch_all`` in a subprocess.
"""

from __future__ import annotations

import contextlib
import json
from contextvars import Context, ContextVar
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import gevent
import gevent.event
import pytest
from gevent import socket as gsocket
from gevent.pywsgi import WSGIServer
from gevent.server import StreamServer

from asl_gevent import AsyncLocalStorage
from helpers import run_scenario
from test_wsgi import DEADLINE, HttpConnection, run_clients

marker: ContextVar[Optional[str]] = ContextVar("tests.servers.marker", default=None)


@pytest.fixture(name="hub")
def _hub() -> Iterator[gevent.hub.Hub]:
    """The hub, whose own context is put back after the test polluted it."""
    hub = gevent.get_hub()
    saved: Optional[Context] = hub.gr_context
    saved = saved.copy() if saved is not None else None
    try:
        yield hub
    finally:
        hub.gr_context = saved


def pollute_hub(hub: gevent.hub.Hub, als: AsyncLocalStorage[Any],
                also: Callable[[], None] = lambda: None) -> None:
    """Have the hub itself run code that sets a store and a ContextVar."""
    done = gevent.event.Event()

    def callback() -> None:
        als.enter_with("HUB-POLLUTION")
        marker.set("HUB-POLLUTION")
        also()
        done.set()

    hub.loop.run_callback(callback)
    assert done.wait(timeout=DEADLINE)


# -- StreamServer -------------------------------------------------------------


def stream_handler(als: AsyncLocalStorage[Any], seen: Dict[str, Any]) -> Callable[..., None]:
    """Record what the handler and a child it spawns see, then set its own store."""
    def handle(sock: Any, address: Any) -> None:
        rfile = sock.makefile("rb")
        try:
            name = rfile.readline().decode().strip()
            before = (als.get_store(), marker.get())
            als.enter_with(f"own-{name}")
            gevent.sleep(0.001)  # siblings run and set theirs meanwhile
            child = gevent.spawn(lambda: (als.get_store(), marker.get())).get()
            seen[name] = (before, child, als.get_store())
            sock.sendall(b"ok\n")
        finally:
            rfile.close()

    return handle


def talk(port: int, name: str) -> bytes:
    with contextlib.closing(gsocket.create_connection(("127.0.0.1", port), timeout=20)) as sock:
        sock.sendall(f"{name}\n".encode())
        with contextlib.closing(sock.makefile("rb")) as rfile:
            return rfile.readline()


@pytest.mark.parametrize("how", ["run", "enter_with"])
def test_stream_server_handlers_see_the_start_context_not_hub_pollution(
        hub: gevent.hub.Hub, als: AsyncLocalStorage[Any], how: str) -> None:
    """Handlers of 40 concurrent connections (and the greenlets they spawn)
    see the store current where start() ran -- in als.run(...) or after
    enter_with -- although the hub set another store and a ContextVar in its
    own context before the connections arrived; each handler's own
    enter_with stays its own."""
    seen: Dict[str, Any] = {}
    server = StreamServer(("127.0.0.1", 0), stream_handler(als, seen))
    try:
        if how == "run":
            als.run("server-ctx", server.start)
        else:
            Context().run(lambda: (als.enter_with("server-ctx"), server.start()))
        assert als.get_store() is None
        pollute_hub(hub, als)
        replies = run_clients([lambda n=n: talk(server.server_port, f"c{n}") for n in range(40)])
    finally:
        server.stop(timeout=5)
    assert replies == [b"ok\n"] * 40
    assert seen == {f"c{n}": (("server-ctx", None), (f"own-c{n}", None), f"own-c{n}")
                    for n in range(40)}


def test_greenlet_spawned_by_a_hub_callback_starts_clean(
        hub: gevent.hub.Hub, als: AsyncLocalStorage[Any]) -> None:
    """The hub is not a request: a greenlet spawned from a loop callback, after
    that callback set a store and a ContextVar, starts with neither."""
    spawned: List[gevent.Greenlet] = []
    pollute_hub(hub, als, also=lambda: spawned.append(
        gevent.spawn(lambda: (als.get_store(), marker.get()))))
    assert spawned[0].get(timeout=DEADLINE) == (None, None)
    # ... and later hub-spawned greenlets neither (a fresh callback, same hub context)
    pollute_hub(hub, als, also=lambda: spawned.append(gevent.spawn(als.get_store)))
    assert spawned[1].get(timeout=DEADLINE) is None


def test_stream_server_without_hooks_does_not_carry_the_start_context(
        no_hooks: None, als: AsyncLocalStorage[Any]) -> None:
    """Negative control: without the hooks a handler starts in an empty
    context, so it does not see the store the server was started with."""
    seen: Dict[str, Any] = {}
    server = StreamServer(("127.0.0.1", 0), stream_handler(als, seen))
    try:
        als.run("server-ctx", server.start)
        run_clients([lambda n=n: talk(server.server_port, f"c{n}") for n in range(5)])
    finally:
        server.stop(timeout=5)
    assert {name: before for name, (before, _, _) in seen.items()} == {
        f"c{n}": (None, None) for n in range(5)}


# -- pywsgi WSGIServer ----------------------------------------------------------


@contextlib.contextmanager
def wsgi_server(app: Callable[..., Iterable[bytes]], als: AsyncLocalStorage[Any],
                store: Any = "server-ctx") -> Iterator[int]:
    server = WSGIServer(("127.0.0.1", 0), app, log=None, error_log=None)
    try:
        als.run(store, server.start)
        yield server.server_port
    finally:
        server.stop(timeout=5)


def json_response(start_response: Callable[..., Any], value: Any,
                  status: str = "200 OK") -> List[bytes]:
    body = json.dumps(value).encode()
    start_response(status, [("Content-Type", "application/json"),
                            ("Content-Length", str(len(body)))])
    return [body]


def polluting_app(als: AsyncLocalStorage[Any]) -> Callable[..., Iterable[bytes]]:
    """``/pollute`` and ``/raise`` set a store and a ContextVar with
    enter_with/set; ``/raise`` then fails inside the handler and is turned
    into a 500 (the connection stays open). Every request reports what it saw
    first, and what a greenlet it spawned saw."""
    def handler(environ: Dict[str, Any]) -> Any:
        seen = [als.get_store(), marker.get(),
                list(gevent.spawn(lambda: (als.get_store(), marker.get())).get())]
        if environ["PATH_INFO"] in ("/pollute", "/raise"):
            als.enter_with(f"request-{environ['QUERY_STRING']}")
            marker.set(f"request-{environ['QUERY_STRING']}")
            if environ["PATH_INFO"] == "/raise":
                raise RuntimeError("request failed after enter_with")
        return seen

    def app(environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        try:
            return json_response(start_response, handler(environ))
        except RuntimeError:
            return json_response(start_response, "failed", "500 Internal Server Error")

    return app


def test_pywsgi_handlers_see_the_start_context_not_hub_pollution(
        hub: gevent.hub.Hub, als: AsyncLocalStorage[Any]) -> None:
    """WSGI requests from 30 concurrent connections see the server's start
    context (and so do greenlets they spawn), not what a hub callback set."""
    with wsgi_server(polluting_app(als), als) as port:
        pollute_hub(hub, als)

        def client(n: int) -> Tuple[int, Any]:
            conn = HttpConnection(port)
            try:
                response = conn.request(f"/check?{n}", close=True)
                return response.status, response.json()
            finally:
                conn.close()

        results = run_clients([lambda n=n: client(n) for n in range(30)])
    assert results == [(200, ["server-ctx", None, ["server-ctx", None]])] * 30


def test_pywsgi_keep_alive_requests_are_isolated_by_the_hooks(
        als: AsyncLocalStorage[Any]) -> None:
    """With the hooks alone, on each of 20 concurrent keep-alive connections,
    a request after one that called enter_with and set a ContextVar (and then
    raised, or not) sees only the server's start context."""
    def client(n: int) -> List[Tuple[int, Any]]:
        conn = HttpConnection(port)
        try:
            return [(r.status, r.json()) for r in (
                conn.request(path) for path in
                (f"/pollute?{n}a", "/check", f"/raise?{n}b", "/check", "/check"))]
        finally:
            conn.close()

    clean = ["server-ctx", None, ["server-ctx", None]]
    with wsgi_server(polluting_app(als), als) as port:
        results = run_clients([lambda n=n: client(n) for n in range(20)])
    assert results == [[(200, clean), (200, clean), (500, "failed"), (200, clean),
                        (200, clean)]] * 20


def test_pywsgi_keep_alive_leaks_without_hooks(no_hooks: None,
                                                als: AsyncLocalStorage[Any]) -> None:
    """Negative control: without the hooks the handler greenlet serves every
    request of a connection in one context, so request 2 sees what request 1
    set with enter_with (and the start context is not carried at all)."""
    with wsgi_server(polluting_app(als), als) as port:
        conn = HttpConnection(port)
        try:
            first = conn.request("/raise?1").status
            second = conn.request("/check").json()
        finally:
            conn.close()
    assert first == 500
    assert second == ["request-1", "request-1", [None, None]]


# -- the same under monkey.patch_all, in a subprocess ----------------------------

@pytest.mark.slow
def test_patched_wsgi_server_with_middleware_in_a_subprocess() -> None:
    """Under monkey.patch_all, 60 urllib and http.client (keep-alive)
    requests from 20 concurrent greenlets: the app, gevent.spawn, a patched
    threading.Thread, a ThreadPoolExecutor and the hub threadpool all see the
    request's own id, the response echoes it, and every log record carries
    the id of the request that made it."""
    proc = run_scenario("servers_patched", timeout=120)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["installed"] is True
    assert out["finished"] == 20
    assert len(out["results"]) == 60
    for sent, echoed, seen in out["results"]:
        assert echoed == sent
        assert seen == dict.fromkeys(
            ["app", "spawn", "thread", "executor", "threadpool", "after"], sent)
    assert len(out["records"]) == 4 * 60
    for message, request_id in out["records"]:
        assert message.split()[1] == request_id
    assert sorted({request_id for _, request_id in out["records"]}) == sorted(
        sent for sent, _, _ in out["results"])
    assert out["outside"] is None
