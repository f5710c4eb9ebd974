"""Across processes: ``requests.get`` with asl_gevent.http, Celery with asl_gevent.celery.

Both figures run inside a request store (that is when the integrations do
work) and degrade to a "skipped" line when an extra or ``redis-server`` is
missing.
"""

from __future__ import annotations

import importlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Iterator, List, Optional, Tuple

from ..wsgi import request_storage
from ._core import (Options, Processes, Row, Target, Variant, free_port, paired,
                    wait_listening)

__all__ = ["xproc_rows"]


def _missing(*modules: str) -> List[str]:
    missing = []
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    return missing


def http_rows(opts: Options) -> Iterator[Row]:
    """``requests.get`` (keep-alive Session) to a local pywsgi server, on vs off."""
    from .servers import _PYWSGI_SERVER
    import requests

    from .. import http

    procs = Processes()
    try:
        port = free_port()
        server = procs.start([sys.executable, "-c", _PYWSGI_SERVER, str(port), "plain"])
        wait_listening(server, port)
        url = f"http://127.0.0.1:{port}/"
        session = requests.Session()

        def sample(n: int) -> float:
            get = session.get
            t0 = time.perf_counter()
            for _ in range(n):
                get(url)
            return (time.perf_counter() - t0) / n

        def in_request(n: int) -> float:
            return request_storage.run({"request_id": "bench-request"}, sample, n)

        base, subj = paired(Variant(in_request, http.uninstall),
                            Variant(in_request, http.install), opts)
        http.uninstall()
        session.close()
        yield Row("http/requests_get", "requests.get, asl_gevent.http on vs off", "s",
                  base, subj, Target("<=", 1.02),
                  note="inside a request store, so the header is added")
    finally:
        procs.stop_all()


def celery_unavailable() -> Optional[str]:
    """Why the Celery figures cannot run here (a missing extra or
    ``redis-server``), or ``None``."""
    missing = _missing("celery", "redis")
    if missing:
        return f"{' and '.join(missing)} not installed (pip install 'asl_gevent[celery]')"
    if shutil.which("redis-server") is None:
        return "redis-server not installed"
    return None


def start_redis(workdir: str) -> "Tuple[subprocess.Popen[Any], int]":
    """A throwaway ``redis-server`` on a free loopback port, in its own
    session (stop it with :func:`stop`); returns it and its port."""
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", workdir], stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT, start_new_session=True)
    return proc, port


def stop(proc: "subprocess.Popen[Any]") -> None:
    """SIGTERM the process group *proc* leads (by its pid), SIGKILL if it lingers."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(10)


def celery_rows(opts: Options) -> Iterator[Row]:
    """Celery publish + execute + result on the solo pool, with vs without
    asl_gevent.celery (each side its own worker and Redis database)."""
    workdir = tempfile.mkdtemp(prefix="asl-bench-celery-")
    started: List["subprocess.Popen[Any]"] = []
    try:
        redis, port = start_redis(workdir)
        started.append(redis)
        apps = []
        for db, install in ((1, "0"), (2, "1")):
            broker = f"redis://127.0.0.1:{port}/{db}"
            env = dict(os.environ, ASL_BENCH_BROKER=broker, ASL_BENCH_CELERY=install)
            out = open(os.path.join(workdir, f"worker{db}.out"), "wb")
            started.append(subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "asl_gevent.bench._celery_app:app",
                 "worker", "-P", "solo", "--without-heartbeat", "--without-mingle",
                 "--without-gossip", "-l", "INFO"],
                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
            out.close()
            apps.append(_publisher(broker, install == "1"))
        deadline = time.monotonic() + 60
        for db in (1, 2):
            path = os.path.join(workdir, f"worker{db}.out")
            while " ready." not in open(path, errors="replace").read():
                if time.monotonic() > deadline or any(p.poll() is not None for p in started):
                    raise RuntimeError("celery worker did not start:\n"
                                       + open(path, errors="replace").read()[-2000:])
                time.sleep(0.1)
        per_sample = 10 if opts.quick else 40

        def sampler(app: Any) -> Callable[[], float]:
            noop = app.signature("noop")

            def sample() -> float:
                t0 = time.perf_counter()
                for n in range(per_sample):
                    noop.clone((n,)).delay().get(timeout=30)
                return (time.perf_counter() - t0) / per_sample

            return lambda: request_storage.run({"request_id": "bench-request"}, sample)

        base_sample, subj_sample = sampler(apps[0]), sampler(apps[1])
        base_sample(), subj_sample()  # warm up: connections, first tracer
        base: List[float] = []
        subj: List[float] = []
        for i in range(max(3, opts.rounds * 2)):
            order: List[Tuple[Callable[[], float], List[float]]] = [
                (base_sample, base), (subj_sample, subj)]
            for sample, out_list in (order if i % 2 == 0 else order[::-1]):
                out_list.append(sample())
        yield Row("celery/solo", "Celery delay+run+get (solo pool), asl_gevent.celery "
                  "vs without", "s", base, subj, Target("<=", 1.05),
                  note="publisher and worker both with/without; Redis on loopback")
    finally:
        for proc in reversed(started):
            stop(proc)
        shutil.rmtree(workdir, ignore_errors=True)


def _publisher(broker: str, install: bool) -> Any:
    from celery import Celery

    app = Celery("asl_bench", broker=broker, backend=broker, set_as_current=False)
    app.conf.update(task_serializer="json", result_serializer="json")
    if install:
        from .. import celery as asl_celery
        asl_celery.install(app)
    return app


def xproc_rows(opts: Options, wanted: Callable[[str], bool]) -> Iterator[Row]:
    """The across-processes figures; a missing extra skips its figure, saying so."""
    from ._core import skip

    if wanted("http/requests_get"):
        missing = _missing("requests", "urllib3")
        if missing:
            skip("http/requests_get", f"{' and '.join(missing)} not installed "
                 "(pip install 'asl_gevent[http]')")
        else:
            yield from http_rows(opts)
    if wanted("celery/solo"):
        reason = celery_unavailable()
        if reason is not None:
            skip("celery/solo", reason)
        else:
            yield from celery_rows(opts)
