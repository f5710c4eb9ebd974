"""Propagation hooks: one small function per gevent path.

greenlet (>= 1.0) gives every greenlet its own :class:`contextvars.Context`,
but a new greenlet starts with an *empty* one, so whatever a request set is
gone inside ``gevent.spawn``. :func:`asl_gevent.install` puts these hooks in
place (:mod:`asl_gevent._hooks` does the patching), and then every path below
hands its child a *copy* of the spawner's context as it is at spawn time:

============================================  =================================
path                                          hook
============================================  =================================
``Greenlet.start``/``start_later`` (spawn,    :func:`_on_spawn` (gevent's spawn
pools, groups, patched threads, subclasses)   callback)
``gevent.spawn_raw``                          :func:`_spawn_raw`
``Greenlet.link*``/``rawlink`` callbacks      :func:`_rawlink`
``Event``/``AsyncResult``/semaphore           :func:`_linkable_rawlink`
``rawlink`` callbacks
``ThreadPoolExecutor.submit``/``map``         :func:`_work_item_class`,
                                              :func:`_adjust_thread_count`
``gevent.threadpool.ThreadPool`` tasks        :func:`_thread_result_class`,
                                              :func:`_before_run_task`,
                                              :func:`_after_run_task`
``BaseServer`` handlers (StreamServer, WSGI)  :func:`_server_start`,
                                              :func:`_server_do_handle`,
                                              :func:`_server_close`
``pywsgi`` keep-alive requests                :func:`_wsgi_handle_one_request`
``Greenlet.run`` (drops a finished            :func:`_greenlet_run`
greenlet's context)
============================================  =================================

The hub is not a request. Code the hub runs for itself (loop callbacks,
timers) may set context variables in the hub's own context; greenlets the hub
spawns must not copy that, so they get an empty context -- unless the hub is
running code *on behalf of* a context (:func:`_hub_carries`): a server
accepting for the context it was started in, a link callback, a function
from ``bind``, ``snapshot`` or ``AsyncResource``, or an ``als.run`` the hub
calls. Captured contexts are marked once, where they are captured
(:data:`_carried`, :func:`capture_context`), so running them costs nothing
more; ``run()`` is recognised without any mark, so it costs nothing either.

Each hook calls what it replaced through an ``_orig_*`` global of this
module, which install() binds when it puts the hook in place.

:func:`_on_spawn`, :func:`_greenlet_run` and :func:`_rawlink` run on every
spawn + join; when the optional extension :mod:`asl_gevent._speedups` is
built they are replaced by compiled versions of themselves at the end of
this module (:func:`_accelerate`), which do the common case and call the
Python functions (``_py_on_spawn``...) for the rest.
"""

from __future__ import annotations

import copy
import os
from contextvars import Context, ContextVar, copy_context
from types import MethodType
from typing import TYPE_CHECKING, Any, Callable, List, Optional, Set

import gevent
import gevent.hub
import gevent.greenlet
from gevent.greenlet import SpawnedLink
from greenlet import getcurrent, greenlet

_Hub = gevent.hub.Hub


def _gevent_greenlet_class() -> Any:
    """gevent's own ``Greenlet``, even if ``gevent.Greenlet`` was replaced.

    ddtrace < 2 (and others) assign a subclass to ``gevent.Greenlet`` and
    ``gevent.greenlet.Greenlet``; the methods we hook live on gevent's class
    (the compiled ``gevent._gevent_cgreenlet.Greenlet`` on CPython), which
    every such subclass inherits.
    """
    for cls in gevent.greenlet.Greenlet.__mro__:
        if cls.__name__ == "Greenlet" and cls.__module__ in (
                "gevent.greenlet", "gevent._gevent_cgreenlet"):
            return cls
    return gevent.greenlet.Greenlet  # pragma: no cover - gevent renamed its module


if TYPE_CHECKING:
    from gevent.greenlet import Greenlet as Greenlet
else:
    Greenlet = _gevent_greenlet_class()


