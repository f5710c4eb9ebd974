"""asl_gevent.http: real requests/urllib3 calls to a real local HTTP server.

The server is the stdlib's ThreadingHTTPServer on a real OS thread (this
process is not monkey-patched, so a blocking client in a greenlet still gets
its answer); it records the headers of every request exactly as they arrived.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, Iterator, List, Tuple
from urllib.parse import unquote

import gevent
import gevent.pool
import pytest
import requests
import urllib3
from urllib3.connectionpool import HTTPConnectionPool

import asl_gevent.http
from asl_gevent import AsyncLocalStorage
from asl_gevent._baggage import MAX_BYTES, MAX_MEMBERS
from asl_gevent.wsgi import RequestContextMiddleware, request_storage
from helpers import free_port

ORIGINAL_URLOPEN = HTTPConnectionPool.__dict__["urlopen"]


class Recorder:
    """A real HTTP server that records each request's id and baggage headers."""

    def __init__(self) -> None:
        self.seen: List[Dict[str, List[str]]] = []
        self.paths: List[str] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real services

            def do_GET(self) -> None:
                recorder.seen.append({
                    name: self.headers.get_all(name) or []
                    for name in ("X-Request-ID", "X-Correlation-ID", "baggage", "traceparent")})
                recorder.paths.append(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                if self.path == "/redirect" or self.path.startswith("/away?"):
                    self.send_response(302)
                    self.send_header("Location", unquote(self.path[len("/away?"):])
                                     if self.path.startswith("/away?") else "/")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            do_POST = do_GET

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}/"
        # A short poll: shutdown() waits for it, once per test.
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,),
                                       daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)

    def __enter__(self) -> "Recorder":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# test_http_clients, test_http_uninstall and test_http_boundaries import
# these fixtures (and Recorder) from here.
@pytest.fixture(name="server")
def _server() -> Iterator[Recorder]:
    with Recorder() as recorder:
        yield recorder


@pytest.fixture(name="http_on")
def _http_on() -> Iterator[None]:
    asl_gevent.http.install()
    try:
        yield
    finally:
        asl_gevent.http.uninstall()


def ids(server: Recorder, header: str = "X-Request-ID") -> List[List[str]]:
    return [seen[header] for seen in server.seen]


def in_request(request_id: str, fn: Any, *args: Any) -> Any:
    return request_storage.run({"request_id": request_id}, fn, *args)


def every_client(url: str) -> None:
    """One call through each client path: requests, a Session, urllib3's
    top-level request, a PoolManager, a bare connection pool."""
    requests.get(url, timeout=10)
    with requests.Session() as session:
        session.get(url, timeout=10)
    urllib3.request("GET", url, timeout=10)
    urllib3.PoolManager().request("GET", url, timeout=10)
    port = int(url.rsplit(":", 1)[1].strip("/"))
    HTTPConnectionPool("127.0.0.1", port).request("GET", "/", timeout=10)


def test_every_client_sends_the_id_once_inside_a_request_and_nothing_outside(
        server: Recorder, http_on: None) -> None:
    """requests and urllib3 (five ways) carry exactly one X-Request-ID inside
    a request; the same calls outside any request add nothing."""
    in_request("req-1", every_client, server.url)
    every_client(server.url)
    assert ids(server) == [["req-1"]] * 5 + [[]] * 5


def test_negative_control_not_installed_nothing_is_sent(server: Recorder) -> None:
    in_request("req-1", every_client, server.url)
    assert ids(server) == [[]] * 5


