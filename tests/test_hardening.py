"""Issue 8 (hardening), the links part: no path loses a store, gevent behaves as before.

One section per point of the issue this file covers:

1. Work the hub runs on behalf of a captured context (``bind``, ``snapshot``,
   ``AsyncResource``, ``als.run``, link callbacks) hands that context to what
   it spawns and links; what the hub does for itself still does not.
2. ``Event`` / ``AsyncResult`` / ``Semaphore`` / ``BoundedSemaphore``
   ``rawlink`` callbacks run in their link-time context; gevent's own waiters
   are not wrapped.
3. Only gevent's bookkeeping skips the wrap: a C callback of the user's does not.
4. ``unlink()`` removes exactly what ``rawlink()`` added, asking no ``__eq__``
   when identity decides and never looking inside the argument; a shared
   ``SpawnedLink`` is never changed.
10. Nothing retains a store (or a class) after its work ends.
11. ``ThreadPool`` worker hooks and error reports see the user's function.

Each test fails without the change it proves (checked against 0.1's hooks),
and the negative controls show the hooks are what makes them pass.
"""

from __future__ import annotations

import functools
import gc
import io
import weakref
from contextvars import Context
from typing import Any, Callable, Generator, Iterator, List, Tuple
from unittest import mock

import gevent
import gevent.event
import gevent.lock
import gevent.pool
import gevent.server
import gevent.threadpool
import pytest
from gevent.event import AsyncResult, Event
from gevent.greenlet import Greenlet, SpawnedLink
from gevent.lock import BoundedSemaphore, Semaphore

import asl_gevent
from asl_gevent import AsyncLocalStorage, AsyncResource
from asl_gevent._hooks import _LinkInContext
from helpers import hub_exception_stream

REQUESTS = 50


def _wait_all(events: List[Event], timeout: float = 10) -> None:
    for event in events:
        assert event.wait(timeout=timeout), "a callback never ran"


# -- 1. bound work run by the hub ----------------------------------------------------


def _report(als: AsyncLocalStorage[Any], tag: Any, seen: dict[str, Any], done: Event) -> None:
    """What work run by the hub does: reads the store, spawns, links, waits on nothing.

    Runs in the hub, so it must not block: results arrive through links.
    """
    seen["self"] = als.get_store()
    child = gevent.spawn(als.get_store)
    child.link(lambda g: seen.__setitem__("link", (g.value, als.get_store())))
    child.rawlink(lambda g: seen.__setitem__("rawlink", als.get_store()))
    event = Event()
    event.rawlink(lambda _: seen.__setitem__("event", als.get_store()))
    event.set()
    # The last thing that runs: a link registered after the others.
    child.link(lambda _: gevent.spawn_later(0.001, done.set))


def _via_bind(als: AsyncLocalStorage[Any], work: Callable[[], None]) -> None:
    gevent.get_hub().loop.run_callback(AsyncLocalStorage.bind(work))


def _via_snapshot_timer(als: AsyncLocalStorage[Any], work: Callable[[], None]) -> None:
    timer = gevent.get_hub().loop.timer(0.001)
    timer.start(AsyncLocalStorage.snapshot(), work)


def _via_resource_bind(als: AsyncLocalStorage[Any], work: Callable[[], None]) -> None:
    gevent.get_hub().loop.run_callback(AsyncResource("test").bind(work))


def _via_resource_scope(als: AsyncLocalStorage[Any], work: Callable[[], None]) -> None:
    gevent.get_hub().loop.run_callback(AsyncResource("test").run_in_async_scope, work)


def _via_als_run(als: AsyncLocalStorage[Any], work: Callable[[], None]) -> None:
    store = als.get_store()
    # The hub itself calls als.run (the request's store is passed as data).
    Context().run(gevent.get_hub().loop.run_callback, als.run, store, work)


def _via_event_rawlink(als: AsyncLocalStorage[Any], work: Callable[[], None]) -> None:
    event = Event()
    event.rawlink(lambda _: work())
    event.set()


def _via_asyncresult_rawlink(als: AsyncLocalStorage[Any], work: Callable[[], None]) -> None:
    result: AsyncResult = AsyncResult()
    result.rawlink(lambda _: work())
    gevent.get_hub().loop.run_callback(result.set, 1)


