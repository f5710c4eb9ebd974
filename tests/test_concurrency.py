"""Concurrency: real OS threads, several hubs, thread pools and asyncio at once.

The pytest process is not monkey-patched, so ``threading.Thread`` here is a
real OS thread. Each thread that uses gevent gets its own hub; the hooks are
process-wide and must keep every thread's (and every greenlet's) stores to
itself while all of them run at the same time.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from typing import Any, Callable

import gevent
import gevent.event
import pytest

from asl_gevent import AsyncLocalStorage

A: AsyncLocalStorage[str] = AsyncLocalStorage(name="concurrency-a")
B: AsyncLocalStorage[str] = AsyncLocalStorage(name="concurrency-b")
VAR: ContextVar[str] = ContextVar("concurrency_var", default="var-unset")

THREADS = 4
GREENLETS_PER_THREAD = 50


def run_threads(target: Callable[[int], None], count: int = THREADS) -> None:
    """Run *target(i)* in *count* real threads at once; re-raise the first
    error here (a thread's exception would otherwise only be printed)."""
    errors: list[BaseException] = []
    barrier = threading.Barrier(count)

    def main(i: int) -> None:
        try:
            barrier.wait(timeout=10)
            target(i)
        except BaseException as exc:  # reported to the test below
            errors.append(exc)
        finally:
            # Each thread made its own hub; free it (and its loop) with the thread.
            hub = gevent.get_hub()
            hub.destroy(destroy_loop=True)

    threads = [threading.Thread(target=main, args=(i,), name=f"hub-{i}") for i in range(count)]
    for t in threads:
        t.start()
    # Wait cooperatively, so greenlets of this (main) thread's hub run meanwhile.
    deadline = time.monotonic() + 60
    while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
        gevent.sleep(0.002)
    assert not any(t.is_alive() for t in threads), "a thread did not finish"
    if errors:
        raise errors[0]


def test_threads_with_own_hubs_keep_their_stores() -> None:
    """4 OS threads, each with its own hub, each serving its request with 50
    greenlets (nested runs, enter_with, grandchildren, links, random sleeps)
    at the same time as the others: every greenlet saw exactly its own."""
    seen: dict[tuple[int, int, str], Any] = {}
    lock = threading.Lock()

    def record(key: tuple[int, int, str], value: Any) -> None:
        with lock:
            assert key not in seen, key
            seen[key] = value

    def child(t: int, i: int, rng: random.Random) -> None:
        record((t, i, "start"), (A.get_store(), B.get_store(), threading.get_ident()))
        B.enter_with(f"t{t}-g{i}-b")
        for step in range(3):
            gevent.sleep(rng.random() / 500)
            if A.get_store() != f"t{t}-g{i}" or B.get_store() != f"t{t}-g{i}-b":
                record((t, i, f"mismatch-{step}"), (A.get_store(), B.get_store()))
        grandchild = gevent.spawn(lambda: (A.get_store(), B.get_store()))
        linked = gevent.event.AsyncResult()
        grandchild.link(lambda _: linked.set((A.get_store(), B.get_store())))
        record((t, i, "grandchild"), grandchild.get(timeout=10))
        record((t, i, "link"), linked.get(timeout=10))

    def thread_main(t: int) -> None:
        rng = random.Random(t)

        def request() -> None:
            greenlets = [gevent.spawn(A.run, f"t{t}-g{i}", child, t, i, random.Random(i))
                         for i in range(GREENLETS_PER_THREAD)]
            gevent.joinall(greenlets, raise_error=True)
            record((t, -1, "request-after"), (A.get_store(), B.get_store()))

        gevent.sleep(rng.random() / 1000)
        A.run(f"thread-{t}", B.run, f"thread-{t}-b", request)
        record((t, -1, "thread-after"), (A.get_store(), B.get_store()))

    run_threads(thread_main)

    mismatches = {k: v for k, v in seen.items() if k[2].startswith("mismatch")}
    assert mismatches == {}
    idents = {t: {seen[(t, i, "start")][2] for i in range(GREENLETS_PER_THREAD)}
              for t in range(THREADS)}
    assert all(len(ids) == 1 for ids in idents.values())
    assert len(set().union(*idents.values())) == THREADS
    for t in range(THREADS):
        assert seen.pop((t, -1, "request-after")) == (f"thread-{t}", f"thread-{t}-b")
        assert seen.pop((t, -1, "thread-after")) == (None, None)
        for i in range(GREENLETS_PER_THREAD):
            assert seen.pop((t, i, "start"))[:2] == (f"t{t}-g{i}", f"thread-{t}-b")
            assert seen.pop((t, i, "grandchild")) == (f"t{t}-g{i}", f"t{t}-g{i}-b")
            assert seen.pop((t, i, "link")) == (f"t{t}-g{i}", f"t{t}-g{i}-b")
    assert seen == {}


def test_threads_mixed_with_threadpools_and_a_shared_executor() -> None:
    """Greenlets in 4 OS threads submit to their own hub's ThreadPool and to
    one ThreadPoolExecutor shared by all threads, while the main thread does
    the same: each task saw exactly its submitter's stores."""
    shared = ThreadPoolExecutor(max_workers=3)
    seen: dict[tuple[str, int, str], Any] = {}
    lock = threading.Lock()

    def task(tag: str) -> tuple[str, Any, Any, str]:
        return tag, A.get_store(), B.get_store(), VAR.get()

    def request(owner: str, i: int) -> None:
        VAR.set(f"{owner}-{i}-var")
        pool = gevent.get_hub().threadpool
        results = [pool.spawn(task, "threadpool") for _ in range(3)]
        futures = [shared.submit(task, "executor") for _ in range(3)]
        got = [r.get(timeout=10) for r in results]
        got += [f.result(timeout=10) for f in futures]
        with lock:
            seen[(owner, i, "tasks")] = got

    def serve(owner: str) -> None:
        greenlets = [gevent.spawn(A.run, f"{owner}-{i}", B.run, f"{owner}-b", request, owner, i)
                     for i in range(20)]
        gevent.joinall(greenlets, raise_error=True)

    main_done = threading.Event()

    def in_main_thread() -> None:
        serve("main")
        main_done.set()

    try:
        main_greenlet = gevent.spawn(in_main_thread)
        run_threads(lambda t: serve(f"thread{t}"))
        main_greenlet.get(timeout=30)
    finally:
        shared.shutdown(wait=True)
    assert main_done.is_set()

    for owner in ["main", *(f"thread{t}" for t in range(THREADS))]:
        for i in range(20):
            expected = (f"{owner}-{i}", f"{owner}-b", f"{owner}-{i}-var")
            assert seen.pop((owner, i, "tasks")) == (
                [("threadpool", *expected)] * 3 + [("executor", *expected)] * 3)
    assert seen == {}


# -- asyncio ---------------------------------------------------------------------------


async def _handler(expected: str, rng: random.Random, mismatches: list[Any]) -> str:
    """Check the task's store across awaits, nested runs and subtasks."""
    i = expected
    for step in range(4):
        await asyncio.sleep(rng.random() / 1000)
        if A.get_store() != expected:
            mismatches.append((i, step, A.get_store()))
    inner = await B.run(f"inner-{i}", _inner, expected)
    if inner != (expected, f"inner-{i}") or B.get_store() is not None:
        mismatches.append((i, "inner", inner, B.get_store()))
    subtasks = await asyncio.gather(*(asyncio.create_task(_read(rng)) for _ in range(3)))
    if subtasks != [expected] * 3:
        mismatches.append((i, "subtasks", subtasks))
    in_thread = await asyncio.to_thread(A.get_store)
    in_executor = await asyncio.get_running_loop().run_in_executor(None, A.get_store)
    if (in_thread, in_executor) != (expected, expected):
        mismatches.append((i, "threads", in_thread, in_executor))
    in_greenlet = gevent.spawn(A.get_store).get(timeout=5)
    if in_greenlet != expected:
        mismatches.append((i, "greenlet", in_greenlet))
    return expected


async def _inner(expected: str) -> tuple[Any, Any]:
    await asyncio.sleep(0)
    A.enter_with(expected)  # same value, a new binding: only B differs here
    await asyncio.sleep(0)
    return A.get_store(), B.get_store()


async def _read(rng: random.Random) -> Any:
    await asyncio.sleep(rng.random() / 1000)
    return A.get_store()


def _serve_with_asyncio(request: str, tasks: int, mismatches: list[Any]) -> list[str]:
    """What a greenlet does: run an event loop with *tasks* concurrent tasks,
    each in ``await A.run(store, handler)``."""
    async def one(i: int) -> str:
        before = A.get_store()
        result = await A.run(f"{request}-task-{i}", _handler, f"{request}-task-{i}",
                             random.Random(i), mismatches)
        if A.get_store() != before:
            mismatches.append((i, "after", A.get_store(), before))
        return result

    async def main() -> list[str]:
        if A.get_store() != request:
            mismatches.append(("main", A.get_store()))
        return list(await asyncio.gather(*(one(i) for i in range(tasks))))

    return asyncio.run(main())


def test_asyncio_loops_inside_greenlets() -> None:
    """Several greenlets, each in its own request, each run an asyncio loop
    with 30 concurrent tasks; each task keeps its store across awaits, nested
    runs, subtasks, to_thread, run_in_executor and greenlets it spawns.

    One greenlet after the other: a task that waits on a greenlet switches
    to the hub, and a second ``asyncio.run`` started from there would find
    the first loop running in this thread.
    """
    mismatches: list[Any] = []
    results = [
        gevent.spawn(A.run, f"req-{r}", _serve_with_asyncio, f"req-{r}", 30, mismatches)
        .get(timeout=60)
        for r in range(4)]
    assert mismatches == []
    assert results == [[f"req-{r}-task-{i}" for i in range(30)] for r in range(4)]
    assert A.get_store() is None


def test_await_run_across_awaits_with_many_concurrent_tasks() -> None:
    """200 concurrent tasks, each awaiting A.run(own store, handler) with
    random sleeps: no task ever sees another's store, before, during or after."""
    mismatches: list[Any] = []
    results = _serve_with_asyncio_plain(200, mismatches)
    assert mismatches == []
    assert results == [f"task-{i}" for i in range(200)]


def _serve_with_asyncio_plain(tasks: int, mismatches: list[Any]) -> list[str]:
    async def one(i: int) -> str:
        result = await A.run(f"task-{i}", _handler_light, i, random.Random(i), mismatches)
        if A.get_store() is not None:
            mismatches.append((i, "after", A.get_store()))
        return result

    async def main() -> list[str]:
        return list(await asyncio.gather(*(one(i) for i in range(tasks))))

    return asyncio.run(main())


async def _handler_light(i: int, rng: random.Random, mismatches: list[Any]) -> str:
    expected = f"task-{i}"
    for step in range(5):
        await asyncio.sleep(rng.random() / 1000)
        if A.get_store() != expected:
            mismatches.append((i, step, A.get_store()))
        if step == 2:
            nested = await A.run(f"{expected}-nested", _read, rng)
            if nested != f"{expected}-nested" or A.get_store() != expected:
                mismatches.append((i, "nested", nested, A.get_store()))
    return expected


@pytest.mark.parametrize("create", ["create_task", "ensure_future", "await"])
def test_run_coroutine_is_a_real_coroutine_in_every_task_api(create: str) -> None:
    """``als.run(store, async_fn)`` gives a coroutine that create_task,
    ensure_future and plain await all accept; 50 at once stay apart."""
    async def handler(i: int) -> Any:
        await asyncio.sleep(random.Random(i).random() / 1000)
        return A.get_store()

    async def main() -> list[Any]:
        coros = [A.run(f"s{i}", handler, i) for i in range(50)]
        if create == "create_task":
            return list(await asyncio.gather(*(asyncio.create_task(c) for c in coros)))
        if create == "ensure_future":
            return list(await asyncio.gather(*(asyncio.ensure_future(c) for c in coros)))
        return [await c for c in coros]

    assert asyncio.run(main()) == [f"s{i}" for i in range(50)]


def test_asyncio_loops_in_several_os_threads() -> None:
    """asyncio loops in 4 OS threads at once, each inside a greenlet of that
    thread's hub: tasks in different threads never see each other's stores."""
    results: dict[int, list[str]] = {}
    mismatches: list[Any] = []

    def thread_main(t: int) -> None:
        g = gevent.spawn(A.run, f"req-{t}", _serve_with_asyncio, f"req-{t}", 20, mismatches)
        results[t] = g.get(timeout=60)

    run_threads(thread_main)
    assert mismatches == []
    assert results == {t: [f"req-{t}-task-{i}" for i in range(20)] for t in range(THREADS)}
