"""The leak watch: a store still held by live work some seconds after its request.

Off by default. On with ``ASL_GEVENT_LEAK_WATCH=SECONDS`` or the
``leak_watch=SECONDS`` argument of :class:`asl_gevent.wsgi.RequestContextMiddleware`
(and the ``leak_watch`` attribute of :class:`asl_gevent.gunicorn.GeventWorker`),
which are the places that know when a request ends.

How it finds a holder without keeping anything alive itself:

* :meth:`LeakWatch.begin` puts a small *marker* object into the request's
  context (one more context variable). Every greenlet or patched thread the
  request starts copies the whole context, marker included.
* :meth:`LeakWatch.end` keeps only a *weak* reference to the marker, and the
  stores the request held inside the marker (the marker lives exactly as long
  as some context copy of the request does, so the stores are never kept
  alive by us, and a freed store is never confused with a new one at the same
  address: we compare objects, never ids).
* SECONDS later the watch looks at the weak reference. If the marker is gone,
  nothing holds the request's context: done, at the cost of one dead weakref.
  Only if it is still alive does it scan the live greenlets (``gc``, as
  gevent's ``format_run_info`` does), once for all such requests of that
  moment, for those whose context still holds one of the request's stores,
  and logs one ``WARNING`` on the ``asl_gevent.leak`` logger per holder, ever.

The checks run in one greenlet per process (started when needed, in an empty
context), so the watch needs a running gevent hub, which every gevent
server has (``gevent.pywsgi``, gunicorn's gevent workers, uWSGI
``--gevent``). A request served where no hub runs -- wsgiref or any threaded
server, gunicorn's sync and gthread workers, a test client calling the app
from the main greenlet -- is not watched: nothing is kept for it (the checker
would never run to consume it), and the ``asl_gevent.leak`` logger says so
once per process, naming the thread. Whether a hub runs is known from the
serving greenlet: it is the hub's, or a greenlet the hub runs (its parent
chain reaches this thread's hub).

.. versionadded:: 0.2
.. versionchanged:: 0.3 off, with one warning, where no gevent hub runs;
   before, every such request was kept forever.
"""

from __future__ import annotations

import collections
import gc
import itertools
import logging
import os
import reprlib
import threading
import time
import traceback
import weakref
from contextvars import Context, ContextVar
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

import gevent
# gevent's own way to ask for this thread's hub without making one: gevent.hub
# imports it from there too (checked on gevent 26.9).
from gevent._hub_local import get_hub_if_exists
from gevent.greenlet import Greenlet
from greenlet import getcurrent, greenlet

__all__ = ["LeakWatch", "leak_watch_delay", "stores_in", "describe_holder", "format_stores"]

_log = logging.getLogger("asl_gevent.leak")

ENV = "ASL_GEVENT_LEAK_WATCH"
_STORAGE_PREFIX = "asl_gevent.AsyncLocalStorage<"

#: The watched request a context belongs to (set only while a watch is on).
request_marker: ContextVar[Optional["_Request"]] = ContextVar("asl_gevent.request", default=None)


class _Request:
    """What a context holds to say "I am (a copy of) request X's context".

    Identity is the object itself (compared with ``is``, never by ``id()``),
    and it refers to no store, so watching keeps nothing alive.
    """

    __slots__ = ("ended", "__weakref__")

    def __init__(self) -> None:
        self.ended = 0.0

    def __repr__(self) -> str:
        return f"<watched request, ended at {self.ended:.1f}>"


