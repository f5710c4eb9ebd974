"""Faults: whatever ends a piece of work, every store is as it was.

Exceptions, ``gevent.Timeout``, ``Greenlet.kill()`` from another greenlet,
``GreenletExit``, ``BaseException`` subclasses and ``KeyboardInterrupt`` may
end the work inside ``run``, ``exit``, ``scope``, bound functions, snapshot
runners, ``AsyncResource`` and link callbacks. Afterwards the caller's stores
(this storage, another storage, a plain ContextVar) are exactly as before,
nothing the failed work set reaches the next request, and no "Token was
created in a different Context" (gevent#1930) appears anywhere.
"""

from __future__ import annotations

import asyncio
import io
import random
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from typing import Any, Callable, Iterator

import gevent
import gevent.event
import gevent.pool
import pytest
from gevent import Greenlet, GreenletExit

from asl_gevent import AsyncLocalStorage, AsyncResource, install, is_installed, uninstall
from helpers import hub_exception_stream

A: AsyncLocalStorage[str] = AsyncLocalStorage(name="faults-a")
B: AsyncLocalStorage[str] = AsyncLocalStorage(name="faults-b")
VAR: ContextVar[str] = ContextVar("faults_var", default="var-unset")

#: What a context mismatch looks like in any output (gevent#1930 and CPython).
CONTEXT_ERRORS = ("different Context", "cannot exit context", "cannot enter context")

State = tuple[Any, Any, Any]


def state() -> State:
    """What this greenlet sees: both storages and the plain ContextVar."""
    return A.get_store(), B.get_store(), VAR.get()


def scribble(tag: str) -> None:
    """What failing work does before it fails: change everything it can."""
    A.enter_with(f"{tag}-a")
    B.enter_with(f"{tag}-b")
    VAR.set(f"{tag}-var")


class Custom(BaseException):
    """A BaseException that is neither an Exception nor one gevent knows."""


class Boom(Exception):
    """An ordinary error."""


@pytest.fixture(name="hub_errors")
def _hub_errors(capfd: pytest.CaptureFixture[str]) -> Iterator[io.StringIO]:
    """Capture what the hub prints; after the test, no context error anywhere."""
    with hub_exception_stream() as stream:
        yield stream
    printed = stream.getvalue() + "".join(capfd.readouterr())
    for error in CONTEXT_ERRORS:
        assert error not in printed, printed


@pytest.fixture(name="caller")
def _caller() -> Iterator[State]:
    """The test runs as a request that already has stores. The fixture runs
    in the session's context, which the test body gets a copy of (see
    conftest): the stores are taken off again after the test, so that no
    later test (the debug module's doctest) sees them."""
    with A.scope("caller-a"), B.scope("caller-b"):
        token = VAR.set("caller-var")
        try:
            yield state()
        finally:
            VAR.reset(token)


def assert_nothing_leaked(before: State) -> None:
    """The caller, work it spawns now, and the next request see no trace."""
    assert state() == before
    assert gevent.spawn(state).get(timeout=5) == before
    assert A.run("next", lambda: gevent.spawn(state).get(timeout=5)) == ("next", *before[1:])
    assert gevent.spawn(lambda: A.run("next", state)).get(timeout=5) == ("next", *before[1:])


# -- what fails, and where -------------------------------------------------------------


def _raiser(exc: Callable[[], BaseException]) -> Callable[[], None]:
    def body() -> None:
        scribble("failed")
        gevent.sleep(0)
        raise exc()

    return body


def _timeout_body() -> None:
    scribble("timed-out")
    with gevent.Timeout(0.001):
        gevent.sleep(5)


#: fault -> (what reaches the caller, failing work, what that work scribbled)
FAULTS: dict[str, tuple[type[BaseException], Callable[[], None], str]] = {
    "Exception": (Boom, _raiser(lambda: Boom("boom")), "failed"),
    "BaseException subclass": (Custom, _raiser(lambda: Custom("custom")), "failed"),
    "KeyboardInterrupt": (KeyboardInterrupt, _raiser(KeyboardInterrupt), "failed"),
    "GreenletExit": (GreenletExit, _raiser(GreenletExit), "failed"),
    "SystemExit": (SystemExit, _raiser(lambda: SystemExit(3)), "failed"),
    "gevent.Timeout": (gevent.Timeout, _timeout_body, "timed-out"),
}


