"""RequestContextMiddleware: a fresh store per request, current until close().

Real ``gevent.pywsgi.WSGIServer`` instances on 127.0.0.1, driven by a tiny
HTTP/1.1 client on ``gevent.socket`` (cooperative without monkey-patching,
unlike ``requests``/``urllib``), so hundreds of requests run concurrently in
this process.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import json
import logging
import re
import sys
import time
import uuid
import wsgiref.util
from contextvars import ContextVar
from types import SimpleNamespace
from typing import Any, Callable, Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import gevent
import gevent.event
import gevent.pool
import gevent.threadpool
import pytest
from gevent import socket as gsocket
from gevent.pywsgi import WSGIServer

from asl_gevent import AsyncLocalStorage
from asl_gevent.logfilter import StoreFilter
from asl_gevent.wsgi import (RequestContextMiddleware, get_request_id, request_id_from,
                             request_storage)
from helpers import ListHandler

# Created at import, as applications do: its worker threads are started by
# whichever request submits first and then serve every later request.
EXECUTOR = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="test-wsgi")

GENERATED = re.compile(r"[0-9a-f]{32}")
DEADLINE = 60.0  # seconds; every wait below is bounded by it


# -- a tiny cooperative HTTP/1.1 client ----------------------------------------


class Response(NamedTuple):
    status: int
    headers: List[Tuple[str, str]]
    body: bytes

    def header(self, name: str) -> Optional[str]:
        values = self.all(name)
        return values[0] if values else None

    def all(self, name: str) -> List[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def json(self) -> Any:
        return json.loads(self.body)


class HttpConnection:
    """One keep-alive HTTP/1.1 connection over a gevent socket."""

    def __init__(self, port: int, timeout: float = 20.0) -> None:
        self.sock = gsocket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.rfile = self.sock.makefile("rb")

    def request(self, path: str = "/", headers: Sequence[Tuple[str, str]] = (),
                *, close: bool = False) -> Response:
        lines = [f"GET {path} HTTP/1.1", "Host: 127.0.0.1"]
        lines += [f"{name}: {value}" for name, value in headers]
        if close:
            lines.append("Connection: close")
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        status_line = self.rfile.readline()
        assert status_line.startswith(b"HTTP/1.1 "), status_line
        status = int(status_line.split()[1])
        response_headers: List[Tuple[str, str]] = []
        while True:
            line = self.rfile.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.decode("latin-1").partition(":")
            response_headers.append((name.strip(), value.strip()))
        lowered = {k.lower(): v for k, v in response_headers}
        if lowered.get("transfer-encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                chunk = self.rfile.read(size + 2)[:size]
                if not size:
                    break
                chunks.append(chunk)
            body = b"".join(chunks)
        elif "content-length" in lowered:
            body = self.rfile.read(int(lowered["content-length"]))
        else:
            body = self.rfile.read()
        return Response(status, response_headers, body)

    def close(self) -> None:
        self.rfile.close()
        self.sock.close()


def get(port: int, path: str = "/", headers: Sequence[Tuple[str, str]] = ()) -> Response:
    """One request on its own connection."""
    conn = HttpConnection(port)
    try:
        return conn.request(path, headers, close=True)
    finally:
        conn.close()


@contextlib.contextmanager
def serving(app: Callable[..., Any]) -> Iterator[int]:
    """Serve *app* on an ephemeral loopback port; always stopped."""
    server = WSGIServer(("127.0.0.1", 0), app, log=None, error_log=None)
    server.start()
    try:
        yield server.server_port
    finally:
        server.stop(timeout=5)


def run_clients(fns: Sequence[Callable[[], Any]]) -> List[Any]:
    """Run each client in its own greenlet, bounded; return their results."""
    greenlets = [gevent.spawn(fn) for fn in fns]
    done = gevent.joinall(greenlets, timeout=DEADLINE)
    gevent.killall([g for g in greenlets if not g.ready()], block=True, timeout=5)
    assert len(done) == len(greenlets), f"only {len(done)}/{len(greenlets)} clients finished"
    return [g.get() for g in greenlets]


def wait_future(future: "concurrent.futures.Future[Any]") -> Any:
    """Wait for a stdlib future without blocking the hub (no monkey-patching)."""
    deadline = time.monotonic() + DEADLINE
    while not future.done():
        assert time.monotonic() < deadline, "executor task did not finish"
        gevent.sleep(0.002)
    return future.result()


def wait_until(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        gevent.sleep(0.005)


@pytest.fixture(name="captured")
def _captured() -> Iterator[Tuple[logging.Logger, ListHandler]]:
    """A logger whose records get the request id from a StoreFilter."""
    handler = ListHandler()
    handler.addFilter(StoreFilter())
    logger = logging.getLogger("tests.wsgi")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logger.addHandler(handler)
    try:
        yield logger, handler
    finally:
        logger.removeHandler(handler)


@pytest.fixture(name="threadpool")
def _threadpool() -> Iterator[gevent.threadpool.ThreadPool]:
    pool = gevent.threadpool.ThreadPool(4)
    try:
        yield pool
    finally:
        pool.kill()


# -- many concurrent requests, every spawn path -------------------------------


def test_concurrent_requests_each_see_only_their_own_id_on_every_path(
        captured: Tuple[logging.Logger, ListHandler],
        threadpool: gevent.threadpool.ThreadPool) -> None:
    """225 requests from 50 concurrent clients (half on keep-alive connections):
    the app, gevent.spawn, a gevent Pool, a gevent ThreadPool and a module-level
    ThreadPoolExecutor all see the request's own id, which is also the echoed
    header (the client's when it sent one); every log record carries its own
    request's id, and generated ids are unique."""
    logger, handler = captured
    pool = gevent.pool.Pool(20)

    def observe(where: str, expected: Optional[str]) -> Optional[str]:
        logger.info("%s %s", where, expected)
        return get_request_id()

    def app(environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        rid = get_request_id()
        seen = {"app": rid}
        seen["spawn"] = gevent.spawn(observe, "spawn", rid).get()
        gevent.sleep(0)  # let sibling requests interleave
        seen["pool"] = pool.spawn(observe, "pool", rid).get()
        seen["threadpool"] = threadpool.spawn(observe, "threadpool", rid).get()
        seen["executor"] = wait_future(EXECUTOR.submit(observe, "executor", rid))
        seen["after"] = get_request_id()
        body = json.dumps(seen).encode()
        start_response("200 OK", [("Content-Type", "application/json"),
                                  ("Content-Length", str(len(body)))])
        return [body]

    def keep_alive_client(n: int) -> List[Tuple[Optional[str], Response]]:
        conn = HttpConnection(port)
        try:
            out = []
            for j in range(5):
                sent = f"client-{n}.{j}" if j % 2 == 0 else None
                headers = [("X-Request-ID", sent)] if sent else []
                out.append((sent, conn.request(f"/{n}/{j}", headers)))
            return out
        finally:
            conn.close()

    def one_shot_client(n: int) -> List[Tuple[Optional[str], Response]]:
        out = []
        for j in range(4):
            sent = f"oneshot-{n}.{j}" if j % 2 else None
            out.append((sent, get(port, f"/{n}/{j}", [("X-Request-ID", sent)] if sent else [])))
        return out

    with serving(RequestContextMiddleware(app)) as port:
        clients: List[Callable[[], Any]] = []
        for n in range(50):
            clients.append((lambda n=n: keep_alive_client(n)) if n % 2 == 0
                           else (lambda n=n: one_shot_client(n)))
        results = [pair for client in run_clients(clients) for pair in client]

    assert len(results) == 25 * 5 + 25 * 4
    ids = []
    for sent, response in results:
        assert response.status == 200
        echoed = response.all("X-Request-ID")
        assert len(echoed) == 1
        rid = echoed[0]
        if sent is not None:
            assert rid == sent
        else:
            assert GENERATED.fullmatch(rid), rid
        assert response.json() == dict.fromkeys(
            ["app", "spawn", "pool", "threadpool", "executor", "after"], rid)
        ids.append(rid)
    assert len(set(ids)) == len(ids)

    assert len(handler.records) == 4 * len(results)
    per_id: Dict[str, int] = {}
    for record in handler.records:
        where, expected = record.getMessage().split()
        assert record.request_id == expected  # type: ignore[attr-defined]
        per_id[expected] = per_id.get(expected, 0) + 1
    assert per_id == dict.fromkeys(ids, 4)
    assert get_request_id() is None


# -- streaming responses ------------------------------------------------------


def test_store_is_current_while_a_generator_response_is_iterated_and_closed(
        captured: Tuple[logging.Logger, ListHandler]) -> None:
    """The store stays current while the server iterates a response and calls
    its close(): a generator app that spawns and logs between chunks, and a
    response object whose close() spawns and logs, both see the request's id,
    across 30 concurrent clients with 2 keep-alive requests each."""
    logger, handler = captured
    closed: Dict[str, Tuple[Optional[str], Optional[str]]] = {}

    class Body:
        def __init__(self, chunks: Iterator[bytes], sent: str) -> None:
            self.chunks, self.sent = chunks, sent

        def __iter__(self) -> Iterator[bytes]:
            return self.chunks

        def close(self) -> None:
            logger.info("close %s", self.sent)
            closed[self.sent] = (get_request_id(), gevent.spawn(get_request_id).get())

    def chunks() -> Iterator[bytes]:
        for step in range(3):
            gevent.sleep(0)
            seen = gevent.spawn(get_request_id).get()
            logger.info("step%d %s", step, get_request_id())
            yield f"{step}:{get_request_id()}:{seen}\n".encode()

    def app(environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        # Nothing runs until the server iterates: start_response comes from
        # inside the first next(), which is stepped in the request context too.
        def generator() -> Iterator[bytes]:
            start_response("200 OK", [("Content-Type", "text/plain")])
            yield from chunks()

        if environ["PATH_INFO"] == "/generator":
            return generator()
        start_response("200 OK", [("Content-Type", "text/plain")])
        return Body(chunks(), environ["HTTP_X_REQUEST_ID"])

    def client(n: int) -> List[Tuple[str, Response]]:
        conn = HttpConnection(port)
        try:
            return [(sent, conn.request(path, [("X-Request-ID", sent)]))
                    for sent, path in ((f"gen-{n}", "/generator"), (f"body-{n}", "/body"))]
        finally:
            conn.close()

    with serving(RequestContextMiddleware(app)) as port:
        results = [pair for pairs in run_clients([lambda n=n: client(n) for n in range(30)])
                   for pair in pairs]
        wait_until(lambda: len(closed) == 30, "every close() to run")

    for sent, response in results:
        assert response.status == 200
        assert response.header("X-Request-ID") == sent
        assert response.body.decode().splitlines() == [f"{i}:{sent}:{sent}" for i in range(3)]
    assert closed == {f"body-{n}": (f"body-{n}", f"body-{n}") for n in range(30)}
    assert len(handler.records) == 30 * (3 + 3 + 1)
    for record in handler.records:
        assert record.getMessage().split()[1] == record.request_id  # type: ignore[attr-defined]


def test_generator_closed_early_runs_its_finally_in_the_request_context() -> None:
    """A server that stops iterating (client gone) and calls close(): the
    generator's finally block runs with the request's store."""
    seen: List[Optional[str]] = []

    def app(environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
        start_response("200 OK", [])
        try:
            yield b"first"
            yield b"never"
        finally:
            seen.append(gevent.spawn(get_request_id).get())

    body = RequestContextMiddleware(app)({"HTTP_X_REQUEST_ID": "early"}, lambda *a: None)
    iterator = iter(body)
    assert next(iterator) == b"first"
    assert get_request_id() is None
    body.close()  # type: ignore[attr-defined]
    body.close()  # type: ignore[attr-defined]  # a second close is a no-op
    assert seen == ["early"]


def test_close_from_another_greenlet_mid_step_still_sees_the_store() -> None:
    """A Context cannot be entered twice at once: if close() comes while a
    step is suspended inside the request context (another greenlet closing
    the response), it runs in a copy holding the same store, without error."""
    closes: List[Optional[str]] = []
    entered = gevent.event.Event()

    class Slow:
        def __iter__(self) -> "Slow":
            return self

        def __next__(self) -> bytes:
            entered.set()
            gevent.sleep(0.05)
            raise StopIteration

        def close(self) -> None:
            closes.append(get_request_id())

    body = RequestContextMiddleware(lambda e, s: Slow())({"HTTP_X_REQUEST_ID": "busy"},
                                                         lambda *a: None)
    stepper = gevent.spawn(list, body)
    assert entered.wait(timeout=DEADLINE)
    body.close()  # type: ignore[attr-defined]
    assert stepper.get(timeout=DEADLINE) == []
    assert closes == ["busy"]


def test_close_propagates_only_the_apps_own_error() -> None:
    """Teardown raises what the app's close() raised, nothing of its own."""
    class Body(list):  # type: ignore[type-arg]
        def close(self) -> None:
            raise OSError(f"close failed in {get_request_id()}")

    body = RequestContextMiddleware(lambda e, s: Body([b"x"]))(
        {"HTTP_X_REQUEST_ID": "r-close"}, lambda *a: None)
    assert list(body) == [b"x"]
    with pytest.raises(OSError, match=r"^close failed in r-close$"):
        body.close()  # type: ignore[attr-defined]


def test_stacked_middlewares_keep_both_stores_while_streaming() -> None:
    """Two middlewares with different storages, one inside the other: each
    step of the inner app's generator (and its close) sees both stores; the
    contexts are distinct, so stepping one inside the other never nests a
    context in itself."""
    mine: AsyncLocalStorage[Dict[str, Any]] = AsyncLocalStorage(name="stacked")
    seen: List[Tuple[Any, Any]] = []

    def app(environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
        start_response("200 OK", [])
        try:
            for _ in range(2):
                seen.append(gevent.spawn(lambda: (get_request_id(), mine.get_store())).get())
                yield b"x"
        finally:
            seen.append((get_request_id(), mine.get_store()))

    stacked = RequestContextMiddleware(
        RequestContextMiddleware(app, mine, header="X-Inner-ID", echo_header=False))
    body = stacked({"HTTP_X_REQUEST_ID": "outer", "HTTP_X_INNER_ID": "inner"}, lambda *a: None)
    assert list(body) == [b"x", b"x"]
    body.close()  # type: ignore[attr-defined]
    assert seen == [("outer", {"request_id": "inner"})] * 3
    assert (get_request_id(), mine.get_store()) == (None, None)


def test_list_response_is_returned_as_is() -> None:
    """A list body runs no app code while iterated: it is returned unchanged,
    so servers keep using len() on it."""
    body = [b"a", b"b"]
    assert RequestContextMiddleware(lambda e, s: body)({}, lambda *a: None) is body


def test_file_wrapper_passes_through_and_closes_in_the_request_context() -> None:
    """A wsgi.file_wrapper response is returned unchanged (the server keeps its
    sendfile path); its close() runs with the request's store."""
    closes: List[Optional[str]] = []

    class File:
        def read(self, size: int = -1) -> bytes:
            return b""

        def close(self) -> None:
            closes.append(get_request_id())

    environ = {"HTTP_X_REQUEST_ID": "file-1", "wsgi.file_wrapper": wsgiref.util.FileWrapper}
    result = RequestContextMiddleware(
        lambda e, s: e["wsgi.file_wrapper"](File()))(environ, lambda *a: None)
    assert isinstance(result, wsgiref.util.FileWrapper)
    result.close()
    assert closes == ["file-1"]


# -- keep-alive isolation --------------------------------------------------------

marker: ContextVar[Optional[str]] = ContextVar("tests.wsgi.marker", default=None)


def catch_errors(app: Callable[..., Iterable[bytes]]) -> Callable[..., Iterable[bytes]]:
    """What frameworks do: turn an exception into a 500 on a kept-alive connection."""
    def wrapper(environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        try:
            return app(environ, start_response)
        except RuntimeError:
            start_response("500 Internal Server Error", [("Content-Length", "0")],
                           sys.exc_info())
            return []
    return wrapper


@pytest.mark.parametrize("with_hooks", [True, False], ids=["hooks", "no_hooks"])
def test_keep_alive_requests_never_see_the_previous_requests_state(
        request: pytest.FixtureRequest, with_hooks: bool) -> None:
    """On one keep-alive connection, after a request that called enter_with on
    the request storage and another storage, set a ContextVar and raised (or
    returned normally), the next request sees only its own fresh store. The
    middleware guarantees this by itself, hooks or no hooks."""
    if not with_hooks:
        request.getfixturevalue("no_hooks")
    other: AsyncLocalStorage[str] = AsyncLocalStorage(name="other")

    def app(environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        seen = [request_storage.get_store(), other.get_store(), marker.get()]
        if environ["PATH_INFO"] != "/check":
            request_storage.enter_with({"request_id": "POLLUTED"})
            other.enter_with("POLLUTED")
            marker.set("POLLUTED")
            if environ["PATH_INFO"] == "/raise":
                raise RuntimeError("request failed after polluting its context")
        body = json.dumps(seen).encode()
        start_response("200 OK", [("Content-Length", str(len(body)))])
        return [body]

    with serving(catch_errors(RequestContextMiddleware(app))) as port:
        conn = HttpConnection(port)
        try:
            statuses, checks = [], []
            for n, path in enumerate(["/raise", "/pollute", "/raise", "/pollute"]):
                statuses.append(conn.request(path, [("X-Request-ID", f"p{n}")]).status)
                check = conn.request("/check", [("X-Request-ID", f"c{n}")])
                checks.append((check.status, check.json()))
        finally:
            conn.close()
    assert statuses == [500, 200, 500, 200]
    assert checks == [(200, [{"request_id": f"c{n}"}, None, None]) for n in range(4)]


def test_app_exception_propagates_and_leaves_no_store() -> None:
    """An app that raises: the exception reaches the server unchanged and
    the caller's context holds no store afterwards."""
    def app(environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        request_storage.enter_with({"request_id": "leak"})
        raise KeyError("app failed")

    with pytest.raises(KeyError, match="app failed"):
        RequestContextMiddleware(app)({}, lambda *a: None)
    assert request_storage.get_store() is None


# -- the request-id header ------------------------------------------------------


def echo_request_id(environ: Dict[str, Any],
                    start_response: Callable[..., Any]) -> Iterable[bytes]:
    """A WSGI app whose body is the request id it sees."""
    body = (get_request_id() or "").encode()
    start_response("200 OK", [("Content-Length", str(len(body)))])
    return [body]


@pytest.mark.parametrize("raw", [
    "has space",
    "a" * 129,
    "x" * 4000,
    "bad\x01id",
    "tab\tinside",
    "del\x7f",
    "caf\xe9",
    "<script>",
    "quote\"d",
    "semi;colon",
    "a, b",
], ids=lambda raw: repr(raw[:12]))
def test_malformed_ids_over_the_wire_are_replaced_and_never_echoed(raw: str) -> None:
    """Ids that are too long or hold characters outside [A-Za-z0-9._:@/+=-]
    (spaces, control characters, non-ASCII, quotes, commas) are replaced by a
    generated id: the app sees the generated id, the response echoes it, and
    the raw value appears nowhere in the response."""
    with serving(RequestContextMiddleware(echo_request_id)) as port:
        response = get(port, "/", [("X-Request-ID", raw)])
    assert response.status == 200
    assert response.all("X-Request-ID") == [response.body.decode()]
    assert GENERATED.fullmatch(response.body.decode())
    assert uuid.UUID(response.body.decode()).version == 4
    assert raw.encode("latin-1") not in b"".join(
        f"{k}: {v}".encode("latin-1") for k, v in response.headers)


@pytest.mark.parametrize("raw", ["abc\r\nSet-Cookie: x=1", "abc\nX-Evil: 1", "", " ", "\x00"])
def test_ids_with_line_breaks_or_empty_are_replaced(raw: str) -> None:
    """A CR/LF (which a lenient server could pass through), NUL or an empty id
    is never echoed: the echoed header is a generated id."""
    headers: List[Tuple[str, str]] = []

    def start_response(status: str, response_headers: List[Tuple[str, str]],
                       exc_info: Any = None) -> None:
        headers.extend(response_headers)

    def app(environ: Dict[str, Any], start: Callable[..., Any]) -> List[bytes]:
        start("200 OK", [])
        return [(get_request_id() or "").encode()]

    body = RequestContextMiddleware(app)({"HTTP_X_REQUEST_ID": raw}, start_response)
    assert headers == [("X-Request-ID", b"".join(body).decode())]
    assert GENERATED.fullmatch(headers[0][1])


@pytest.mark.parametrize("good", [
    "a", "A" * 128, "req-42", "0af7651916cd43dd8448eb211c80319c",
    "svc:orders@v2/7+x=y_z.1", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
])
def test_well_formed_ids_are_used_and_echoed(good: str) -> None:
    """Ids of 1..128 characters from [A-Za-z0-9._:@/+=-] are kept and echoed
    exactly once."""
    with serving(RequestContextMiddleware(echo_request_id)) as port:
        response = get(port, "/", [("X-Request-ID", good)])
    assert response.body.decode() == good
    assert response.all("X-Request-ID") == [good]


def test_echo_can_be_disabled_and_an_app_header_is_not_duplicated() -> None:
    """echo_header=False adds nothing; an app that sets the header itself keeps
    its own value and gets no duplicate."""
    calls: List[List[Tuple[str, str]]] = []

    def start_response(status: str, headers: List[Tuple[str, str]], exc_info: Any = None) -> None:
        calls.append(headers)

    def plain(environ: Dict[str, Any], start: Callable[..., Any]) -> List[bytes]:
        start("200 OK", [("Content-Type", "text/plain")])
        return []

    def own(environ: Dict[str, Any], start: Callable[..., Any]) -> List[bytes]:
        start("200 OK", [("x-request-id", "mine")])
        return []

    RequestContextMiddleware(plain, echo_header=False)({"HTTP_X_REQUEST_ID": "r1"}, start_response)
    RequestContextMiddleware(own)({"HTTP_X_REQUEST_ID": "r2"}, start_response)
    assert calls == [[("Content-Type", "text/plain")], [("x-request-id", "mine")]]


def test_custom_header_and_storage() -> None:
    """header= names both the incoming header (as its CGI environ key) and the
    echoed one; storage= receives the store, request_storage stays empty."""
    mine: AsyncLocalStorage[Dict[str, Any]] = AsyncLocalStorage(name="mine")

    def app(environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        body = json.dumps([mine.get_store(), request_storage.get_store()]).encode()
        start_response("200 OK", [("Content-Length", str(len(body)))])
        return [body]

    with serving(RequestContextMiddleware(app, mine, header="X-Correlation-ID")) as port:
        response = get(port, "/", [("X-Correlation-ID", "corr-9"), ("X-Request-ID", "ignored")])
    assert response.json() == [{"request_id": "corr-9"}, None]
    assert response.all("X-Correlation-ID") == ["corr-9"]
    assert response.all("X-Request-ID") == []


# -- store_factory -------------------------------------------------------------


def test_store_factory_makes_each_requests_store() -> None:
    """store_factory(environ) makes the store; the app and the greenlets it
    spawns see that object; a valid request_id in it (key or attribute) is
    echoed, an invalid one is not."""
    def factory(environ: Dict[str, Any]) -> Any:
        user = environ.get("HTTP_X_USER", "")
        if environ["PATH_INFO"] == "/object":
            return SimpleNamespace(request_id=f"obj-{user}", user=user)
        if environ["PATH_INFO"] == "/bad":
            return {"request_id": "bad id\r\nX: y", "user": user}
        return {"request_id": f"dict-{user}", "user": user}

    def app(environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        store = request_storage.get_store()
        child = gevent.spawn(request_storage.get_store).get()
        user = getattr(store, "user", None) or store["user"]  # type: ignore[index]
        body = json.dumps([child is store, user, get_request_id()]).encode()
        start_response("200 OK", [("Content-Length", str(len(body)))])
        return [body]

    with serving(RequestContextMiddleware(app, store_factory=factory)) as port:
        results = run_clients([
            (lambda n=n, path=path: (n, path, get(port, path, [("X-User", f"u{n}")])))
            for n in range(10) for path in ("/dict", "/object", "/bad")])
    for n, path, response in results:
        rid = {"/dict": f"dict-u{n}", "/object": f"obj-u{n}", "/bad": "bad id\r\nX: y"}[path]
        assert response.json() == [True, f"u{n}", rid]
        assert response.all("X-Request-ID") == ([] if path == "/bad" else [rid])


def test_request_id_from_applies_the_default_rules_in_a_store_factory() -> None:
    """request_id_from(environ) gives a store_factory the middleware's own id
    rules: a well-formed header value, else a generated id."""
    headers: List[List[Tuple[str, str]]] = []
    middleware = RequestContextMiddleware(
        lambda e, s: (s("200 OK", []), [json.dumps(request_storage.get_store()).encode()])[1],
        store_factory=lambda environ: {"request_id": request_id_from(environ), "user": "u"})
    for raw in ("good-1", "bad id"):
        body = middleware({"HTTP_X_REQUEST_ID": raw}, lambda st, h, e=None: headers.append(h))
        store = json.loads(b"".join(body))
        assert store["user"] == "u"
        assert headers[-1] == [("X-Request-ID", store["request_id"])]
    assert [h[0][1] for h in headers][0] == "good-1"
    assert GENERATED.fullmatch(headers[1][0][1])
    assert request_id_from({"HTTP_X_TRACE": " t-1\t"}, header="X-Trace") == "t-1"


def test_get_request_id_outside_a_request_is_none() -> None:
    """Outside any request there is no id."""
    assert get_request_id() is None
    assert request_storage.run({"request_id": 5}, get_request_id) is None  # not a str


# -- bad constructor input ------------------------------------------------------


def test_non_callable_app_is_a_type_error_at_construction() -> None:
    """A non-callable app fails when the middleware is made, naming 'app'."""
    with pytest.raises(TypeError, match=r"^RequestContextMiddleware\(\) argument 'app' must be "
                                        r"a WSGI callable, not 'str'; "):
        RequestContextMiddleware("myapp:app")  # type: ignore[arg-type]


@pytest.mark.parametrize("kwargs, error, pattern", [
    ({"storage": {}}, TypeError, r"^RequestContextMiddleware\(\) argument 'storage' must be an "
                                 r"AsyncLocalStorage or None, not 'dict'$"),
    ({"header": b"X-ID"}, TypeError, r"^RequestContextMiddleware\(\) argument 'header' must be a "
                                     r"str, not 'bytes'"),
    ({"header": "X ID"}, ValueError, r"^RequestContextMiddleware\(\) argument 'header' must be an "
                                     r"HTTP header name"),
    ({"header": ""}, ValueError, r"argument 'header'"),
    ({"store_factory": "factory"}, TypeError, r"^RequestContextMiddleware\(\) argument "
                                              r"'store_factory' must be callable or None, not 'str'"),
])
def test_bad_keyword_arguments_are_rejected_at_construction(
        kwargs: Dict[str, Any], error: type, pattern: str) -> None:
    """Each bad argument raises a built-in error naming it; no store is set."""
    app = lambda environ, start_response: []  # noqa: E731
    with pytest.raises(error, match=pattern):
        RequestContextMiddleware(app, **kwargs)
    assert request_storage.get_store() is None


def test_generated_ids_never_repeat_across_forked_workers_or_a_seeded_random() -> None:
    """Generated ids are uuid4 hex from a private generator: an app's
    ``random.seed(0)`` does not make them repeat, and processes forked from
    one parent (gunicorn's workers) each get their own stream, so no id is
    generated twice by the parent and two children."""
    from helpers import run_python

    proc = run_python("""
        import json, os, random, uuid
        from asl_gevent.wsgi import request_id_from

        def ids(n):
            random.seed(0)  # what an app or a test may do; must not matter
            return [request_id_from({}) for _ in range(n)]

        ids(3)  # the parent has generated ids before it forks, as a preloaded app may
        pipes = []
        for _ in range(2):
            read, write = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.write(write, json.dumps(ids(50)).encode())
                os._exit(0)
            os.close(write)
            pipes.append((pid, read))
        seen = {"parent": ids(50)}
        for n, (pid, read) in enumerate(pipes):
            with os.fdopen(read) as f:
                seen[f"child{n}"] = json.loads(f.read())
            os.waitpid(pid, 0)
        print(json.dumps(seen))
    """)
    seen = json.loads(proc.stdout)
    assert sorted(seen) == ["child0", "child1", "parent"]
    every = [i for ids in seen.values() for i in ids]
    assert len(every) == 150 and len(set(every)) == 150
    for generated in every:
        assert GENERATED.fullmatch(generated) and uuid.UUID(generated).version == 4


# -- what the middleware passes through unchanged -----------------------------------


def test_gunicorn_already_handled_sentinel_passes_through_by_identity() -> None:
    """An app that took over the socket returns gunicorn's ALREADY_HANDLED;
    gunicorn recognises it by identity, so the middleware returns the very
    object (wrapping it would make gunicorn iterate it and fail)."""
    from gunicorn.workers.base_async import ALREADY_HANDLED

    seen = []

    def app(environ: Dict[str, Any], start_response: Any) -> Any:
        seen.append(get_request_id())
        return ALREADY_HANDLED

    result = RequestContextMiddleware(app)({"HTTP_X_REQUEST_ID": "taken"}, lambda *a: None)
    assert result is ALREADY_HANDLED and seen == ["taken"]


def test_function_file_wrapper_result_passes_through_by_identity() -> None:
    """PEP 3333 only says wsgi.file_wrapper is a callable; uWSGI's is a
    function. Whatever it returned comes back as the very same object, its
    close() runs in the request's context, and environ keeps the server's
    own file_wrapper afterwards."""
    class Wrapped:
        def __init__(self, filelike: Any) -> None:
            self.filelike = filelike
            self.closed_in: Any = "not closed"

        def __iter__(self) -> Iterator[bytes]:
            return iter([b"data"])

        def close(self) -> None:
            self.closed_in = get_request_id()

    made: List[Any] = []

    def file_wrapper(filelike: Any, block_size: int = 8192) -> Any:
        made.append(Wrapped(filelike))
        return made[-1]

    environ = {"HTTP_X_REQUEST_ID": "file-fn", "wsgi.file_wrapper": file_wrapper}
    result = RequestContextMiddleware(
        lambda e, s: e["wsgi.file_wrapper"](io.BytesIO(b"x")))(environ, lambda *a: None)
    assert result is made[0]
    assert environ["wsgi.file_wrapper"] is file_wrapper
    result.close()
    assert made[0].closed_in == "file-fn"


def test_other_iterables_with_a_function_file_wrapper_are_still_wrapped() -> None:
    """Control: with a function file_wrapper in environ, a generator response
    that did not come from it is still stepped in the request's context."""
    def app(environ: Dict[str, Any], start_response: Any) -> Iterator[bytes]:
        yield (get_request_id() or "none").encode()

    environ = {"HTTP_X_REQUEST_ID": "gen", "wsgi.file_wrapper": lambda f, b=8192: f}
    result = RequestContextMiddleware(app)(environ, lambda *a: None)
    assert b"".join(result) == b"gen"


def test_pywsgi_serves_function_file_wrapper_and_generators_through_the_middleware() -> None:
    """Under gevent.pywsgi (which sets no wsgi.file_wrapper of its own), a
    handler that provides a function file_wrapper gets its result back by
    identity; the body arrives whole."""
    made: List[Any] = []

    def file_wrapper(filelike: Any, block_size: int = 8192) -> Any:
        made.append(iter([filelike.read()]))
        return made[-1]

    returned: List[Any] = []
    middleware = RequestContextMiddleware(
        lambda e, s: (s("200 OK", []), e["wsgi.file_wrapper"](io.BytesIO(b"file body")))[1])

    def app(environ: Dict[str, Any], start_response: Any) -> Any:
        environ["wsgi.file_wrapper"] = file_wrapper
        returned.append(middleware(environ, start_response))
        return returned[-1]

    server = WSGIServer(("127.0.0.1", 0), app, log=None)
    server.start()
    try:
        conn = gsocket.create_connection(("127.0.0.1", server.server_port), timeout=5)
        conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        reply = b""
        while chunk := conn.recv(4096):
            reply += chunk
        conn.close()
    finally:
        server.stop()
    assert reply.startswith(b"HTTP/1.1 200 OK") and b"file body" in reply
    assert len(made) == 1 and returned == made


# -- 0.3: the private names other modules import, and the worker's context --------


def test_private_names_other_modules_import_keep_their_meaning() -> None:
    """celery.py and http.py import these from asl_gevent.wsgi; they moved to
    _ids.py in 0.3 and must keep working from here."""
    from asl_gevent import _ids
    from asl_gevent.wsgi import (_HEADER_NAME_RE, _ID_RE, _OUTGOING, _check_baggage, _id_of,
                                 request_storage as storage)

    assert _ID_RE is _ids.ID_RE and _ID_RE.fullmatch("a-b.c:d@e/f+g=h_1")
    assert _ID_RE.fullmatch("x" * 129) is None and _ID_RE.fullmatch("a b") is None
    assert _HEADER_NAME_RE.fullmatch("X-Request-ID") and not _HEADER_NAME_RE.fullmatch("X_ID")
    assert _id_of({"request_id": "r"}) == "r" and _id_of(SimpleNamespace(request_id=1)) is None
    assert _OUTGOING.name == "asl_gevent.wsgi.outgoing"
    tenant = AsyncLocalStorage(name="tenant")
    assert _check_baggage([tenant], "x") == (tenant,)
    assert storage is request_storage


def test_in_the_workers_fresh_context_only_the_first_middleware_reuses_it() -> None:
    """GeventWorker marks its connections; a middleware whose storage is still
    unset sets its store right in the worker's per-request copy, and a nested
    middleware with the same storage runs in its own copy, as before."""
    from contextvars import copy_context

    from asl_gevent.wsgi import _FRESH_CONTEXT

    seen: List[Any] = []

    def inner_app(environ: Dict[str, Any], start_response: Callable[..., Any]) -> List[bytes]:
        seen.append(("inner", get_request_id()))
        start_response("200 OK", [])
        return []

    inner = RequestContextMiddleware(inner_app)

    def outer_app(environ: Dict[str, Any], start_response: Callable[..., Any]) -> List[bytes]:
        seen.append(("outer", get_request_id()))
        inner({"HTTP_X_REQUEST_ID": "inner-1"}, start_response)
        seen.append(("outer after inner", get_request_id()))
        return []

    def request() -> None:
        RequestContextMiddleware(outer_app)({"HTTP_X_REQUEST_ID": "outer-1"}, lambda *a: None)
        seen.append(("worker after the app", get_request_id()))

    connection = copy_context()
    connection.run(_FRESH_CONTEXT.set, True)
    connection.copy().run(request)
    assert seen == [("outer", "outer-1"), ("inner", "inner-1"), ("outer after inner", "outer-1"),
                    ("worker after the app", "outer-1")]
    assert get_request_id() is None
    # Without the mark, the middleware keeps to its own copy as in 0.2.
    seen.clear()
    copy_context().run(request)
    assert seen[-1] == ("worker after the app", None)