#: Set where a context is captured for later: True when the hub may run (and
#: spawn) code for it, False when the hub captured it for itself; unset
#: elsewhere (see :func:`_hub_carries`). Kept across a reload: contexts
#: captured before it hold this variable.
_carried: ContextVar[Optional[bool]] = (
    globals().get("_carried") or ContextVar("asl_gevent.carried", default=None))

#: Set by :mod:`asl_gevent._detach` only while some ``detached()`` block is
#: active (None otherwise, so a spawn pays one global load for it):
#: ``check()`` tells whether the spawning context is inside an active block,
#: and then :func:`_on_spawn` gives the greenlet an empty context. Kept
#: across a reload of this module (a block may be active then).
_detaching_check: Optional[Callable[[], bool]] = globals().get("_detaching_check")


def _carry(context: Context) -> Context:
    """Mark *context* as one the hub may run (and spawn) code for."""
    context.run(_carried.set, True)
    return context


def _noop() -> None:
    pass


def _hub_carries() -> bool:
    """In the hub: does the current context belong to work it runs for someone?

    A captured context says so itself (:data:`_carried`). An unmarked one is
    the hub's own unless the hub entered it with :meth:`Context.run`, as
    ``als.run(store, fn)`` does when a loop callback calls it: the hub's own
    context is never entered that way (greenlet switches it in), and
    entering an entered context raises :class:`RuntimeError` (documented
    for :meth:`Context.run`). Only the hub's spawns and links pay for this
    check; ``run()`` itself marks nothing and pays nothing.
    """
    carried = _carried.get()
    if carried is not None:
        return carried
    context = getcurrent().gr_context
    if context is None:
        return False
    try:
        context.run(_noop)
    except RuntimeError:
        return True  # inside a Context.run: on behalf of that context
    return False


def capture_context() -> Context:
    """``copy_context()`` for work that will run later, maybe in the hub.

    ``bind``, ``snapshot`` and ``AsyncResource`` capture here. The copy is
    marked once, now: carried, so that the hub running the captured work
    hands its context to what that work spawns and links; or, captured by
    the hub for itself, not carried, as the hub is not a request.
    """
    context = copy_context()
    if _carried.get() is not True:
        carried = not isinstance(getcurrent(), _Hub) or _hub_carries()
        context.run(_carried.set, carried)
    return context


# -- Greenlet.start(): spawn, spawn_later, Pool/Group, patched threads --------


#: Exact types of a spawner that is surely not the hub: the main greenlet
#: and gevent's own Greenlet. A set lookup is ~180 instructions cheaper than
#: ``isinstance(..., Hub)``, which still decides for every other type
#: (CPython 3.11).
_NOT_HUBS = frozenset((greenlet, Greenlet))


def _on_spawn(glet: greenlet) -> None:
    """Give a greenlet being started a copy of its spawner's context.

    gevent calls this from ``Greenlet.start()`` in the spawning greenlet, so
    ``copy_context()`` is the spawner's context at start time (not at
    ``Greenlet(...)`` creation time). A context set on the greenlet before it
    starts (SQLAlchemy's asyncio bridge and greenback do this) is left alone,
    also inside a ``detached()`` block; any other greenlet started in an
    active block starts empty.
    """
    if glet.gr_context is None:
        # The common case in one condition (each bytecode of this hook runs
        # on every spawn): no detached() block, a spawner that is surely
        # not the hub.
        if _detaching_check is None and type(getcurrent()) in _NOT_HUBS:
            glet.gr_context = copy_context()
        else:
            _on_spawn_checked(glet)


def _on_spawn_checked(glet: greenlet) -> None:
    """:func:`_on_spawn` inside a ``detached()`` block, or from a possible hub."""
    check = _detaching_check
    if check is not None and check():
        glet.gr_context = Context()
    elif (type(getcurrent()) in _NOT_HUBS or not isinstance(getcurrent(), _Hub)
          or _hub_carries()):
        glet.gr_context = copy_context()
    else:
        glet.gr_context = Context()


