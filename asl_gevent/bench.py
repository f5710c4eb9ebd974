"""Measure SPEC's performance targets: ``python -m asl_gevent.bench``.

Prints one table. Every figure is a *ratio* of a subject to a baseline
measured in the same run, the two alternated sample by sample (A B, B A, ...)
so that drift on a shared machine hits both alike. For each figure:

* ``min``: the ratio of the best samples (fastest time per operation; for
  requests per second, the highest rate). Noise only ever adds time, so this
  is the closest to the real cost and is what the pass/miss mark uses.
* ``median``: the median of the per-pair ratios. When it misses a target the
  ``min`` meets, the mark is ``pass*``: the machine was too noisy to be sure.

The process exits 0 even when targets are missed: it is a report, and the
misses are listed under the table. It exits 1 only if a figure could not be
measured at all (a server that would not start, say). Options:

``--quick``
    small counts; the whole run takes well under a minute (the test suite
    runs it once and checks only the table's shape).
``--only NAME``
    run only the figures named ``NAME`` or starting with ``NAME/``
    (``--list`` prints the names); may be given several times.
``--repeat N``
    pairs per microbenchmark and load rounds per server (the memory figure
    is a single run).
``--greenlets N``
    greenlets for the memory figure (1,000,000; ``--quick``: 20,000).
``--list``
    print the figure names.

The WSGI figures start real servers (gunicorn's gevent worker and
:mod:`gevent.pywsgi`, one process each) on 127.0.0.1 and load them from a
separate process with a small keep-alive HTTP client written on gevent; each
load round is bounded in time and in requests, and every process is stopped
by its pid. Each server pair gives two rows: requests per second, and
requests per CPU-second of the server's own processes, which is what the
server would do with a core to itself and is far less swayed by whatever
else runs on the machine.

The memory figure runs in a fresh process: greenlets spawned in batches, each
inside ``als.run(store, ...)``; it reports resident memory (``VmRSS``) and
Python heap blocks (:func:`sys.getallocatedblocks`) before and after, and how
many stores are still alive after :func:`gc.collect` (by weak reference).

.. versionadded:: 0.1
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import datetime
import gc
import itertools
import json
import os
import platform
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from contextvars import Context, ContextVar, copy_context
from dataclasses import dataclass, field
from pathlib import Path
from typing import (IO, Any, Callable, Dict, Iterable, Iterator, List, Mapping,
                    Optional, Sequence, Tuple)

import gevent
import gevent.local
import gevent.pool
import greenlet

from ._hooks import install, is_installed, uninstall
from ._storage import AsyncLocalStorage

__all__ = ["main", "hello_app", "plain_app", "middleware_app"]

_ROOT = Path(__file__).resolve().parent.parent


# -- results ---------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A SPEC target for a ratio: ``ratio <op> value``."""

    op: str  # "<=", ">=" or "=="
    value: float

    def met(self, ratio: float) -> bool:
        if self.op == "<=":
            return ratio <= self.value
        if self.op == ">=":
            return ratio >= self.value
        return ratio == self.value

    def __str__(self) -> str:
        return f"{self.op} {self.value:.2f}"


@dataclass
class Row:
    """One figure: paired samples of a baseline and a subject."""

    name: str
    what: str
    unit: str  # "s" (time per operation), "req/s", "req/CPU-s", "MiB", "blocks", "stores"
    base: List[float]
    subj: List[float]
    target: Optional[Target]
    higher_is_better: bool = False
    note: str = ""

    @property
    def ratio_min(self) -> float:
        if self.higher_is_better:
            best_base, best_subj = max(self.base), max(self.subj)
        else:
            best_base, best_subj = min(self.base), min(self.subj)
        return best_subj / best_base if best_base else float("nan")

    @property
    def ratio_median(self) -> float:
        return statistics.median(s / b if b else float("nan")
                                 for s, b in zip(self.subj, self.base))

    @property
    def mark(self) -> str:
        if self.target is None:
            return "-"
        if not self.target.met(self.ratio_min):
            return "MISS"
        return "PASS" if self.target.met(self.ratio_median) else "pass*"

    def best(self, samples: Sequence[float]) -> str:
        value = max(samples) if self.higher_is_better else min(samples)
        return _fmt(value, self.unit)