def _via_greenlet_rawlink(als: AsyncLocalStorage[Any], work: Callable[[], None]) -> None:
    gevent.spawn(gevent.sleep, 0.001).rawlink(lambda _: work())


HUB_PATHS = {
    "loop.run_callback(bind(fn))": _via_bind,
    "loop timer with snapshot()": _via_snapshot_timer,
    "loop.run_callback(AsyncResource.bind(fn))": _via_resource_bind,
    "loop.run_callback(res.run_in_async_scope, fn)": _via_resource_scope,
    "loop.run_callback(als.run, store, fn)": _via_als_run,
    "Event.rawlink callback": _via_event_rawlink,
    "AsyncResult.rawlink callback": _via_asyncresult_rawlink,
    "Greenlet.rawlink callback": _via_greenlet_rawlink,
}


def _hub_run(path: Callable[[AsyncLocalStorage[Any], Callable[[], None]], None],
             als: AsyncLocalStorage[Any], requests: int) -> List[Tuple[int, dict[str, Any]]]:
    """*requests* concurrent requests; each hands work to the hub through *path*."""
    results: List[Tuple[int, dict[str, Any]]] = []
    dones: List[Event] = []
    for request in range(requests):
        seen: dict[str, Any] = {}
        done = Event()
        results.append((request, seen))
        dones.append(done)
        als.run(request, path, als,
                functools.partial(_report, als, request, seen, done))
    _wait_all(dones)
    gevent.sleep(0.01)
    return results


@pytest.mark.parametrize("path", HUB_PATHS, ids=list(HUB_PATHS))
def test_work_the_hub_runs_for_a_request_propagates(path: str, als: AsyncLocalStorage[Any]) -> None:
    """The hub runs a request's bound work: that work, the greenlets it spawns,
    its links and its Event callbacks all see the request's store, and 50
    concurrent requests never see each other's."""
    results = _hub_run(HUB_PATHS[path], als, REQUESTS)
    wrong = {request: seen for request, seen in results
             if seen != {"self": request, "link": (request, request),
                         "rawlink": request, "event": request}}
    assert not wrong


def test_what_the_hub_binds_for_itself_does_not_reach_its_spawns(
        als: AsyncLocalStorage[Any]) -> None:
    """The hub rule stays: a loop callback that sets a store and binds work for
    itself runs that work with its own store, but greenlets that work spawns
    (and ``link()`` callbacks, which run in new greenlets) start empty; its
    rawlink callbacks run in the hub's own context, as without the hooks."""
    hub = gevent.get_hub()
    seen: dict[str, Any] = {}
    done = Event()

    def hub_for_itself() -> None:
        als.enter_with("HUB")
        hub.loop.run_callback(AsyncLocalStorage.bind(
            functools.partial(_report, als, "HUB", seen, done)))

    Context().run(hub.loop.run_callback, hub_for_itself)
    try:
        _wait_all([done])
        gevent.sleep(0.01)
        assert seen == {"self": "HUB", "link": (None, None), "rawlink": "HUB", "event": "HUB"}
    finally:
        hub.loop.run_callback(als.enter_with, None)  # the hub outlives this test
        gevent.sleep(0)


def test_hub_run_negative_control(als: AsyncLocalStorage[Any], no_hooks: None) -> None:
    """Without the hooks nothing the hub-run work spawns sees the store."""
    (_, seen), = _hub_run(_via_bind, als, 1)
    assert seen == {"self": 0, "link": (None, None), "rawlink": None, "event": None}


def test_server_started_by_hub_run_work_serves_in_that_context(
        als: AsyncLocalStorage[Any]) -> None:
    """A server started by bound work that the hub runs gets that work's context."""
    from gevent import socket

    started = Event()
    servers: List[gevent.server.StreamServer] = []

    def handle(sock: Any, _address: Any) -> None:
        sock.sendall(repr(als.get_store()).encode())
        sock.close()

    def start() -> None:
        server = gevent.server.StreamServer(("127.0.0.1", 0), handle)
        server.start()
        servers.append(server)
        started.set()

    als.run("server-owner", lambda: gevent.get_hub().loop.run_callback(
        AsyncLocalStorage.bind(start)))
    assert started.wait(timeout=5)
    server = servers[0]
    try:
        with socket.create_connection(("127.0.0.1", server.server_port), timeout=5) as conn:
            assert conn.makefile("rb").read() == b"'server-owner'"
    finally:
        server.stop()


