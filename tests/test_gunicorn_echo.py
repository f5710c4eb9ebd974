"""The echoed id under real gunicorn, eager and lazy start_response.

Under asl_gevent.gunicorn.GeventWorker the middleware adds the echoed header
to gunicorn's response after the app called start_response (0.3, cheaper
than wrapping start_response); with the stock worker it wraps start_response
as before. Either way: exactly one X-Request-ID, the app's own if it set one.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Tuple

import gevent.socket
import pytest

from test_gunicorn import PYWSGI_WORKER, WORKER, gunicorn

PATHS = ("/eager", "/lazy", "/own", "/lazy-own", "/lazy-empty")


def _get(port: int, path: str) -> Tuple[int, List[str], bytes]:
    """One request on a fresh connection: status, X-Request-ID values, body."""
    sock = gevent.socket.create_connection(("127.0.0.1", port), timeout=15)
    try:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                     f"X-Request-ID: c-{path[1:]}\r\n\r\n".encode())
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    finally:
        sock.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    ids = [line.split(":", 1)[1].strip() for line in lines[1:]
           if line.lower().startswith("x-request-id:")]
    return int(lines[0].split()[1]), ids, body


@pytest.mark.parametrize("worker", [WORKER, "gevent", PYWSGI_WORKER])
def test_exactly_one_echoed_id_eager_or_lazy(tmp_path: Path, worker: str) -> None:
    with gunicorn(tmp_path, worker=worker, app="tests.echo_app:app", workers=1) as port:
        seen = {path: _get(port, path) for path in PATHS}
    for path, (status, ids, body) in seen.items():
        assert status == 200
        assert ids == (["app-own"] if "own" in path else [f"c-{path[1:]}"]), path
        if path in ("/eager", "/lazy"):
            assert f"{path[1:]} c-{path[1:]}".encode() in body