def _fmt(value: float, unit: str) -> str:
    if unit == "s":
        if value < 1e-6:
            return f"{value * 1e9:.1f} ns"
        if value < 1e-3:
            return f"{value * 1e6:.2f} µs"
        return f"{value * 1e3:.2f} ms"
    if unit in ("req/s", "req/CPU-s"):
        return f"{value:,.0f} {unit}"
    if unit == "MiB":
        return f"{value:,.1f} MiB"
    return f"{value:,.0f} {unit}"


# -- timing harness --------------------------------------------------------------


@dataclass
class Options:
    quick: bool
    repeat: int  # pairs per microbenchmark
    rounds: int  # load rounds per server
    sample_s: float  # target duration of one microbenchmark sample
    load_s: float  # duration of one load round
    max_requests: int  # bound on one load round
    connections: int
    greenlets: int  # memory figure
    batch: int


Sampler = Callable[[int], float]  # n -> seconds per operation


def _compile(body: Sequence[str], env: Mapping[str, Any]) -> Sampler:
    """Return ``sample(n)``: run *body* ``n`` times, seconds per statement.

    Like :mod:`timeit`, the statements are unrolled in one function and every
    name is a local (a default argument), so the loop and name lookups cost
    the same for a subject and its baseline and little next to either.
    """
    names = sorted(env)
    lines = [
        "def _loop(_n, " + "".join(f"{k}={k}, " for k in names) + "_clock=_clock, _it=_it):",
        "    _t0 = _clock()",
        "    for _ in _it(None, _n):",
        *(f"        {stmt}" for stmt in body),
        "    return _clock() - _t0",
    ]
    namespace: Dict[str, Any] = dict(env, _clock=time.perf_counter, _it=itertools.repeat)
    exec("\n".join(lines), namespace)  # noqa: S102 - our own fixed source
    loop: Callable[[int], float] = namespace["_loop"]
    per = len(body)
    return lambda n: loop(n) / (n * per)


@dataclass
class Variant:
    """A side of a comparison: how to prepare it and how to sample it."""

    sample: Sampler
    prepare: Callable[[], None] = lambda: None


def _calibrate(variant: Variant, sample_s: float, ops_per_call: int) -> int:
    """The ``n`` that makes one sample of *variant* last about *sample_s*.

    ``variant.sample(n)`` runs ``n`` loop iterations of *ops_per_call*
    operations each and returns the time of one operation.
    """
    variant.prepare()
    n = 1
    while True:
        elapsed = variant.sample(n) * n * ops_per_call
        if elapsed >= sample_s / 5 or n >= 1 << 26:
            return max(1, int(n * sample_s / max(elapsed, 1e-9)))
        n *= 4


def _paired(base: Variant, subj: Variant, opts: Options, ops_per_call: int = 1,
            ) -> Tuple[List[float], List[float]]:
    """Sample *base* and *subj* alternately, ``opts.repeat`` times each."""
    n = _calibrate(base, opts.sample_s, ops_per_call)
    for variant in (base, subj, base, subj):  # warm up (and specialize) both
        variant.prepare()
        variant.sample(n)
    base_s: List[float] = []
    subj_s: List[float] = []
    for i in range(opts.repeat):
        order = [(base, base_s), (subj, subj_s)]
        if i % 2:
            order.reverse()
        for variant, out in order:
            variant.prepare()
            gc.collect()
            gc.disable()  # as timeit does: a collection is nobody's cost
            try:
                out.append(variant.sample(n))
            finally:
                gc.enable()
    return base_s, subj_s


def _in(context: Context, sampler: Sampler) -> Sampler:
    return lambda n: context.run(sampler, n)


def _hooks_on() -> None:
    install()


def _hooks_off() -> None:
    uninstall()


def _noop() -> None:
    pass


# -- get_store --------------------------------------------------------------------


