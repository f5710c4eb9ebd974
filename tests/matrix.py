"""SPEC's propagation matrix as data: one entry per spawn path.

Each path is ``path(fn) -> value``: it runs *fn* through that gevent/thread
path and returns what *fn* returned (or, for link callbacks, what the callback
returned). Used in-process by ``test_propagation.py`` and, after
``monkey.patch_all()``, by the subprocess scenarios it starts (``python
tests/matrix.py`` prints one JSON line per path).
"""

from __future__ import annotations

import sys

if __name__ == "__main__" and "patch" in sys.argv[1:]:
    # Before anything else is imported, as a patched app does: the executor
    # and pools below are created at import time.
    from gevent import monkey

    monkey.patch_all()

import _thread
import concurrent.futures
import json
import random
import threading
import time
from typing import Any, Callable, Dict

import gevent
import gevent.event
import gevent.hub
import gevent.lock
import gevent.monkey
import gevent.pool
import gevent.threadpool
from gevent.event import AsyncResult
from gevent.greenlet import Greenlet
from greenlet import getcurrent

Path = Callable[[Callable[[], Any]], Any]

# Created at import time, as an app would: their workers are reused across
# requests, so a task must run in its submitter's context, never the context
# the worker happened to start in.
EXECUTOR = concurrent.futures.ThreadPoolExecutor(max_workers=4)
THREADPOOL = gevent.threadpool.ThreadPool(4)
POOL = gevent.pool.Pool(8)


def in_thread_wait(result: Any, timeout: float = 10) -> Any:
    """Wait for a concurrent.futures.Future without blocking other greenlets
    (when threads are real, ``result()`` would block the hub)."""
    deadline = time.monotonic() + timeout
    while not result.done():
        if time.monotonic() > deadline:
            raise TimeoutError("future did not finish")
        gevent.sleep(0.001)
    return result.result()


