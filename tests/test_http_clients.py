"""asl_gevent.http on every common client: http.client, urllib.request,
requests, urllib3, httpx (Client and AsyncClient), each against a real local
server that records the headers it receives.

Each client path sends exactly one id per request (never two when layers
stack: requests -> urllib3 -> http.client), follows the same caller-header,
rejected-id and baggage rules, and is hooked when imported after install().
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import urllib.request
from typing import Any, Callable, Dict, Iterator, List
from urllib.parse import urlsplit

import httpx
import pytest
import requests
import urllib3
from urllib3.connectionpool import HTTPConnectionPool

import asl_gevent.http
from asl_gevent import AsyncLocalStorage
from asl_gevent.wsgi import request_storage
from helpers import run_python
from test_http import Recorder, _http_on, _server  # noqa: F401 (fixtures)

Client = Callable[[str, Dict[str, str]], None]


def _port(url: str) -> int:
    return urlsplit(url).port or 80


def _path(url: str) -> str:
    parts = urlsplit(url)
    return parts.path + ("?" + parts.query if parts.query else "")


def _http_client(url: str, headers: Dict[str, str]) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", _port(url), timeout=10)
    try:
        conn.request("GET", _path(url), headers=headers)
        conn.getresponse().read()
    finally:
        conn.close()


def _http_client_low_level(url: str, headers: Dict[str, str]) -> None:
    """putrequest/putheader/endheaders, as xmlrpc.client does."""
    conn = http.client.HTTPConnection("127.0.0.1", _port(url), timeout=10)
    try:
        conn.putrequest("POST", _path(url))
        for name, value in headers.items():
            conn.putheader(name, value)
        conn.putheader("Content-Length", "0")
        conn.endheaders()
        conn.getresponse().read()
    finally:
        conn.close()


def _urllib(url: str, headers: Dict[str, str]) -> None:
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
        r.read()


def _requests(url: str, headers: Dict[str, str]) -> None:
    requests.get(url, headers=headers, timeout=10)


def _requests_session(url: str, headers: Dict[str, str]) -> None:
    with requests.Session() as session:
        session.post(url, headers=headers, data=b"x", timeout=10)


def _urllib3(url: str, headers: Dict[str, str]) -> None:
    urllib3.request("GET", url, headers=headers, timeout=10)


def _urllib3_pool(url: str, headers: Dict[str, str]) -> None:
    with HTTPConnectionPool("127.0.0.1", _port(url)) as pool:
        pool.request("GET", _path(url), headers=headers, timeout=10)


def _httpx(url: str, headers: Dict[str, str]) -> None:
    httpx.get(url, headers=headers, timeout=10)


def _httpx_client(url: str, headers: Dict[str, str]) -> None:
    with httpx.Client(timeout=10) as client:
        client.post(url, headers=headers, content=b"x")


def _httpx_async(url: str, headers: Dict[str, str]) -> None:
    """An AsyncClient in asyncio code; the store is the caller's (asyncio
    copies the context into the task)."""
    async def main() -> None:
        async with httpx.AsyncClient(timeout=10) as client:
            await asyncio.gather(client.get(url, headers=headers))
    asyncio.run(main())


CLIENTS: Dict[str, Client] = {
    "http.client": _http_client, "http.client-low-level": _http_client_low_level,
    "urllib.request": _urllib, "requests": _requests, "requests.Session": _requests_session,
    "urllib3": _urllib3, "urllib3.HTTPConnectionPool": _urllib3_pool, "httpx": _httpx,
    "httpx.Client": _httpx_client, "httpx.AsyncClient": _httpx_async,
}


def in_request(request_id: str, fn: Callable[..., Any], *args: Any) -> Any:
    return request_storage.run({"request_id": request_id}, fn, *args)


@pytest.mark.parametrize("client", CLIENTS)
def test_each_client_sends_the_id_exactly_once_in_a_request_and_nothing_outside(
        server: Recorder, http_on: None, client: str) -> None:
    """One X-Request-ID per request inside a request store (never two, even
    where requests -> urllib3 -> http.client stack); none outside."""
    in_request("req-1", CLIENTS[client], server.url, {})
    CLIENTS[client](server.url, {})
    assert [seen["X-Request-ID"] for seen in server.seen] == [["req-1"], []]


@pytest.mark.parametrize("client", CLIENTS)
def test_negative_control_not_installed(server: Recorder, client: str) -> None:
    in_request("req-1", CLIENTS[client], server.url, {})
    assert [seen["X-Request-ID"] for seen in server.seen] == [[]]


@pytest.mark.parametrize("client", CLIENTS)
def test_each_client_keeps_the_callers_header_in_any_case(
        server: Recorder, http_on: None, client: str) -> None:
    in_request("req-1", CLIENTS[client], server.url, {"x-REQUEST-id": "mine"})
    assert [seen["X-Request-ID"] for seen in server.seen] == [["mine"]]


@pytest.mark.parametrize("client", CLIENTS)
def test_each_client_drops_an_id_the_middleware_would_reject(
        server: Recorder, http_on: None, client: str,
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, "asl_gevent.http"):
        in_request("crlf\r\nX-Evil: 1", CLIENTS[client], server.url, {})
        in_request("has space", CLIENTS[client], server.url, {})
    assert [seen["X-Request-ID"] for seen in server.seen] == [[], []]
    assert len([r for r in caplog.records if "would reject" in r.getMessage()]) == 1


@pytest.mark.parametrize("client", CLIENTS)
def test_each_client_sends_baggage_once_and_keeps_the_callers(
        server: Recorder, client: str) -> None:
    tenant = AsyncLocalStorage(name="tenant")
    asl_gevent.http.install(baggage=[tenant])
    try:
        def call() -> None:
            tenant.enter_with({"plan": "gold", "name": "Zoë"})
            CLIENTS[client](server.url, {})
            CLIENTS[client](server.url, {"Baggage": "theirs=1"})
        in_request("req-b", call)
    finally:
        asl_gevent.http.uninstall()
    assert [seen["baggage"] for seen in server.seen] == [
        ["tenant.plan=gold,tenant.name=Zo%C3%AB"], ["theirs=1"]]
    assert [seen["X-Request-ID"] for seen in server.seen] == [["req-b"]] * 2


def test_asyncio_tasks_each_send_their_own_id(server: Recorder, http_on: None) -> None:
    """20 concurrent AsyncClient calls, each in its own request (await
    request_storage.run(...)), each with its own id."""
    async def one(client: httpx.AsyncClient, n: int) -> None:
        async def call() -> None:
            await client.get(f"{server.url}?n={n}")
        await request_storage.run({"request_id": f"req-{n}"}, call)

    async def main() -> None:
        async with httpx.AsyncClient(timeout=10) as client:
            await asyncio.gather(*(one(client, n) for n in range(20)))
    asyncio.run(main())
    by_path = {path: seen["X-Request-ID"] for path, seen in zip(server.paths, server.seen)}
    assert by_path == {f"/?n={n}": [f"req-{n}"] for n in range(20)}


def test_a_redirect_hop_decides_for_itself_and_the_callers_request_is_left_as_it_was(
        server: Recorder, http_on: None) -> None:
    """httpx: the id is added for the hop and taken off the Request again,
    so the redirect carries one id, and the caller's Request object does
    not keep ours."""
    with httpx.Client(timeout=10, follow_redirects=True) as client:
        request = client.build_request("GET", server.url + "redirect")
        response = in_request("req-r", client.send, request)
    assert [seen["X-Request-ID"] for seen in server.seen] == [["req-r"], ["req-r"]]
    assert "x-request-id" not in request.headers
    assert response.status_code == 200


SCENARIO_IMPORT_LATER = r"""
import json, sys
import asl_gevent.http
from asl_gevent.wsgi import request_storage
before = sorted(m for m in ("requests", "urllib3", "httpx", "http.client", "urllib.request")
                if m in sys.modules)
