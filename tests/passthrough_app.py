"""A WSGI app for tests/test_wsgi.py's gunicorn tests: what the middleware must pass through.

``/handled`` takes over the socket (writes its own response on
``environ["gunicorn.socket"]``) and returns gunicorn's ``ALREADY_HANDLED``;
``/file`` returns a ``wsgi.file_wrapper`` response (gunicorn sends it with
``sendfile``); ``/peek`` answers the readiness probe. Never imported by pytest.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, Iterable

from gunicorn.workers.base_async import ALREADY_HANDLED

from asl_gevent.wsgi import RequestContextMiddleware, get_request_id

FILE = __file__


def _app(environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    path = environ["PATH_INFO"]
    if path == "/handled":
        body = f"handled {get_request_id()}".encode()
        environ["gunicorn.socket"].sendall(
            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s"
            % (len(body), body))
        return ALREADY_HANDLED  # type: ignore[no-any-return]
    if path == "/file":
        start_response("200 OK", [("Content-Length", str(os.path.getsize(FILE)))])
        return environ["wsgi.file_wrapper"](open(FILE, "rb"))  # type: ignore[no-any-return]
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
    return [b"ok"]


app = RequestContextMiddleware(_app)
