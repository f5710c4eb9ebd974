"""Load: many requests at once, reused pools, and not one store in the wrong place.

Every check counts mismatches (a greenlet or task that saw anything but
its own request's store) and losses (work that never reported), and the
test asserts both are zero. Sleeps are random but seeded, so a failure
replays. Loads are bounded in count and in time.
"""

from __future__ import annotations

import json
import random
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextvars import ContextVar
from typing import Any, Callable

import gevent
import gevent.event
import gevent.pool
import gevent.threadpool
import pytest

from asl_gevent import AsyncLocalStorage

from helpers import run_scenario

A: AsyncLocalStorage[str] = AsyncLocalStorage(name="load-a")
B: AsyncLocalStorage[str] = AsyncLocalStorage(name="load-b")
VAR: ContextVar[str] = ContextVar("load_var", default="var-unset")

SEED = 20240611


def wait_future(future: Future[Any], timeout: float = 30) -> Any:
    """Wait for an executor future without blocking this thread's hub."""
    deadline = time.monotonic() + timeout
    while not future.done():
        assert time.monotonic() < deadline, "executor task did not finish"
        gevent.sleep(0.001)
    return future.result()


@pytest.mark.slow
def test_10k_greenlets_in_100_simultaneous_requests() -> None:
    """100 requests at once, 100 greenlets each (10,000 alive together), with
    seeded random sleeps, enter_with, nested runs, other storages and
    contextvars, grandchildren and links: zero mismatches, zero losses."""
    rng = random.Random(SEED)
    delays = {(r, c): [rng.random() / 200 for _ in range(3)] for r in range(100) for c in range(100)}
    mismatches: list[Any] = []
    done: set[tuple[int, int]] = set()
    alive = 0
    peak_alive = 0
    all_in_flight = gevent.event.Event()

    def check(where: tuple[Any, ...], expected: tuple[str, str, str]) -> None:
        got = (A.get_store(), B.get_store(), VAR.get())
        if got != expected:
            mismatches.append((where, got, expected))

    def child(r: int, c: int) -> None:
        nonlocal alive, peak_alive
        alive += 1
        peak_alive = max(peak_alive, alive)
        expected = (f"r{r}", f"r{r}-b", f"r{r}-var")
        check((r, c, "start"), expected)
        if alive == 10_000:
            all_in_flight.set()
        all_in_flight.wait(30)  # so that all 10,000 really are in flight together
        check((r, c, "in flight"), expected)
        if c % 2:
            A.enter_with(f"r{r}-c{c}")
            VAR.set(f"r{r}-c{c}-var")
            expected = (f"r{r}-c{c}", f"r{r}-b", f"r{r}-c{c}-var")
        for step, delay in enumerate(delays[(r, c)]):
            gevent.sleep(delay)
            check((r, c, step), expected)
            if step == 1 and c % 5 == 0:
                B.run(f"r{r}-c{c}-nested", check, (r, c, "nested"),
                      (expected[0], f"r{r}-c{c}-nested", expected[2]))
                grandchild = gevent.spawn(check, (r, c, "grandchild"), expected)
                linked = gevent.event.Event()
                def on_done(_: Any, r: int = r, c: int = c, expected: Any = expected) -> None:
                    check((r, c, "link"), expected)
                    linked.set()

                grandchild.link(on_done)
                grandchild.join()
                if not linked.wait(5):
                    mismatches.append(((r, c, "link"), "callback never ran", expected))
        alive -= 1
        done.add((r, c))

    def request(r: int) -> None:
        B.enter_with(f"r{r}-b")
        VAR.set(f"r{r}-var")
        gevent.joinall([gevent.spawn(child, r, c) for c in range(100)], raise_error=True)
        check((r, "after"), (f"r{r}", f"r{r}-b", f"r{r}-var"))

    started = time.monotonic()
    requests = [gevent.spawn(A.run, f"r{r}", request, r) for r in range(100)]
    gevent.joinall(requests, timeout=60, raise_error=True)
    assert all(g.dead for g in requests), f"not done after {time.monotonic() - started:.0f}s"
    assert mismatches[:5] == [] and len(mismatches) == 0
    assert len(done) == 10_000
    assert peak_alive == 10_000
    assert (A.get_store(), B.get_store(), VAR.get()) == (None, None, "var-unset")


# -- reused pools ---------------------------------------------------------------------


def _task(tag: str, delay: float) -> tuple[str, Any, Any]:
    """A pool task: what it sees, after a delay that shuffles the workers."""
    if delay:
        time.sleep(delay) if tag == "thread" else gevent.sleep(delay)
    return tag, A.get_store(), VAR.get()


