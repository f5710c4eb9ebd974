"""AsyncLocalStorage and AsyncResource semantics (ported from Node's tests).

Node: test/async-hooks/test-async-local-storage-*.js. Where Node uses
``setImmediate``/``process.nextTick`` we spawn a greenlet.
"""

from __future__ import annotations

import asyncio
import contextvars
from typing import Any, Optional, Tuple

import gevent
import pytest

import asl_gevent
from asl_gevent import AsyncLocalStorage, AsyncResource

other_var: contextvars.ContextVar[str] = contextvars.ContextVar("other_var", default="unset")


def spawned(fn: Any, *args: Any) -> Any:
    """Run *fn* in a spawned greenlet and return its result (the hub only
    prints a failing greenlet's error; ``get()`` re-raises it here)."""
    return gevent.spawn(fn, *args).get(timeout=5)


# -- run ------------------------------------------------------------------------


def test_run_passes_args_and_returns_result(als: AsyncLocalStorage[Any]) -> None:
    """run(store, fn, *args, **kwargs) calls fn with them and returns its result."""
    def fn(a: int, b: int, *, c: int) -> tuple[Any, int]:
        return als.get_store(), a + b + c

    assert als.run("s", fn, 1, 2, c=3) == ("s", 6)
    assert als.get_store() is None


@pytest.mark.parametrize("store", [0, "", False, None, 42, "str", [1], {"k": "v"}, object()])
def test_any_value_is_a_store(als: AsyncLocalStorage[Any], store: Any) -> None:
    """Node's misc-stores test: falsy and arbitrary values are stores too."""
    assert als.run(store, als.get_store) is store
    assert als.run(store, spawned, als.get_store) is store


def test_store_is_shared_by_reference(als: AsyncLocalStorage[dict[str, str]]) -> None:
    """The store object is shared (as in Node): a child's mutation is visible."""
    store: dict[str, str] = {}

    def handler() -> None:
        spawned(lambda: als.get_store().__setitem__("child", "wrote"))  # type: ignore[union-attr]

    als.run(store, handler)
    assert store == {"child": "wrote"}


def test_nested_run(als: AsyncLocalStorage[str]) -> None:
    """Inner run shadows the outer store and restores it afterwards."""
    seen = []

    def outer() -> None:
        seen.append(als.get_store())
        als.run("inner", lambda: seen.append(als.get_store()))
        seen.append(als.get_store())

    als.run("outer", outer)
    assert seen == ["outer", "inner", "outer"]
    assert als.get_store() is None


def test_run_restores_after_exception(als: AsyncLocalStorage[str]) -> None:
    """An error raised in fn propagates unchanged and the frame is restored."""
    class Boom(Exception):
        pass

    def fail() -> None:
        als.enter_with("changed-inside")
        other_var.set("changed-inside")
        raise Boom("x")

    als.enter_with("before")
    with pytest.raises(Boom, match="^x$"):
        als.run("s", fail)
    assert als.get_store() == "before"
    assert other_var.get() == "unset"


def test_run_restores_whole_frame(als: AsyncLocalStorage[str]) -> None:
    """run() restores every storage and contextvar fn set (SPEC: whole frame)."""
    second: AsyncLocalStorage[str] = AsyncLocalStorage(name="second")
    second.enter_with("second-before")

    def fn() -> None:
        als.enter_with("entered")
        second.enter_with("second-changed")
        other_var.set("changed")

    als.run("s", fn)
    assert (als.get_store(), second.get_store(), other_var.get()) == (None, "second-before", "unset")