def _in_scope(body: Callable[[], None]) -> None:
    with A.scope("in-scope"):
        body()


def _nested(body: Callable[[], None]) -> None:
    A.run("outer", B.run, "inner", A.exit, _in_scope, body)


ENTRIES: dict[str, Callable[[Callable[[], None]], Any]] = {
    "run": lambda body: A.run("in-run", body),
    "exit": lambda body: A.exit(body),
    "scope": _in_scope,
    "nested run/exit/scope": _nested,
    "bind": lambda body: A.run("bound", AsyncLocalStorage.bind, body)(),
    "snapshot runner": lambda body: A.run("snap", AsyncLocalStorage.snapshot)(body),
    "AsyncResource.run_in_async_scope":
        lambda body: A.run("res", AsyncResource, "Fault").run_in_async_scope(body),
    "AsyncResource.bind": lambda body: A.run("res", AsyncResource, "Fault").bind(body)(),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
@pytest.mark.parametrize("entry", sorted(ENTRIES))
def test_fault_inside_entry_restores_everything(
        caller: State, hub_errors: io.StringIO, entry: str, fault: str) -> None:
    """The fault reaches the caller unchanged; the caller's frame is intact.

    ``scope()`` is a block, not a frame: it restores its own storage (A) and,
    as documented, leaves what the block did to others in the enclosing frame.
    """
    kind, body, tag = FAULTS[fault]
    with pytest.raises(kind):
        ENTRIES[entry](body)
    if entry == "scope":
        assert state() == (caller[0], f"{tag}-b", f"{tag}-var")
        B.enter_with(caller[1])
        VAR.set(caller[2])
    assert_nothing_leaked(caller)


def test_timeout_from_outside_while_suspended_in_nested_runs(
        caller: State, hub_errors: io.StringIO) -> None:
    """A Timeout armed by the caller fires while the greenlet is suspended
    deep inside run/exit/scope/bind; each level unwinds in its own context."""
    seen: list[State] = []

    def deep() -> None:
        scribble("deep")
        seen.append(state())
        gevent.sleep(5)

    timeout = gevent.Timeout(0.005)
    timeout.start()
    try:
        with pytest.raises(gevent.Timeout) as info:
            A.run("r1", AsyncLocalStorage.bind(_nested), deep)
        assert info.value is timeout
    finally:
        timeout.close()
    assert seen == [("deep-a", "deep-b", "deep-var")]
    assert_nothing_leaked(caller)


@pytest.mark.parametrize("fault", ["Exception", "BaseException subclass", "GreenletExit",
                                   "gevent.Timeout"])
def test_fault_in_spawned_greenlet_stays_there(
        caller: State, hub_errors: io.StringIO, fault: str) -> None:
    """A greenlet that fails in its own runs leaves its parent's frame alone,
    and 100 siblings failing at once each saw only their own stores."""
    kind, body, _ = FAULTS[fault]
    seen: dict[int, State] = {}

    def child(i: int) -> None:
        seen[i] = state()
        gevent.sleep(random.Random(i).random() / 1000)
        A.run(f"child-{i}", body)

    greenlets = [A.run(f"req-{i}", gevent.spawn, child, i) for i in range(100)]
    gevent.joinall(greenlets)
    for g in greenlets:
        if kind is GreenletExit:  # gevent: not an error, the greenlet's value
            assert isinstance(g.value, kind)
        else:
            assert isinstance(g.exception, kind)
    assert seen == {i: (f"req-{i}", *caller[1:]) for i in range(100)}
    assert_nothing_leaked(caller)


@pytest.mark.parametrize("kind", [KeyboardInterrupt, SystemExit])
def test_system_error_in_spawned_greenlet_reaches_main(
        caller: State, hub_errors: io.StringIO, kind: type[BaseException]) -> None:
    """gevent throws a KeyboardInterrupt or SystemExit raised in any greenlet
    into the main greenlet; there the caller's stores are intact, and the hub
    keeps working."""
    def child() -> None:
        scribble("interrupted")
        raise kind

    g = A.run("req", gevent.spawn, child)
    with pytest.raises(kind):
        g.join()
    assert state() == caller
    g.join()
    assert_nothing_leaked(caller)


# -- kill ---------------------------------------------------------------------------------


KILLS: dict[str, Any] = {
    "GreenletExit": GreenletExit,
    "BaseException subclass": Custom,
    "Exception": Boom,
    "gevent.Timeout": gevent.Timeout,
}


@pytest.mark.parametrize("exception", sorted(KILLS))
def test_kill_from_another_greenlet_inside_nested_runs(
        caller: State, hub_errors: io.StringIO, exception: str) -> None:
    """100 victims, each suspended inside nested run/scope/exit of its own
    request, are killed by killers running in other requests; each victim's
    handler sees exactly its own request's frame, the killers keep theirs,
    and link callbacks see their link-time stores."""
    kind = KILLS[exception]
    rng = random.Random(1930)
    seen_inside: dict[int, State] = {}
    seen_after: dict[int, tuple[State, str]] = {}
    killers_saw: dict[int, tuple[State, State]] = {}
    linked: dict[int, State] = {}

    def victim(i: int) -> None:
        def deep() -> None:
            scribble(f"victim-{i}")
            seen_inside[i] = state()
            gevent.sleep(30)

        try:
            _nested(deep)
        except BaseException as exc:
            seen_after[i] = (state(), type(exc).__name__)
            raise

    def killer(i: int, target: Greenlet) -> None:
        before = state()
        gevent.sleep(rng.random() / 1000)
        target.kill(kind)
        killers_saw[i] = (before, state())

    def link_in_request(i: int, target: Greenlet) -> None:
        target.link(lambda _: linked.__setitem__(i, state()))

    victims = [A.run(f"victim-req-{i}", gevent.spawn, victim, i) for i in range(100)]
    for i, v in enumerate(victims):
        B.run(f"linker-{i}", link_in_request, i, v)
    gevent.sleep(0)
    killers = [A.run(f"killer-req-{i}", gevent.spawn, killer, i, v)
               for i, v in enumerate(victims)]
    gevent.joinall(killers, raise_error=True)
    gevent.joinall(victims)
    gevent.sleep(0)

    assert seen_inside == {i: (f"victim-{i}-a", f"victim-{i}-b", f"victim-{i}-var")
                           for i in range(100)}
    assert seen_after == {i: ((f"victim-req-{i}", *caller[1:]), kind.__name__)
                          for i in range(100)}
    assert killers_saw == {i: (((f"killer-req-{i}", *caller[1:]),) * 2) for i in range(100)}
    assert linked == {i: (caller[0], f"linker-{i}", caller[2]) for i in range(100)}
    assert_nothing_leaked(caller)


def test_kill_with_keyboard_interrupt_reaches_killer_in_main(
        caller: State, hub_errors: io.StringIO) -> None:
    """Killing with KeyboardInterrupt: the victim unwinds its runs, gevent
    rethrows the interrupt into the main greenlet, stores intact on both sides."""
    seen_after: list[State] = []

    def victim() -> None:
        try:
            A.run("deep", gevent.sleep, 30)
        finally:
            seen_after.append(state())

    g = A.run("victim-req", gevent.spawn, victim)
    gevent.sleep(0)
    with pytest.raises(KeyboardInterrupt):
        g.kill(KeyboardInterrupt)
    assert state() == caller
    g.join()
    assert seen_after == [("victim-req", *caller[1:])]
    assert_nothing_leaked(caller)


def test_greenlet_killed_before_start(caller: State, hub_errors: io.StringIO) -> None:
    """Killed before it ever ran: its body never runs, its link callbacks run
    in their link-time stores, and nothing of it reaches anyone else."""
    ran: list[State] = []
    linked: list[tuple[str, State]] = []

    def handler() -> Greenlet:
        g = gevent.spawn(lambda: ran.append(state()))
        g.link(lambda _: linked.append(("link", state())))
        g.rawlink(lambda _: linked.append(("rawlink", state())))
        A.enter_with("after-link")
        g.kill()
        return g

    g = A.run("req", handler)
    g.join()
    gevent.sleep(0)
    assert ran == []
    assert isinstance(g.value, GreenletExit)
    assert sorted(linked) == [("link", ("req", *caller[1:])), ("rawlink", ("req", *caller[1:]))]
    assert_nothing_leaked(caller)


# -- link callbacks and the hub's error handler -------------------------------------------


@pytest.mark.parametrize("method", ["link", "link_value", "rawlink"])
def test_raising_link_callback_is_reported_and_leaves_no_trace(
        caller: State, hub_errors: io.StringIO, method: str) -> None:
    """A link callback that changes every store and raises: the hub prints
    the error, the hub's own context stays clean, greenlets the hub spawns
    later start empty, and later requests see only their own stores."""
    def callback(_: Any) -> None:
        scribble("link")
        raise Boom(f"{method} callback failed")

    g = gevent.spawn(gevent.sleep, 0.001)
    A.run("linker", getattr(g, method), callback)
    g.join()
    gevent.sleep(0.01)
    assert f"Boom: {method} callback failed" in hub_errors.getvalue()

    hub = gevent.get_hub()
    hub_context = hub.gr_context
    if hub_context is not None:
        assert not any(str(v).startswith("link-") for v in hub_context.values())
    from_hub = gevent.event.AsyncResult()
    hub.loop.run_callback(lambda: gevent.spawn(lambda: from_hub.set(state())))
    assert from_hub.get(timeout=5) == (None, None, "var-unset")
    assert_nothing_leaked(caller)


def test_link_callbacks_that_fail_do_not_disturb_their_siblings(
        caller: State, hub_errors: io.StringIO) -> None:
    """Many links on one greenlet, every other one failing: each successful
    callback sees its own link-time stores."""
    seen: dict[int, State] = {}

    def make(i: int) -> Callable[[Any], None]:
        def callback(_: Any) -> None:
            if i % 2:
                scribble(f"bad-{i}")
                raise Boom(i)
            seen[i] = state()
            scribble(f"good-{i}")

        return callback

    g = gevent.spawn(gevent.sleep, 0.001)
    for i in range(40):
        A.run(f"link-{i}", (g.rawlink if i % 4 < 2 else g.link), make(i))
    g.join()
    gevent.sleep(0.01)
    assert seen == {i: (f"link-{i}", *caller[1:]) for i in range(0, 40, 2)}
    assert hub_errors.getvalue().count("Boom") >= 20
    assert_nothing_leaked(caller)


# -- uninstall / install while work is in flight -----------------------------------------


def test_uninstall_while_greenlets_are_in_flight(
        caller: State, hub_errors: io.StringIO) -> None:
    """Greenlets already started keep what they had; links made before keep
    their link-time stores; greenlets started after uninstall() start empty
    (even from a greenlet that has stores); install() brings propagation back."""
    release = gevent.event.Event()
    seen: dict[str, Any] = {}
    executor = ThreadPoolExecutor(max_workers=1)

    def in_flight(i: int) -> None:
        release.wait()
        seen[f"flight-{i}"] = state()
        seen[f"grandchild-{i}"] = gevent.spawn(state).get(timeout=5)

    def handler() -> list[Greenlet]:
        started = [gevent.spawn(in_flight, i) for i in range(20)]
        later = gevent.spawn_later(0.01, lambda: seen.__setitem__("later", state()))
        later.link(lambda _: seen.__setitem__("link", state()))
        return [*started, later]

    try:
        greenlets = A.run("req", handler)
        gevent.sleep(0)
        uninstall()
        uninstall()  # idempotent
        assert not is_installed()
        release.set()
        gevent.joinall(greenlets, raise_error=True)
        gevent.sleep(0)
        seen["new"] = A.run("req-after", lambda: gevent.spawn(state).get(timeout=5))
        seen["executor"] = A.run("req-after", lambda: executor.submit(state).result(5))
        install()
        install()  # idempotent
        seen["reinstalled"] = A.run("req-again", lambda: gevent.spawn(state).get(timeout=5))
        seen["executor-again"] = A.run("req-again", lambda: executor.submit(state).result(5))
    finally:
        install()
        executor.shutdown(wait=True)

    request = ("req", *caller[1:])
    empty = (None, None, "var-unset")
    for i in range(20):
        assert seen.pop(f"flight-{i}") == request
        assert seen.pop(f"grandchild-{i}") == empty
    assert seen == {
        "later": request,  # started (spawn_later) before uninstall
        "link": request,
        "new": empty,
        "executor": empty,
        "reinstalled": ("req-again", *caller[1:]),
        "executor-again": ("req-again", *caller[1:]),
    }
    assert_nothing_leaked(caller)


# -- asyncio: faults inside ``await als.run(store, handler)`` ----------------------------


def test_async_handler_raising_and_cancelled(caller: State, hub_errors: io.StringIO) -> None:
    """An async handler that raises, or whose task is cancelled while it is
    suspended, unwinds inside its own store; the awaiting task keeps its own."""
    seen: dict[str, State] = {}

    async def failing() -> None:
        scribble("async")
        await asyncio.sleep(0)
        raise Boom("async failed")

    async def slow(name: str) -> None:
        scribble(name)
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            seen[f"{name}-cancelled-in"] = state()
            raise

    async def task(name: str) -> None:
        before = state()
        try:
            await A.run(f"{name}-store", slow, name)
        finally:
            seen[f"{name}-after"] = state()
            assert state() == before

    async def main() -> None:
        with pytest.raises(Boom):
            await A.run("fail-store", failing)
        seen["main"] = state()
        tasks = [asyncio.create_task(A.run(f"t{i}", task, f"t{i}")) for i in range(20)]
        await asyncio.sleep(0.001)
        for t in tasks:
            t.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, asyncio.CancelledError) for r in results)
        seen["main-end"] = state()

    asyncio.run(main())
    assert seen.pop("main") == seen.pop("main-end") == caller
    for i in range(20):
        assert seen.pop(f"t{i}-cancelled-in") == (f"t{i}-a", f"t{i}-b", f"t{i}-var")
        assert seen.pop(f"t{i}-after") == (f"t{i}", *caller[1:])
    assert seen == {}
    assert_nothing_leaked(caller)


