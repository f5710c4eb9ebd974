"""The one recipe: a Flask app on gunicorn whose every log line carries its request id.

Serve it with::

    gunicorn -k asl_gevent.gunicorn.GeventWorker -w 4 myapp:app

(here: ``examples.gunicorn_recipe:app``). Five pieces, each needed for its own
reason (the docs' how-to "Flask on gunicorn" explains each):

1. ``-k asl_gevent.gunicorn.GeventWorker``: installs the hooks after gunicorn's
   ``monkey.patch_all()`` and gives every keep-alive request its own context;
2. ``RequestContextMiddleware``: makes the store ``{"request_id": ...}`` that
   ``get_request_id()``, ``StoreFilter`` and the leak watch read;
3. ``StoreFilter``: puts ``request_id`` on every log record;
4. ``asl_gevent.http.install()``: outgoing ``requests`` calls carry the id;
5. ``leak_watch=5``: one warning on the ``asl_gevent.leak`` logger for work
   that still holds a request's store 5 s after the request ended.

Run as a script, it serves itself: a "downstream" service on a free port
(records the ``X-Request-ID`` it receives), gunicorn with this app on
another, three requests, then it prints what was logged and what the
downstream service saw::

    $ python examples/gunicorn_recipe.py
    [req-1] GET /order
    [req-1] calling the stock service
    [req-1] stock service answered 200
    ...
    downstream saw: req-1 req-2 req-3

It exits non-zero if a line or a downstream call carries another request's id.
"""

# -- the app (what you copy) ---------------------------------------------------

import logging.config
import os

import gevent
import requests
from flask import Flask

import asl_gevent.http
from asl_gevent.wsgi import RequestContextMiddleware, get_request_id

logging.config.dictConfig({
    "version": 1,
    "disable_existing_loggers": False,
    # 3. StoreFilter: the request id on every record, "-" outside a request.
    "filters": {"request_id": {"()": "asl_gevent.logfilter.StoreFilter"}},
    "formatters": {"line": {"format": "[%(request_id)s] %(message)s"}},
    "handlers": {"stdout": {"class": "logging.StreamHandler", "stream": "ext://sys.stdout",
                            "filters": ["request_id"], "formatter": "line"}},
    "loggers": {
        "myapp": {"handlers": ["stdout"], "level": "INFO", "propagate": False},
        # 5. where the leak watch reports (WARNING): route it like any logger.
        "asl_gevent.leak": {"handlers": ["stdout"], "level": "WARNING", "propagate": False},
    },
})
log = logging.getLogger("myapp")

# 4. Outgoing requests/urllib3 calls carry X-Request-ID. Module level: gunicorn
# imports the app in every worker (after its patch_all()), and with --preload
# once in the arbiter, whose patch the workers inherit at fork.
asl_gevent.http.install()

STOCK_URL = os.environ.get("STOCK_URL", "http://127.0.0.1:8001/stock")

flask_app = Flask(__name__)


def ask_stock_service() -> None:
    # A greenlet the view spawns: it was passed no id, yet it logs and sends it.
    log.info("calling the stock service")
    response = requests.get(STOCK_URL, timeout=5)
    log.info("stock service answered %s", response.status_code)


@flask_app.get("/order")
def order() -> str:
    log.info("GET /order")
    gevent.spawn(ask_stock_service).join()
    return f"order placed by request {get_request_id()}\n"


# 2. + 5. One store per request, and the leak watch on it.
app = RequestContextMiddleware(flask_app, leak_watch=5)


# -- the script: serve this app with gunicorn and check it ---------------------


def main() -> int:  # run by tests/test_examples.py and tests/test_docs_build.py
    import signal
    import socket
    import subprocess
    import sys
    import tempfile
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from pathlib import Path

    import gunicorn.config

    seen = []

    class Stock(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            seen.append(self.headers.get("X-Request-ID"))
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: object) -> None:
            pass

    stock = ThreadingHTTPServer(("127.0.0.1", 0), Stock)
    threading.Thread(target=stock.serve_forever, daemon=True).start()
    root = Path(__file__).resolve().parent.parent
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, STOCK_URL=f"http://127.0.0.1:{stock.server_port}/stock",
               PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    flags = {flag for setting in gunicorn.config.KNOWN_SETTINGS for flag in setting.cli or ()}
    command = [sys.executable, "-m", "gunicorn", "-k", "asl_gevent.gunicorn.GeventWorker",
               "-w", "2", "-b", f"127.0.0.1:{port}", "--chdir", str(root), "--log-level", "warning",
               "--graceful-timeout", "2",
               *(["--no-control-socket"] if "--no-control-socket" in flags else []),
               "examples.gunicorn_recipe:app"]
    ids = ["req-1", "req-2", "req-3"]

    def fetch(request_id: str) -> str:
        request = requests.get(f"http://127.0.0.1:{port}/order", timeout=10,
                               headers={"X-Request-ID": request_id})
        return request.text

    with tempfile.TemporaryFile() as output:
        server = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 30
            while True:  # wait until gunicorn answers (bounded)
                try:
                    fetch("ready")
                    break
                except requests.ConnectionError:
                    if server.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError("gunicorn did not start") from None
                    time.sleep(0.1)
            with ThreadPoolExecutor(max_workers=len(ids)) as clients:
                bodies = list(clients.map(fetch, ids))
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(timeout=5)
            stock.shutdown()
        output.seek(0)
        lines = [line for line in output.read().decode(errors="replace").splitlines()
                 if line.startswith("[") and not line.startswith("[ready]")]
    for line in sorted(lines, key=lambda line: line.split("]")[0]):
        print(line)
    downstream = sorted(i for i in seen if i != "ready")
    print("downstream saw:", *downstream)
    ok = downstream == ids and bodies == [f"order placed by request {i}\n" for i in ids]
    for request_id in ids:
        mine = [line for line in lines if line.startswith(f"[{request_id}] ")]
        ok = ok and len(mine) == 3
    ok = ok and len(lines) == 3 * len(ids)
    if not ok:
        print("MISMATCH", lines, downstream, bodies, file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