def test_run_restores_after_timeout_and_kill(als: AsyncLocalStorage[str]) -> None:
    """gevent.Timeout and Greenlet.kill inside run leave no store behind and no
    'Token was created in a different Context' error."""
    def slow() -> None:
        als.enter_with("inside")
        gevent.sleep(10)

    def with_timeout() -> Any:
        try:
            with gevent.Timeout(0.01):
                als.run("s", slow)
        except gevent.Timeout:
            return als.get_store()
        return "no timeout"

    assert als.run("outer", spawned, with_timeout) == "outer"

    observed: list[Any] = []

    def victim() -> None:
        try:
            als.run("victim", slow)
        finally:
            observed.append(als.get_store())

    g = gevent.spawn(als.run, "victim-outer", victim)
    gevent.sleep(0.01)
    g.kill(block=True, timeout=5)
    assert g.dead and observed == ["victim-outer"]
    assert als.get_store() is None


def test_default_value() -> None:
    """default (Node: defaultValue) is returned where no store is set."""
    als: AsyncLocalStorage[str] = AsyncLocalStorage(name="d", default="fallback")
    assert als.get_store() == "fallback"
    assert als.run("s", als.get_store) == "s"
    assert als.run("s", als.exit, als.get_store) == "fallback"
    assert spawned(als.get_store) == "fallback"
    assert als.default == "fallback"


def test_name() -> None:
    """name is the constructor's, '' by default."""
    assert AsyncLocalStorage(name="request").name == "request"
    assert AsyncLocalStorage().name == ""
    assert "request" in repr(AsyncLocalStorage(name="request"))


def test_two_storages_are_independent() -> None:
    """Each instance keeps its own store (Node: no-mix-contexts)."""
    a: AsyncLocalStorage[str] = AsyncLocalStorage(name="a")
    b: AsyncLocalStorage[str] = AsyncLocalStorage(name="b")

    def inner() -> tuple[Any, Any]:
        return spawned(lambda: (a.get_store(), b.get_store()))

    assert a.run("A", b.run, "B", inner) == ("A", "B")
    assert a.run("A", inner) == ("A", None)
    assert b.run("B", a.exit, inner) == (None, "B")


# -- exit -----------------------------------------------------------------------


def test_exit(als: AsyncLocalStorage[str]) -> None:
    """Inside exit() the store is default, for spawned work too; afterwards it's back."""
    other: AsyncLocalStorage[str] = AsyncLocalStorage(name="other")

    def in_run() -> list[Any]:
        seen = [als.get_store()]
        seen.append(als.exit(lambda: (als.get_store(), other.get_store(), spawned(als.get_store))))
        seen.append(als.get_store())
        return seen

    assert other.run("O", als.run, "S", in_run) == ["S", (None, "O", None), "S"]


def test_exit_does_not_leak(als: AsyncLocalStorage[str]) -> None:
    """enter_with inside exit() is gone after it (Node: exit-does-not-leak)."""
    def in_exit() -> None:
        als.enter_with("leak?")

    als.run("S", lambda: (als.exit(in_exit), als.get_store()))
    assert als.run("S", lambda: (als.exit(in_exit), als.get_store())[1]) == "S"
    als.exit(in_exit)
    assert als.get_store() is None


# -- enter_with -----------------------------------------------------------------


def test_enter_with(als: AsyncLocalStorage[dict[str, str]]) -> None:
    """Node's enter-with test: a store entered in one greenlet is seen there and
    by what it spawns afterwards, never by a sibling."""
    store = {"foo": "bar"}

    def first() -> Any:
        als.enter_with(store)
        assert als.get_store() is store
        return gevent.spawn_later(0.01, als.get_store).get()

    f = gevent.spawn(first)
    sibling = gevent.spawn_later(0.01, als.get_store)
    assert f.get(timeout=5) is store
    assert sibling.get(timeout=5) is None
    assert als.get_store() is None


def test_enter_with_does_not_reach_earlier_children(als: AsyncLocalStorage[str]) -> None:
    """Work spawned before enter_with keeps the store it was spawned with."""
    def handler() -> tuple[Any, Any]:
        early = gevent.spawn_later(0.01, als.get_store)
        als.enter_with("later")
        late = gevent.spawn(als.get_store)
        return early.get(timeout=5), late.get(timeout=5)

    assert als.run("first", handler) == ("first", "later")


