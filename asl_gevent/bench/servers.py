"""WSGI servers under load: gunicorn and pywsgi, with and without us."""

from __future__ import annotations

import importlib.util
import json
import os
import select
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Sequence, Tuple

from .._hooks import install, uninstall
from ._core import (Options, Processes, Row, Target, free_port, output_of, skip,
                    wait_listening)

# -- WSGI servers under load ---------------------------------------------------------

__all__ = ["hello_app", "plain_app", "middleware_app", "watched_app", "wsgi_rows", "client_main"]


def hello_app(environ: Dict[str, Any], start_response: Callable[..., Any]) -> List[bytes]:
    """The small WSGI app the server figures load."""
    body = b"Hello, World!\n"
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(body)))])
    return [body]


def plain_app() -> Callable[..., Any]:
    """gunicorn app factory for the baseline: the bare app, no hooks.

    gunicorn's worker runs ``monkey.patch_all()`` before loading the app, and
    the gevent plugin entry point installs the hooks there; the baseline is
    gevent without them.
    """
    uninstall()
    return hello_app


def middleware_app() -> Callable[..., Any]:
    """gunicorn app factory for the subject: the app in RequestContextMiddleware."""
    from ..wsgi import RequestContextMiddleware

    install()
    return RequestContextMiddleware(hello_app)


def watched_app() -> Callable[..., Any]:
    """gunicorn app factory: the middleware with the leak watch on (5 s).

    Its baseline is :func:`middleware_app`, so the figure is what the watch
    alone costs per request (SPEC: at most 3% of the server's CPU).
    """
    from ..wsgi import RequestContextMiddleware

    install()
    return RequestContextMiddleware(hello_app, leak_watch=5)


# pywsgi sends the headers and the body in two writes; with Nagle on, the body
# waits for the client's delayed ACK (40 ms on Linux) and both servers would
# measure only that. Accepted sockets inherit TCP_NODELAY from the listener.
_PYWSGI_SERVER = """
from gevent import monkey
monkey.patch_all()
import socket, sys
from gevent.pywsgi import WSGIServer
from asl_gevent.bench.servers import middleware_app, plain_app
app = middleware_app() if sys.argv[2] == "asl" else plain_app()
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
listener.bind(("127.0.0.1", int(sys.argv[1])))
listener.listen(128)
WSGIServer(listener, app, log=None).serve_forever()
"""