def test_work_the_request_started_carries_its_id_and_siblings_stay_apart(
        server: Recorder, http_on: None) -> None:
    """Greenlets, a gevent Pool, a ThreadPoolExecutor and gevent's threadpool
    started by 20 requests each call out with their own request's id."""
    executor = concurrent.futures.ThreadPoolExecutor(4)

    def handler(n: int) -> None:
        url = f"{server.url}?n={n}"
        gevent.spawn(requests.get, url, timeout=10).get()
        gevent.pool.Pool(2).apply(requests.get, (url,), {"timeout": 10})
        executor.submit(requests.get, url, timeout=10).result()
        gevent.get_hub().threadpool.apply(requests.get, (url,), {"timeout": 10})

    try:
        greenlets = [gevent.spawn(in_request, f"req-{n}", handler, n) for n in range(20)]
        gevent.joinall(greenlets, raise_error=True)
    finally:
        executor.shutdown()
    assert sorted(sum(ids(server), [])) == sorted(f"req-{n}" for n in range(20) for _ in range(4))


def test_a_header_the_caller_set_wins_in_any_case(server: Recorder, http_on: None) -> None:
    def call() -> None:
        requests.get(server.url, headers={"x-request-id": "mine"}, timeout=10)
        urllib3.request("GET", server.url, headers={"X-REQUEST-ID": "mine"}, timeout=10)
        with requests.Session() as session:
            session.headers["X-Request-Id"] = "session"
            session.get(server.url, timeout=10)
    in_request("req-1", call)
    assert ids(server) == [["mine"], ["mine"], ["session"]]


def test_redirects_carry_the_id_once_per_hop(server: Recorder, http_on: None) -> None:
    def call() -> None:
        requests.get(server.url + "redirect", timeout=10)
        urllib3.request("GET", server.url + "redirect", timeout=10)
    in_request("req-r", call)
    assert ids(server) == [["req-r"]] * 4


def test_the_middlewares_header_and_storage_are_used(server: Recorder, http_on: None) -> None:
    """A service whose middleware reads X-Correlation-ID from its own storage
    sends the id in X-Correlation-ID; install(header=...) overrides."""
    own = AsyncLocalStorage(name="own-request")

    def app(environ: Dict[str, Any], start_response: Any) -> List[bytes]:
        requests.get(server.url, timeout=10)
        start_response("200 OK", [])
        return [b""]

    wrapped = RequestContextMiddleware(app, own, header="X-Correlation-ID")
    wrapped({"HTTP_X_CORRELATION_ID": "corr-1"}, lambda *a: None)
    asl_gevent.http.install(header="X-Request-ID")
    wrapped({"HTTP_X_CORRELATION_ID": "corr-2"}, lambda *a: None)
    assert [(s["X-Correlation-ID"], s["X-Request-ID"]) for s in server.seen] == [
        (["corr-1"], []), ([], ["corr-2"])]


def test_an_id_the_middleware_would_reject_is_not_sent(
        server: Recorder, http_on: None, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, "asl_gevent.http"):
        for bad in ("has space", "x" * 129, "crlf\r\nX-Evil: 1", ""):
            in_request(bad, requests.get, server.url)
    assert ids(server) == [[]] * 4
    assert len([r for r in caplog.records if "would reject" in r.getMessage()]) == 1


def test_a_downstream_that_is_down_fails_as_before(http_on: None) -> None:
    """Same exception types with and without the integration."""
    url = f"http://127.0.0.1:{free_port()}/"

    def failures() -> Tuple[type, type]:
        with pytest.raises(requests.ConnectionError) as from_requests:
            requests.get(url, timeout=5)
        with pytest.raises(urllib3.exceptions.MaxRetryError) as from_urllib3:
            urllib3.request("GET", url, timeout=5, retries=1)
        return type(from_requests.value), type(from_urllib3.value)
    on = in_request("req-down", failures)
    asl_gevent.http.uninstall()
    off = in_request("req-down", failures)
    assert on == off == (requests.ConnectionError, urllib3.exceptions.MaxRetryError)