def leak_watch_delay(value: Any, where: str) -> Optional[float]:
    """The delay a ``leak_watch`` argument asks for; ``None`` when off.

    ``None`` means "as the environment says" (``ASL_GEVENT_LEAK_WATCH``);
    ``0`` or ``False`` turn the watch off, a positive number of seconds on.

    :raises TypeError: for anything but ``None``, a bool or a number.
    :raises ValueError: for a negative or non-finite number, or a bad
        environment value.
    """
    source = f"{where} argument 'leak_watch'"
    if value is None:
        raw = os.environ.get(ENV, "").strip()
        if not raw:
            return None
        source = f"environment variable {ENV}"
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"{source} must be a number of seconds, not {raw!r}; "
                             f"e.g. {ENV}=5, or 0 for off") from None
    if isinstance(value, bool):
        return None if not value else 5.0
    if not isinstance(value, (int, float)):
        raise TypeError(f"{source} must be a number of seconds or None, not "
                        f"{type(value).__name__!r}; e.g. leak_watch=5")
    seconds = float(value)
    if not (0.0 <= seconds < float("inf")):
        raise ValueError(f"{source} must be a finite number of seconds >= 0, not {value!r}")
    return seconds or None


def stores_in(context: Context) -> List[Tuple[str, Any]]:
    """``(storage name, store)`` for every :class:`AsyncLocalStorage` set in *context*,
    by name (a context's own order is a hash order)."""
    found = []
    for var, value in context.items():
        name = var.name
        if name.startswith(_STORAGE_PREFIX):
            found.append((name[len(_STORAGE_PREFIX):-1], value))
    found.sort(key=lambda item: item[0])
    return found


class LeakWatch:
    """Watch requests for stores that outlive them by *delay* seconds.

    ``marker = watch.begin(context)`` before the request runs in *context*
    (or in copies of it), ``watch.end(marker)`` when it is over; or
    ``watch.call(app, environ, start_response, streaming)`` for a WSGI app.
    Cost: about a microsecond per request (CPython 3.11).
    """

    __slots__ = ("delay", "_queue")

    def __init__(self, delay: float) -> None:
        self.delay = delay
        # One FIFO per delay: requests end in order, so each queue is in due
        # order and appending is O(1) (a heap cost ~3x more per request).
        self._queue = _pending.setdefault(delay, collections.deque())

    def begin(self, context: Context) -> _Request:
        """Mark *context* (and every copy made of it from now on) as a request's."""
        marker = _Request()
        context.run(request_marker.set, marker)
        return marker

    def end(self, marker: _Request) -> None:
        """The request is over: check *delay* seconds from now who still holds it.

        .. versionchanged:: 0.3 nothing is kept where no gevent hub runs
           (see the module's documentation); one warning says the watch is off.
        """
        if _hub_runs():
            self._end_watched(marker)
        else:
            marker.ended = time.monotonic()

    def _end_watched(self, marker: _Request) -> None:
        """:meth:`end`, where a gevent hub is known to run the checker."""
        marker.ended = now = time.monotonic()
        self._queue.append((now + self.delay, weakref.ref(marker)))
        if _checker is None:
            _start_checker()

    def call(self, app: Callable[..., Any], environ: Any, start_response: Any,
             streaming: type) -> Any:
        """Call a WSGI *app* as a watched request, which ends when its response closes.

        *app* (the middleware's own serving method) copies the current
        context for the request first thing, so the marker, set around the
        call, is in that copy. The token is reset right here, in the greenlet
        and context that set it (the app runs synchronously in between), so
        the gevent#1930 hazard of a reset elsewhere cannot arise. Only our
        own response type (*streaming*) is wrapped: a list, a
        ``wsgi.file_wrapper`` or gunicorn's ``ALREADY_HANDLED`` is returned
        as is, and the request counts as ended when the app returns.

        Where no gevent hub runs, *app* is called unwatched (no marker).

        .. versionchanged:: 0.3 unwatched where no gevent hub runs.
        """
        if not _hub_runs():
            return app(environ, start_response)
        marker = _Request()
        token = request_marker.set(marker)
        # Ended right here, in the greenlet just found to run under the hub:
        # no second _hub_runs(). A streaming response ends on close(), which
        # may come from elsewhere, so that one asks again (end()).
        try:
            result = app(environ, start_response)
        except BaseException:
            self._end_watched(marker)
            raise
        finally:
            request_marker.reset(token)
        if type(result) is streaming:
            return _EndOnClose(result, self, marker)
        self._end_watched(marker)
        return result

    def __repr__(self) -> str:
        return f"<LeakWatch delay={self.delay}>"


