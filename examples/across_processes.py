"""One request id across three processes: gunicorn front, pywsgi service, Celery worker.

The front service (real gunicorn, ``-k asl_gevent.gunicorn.GeventWorker -w 2``)
handles ``GET /order/<n>``: it spawns one greenlet that asks the stock
service (a ``gevent.pywsgi`` server in its own process) over ``requests``,
and one that queues a Celery task and a chain of two more (a real ``celery
worker -P gevent`` on a throwaway ``redis-server``). Nobody passes the id
along by hand:

- ``asl_gevent.http.install()`` adds ``X-Request-ID`` to the outgoing call,
  and the stock service's middleware takes it up;
- ``asl_gevent.celery.install(celery_app)`` carries the store into the tasks,
  and :data:`asl_gevent.celery.task_storage` gives each task its own and its
  parent's task id;
- :class:`~asl_gevent.logfilter.StoreFilter` on each process's handler puts
  the ids on every line. All processes append to one log file, which this
  script prints grouped by request id::

    $ python examples/across_processes.py
    == req-1
    front     GET /order/1
    front     asking the stock service for order 1
    stock     GET /stock/1
    worker    send receipt for order 1                  task=cf130689 parent=-
    worker    reserve stock for order 1                 task=0d8f02ef parent=-
    front     queued receipt and reserve|charge for order 1
    worker    charge order 1                            task=12f0958c parent=0d8f02ef
    == req-2
    ...
    == -   (queued outside any request)
    worker    nightly report -1                         task=340262fb parent=-

``--requests N --clients C --summary`` turns it into a load check (prints
JSON counts of lines with the right id, a wrong one, or none);
``--without-integration`` is the negative control. Needs ``redis-server``
on the PATH (Debian: ``apt-get install redis-server``) and the ``http`` and
``celery`` extras.
"""

from __future__ import annotations

import sys

if __name__ == "__main__" and "--serve-stock" in sys.argv:
    # The stock service is a classic patched gevent program: patch first.
    from gevent import monkey
    monkey.patch_all()

import argparse
import concurrent.futures
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional

from celery import Celery, chain
from celery import signals as celery_signals

import asl_gevent.celery
import asl_gevent.http
from asl_gevent.celery import task_storage
from asl_gevent.logfilter import StoreFilter
from asl_gevent.wsgi import RequestContextMiddleware

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
INTEGRATION = os.environ.get("ASL_EXAMPLE_INTEGRATION", "1") != "0"
ROLE = os.environ.get("ASL_EXAMPLE_ROLE", "main")

# -- every process: one log file, ids on every line ------------------------------

log = logging.getLogger("shop")
log.setLevel(logging.INFO)
log.propagate = False
if os.environ.get("ASL_EXAMPLE_LOG"):
    _handler = logging.FileHandler(os.environ["ASL_EXAMPLE_LOG"])
    _handler.addFilter(StoreFilter())  # request_id
    _handler.addFilter(StoreFilter(task_storage, fields=("task_id", "parent_task_id")))
    _handler.setFormatter(logging.Formatter(
        f"%(request_id)s|{ROLE}|%(task_id)s|%(parent_task_id)s|%(message)s"))
    log.addHandler(_handler)

# -- the Celery app (front publishes, worker runs) -------------------------------

celery_app = Celery("shop", broker=os.environ.get("ASL_EXAMPLE_BROKER", "redis://127.0.0.1:6379/0"))
celery_app.conf.update(worker_hijack_root_logger=False, broker_connection_retry_on_startup=True,
                       task_ignore_result=True, worker_prefetch_multiplier=4)
if INTEGRATION:
    asl_gevent.celery.install(celery_app)
    asl_gevent.http.install()


@celery_signals.worker_ready.connect
def _ready(**kwargs: Any) -> None:
    if os.environ.get("ASL_EXAMPLE_READY"):
        Path(os.environ["ASL_EXAMPLE_READY"]).touch()


@celery_app.task(name="send_receipt")
def send_receipt(n: int) -> None:
    log.info("send receipt for order %d", n)


@celery_app.task(name="reserve")
def reserve(n: int) -> int:
    log.info("reserve stock for order %d", n)
    return n