def test_uninstall_restores_exactly_and_install_is_idempotent() -> None:
    adapter_send = requests.adapters.HTTPAdapter.send
    asl_gevent.http.install()
    asl_gevent.http.install(header="X-Other")
    patched = HTTPConnectionPool.__dict__["urlopen"]
    assert patched is not ORIGINAL_URLOPEN and patched.__wrapped__ is ORIGINAL_URLOPEN
    assert asl_gevent.http.is_installed()
    asl_gevent.http.uninstall()
    asl_gevent.http.uninstall()
    assert HTTPConnectionPool.__dict__["urlopen"] is ORIGINAL_URLOPEN
    assert requests.adapters.HTTPAdapter.send is adapter_send
    assert not asl_gevent.http.is_installed()


def test_uninstall_leaves_a_later_patch_alone() -> None:
    asl_gevent.http.install()
    ours = HTTPConnectionPool.__dict__["urlopen"]

    def theirs(self: Any, *args: Any, **kwargs: Any) -> Any:
        return ours(self, *args, **kwargs)
    HTTPConnectionPool.urlopen = theirs  # type: ignore[method-assign]
    try:
        asl_gevent.http.uninstall()
        assert HTTPConnectionPool.__dict__["urlopen"] is theirs
    finally:
        HTTPConnectionPool.urlopen = ORIGINAL_URLOPEN  # type: ignore[method-assign]


def test_baggage_round_trip_through_the_middleware(server: Recorder) -> None:
    """Named str and flat str-mapping stores travel percent-encoded as W3C
    baggage, and a middleware with baggage= restores equal stores; a caller's
    own baggage header is kept; other stores are not sent (warned once)."""
    tenant = AsyncLocalStorage(name="tenant")
    user = AsyncLocalStorage(name="user")
    nested = AsyncLocalStorage(name="nested")
    asl_gevent.http.install(baggage=[tenant, user, nested])
    try:
        def call() -> None:
            tenant.enter_with("acme, inc; \u00e9%")
            user.enter_with({"role": "admin", "name": "Zoë"})
            nested.enter_with({"deep": {"x": "1"}})
            requests.get(server.url, timeout=10)
            requests.get(server.url, headers={"Baggage": "theirs=1"}, timeout=10)
        in_request("req-b", call)
    finally:
        asl_gevent.http.uninstall()
    sent = server.seen[0]["baggage"]
    assert len(sent) == 1
    assert sent[0] == ("tenant=acme%2C%20inc%3B%20%C3%A9%25,"
                       "user.role=admin,user.name=Zo%C3%AB")
    assert server.seen[1]["baggage"] == ["theirs=1"]

    restored = {}

    def app(environ: Dict[str, Any], start_response: Any) -> List[bytes]:
        restored.update(tenant=tenant.get_store(), user=user.get_store(),
                        request=request_storage.get_store())
        start_response("200 OK", [])
        return []
    RequestContextMiddleware(app, baggage=[tenant, (user, dict)])(  # 0.3: shapes declared
        {"HTTP_X_REQUEST_ID": "req-b", "HTTP_BAGGAGE": sent[0]}, lambda *a: None)
    assert restored == {"tenant": "acme, inc; \u00e9%",
                        "user": {"role": "admin", "name": "Zoë"},
                        "request": {"request_id": "req-b"}}


def test_baggage_keeps_to_the_w3c_limits(server: Recorder,
                                         caplog: pytest.LogCaptureFixture) -> None:
    """200 members: 180 sent. 50 members of 400 bytes: at most 8192 bytes sent.
    Members are dropped whole; one warning."""
    many = AsyncLocalStorage(name="many")
    asl_gevent.http.install(baggage=[many])
    try:
        with caplog.at_level(logging.WARNING, "asl_gevent.http"):
            def call() -> None:
                many.enter_with({f"k{n}": "v" for n in range(200)})
                requests.get(server.url, timeout=10)
                many.enter_with({f"k{n}": "v" * 400 for n in range(50)})
                requests.get(server.url, timeout=10)
            in_request("req-l", call)
    finally:
        asl_gevent.http.uninstall()
    first, second = (seen["baggage"][0] for seen in server.seen)
    assert first.split(",") == [f"many.k{n}=v" for n in range(MAX_MEMBERS)]
    assert len(second.encode()) <= MAX_BYTES
    assert [m.split("=")[1] for m in second.split(",")] == ["v" * 400] * 20
    assert len([r for r in caplog.records if "W3C limits" in r.getMessage()]) == 1