class UserGreenlet(Greenlet):
    """A user subclass with its own __init__ and _run."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        super().__init__()
        self.fn = fn

    def _run(self) -> Any:  # noqa: D401
        return self.fn()


def _start(fn: Callable[[], Any]) -> Any:
    g = Greenlet(fn)
    g.start()
    return g.get(timeout=10)


def _start_later(fn: Callable[[], Any]) -> Any:
    g = Greenlet(fn)
    g.start_later(0.001)
    return g.get(timeout=10)


def _spawn_raw(fn: Callable[[], Any]) -> Any:
    result: AsyncResult = AsyncResult()
    gevent.spawn_raw(lambda: result.set(fn()))
    return result.get(timeout=10)


def _linked(method: str, fail: bool = False) -> Path:
    def path(fn: Callable[[], Any]) -> Any:
        def target() -> None:
            gevent.sleep(0.001)
            if fail:
                raise _Expected()

        hub = gevent.get_hub()
        if fail and _Expected not in hub.NOT_ERROR:
            hub.NOT_ERROR = (*hub.NOT_ERROR, _Expected)  # expected: don't print it
        g = Greenlet(target)
        g.start()
        result: AsyncResult = AsyncResult()
        getattr(g, method)(lambda source: result.set(fn()))
        return result.get(timeout=10)

    return path


def _linkable(kind: str) -> Path:
    """Row 4, second half: an Event/AsyncResult/semaphore rawlink callback."""
    def path(fn: Callable[[], Any]) -> Any:
        result: AsyncResult = AsyncResult()
        if kind == "Event":
            target: Any = gevent.event.Event()
            ready: Callable[[], Any] = target.set
        elif kind == "AsyncResult":
            target = AsyncResult()
            ready = lambda: target.set(None)  # noqa: E731
        else:
            target = gevent.lock.Semaphore(0)
            ready = target.release
        target.rawlink(lambda _source: result.set(fn()))
        gevent.spawn_later(0.001, ready)
        return result.get(timeout=10)

    return path


class _Expected(Exception):
    """Raised on purpose by a greenlet whose link_exception is tested."""


def _apply_async_callback(fn: Callable[[], Any]) -> Any:
    result: AsyncResult = AsyncResult()
    POOL.apply_async(lambda: None, callback=lambda _value: result.set(fn()))
    return result.get(timeout=10)


def _pool_map(fn: Callable[[], Any]) -> Any:
    values = POOL.map(lambda _: fn(), range(3))
    assert len(set(map(repr, values))) == 1, values
    return values[0]


def _pool_imap(fn: Callable[[], Any]) -> Any:
    values = list(POOL.imap(lambda _: fn(), range(3)))
    assert len(set(map(repr, values))) == 1, values
    return values[0]


def _pool_imap_unordered(fn: Callable[[], Any]) -> Any:
    values = list(POOL.imap_unordered(lambda _: fn(), range(3)))
    assert len(set(map(repr, values))) == 1, values
    return values[0]


def _via_thread(fn: Callable[[], Any]) -> Any:
    box: list[Any] = []
    t = threading.Thread(target=lambda: box.append(fn()))
    t.start()
    t.join(10)
    return box[0]


def _start_new_thread(fn: Callable[[], Any]) -> Any:
    result: AsyncResult = AsyncResult()
    _thread.start_new_thread(lambda: result.set(fn()), ())
    return result.get(timeout=10)


def _timer(fn: Callable[[], Any]) -> Any:
    box: list[Any] = []
    t = threading.Timer(0.001, lambda: box.append(fn()))
    t.start()
    t.join(10)
    return box[0]


def _executor_map(fn: Callable[[], Any]) -> Any:
    values = list(EXECUTOR.map(lambda _: fn(), range(3), timeout=10))
    assert len(set(map(repr, values))) == 1, values
    return values[0]


#: Rows 1-4, 7: greenlet paths; same in patched and unpatched processes.
GREENLET_PATHS: Dict[str, Path] = {
    "gevent.spawn": lambda fn: gevent.spawn(fn).get(timeout=10),
    "Greenlet.spawn": lambda fn: Greenlet.spawn(fn).get(timeout=10),
    "Greenlet().start": _start,
    "gevent.spawn_later": lambda fn: gevent.spawn_later(0.001, fn).get(timeout=10),
    "Greenlet().start_later": _start_later,
    "Greenlet subclass": lambda fn: UserGreenlet.spawn(fn).get(timeout=10),
    "Pool.spawn": lambda fn: POOL.spawn(fn).get(timeout=10),
    "Group.spawn": lambda fn: gevent.pool.Group().spawn(fn).get(timeout=10),
    "Pool.apply": lambda fn: POOL.apply(fn),
    "Pool.apply_async": lambda fn: POOL.apply_async(fn).get(timeout=10),
    "Pool.apply_async callback": _apply_async_callback,
    "Pool.map": _pool_map,
    "Pool.imap": _pool_imap,
    "Pool.imap_unordered": _pool_imap_unordered,
    "Pool.map_async": lambda fn: POOL.map_async(lambda _: fn(), [0]).get(timeout=10)[0],
    "gevent.spawn_raw": _spawn_raw,
    "Greenlet.link": _linked("link"),
    "Greenlet.link_value": _linked("link_value"),
    "Greenlet.link_exception": _linked("link_exception", fail=True),
    "Greenlet.rawlink": _linked("rawlink"),
    "Event.rawlink": _linkable("Event"),
    "AsyncResult.rawlink": _linkable("AsyncResult"),
    "Semaphore.rawlink": _linkable("Semaphore"),
    "ThreadPool.spawn": lambda fn: THREADPOOL.spawn(fn).get(timeout=10),
    "ThreadPool.apply": lambda fn: THREADPOOL.apply(fn),
    "ThreadPool.apply_async": lambda fn: THREADPOOL.apply_async(fn).get(timeout=10),
    "ThreadPool.map": lambda fn: THREADPOOL.map(lambda _: fn(), [0])[0],
    "hub threadpool": lambda fn: gevent.get_hub().threadpool.spawn(fn).get(timeout=10),
}

#: Row 6: a task runs in its submitter's context whether threads are real or patched.
EXECUTOR_PATHS: Dict[str, Path] = {
    "ThreadPoolExecutor.submit": lambda fn: in_thread_wait(EXECUTOR.submit(fn)),
    "ThreadPoolExecutor.map": _executor_map,
}

#: Row 5: only under monkey.patch_all(); real threads are isolated (row 10).
PATCHED_THREAD_PATHS: Dict[str, Path] = {
    "threading.Thread": _via_thread,
    "_thread.start_new_thread": _start_new_thread,
    "threading.Timer": _timer,
}


_real_get_ident = gevent.monkey.get_original("_thread", "get_ident")
_MAIN_THREAD = _real_get_ident()


def nap() -> None:
    """Sleep a little: cooperatively on the main OS thread (greenlets, patched
    threads), for real in a real worker thread (which has no hub)."""
    delay = random.random() * 0.003
    if isinstance(getcurrent(), gevent.hub.Hub):
        return  # a rawlink callback runs in the hub, which must not block
    if _real_get_ident() == _MAIN_THREAD:
        gevent.sleep(delay)
    else:
        time.sleep(delay)


def isolation(path: Path, storage: Any, requests: int) -> dict[str, Any]:
    """*requests* concurrent runs, each sending a reader down *path*.

    Returns ``{"request-N": what the child saw}``.
    """
    def reader() -> Any:
        nap()
        return storage.get_store()

    def request(n: int) -> Any:
        nap()
        return path(reader)

    greenlets = {f"request-{n}": storage.run(f"request-{n}", gevent.spawn, request, n)
                 for n in range(requests)}
    gevent.joinall(list(greenlets.values()), timeout=60, raise_error=True)
    return {name: g.value for name, g in greenlets.items()}


def main() -> None:
    """Run every path with *requests* concurrent runs; print one JSON line per path.

    ``python tests/matrix.py [patch] [nohooks] [REQUESTS]``
    """
    args = sys.argv[1:]
    import asl_gevent

    if "nohooks" in args:
        asl_gevent.uninstall()
    storage = asl_gevent.AsyncLocalStorage(name="matrix")
    requests = int(next((a for a in args if a.isdigit()), "20"))
    paths = {**GREENLET_PATHS, **EXECUTOR_PATHS}
    if "patch" in args:
        paths.update(PATCHED_THREAD_PATHS)
    random.seed(1234)
    for name, path in paths.items():
        print(json.dumps({"path": name, "installed": asl_gevent.is_installed(),
                          "seen": isolation(path, storage, requests)}), flush=True)


if __name__ == "__main__":
    main()
