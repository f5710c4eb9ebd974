"""What real servers make of a repeated ``X-Request-ID`` and of its ``X_Request_ID`` twin.

The middleware sees only the WSGI environ, where each server has already
folded the request's header lines into one ``HTTP_X_REQUEST_ID``.
``docs/security/incoming.rst`` ("Repeated headers and look-alike names")
says what pywsgi, gunicorn and uWSGI do; these tests hold the servers to it,
so the page changes when a server does. uWSGI is the one that maps the
twin onto the id header: a deliberate, documented limit (the environ cannot
tell them apart).

Each server is a real process on an ephemeral 127.0.0.1 port serving
``tests/echo_app.py`` (the body says the request's id), stopped by pid.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, List

import pytest

from helpers import ROOT, free_port, gunicorn_no_control_socket, server_env, stop_by_pid

BIN = os.path.dirname(sys.executable)
GENERATED = re.compile(r"[0-9a-f]{32}")


def _command(server: str, port: int) -> List[str]:
    if server == "pywsgi":
        return [sys.executable, "-c",
                "from gevent import monkey; monkey.patch_all()\n"
                "from gevent.pywsgi import WSGIServer\n"
                "from echo_app import app\n"
                f"WSGIServer(('127.0.0.1', {port}), app, log=None).serve_forever()\n"]
    if server == "gunicorn":
        return [os.path.join(BIN, "gunicorn"), "-k", "asl_gevent.gunicorn.GeventWorker",
                "-w", "1", "-b", f"127.0.0.1:{port}", *gunicorn_no_control_socket(),
                "echo_app:app"]
    return [os.path.join(BIN, "uwsgi"), "--master", "--processes", "1", "--gevent", "10",
            "--http-socket", f"127.0.0.1:{port}", "--need-app", "--disable-logging",
            "--wsgi-file", str(ROOT / "tests" / "echo_app.py"), "--callable", "app"]


def _get(port: int, lines: bytes) -> str:
    """One raw GET with *lines* as extra header lines; the id the app saw."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(b"GET /x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n" + lines + b"\r\n")
        data = b""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), data[:300]
    return body.decode().rsplit(" ", 1)[-1]


@contextlib.contextmanager
def _serving(server: str, tmp_path: Path) -> Iterator[int]:
    if server == "uwsgi" and not os.path.exists(os.path.join(BIN, "uwsgi")):
        pytest.skip("uwsgi is not installed in this virtualenv")
    port = free_port()
    output = tmp_path / f"{server}.out"
    with open(output, "wb") as out:
        proc = subprocess.Popen(_command(server, port), cwd=str(tmp_path), env=server_env(),
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                _get(port, b"")
                break
            except (OSError, AssertionError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"{server} not ready:\n{output.read_text(errors='replace')}")
                time.sleep(0.1)
        yield port
    finally:
        # uWSGI's master reloads on SIGTERM; SIGINT stops every one of them.
        stop_by_pid(proc, signal.SIGINT, timeout=20)


@pytest.mark.skipif(shutil.which("gunicorn", path=BIN) is None, reason="needs gunicorn")
@pytest.mark.parametrize("server", ["pywsgi", "gunicorn", "uwsgi"])
def test_repeated_id_headers_and_the_underscore_twin(server: str, tmp_path: Path) -> None:
    """Two ``X-Request-ID`` lines are joined with a comma on every server, so
    neither is adopted; ``X_Request_ID`` is dropped by pywsgi and gunicorn
    and adopted by uWSGI (alone), or spoils the id header beside it there."""
    with _serving(server, tmp_path) as port:
        duplicate = _get(port, b"X-Request-ID: first\r\nX-Request-ID: second\r\n")
        twin = _get(port, b"X_Request_ID: spoof\r\n")
        both = _get(port, b"X-Request-ID: proxy\r\nX_Request_ID: spoof\r\n")
    assert GENERATED.fullmatch(duplicate), duplicate
    if server == "uwsgi":
        assert twin == "spoof"
        assert GENERATED.fullmatch(both), both
    else:
        assert GENERATED.fullmatch(twin), twin
        assert both == "proxy"
