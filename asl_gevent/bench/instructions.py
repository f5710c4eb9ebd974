"""Instruction counts of the micro figures, by callgrind.

Wall-clock ratios on a shared machine swing by 10% from run to run;
instruction counts repeat to 0.1%. For one figure of :data:`.micro.CASES`,
each side (baseline, subject) runs in a child process under ``valgrind
--tool=callgrind``, at two loop counts; the difference of the two totals,
divided by the difference of the counts and by the operations per loop, is
the cost of one operation, with start-up, imports and set-up cancelled out.
The child builds the case exactly as the wall benchmark does, runs the loop
once to warm it up (CPython specialises its bytecode then), collects
garbage and runs it with the collector off, like :mod:`timeit`.

``python -m asl_gevent.bench`` adds these counts to every micro row when
``valgrind`` is on ``PATH``; ``tests/test_instructions.py`` asserts the
targets on them. Here, by hand::

    python -m asl_gevent.bench.instructions spawn/gevent get_store/contextvar

.. versionadded:: 0.3
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, List, Optional, Sequence, Tuple

__all__ = ["available", "count", "measure", "prepare", "main"]

#: Loop iterations run before the counted loop, in both children alike.
WARMUP = 50


def available() -> bool:
    """Whether ``valgrind`` is on ``PATH``."""
    return shutil.which("valgrind") is not None


def count(name: str, side: str, n: int, timeout: float = 600) -> int:
    """Instructions of a whole child process that runs *side* of *name* *n* times.

    :param name: a figure of :data:`.micro.CASES`.
    :param side: ``"base"`` or ``"subj"``.
    :raises RuntimeError: if valgrind is missing or the child fails.
    """
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise RuntimeError("valgrind is not installed (Debian: apt-get install valgrind)")
    from ._core import child_env

    env = child_env()
    env["PYTHONHASHSEED"] = "0"  # the same dict layouts in every child
    with tempfile.TemporaryDirectory(prefix="asl_gevent-callgrind-") as tmp:
        out = os.path.join(tmp, "callgrind.out")
        proc = subprocess.run(
            [valgrind, "--tool=callgrind", f"--callgrind-out-file={out}",
             sys.executable, "-c", _CHILD, name, side, str(n)],
            capture_output=True, text=True, timeout=timeout, env=env)
        if proc.returncode != 0 or not os.path.exists(out):
            raise RuntimeError(f"callgrind run of {name} {side} x{n} failed "
                               f"({proc.returncode}):\n{proc.stderr[-2000:]}")
        with open(out, encoding="utf-8", errors="replace") as data:
            for line in data:
                if line.startswith(("summary:", "totals:")):
                    return int(line.split()[1])
    raise RuntimeError(f"no instruction total in callgrind's output for {name} {side}")


def measure(name: str) -> Tuple[float, float]:
    """Instructions per operation of *name*'s baseline and subject.

    :raises RuntimeError: if valgrind is missing or a child fails.
    """
    from .micro import CASES

    case = CASES[name]()
    case.cleanup()
    low, high = case.counts
    runs = [(side, n) for side in ("base", "subj") for n in (low, high)]
    # Two children at a time: instruction counts do not depend on the load.
    with ThreadPoolExecutor(max_workers=2) as pool:
        totals = dict(zip(runs, pool.map(lambda run: count(name, *run), runs)))
    per_op: List[float] = [
        (totals[side, high] - totals[side, low]) / (high - low) / case.ops
        for side in ("base", "subj")]
    return per_op[0], per_op[1]


#: The child: the loop runs from module level, so that the spawn figures are
#: measured "from a shallow stack" (gevent copies the spawning stack, whose
#: depth would otherwise weigh on the baseline).
_CHILD = """
import gc, sys
from asl_gevent.bench.instructions import WARMUP, prepare
name, side, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
sample, cleanup = prepare(name, side)
sample(WARMUP)
gc.collect()
gc.disable()
sample(n)
gc.enable()
cleanup()
"""


def prepare(name: str, side: str) -> Tuple[Callable[[int], float], Callable[[], None]]:
    """Build *name*'s case and prepare *side*: its ``sample(n)`` and clean-up."""
    from .micro import CASES

    case = CASES[name]()
    variant = case.base if side == "base" else case.subj
    variant.prepare()
    return variant.sample, case.cleanup


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m asl_gevent.bench.instructions [NAME ...]``: print the counts."""
    args = list(sys.argv[1:] if argv is None else argv)
    from .micro import CASES

    for name in args or list(CASES):
        if name not in CASES:
            print(f"no such micro figure: {name}; choose from: {', '.join(CASES)}",
                  file=sys.stderr)
            return 2
        base, subj = measure(name)
        print(f"{name}: {base:,.0f} -> {subj:,.0f} instructions/op, ratio {subj / base:.3f}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