def _get_store_rows(opts: Options, wanted: Callable[[str], bool]) -> Iterator[Row]:
    target = Target("<=", 1.5)
    als: AsyncLocalStorage[object] = AsyncLocalStorage(name="bench")
    var: ContextVar[object] = ContextVar("bench.raw", default=None)
    context = copy_context()
    context.run(als.enter_with, {"id": 1})
    context.run(var.set, {"id": 1})
    unroll = 20
    subject = Variant(_in(context, _compile(["als.get_store()"] * unroll, {"als": als})))

    if wanted("get_store/contextvar"):
        raw = Variant(_in(context, _compile(["var.get()"] * unroll, {"var": var})))
        yield Row("get_store/contextvar", "als.get_store() vs ContextVar.get()", "s",
                  *_paired(raw, subject, opts, unroll), target)

    if wanted("get_store/gevent_local"):
        gloc = gevent.local.local()
        gloc.store = {"id": 1}
        base = Variant(_compile(["gloc.store"] * unroll, {"gloc": gloc}))
        yield Row("get_store/gevent_local",
                  "als.get_store() vs gevent.local.local attribute (>= 2.5x faster)", "s",
                  *_paired(base, subject, opts, unroll), Target("<=", 0.4))

    if wanted("get_store/threading_local"):
        tloc = threading.local()
        tloc.store = {"id": 1}
        base = Variant(_compile(["tloc.store"] * unroll, {"tloc": tloc}))
        yield Row("get_store/threading_local", "als.get_store() vs threading.local attribute",
                  "s", *_paired(base, subject, opts, unroll), None)

    for count in (1, 10, 100):
        name = f"get_store/storages_{count}"
        if not wanted(name):
            continue
        # ``count`` storages and as many raw variables set, plus 100 other
        # variables, all in one context; the unrolled body reads up to ten
        # different ones in turn, subject and baseline alike.
        crowd = copy_context()
        storages = [AsyncLocalStorage[object](name=f"bench{i}") for i in range(count)]
        raws = [ContextVar[object](f"bench.raw{i}", default=None) for i in range(count)]
        for i in range(count):
            crowd.run(storages[i].enter_with, i)
            crowd.run(raws[i].set, i)
        for i in range(100):
            crowd.run(ContextVar[object](f"bench.other{i}").set, i)
        picks = [i % count for i in range(10)]
        env_s = {f"s{i}": storages[i] for i in set(picks)}
        env_r = {f"r{i}": raws[i] for i in set(picks)}
        body_s = [f"s{i}.get_store()" for i in picks] * 2
        body_r = [f"r{i}.get()" for i in picks] * 2
        storages_text = "1 storage" if count == 1 else f"{count} storages"
        yield Row(name, f"get_store() vs ContextVar.get(), {storages_text} + 100 vars set",
                  "s", *_paired(Variant(_in(crowd, _compile(body_r, env_r))),
                                Variant(_in(crowd, _compile(body_s, env_s))),
                                opts, len(body_s)), target)


# -- spawn + join -----------------------------------------------------------------


def _spawn_rows(opts: Options, wanted: Callable[[str], bool]) -> Iterator[Row]:
    target = Target("<=", 1.05)
    was_installed = is_installed()
    context = copy_context()  # a request-like context: one store set
    als: AsyncLocalStorage[object] = AsyncLocalStorage(name="bench.spawn")
    context.run(als.enter_with, {"id": 1})
    try:
        def pair(body: str, env: Mapping[str, Any]) -> Tuple[List[float], List[float]]:
            sampler = _in(context, _compile([body], dict(env, f=_noop)))
            return _paired(Variant(sampler, _hooks_off), Variant(sampler, _hooks_on), opts)

        if wanted("spawn/gevent"):
            yield Row("spawn/gevent", "gevent.spawn(f).join(): hooks vs no hooks", "s",
                      *pair("spawn(f).join()", {"spawn": gevent.spawn}), target)

        if wanted("spawn/pool"):
            pool = gevent.pool.Pool(10)
            yield Row("spawn/pool", "Pool.spawn(f).join(): hooks vs no hooks", "s",
                      *pair("pool.spawn(f).join()", {"pool": pool}), target)

        if wanted("spawn/executor"):
            # A batch of tasks, then their results: one submit + result round
            # trip per task would time mostly how soon the OS wakes a thread
            # (+-10% on a shared machine), not what the hook adds to each task.
            # Longer samples, too: thread hand-offs make short ones noisy.
            with ThreadPoolExecutor(max_workers=1) as executor:
                batch = _in(context, _compile(
                    ["for _f in [executor.submit(f) for _ in range100]: _f.result()"],
                    {"executor": executor, "f": _noop, "range100": range(100)}))

                def sampler(n: int) -> float:
                    return batch(n) / 100
                yield Row("spawn/executor",
                          "ThreadPoolExecutor: 100 x submit(f), then each result(): "
                          "hooks vs no hooks (per task)", "s",
                          *_paired(Variant(sampler, _hooks_off), Variant(sampler, _hooks_on),
                                   dataclasses.replace(opts, sample_s=opts.sample_s * 5),
                                   ops_per_call=100),
                          target)

        if wanted("spawn/contextvars_100"):
            # Copying a context is O(1) (a persistent map): spawning from a
            # context holding 100 variables must cost what it costs with 1.
            one, hundred = Context(), Context()
            one.run(als.enter_with, {"id": 1})
            hundred.run(als.enter_with, {"id": 1})
            for i in range(99):
                hundred.run(ContextVar[int](f"bench.spawn{i}").set, i)
            loop = _compile(["spawn(f).join()"], {"spawn": gevent.spawn, "f": _noop})
            yield Row("spawn/contextvars_100",
                      "spawn+join (hooks) with 100 contextvars set vs 1", "s",
                      *_paired(Variant(_in(one, loop), _hooks_on),
                               Variant(_in(hundred, loop), _hooks_on), opts), target)
    finally:
        (install if was_installed else uninstall)()


