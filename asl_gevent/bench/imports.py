"""Import cost: ``import asl_gevent`` against ``import gevent``, fresh interpreters."""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
from typing import Callable, Dict, Iterator, List

from ._core import Options, Row, Target, child_env

#: SPEC: ``import asl_gevent`` costs at most this much more than ``import gevent``.
BUDGET_S = 0.015

_TIMED = ("import time; t = time.perf_counter(); import {module}; "
          "print(time.perf_counter() - t)")


def _import_time(module: str, env: Dict[str, str]) -> float:
    """Seconds one fresh interpreter spends in ``import <module>``."""
    out = subprocess.run([sys.executable, "-c", _TIMED.format(module=module)], env=env,
                         capture_output=True, text=True, check=True, timeout=60).stdout
    return float(out.strip().splitlines()[-1])


def import_rows(opts: Options, wanted: Callable[[str], bool]) -> Iterator[Row]:
    """``import asl_gevent`` (which imports gevent) vs ``import gevent`` alone.

    Each sample is a fresh interpreter timing its own import statement, the
    two kinds alternated. Bytecode is cached in a private directory (an
    installed package has its ``.pyc`` files), so neither side pays for
    compiling, even where ``PYTHONDONTWRITEBYTECODE`` is set. The target, a
    difference of 15 ms, is shown as the ratio it allows over this run's
    ``import gevent``.
    """
    if not wanted("import/asl_gevent"):
        return
    with tempfile.TemporaryDirectory(prefix="asl_gevent_bench_pyc_") as cache:
        env = child_env()
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = cache
        for module in ("gevent", "asl_gevent"):  # warm up: compile into the cache
            _import_time(module, env)
        base: List[float] = []
        subj: List[float] = []
        for i in range(max(opts.repeat, 5)):
            order = [("gevent", base), ("asl_gevent", subj)]
            if i % 2:
                order.reverse()
            for module, out in order:
                out.append(_import_time(module, env))
    difference = statistics.median(s - b for s, b in zip(subj, base))
    allowed = (statistics.median(base) + BUDGET_S) / statistics.median(base)
    yield Row("import/asl_gevent", "import asl_gevent vs import gevent (fresh interpreter)",
              "s", base, subj, Target("<=", round(allowed, 2)),
              note=f"median difference {difference * 1e3:+.1f} ms (target <= "
                   f"+{BUDGET_S * 1e3:.0f} ms, shown as a ratio of this run's import gevent)")


__all__ = ["import_rows"]
