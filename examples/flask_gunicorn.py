"""A Flask app under gunicorn whose log lines all carry their request's id.

Serve it with the worker class that gives every request its own context::

    gunicorn -k asl_gevent.gunicorn.GeventWorker -w 2 examples.flask_gunicorn:app

``RequestContextMiddleware`` gives each request a store ``{"request_id": ...}``
(taken from the ``X-Request-ID`` header, or generated) and echoes the id in the
response; ``StoreFilter`` puts it on every log record, including records
logged by the greenlets, pool tasks and threads the view starts, which are
never passed the id.

Run as a script, it serves itself: it starts gunicorn on a free 127.0.0.1
port, sends four concurrent requests, stops gunicorn and prints what the
workers logged (the order varies from run to run; the ids never mix)::

    $ python examples/flask_gunicorn.py
    [req-1] GET /hello
    [req-1] pool task: rendering
    [req-1] thread: sending the audit event
    [req-2] GET /hello
    [req-2] pool task: rendering
    [req-2] thread: sending the audit event
    [req-1] greenlet: loading the profile
    [req-1] done
    [req-2] greenlet: loading the profile
    [req-2] done
    ...

It exits non-zero if a response or a log line carries another request's id.
"""

from __future__ import annotations

import logging.config
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import gevent
import gevent.pool
from flask import Flask

from asl_gevent.wsgi import RequestContextMiddleware, get_request_id

logging.config.dictConfig({
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"request": {"()": "asl_gevent.logfilter.StoreFilter"}},
    "formatters": {"plain": {"format": "[%(request_id)s] %(message)s"}},
    "handlers": {"stdout": {"class": "logging.StreamHandler", "stream": "ext://sys.stdout",
                            "filters": ["request"], "formatter": "plain"}},
    "loggers": {"example": {"handlers": ["stdout"], "level": "INFO", "propagate": False}},
})
log = logging.getLogger("example")

# Made at import time, as apps do; their workers serve every request.
pool = gevent.pool.Pool(10)
executor = ThreadPoolExecutor(max_workers=2)

flask_app = Flask(__name__)


def load_profile() -> None:
    gevent.sleep(0.05)  # stands for a database call: other requests run meanwhile
    log.info("greenlet: loading the profile")


@flask_app.get("/hello")
def hello() -> str:
    log.info("GET /hello")
    profile = gevent.spawn(load_profile)
    page = pool.spawn(log.info, "pool task: rendering")
    audit = threading.Thread(target=log.info, args=("thread: sending the audit event",))
    audit.start()
    metrics = executor.submit(get_request_id)  # the executor's task sees the id too
    gevent.joinall([profile, page])
    audit.join()
    log.info("done")
    return f"hello from request {metrics.result()}\n"


app = RequestContextMiddleware(flask_app)


# -- the script: serve this app with gunicorn and talk to it -------------------


def _no_control_socket() -> list[str]:
    """gunicorn 25.1+ opens a control socket under the home folder unless told
    not to; 23.0 (the oldest we support) has no such flag and would exit on it."""
    import gunicorn.config

    flags = {flag for setting in gunicorn.config.KNOWN_SETTINGS for flag in setting.cli or ()}
    return ["--no-control-socket"] if "--no-control-socket" in flags else []


def main() -> int:
    import os
    import signal
    import socket
    import subprocess
    import sys
    import tempfile
    import time
    import urllib.request
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "-m", "gunicorn", "-k", "asl_gevent.gunicorn.GeventWorker",
               "-w", "2", "-b", f"127.0.0.1:{port}", "--chdir", str(root), *_no_control_socket(),
               "--log-level", "warning", "examples.flask_gunicorn:app"]
    url = f"http://127.0.0.1:{port}/hello"
    ids = [f"req-{n}" for n in range(1, 5)]

    def fetch(request_id: str) -> Any:
        request = urllib.request.Request(url, headers={"X-Request-ID": request_id})
        with urllib.request.urlopen(request, timeout=10) as response:
            return request_id, response.headers["X-Request-ID"], response.read().decode()

    with tempfile.TemporaryFile() as output:
        server = subprocess.Popen(command, cwd=str(root), env=env,
                                  stdout=output, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 30
            while True:  # wait until gunicorn answers (bounded)
                try:
                    fetch("ready")
                    break
                except OSError:
                    if server.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError("gunicorn did not start") from None
                    time.sleep(0.1)
            with ThreadPoolExecutor(max_workers=len(ids)) as clients:
                responses = list(clients.map(fetch, ids))
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(timeout=5)
        output.seek(0)
        lines = output.read().decode(errors="replace").splitlines()

    logged = [line for line in lines if line.startswith("[") and not line.startswith("[ready]")]
    for line in logged:
        print(line)

    ok = True
    for request_id, echoed, body in responses:
        if echoed != request_id or body != f"hello from request {request_id}\n":
            print(f"MISMATCH: {request_id} got header {echoed!r}, body {body!r}",
                  file=sys.stderr)
            ok = False
    per_request = 5  # GET, greenlet, pool task, thread, done
    for request_id in ids:
        mine = [line for line in logged if line.startswith(f"[{request_id}] ")]
        if len(mine) != per_request:
            print(f"MISMATCH: {request_id} has {len(mine)} log lines, not {per_request}",
                  file=sys.stderr)
            ok = False
    if len(logged) != per_request * len(ids):
        print("MISMATCH: log lines with foreign or missing ids:\n" + "\n".join(lines),
              file=sys.stderr)
        ok = False
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