# -- run --------------------------------------------------------------------------


def _token_run(var: ContextVar[Any]) -> Callable[[Any, Callable[[], Any]], Any]:
    """The hand-written wrapper SPEC compares ``als.run`` with, as SPEC writes it.

    It restores one variable and passes no arguments, so it is the cheapest
    honest baseline; ``run`` restores the whole context.
    """

    def run(store: Any, fn: Callable[[], Any]) -> Any:
        token = var.set(store)
        try:
            return fn()
        finally:
            var.reset(token)

    return run


def _run_rows(opts: Options, wanted: Callable[[str], bool]) -> Iterator[Row]:
    if not wanted("run/token_wrapper"):
        return
    als: AsyncLocalStorage[object] = AsyncLocalStorage(name="bench.run")
    var: ContextVar[object] = ContextVar("bench.run.raw", default=None)
    context = copy_context()
    unroll = 10
    env = {"als": als, "wrapper": _token_run(var), "store": {"id": 1}, "f": _noop}
    base = Variant(_in(context, _compile(["wrapper(store, f)"] * unroll, env)))
    subj = Variant(_in(context, _compile(["als.run(store, f)"] * unroll, env)))
    yield Row("run/token_wrapper", "als.run(store, f) vs token set/try/finally reset", "s",
              *_paired(base, subj, opts, unroll), Target("<=", 2.0))


# -- WSGI servers under load ---------------------------------------------------------


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
    from .wsgi import RequestContextMiddleware

    install()
    return RequestContextMiddleware(hello_app)


# pywsgi sends the headers and the body in two writes; with Nagle on, the body
# waits for the client's delayed ACK (40 ms on Linux) and both servers would
# measure only that. Accepted sockets inherit TCP_NODELAY from the listener.
_PYWSGI_SERVER = """
from gevent import monkey
monkey.patch_all()
import socket, sys
from gevent.pywsgi import WSGIServer
from asl_gevent.bench import middleware_app, plain_app
app = middleware_app() if sys.argv[2] == "asl" else plain_app()
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
listener.bind(("127.0.0.1", int(sys.argv[1])))
listener.listen(128)
WSGIServer(listener, app, log=None).serve_forever()
"""


def _env() -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _Processes:
    """Processes started for one figure, every one stopped by its pid."""

    def __init__(self) -> None:
        self.procs: List[subprocess.Popen[str]] = []
        self.logs: List[IO[str]] = []

    def start(self, argv: List[str], **kwargs: Any) -> subprocess.Popen[str]:
        log = tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace")
        self.logs.append(log)
        kwargs.setdefault("stdout", log)
        # A session of its own: if gunicorn's arbiter must be killed, its
        # worker goes with it (killpg on the arbiter's own pid).
        proc = subprocess.Popen(argv, stderr=log, text=True, env=_env(), cwd=str(_ROOT),
                                start_new_session=True, **kwargs)
        proc.log = log  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(10)
        for log in self.logs:
            log.close()


