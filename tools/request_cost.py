"""Instructions per request on gunicorn's gevent request path, by callgrind.

Wall-clock and CPU-time figures swing by 10% on a shared machine; instruction
counts do not. This serves N pipelined keep-alive requests through the real
``worker.handle()`` of gunicorn's gevent worker (after ``monkey.patch_all()``,
in this process; the client is a separate, untraced process), once per
variant, under ``valgrind --tool=callgrind``, for two values of N; the
difference divided by the difference in N is the cost of one request, with
start-up and imports cancelled out::

    .venv/bin/python tools/request_cost.py            # every variant (~5 min)
    .venv/bin/python tools/request_cost.py stock asl  # some

Variants: ``stock`` (gunicorn's worker, bare app, no hooks), ``hooks``
(+ the hooks), ``worker`` (our worker class), ``stock+mw`` (stock worker +
hooks + middleware), ``asl`` (worker class + middleware: the benchmark's
subject), ``asl-noecho`` (the same with ``echo_header=False``),
``stock+header`` (the stock worker, the app itself adding a 32-character
``X-Request-ID`` header: what gunicorn alone charges for the echoed header).
Needs valgrind.

Measured side by side (0.3, CPython 3.11.7, gevent 26.9, gunicorn 27.0.1):
stock 500,975, asl 511,873 (ratio 0.979; 0.2: 0.952), stock+mw 519,732
(0.2: 522,215). gunicorn alone charges ~10.5k per request for one more
response header (``stock+header``); under GeventWorker the middleware adds
the echoed id to gunicorn's response directly and reuses the worker's
per-request context. Run-to-run noise is about 2,000 instructions per request.
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import _callgrind  # tools/, first on sys.path when a tool runs

VARIANTS = ["stock", "hooks", "worker", "stock+mw", "asl", "asl-noecho", "stock+header"]
COUNTS = (1000, 3000)

_CLIENT = r"""
import socket, sys, threading
port, n = int(sys.argv[1]), int(sys.argv[2])
s = socket.create_connection(("127.0.0.1", port))
request = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
def send():
    for i in range(0, n, 50):
        s.sendall(request * min(50, n - i))
    s.shutdown(socket.SHUT_WR)
t = threading.Thread(target=send); t.start()
got = b""
while True:
    data = s.recv(1 << 20)
    if not data:
        break
    got += data
t.join()
assert got.count(b"HTTP/1.1 200") == n, got[-300:]
"""


def serve(variant: str, count: int) -> None:
    """Serve *count* requests on one connection with *variant*; in this process."""
    from gevent import monkey

    monkey.patch_all()
    import socket

    from gunicorn.config import Config
    from gunicorn.glogging import Logger
    from gunicorn.workers import ggevent

    import asl_gevent
    from asl_gevent import gunicorn as ours
    from asl_gevent.bench.servers import hello_app
    from asl_gevent.wsgi import RequestContextMiddleware

    if variant in ("stock", "stock+header"):
        asl_gevent.uninstall()
    else:
        asl_gevent.install()
    worker_class = ours.GeventWorker if variant in ("worker", "asl", "asl-noecho") \
        else ggevent.GeventWorker
    app = hello_app
    if variant == "stock+header":
        def app(environ: dict, start_response: object) -> list:  # type: ignore[type-arg]
            body = b"Hello, World!\n"
            start_response("200 OK", [  # type: ignore[operator]
                ("Content-Type", "text/plain"), ("Content-Length", str(len(body))),
                ("X-Request-ID", "0123456789abcdef0123456789abcdef")])
            return [body]
    elif variant in ("stock+mw", "asl"):
        app = RequestContextMiddleware(hello_app)
    elif variant == "asl-noecho":
        app = RequestContextMiddleware(hello_app, echo_header=False)
    cfg = Config()
    cfg.set("keepalive", 10)
    worker = worker_class(0, os.getppid(), [], None, 30, cfg, Logger(cfg))
    worker.wsgi = app

    def one_connection(n: int) -> None:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = subprocess.Popen([sys.executable, "-c", _CLIENT,
                                   str(listener.getsockname()[1]), str(n)])
        try:
            conn, addr = listener.accept()
            worker.handle(listener, conn, addr)
            assert client.wait(timeout=600) == 0
        finally:
            if client.poll() is None:
                client.kill()
            listener.close()

    one_connection(200)  # warm up: imports, caches, specialisation
    one_connection(count)


def instructions(variant: str, count: int) -> int:
    """Total instructions callgrind counts for ``serve(variant, count)``."""
    return _callgrind.instructions([__file__, "--serve", variant, str(count)],
                                   f"{variant} {count}")


def main(argv: list[str]) -> int:
    if argv[:1] == ["--serve"]:
        serve(argv[1], int(argv[2]))
        return 0
    variants = argv or VARIANTS
    # Two children at a time (2 cores): the traced server reads requests the
    # untraced client sent long before, so its count does not depend on load.
    runs = [(variant, n) for variant in variants for n in COUNTS]
    with ThreadPoolExecutor(max_workers=2) as pool:
        totals = dict(zip(runs, pool.map(lambda run: instructions(*run), runs)))
    base = None
    for variant in variants:
        low, high = (totals[variant, n] for n in COUNTS)
        per_request = (high - low) / (COUNTS[1] - COUNTS[0])
        base = base or (per_request if variant == "stock" else None)
        extra = f"  {per_request - base:+9,.0f}  ratio {base / per_request:.3f}" if base else ""
        print(f"{variant:11s} {per_request:9,.0f} instructions per request{extra}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
