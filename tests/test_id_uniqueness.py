"""Generated request ids never repeat, in every process model.

0.2 drew ids from a private Mersenne Twister reseeded only by
``os.register_at_fork``; uWSGI's default preforking forks its workers from C,
where no at-fork handler runs, so workers (and their recycled successors)
shared one stream and ids repeated. Real servers here: uWSGI (pyuwsgi)
preforking with recycling, ``--lazy-apps`` and ``--gevent``; gunicorn with
``--preload`` and recycling; plus a C-level ``fork()`` and threads in-process.
Every server is a subprocess on 127.0.0.1, stopped by pid (uWSGI with SIGINT:
SIGTERM makes its master reload).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Dict, Iterator, List, Sequence, Tuple

import pytest

from helpers import ROOT, free_port, run_python, server_env, stop_by_pid

GENERATED = re.compile(r"[0-9a-f]{32}")
UWSGI = shutil.which("uwsgi", path=os.path.dirname(sys.executable)) or shutil.which("uwsgi")


def _get(port: int) -> Tuple[str, int]:
    """One request on a fresh connection. A worker that recycles under load
    may reset a connection it accepted but never served (gunicorn 23's
    gthread worker does): that request produced no id, so it is sent again,
    at most 3 times."""
    for attempt in range(3):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
        try:
            conn.request("GET", "/")
            response = conn.getresponse()
            body = response.read().decode()
            assert response.status == 200, body
            break
        except (ConnectionResetError, http.client.RemoteDisconnected):
            if attempt == 2:
                raise
        finally:
            conn.close()
    request_id, pid = body.split()
    return request_id, int(pid)


def _collect(port: int, n: int, clients: int = 8) -> List[Tuple[str, int]]:
    """*n* requests on fresh connections from *clients* threads (bounded)."""
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        return list(pool.map(lambda _: _get(port), range(n), timeout=300))


def _collect_until_recycled(port: int, n: int, min_pids: int,
                            limit: int = 8000, seconds: float = 120) -> List[Tuple[str, int]]:
    """At least *n* requests, in batches, until *min_pids* worker processes
    have answered (recycled workers take a moment to go): bounded by *limit*
    requests and *seconds*."""
    seen: List[Tuple[str, int]] = []
    deadline = time.monotonic() + seconds
    while len(seen) < limit and time.monotonic() < deadline:
        seen += _collect(port, 250)
        if len(seen) >= n and len({pid for _, pid in seen}) >= min_pids:
            break
        time.sleep(0.2)  # let the master notice a worker that is done
    return seen


def _wait_ready(port: int, proc: "subprocess.Popen[bytes]", output: Path,
                timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            _get(port)
            return
        except OSError:
            time.sleep(0.1)
    pytest.fail(f"server not ready (exit code {proc.poll()}):\n"
                f"{output.read_text(errors='replace')[-3000:]}")


@contextlib.contextmanager
def _server(command: Sequence[str], tmp_path: Path, port: int,
            stop: signal.Signals) -> Iterator[None]:
    output_path = tmp_path / "server.out"
    with open(output_path, "wb") as output:
        proc = subprocess.Popen(list(command), cwd=str(ROOT), env=server_env(),
                                stdout=output, stderr=subprocess.STDOUT)
        try:
            _wait_ready(port, proc, output_path)
            yield
        finally:
            stop_by_pid(proc, stop, timeout=20)


def _assert_unique(seen: List[Tuple[str, int]], n: int, min_pids: int) -> None:
    ids = [request_id for request_id, _ in seen]
    assert len(ids) >= n
    repeated = {i: c for i, c in Counter(ids).items() if c > 1}
    assert repeated == {}, f"{len(repeated)} ids repeated, e.g. {list(repeated.items())[:3]}"
    assert all(GENERATED.fullmatch(i) for i in ids)
    # The server did fork and recycle: several worker processes answered.
    assert len({pid for _, pid in seen}) >= min_pids


@pytest.mark.skipif(UWSGI is None, reason="needs pyuwsgi's uwsgi binary (test extra)")
@pytest.mark.parametrize("mode", [
    # uWSGI 2.0.30 recycles no worker younger than --min-worker-lifetime (10 s).
    # 400, not fewer: a master that respawns workers often sleeps 2 s ("worker
    # respawning too fast"); 2,000 requests still see 2 recycles per worker.
    ["--max-requests", "400", "--min-worker-lifetime", "0"],   # preforked from C, recycled
    ["--lazy-apps", "--max-requests", "400", "--min-worker-lifetime", "0"],  # imports per worker
    ["--gevent", "20", "--max-requests", "400", "--min-worker-lifetime", "0"],  # async cores
    ["--threads", "4"],                                # threads in each worker
], ids=["prefork", "lazy-apps", "gevent", "threads"])
def test_uwsgi_workers_never_repeat_generated_ids(tmp_path: Path, mode: List[str]) -> None:
    """2,000 or more requests without an id across 2 uWSGI workers and
    their recycled successors: every generated id distinct."""
    assert UWSGI is not None
    port = free_port()
    command = [UWSGI, "--http-socket", f"127.0.0.1:{port}", "--master",
               "--processes", "2", "--wsgi-file", str(ROOT / "tests" / "id_uniqueness_app.py"),
               "--home", sys.prefix, "--disable-logging", "--worker-reload-mercy", "10", *mode]
    recycled = "--max-requests" in mode
    with _server(command, tmp_path, port, signal.SIGINT):
        seen = _collect_until_recycled(port, 2000, min_pids=4 if recycled else 2)
    _assert_unique(seen, 2000, min_pids=4 if recycled else 2)


@pytest.mark.parametrize("options", [
    ["-k", "asl_gevent.gunicorn.GeventWorker", "--preload", "--max-requests", "100"],
    ["-k", "gthread", "--threads", "4", "--max-requests", "150"],
], ids=["gevent-preload", "gthread"])
def test_gunicorn_workers_never_repeat_generated_ids(tmp_path: Path, options: List[str]) -> None:
    """1,500 or more requests across 2 gunicorn workers (preloaded app,
    recycled workers; or threads): every generated id distinct."""
    from helpers import gunicorn_no_control_socket

    port = free_port()
    command = [sys.executable, "-m", "gunicorn", "-w", "2", "-b", f"127.0.0.1:{port}",
               *gunicorn_no_control_socket(), "--graceful-timeout", "5",
               "--log-level", "warning", *options, "id_uniqueness_app:app"]
    with _server(command, tmp_path, port, signal.SIGTERM):
        seen = _collect_until_recycled(port, 1500, min_pids=4)
    _assert_unique(seen, 1500, min_pids=4)


def test_children_forked_from_c_and_threads_never_repeat_ids() -> None:
    """A child made by libc's fork() (no Python at-fork handler runs, as
    under uWSGI) and the parent, each with 8 threads, after the parent
    generated ids: no id twice."""
    proc = run_python("""
        import ctypes, json, os, threading
        from asl_gevent.wsgi import request_id_from

        def ids(n):
            got = []
            def work():
                got.extend(request_id_from({}) for _ in range(n))
            threads = [threading.Thread(target=work) for _ in range(8)]
            for t in threads: t.start()
            for t in threads: t.join(60)
            return got

        ids(2)  # the parent generated ids before it forks, as a preloaded app may
        libc = ctypes.CDLL(None, use_errno=True)
        pipes = []
        for _ in range(2):
            read, write = os.pipe()
            pid = libc.fork()
            assert pid >= 0
            if pid == 0:
                data = json.dumps(ids(100)).encode()
                while data:
                    data = data[os.write(write, data):]
                os._exit(0)
            os.close(write)
            pipes.append((pid, read))
        seen = {"parent": ids(100)}
        for n, (pid, read) in enumerate(pipes):
            with os.fdopen(read) as f:
                seen[f"child{n}"] = json.loads(f.read())
            os.waitpid(pid, 0)
        print(json.dumps(seen))
    """)
    seen: Dict[str, List[str]] = json.loads(proc.stdout)
    every = [i for ids in seen.values() for i in ids]
    assert len(every) == 2400
    assert len(set(every)) == 2400