def _output(proc: subprocess.Popen[str]) -> str:
    log: IO[str] = proc.log  # type: ignore[attr-defined]
    log.flush()
    log.seek(0)
    return log.read()[-3000:]


def _wait_listening(proc: subprocess.Popen[str], port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{_output(proc)}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"server did not listen on port {port} in {timeout}s:\n{_output(proc)}")


class _Client:
    """The load generator: a gevent keep-alive HTTP client in its own process."""

    def __init__(self, procs: _Processes) -> None:
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
            raise RuntimeError(f"load client gave no answer:\n{_output(self.proc)}")
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


def _gunicorn_argv(worker: str, app: str, port: int) -> List[str]:
    return [sys.executable, "-m", "gunicorn", "-k", worker, "-w", "1",
            "-b", f"127.0.0.1:{port}", "--log-level", "warning",
            "--graceful-timeout", "5", app]


def _wsgi_rows(opts: Options, wanted: Callable[[str], bool]) -> Iterator[Row]:
    target = Target(">=", 0.97)
    servers: List[Tuple[str, str, Callable[[int], List[str]], Callable[[int], List[str]]]] = [
        ("wsgi/gunicorn",
         "gunicorn -k asl_gevent.gunicorn.GeventWorker + middleware vs -k gevent",
         lambda port: _gunicorn_argv("gevent", "asl_gevent.bench:plain_app()", port),
         lambda port: _gunicorn_argv("asl_gevent.gunicorn.GeventWorker",
                                     "asl_gevent.bench:middleware_app()", port)),
        ("wsgi/pywsgi", "pywsgi.WSGIServer: hooks + middleware vs neither",
         lambda port: [sys.executable, "-c", _PYWSGI_SERVER, str(port), "plain"],
         lambda port: [sys.executable, "-c", _PYWSGI_SERVER, str(port), "asl"]),
    ]
    for name, what, base_argv, subj_argv in servers:
        cpu_name = name + "_cpu"
        if not (wanted(name) or wanted(cpu_name)):
            continue
        procs = _Processes()
        try:
            base_port, subj_port = _free_port(), _free_port()
            base = procs.start(base_argv(base_port))
            subj = procs.start(subj_argv(subj_port))
            _wait_listening(base, base_port)
            _wait_listening(subj, subj_port)
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


def _client_main() -> None:
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


# -- memory -------------------------------------------------------------------------


def _memory_rows(opts: Options, wanted: Callable[[str], bool]) -> Iterator[Row]:
    if not any(wanted(name) for name in ("memory/rss", "memory/blocks", "memory/stores")):
        return
    procs = _Processes()
    try:
        proc = procs.start([sys.executable, "-m", "asl_gevent.bench", "--_memory",
                            str(opts.greenlets), "--_batch", str(opts.batch)],
                           stdout=subprocess.PIPE)
        try:
            out, _ = proc.communicate(timeout=max(120, opts.greenlets / 2000))
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"memory run timed out:\n{_output(proc)}") from None
        if proc.returncode:
            raise RuntimeError(f"memory run failed ({proc.returncode}):\n{_output(proc)}")
    finally:
        procs.stop_all()
    result = json.loads(out.strip().splitlines()[-1])
    trimmed = result["trimmed_mib"]
    note = (f"{result['greenlets']:,} greenlets in batches of {result['batch']:,} alive at "
            f"once, each spawned in als.run(store, ...); peak {result['peak_mib']:,.1f} MiB; "
            + (f"after malloc_trim {trimmed:,.1f} MiB; " if trimmed is not None else "")
            + f"{result['wrong']} saw a wrong store; {result['seconds']:.1f} s")
    if wanted("memory/rss"):
        yield Row("memory/rss", "resident memory (VmRSS) after gc.collect() vs before", "MiB",
                  [result["before_mib"]], [result["after_mib"]], Target("<=", 1.05),
                  note=note)
    if wanted("memory/blocks"):
        yield Row("memory/blocks", "Python heap blocks allocated after vs before", "blocks",
                  [result["blocks_before"]], [result["blocks_after"]], Target("<=", 1.05),
                  note=note)
    if wanted("memory/stores"):
        yield Row("memory/stores", "stores alive after gc.collect() vs stores made", "stores",
                  [result["made"]], [result["alive"]], Target("==", 0.0), note=note)