# -- 2. Event / AsyncResult / Semaphore rawlink -----------------------------------


def _event_like(kind: str) -> Tuple[Any, Callable[[], None]]:
    """A linkable of *kind*, not ready yet, and the call that makes it ready."""
    if kind == "Event":
        event = Event()
        return event, event.set
    if kind == "AsyncResult":
        result: AsyncResult = AsyncResult()
        return result, lambda: result.set("value")
    sem = Semaphore(1) if kind == "Semaphore" else BoundedSemaphore(1)
    sem.acquire()
    return sem, sem.release


LINKABLES = ["Event", "AsyncResult", "Semaphore", "BoundedSemaphore"]


@pytest.mark.parametrize("kind", LINKABLES)
def test_linkable_rawlink_callback_sees_link_time_store(
        kind: str, als: AsyncLocalStorage[Any]) -> None:
    """100 requests link to one shared object; each callback sees its own
    request's store, not the store current when the object became ready."""
    obj, make_ready = _event_like(kind)
    seen: List[Tuple[int, Any]] = []
    for request in range(100):
        als.run(request, obj.rawlink,
                lambda _obj, request=request: seen.append((request, als.get_store())))
    als.run("setter", make_ready)
    # (A semaphore calls its links while it is ready; these take no unit.)
    with gevent.Timeout(5):
        while len(seen) < 100:
            gevent.sleep(0.001)
    assert sorted(seen) == [(request, request) for request in range(100)]


@pytest.mark.parametrize("kind", LINKABLES)
def test_linkable_rawlink_negative_control(kind: str, als: AsyncLocalStorage[Any],
                                           no_hooks: None) -> None:
    obj, make_ready = _event_like(kind)
    seen: List[Any] = []
    als.run("linker", obj.rawlink, lambda _obj: seen.append(als.get_store()))
    make_ready()
    gevent.sleep(0.01)
    assert seen == [None]


def _wrappers() -> List[_LinkInContext]:
    return [o for o in gc.get_objects() if type(o) is _LinkInContext]


@pytest.mark.parametrize("wait", ["Event.wait", "AsyncResult.get", "Semaphore.acquire",
                                  "gevent.wait", "gevent.iwait", "gevent.joinall",
                                  "Greenlet.join", "Pool.join"])
def test_gevent_own_waiters_are_not_wrapped(wait: str, als: AsyncLocalStorage[Any]) -> None:
    """While a greenlet waits in one of gevent's own waits, inside a request,
    no link wrapper exists: gevent's waiters pass straight through."""
    event = Event()
    result: AsyncResult = AsyncResult()
    sem = Semaphore(0)
    sleeper = gevent.spawn(event.wait)
    pool = gevent.pool.Pool(2)
    pool.spawn(event.wait)
    waits: dict[str, Callable[[], Any]] = {
        "Event.wait": event.wait,
        "AsyncResult.get": result.get,
        "Semaphore.acquire": sem.acquire,
        "gevent.wait": lambda: gevent.wait([event]),
        "gevent.iwait": lambda: list(gevent.iwait([event])),
        "gevent.joinall": lambda: gevent.joinall([sleeper]),
        "Greenlet.join": sleeper.join,
        "Pool.join": pool.join,
    }
    gc.collect()
    before = len(_wrappers())
    waiter = als.run("request", gevent.spawn, waits[wait])
    gevent.sleep(0.01)
    during = len(_wrappers())
    event.set()
    result.set(1)
    sem.release()
    waiter.join(timeout=5)
    assert waiter.successful()
    assert during == before


# -- 3. C callbacks of the user's are wrapped too --------------------------------------


