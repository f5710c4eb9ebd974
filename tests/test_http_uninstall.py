"""asl_gevent.http.uninstall() is exact under other patchers: the real
OpenTelemetry instrumentations of urllib3, requests, httpx and urllib,
wrapping after us, unwrapping before or after us, and installs repeated.

What "exact" means (as for the core hooks): an attribute that still holds
our hook gets back what it held at install(); one another library wrapped
since is left to it, with our hook inside switched off (no id is sent, and
``is_installed()`` says so), and a later install() switches it on again
instead of wrapping twice (never two ids).
"""

from __future__ import annotations

import asyncio
import http.client
import urllib.request
from typing import Any, Callable, Dict, Iterator, List, Tuple

import httpx
import pytest
import requests
import urllib3
from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
from opentelemetry.instrumentation.requests import RequestsInstrumentor
from opentelemetry.instrumentation.urllib import URLLibInstrumentor
from opentelemetry.instrumentation.urllib3 import URLLib3Instrumentor
from opentelemetry.instrumentation.utils import unwrap
from opentelemetry.sdk.trace import TracerProvider
from urllib3.connectionpool import HTTPConnectionPool

import asl_gevent.http
from asl_gevent.wsgi import request_storage
from test_http import Recorder, _server  # noqa: F401 (fixture)

#: Every attribute asl_gevent.http or an instrumentation here may replace.
ATTRIBUTES: List[Tuple[Any, str]] = [
    (HTTPConnectionPool, "urlopen"), (requests.Session, "request"), (requests.Session, "send"),
    (httpx.HTTPTransport, "handle_request"), (httpx.AsyncHTTPTransport, "handle_async_request"),
    (http.client.HTTPConnection, "endheaders"), (urllib.request.OpenerDirector, "open"),
    (urllib.request.AbstractHTTPHandler, "do_open"),
]
PRISTINE = {(owner, name): vars(owner)[name] for owner, name in ATTRIBUTES}
PROVIDER = TracerProvider()


def _httpx(url: str) -> None:
    with httpx.Client(timeout=10) as client:
        client.get(url)

    async def main() -> None:
        async with httpx.AsyncClient(timeout=10) as client:
            await client.get(url)
    asyncio.run(main())


def _urllib(url: str) -> None:
    with urllib.request.urlopen(url, timeout=10) as response:
        response.read()


#: instrumentation -> (instrumentor, the calls it sees, how many requests they make)
CASES: Dict[str, Tuple[Any, Callable[[str], None], int]] = {
    "urllib3": (URLLib3Instrumentor(), lambda url: urllib3.request("GET", url, timeout=10), 1),
    "requests": (RequestsInstrumentor(), lambda url: requests.get(url, timeout=10), 1),
    "httpx": (HTTPXClientInstrumentor(), _httpx, 2),
    "urllib": (URLLibInstrumentor(), _urllib, 1),
}


def current() -> Dict[Tuple[Any, str], Any]:
    return {(owner, name): vars(owner)[name] for owner, name in ATTRIBUTES}


@pytest.fixture(name="case", params=list(CASES))
def _case(request: pytest.FixtureRequest) -> Iterator[Tuple[Any, Callable[[str], None], int]]:
    """One instrumentation; afterwards everything is put back as it was
    (also what OTel's own uninstrument() could not unwrap)."""
    instrumentor, call, count = CASES[request.param]
    try:
        yield instrumentor, call, count
    finally:
        asl_gevent.http.uninstall()
        if instrumentor.is_instrumented_by_opentelemetry:
            instrumentor.uninstrument()
        for (owner, name), value in PRISTINE.items():
            if vars(owner)[name] is not value:
                unwrap(owner, name)
            setattr(owner, name, value)


def sent(server: Recorder, call: Callable[[str], None], count: int) -> Tuple[List[List[str]], bool]:
    """Make the calls in a request; return the ids the server saw and whether
    OpenTelemetry's wrapper ran (a traceparent on every request)."""
    del server.seen[:]
    request_storage.run({"request_id": "req-u"}, call, server.url)
    assert len(server.seen) == count
    return ([seen["X-Request-ID"] for seen in server.seen],
            all(seen["traceparent"] for seen in server.seen))