def _rss_mib(field_name: str = "VmRSS") -> float:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field_name} in /proc/self/status")


class _Store:
    """A store the memory figure can count: weakref-able, nothing else."""

    __slots__ = ("number", "__weakref__")

    def __init__(self, number: int) -> None:
        self.number = number


def _memory_main(total: int, batch: int) -> None:
    """``--_memory N``: spawn N greenlets with stores, report memory as JSON."""
    als: AsyncLocalStorage[_Store] = AsyncLocalStorage(name="bench.memory")
    alive: "set[weakref.ref[_Store]]" = set()
    wrong = 0

    def child() -> int:
        gevent.sleep(0)  # every greenlet of a batch alive and switched out at once
        store = als.get_store()
        return store.number if store is not None else -1

    def run_batch(first: int, count: int) -> None:
        nonlocal wrong
        glets = []
        for number in range(first, first + count):
            store = _Store(number)
            alive.add(weakref.ref(store, alive.discard))
            glets.append(als.run(store, gevent.spawn, child))
        del store
        gevent.joinall(glets)
        wrong += sum(g.value != first + i for i, g in enumerate(glets))

    run_batch(0, min(batch, total))  # warm up gevent's and Python's free lists
    gc.collect()
    before, blocks_before = _rss_mib(), sys.getallocatedblocks()
    start = time.perf_counter()
    made = 0
    while made < total:
        count = min(batch, total - made)
        run_batch(made, count)
        made += count
    seconds = time.perf_counter() - start
    gc.collect()
    after, blocks_after = _rss_mib(), sys.getallocatedblocks()
    # RSS also counts memory the C allocator keeps for reuse (greenlet stack
    # copies are malloc'ed); after malloc_trim what is left is what we hold.
    try:
        ctypes.CDLL(None).malloc_trim(0)
        trimmed: Optional[float] = _rss_mib()
    except (OSError, AttributeError):  # not glibc
        trimmed = None
    print(json.dumps({
        "greenlets": total, "batch": batch, "made": made, "alive": len(alive),
        "wrong": wrong, "before_mib": before, "after_mib": after, "trimmed_mib": trimmed,
        "blocks_before": blocks_before, "blocks_after": blocks_after,
        "peak_mib": _rss_mib("VmHWM"), "seconds": seconds,
    }), flush=True)


# -- the table ----------------------------------------------------------------------

Figures = Callable[[Options, Callable[[str], bool]], Iterator[Row]]

#: Every figure name, in table order, and the function that measures it.
FIGURES: List[Tuple[Tuple[str, ...], Figures]] = [
    (("get_store/contextvar", "get_store/gevent_local", "get_store/threading_local",
      "get_store/storages_1", "get_store/storages_10", "get_store/storages_100"),
     _get_store_rows),
    (("spawn/gevent", "spawn/pool", "spawn/executor", "spawn/contextvars_100"),
     _spawn_rows),
    (("run/token_wrapper",), _run_rows),
    (("wsgi/gunicorn", "wsgi/gunicorn_cpu", "wsgi/pywsgi", "wsgi/pywsgi_cpu"), _wsgi_rows),
    (("memory/rss", "memory/blocks", "memory/stores"), _memory_rows),
]
NAMES = [name for names, _ in FIGURES for name in names]


def _machine() -> List[str]:
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import gunicorn
        gunicorn_version = gunicorn.__version__
    except ImportError:  # pragma: no cover - optional dependency
        gunicorn_version = "not installed"
    return [
        f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"machine: {os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable), {model}, "
        f"{platform.system()} {platform.release()}",
        f"python {platform.python_version()} ({platform.python_implementation()}), "
        f"gevent {gevent.__version__}, greenlet {greenlet.__version__}, "
        f"gunicorn {gunicorn_version}",
    ]


