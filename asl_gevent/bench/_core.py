"""The benchmark's machinery: paired sampling, rows, the table, processes."""

from __future__ import annotations

import datetime
import gc
import itertools
import os
import platform
import signal
import socket
import statistics
import subprocess
import tempfile
import time
from contextvars import Context
from dataclasses import dataclass
from pathlib import Path
from typing import (IO, Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional,
                    Sequence, Tuple)

import gevent
import greenlet

from .._hooks import install, uninstall

ROOT = Path(__file__).resolve().parent.parent.parent

#: ``figures(opts, wanted)``: the rows of one family of figures.
Figures = Callable[["Options", Callable[[str], bool]], Iterator["Row"]]

#: "name: skipped: reason" lines of figures that could not run here (an
#: optional extra missing); printed under the table.
SKIPPED: List[str] = []


def skip(name: str, reason: str) -> None:
    """Record that figure *name* was skipped, and why."""
    SKIPPED.append(f"{name}: skipped: {reason}")


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
    """One figure: paired samples of a baseline and a subject.

    ``instr_base``/``instr_subj``: instructions per operation counted by
    callgrind (:mod:`.instructions`), when measured. Then *target* is judged
    on their ratio (stable to 0.1%) and *wall_target*, if any, on the wall
    ratio; without them *target* is judged on the wall ratio, as in 0.2.
    """

    name: str
    what: str
    unit: str  # "s" (time per operation), "req/s", "req/CPU-s", "MiB", "blocks", "stores"
    base: List[float]
    subj: List[float]
    target: Optional[Target]
    higher_is_better: bool = False
    note: str = ""
    instr_base: Optional[float] = None
    instr_subj: Optional[float] = None
    wall_target: Optional[Target] = None

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
    def ratio_instr(self) -> Optional[float]:
        if self.instr_base is None or self.instr_subj is None or not self.instr_base:
            return None
        return self.instr_subj / self.instr_base

    def _wall_mark(self, target: Target) -> str:
        if not target.met(self.ratio_min):
            return "MISS"
        return "PASS" if target.met(self.ratio_median) else "pass*"

    @property
    def mark(self) -> str:
        instr = self.ratio_instr
        if instr is None:
            target = self.wall_target or self.target
            return "-" if target is None else self._wall_mark(target)
        if self.target is not None and not self.target.met(instr):
            return "MISS"
        if self.wall_target is not None:
            return self._wall_mark(self.wall_target)
        return "-" if self.target is None else "PASS"

    def best(self, samples: Sequence[float]) -> str:
        value = max(samples) if self.higher_is_better else min(samples)
        return _fmt(value, self.unit)

    @property
    def instructions(self) -> str:
        """``240 -> 447`` instructions per operation, or ``-``."""
        if self.instr_base is None or self.instr_subj is None:
            return "-"
        return f"{self.instr_base:,.0f} -> {self.instr_subj:,.0f}"

    @property
    def targets(self) -> str:
        if self.wall_target is not None and self.target is not None:
            return f"{self.target} (wall {self.wall_target})"
        target = self.target or self.wall_target
        return str(target) if target else "-"


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
    callgrind: bool = False  # count micro rows' instructions too (.instructions)


Sampler = Callable[[int], float]  # n -> seconds per operation


def compile_loop(body: Sequence[str], env: Mapping[str, Any]) -> Sampler:
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


def paired(base: Variant, subj: Variant, opts: Options, ops_per_call: int = 1,
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


def in_context(context: Context, sampler: Sampler) -> Sampler:
    return lambda n: context.run(sampler, n)


def hooks_on() -> None:
    install()


def hooks_off() -> None:
    uninstall()


def noop() -> None:
    pass


def child_env() -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Processes:
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
        proc = subprocess.Popen(argv, stderr=log, text=True, env=child_env(), cwd=str(ROOT),
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


def output_of(proc: subprocess.Popen[str]) -> str:
    log: IO[str] = proc.log  # type: ignore[attr-defined]
    log.flush()
    log.seek(0)
    return log.read()[-3000:]


def wait_listening(proc: subprocess.Popen[str], port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{output_of(proc)}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"server did not listen on port {port} in {timeout}s:\n{output_of(proc)}")



# -- the table ----------------------------------------------------------------------


def machine() -> List[str]:
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


def table(rows: Iterable[Row]) -> List[str]:
    header = ("figure", "subject vs baseline", "baseline", "subject", "instructions/op",
              "instr", "min", "median", "target", "mark")
    cells = [header] + [
        (r.name, r.what, r.best(r.base), r.best(r.subj), r.instructions,
         "-" if r.ratio_instr is None else f"{r.ratio_instr:.3f}", f"{r.ratio_min:.3f}",
         f"{r.ratio_median:.3f}", r.targets, r.mark)
        for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"
             for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return lines
