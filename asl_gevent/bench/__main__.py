"""``python -m asl_gevent.bench``: the figures, the options, the report."""

from __future__ import annotations

import argparse
import sys
from contextvars import copy_context
from typing import Dict, List, Optional, Sequence, Tuple

from ._core import SKIPPED, Figures, Options, Row, machine, table
from .imports import import_rows
from .memory import memory_main, memory_rows
from . import instructions
from .micro import CASES, get_store_rows, run_rows, spawn_rows
from .servers import client_main, wsgi_rows
from .xproc import xproc_rows
from .celery_publish import publish_rows

__all__ = ["FIGURES", "NAMES", "main"]


#: Every figure name, in table order, and the function that measures it.
FIGURES: List[Tuple[Tuple[str, ...], Figures]] = [
    (tuple(n for n in CASES if n.startswith("get_store/")), get_store_rows),
    (tuple(n for n in CASES if n.startswith("spawn/")), spawn_rows),
    (("run/token_wrapper",), run_rows),
    (("import/asl_gevent",), import_rows),
    (("wsgi/gunicorn", "wsgi/gunicorn_cpu", "wsgi/leak_watch", "wsgi/leak_watch_cpu",
      "wsgi/pywsgi", "wsgi/pywsgi_cpu"), wsgi_rows),
    (("memory/rss", "memory/blocks", "memory/stores"), memory_rows),
    (("http/requests_get", "celery/solo"), xproc_rows),
    (("celery/publish_5mb",), publish_rows),
]
NAMES = [name for names, _ in FIGURES for name in names]



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
    # Instruction counts: by default in a full run where valgrind is installed.
    opts.callgrind = (args.callgrind if args.callgrind is not None
                      else not args.quick and instructions.available())
    if args.greenlets is not None:
        opts.greenlets = args.greenlets
    return opts


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m asl_gevent.bench",
        description="Measure asl_gevent against its performance targets "
                    "(docs/performance.rst); print one table of "
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
    parser.add_argument("--callgrind", action="store_true", default=None,
                        help="count the micro rows' instructions with valgrind's callgrind "
                             "(default in a full run when valgrind is installed)")
    parser.add_argument("--no-callgrind", action="store_false", dest="callgrind",
                        help="wall-clock ratios only")
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
        client_main()
        return 0
    if args._memory is not None:
        memory_main(args._memory, args._batch)
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

    if args.callgrind and not instructions.available():
        parser.error("--callgrind needs valgrind on PATH (Debian: apt-get install valgrind)")
    opts = _options(args)
    print("\n".join(machine()))
    print(f"mode: {'quick' if opts.quick else 'full'}; {opts.repeat} pairs per "
          f"microbenchmark, {opts.rounds} load rounds per server; ratios are "
          "subject / baseline; instructions: "
          f"{'callgrind' if opts.callgrind else 'not counted'}")
    sys.stdout.flush()
    rows: List[Row] = []
    failures: List[str] = []
    for names, figures in FIGURES:
        if not any(wanted(n) for n in names):
            continue
        print(f"measuring {', '.join(n for n in names if wanted(n))} ...", file=sys.stderr,
              flush=True)
        measured: List[Row] = []

        def measure() -> None:
            # Row by row: rows measured before a figure fails are still shown.
            measured.extend(figures(opts, wanted))

        try:
            copy_context().run(measure)
        except Exception as exc:  # a broken figure must not hide the others
            failing = ", ".join(n for n in names if wanted(n) and n not in
                                {row.name for row in measured})
            failures.append(f"{failing}: {type(exc).__name__}: {exc}")
        rows.extend(measured)
    print()
    print("\n".join(table(rows)))
    print()
    notes: Dict[str, List[str]] = {}
    for row in rows:
        if row.note:
            notes.setdefault(row.note, []).append(row.name)
    for note, noted in notes.items():
        print(f"{', '.join(noted)}: {note}")
    print("instr: ratio of instructions per operation (callgrind; the micro rows' "
          "targets are judged on it when counted); min: ratio of the best samples (least "
          "time per op, most req/s); median: median of per-pair ratios; pass* = min "
          "meets the target, median does not")
    misses = [r for r in rows if r.mark == "MISS"]
    noisy = [r for r in rows if r.mark == "pass*"]
    for row in misses:
        instr = "" if row.ratio_instr is None else f"instructions {row.ratio_instr:.3f}, wall "
        print(f"MISSED TARGET: {row.name}: {instr}{row.ratio_min:.3f} (median "
              f"{row.ratio_median:.3f}), target {row.targets}")
    for row in noisy:
        print(f"noisy: {row.name}: min {row.ratio_min:.3f} meets {row.targets}, "
              f"median {row.ratio_median:.3f} does not")
    for skipped in SKIPPED:
        print(skipped)
    for failure in failures:
        print(f"FAILED TO MEASURE: {failure}")
    if not (misses or noisy or failures):
        print("all targets met")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