def test_wrapped_after_us_uninstalled_then_unwrapped(server: Recorder, case: Any) -> None:
    """install; OTel wraps; uninstall: their wrapper stays, ours inside it is
    off (no id). OTel unwraps: our hook is what is left, still off; a later
    install() turns it on (one id, not two) and uninstall() then leaves
    every attribute exactly as before the test."""
    instrumentor, call, count = case
    asl_gevent.http.install()
    instrumentor.instrument(tracer_provider=PROVIDER)
    assert sent(server, call, count) == ([["req-u"]] * count, True)
    asl_gevent.http.uninstall()
    assert not asl_gevent.http.is_installed()
    assert sent(server, call, count) == ([[]] * count, True)
    instrumentor.uninstrument()
    assert sent(server, call, count) == ([[]] * count, False)
    asl_gevent.http.install()
    assert sent(server, call, count) == ([["req-u"]] * count, False)
    asl_gevent.http.uninstall()
    assert sent(server, call, count) == ([[]] * count, False)
    assert current() == PRISTINE


def test_wrapped_before_us_and_unwrapped_before_our_uninstall(server: Recorder,
                                                               case: Any) -> None:
    """OTel wraps; install (over their wrapper); OTel uninstruments while
    ours is on top; uninstall() puts back exactly what install() found:
    their wrapper, untouched."""
    instrumentor, call, count = case
    instrumentor.instrument(tracer_provider=PROVIDER)
    found = current()
    asl_gevent.http.install()
    hooked = [key for key, value in current().items() if value is not found[key]]
    instrumentor.uninstrument()
    assert sent(server, call, count)[0] == [["req-u"]] * count
    asl_gevent.http.uninstall()
    assert sent(server, call, count)[0] == [[]] * count
    assert len(hooked) == 6
    assert all(current()[key] is found[key] for key in hooked)


def test_wrapped_before_us_unwrapped_after_us(server: Recorder, case: Any) -> None:
    instrumentor, call, count = case
    instrumentor.instrument(tracer_provider=PROVIDER)
    found = current()
    asl_gevent.http.install()
    assert sent(server, call, count) == ([["req-u"]] * count, True)
    asl_gevent.http.uninstall()
    assert current() == found
    assert sent(server, call, count) == ([[]] * count, True)
    instrumentor.uninstrument()
    assert current() == PRISTINE


def test_wrapped_and_unwrapped_while_we_are_installed(server: Recorder, case: Any) -> None:
    instrumentor, call, count = case
    asl_gevent.http.install()
    ours = current()
    instrumentor.instrument(tracer_provider=PROVIDER)
    instrumentor.uninstrument()
    assert current() == ours
    assert sent(server, call, count) == ([["req-u"]] * count, False)
    asl_gevent.http.uninstall()
    assert current() == PRISTINE


def test_installed_twice_and_again_while_wrapped_sends_one_id(server: Recorder,
                                                              case: Any) -> None:
    instrumentor, call, count = case
    asl_gevent.http.install()
    asl_gevent.http.install()
    instrumentor.instrument(tracer_provider=PROVIDER)
    asl_gevent.http.install(header="X-Request-ID")
    assert sent(server, call, count) == ([["req-u"]] * count, True)
    asl_gevent.http.uninstall()
    asl_gevent.http.install()
    assert sent(server, call, count) == ([["req-u"]] * count, True)
    asl_gevent.http.uninstall()
    asl_gevent.http.uninstall()
    assert sent(server, call, count) == ([[]] * count, True)
    instrumentor.uninstrument()
    asl_gevent.http.install()
    asl_gevent.http.uninstall()
    assert current() == PRISTINE


def test_uninstall_restores_every_client_exactly(server: Recorder) -> None:
    """No other patcher: after install() and uninstall() every attribute holds
    the very object it held before."""
    asl_gevent.http.install()
    assert all(current()[key] is not PRISTINE[key] for key in [
        (HTTPConnectionPool, "urlopen"), (requests.Session, "request"),
        (httpx.HTTPTransport, "handle_request"),
        (httpx.AsyncHTTPTransport, "handle_async_request"),
        (http.client.HTTPConnection, "endheaders"),
        (urllib.request.AbstractHTTPHandler, "do_open")])
    asl_gevent.http.uninstall()
    assert current() == PRISTINE
