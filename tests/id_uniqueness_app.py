"""A WSGI app for tests/test_id_uniqueness.py: answers ``<request id> <pid>``.

The middleware generates every id (the clients send none). Imported by a
uWSGI master before it forks its workers from C (its default), or by each
worker (``--lazy-apps``), or by gunicorn.
"""

import os
from typing import Any, Callable, Dict, List

from asl_gevent.wsgi import RequestContextMiddleware, get_request_id


def _app(environ: Dict[str, Any], start_response: Callable[..., Any]) -> List[bytes]:
    body = f"{get_request_id()} {os.getpid()}".encode()
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(body)))])
    return [body]


application = app = RequestContextMiddleware(_app)