# -- Greenlet.run: a finished greenlet lets go of its context ----------------

_orig_greenlet_run: Callable[[Greenlet], None]  # set by install(), like every _orig_*


def _greenlet_run(self: Greenlet, _type: Any = type, _Greenlet: Any = Greenlet) -> None:
    """``Greenlet.run`` that drops the greenlet's context when it finishes.

    greenlet (checked on 3.5.6; its own test_contextvars asserts it) keeps
    ``gr_context`` on a dead greenlet, so a finished ``Greenlet`` that is
    still referenced (a list of jobs, a result holder) would keep every store
    of its request alive. gevent drops a finished greenlet's ``args`` and
    ``kwargs`` for the same reason. Cost: about 1.3k instructions, 2.8% of
    ``spawn`` + ``join`` (gevent 26.9.0, CPython 3.11; ``python -m
    asl_gevent.bench.instructions spawn/gevent``).

    Only when ``run`` is not overridden: then this is the greenlet's bottom
    frame and no ``Context.run`` is active in it (replacing the context inside
    one makes its exit fail with "cannot exit context").
    """
    try:
        _orig_greenlet_run(self)
    finally:
        # ``Greenlet.run`` rather than ``_greenlet_run``: a greenlet that
        # finishes after uninstall() still lets go (the class then holds the
        # original again, and a subclass that overrides run holds neither).
        # ``type(self) is Greenlet`` first: gevent.spawn's own greenlets
        # skip two class-attribute lookups (~250 instructions, CPython 3.11).
        # ``_type``/``_Greenlet`` are locals (default arguments: greenlet
        # calls ``run()`` with none), a little cheaper than globals.
        if _type(self) is _Greenlet or _type(self).run is _Greenlet.run:
            self.gr_context = None


def _in_a_frame(run: Callable[[Any], Any], glet: Any) -> None:
    """``run(glet)`` from a Python frame: the compiled ``run`` hook calls this
    when what gevent's ``run`` calls (``glet._run``) is not a Python function
    or a method of one, whose own frame would do.

    greenlet (checked on 3.5.6) takes a started greenlet with no Python frame
    on its stack for one that is running, in some thread: reading its
    ``gr_context`` while it waits raises ``ValueError`` ("running in a
    different thread"). gevent's ``run`` is compiled, and so may be what it
    calls (``gevent.spawn(event.wait)``); the Python ``_greenlet_run`` is a
    frame itself, and this one keeps the compiled hook's greenlets as
    readable (the leak watch and ``stores_of`` read them). About 0.4k
    instructions per greenlet (CPython 3.11).
    """
    run(glet)


# -- gevent.spawn_raw: skips the spawn callbacks ------------------------------

_orig_spawn_raw: Callable[..., greenlet]


def _spawn_raw(function: Callable[..., Any], *args: Any, **kwargs: Any) -> greenlet:
    glet = _orig_spawn_raw(function, *args, **kwargs)
    _on_spawn(glet)  # not switched to yet: spawn_raw only schedules it
    return glet


_spawn_raw.__doc__ = gevent.hub.spawn_raw.__doc__


# -- Greenlet.link / link_value / link_exception / rawlink --------------------


class _LinkInContext:
    """A link callback that runs in the context captured at ``rawlink()`` time.

    ``unlink(callback)`` removes what ``rawlink(callback)`` added: gevent
    removes links with ``list.remove``, which asks each link ``link ==
    callback``. This compares by identity first and only then, as gevent
    would have, with the callback's own ``==``; it never looks inside the
    argument (a ``Mock`` or any handler with a ``callback`` attribute is
    compared as itself).
    """

    __slots__ = ("callback", "_context")

    def __init__(self, callback: Callable[[Any], Any], context: Context) -> None:
        self.callback = callback
        self._context = context

    def __call__(self, source: Any) -> Any:
        # Called in the hub (rawlink) or in a fresh raw greenlet (link()): a
        # copy per call keeps the captured context enterable even if the
        # callback blocks or is called again (Event links, re-linked waiters).
        return self._context.copy().run(self.callback, source)

    def __eq__(self, other: object) -> bool:
        callback = self.callback
        if other is callback or other is self:
            return True  # identity decides: the callback's __eq__ is not asked
        return bool(callback == other)

    def __hash__(self) -> int:
        return hash(self.callback)

    def __repr__(self) -> str:
        return repr(self.callback)