class _StoreWriter:
    """A file for ``print``: records the store current when it is written to."""

    def __init__(self, als: AsyncLocalStorage[Any]) -> None:
        self.als = als
        self.seen: List[Any] = []

    def write(self, text: str) -> None:
        if text == "\n":  # once per print()
            self.seen.append(self.als.get_store())

    def flush(self) -> None:
        pass


def _c_callbacks(als: AsyncLocalStorage[Any]) -> Iterator[Tuple[str, Any, Callable[[], List[Any]]]]:
    """(name, C-level callback, what it saw): each calls back into Python."""
    writer = _StoreWriter(als)
    # builtin_function_or_method, as a mypyc-compiled function is
    yield "print", functools.partial(print, file=writer), lambda: writer.seen
    writer2 = _StoreWriter(als)
    yield ("print (bound to builtins)",
           functools.partial(print, "x", file=writer2), lambda: writer2.seen)

    seen_gen: List[Any] = []

    def consumer() -> Generator[None, Any, None]:
        while True:
            yield
            seen_gen.append(als.get_store())

    gen = consumer()
    next(gen)
    # A generator's ``send``: type builtin_function_or_method, __self__ not a greenlet.
    yield "generator.send", gen.send, lambda: seen_gen


def test_c_callbacks_are_builtin_functions() -> None:
    """The callbacks below are what 0.1 passed through as "C code"."""
    gen = (x for x in [1])
    assert type(gen.send).__name__ == "builtin_function_or_method"
    assert type(print).__name__ == "builtin_function_or_method"


@pytest.mark.parametrize("method", ["Greenlet.rawlink", "Greenlet.link", "Event.rawlink"])
def test_c_callback_sees_link_time_store(method: str, als: AsyncLocalStorage[Any]) -> None:
    for name, callback, seen in _c_callbacks(als):
        if method == "Event.rawlink":
            target: Any = Event()
            als.run("linked", target.rawlink, callback)
            target.set()
        else:
            target = gevent.spawn(gevent.sleep, 0.001)
            als.run("linked", getattr(target, method.split(".")[1]), callback)
            target.join()
        gevent.sleep(0.01)
        assert seen() == ["linked"], name


def test_greenlet_switch_and_gevent_methods_stay_unwrapped(als: AsyncLocalStorage[Any]) -> None:
    """gevent's bookkeeping is recognised by what it is."""
    from asl_gevent._hooks import _is_bookkeeping

    g = Greenlet(gevent.sleep)
    group = gevent.pool.Group()
    assert _is_bookkeeping(g.switch) and _is_bookkeeping(g.throw)
    assert _is_bookkeeping(gevent.getcurrent().switch)
    assert _is_bookkeeping(group._discard)  # gevent.pool, pure Python
    assert _is_bookkeeping(gevent.get_hub().switch)  # compiled gevent method
    assert not _is_bookkeeping(print)
    assert not _is_bookkeeping([0].append)
    assert not _is_bookkeeping(functools.partial(print))
    assert not _is_bookkeeping((x for x in "").send)

    class MyGroup(gevent.pool.Group):  # type: ignore[misc]
        def on_done(self, _g: Any) -> None:
            pass

    mine = MyGroup()
    assert _is_bookkeeping(mine._discard)  # inherited: still gevent's code
    assert not _is_bookkeeping(mine.on_done)  # the user's own method


# -- 4. unlink removes exactly what rawlink added --------------------------------------