@celery_app.task(name="charge")
def charge(n: int) -> None:
    log.info("charge order %d", n)


@celery_app.task(name="nightly_report")
def nightly_report(n: int) -> None:
    log.info("nightly report %d", n)


# -- the front service (gunicorn) and the stock service (pywsgi) ----------------

def _front(environ: Dict[str, Any], start_response: Callable[..., Any]) -> List[bytes]:
    import gevent
    import requests

    n = int(environ["PATH_INFO"].rsplit("/", 1)[1])
    log.info("GET /order/%d", n)

    def ask_stock() -> None:
        log.info("asking the stock service for order %d", n)
        requests.get(f"{os.environ['ASL_EXAMPLE_STOCK']}/stock/{n}", timeout=30).raise_for_status()

    def queue() -> None:
        send_receipt.delay(n)
        chain(reserve.s(n), charge.s()).delay()
        log.info("queued receipt and reserve|charge for order %d", n)

    gevent.joinall([gevent.spawn(ask_stock), gevent.spawn(queue)], raise_error=True)
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "3")])
    return [b"ok\n"]


def _stock(environ: Dict[str, Any], start_response: Callable[..., Any]) -> List[bytes]:
    n = int(environ["PATH_INFO"].rsplit("/", 1)[1])
    log.info("GET /stock/%d", n)
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "3")])
    return [b"42\n"]


front_app = RequestContextMiddleware(_front)
stock_app = RequestContextMiddleware(_stock)


def serve_stock(port: int) -> None:
    """The stock service: gevent.pywsgi in a process of its own (patched above)."""
    from gevent.pywsgi import WSGIServer
    WSGIServer(("127.0.0.1", port), stock_app, log=None).serve_forever()


# -- the orchestration (main process) --------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _no_control_socket() -> List[str]:
    """gunicorn 25.1+ opens a control socket unless told not to; 23.0 (the
    oldest we support) has no such flag and would exit on it."""
    import gunicorn.config

    flags = {flag for setting in gunicorn.config.KNOWN_SETTINGS for flag in setting.cli or ()}
    return ["--no-control-socket"] if "--no-control-socket" in flags else []


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.05)


def _listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
        return True
    return False