_orig_rawlink: Callable[[Greenlet, Any], None]
_CFunction = type(getcurrent().switch)  # builtin_function_or_method
_SPAWNED_LINK_TYPES = frozenset(
    cls for cls in vars(gevent.greenlet).values()
    if isinstance(cls, type) and issubclass(cls, SpawnedLink))


#: Functions gevent defines that were seen as link callbacks' ``__func__``
#: (``Group._discard``, ``wait``/``iwait``'s waiter...): only gevent's own,
#: which live as long as gevent does, so this set keeps nothing of the
#: user's alive. A set lookup is what makes ``gevent.wait`` and
#: ``Pool.spawn`` cheap; it is capped in case gevent ever made such
#: functions per call.
_gevent_functions: Set[Any] = set()
_GEVENT_FUNCTIONS_MAX = 1024


def _is_bookkeeping(callback: Any) -> bool:
    """True for gevent's own link callbacks, recognised by what they are.

    * A greenlet's C-level ``switch``/``throw``: ``join()``, ``get()``,
      ``wait()`` resume the waiting greenlet, which runs in *its* context.
      (greenlet's own C methods are the only C code bound to a greenlet:
      gevent's ``Greenlet`` methods and those of a user's subclass, Python
      or Cython, are bound methods. Checking the name too would cost a new
      string per ``join()``.)
    * A method whose function gevent defines (``Group._discard``, a
      ``Waiter``'s or ``wait``/``iwait``'s ``switch``, compiled or not),
      also when a user's subclass inherits it.

    Anything else is wrapped, C code included: a user's Cython or mypyc
    function, a ``list.append`` or a generator's ``send`` may call back into
    Python that reads a store. No class is looked at, so none is kept alive.
    """
    kind = type(callback)
    if kind is MethodType:
        function = callback.__func__
        if function in _gevent_functions:
            return True
        module = getattr(function, "__module__", None)
        if type(module) is str and module.startswith("gevent."):
            if len(_gevent_functions) < _GEVENT_FUNCTIONS_MAX:
                _gevent_functions.add(function)
            return True
        return False
    if kind is _CFunction:
        return isinstance(callback.__self__, greenlet)
    return False


def _in_link_context(callback: Any) -> Any:
    """What ``rawlink`` should register for *callback*, linked from here.

    A ``SpawnedLink`` (what ``link``/``link_value``/``link_exception`` pass)
    runs its callback in a new raw greenlet, which would start empty: we
    register a *new* link of the same kind around a wrapped callback, never
    touching the caller's object, so one ``SpawnedLink`` linked from two
    requests runs each time in that link's own context.
    """
    if isinstance(callback, SpawnedLink):
        inner = callback.callback
        if isinstance(inner, _LinkInContext) or _is_bookkeeping(inner):
            return callback
        wrapped = _LinkInContext(inner, copy_context())
        cls = type(callback)
        if cls in _SPAWNED_LINK_TYPES:
            return cls(wrapped)
        link = copy.copy(callback)  # a user subclass: keep its other state
        link.callback = wrapped
        return link
    if isinstance(callback, _LinkInContext):
        return callback  # re-linked by gevent (semaphore's unswitched waiters)
    return _LinkInContext(callback, _carry(copy_context()))