# -- pools: a failing task does not poison the worker ---------------------------------


def test_failing_pool_tasks_do_not_poison_reused_workers(
        caller: State, hub_errors: io.StringIO) -> None:
    """A task that scribbles and raises on a reused worker (executor thread,
    gevent ThreadPool thread, Pool greenlet) leaves nothing for the next task."""
    executor = ThreadPoolExecutor(max_workers=1)
    threadpool = gevent.get_hub().threadpool
    pool = gevent.pool.Pool(1)

    def failing() -> None:
        scribble("poison")
        raise Boom("poison")

    try:
        paths: list[tuple[Callable[..., Any], Callable[[Any], Any]]] = [
            (executor.submit, lambda f: f.result(5)),
            (threadpool.spawn, lambda r: r.get(timeout=5)),
            (pool.spawn, lambda g: g.get(timeout=5)),
        ]
        for submit, wait in paths:
            for i in range(5):
                with pytest.raises(Boom):
                    A.run(f"bad-{i}", lambda: wait(submit(failing)))
                assert A.run(f"good-{i}", lambda: wait(submit(state))) == \
                    (f"good-{i}", *caller[1:])
                assert wait(submit(state)) == caller
    finally:
        executor.shutdown(wait=True)
    assert_nothing_leaked(caller)