def test_child_writes_never_reach_parent(als: AsyncLocalStorage[str]) -> None:
    """A child's enter_with/run stays in the child."""
    def handler() -> Any:
        spawned(lambda: als.enter_with("child"))
        spawned(lambda: other_var.set("child"))
        return als.get_store(), other_var.get()

    assert als.run("parent", handler) == ("parent", "unset")


def test_camel_case_aliases(als: AsyncLocalStorage[str]) -> None:
    """getStore / enterWith / runInAsyncScope exist for code ported from Node."""
    def fn() -> Any:
        als.enterWith("entered")
        return als.getStore()

    assert als.run("s", fn) == "entered"
    assert als.run("s", AsyncResource, "T").runInAsyncScope(als.getStore) == "s"


# -- disable --------------------------------------------------------------------


def test_disable(als: AsyncLocalStorage[dict[str, str]]) -> None:
    """Node's enable-disable test: after disable() get_store() is default
    everywhere, in greenlets started before too; exit() does not re-enable;
    run() does."""
    observed: dict[str, Any] = {}

    def handler() -> None:
        als.get_store()["foo"] = "bar"  # type: ignore[index]

        def tick() -> None:
            observed["tick"] = als.get_store()["foo"]  # type: ignore[index]
            pending = gevent.spawn(lambda: observed.__setitem__("pending", als.get_store()))
            als.disable()
            observed["after_disable"] = als.get_store()
            observed["in_exit"] = als.exit(als.get_store)
            observed["after_exit"] = als.get_store()
            pending.join()
            observed["new_run"] = als.run({"x": "y"}, als.get_store)
            observed["after_new_run"] = als.get_store()

        gevent.spawn(tick).get(timeout=5)

    als.run({}, handler)
    assert observed == {
        "tick": "bar", "pending": None, "after_disable": None, "in_exit": None,
        "after_exit": None, "new_run": {"x": "y"}, "after_new_run": None,
    }


def test_disable_reaches_running_greenlets(als: AsyncLocalStorage[str]) -> None:
    """A greenlet that is already running with a store sees default after disable()."""
    seen: list[Any] = []

    def worker() -> None:
        seen.append(als.get_store())
        gevent.sleep(0.02)
        seen.append(als.get_store())
        als.enter_with("re-entered")
        seen.append(als.get_store())

    g = als.run("before", gevent.spawn, worker)
    gevent.sleep(0.005)
    als.disable()
    g.join(timeout=5)
    assert seen == ["before", None, "re-entered"]


# -- scope ----------------------------------------------------------------------


def test_scope(als: AsyncLocalStorage[str]) -> None:
    """with als.scope(store): is run() for a block; the with-value is the store."""
    with als.scope("outer") as value:
        assert value == "outer"
        assert spawned(als.get_store) == "outer"
        with als.scope("inner"):
            assert als.get_store() == "inner"
        assert als.get_store() == "outer"
    assert als.get_store() is None


def test_scope_restores_on_error_and_after_enter_with(als: AsyncLocalStorage[str]) -> None:
    """scope() resets its storage on error and undoes enter_with inside it."""
    with pytest.raises(KeyError):
        with als.scope("s"):
            als.enter_with("entered")
            raise KeyError("x")
    assert als.get_store() is None


def test_scope_exited_in_another_greenlet(als: AsyncLocalStorage[str]) -> None:
    """Exiting a scope in another greenlet raises RuntimeError, store untouched."""
    scope = als.scope("s")
    scope.__enter__()
    with pytest.raises(RuntimeError, match="exited in another greenlet"):
        spawned(scope.__exit__, None, None, None)
    assert als.get_store() == "s"
    scope.__exit__(None, None, None)
    assert als.get_store() is None


def test_scope_exited_twice(als: AsyncLocalStorage[str]) -> None:
    """A scope is exited once; again raises RuntimeError and changes nothing."""
    scope = als.scope("s")
    with scope:
        pass
    als.enter_with("later")
    with pytest.raises(RuntimeError, match="already exited"):
        scope.__exit__(None, None, None)
    with pytest.raises(RuntimeError, match="already entered"):
        scope.__enter__()
    assert als.get_store() == "later"