def test_the_middleware_ignores_malformed_baggage() -> None:
    tenant = AsyncLocalStorage(name="tenant")
    seen = []

    def app(environ: Dict[str, Any], start_response: Any) -> List[bytes]:
        seen.append(tenant.get_store())
        start_response("200 OK", [])
        return []
    middleware = RequestContextMiddleware(app, baggage=[tenant])
    for header in ("tenant", "ten ant=x", "tenant=%ff%fe", "other=1", ",,;", "tenant=a%2Cb;p=1"):
        middleware({"HTTP_BAGGAGE": header}, lambda *a: None)
    assert seen == [None, None, None, None, None, "a,b"]
    assert unquote("a%2Cb") == "a,b"


@pytest.mark.parametrize("kwargs,error,message", [
    ({"header": 42}, TypeError, r"argument 'header' must be a str or None, not 'int'"),
    ({"header": "X Bad"}, ValueError, r"argument 'header' must be an HTTP header name"),
    ({"storage": "request"}, TypeError, r"argument 'storage' must be an AsyncLocalStorage"),
    ({"baggage": "tenant"}, TypeError, r"argument 'baggage' must be a sequence"),
    ({"baggage": [AsyncLocalStorage()]}, ValueError, r"argument 'baggage': .* needs a name that is a header token"),
])
def test_install_rejects_bad_arguments_and_patches_nothing(
        kwargs: Dict[str, Any], error: type, message: str) -> None:
    with pytest.raises(error, match=r"^asl_gevent\.http\.install\(\) " + message):
        asl_gevent.http.install(**kwargs)
    assert HTTPConnectionPool.__dict__["urlopen"] is ORIGINAL_URLOPEN


@pytest.mark.parametrize("baggage,error,message", [
    ("tenant", TypeError, r"argument 'baggage' must be a sequence of AsyncLocalStorage, not 'str'"),
    ([42], TypeError, r"argument 'baggage' must hold AsyncLocalStorage instances, not 'int'"),
    ([AsyncLocalStorage(name="has space")], ValueError,
     r"argument 'baggage': .* needs a name that is a header token"),
])
def test_the_middleware_rejects_bad_baggage_arguments(baggage: Any, error: type,
                                                      message: str) -> None:
    with pytest.raises(error, match=r"^RequestContextMiddleware\(\) " + message):
        RequestContextMiddleware(lambda environ, start_response: [], baggage=baggage)


def test_a_caller_header_with_a_bytes_name_wins_in_any_case(server: Recorder) -> None:
    """urllib3 accepts bytes header names and sends them as given: the
    caller's id and baggage, named in bytes of any case, are sent once each
    with the caller's value, never followed by ours."""
    tenant = AsyncLocalStorage(name="tenant")
    asl_gevent.http.install(baggage=[tenant])
    try:
        def call() -> None:
            tenant.enter_with("acme")
            urllib3.request("GET", server.url, headers={b"X-Request-ID": b"mine",
                                                        b"BAGGAGE": b"theirs=1"}, timeout=10)
            urllib3.PoolManager().request("GET", server.url,
                                          headers={b"x-request-id": b"mine2"}, timeout=10)
            port = int(server.url.rsplit(":", 1)[1].strip("/"))
            HTTPConnectionPool("127.0.0.1", port).request(
                "GET", "/", headers={b"X-Request-Id": b"mine3", b"baggage": b"theirs=3"},
                timeout=10)
        in_request("req-1", call)
    finally:
        asl_gevent.http.uninstall()
    assert ids(server) == [["mine"], ["mine2"], ["mine3"]]
    assert ids(server, "baggage") == [["theirs=1"], ["tenant=acme"], ["theirs=3"]]