asl_gevent.http.install()
# imported after install(): each hooked when imported
import urllib.request, requests, httpx, urllib3
url = sys.argv[1]
def calls():
    urllib.request.urlopen(url, timeout=10).read()
    requests.get(url, timeout=10)
    urllib3.request("GET", url, timeout=10)
    httpx.get(url, timeout=10)
request_storage.run({"request_id": "late"}, calls)
asl_gevent.http.uninstall()
request_storage.run({"request_id": "after"}, calls)
print(json.dumps({"before": before}))
"""


def test_clients_imported_after_install_are_hooked_when_imported(server: Recorder) -> None:
    proc = run_python(SCENARIO_IMPORT_LATER, args=(server.url,))
    assert json.loads(proc.stdout.splitlines()[-1]) == {"before": []}
    assert [seen["X-Request-ID"] for seen in server.seen] == [["late"]] * 4 + [[]] * 4


SCENARIO_PATCHED = r"""
from gevent import monkey; monkey.patch_all()
import json, sys
import gevent, httpx, requests
import asl_gevent.http
from asl_gevent.wsgi import request_storage
asl_gevent.http.install()
url = sys.argv[1]
client = httpx.Client(timeout=10)

def handler(n):
    # in the request, in a greenlet it spawned, and with requests
    client.get(f"{url}?n={n}&via=request")
    gevent.spawn(client.get, f"{url}?n={n}&via=spawn").get()
    requests.get(f"{url}?n={n}&via=requests", timeout=10)

greenlets = [gevent.spawn(request_storage.run, {"request_id": f"req-{n}"}, handler, n)
             for n in range(10)]
gevent.joinall(greenlets, raise_error=True, timeout=60)
client.get(f"{url}?n=none&via=outside")
print(json.dumps({"done": all(g.successful() for g in greenlets)}))
"""


def test_httpx_client_under_monkey_patch_all(server: Recorder) -> None:
    """A real patch_all() process: 10 concurrent requests, each calling with
    a shared httpx.Client from its greenlet and from one it spawned (and with
    requests), each call carries its own request's id, once."""
    proc = run_python(SCENARIO_PATCHED, args=(server.url,))
    assert json.loads(proc.stdout.splitlines()[-1]) == {"done": True}
    got = {path: seen["X-Request-ID"] for path, seen in zip(server.paths, server.seen)}
    want: Dict[str, List[str]] = {f"/?n={n}&via={via}": [f"req-{n}"] for n in range(10)
                                  for via in ("request", "spawn", "requests")}
    want["/?n=none&via=outside"] = []
    assert got == want


def test_the_outgoing_http_example_prints_what_its_docstring_shows() -> None:
    """examples/outgoing_http.py: the target gets the id and baggage from
    requests, httpx and urllib.request; the third party gets nothing; a
    header set to None stays out."""
    import subprocess
    import sys
    import tempfile

    from helpers import ROOT
    example = ROOT / "examples" / "outgoing_http.py"
    with tempfile.TemporaryDirectory() as cwd:
        proc = subprocess.run([sys.executable, str(example)], capture_output=True, text=True,
                              timeout=90, cwd=cwd)
    assert (proc.returncode, proc.stderr) == (0, "")
    doc = example.read_text().split("$ python examples/outgoing_http.py\n")[1].split('"""')[0]
    assert proc.stdout.splitlines() == [line.strip() for line in doc.strip().splitlines()]
    assert len(proc.stdout.splitlines()) == 7
