"""The performance targets, asserted on instruction counts (issue 17).

Wall-clock ratios swing by 10% on a shared machine, so the benchmark's own
test (test_bench.py) checks only the shape of its table. Instruction counts
from callgrind repeat to 0.1%, so these tests hold the code to SPEC's
targets and a regression cannot land: each runs one row of
``python -m asl_gevent.bench`` through :func:`asl_gevent.bench.instructions.measure`
(both sides in child processes under valgrind, at two loop counts).

They need valgrind: skipped without it, except in CI (``CI`` set), where
``.ci/run`` installs it and a missing valgrind is a failure.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from typing import Tuple

import pytest

import asl_gevent
from asl_gevent.bench import instructions
from helpers import ROOT

pytestmark = pytest.mark.slow

#: The rows that take minutes under callgrind run once, on CI's default
#: CPython (tox's environments deselect them with ``-m "not instructions"``);
#: the get_store rows, whose figure differs by CPython, run on every one.
ONCE = pytest.mark.instructions

if not instructions.available():
    if os.environ.get("CI"):
        raise RuntimeError("CI must have valgrind for tests/test_instructions.py "
                           "(.ci/run installs Debian's)")
    pytest.skip("valgrind is not installed", allow_module_level=True)

_measured: dict[str, Tuple[float, float]] = {}


def ratio(name: str) -> float:
    """Instructions per operation, subject / baseline, of bench row *name*."""
    if name not in _measured:
        _measured[name] = instructions.measure(name)
    base, subj = _measured[name]
    return subj / base


#: CPython 3.11 specialises the lookup before a call (LOAD_METHOD) only for a
#: method found on the class; the pure-Python storage (a slot) reads at about
#: 1.7x there, the compiled one (a C method) at 0.95x. A known miss of the
#: pure-Python class (docs/performance.rst), strict: fixing it shows up.
MISSED_ON_311 = pytest.mark.xfail(
    sys.version_info[:2] == (3, 11) and not asl_gevent.SPEEDUPS, strict=True,
    reason="CPython 3.11 cannot specialise a slot read before a call: the "
           "pure-Python get_store is 1.71x ContextVar.get there (docs/performance.rst)")


@MISSED_ON_311
def test_get_store_within_1_2x_contextvar_get() -> None:
    """``als.get_store()`` costs at most 1.2x a raw ``ContextVar.get()``."""
    assert ratio("get_store/contextvar") <= 1.2


@MISSED_ON_311
def test_get_store_in_a_crowded_context() -> None:
    """The same with 100 storages and 100 other variables set: a lookup in a
    bigger context costs both sides alike."""
    assert ratio("get_store/storages_100") <= 1.2


#: The pure-Python hooks (no C compiler at install time, or
#: ``ASL_GEVENT_PUREPYTHON=1``) miss the spawn target by ~0.25k instructions.
MISSED_IN_PURE_PYTHON = pytest.mark.xfail(
    not asl_gevent.SPEEDUPS, strict=False,
    reason="a known miss of the pure-Python hooks: 1.105-1.117x (docs/performance.rst); "
           "not strict, as the baseline moves by +-0.002 between runs")


@ONCE
@MISSED_IN_PURE_PYTHON
def test_spawn_join_within_1_10x() -> None:
    """``gevent.spawn(f).join()`` with the hooks costs at most 1.10x without,
    from a shallow stack (SPEC's target). The children run the hooks this
    process runs (compiled unless ``ASL_GEVENT_PUREPYTHON=1``)."""
    assert ratio("spawn/gevent") <= 1.10


@ONCE
def test_spawn_join_no_worse_than_today() -> None:
    """What 0.3 measures is the floor a change may not go above, so a
    regression cannot land. Counts are exact on one machine but not across
    machines (the C library's copy routines differ by CPU; CI's machine
    counted 1.117x where this one counts 1.107x): compiled 1.062x here
    (1.09 leaves that ~1% and some room), pure Python 1.105-1.117x (1.13)."""
    assert ratio("spawn/gevent") <= (1.09 if asl_gevent.SPEEDUPS else 1.13)


@ONCE
def test_pool_spawn_and_joinall_within_0_03_of_spawn() -> None:
    """``Pool.spawn+join`` and ``joinall`` of 100 stay within 0.03 of spawn+join."""
    spawn = ratio("spawn/gevent")
    assert ratio("spawn/pool") <= spawn + 0.03
    assert ratio("spawn/joinall_100") <= spawn + 0.03


@ONCE
def test_asyncresult_costs_nothing() -> None:
    """gevent's own waits never reach a hook: AsyncResult set + get is unchanged
    (within the spawn rows' ~1% noise: the hub loop polls)."""
    assert ratio("spawn/asyncresult") <= 1.02


@ONCE
def test_run_within_2x_token_wrapper() -> None:
    """``als.run(store, f)`` costs at most 2x a hand-written token set/reset."""
    assert ratio("run/token_wrapper") <= 2.0


@ONCE
def test_hand_written_floor_is_below_the_hooks() -> None:
    """The floor is what a careful user writes by hand,
    ``spawn(copy_context().run, f)``: it costs something, and the hooks'
    extra cost over it is what the docs quote."""
    floor = ratio("spawn/floor")
    assert 1.0 < floor < ratio("spawn/gevent")


# -- the other helpers' targets, run here so CI shows them ---------------------------


@ONCE
def test_gunicorn_request_cost_at_least_0_97_of_stock() -> None:
    """``tools/request_cost.py stock asl``: gunicorn's gevent worker with our
    worker class + middleware (echoed header on) costs at most 1/0.97 the
    stock worker's instructions per request (SPEC)."""
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "request_cost.py"),
                           "stock", "asl"], capture_output=True, text=True, timeout=1800,
                          cwd=str(ROOT))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    match = re.search(r"^asl\s.*ratio (\d+\.\d+)$", proc.stdout, re.M)
    assert match, proc.stdout
    assert float(match.group(1)) >= 0.97, proc.stdout


@ONCE
def test_requests_get_with_http_within_1_02x() -> None:
    """``requests.get`` to a local server with ``asl_gevent.http`` on costs at
    most 1.02x off, in instructions per call (``tools/http_cost.py``: the
    client under callgrind at two call counts, the server untraced)."""
    pytest.importorskip("requests")
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "http_cost.py"), "requests.get"],
                          capture_output=True, text=True, timeout=900, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    match = re.search(r"^requests\.get\s.*ratio (\d+\.\d+)", proc.stdout, re.M)
    assert match, proc.stdout
    assert float(match.group(1)) <= 1.02, proc.stdout
