"""Microbenchmarks: ``get_store``, spawn + join, ``run``."""

from __future__ import annotations

import dataclasses
import threading
from concurrent.futures import ThreadPoolExecutor
from contextvars import Context, ContextVar, copy_context
from typing import Any, Callable, Iterator, List, Mapping, Tuple

import gevent
import gevent.local
import gevent.pool
from gevent.event import AsyncResult

from .._hooks import install, is_installed, uninstall
from .._storage import AsyncLocalStorage
from ._core import (Options, Row, Target, Variant, compile_loop, hooks_off, hooks_on,
                    in_context, noop, paired)

# -- get_store --------------------------------------------------------------------

__all__ = ["get_store_rows", "spawn_rows", "run_rows"]


def get_store_rows(opts: Options, wanted: Callable[[str], bool]) -> Iterator[Row]:
    target = Target("<=", 1.5)
    als: AsyncLocalStorage[object] = AsyncLocalStorage(name="bench")
    var: ContextVar[object] = ContextVar("bench.raw", default=None)
    context = copy_context()
    context.run(als.enter_with, {"id": 1})
    context.run(var.set, {"id": 1})
    unroll = 20
    subject = Variant(in_context(context, compile_loop(["als.get_store()"] * unroll, {"als": als})))

    if wanted("get_store/contextvar"):
        raw = Variant(in_context(context, compile_loop(["var.get()"] * unroll, {"var": var})))
        yield Row("get_store/contextvar", "als.get_store() vs ContextVar.get()", "s",
                  *paired(raw, subject, opts, unroll), target)

    if wanted("get_store/gevent_local"):
        gloc = gevent.local.local()
        gloc.store = {"id": 1}
        base = Variant(compile_loop(["gloc.store"] * unroll, {"gloc": gloc}))
        yield Row("get_store/gevent_local",
                  "als.get_store() vs gevent.local.local attribute (>= 2.5x faster)", "s",
                  *paired(base, subject, opts, unroll), Target("<=", 0.4))

    if wanted("get_store/threading_local"):
        tloc = threading.local()
        tloc.store = {"id": 1}
        base = Variant(compile_loop(["tloc.store"] * unroll, {"tloc": tloc}))
        yield Row("get_store/threading_local", "als.get_store() vs threading.local attribute",
                  "s", *paired(base, subject, opts, unroll), None)

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
                  "s", *paired(Variant(in_context(crowd, compile_loop(body_r, env_r))),
                                Variant(in_context(crowd, compile_loop(body_s, env_s))),
                                opts, len(body_s)), target)


# -- spawn + join -----------------------------------------------------------------


def spawn_rows(opts: Options, wanted: Callable[[str], bool]) -> Iterator[Row]:
    target = Target("<=", 1.05)
    was_installed = is_installed()
    context = copy_context()  # a request-like context: one store set
    als: AsyncLocalStorage[object] = AsyncLocalStorage(name="bench.spawn")
    context.run(als.enter_with, {"id": 1})
    try:
        def pair(body: str, env: Mapping[str, Any]) -> Tuple[List[float], List[float]]:
            sampler = in_context(context, compile_loop([body], dict(env, f=noop)))
            return paired(Variant(sampler, hooks_off), Variant(sampler, hooks_on), opts)

        if wanted("spawn/gevent"):
            yield Row("spawn/gevent", "gevent.spawn(f).join(): hooks vs no hooks", "s",
                      *pair("spawn(f).join()", {"spawn": gevent.spawn}), target)

        if wanted("spawn/pool"):
            pool = gevent.pool.Pool(10)
            yield Row("spawn/pool", "Pool.spawn(f).join(): hooks vs no hooks", "s",
                      *pair("pool.spawn(f).join()", {"pool": pool}), target)

        if wanted("spawn/asyncresult"):
            # A waiter blocks in get() until a loop callback sets the result:
            # gevent's own wait, which links the waiter's switch from compiled
            # code and never reaches the rawlink hook.
            yield Row("spawn/asyncresult",
                      "AsyncResult: set(1) from a loop callback + get(): hooks vs no hooks",
                      "s", *pair("r = AsyncResult(); run_callback(r.set, 1); r.get()",
                                 {"AsyncResult": AsyncResult,
                                  "run_callback": gevent.get_hub().loop.run_callback}),
                      target)

        if wanted("spawn/wait"):
            # The same through gevent.wait([r]): its waiter's method does reach
            # the AbstractLinkable.rawlink hook, which passes it through.
            yield Row("spawn/wait",
                      "gevent.wait([AsyncResult]) set from a loop callback: hooks vs no hooks",
                      "s", *pair("r = AsyncResult(); run_callback(r.set, 1); wait([r])",
                                 {"AsyncResult": AsyncResult, "wait": gevent.wait,
                                  "run_callback": gevent.get_hub().loop.run_callback}),
                      target)

        if wanted("spawn/executor"):
            # A batch of tasks, then their results: one submit + result round
            # trip per task would time mostly how soon the OS wakes a thread
            # (+-10% on a shared machine), not what the hook adds to each task.
            # Longer samples, too: thread hand-offs make short ones noisy.
            with ThreadPoolExecutor(max_workers=1) as executor:
                batch = in_context(context, compile_loop(
                    ["for _f in [executor.submit(f) for _ in range100]: _f.result()"],
                    {"executor": executor, "f": noop, "range100": range(100)}))

                def sampler(n: int) -> float:
                    return batch(n) / 100
                yield Row("spawn/executor",
                          "ThreadPoolExecutor: 100 x submit(f), then each result(): "
                          "hooks vs no hooks (per task)", "s",
                          *paired(Variant(sampler, hooks_off), Variant(sampler, hooks_on),
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
            loop = compile_loop(["spawn(f).join()"], {"spawn": gevent.spawn, "f": noop})
            yield Row("spawn/contextvars_100",
                      "spawn+join (hooks) with 100 contextvars set vs 1", "s",
                      *paired(Variant(in_context(one, loop), hooks_on),
                               Variant(in_context(hundred, loop), hooks_on), opts), target)
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


def run_rows(opts: Options, wanted: Callable[[str], bool]) -> Iterator[Row]:
    if not wanted("run/token_wrapper"):
        return
    als: AsyncLocalStorage[object] = AsyncLocalStorage(name="bench.run")
    var: ContextVar[object] = ContextVar("bench.run.raw", default=None)
    context = copy_context()
    unroll = 10
    env = {"als": als, "wrapper": _token_run(var), "store": {"id": 1}, "f": noop}
    base = Variant(in_context(context, compile_loop(["wrapper(store, f)"] * unroll, env)))
    subj = Variant(in_context(context, compile_loop(["als.run(store, f)"] * unroll, env)))
    yield Row("run/token_wrapper", "als.run(store, f) vs token set/try/finally reset", "s",
              *paired(base, subj, opts, unroll), Target("<=", 2.0))

