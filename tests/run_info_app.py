"""The WSGI app tests/test_leak_watch.py serves with a real gunicorn or uWSGI
to check the run-info signal handler against the servers' own signals.

Never imported by pytest itself. At import -- in the worker, after the
server set its own signal handlers -- it calls
:func:`asl_gevent.debug.install_signal_handler` with the signal named in
``$ASL_TEST_SIGNAL`` (the default when empty), as a user's app module does.

``/hold`` leaves a greenlet holding the request's store (so a dump shows it);
``/pid`` answers the worker's pid; anything else answers its request id.
"""

from __future__ import annotations

import os
import signal
from typing import Any, Callable, Dict, Iterable

import gevent
import gevent.event

from asl_gevent.debug import install_signal_handler
from asl_gevent.wsgi import RequestContextMiddleware, get_request_id

_name = os.environ.get("ASL_TEST_SIGNAL", "")
if _name:
    install_signal_handler(getattr(signal, _name))
else:
    install_signal_handler()

_never = gevent.event.Event()


def _serve(environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    path = environ.get("PATH_INFO", "")
    if path == "/hold":
        gevent.spawn(_never.wait).name = f"held-by-{get_request_id()}"
    body = str(os.getpid()).encode() if path == "/pid" else (get_request_id() or "-").encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


app = RequestContextMiddleware(_serve)
