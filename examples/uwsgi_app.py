"""A WSGI app under uWSGI ``--gevent`` whose log lines all carry their request's id.

Serve it with uWSGI's gevent loop engine (``pip install pyuwsgi`` gives a
``uwsgi`` command with it built in)::

    uwsgi --master --processes 2 --gevent 100 --gevent-monkey-patch \\
          --http-socket 127.0.0.1:8000 --need-app \\
          --wsgi-file examples/uwsgi_app.py --callable application

* ``--gevent-monkey-patch`` makes uWSGI call ``monkey.patch_all()`` before it
  imports this file; asl_gevent's gevent plugin installs the propagation
  hooks right then. (Without the option, call ``monkey.patch_all()`` as the
  first line of this file instead.) The explicit ``asl_gevent.install()``
  below is idempotent; it makes the order plain to a reader.
* :class:`~asl_gevent.wsgi.RequestContextMiddleware` gives each request a
  store ``{"request_id": ...}``, from ``X-Request-ID`` or generated, and
  echoes it. uWSGI runs every request in a new greenlet spawned by its hub,
  so a request never sees the store of the one before it on the same async
  core, with or without the middleware.
* ``leak_watch=5`` logs, on ``asl_gevent.leak``, any greenlet or thread still
  holding a request's store 5 seconds after the request ended (or leave the
  argument out and set ``ASL_GEVENT_LEAK_WATCH=5`` with ``--env``).
* Each worker installs the run-info dump after uWSGI forks it:
  ``kill -PWR <worker pid>`` prints every greenlet with the stores it holds
  to the worker's stderr. (uWSGI owns ``SIGUSR1``, ``SIGUSR2``, ``SIGHUP``,
  ``SIGINT``, ``SIGTERM``, ``SIGQUIT``, ``SIGTSTP`` and ``SIGWINCH``.)

Stop uWSGI with ``SIGINT`` or ``SIGQUIT``: ``SIGTERM`` makes its master reload.

Run as a script, it serves itself: it starts uWSGI on a free 127.0.0.1 port,
sends four concurrent requests, stops uWSGI and prints what the workers
logged (the order varies from run to run; the ids never mix)::

    $ python examples/uwsgi_app.py
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

# -- the app (what you copy)
from __future__ import annotations

import logging.config
import os
import threading
from typing import Any, Callable, Dict, Iterable, List

import gevent
import gevent.pool

import asl_gevent
from asl_gevent.debug import install_signal_handler
from asl_gevent.wsgi import RequestContextMiddleware, get_request_id

asl_gevent.install()  # first thing, before anything spawns (a no-op if the plugin did it)

logging.config.dictConfig({
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"request": {"()": "asl_gevent.logfilter.StoreFilter"}},
    "formatters": {"plain": {"format": "[%(request_id)s] %(message)s"}},
    "handlers": {"stdout": {"class": "logging.StreamHandler", "stream": "ext://sys.stdout",
                            "filters": ["request"], "formatter": "plain"}},
    "loggers": {"example": {"handlers": ["stdout"], "level": "INFO", "propagate": False},
                "asl_gevent.leak": {"handlers": ["stdout"], "level": "WARNING"}},
})
log = logging.getLogger("example")

# Made at import time, in uWSGI's master; every worker forked from it uses it.
pool = gevent.pool.Pool(10)

try:  # only inside uWSGI
    from uwsgidecorators import postfork  # type: ignore[import-untyped]
except ImportError:
    pass
else:
    @postfork  # type: ignore[untyped-decorator]
    def _run_info_on_sigpwr() -> None:
        # In each worker (and each recycled one), after the fork: kill -PWR <pid>.
        install_signal_handler()


def load_profile() -> None:
    gevent.sleep(0.05)  # stands for a database call: other requests run meanwhile
    log.info("greenlet: loading the profile")


def hello(environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    log.info("GET %s", environ.get("PATH_INFO", "/"))
    profile = gevent.spawn(load_profile)
    page = pool.spawn(log.info, "pool task: rendering")
    audit = threading.Thread(target=log.info, args=("thread: sending the audit event",))
    audit.start()  # a greenlet under monkey-patching: it sees the id too
    gevent.joinall([profile, page])
    audit.join()
    log.info("done")
    body = f"hello from request {get_request_id()}\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


application = RequestContextMiddleware(hello, leak_watch=5)


# -- the script: serve this app with uWSGI and talk to it -----------------------


def main() -> int:
    import shutil
    import signal
    import socket
    import subprocess
    import sys
    import tempfile
    import time
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path

    uwsgi = shutil.which("uwsgi", path=os.path.dirname(sys.executable)) or shutil.which("uwsgi")
    if uwsgi is None:
        print("uwsgi not found: pip install pyuwsgi", file=sys.stderr)
        return 2
    root = Path(__file__).resolve().parent.parent
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    command = [uwsgi, "--master", "--processes", "2", "--gevent", "100", "--gevent-monkey-patch",
               "--http-socket", f"127.0.0.1:{port}", "--need-app", "--disable-logging",
               "--wsgi-file", str(Path(__file__).resolve()), "--callable", "application"]
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
            while True:  # wait until uWSGI answers (bounded)
                try:
                    fetch("ready")
                    break
                except OSError:
                    if server.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError("uWSGI did not start") from None
                    time.sleep(0.1)
            with ThreadPoolExecutor(max_workers=len(ids)) as clients:
                responses = list(clients.map(fetch, ids))
        finally:
            server.send_signal(signal.SIGINT)  # SIGTERM would make the master reload
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(timeout=5)
        output.seek(0)
        lines = output.read().decode(errors="replace").splitlines()

    logged: List[str] = [line for line in lines
                         if line.startswith("[") and not line.startswith("[ready]")]
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
