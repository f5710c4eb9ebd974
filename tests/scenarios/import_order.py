"""Hooks first, gevent's modules afterwards (tests/test_install.py).

``argv[1]``: ``install`` (``asl_gevent.install()``) or ``patch``
(``monkey.patch_all()``, whose plugin installs the hooks). Only then are the
servers, pools and executors imported; every path must still carry stores.
``argv[2] == "nohooks"``: uninstall first (negative control). Prints one JSON line.
"""
import sys

LAZY = ("gevent.pywsgi", "gevent.server", "gevent.baseserver", "gevent.threadpool",
        "concurrent.futures", "concurrent.futures.thread", "http.client", "email",
        "logging", "ctypes")

if sys.argv[1] == "patch":
    from gevent import monkey
    monkey.patch_all()
import asl_gevent  # noqa: E402

imported_by_us = sorted(m for m in LAZY if m in sys.modules)
asl_gevent.install()
if sys.argv[2:] == ["nohooks"]:
    asl_gevent.uninstall()
installed_before_imports = asl_gevent.is_installed()

import json  # noqa: E402
import socket  # noqa: E402

import gevent  # noqa: E402
import gevent.socket  # noqa: E402
from gevent.pywsgi import WSGIServer  # noqa: E402
from gevent.server import StreamServer  # noqa: E402
from gevent.threadpool import ThreadPool  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402

als = asl_gevent.AsyncLocalStorage(name="order")
seen = {}


def stream_handler(sock, address):
    seen.setdefault("StreamServer handler", []).append(als.get_store())
    sock.sendall(b"ok")
    sock.close()


stream = als.run("server-start", lambda: StreamServer(("127.0.0.1", 0), stream_handler))
als.run("server-start", stream.start)
for _ in range(3):
    client = gevent.socket.create_connection(("127.0.0.1", stream.server_port), timeout=5)
    client.recv(10)
    client.close()
stream.stop()


def app(environ, start_response):
    before = als.get_store()
    als.enter_with(environ["PATH_INFO"])
    body = json.dumps(before).encode()
    start_response("200 OK", [("Content-Length", str(len(body)))])
    return [body]


wsgi = WSGIServer(("127.0.0.1", 0), app, log=None)
wsgi.start()
conn = socket.create_connection(("127.0.0.1", wsgi.server_port), timeout=5) \
    if sys.argv[1] == "patch" else gevent.socket.create_connection(
        ("127.0.0.1", wsgi.server_port), timeout=5)
reply = b""
for path in ("/one", "/two"):  # one keep-alive connection
    conn.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    reply = b""
    while b"\r\n\r\n" not in reply or len(reply.split(b"\r\n\r\n", 1)[1]) < int(
            reply.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0]):
        reply += conn.recv(4096)
conn.close()
wsgi.stop()
seen["pywsgi keep-alive request 2"] = json.loads(reply.split(b"\r\n\r\n", 1)[1])

pool, executor = ThreadPool(2), ThreadPoolExecutor(2)
for n in range(10):
    store = f"r{n}"
    seen.setdefault("ThreadPool.spawn", []).append(
        als.run(store, lambda: pool.spawn(als.get_store).get(timeout=5)) == store)
    seen.setdefault("ThreadPoolExecutor.submit", []).append(
        als.run(store, lambda: executor.submit(als.get_store).result(timeout=5)) == store)
    seen.setdefault("hub threadpool", []).append(als.run(
        store, lambda: gevent.get_hub().threadpool.spawn(als.get_store).get(timeout=5)) == store)
executor.shutdown()
pool.kill()
print(json.dumps({"imported_by_asl_gevent": imported_by_us,
                  "installed": installed_before_imports and asl_gevent.is_installed(),
                  "seen": seen}))