def _table(rows: Iterable[Row]) -> List[str]:
    header = ("figure", "subject vs baseline", "baseline", "subject", "min", "median",
              "target", "mark")
    cells = [header] + [
        (r.name, r.what, r.best(r.base), r.best(r.subj), f"{r.ratio_min:.3f}",
         f"{r.ratio_median:.3f}", str(r.target) if r.target else "-", r.mark)
        for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"
             for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return lines


def _options(args: argparse.Namespace) -> Options:
    if args.quick:
        opts = Options(quick=True, repeat=5, rounds=1, sample_s=0.005, load_s=0.5,
                       max_requests=20_000, connections=8, greenlets=20_000, batch=5_000)
    else:
        opts = Options(quick=False, repeat=30, rounds=8, sample_s=0.02, load_s=1.5,
                       max_requests=200_000, connections=8, greenlets=args.greenlets,
                       batch=10_000)
    if args.repeat is not None:
        opts.repeat = opts.rounds = args.repeat
    if args.greenlets is not None:
        opts.greenlets = args.greenlets
    return opts


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m asl_gevent.bench",
        description="Measure asl_gevent against SPEC's targets; print one table of "
                    "ratios (subject / baseline, alternated in one run).")
    parser.add_argument("--quick", action="store_true",
                        help="small counts: the whole run in well under a minute")
    parser.add_argument("--only", action="append", metavar="NAME", default=None,
                        help="run only figure NAME (or every NAME/...); repeatable")
    parser.add_argument("--repeat", type=int, metavar="N", default=None,
                        help="pairs per microbenchmark and load rounds per server "
                             "(default 30 and 8; --quick: 5 and 1)")
    parser.add_argument("--greenlets", type=int, metavar="N", default=None,
                        help="greenlets for the memory figure (default 1,000,000; "
                             "--quick: 20,000)")
    parser.add_argument("--list", action="store_true", help="print the figure names and exit")
    parser.add_argument("--_client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--_memory", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_batch", type=int, default=10_000, help=argparse.SUPPRESS)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the benchmarks; print the table; return the exit status.

    0 when every figure was measured, whatever the ratios; 1 when a figure
    could not be measured.
    """
    parser = _parser()
    args = parser.parse_args(argv)
    if args._client:
        _client_main()
        return 0
    if args._memory is not None:
        _memory_main(args._memory, args._batch)
        return 0
    if args.list:
        print("\n".join(NAMES))
        return 0
    if args.repeat is not None and args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.greenlets is None and not args.quick:
        args.greenlets = 1_000_000
    only: Optional[List[str]] = args.only
    for name in only or []:
        if not any(n == name or n.startswith(name + "/") for n in NAMES):
            parser.error(f"--only {name!r} names no figure; choose from: {', '.join(NAMES)}")

    def wanted(name: str) -> bool:
        return only is None or any(name == o or name.startswith(o + "/") for o in only)

    opts = _options(args)
    print("\n".join(_machine()))
    print(f"mode: {'quick' if opts.quick else 'full'}; {opts.repeat} pairs per "
          f"microbenchmark, {opts.rounds} load rounds per server; ratios are "
          "subject / baseline")
    sys.stdout.flush()
    rows: List[Row] = []
    failures: List[str] = []
    for names, figures in FIGURES:
        if not any(wanted(n) for n in names):
            continue
        print(f"measuring {', '.join(n for n in names if wanted(n))} ...", file=sys.stderr,
              flush=True)
        try:
            rows.extend(copy_context().run(lambda: list(figures(opts, wanted))))
        except Exception as exc:  # a broken figure must not hide the others
            failures.append(f"{'/'.join(names)}: {type(exc).__name__}: {exc}")
    print()
    print("\n".join(_table(rows)))
    print()
    notes: Dict[str, List[str]] = {}
    for row in rows:
        if row.note:
            notes.setdefault(row.note, []).append(row.name)
    for note, noted in notes.items():
        print(f"{', '.join(noted)}: {note}")
    print("min: ratio of the best samples (least time per op, most req/s); median: "
          "median of per-pair ratios; pass* = min meets the target, median does not")
    misses = [r for r in rows if r.mark == "MISS"]
    noisy = [r for r in rows if r.mark == "pass*"]
    for row in misses:
        print(f"MISSED TARGET: {row.name}: {row.ratio_min:.3f} (median "
              f"{row.ratio_median:.3f}), target {row.target}")
    for row in noisy:
        print(f"noisy: {row.name}: min {row.ratio_min:.3f} meets {row.target}, "
              f"median {row.ratio_median:.3f} does not")
    for failure in failures:
        print(f"FAILED TO MEASURE: {failure}")
    if not (misses or noisy or failures):
        print("all targets met")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
