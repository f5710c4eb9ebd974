"""Outgoing HTTP carries the request id to your services, and only to them.

A WSGI service (``RequestContextMiddleware``) handles request ``req-42`` and
calls two other services with ``requests``, ``httpx`` and ``urllib.request``:
``orders`` (one of its targets) and ``partner`` (a third party, not a target).
Each of those is a real ``gevent.pywsgi`` server on 127.0.0.1 that prints the
headers it received. With ``targets=``, only ``orders`` gets the id and the
tenant baggage; a call that sets the header to ``None`` sends none::

    $ python examples/outgoing_http.py
    orders   requests         X-Request-ID=req-42  baggage=tenant=acme
    orders   httpx            X-Request-ID=req-42  baggage=tenant=acme
    orders   urllib.request   X-Request-ID=req-42  baggage=tenant=acme
    partner  requests         X-Request-ID=-  baggage=-
    partner  httpx            X-Request-ID=-  baggage=-
    partner  urllib.request   X-Request-ID=-  baggage=-
    orders   requests (None)  X-Request-ID=-  baggage=tenant=acme
"""

from gevent import monkey

monkey.patch_all()

import urllib.request  # noqa: E402

import httpx  # noqa: E402
import requests  # noqa: E402
from gevent.pywsgi import WSGIServer  # noqa: E402

import asl_gevent.http  # noqa: E402
from asl_gevent import AsyncLocalStorage  # noqa: E402
from asl_gevent.wsgi import RequestContextMiddleware  # noqa: E402

tenant_storage = AsyncLocalStorage(name="tenant")
seen = []


def service(name):
    """A downstream service that notes what it received."""
    def app(environ, start_response):
        seen.append((name, environ.get("HTTP_X_REQUEST_ID", "-"), environ.get("HTTP_BAGGAGE", "-")))
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
        return [b"ok"]
    server = WSGIServer(("127.0.0.1", 0), app, log=None)
    server.start()
    return server, f"http://127.0.0.1:{server.server_port}/"


orders, orders_url = service("orders")
partner, partner_url = service("partner")

asl_gevent.http.install(targets=[f"127.0.0.1:{orders.server_port}"], baggage=[tenant_storage])


def call(url):
    requests.get(url, timeout=10)
    httpx.get(url, timeout=10)
    with urllib.request.urlopen(url, timeout=10) as response:
        response.read()


def app(environ, start_response):
    tenant_storage.enter_with("acme")
    call(orders_url)
    call(partner_url)
    requests.get(orders_url, headers={"X-Request-ID": None}, timeout=10)
    start_response("200 OK", [])
    return [b"done"]


RequestContextMiddleware(app)({"HTTP_X_REQUEST_ID": "req-42"}, lambda status, headers: None)
clients = ["requests", "httpx", "urllib.request"] * 2 + ["requests (None)"]
for (name, request_id, baggage), client in zip(seen, clients):
    print(f"{name:8s} {client:16s} X-Request-ID={request_id}  baggage={baggage}")
orders.stop()
partner.stop()
asl_gevent.http.uninstall()