class _EndOnClose:
    """A response iterable that ends its watched request when it is closed."""

    __slots__ = ("_result", "_watch", "_marker")

    def __init__(self, result: Any, watch: LeakWatch, marker: _Request) -> None:
        self._result = result
        self._watch = watch
        self._marker: Optional[_Request] = marker

    def __iter__(self) -> Any:
        return iter(self._result)

    def close(self) -> None:
        try:
            self._result.close()
        finally:
            marker, self._marker = self._marker, None
            if marker is not None:
                self._watch.end(marker)


def _id_of(store: Any) -> Optional[str]:
    value = store.get("request_id") if isinstance(store, dict) else getattr(store, "request_id", None)
    return value if isinstance(value, str) else None


# -- is there a hub to run the checker? -----------------------------------------

#: Counts "watch is off" situations: the warning goes with the first one
#: (``next`` on a count is atomic under the GIL, so once even across threads).
_off_seen = itertools.count()


def _hub_runs() -> bool:
    """Whether the current greenlet runs under this thread's gevent hub.

    True in the hub itself and in every greenlet it runs (server handlers,
    spawned and patched-thread greenlets: their parent chain reaches the
    hub); False in a thread's main greenlet, where a threaded or sync server
    or a test client serves requests and the hub may never get to run.
    About 0.3 us (CPython 3.11), once per request.
    """
    hub = get_hub_if_exists()
    if hub is not None:
        glet: Optional[greenlet] = getcurrent()
        while glet is not None:
            if glet is hub:
                return True
            glet = glet.parent
    _report_off()
    return False


def _report_off() -> None:
    if next(_off_seen):
        return
    _log.warning(
        "leak watch is off for requests served in thread %r: no gevent hub runs there "
        "(a threaded or sync server such as wsgiref, gunicorn's sync or gthread worker, "
        "or a test client), so its checker could never run; nothing is kept for those "
        "requests. The watch works under a gevent server: gevent.pywsgi, gunicorn's gevent "
        "workers, uWSGI --gevent", threading.current_thread().name)


# -- the checker ----------------------------------------------------------------

#: delay -> FIFO of (due, weakref to marker); deque appends and pops are atomic.
_pending: Dict[float, Deque[Tuple[float, "weakref.ReferenceType[_Request]"]]] = {}
_checker: Optional[Greenlet] = None
#: Holders already reported: once per holder, ever (weak: a holder may die).
_reported: "weakref.WeakSet[greenlet]" = weakref.WeakSet()
#: How many scans the checker made (tests and the benchmark read it).
scans = 0


def _start_checker() -> None:
    global _checker
    # An empty context: the checker must hold no request's store itself.
    checker = Context().run(gevent.spawn, _check_loop)
    checker.name = "asl_gevent.leak-watch"
    _checker = checker


def _check_loop() -> None:
    global _checker
    try:
        while True:
            queues = [(delay, queue) for delay, queue in _pending.items() if queue]
            if not queues:
                break
            # At most a few scans a second however short the delay, so a
            # steady stream of suspicious requests costs a bounded CPU share.
            period = min(max(min(delay for delay, _ in queues) / 2, 0.05), 1.0)
            wait = min(queue[0][0] for _, queue in queues) - time.monotonic()
            if wait > 0:
                gevent.sleep(max(wait, period))
                continue
            now = time.monotonic()
            suspects: Dict[int, _Request] = {}
            for _, queue in queues:
                while queue and queue[0][0] <= now:
                    marker = queue.popleft()[1]()
                    if marker is not None:
                        suspects[id(marker)] = marker
            if suspects:
                _report(suspects)
            suspects.clear()
            gevent.sleep(period)
    finally:
        _checker = None