# -- bind / snapshot / AsyncResource -------------------------------------------


def test_bind(als: AsyncLocalStorage[str]) -> None:
    """bind(fn) runs fn in the context of the bind() call, wherever called."""
    bound = als.run("bound", AsyncLocalStorage.bind, lambda x: (als.get_store(), x))
    assert bound(1) == ("bound", 1)
    assert als.run("other", bound, 2) == ("bound", 2)
    assert spawned(bound, 3) == ("bound", 3)
    assert bound.__name__ == "<lambda>"


def test_bind_calls_are_isolated_and_reentrant(als: AsyncLocalStorage[str]) -> None:
    """A bound fn may be called concurrently and re-entrantly; each call starts
    from the captured context and its changes vanish with it."""
    depth = [0]

    def fn(n: int) -> list[Any]:
        seen = [als.get_store()]
        als.enter_with(f"call-{n}")
        gevent.sleep(0.001)
        if n < 3:
            seen += bound(n + 1)  # re-entrant
        seen.append(als.get_store())
        depth[0] += 1
        return seen

    bound = als.run("captured", AsyncLocalStorage.bind, fn)
    results = [g.get(timeout=5) for g in [gevent.spawn(bound, 1) for _ in range(20)]]
    assert all(r == ["captured", "captured", "captured", "call-3", "call-2", "call-1"] for r in results)


def test_snapshot(als: AsyncLocalStorage[str]) -> None:
    """snapshot() captures the context; runner(fn, *args) runs fn in it (Node's snapshot test)."""
    runner = als.run(123, AsyncLocalStorage.snapshot)  # type: ignore[arg-type]
    assert als.run(321, runner, lambda x: (als.get_store(), x), "arg") == (123, "arg")  # type: ignore[arg-type]
    assert runner(als.get_store) == 123
    assert als.get_store() is None


def test_async_resource(als: AsyncLocalStorage[str]) -> None:
    """AsyncResource captures the context at construction."""
    res = als.run("at-construction", AsyncResource, "Query")
    assert res.type == "Query"
    assert als.run("other", res.run_in_async_scope, lambda a, b: (als.get_store(), a, b), 1, b=2) == (
        "at-construction", 1, 2)
    bound = res.bind(als.get_store)
    assert bound() == "at-construction"
    assert bound.asyncResource is res  # type: ignore[attr-defined]
    static = als.run("static", AsyncResource.bind, als.get_store)
    assert static() == "static"


# -- asyncio: contextvars fallback ---------------------------------------------


def test_asyncio_tasks_keep_their_own_store(als: AsyncLocalStorage[str]) -> None:
    """Native coroutines need nothing extra: tasks copy the context."""
    async def request(n: int) -> tuple[str, Any, Any]:
        async def child() -> Any:
            await asyncio.sleep(0.001 * (n % 5))
            return als.get_store()

        als.enter_with(f"req-{n}")
        task = asyncio.create_task(child())
        await asyncio.sleep(0)
        return f"req-{n}", await task, als.get_store()

    async def main() -> list[tuple[str, Any, Any]]:
        return list(await asyncio.gather(*(request(n) for n in range(100))))

    for expected, child_saw, own in asyncio.run(main()):
        assert child_saw == expected and own == expected


def test_await_run_with_coroutine(als: AsyncLocalStorage[str]) -> None:
    """await als.run(store, async_handler) runs the handler's whole body, across
    awaits, with the store, and leaves the awaiting task as it was."""
    async def handler(n: int) -> list[Any]:
        seen = [als.get_store()]
        await asyncio.sleep(0.001)
        seen.append(als.get_store())
        als.enter_with(f"entered-{n}")
        await asyncio.sleep(0)
        seen.append(await asyncio.create_task(asyncio.sleep(0, als.get_store())))
        return seen

    async def request(n: int) -> tuple[list[Any], Any]:
        als.enter_with(f"caller-{n}")
        seen = await als.run(f"req-{n}", handler, n)
        return seen, als.get_store()

    async def main() -> list[Any]:
        return list(await asyncio.gather(*(request(n) for n in range(50))))

    for n, (seen, after) in enumerate(asyncio.run(main())):
        assert seen == [f"req-{n}", f"req-{n}", f"entered-{n}"]
        assert after == f"caller-{n}"