def _rawlink(self: Greenlet, callback: Any) -> None:
    """``Greenlet.rawlink`` that remembers the context current at link time.

    ``link``, ``link_value`` and ``link_exception`` come here too.
    """
    # Every join()/get() comes here with a greenlet's C-level ``switch``: it
    # is recognised inline, before anything else is looked at (spawn + join
    # is the hottest path this hook sits on; SPEC allows it 5%).
    # One condition each, no local variable: a little cheaper (CPython 3.11).
    if type(callback) is _CFunction and isinstance(callback.__self__, greenlet):
        return _orig_rawlink(self, callback)
    if type(callback) is MethodType and callback.__func__ in _gevent_functions:
        return _orig_rawlink(self, callback)  # Pool/Group's _discard
    if (callable(callback) and not _is_bookkeeping(callback)
            and (not isinstance(getcurrent(), _Hub) or _hub_carries())):
        callback = _in_link_context(callback)
    _orig_rawlink(self, callback)


# -- Event / AsyncResult / Semaphore / BoundedSemaphore rawlink ---------------

_orig_linkable_rawlink: Callable[[Any, Any], None]


def _linkable_rawlink(self: Any, callback: Any) -> None:
    """``AbstractLinkable.rawlink``: callbacks run in their link-time context.

    ``Event``, ``AsyncResult``, ``Semaphore`` and ``BoundedSemaphore`` share
    this (compiled) base. Their own waits (``wait()``, ``get()``,
    ``acquire()``) link from compiled code straight to the base's C
    implementation and never come here; ``gevent.wait``/``iwait``/``joinall``
    do, with a waiter's method that :func:`_is_bookkeeping` passes through.
    """
    if type(callback) is MethodType and callback.__func__ in _gevent_functions:
        _orig_linkable_rawlink(self, callback)  # wait/iwait/joinall's waiter
        return
    if (callable(callback) and not _is_bookkeeping(callback)
            and (not isinstance(getcurrent(), _Hub) or _hub_carries())):
        callback = _in_link_context(callback)
    _orig_linkable_rawlink(self, callback)


# -- concurrent.futures.ThreadPoolExecutor (real or patched threads) ---------

_orig_work_item: type
_orig_adjust_thread_count: Callable[[Any], None]


def _work_item_class(original: type) -> type:
    """``concurrent.futures``' per-task ``_WorkItem``, plus its submitter's context.

    ``ThreadPoolExecutor.submit`` looks ``_WorkItem`` up as a global of
    ``concurrent.futures.thread`` and makes one in the submitting thread or
    greenlet, so the submitter's context is at hand there; the worker runs
    the task in a copy of it, whatever request its own context came from (a
    copy per task: a Context cannot be entered by two workers at once).
    Carrying it on the work item, rather than wrapping the task in
    ``submit``, lets a patcher that wrapped ``submit`` before install()
    (OpenTelemetry's or Datadog's futures instrumentation) see the user's own
    function, called in the submitter's context. Python 3.14 changed both
    signatures (``__init__(future, task)``, ``run(ctx)``): there the item
    keeps the context and ``run`` enters it. Built by install() from the
    class it replaces (a registry row with ``make=True``).
    """

    # Bound once, not looked up through super() per task: submit + result
    # is a hot path (the bench's spawn/executor figure).
    base: Any = original  # maybe a patcher's subclass: inherited methods too
    init, run = base.__init__, base.run
    code = getattr(init, "__code__", None)
    if code is not None and code.co_varnames[:5] == ("self", "future", "fn", "args", "kwargs"):
        # Python 3.8-3.13: the item calls ``self.fn(*self.args, **self.kwargs)``;
        # making that ``context.run(fn, *args, **kwargs)`` costs no Python
        # frame in the worker (about 5% of a submit + result, CPython 3.11).
        class _WorkItem(original):  # type: ignore[misc]
            __slots__ = ()

            def __init__(self, future: Any, fn: Any, args: Any, kwargs: Any) -> None:
                init(self, future, copy_context().run, (fn, *args), kwargs)
    else:  # pragma: no cover - Python >= 3.14: __init__(future, task), run(ctx)
        class _WorkItem(original):  # type: ignore[misc, no-redef]
            __slots__ = ("asl_gevent_context",)

            def __init__(self, *args: Any, **kwargs: Any) -> None:
                init(self, *args, **kwargs)
                self.asl_gevent_context = copy_context()

            def run(self, *args: Any) -> None:
                # The worker drops the item right after this, and the
                # context with it: run once, so never entered twice.
                self.asl_gevent_context.run(run, self, *args)

    _WorkItem.__doc__ = _work_item_class.__doc__
    _WorkItem.__module__ = __name__
    return _WorkItem