def _holders(suspects: Dict[int, _Request]) -> List[Tuple[greenlet, _Request]]:
    """Live greenlets (patched threads included) whose context holds a suspect's store."""
    global scans
    scans += 1
    found: List[Tuple[greenlet, _Request]] = []
    for obj in gc.get_objects():
        # type(), not isinstance(): isinstance() falls back to obj.__class__,
        # which a lazy proxy computes (Django's unconfigured LazySettings
        # raises ImproperlyConfigured there, and killed the checker greenlet).
        if not issubclass(type(obj), greenlet) or obj.dead:
            continue
        try:
            context = obj.gr_context
        except (ValueError, AttributeError):  # running in another thread
            continue
        if context is None:
            continue
        marker = context.get(request_marker)
        if marker is None or suspects.get(id(marker)) is not marker:
            continue
        if any(store is not None for _, store in stores_in(context)):
            found.append((obj, suspects[id(marker)]))
    return found


def _report(suspects: Dict[int, _Request]) -> None:
    now = time.monotonic()
    for holder, marker in _holders(suspects):
        if holder in _reported:
            continue
        _reported.add(holder)
        stores = stores_in(holder.gr_context)
        request_id = next(filter(None, (_id_of(store) for _, store in stores)), None)
        _log.warning(
            "request %s ended %.1f s ago, but its store is still held by %s (holds %s); "
            "start long-lived work detached (asl_gevent.run_detached, "
            "asl_gevent.detached(), asl_gevent.detach_starter)",
            request_id or "(no id)", now - marker.ended, describe_holder(holder),
            format_stores(stores))


# -- naming a holder ----------------------------------------------------------------

_short = reprlib.Repr()
_short.maxstring = 60
_short.maxother = 60

_SKIP_FILES = (os.path.dirname(gevent.__file__), os.path.dirname(threading.__file__) + os.sep + "threading.py",
               os.path.dirname(__file__))


def _function_name(fn: Any) -> str:
    fn = getattr(fn, "func", fn)  # functools.partial
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None)
    if module and qualname:
        return f"{module}.{qualname}"
    return _short.repr(fn)


def _thread_of(glet: greenlet) -> Optional[threading.Thread]:
    """The ``threading.Thread`` a monkey-patched thread greenlet runs, if it is one."""
    run = getattr(glet, "_run", None) or getattr(glet, "run", None)
    owner = getattr(run, "__self__", None)
    return owner if isinstance(owner, threading.Thread) else None


def _spawned_at(glet: greenlet, depth: int = 3) -> Optional[str]:
    """Where *glet* was spawned: the innermost *depth* frames outside gevent,
    threading and asl_gevent, innermost first (a library's wrapper of
    ``Thread.start``, such as sentry-sdk's, then the real starter)."""
    stack = getattr(glet, "spawning_stack", None)  # gevent's track_greenlet_tree
    if stack is None:
        return None
    try:
        frames = traceback.extract_stack(stack)
    except Exception:  # pragma: no cover - gevent's frame stand-ins changed
        return None
    found = [f"{frame.filename}:{frame.lineno} in {frame.name}"
             for frame in reversed(frames) if not frame.filename.startswith(_SKIP_FILES)]
    return " <- ".join(found[:depth]) or None


def format_stores(stores: List[Tuple[str, Any]]) -> str:
    """``name=short repr, ...``: never a full dump of a store."""
    return ", ".join(f"{name or '(unnamed)'}={_short.repr(store)}" for name, store in stores)


def describe_holder(glet: greenlet) -> str:
    """``thread 'name' running module.function, spawned at file:line in function``."""
    thread = _thread_of(glet)
    if thread is not None:
        target = getattr(thread, "_target", None)
        text = f"thread {thread.name!r} running {_function_name(target or thread.run)}"
    elif isinstance(glet, Greenlet):
        text = f"greenlet {glet.name!r} running {_function_name(getattr(glet, '_run', None))}"
    else:
        text = f"raw greenlet {glet!r} running {_function_name(getattr(glet, 'run', None))}"
    where = _spawned_at(glet)
    return f"{text}, spawned at {where}" if where else text