def test_await_run_propagates_exceptions_and_cancellation(als: AsyncLocalStorage[str]) -> None:
    """Errors raised after an await come out of `await als.run(...)`; cancelling
    the awaiting task cancels the handler."""
    async def failing() -> None:
        await asyncio.sleep(0)
        raise ValueError(als.get_store())

    cancelled: list[Any] = []

    async def slow() -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.append(als.get_store())
            raise

    async def main() -> None:
        with pytest.raises(ValueError, match="^s$"):
            await als.run("s", failing)
        task = asyncio.create_task(als.run("slow", slow))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert cancelled == ["slow"]


def test_asyncio_inside_greenlets(als: AsyncLocalStorage[str]) -> None:
    """An asyncio loop run inside a greenlet starts from that greenlet's store,
    and its tasks stay isolated from each other."""
    async def loop_main(n: int) -> list[Any]:
        async def task(i: int) -> Any:
            if i % 2:
                als.enter_with(f"task-{n}-{i}")
            await asyncio.sleep(0)
            return als.get_store()

        return list(await asyncio.gather(*(task(i) for i in range(10))))

    def greenlet_main(n: int) -> list[Any]:
        return asyncio.run(loop_main(n))

    greenlets = [als.run(f"g-{n}", gevent.spawn, greenlet_main, n) for n in range(5)]
    for n, g in enumerate(greenlets):
        assert g.get(timeout=10) == [f"task-{n}-{i}" if i % 2 else f"g-{n}" for i in range(10)]


# -- subclasses and the per-instance fast path ---------------------------------------


class _Upper(AsyncLocalStorage[str]):
    """A subclass that post-processes the store (as a wrapper library might)."""

    def get_store(self) -> Optional[str]:
        store = super().get_store()
        return None if store is None else store.upper()


def test_subclass_that_overrides_get_store_is_honoured() -> None:
    """The per-instance fast path (the variable's own ``get``) never shadows
    a subclass's get_store: directly, through getStore, in spawned
    greenlets, and after disable()."""
    als = _Upper(name="upper")
    assert als.run("abc", als.get_store) == "ABC"
    assert als.run("abc", als.getStore) == "ABC"
    assert als.run("abc", lambda: gevent.spawn(als.get_store).get(timeout=5)) == "ABC"
    als.disable()
    assert als.run("def", als.get_store) == "DEF"


def test_plain_storage_keeps_the_fast_path() -> None:
    """The plain class reads through ContextVar.get itself (no Python frame),
    which is what keeps get_store within 1.5x a raw ContextVar.get."""
    als: AsyncLocalStorage[str] = AsyncLocalStorage(name="fast")
    assert type(als.get_store).__name__ == "builtin_function_or_method"
    assert type(als.getStore).__name__ == "builtin_function_or_method"


def test_get_store_reference_taken_before_disable() -> None:
    """What the docs say: ``als.get_store`` looked up after disable() gives
    the default; ``read = als.get_store`` taken before it keeps reading the
    stores of before it in pure Python (the slot held the old variable's
    ``get``) and reads the new variable with the compiled class (a method
    bound to the storage)."""
    als: AsyncLocalStorage[str] = AsyncLocalStorage(name="stale")

    def body() -> Tuple[Optional[str], Optional[str]]:
        read = als.get_store
        als.disable()
        return read(), als.get_store()

    stale = None if asl_gevent.SPEEDUPS else "before"
    assert als.run("before", body) == (stale, None)