def _adjust_thread_count(self: Any) -> None:
    """Start the executor's workers in an empty context.

    ``submit`` calls this, in the submitter's context. A worker it starts (a
    greenlet under monkey-patching, or a thread on Python 3.14 with
    ``thread_inherit_context``) would otherwise hold a copy of this
    request's context between tasks, for as long as the executor lives.
    """
    threads = getattr(self, "_threads", None)
    if threads is not None and len(threads) >= self._max_workers:
        # Full: it starts no worker (Python 3.8-3.14), so no empty context
        # to build; most submits of a busy executor come here.
        _orig_adjust_thread_count(self)
    else:
        Context().run(_orig_adjust_thread_count, self)


# -- gevent.threadpool.ThreadPool (real OS threads) --------------------------

_orig_thread_result: type
_orig_before_run_task: Callable[..., None]
_orig_after_run_task: Callable[..., None]
#: Where a worker keeps its own context while it runs a task.
_WORKER_CONTEXT = "_asl_gevent_worker_context"


def _thread_result_class(original: type) -> type:
    """gevent's per-task ``ThreadResult``, plus the spawning caller's context.

    ``ThreadPool.spawn`` (which ``apply``, ``apply_async``, ``map``, ``imap``
    and gevent's ``ThreadPoolExecutor`` use) makes one in the caller's
    greenlet, so this is where the caller's context is at hand. Carrying it
    here, rather than wrapping the task in ``Context.run``, lets the worker's
    hooks (``_before_run_task``/``_after_run_task``, profilers, tracers) and
    gevent's error reports see the user's own function and arguments. Built
    by install() from the class it replaces (a registry row with
    ``make=True``), so gevent.threadpool need not be imported before.
    """

    class _ThreadResult(original):  # type: ignore[misc]
        __slots__ = ("asl_gevent_context",)

        def __init__(self, *args: Any) -> None:
            super().__init__(*args)
            self.asl_gevent_context = copy_context()

    _ThreadResult.__doc__ = _thread_result_class.__doc__
    _ThreadResult.__module__ = __name__
    return _ThreadResult


def _before_run_task(self: Any, func: Any, args: Any, kwargs: Any, thread_result: Any,
                     *rest: Any, **options: Any) -> None:
    """Enter the task's context in the worker, then gevent's own set-up.

    The worker (a raw greenlet at the bottom of its OS thread, in no
    ``Context.run``) swaps its ``gr_context``, which greenlet (>= 1.0)
    allows on the running greenlet; :func:`_after_run_task` swaps it back.
    Looked up by the worker for every task, so workers started before
    install() carry contexts too.
    """
    context = getattr(thread_result, "asl_gevent_context", None)
    if context is not None:
        # From here the worker holds the context, and lets go of it in
        # _after_run_task, however long gevent keeps the ThreadResult.
        thread_result.asl_gevent_context = None
        current = getcurrent()
        self.__dict__[_WORKER_CONTEXT] = current.gr_context
        current.gr_context = context
    _orig_before_run_task(self, func, args, kwargs, thread_result, *rest, **options)


def _after_run_task(self: Any, func: Any, args: Any, kwargs: Any, thread_result: Any,
                    *rest: Any, **options: Any) -> None:
    """gevent's own clean-up, then back to the worker's own context."""
    try:
        _orig_after_run_task(self, func, args, kwargs, thread_result, *rest, **options)
    finally:
        if _WORKER_CONTEXT in self.__dict__:
            getcurrent().gr_context = self.__dict__.pop(_WORKER_CONTEXT)