class _Client:
    """The load generator: a gevent keep-alive HTTP client in its own process."""

    def __init__(self, procs: Processes) -> None:
        self.proc = procs.start([sys.executable, "-m", "asl_gevent.bench", "--_client"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def load(self, port: int, connections: int, seconds: float, max_requests: int,
             ) -> Tuple[int, float, int]:
        """Load ``port`` for *seconds*; ``(requests, elapsed, errors)``."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{port} {connections} {seconds} {max_requests}\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], seconds + 60)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            raise RuntimeError(f"load client gave no answer:\n{output_of(self.proc)}")
        result = json.loads(line)
        return int(result["requests"]), float(result["seconds"]), int(result["errors"])


def _cpu_seconds(session: int) -> float:
    """CPU time (user + system) used so far by the processes of *session*.

    A server's processes (gunicorn's arbiter and worker) share the session
    we started them in; only live processes count, which is all of them
    while a figure runs.
    """
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", encoding="ascii") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[3]) == session:
            total += int(fields[11]) + int(fields[12])
    return total / tick


@dataclass
class _Load:
    """Per-round results of one server: wall-clock and CPU-time rates."""

    rates: List[float] = field(default_factory=list)
    cpu_rates: List[float] = field(default_factory=list)


def _load_rounds(client: _Client, servers: Sequence[Tuple[subprocess.Popen[str], int]],
                 opts: Options) -> Tuple[List[_Load], int]:
    """Load each server in turn, alternating the order every round."""
    for _, port in servers:  # warm up every server
        client.load(port, opts.connections, min(0.5, opts.load_s), opts.max_requests)
    loads = [_Load() for _ in servers]
    errors = 0
    for i in range(opts.rounds):
        order = list(zip(servers, loads))
        if i % 2:
            order.reverse()
        for (proc, port), load in order:
            cpu = _cpu_seconds(proc.pid)
            count, elapsed, errs = client.load(port, opts.connections, opts.load_s,
                                               opts.max_requests)
            cpu = _cpu_seconds(proc.pid) - cpu
            errors += errs
            load.rates.append(count / elapsed if elapsed > 0 else 0.0)
            load.cpu_rates.append(count / cpu if cpu > 0 else 0.0)
    return loads, errors


def _no_control_socket() -> List[str]:
    """gunicorn >= 25.1 opens a control socket under the home folder unless
    told not to; 23.0 (the oldest we support) refuses the flag."""
    import gunicorn.config

    flags = {flag for setting in gunicorn.config.KNOWN_SETTINGS for flag in setting.cli or ()}
    return ["--no-control-socket"] if "--no-control-socket" in flags else []


def _gunicorn_argv(worker: str, app: str, port: int) -> List[str]:
    return [sys.executable, "-m", "gunicorn", "-k", worker, "-w", "1",
            "-b", f"127.0.0.1:{port}", *_no_control_socket(), "--log-level", "warning",
            "--graceful-timeout", "5", app]


def wsgi_rows(opts: Options, wanted: Callable[[str], bool]) -> Iterator[Row]:
    target = Target(">=", 0.97)
    servers: List[Tuple[str, str, Callable[[int], List[str]], Callable[[int], List[str]]]] = [
        ("wsgi/gunicorn",
         "gunicorn -k asl_gevent.gunicorn.GeventWorker + middleware vs -k gevent",
         lambda port: _gunicorn_argv("gevent", "asl_gevent.bench.servers:plain_app()", port),
         lambda port: _gunicorn_argv("asl_gevent.gunicorn.GeventWorker",
                                     "asl_gevent.bench.servers:middleware_app()", port)),
        ("wsgi/leak_watch", "the same gunicorn worker + middleware, leak watch on (5 s) vs off",
         lambda port: _gunicorn_argv("asl_gevent.gunicorn.GeventWorker",
                                     "asl_gevent.bench.servers:middleware_app()", port),
         lambda port: _gunicorn_argv("asl_gevent.gunicorn.GeventWorker",
                                     "asl_gevent.bench.servers:watched_app()", port)),
        ("wsgi/pywsgi", "pywsgi.WSGIServer: hooks + middleware vs neither",
         lambda port: [sys.executable, "-c", _PYWSGI_SERVER, str(port), "plain"],
         lambda port: [sys.executable, "-c", _PYWSGI_SERVER, str(port), "asl"]),
    ]
    for name, what, base_argv, subj_argv in servers:
        cpu_name = name + "_cpu"
        if not (wanted(name) or wanted(cpu_name)):
            continue
        if name != "wsgi/pywsgi" and importlib.util.find_spec("gunicorn") is None:
            # Say so, one line per figure, and go on with pywsgi, rather than
            # fail later with the server's "No module named gunicorn".
            for figure in (name, cpu_name):
                if wanted(figure):
                    skip(figure, "gunicorn not installed (pip install 'asl_gevent[gunicorn]')")
            continue
        procs = Processes()
        try:
            base_port, subj_port = free_port(), free_port()
            base = procs.start(base_argv(base_port))
            subj = procs.start(subj_argv(subj_port))
            wait_listening(base, base_port)
            wait_listening(subj, subj_port)
            client = _Client(procs)
            (base_load, subj_load), errors = _load_rounds(
                client, [(base, base_port), (subj, subj_port)], opts)
        finally:
            procs.stop_all()
        note = (f"{opts.connections} keep-alive connections, {opts.rounds} x {opts.load_s:g} s "
                "rounds per server, 1 worker process")
        if errors:
            note += f"; {errors} client errors"
        if wanted(name):
            yield Row(name, what + " (req/s)", "req/s", base_load.rates, subj_load.rates,
                      target, higher_is_better=True, note=note)
        if wanted(cpu_name):
            # Requests per CPU-second of the server's own processes: what the
            # server would serve with a core to itself, and much less swayed
            # than req/s by whatever else runs on a shared machine.
            yield Row(cpu_name, what + " (req per server CPU-s)", "req/CPU-s",
                      base_load.cpu_rates, subj_load.cpu_rates, target,
                      higher_is_better=True, note=note)


def client_main() -> None:
    """``--_client``: answer ``port connections seconds max_requests`` lines."""
    import gevent.socket

    request = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    for line in sys.stdin:
        port, connections, seconds, max_requests = line.split()
        address = ("127.0.0.1", int(port))
        limit = int(max_requests)
        done = [0, 0]  # requests, errors

        def connect() -> Any:
            sock = gevent.socket.create_connection(address)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock

        socks = [connect() for _ in range(int(connections))]
        start = time.perf_counter()
        deadline = start + float(seconds)

        def worker(sock: Any) -> None:
            buf = b""
            while done[0] < limit and time.perf_counter() < deadline:
                try:
                    sock.sendall(request)
                    while b"\r\n\r\n" not in buf:
                        chunk = sock.recv(65536)
                        if not chunk:
                            raise ConnectionError("server closed the connection")
                        buf += chunk
                    head, _, buf = buf.partition(b"\r\n\r\n")
                    length = 0
                    for header in head.split(b"\r\n")[1:]:
                        key, _, value = header.partition(b":")
                        if key.strip().lower() == b"content-length":
                            length = int(value)
                    while len(buf) < length:
                        chunk = sock.recv(65536)
                        if not chunk:
                            raise ConnectionError("server closed the connection")
                        buf += chunk
                    buf = buf[length:]
                    if not head.startswith(b"HTTP/1.1 200"):
                        raise ConnectionError(head.split(b"\r\n")[0].decode("latin-1"))
                    done[0] += 1
                except OSError:
                    done[1] += 1
                    sock.close()
                    sock, buf = connect(), b""
            sock.close()

        with gevent.Timeout(float(seconds) + 30, False):
            gevent.joinall([gevent.spawn(worker, s) for s in socks], raise_error=True)
        elapsed = time.perf_counter() - start
        print(json.dumps({"requests": done[0], "seconds": elapsed, "errors": done[1]}),
              flush=True)