def _many_requests(submit: Callable[[str, float], Any], wait: Callable[[Any], Any],
                   tag: str, requests: int = 40, tasks: int = 10) -> list[Any]:
    """Run *requests* requests at once, each submitting *tasks* tasks through
    *submit*; return the (request, expected, got) triples that disagree."""
    rng = random.Random(SEED)
    delays = [[rng.random() / 500 for _ in range(tasks)] for _ in range(requests)]
    wrong: list[Any] = []
    reported = 0

    def request(r: int) -> None:
        nonlocal reported
        VAR.set(f"req-{r}-var")
        handles = [submit(tag, delays[r][t]) for t in range(tasks)]
        for handle in handles:
            got = wait(handle)
            reported += 1
            if got != (tag, f"req-{r}", f"req-{r}-var"):
                wrong.append((r, got))

    greenlets = [gevent.spawn(A.run, f"req-{r}", request, r) for r in range(requests)]
    gevent.joinall(greenlets, timeout=60, raise_error=True)
    assert all(g.dead for g in greenlets)
    assert reported == requests * tasks
    return wrong


def test_reused_gevent_pool_never_runs_a_task_in_another_request() -> None:
    """One gevent Pool(8), filled by request "first" and then shared by 40
    simultaneous requests (spawn blocks while the pool is full): every task,
    apply_async callback and imap result belongs to its submitter."""
    pool = gevent.pool.Pool(8)
    hold = gevent.event.Event()
    first = [A.run("first", pool.spawn, hold.wait) for _ in range(8)]
    callbacks: list[Any] = []

    def submit(tag: str, delay: float) -> Any:
        expected = A.get_store()
        pool.apply_async(_task, (tag, delay),
                         callback=lambda _: callbacks.append((expected, A.get_store())))
        return pool.spawn(_task, tag, delay)

    releaser = gevent.spawn_later(0.01, hold.set)
    wrong = _many_requests(submit, lambda g: g.get(timeout=30), "greenlet")
    releaser.join()
    gevent.joinall(first)
    pool.join(timeout=30)
    # apply_async callbacks run from a link, after the pool let go of the task.
    deadline = time.monotonic() + 10
    while len(callbacks) < 400 and time.monotonic() < deadline:
        gevent.sleep(0.001)
    assert wrong == []
    assert len(callbacks) == 400 and all(expected == got for expected, got in callbacks)
    imapped = A.run("imap", lambda: list(pool.imap_unordered(lambda _: A.get_store(), range(50))))
    assert imapped == ["imap"] * 50


def test_reused_gevent_threadpool_never_runs_a_task_in_another_request() -> None:
    """A gevent ThreadPool(4) whose worker threads were started during request
    "first" runs each of 400 tasks from 40 simultaneous requests in exactly
    its submitter's stores, and outside requests in none."""
    pool = gevent.threadpool.ThreadPool(4)
    try:
        assert A.run("first", lambda: [pool.spawn(_task, "thread", 0.001) for _ in range(4)]
                     )[0].get(timeout=10)[1] == "first"
        wrong = _many_requests(lambda tag, d: pool.spawn(_task, tag, d),
                               lambda r: r.get(timeout=30), "thread")
        assert wrong == []
        assert pool.spawn(_task, "thread", 0).get(timeout=10) == ("thread", None, "var-unset")
    finally:
        pool.kill()


def test_reused_executor_never_runs_a_task_in_another_request() -> None:
    """A ThreadPoolExecutor(4) whose workers were started during request
    "first": 400 tasks from 40 simultaneous requests each see exactly their
    submitter's stores; a task submitted outside any request sees none."""
    with ThreadPoolExecutor(max_workers=4) as executor:
        firsts = A.run("first", lambda: [executor.submit(_task, "thread", 0.002)
                                         for _ in range(4)])
        assert [wait_future(f)[1] for f in firsts] == ["first"] * 4
        wrong = _many_requests(lambda tag, d: executor.submit(_task, tag, d),
                               wait_future, "thread")
        assert wrong == []
        assert wait_future(executor.submit(_task, "thread", 0)) == ("thread", None, "var-unset")


# -- patched process ---------------------------------------------------------------------


@pytest.mark.slow
def test_patched_threads_executor_and_queue_workers_under_load() -> None:
    """Under monkey.patch_all: 40 simultaneous requests start threads and
    Timers, submit to an executor made at import (workers started during the
    first request) and to a queue worker started by request 0. Threads,
    timers, executor tasks and bind()-wrapped queue jobs see exactly their
    request; an unbound queue job sees the worker's own (request 0's) context."""
    proc = run_scenario("load_patched", timeout=120)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["installed"] is True
    assert result["done"] is True
    assert (result["wrong"], result["n_wrong"]) == ([], 0)
    assert result["counts"] == {kind: 400 for kind in
                                ["thread", "timer", "executor", "queue+bind", "queue unbound"]}
    assert result["outside"] == [None, "var-unset"]
    assert result["main"] == [None, "var-unset"]
