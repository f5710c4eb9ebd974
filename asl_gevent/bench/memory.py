"""Memory: a million greenlets with stores, and every store collected."""

from __future__ import annotations

import ctypes
import gc
import json
import subprocess
import sys
import time
import weakref
from typing import Callable, Iterator, Optional

import gevent

from .._storage import AsyncLocalStorage
from ._core import Options, Processes, Row, Target, output_of

# -- memory -------------------------------------------------------------------------

__all__ = ["memory_rows", "memory_main"]


def memory_rows(opts: Options, wanted: Callable[[str], bool]) -> Iterator[Row]:
    if not any(wanted(name) for name in ("memory/rss", "memory/blocks", "memory/stores")):
        return
    procs = Processes()
    try:
        proc = procs.start([sys.executable, "-m", "asl_gevent.bench", "--_memory",
                            str(opts.greenlets), "--_batch", str(opts.batch)],
                           stdout=subprocess.PIPE)
        try:
            out, _ = proc.communicate(timeout=max(120, opts.greenlets / 2000))
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"memory run timed out:\n{output_of(proc)}") from None
        if proc.returncode:
            raise RuntimeError(f"memory run failed ({proc.returncode}):\n{output_of(proc)}")
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


def memory_main(total: int, batch: int) -> None:
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

