"""Instructions per outgoing call with asl_gevent.http on and off, by callgrind.

The client runs under ``valgrind --tool=callgrind`` and makes N calls to a
local ``gevent.pywsgi`` server (a separate, untraced process) inside a
request store, for two values of N; the difference divided by the difference
in N is the cost of one call, with start-up and imports cancelled out::

    .venv/bin/python tools/http_cost.py                    # every client
    .venv/bin/python tools/http_cost.py requests.get httpx

Clients: ``requests.get`` (a new Session per call, as the function does),
``Session.get`` (keep-alive; the bench's ``http/requests_get`` row),
``urllib3``, ``urllib.request``, ``httpx`` (a keep-alive Client). Variants:
``off`` (asl_gevent.http imported, not installed), ``by hand`` (not
installed; the call passes ``headers={"X-Request-ID": ...}`` itself: the
floor, what the header costs the client) and ``on`` (``install()``); the
ratio is on / off. Needs valgrind.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import _callgrind  # tools/, first on sys.path when a tool runs

CLIENTS = ["requests.get", "Session.get", "urllib3", "urllib.request", "httpx"]
COUNTS = (100, 300)


def call(client: str, variant: str, port: int, count: int) -> None:
    """Make *count* calls with *client*, asl_gevent.http *variant*; in this process."""
    import urllib.request

    import httpx
    import requests
    import urllib3

    import asl_gevent.http
    from asl_gevent.wsgi import request_storage

    if variant == "on":
        asl_gevent.http.install()
    url = f"http://127.0.0.1:{port}/"
    headers = {"X-Request-ID": "cost-request"} if variant == "by-hand" else None
    session = requests.Session()
    pool = urllib3.PoolManager()
    hclient = httpx.Client()

    def one() -> None:
        if client == "requests.get":
            requests.get(url, headers=headers)
        elif client == "Session.get":
            session.get(url, headers=headers)
        elif client == "urllib3":
            pool.request("GET", url, headers=headers)
        elif client == "urllib.request":
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {})) as r:
                r.read()
        else:
            hclient.get(url, headers=headers)

    def calls(n: int) -> None:
        for _ in range(n):
            one()

    request_storage.run({"request_id": "cost-request"}, calls, 20)  # warm up
    request_storage.run({"request_id": "cost-request"}, calls, count)


_SERVER = r"""
from gevent import monkey; monkey.patch_all()
import socket, sys
from gevent.pywsgi import WSGIServer
def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
    return [b"ok"]
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
listener.bind(("127.0.0.1", int(sys.argv[1])))
listener.listen(128)
WSGIServer(listener, app, log=None).serve_forever()
"""


def instructions(client: str, variant: str, port: int, count: int) -> int:
    return _callgrind.instructions([__file__, "--call", client, variant, str(port), str(count)],
                                   f"{client} {variant} {count}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main(argv: list[str]) -> int:
    if argv[:1] == ["--call"]:
        call(argv[1], argv[2], int(argv[3]), int(argv[4]))
        return 0
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-c", _SERVER, str(port)], start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), 1).close()
                break
            except OSError:
                time.sleep(0.1)
        for client in argv or CLIENTS:
            # Two children at a time (2 cores): the traced client's count does
            # not depend on the load, as the untraced server always answers
            # before the client, slowed down ~50x by valgrind, reads.
            runs = [(variant, n) for variant in ("off", "by-hand", "on") for n in COUNTS]
            with ThreadPoolExecutor(max_workers=2) as pool:
                totals = dict(zip(runs, pool.map(
                    lambda run: instructions(client, run[0], port, run[1]), runs)))
            per_call = {variant: (totals[variant, COUNTS[1]] - totals[variant, COUNTS[0]])
                        / (COUNTS[1] - COUNTS[0]) for variant in ("off", "by-hand", "on")}
            off, hand, on = per_call["off"], per_call["by-hand"], per_call["on"]
            print(f"{client:15s} off {off:10,.0f}  by hand {hand - off:+8,.0f}  "
                  f"on {on - off:+8,.0f} instructions per call  "
                  f"ratio {on / off:.4f} (by hand {hand / off:.4f})", flush=True)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
