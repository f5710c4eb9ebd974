"""The WSGI app tests/test_leak_watch.py serves with a real gunicorn.

Never imported by pytest itself: gunicorn workers import it after their
``monkey.patch_all()``, so ``threading.Thread`` here is a greenlet.

``/work``: fire-and-forget work that ends (a greenlet and a thread, a few
milliseconds). ``/leak``: the same, plus a greenlet and a thread that never
end, named after the request id, as a lazily started library worker would.
``/peek``: readiness. ``app`` has the middleware (which reads
``ASL_GEVENT_LEAK_WATCH``); ``bare_app`` sets its own store with
``enter_with``, for the worker class's own watch.

What the leak watch logs goes to ``$ASL_TEST_LOG_DIR/leak-<pid>.log``.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any, Callable, Dict, Iterable

import gevent
import gevent.event

from asl_gevent.wsgi import RequestContextMiddleware, get_request_id, request_storage

_log_dir = os.environ.get("ASL_TEST_LOG_DIR")
if _log_dir:
    _handler = logging.FileHandler(os.path.join(_log_dir, f"leak-{os.getpid()}.log"))
    _handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logging.getLogger("asl_gevent.leak").addHandler(_handler)

_never = gevent.event.Event()


def _short_work() -> None:
    gevent.sleep(0.005)


def _serve(environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    path = environ.get("PATH_INFO", "")
    request_id = get_request_id() or "-"
    gevent.spawn(_short_work)
    threading.Thread(target=_short_work).start()
    if path == "/leak":
        leaker = gevent.spawn(_never.wait)
        leaker.name = f"leaker-greenlet-{request_id}"
        threading.Thread(target=_never.wait, name=f"leaker-thread-{request_id}",
                         daemon=True).start()
    body = request_id.encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


app = RequestContextMiddleware(_serve)


def bare_app(environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    request_storage.enter_with({"request_id": environ.get("HTTP_X_REQUEST_ID", "-")})
    return _serve(environ, start_response)