# -- gevent.baseserver.BaseServer: StreamServer, WSGIServer, gunicorn --------

_SERVER_CONTEXT = "_asl_gevent_context"
_orig_server_start: Callable[[Any], None]
_orig_server_do_handle: Callable[..., Any]


def _server_start(self: Any) -> None:
    """Remember the context the server was started in, for its handlers.

    Not when the hub starts it for itself; when it starts it on behalf of a
    captured context (bound work, a link callback), that context counts.
    """
    if not isinstance(getcurrent(), _Hub) or _hub_carries():
        self.__dict__[_SERVER_CONTEXT] = _carry(copy_context())
    _orig_server_start(self)


def _server_do_handle(self: Any, *args: Any) -> Any:
    """Spawn the connection handler from the server's start-time context.

    The hub accepts connections and spawns their handlers; without this they
    would get an empty context, never whatever hub-run code left behind.
    """
    context = self.__dict__.get(_SERVER_CONTEXT)
    if context is None:
        return _orig_server_do_handle(self, *args)
    return context.copy().run(_orig_server_do_handle, self, *args)


_orig_server_close: Callable[[Any], None]


def _server_close(self: Any) -> None:
    """Let go of the start-time context: a stopped server holds no request."""
    try:
        _orig_server_close(self)
    finally:
        self.__dict__.pop(_SERVER_CONTEXT, None)


# -- gevent.pywsgi keep-alive: several requests in one greenlet ---------------

_orig_handle_one_request: Callable[[Any], Any]


def _wsgi_handle_one_request(self: Any) -> Any:
    """Serve one request in its own copy of the connection's context.

    So request 2 on a keep-alive connection never sees a store or context
    variable request 1 set, even with ``enter_with`` or after it raised.
    """
    return copy_context().run(_orig_handle_one_request, self)


# -- the optional compiled accelerator ----------------------------------------


def _speedups_enabled() -> bool:
    """False when ``ASL_GEVENT_PUREPYTHON`` is set (and not 0/false/no/off)."""
    value = os.environ.get("ASL_GEVENT_PUREPYTHON", "")
    return value.strip().lower() in ("", "0", "false", "no", "off")


def _accelerate() -> bool:
    """Replace the spawn + join hooks by their C versions, if there are any.

    :mod:`asl_gevent._speedups` (built from the sdist when a C compiler is
    there) does the common case of :func:`_on_spawn`, :func:`_greenlet_run`
    and :func:`_rawlink` in C and calls these Python functions for the rest;
    it reads the state (``_orig_*``, :data:`_detaching_check`...) from this
    module's globals at call time, as they do, so install(), ``detached()``
    and a reload see no difference. Each Python hook runs a frame on every
    spawn + join: in C, ``gevent.spawn(f).join()`` costs 1.062x instead of
    1.107x of what it costs without hooks (gevent 26.9.0, CPython 3.11,
    callgrind).
    """
    global _on_spawn, _greenlet_run, _rawlink
    if not _speedups_enabled():
        return False
    try:
        from . import _speedups
    except ImportError:  # not built: no compiler at install time, or PyPy
        return False
    if not all(hasattr(_speedups, name) for name in ("hook", "storage_type", "storage_methods")):
        return False  # built from older sources (an editable install not rebuilt)
    _on_spawn = _speedups.hook(_py_on_spawn)
    _greenlet_run = _speedups.hook(_py_greenlet_run)
    _rawlink = _speedups.hook(_py_rawlink)
    return True


#: The pure-Python hooks, whatever runs (the compiled ones call them for the
#: uncommon cases).
_py_on_spawn, _py_greenlet_run, _py_rawlink = _on_spawn, _greenlet_run, _rawlink

#: Whether the compiled hooks (and storage class, see asl_gevent._storage)
#: are in use (see :data:`asl_gevent.SPEEDUPS`).
SPEEDUPS: bool = _accelerate()
