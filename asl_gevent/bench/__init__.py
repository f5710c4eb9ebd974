"""Measure the performance targets: ``python -m asl_gevent.bench``.

The targets, and the figures measured, are on the docs' performance page
(``docs/performance.rst``).

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
``--callgrind`` / ``--no-callgrind``
    count (or not) every micro row's instructions per operation with
    valgrind's callgrind (:mod:`.instructions`), shown next to the wall
    ratios; the micro rows' targets are judged on them. Default: counted in
    a full run when ``valgrind`` is on ``PATH``, not in a ``--quick`` one.
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

Modules: :mod:`._core` (paired sampling, rows, the table, process helpers),
:mod:`.micro` (``get_store``, spawn, ``run``), :mod:`.instructions` (their
instruction counts under callgrind), :mod:`.servers` (WSGI servers
under load), :mod:`.memory` (a million greenlets), :mod:`.__main__` (the
figure list and the command line).

.. versionadded:: 0.1
.. versionchanged:: 0.2
   A subpackage, one module per family of figures.
.. versionchanged:: 0.3
   Instruction counts (callgrind) next to the wall ratios of every micro
   row; rows ``spawn/deep``, ``spawn/floor``, ``spawn/joinall_100``.
"""

__all__: list[str] = []