@contextlib.contextmanager
def _process(args: List[str], env: Dict[str, str], out: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Start *args* in its own session; stop it (and its children) by pid."""
    with open(out, "ab") as sink:
        proc = subprocess.Popen(args, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                cwd=str(HERE), start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def _get(port: int, path: str, request_id: str) -> None:
    with socket.create_connection(("127.0.0.1", port), 30) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Request-ID: {request_id}\r\n"
                  f"Connection: close\r\n\r\n".encode())
        response = b""
        while chunk := s.recv(65536):
            response += chunk
    if not response.startswith(b"HTTP/1.1 200"):
        raise SystemExit(f"{path}: {response[:200]!r}")


def _read(log_path: Path) -> List[List[str]]:
    if not log_path.exists():
        return []
    return [line.split("|", 4) for line in log_path.read_text().splitlines()]


def run(requests: int, clients: int, outside: int,
        timing: Dict[str, float]) -> List[List[str]]:
    """Start everything, send the requests, wait for every task; return the log
    (and the seconds each phase took in *timing*)."""
    if shutil.which("redis-server") is None:
        raise SystemExit("this example needs redis-server (Debian: apt-get install redis-server)")
    workdir = Path(tempfile.mkdtemp(prefix="asl-across-"))
    try:
        redis_port, front_port, stock_port = _free_port(), _free_port(), _free_port()
        log_path = workdir / "shop.log"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(HERE)]),
                   ASL_EXAMPLE_LOG=str(log_path),
                   ASL_EXAMPLE_BROKER=f"redis://127.0.0.1:{redis_port}/0",
                   ASL_EXAMPLE_STOCK=f"http://127.0.0.1:{stock_port}",
                   ASL_EXAMPLE_READY=str(workdir / "worker.ready"))
        os.environ.update(ASL_EXAMPLE_BROKER=env["ASL_EXAMPLE_BROKER"])
        celery_app.conf.broker_url = env["ASL_EXAMPLE_BROKER"]
        with contextlib.ExitStack() as stack:
            stack.enter_context(_process(
                ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", str(workdir)], env, workdir / "redis.out"))
            _wait(lambda: _listening(redis_port), 15, "redis-server")
            stack.enter_context(_process(
                [sys.executable, __file__, "--serve-stock", str(stock_port)],
                dict(env, ASL_EXAMPLE_ROLE="stock"), workdir / "stock.out"))
            worker_out = workdir / "worker.out"
            stack.enter_context(_process(
                [sys.executable, "-m", "celery", "-A", "across_processes:celery_app", "worker",
                 "-P", "gevent", "-c", "50", "--without-heartbeat", "--without-mingle",
                 "--without-gossip", "-l", "WARNING"],
                dict(env, ASL_EXAMPLE_ROLE="worker"), worker_out))
            stack.enter_context(_process(
                [sys.executable, "-m", "gunicorn", "-k", "asl_gevent.gunicorn.GeventWorker",
                 "-w", "2", "-b", f"127.0.0.1:{front_port}", *_no_control_socket(),
                 "across_processes:front_app"],
                dict(env, ASL_EXAMPLE_ROLE="front"), workdir / "front.out"))
            _wait(lambda: _listening(stock_port) and _listening(front_port), 30, "the services")
            _wait((workdir / "worker.ready").exists, 60, "the worker")
            started = time.monotonic()

            with concurrent.futures.ThreadPoolExecutor(clients) as pool:
                list(pool.map(lambda n: _get(front_port, f"/order/{n}", f"req-{n}"),
                              range(1, requests + 1)))
            for n in range(outside):  # queued outside any request: no id
                nightly_report.delay(-1 - n)
            served = time.monotonic()
            expected_tasks = 3 * requests + outside
            _wait(lambda: sum(role == "worker" for _, role, *_ in _read(log_path))
                  >= expected_tasks, 60, f"{expected_tasks} task log lines")
            timing["requests_s"] = round(served - started, 1)
            timing["tasks_after_s"] = round(time.monotonic() - served, 1)
            return _read(log_path)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def check(lines: Iterable[List[str]]) -> Dict[str, Dict[str, int]]:
    """Per role: lines with their request's id, with another id, with none."""
    counts: Dict[str, Dict[str, int]] = defaultdict(lambda: {"ok": 0, "wrong": 0, "missing": 0})
    for request_id, role, _, _, message in lines:
        n = int(re.findall(r"-?\d+", message)[-1])
        expected = f"req-{n}" if n > 0 else "-"
        if request_id == expected:
            counts[role]["ok"] += 1
        elif request_id == "-" or not request_id.startswith("req-"):
            counts[role]["missing"] += 1
        else:
            counts[role]["wrong"] += 1
    return dict(counts)


def show(lines: List[List[str]]) -> None:
    groups: Dict[str, List[List[str]]] = defaultdict(list)
    for line in lines:
        groups[line[0]].append(line)
    for request_id in sorted(groups, key=lambda i: (i == "-", len(i), i)):
        print(f"== {request_id}" + ("   (queued outside any request)" if request_id == "-" else ""))
        for _, role, task_id, parent, message in groups[request_id]:
            ids = f"  task={task_id[:8]} parent={parent[:8]}" if role == "worker" else ""
            print(f"{role:<9} {message:<40}{ids}".rstrip())


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--outside", type=int, default=1, help="tasks queued outside a request")
    parser.add_argument("--summary", action="store_true", help="print JSON counts only")
    parser.add_argument("--without-integration", action="store_true",
                        help="negative control: asl_gevent.http/celery not installed")
    parser.add_argument("--serve-stock", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_stock:
        serve_stock(args.serve_stock)
        return 0
    if args.without_integration:
        os.environ["ASL_EXAMPLE_INTEGRATION"] = "0"
    timing: Dict[str, float] = {}
    lines = run(args.requests, args.clients, args.outside, timing)
    if args.summary:
        print(json.dumps({"lines": check(lines), "seconds": timing}, sort_keys=True))
    else:
        show(lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