class _RaisingEq:
    """A callback whose ``__eq__``/``__hash__`` must never be asked (as in
    gevent's test__semaphore ``TestSemaphoreFair``)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, _source: Any) -> None:
        self.calls += 1

    def __eq__(self, other: object) -> bool:
        raise AssertionError("__eq__ asked")

    def __hash__(self) -> int:
        raise AssertionError("__hash__ asked")


def _linkables() -> Iterator[Tuple[str, Any, Callable[[], None]]]:
    g = gevent.spawn(gevent.sleep, 0.001)
    yield "Greenlet", g, g.join
    event = Event()
    yield "Event", event, event.set


def test_unlink_by_identity_never_asks_eq(als: AsyncLocalStorage[Any]) -> None:
    for name, target, finish in _linkables():
        callback = _RaisingEq()
        als.run("linked", target.rawlink, callback)
        target.unlink(callback)  # 0.1: AssertionError from callback.__eq__
        finish()
        gevent.sleep(0.01)
        assert callback.calls == 0, name


@pytest.mark.parametrize("make", ["Mock", "handler with .callback"])
def test_unlink_does_not_look_inside_the_argument(make: str, als: AsyncLocalStorage[Any]) -> None:
    """A Mock (which has every attribute) or a handler object with its own
    ``callback`` attribute is unlinked as itself."""
    class Handler:
        def __init__(self) -> None:
            self.callback = lambda _source: None
            self.calls = 0

        def __call__(self, _source: Any) -> None:
            self.calls += 1

    for name, target, finish in _linkables():
        callback: Any = mock.Mock() if make == "Mock" else Handler()
        als.run("linked", target.rawlink, callback)
        target.unlink(callback)
        finish()
        gevent.sleep(0.01)
        calls = callback.call_count if make == "Mock" else callback.calls
        assert calls == 0, name


def test_unlink_by_equality_still_works(als: AsyncLocalStorage[Any]) -> None:
    """A bound method is a new object on each access: unlink(obj.method)
    finds the link by ``==``, as gevent does without the hooks."""
    class Listener:
        calls = 0

        def on_ready(self, _source: Any) -> None:
            self.calls += 1

    for name, target, finish in _linkables():
        listener = Listener()
        als.run("linked", target.rawlink, listener.on_ready)
        target.unlink(listener.on_ready)
        if name == "Greenlet":
            als.run("linked", target.link, listener.on_ready)
            target.unlink(listener.on_ready)
        finish()
        gevent.sleep(0.01)
        assert listener.calls == 0, name


def test_shared_spawned_link_runs_in_each_links_context(als: AsyncLocalStorage[Any]) -> None:
    """One SpawnedLink object linked from two requests: each run sees the
    request that linked it, and the object itself is left unchanged."""
    seen: List[Tuple[Any, Any]] = []

    def callback(source: Any) -> None:
        seen.append((source.value, als.get_store()))

    link = SpawnedLink(callback)
    first = gevent.spawn(lambda: "first")
    second = gevent.spawn(lambda: "second")
    als.run("request-1", first.rawlink, link)
    als.run("request-2", second.rawlink, link)
    assert link.callback is callback
    gevent.joinall([first, second])
    gevent.sleep(0.01)
    assert sorted(seen) == [("first", "request-1"), ("second", "request-2")]
    # And the caller's own object still unlinks what it linked.
    third = gevent.spawn(gevent.sleep, 0.001)
    als.run("request-3", third.rawlink, link)
    third.unlink(link)
    assert not third.has_links()


def test_user_spawned_link_subclass_keeps_its_state(als: AsyncLocalStorage[Any]) -> None:
    """A user's SpawnedLink subclass with state of its own: the link that runs
    is a copy with the same state, in the link-time context."""
    seen: List[Tuple[Any, str]] = []

    class TaggedLink(SpawnedLink):  # type: ignore[misc]
        def __init__(self, callback: Callable[[Any], None], tag: str) -> None:
            SpawnedLink.__init__(self, callback)
            self.tag = tag

    link = TaggedLink(lambda _source: seen.append((als.get_store(), link.tag)), "tag")
    g = gevent.spawn(lambda: None)
    als.run("request", g.rawlink, link)
    g.join()
    gevent.sleep(0.01)
    assert seen == [("request", "tag")]
    assert not isinstance(link.callback, _LinkInContext)


# -- 10. nothing retains a store, nor a class ------------------------------------------


def _settle() -> None:
    gevent.sleep(0.01)
    gc.collect()


def test_bookkeeping_check_keeps_no_class_alive(als: AsyncLocalStorage[Any]) -> None:
    """A class whose method was linked is collectable once nothing uses it."""
    def make() -> weakref.ref[type]:
        class Listener:
            def on_done(self, _source: Any) -> None:
                pass

        g = als.run("x", gevent.spawn, gevent.sleep, 0)
        g.rawlink(Listener().on_done)
        g.join()
        return weakref.ref(Listener)

    ref = make()
    _settle()
    assert ref() is None


class _Store:
    __slots__ = ("__weakref__",)


def test_stopped_server_releases_the_request_context(als: AsyncLocalStorage[Any]) -> None:
    """A server started inside a request holds that context while it serves,
    and lets go of it at stop()."""
    store = _Store()
    ref = weakref.ref(store)
    server = gevent.server.StreamServer(("127.0.0.1", 0), lambda sock, addr: sock.close())
    als.run(store, server.start)
    del store
    server.stop()
    _settle()
    assert ref() is None
    assert server  # the stopped server is still referenced


def test_greenlet_finishing_after_uninstall_drops_its_context(
        als: AsyncLocalStorage[Any]) -> None:
    store = _Store()
    ref = weakref.ref(store)
    release = Event()
    g = als.run(store, gevent.spawn, release.wait)
    del store
    gevent.sleep(0)
    asl_gevent.uninstall()
    release.set()
    g.join(timeout=5)
    _settle()
    assert g.dead
    assert ref() is None


# -- 11. ThreadPool worker hooks see the user's function ------------------------------


def _recording_pool(calls: List[Tuple[str, Any, Any, Any]]) -> gevent.threadpool.ThreadPool:
    class Worker(gevent.threadpool.ThreadPool._WorkerGreenlet):  # type: ignore[misc]
        def _before_run_task(self, func: Any, args: Any, kwargs: Any, *rest: Any) -> None:
            calls.append(("before", func, args, kwargs))
            super()._before_run_task(func, args, kwargs, *rest)

        def _after_run_task(self, func: Any, args: Any, kwargs: Any, *rest: Any) -> None:
            calls.append(("after", func, args, kwargs))
            super()._after_run_task(func, args, kwargs, *rest)

    class Pool(gevent.threadpool.ThreadPool):  # type: ignore[misc]
        _WorkerGreenlet = Worker

    return Pool(1)


def test_threadpool_worker_hooks_see_the_users_function(als: AsyncLocalStorage[Any]) -> None:
    calls: List[Tuple[str, Any, Any, Any]] = []
    pool = _recording_pool(calls)

    def task(a: int, b: int, *, c: int) -> Tuple[int, Any]:
        return a + b + c, als.get_store()

    try:
        assert als.run("request", pool.apply, task, (1, 2), {"c": 3}) == (6, "request")
    finally:
        pool.kill()
    assert calls == [("before", task, (1, 2), {"c": 3}), ("after", task, (1, 2), {"c": 3})]


def test_threadpool_error_report_names_the_users_function(als: AsyncLocalStorage[Any]) -> None:
    """gevent reports a failed task to the hub as ``(worker, func)``: func is
    the user's function, and what the hub prints names it."""
    pool = gevent.threadpool.ThreadPool(1)

    def failing_task(argument: str) -> None:
        raise ValueError(argument)

    hub = gevent.get_hub()
    reports: List[Any] = []
    try:
        with hub_exception_stream() as stream:
            def handle_error(context: Any, *exc_info: Any) -> None:
                reports.append(context)
                hub.print_exception(context, *exc_info)

            hub.handle_error = handle_error
            result = als.run("request", pool.spawn, failing_task, "boom")
            with pytest.raises(ValueError, match="boom"):
                result.get(timeout=5)
    finally:
        del hub.handle_error
        pool.kill()
    assert len(reports) == 1 and reports[0][1] is failing_task
    assert "failing_task" in stream.getvalue() and "Context" not in stream.getvalue()


def test_threadpool_worker_started_before_install_carries_contexts(
        als: AsyncLocalStorage[Any]) -> None:
    """Workers look the hooks up per task: one started while the hooks were
    off runs later tasks in their caller's context, and sits in its own
    context again between tasks."""
    asl_gevent.uninstall()
    pool = gevent.threadpool.ThreadPool(1)
    try:
        assert als.run("before", pool.apply, als.get_store) is None
        asl_gevent.install()
        assert [als.run(i, pool.apply, als.get_store) for i in range(5)] == list(range(5))
        asl_gevent.uninstall()
        assert als.run("after", pool.apply, als.get_store) is None
    finally:
        pool.kill()
