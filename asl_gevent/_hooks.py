"""Propagation hooks: one small function per gevent path.

greenlet (>= 1.0) gives every greenlet its own :class:`contextvars.Context`,
but a new greenlet starts with an *empty* one, so whatever a request set is
gone inside ``gevent.spawn``. :func:`install` makes every path below hand its
child a *copy* of the spawner's context as it is at spawn time:

============================================  =================================
path                                          hook
============================================  =================================
``Greenlet.start``/``start_later`` (spawn,    :func:`_on_spawn` (gevent's spawn
pools, groups, patched threads, subclasses)   callback)
``gevent.spawn_raw``                          :func:`_spawn_raw`
``Greenlet.link*``/``rawlink`` callbacks      :func:`_rawlink`
``Event``/``AsyncResult``/semaphore           :func:`_linkable_rawlink`
``rawlink`` callbacks
``ThreadPoolExecutor.submit``/``map``         :func:`_executor_submit`
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

:func:`uninstall` puts every patched attribute back as it was, unless
another library has wrapped it since (see :func:`_restore`).

Each row of :data:`_PATHS` names one attribute and its hook; a hook calls
what it replaced through an ``_orig_*`` global that :func:`install` binds.
A module not imported yet is patched when it is (:class:`_PatchOnImport`),
so importing this package imports none of them.
"""

from __future__ import annotations

import _thread
import copy
import gc
import os
import sys
import warnings
from contextvars import Context, ContextVar, copy_context
from types import MethodType, ModuleType
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Set, Tuple, Union

import gevent
import gevent.hub
import gevent.greenlet
from gevent._abstract_linkable import AbstractLinkable
from gevent.greenlet import SpawnedLink
from greenlet import getcurrent, greenlet

__all__ = ["install", "uninstall", "is_installed"]

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
    from gevent.greenlet import Greenlet
else:
    Greenlet = _gevent_greenlet_class()


class _State:
    """What install() did, shared by every incarnation of this module.

    ``importlib.reload`` re-runs this file in the same namespace, which would
    reset plain module globals while the hooks of the previous run are still
    in place; the one ``_State`` survives it (see below), so ``is_installed``
    keeps telling the truth and ``uninstall`` still finds what to put back.
    """

    def __init__(self) -> None:
        #: Serialises install/uninstall and the patching of modules imported
        #: later. A real OS lock (``_thread.RLock`` is never monkey-patched):
        #: nothing in its critical sections switches greenlets. Re-entrant
        #: because patching may import (ctypes) while it is held.
        self.lock = _thread.RLock()
        self.installed = False
        self.ever_installed = False
        self.warned = False
        #: ``(owner, name, hook, what to put back)`` for each attribute we set.
        self.patches: List[Tuple[Any, str, Any, Any]] = []
        #: The ``_orig_*`` globals bound by the current installation.
        self.bound: Dict[str, Any] = {}
        self.spawn_callback: Optional[Callable[[Any], None]] = None
        self.finder: Optional[_PatchOnImport] = None
        #: ``(owner, name) -> value`` that uninstall found set over our hook
        #: (by another library, after install) and so left in place.
        self.left: Dict[Tuple[Any, str], Any] = {}
        self.fork_handler = False
        self.spawn_raw_callbacks: List[Callable[[Any], None]] = []
        self.companions: List[Callable[[bool], None]] = []
        #: Whether the companions were last told True (so are to be told False).
        self.companions_on = False


#: Set on every hook by :func:`install`: the hook itself (so a wrapper made
#: with ``functools.wraps``, which copies ``__dict__``, is not taken for
#: ours), next to ``__wrapped__`` (what it calls) and what to put back. A
#: reloaded or re-imported copy of this module recognises the hooks by it.
_MARK = "__asl_gevent_hook__"
_RESTORE = "__asl_gevent_restore__"


def _earlier_state() -> Optional[_State]:
    """The state of an earlier run of this module, if there is one to share.

    ``importlib.reload`` re-runs this file in the same namespace, where the
    state is still a global. A copy imported afresh (after ``del
    sys.modules[...]``) gets a new namespace, so the state cannot live only
    there: while hooks are in place it is found through the installed
    ``Greenlet.run`` hook, whose globals are the earlier module's.
    """
    state: Optional[_State] = globals().get("_state")
    run: Any = vars(Greenlet).get("run")
    if state is None and run is not None and getattr(run, _MARK, None) is run:
        state = getattr(run, "__globals__", {}).get("_state")
    return state


_state: _State = _earlier_state() or _State()


def _new_lock_after_fork() -> None:
    # A lock another thread held at fork() time stays held in the child, where
    # that thread does not exist: the child starts with a free one.
    _state.lock = _thread.RLock()


if not _state.fork_handler and hasattr(os, "register_at_fork"):
    _state.fork_handler = True  # once per process, reloads included
    os.register_at_fork(after_in_child=_new_lock_after_fork)

#: Set where a context is captured for later: True when the hub may run (and
#: spawn) code for it, False when the hub captured it for itself; unset
#: elsewhere (see :func:`_hub_carries`). Kept across a reload: contexts
#: captured before it hold this variable.
_carried: ContextVar[Optional[bool]] = (
    globals().get("_carried") or ContextVar("asl_gevent.carried", default=None))

#: ``fn(glet)`` run after ours for ``spawn_raw``, which skips gevent's spawn
#: callbacks (``asl_gevent._detach`` adds one while a ``detached()`` block is active).
#: The list lives in the shared state, so a reload keeps what was added.
_spawn_raw_callbacks: List[Callable[[greenlet], None]] = _state.spawn_raw_callbacks
#: ``fn(installing)`` called by install() (True) and uninstall() (False):
#: ``asl_gevent._detach`` marks the known library workers' starters.
_companions: List[Callable[[bool], None]] = _state.companions


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


def _on_spawn(glet: greenlet) -> None:
    """Give a greenlet being started a copy of its spawner's context.

    gevent calls this from ``Greenlet.start()`` in the spawning greenlet, so
    ``copy_context()`` is the spawner's context at start time (not at
    ``Greenlet(...)`` creation time). A context set on the greenlet before it
    starts (SQLAlchemy's asyncio bridge and greenback do this) is left alone.
    """
    if glet.gr_context is None:
        if not isinstance(getcurrent(), _Hub) or _hub_carries():
            glet.gr_context = copy_context()
        else:
            glet.gr_context = Context()


# -- Greenlet.run: a finished greenlet lets go of its context ----------------

_orig_greenlet_run: Callable[[Greenlet], None]  # set by install(), like every _orig_*


def _greenlet_run(self: Greenlet) -> None:
    """``Greenlet.run`` that drops the greenlet's context when it finishes.

    greenlet (checked on 3.5.6; its own test_contextvars asserts it) keeps
    ``gr_context`` on a dead greenlet, so a finished ``Greenlet`` that is
    still referenced (a list of jobs, a result holder) would keep every store
    of its request alive. gevent drops a finished greenlet's ``args`` and
    ``kwargs`` for the same reason. Cost: about 1.5% of ``spawn`` + ``join``
    (gevent 26.9.0, CPython 3.11).

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
        if type(self).run is Greenlet.run:
            self.gr_context = None


# -- gevent.spawn_raw: skips the spawn callbacks ------------------------------

_orig_spawn_raw: Callable[..., greenlet]


def _spawn_raw(function: Callable[..., Any], *args: Any, **kwargs: Any) -> greenlet:
    glet = _orig_spawn_raw(function, *args, **kwargs)
    _on_spawn(glet)  # not switched to yet: spawn_raw only schedules it
    for callback in _spawn_raw_callbacks:
        callback(glet)
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
    kind = type(callback)
    if kind is _CFunction:
        if isinstance(callback.__self__, greenlet):
            _orig_rawlink(self, callback)
            return
    elif kind is MethodType and callback.__func__ in _gevent_functions:
        _orig_rawlink(self, callback)  # Pool/Group's _discard
        return
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

_orig_submit: Callable[..., Any]


def _executor_submit(self: Any, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
    """Run the task in a copy of its submitter's context.

    The worker that runs it may have been started during another request, so
    its own context must not matter: each task gets its own copy (a Context
    cannot be entered by two workers at once). ``submit`` itself runs in an
    empty context, so a worker it starts (a greenlet under monkey-patching,
    or a thread on Python 3.14 with ``thread_inherit_context``) sits between
    tasks in an empty context instead of this request's.
    """
    if args or kwargs:
        return Context().run(_orig_submit, self, copy_context().run, fn, *args, **kwargs)
    # Most tasks take no arguments: not building an empty tuple and dict
    # saves about 2% of a submit + result (CPython 3.11).
    return Context().run(_orig_submit, self, copy_context().run, fn)


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


# -- the registry: which attribute of which module each hook replaces ----------


class _Path:
    """One hooked attribute: ``<module>.<owner>.<name>`` becomes *hook*.

    *owner* is the (dotted) name of a class in *module* ("" for the module
    itself) or the class itself. *original* names the module global through which the
    hook calls what it replaced; :func:`install` binds it (originals are
    captured when the hooks go in, not when this module is imported, so a
    wrapper another library put there first keeps being called). With
    ``make=True``, *hook* is a factory: install() calls ``hook(original)``
    and puts in what it returns (for a class that must subclass what it
    replaces, built only once its module is imported). A plain class, not a
    ``NamedTuple``: that one costs 3 ms of import time.
    """

    __slots__ = ("module", "owner", "name", "hook", "original", "make")

    def __init__(self, module: str, owner: Union[str, type], name: str,
                 hook: Callable[..., Any], original: str, *, make: bool = False) -> None:
        self.module = module
        self.owner = owner
        self.name = name
        self.hook = hook
        self.original = original
        self.make = make


#: Every hooked attribute, in the order they go in. A module that is not
#: imported yet is patched right after it is (see :class:`_PatchOnImport`),
#: so ``import asl_gevent`` imports none of them.
_PATHS: Tuple[_Path, ...] = (
    _Path("gevent.greenlet", Greenlet, "run", _greenlet_run, "_orig_greenlet_run"),
    _Path("gevent.greenlet", Greenlet, "rawlink", _rawlink, "_orig_rawlink"),
    _Path("gevent.hub", "", "spawn_raw", _spawn_raw, "_orig_spawn_raw"),
    _Path("gevent", "", "spawn_raw", _spawn_raw, "_orig_spawn_raw"),
    _Path("concurrent.futures.thread", "ThreadPoolExecutor", "submit", _executor_submit,
          "_orig_submit"),
    _Path("gevent.baseserver", "BaseServer", "start", _server_start, "_orig_server_start"),
    _Path("gevent.baseserver", "BaseServer", "do_handle", _server_do_handle,
          "_orig_server_do_handle"),
    _Path("gevent.pywsgi", "WSGIHandler", "handle_one_request", _wsgi_handle_one_request,
          "_orig_handle_one_request"),
    _Path("gevent._abstract_linkable", AbstractLinkable, "rawlink", _linkable_rawlink,
          "_orig_linkable_rawlink"),
    _Path("gevent.threadpool", "", "ThreadResult", _thread_result_class,
          "_orig_thread_result", make=True),
    _Path("gevent.threadpool", "ThreadPool._WorkerGreenlet", "_before_run_task",
          _before_run_task, "_orig_before_run_task"),
    _Path("gevent.threadpool", "ThreadPool._WorkerGreenlet", "_after_run_task",
          _after_run_task, "_orig_after_run_task"),
    _Path("gevent.baseserver", "BaseServer", "close", _server_close, "_orig_server_close"),
)

_BY_MODULE: Dict[str, Tuple[_Path, ...]] = {}
for _row in _PATHS:
    _BY_MODULE[_row.module] = (*_BY_MODULE.get(_row.module, ()), _row)
del _row

#: An attribute the owner did not have in its own ``__dict__`` (inherited or
#: absent): uninstall deletes ours instead of writing something back.
_MISSING = "<asl_gevent: not in the owner's own __dict__>"

def _is_hook(value: Any) -> bool:
    """Whether *value* is one of our hooks (from any run of this module)."""
    try:
        return getattr(value, _MARK, None) is value
    except Exception:  # an exotic proxy; not ours
        return False


def _write_type_dict(owner: type, name: str, value: Any) -> None:
    """Set (or, for :data:`_MISSING`, delete) *name* in an immutable type.

    ``Greenlet`` is a Cython extension type (gevent >= 1.3, when gevent is
    compiled); CPython refuses ``setattr`` on it. Its methods are looked up
    in the type's ``__dict__`` like any other, including by Cython's
    ``cpdef`` dispatch, so we write that dict and tell CPython to drop its
    method cache. ctypes is imported here, on first need, not at import:
    it costs about 2.5 ms (CPython 3.11).
    """
    import ctypes

    namespace = gc.get_referents(owner.__dict__)[0]
    if value is _MISSING:
        namespace.pop(name, None)
    else:
        namespace[name] = value
    ctypes.pythonapi.PyType_Modified(ctypes.py_object(owner))


def _set_attribute(owner: Any, name: str, value: Any) -> None:
    """``setattr``/``delattr`` that also works on compiled, immutable types."""
    try:
        if value is _MISSING:
            delattr(owner, name)
        else:
            setattr(owner, name, value)
    except TypeError:
        if not isinstance(owner, type):
            raise
        _write_type_dict(owner, name, value)


def _owner_of(row: _Path, module: ModuleType) -> Any:
    if not isinstance(row.owner, str):
        return row.owner
    owner: Any = module
    for name in filter(None, row.owner.split(".")):  # "ThreadPool._WorkerGreenlet"
        owner = getattr(owner, name)
    return owner


def _apply(row: _Path, module: ModuleType) -> None:
    """Put *row*'s hook in place, remembering what to restore. Lock held."""
    owner = _owner_of(row, module)
    current = vars(owner).get(row.name, _MISSING)
    left = _state.left.pop((owner, row.name), _MISSING)
    if not _is_hook(current) and (
            (left is not _MISSING and current is left) or _wraps_a_hook(current)):
        # Set over our hook after an earlier install() (uninstall left it):
        # it may well call that hook, which calls what it wrapped then, so
        # the path is still hooked. Wrapping it again could make the hook
        # call itself; leave it to its owner.
        _state.left[(owner, row.name)] = current
        return
    if _is_hook(current):
        # Ours, from a run of this module before a reload (or left in place
        # by a wrapper that was removed since): take over what it wrapped.
        original, restore = current.__wrapped__, getattr(current, _RESTORE)
    else:
        original, restore = getattr(owner, row.name), current
    bound = _state.bound.get(row.original, _MISSING)
    if bound is not _MISSING and bound is not original:
        # Two places share a hook (gevent.spawn_raw is gevent.hub.spawn_raw)
        # but someone wrapped only one of them: leave that one alone.
        return
    globals()[row.original] = _state.bound[row.original] = original
    hook = row.hook(original) if row.make else row.hook
    for attribute, value in (("__wrapped__", original), (_MARK, hook), (_RESTORE, restore)):
        setattr(hook, attribute, value)
    _set_attribute(owner, row.name, hook)
    _state.patches.append((owner, row.name, hook, restore))


def _restore(first: int = 0) -> None:
    """Undo ``_state.patches[first:]``, newest first. Lock held.

    Only an attribute that still holds our hook is put back: a wrapper
    another library set over it after install() stays (it calls our hook,
    which keeps working), and what was there before it is not resurrected.
    """
    while len(_state.patches) > first:
        owner, name, hook, restore = _state.patches.pop()
        current = vars(owner).get(name, _MISSING)
        if current is hook:
            _set_attribute(owner, name, restore)
        else:
            _state.left[(owner, name)] = current


def _wraps_a_hook(value: Any) -> bool:
    """Whether *value* wraps one of our hooks (by its ``__wrapped__`` chain)."""
    for _ in range(32):  # a bound: __wrapped__ chains can be cyclic
        try:
            value = getattr(value, "__wrapped__", None)
        except Exception:  # an exotic proxy
            return False
        if value is None:
            return False
        if _is_hook(value):
            return True
    return False


def _loaded(name: str) -> Optional[ModuleType]:
    """*name* from ``sys.modules`` if it has finished executing, else None."""
    module = sys.modules.get(name)
    if module is None or getattr(getattr(module, "__spec__", None), "_initializing", False):
        return None  # not imported, or running now: patched when it is done
    return module


# -- hooking modules imported after install() ---------------------------------


class _PatchAfterExec:
    """A module's loader, for one import: runs the module, then patches it."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def create_module(self, spec: Any) -> Any:
        create = getattr(self.loader, "create_module", None)
        return None if create is None else create(spec)

    def exec_module(self, module: ModuleType) -> None:
        try:
            self.loader.exec_module(module)
        finally:
            # Nothing else should ever see this wrapper (reload, get_source).
            if module.__spec__ is not None:
                module.__spec__.loader = self.loader
            module.__loader__ = self.loader
        _patch_imported(module)

    def __getattr__(self, name: str) -> Any:
        if name == "loader":  # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.loader, name)


class _PatchOnImport:
    """``sys.meta_path`` finder: hooks a watched module once it is imported.

    Costs one dict lookup per import of any other module. For a watched one
    it asks the finders after it for the spec and wraps its loader.
    """

    __asl_gevent_finder__ = True

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname not in _BY_MODULE:
            return None
        for finder in sys.meta_path:
            if getattr(finder, "__asl_gevent_finder__", False):
                continue  # this one, or one from before a reload
            find_spec = getattr(finder, "find_spec", None)
            spec = None if find_spec is None else find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _PatchAfterExec(spec.loader)
        return spec


def _patch_imported(module: ModuleType) -> None:
    """Hook a watched module that was just imported; never raise into the import."""
    with _state.lock:
        if not _state.installed:
            return
        first = len(_state.patches)
        try:
            for row in _BY_MODULE.get(module.__name__, ()):
                _apply(row, module)
        except Exception as exc:
            _restore(first)
            _warn_once(f"cannot hook {module.__name__} ({type(exc).__name__}: {exc}); "
                       "it is left as it was")


# -- install / uninstall ------------------------------------------------------


def _uninstall_locked() -> None:
    if _state.companions_on:
        _state.companions_on = False
        for companion in _companions:
            companion(False)
    finder, _state.finder = _state.finder, None
    if finder is not None:
        try:
            sys.meta_path.remove(finder)
        except ValueError:  # someone replaced sys.meta_path
            pass
    callback, _state.spawn_callback = _state.spawn_callback, None
    if callback is not None:
        Greenlet.remove_spawn_callback(callback)
    _restore()
    _state.bound.clear()
    _state.installed = False


def install() -> None:
    """Install the propagation hooks. Idempotent; cheap to call again.

    Runs by itself when the first :class:`AsyncLocalStorage` is made and when
    ``gevent.monkey.patch_all()`` finishes (gevent plugin entry point),
    unless the environment variable ``ASL_GEVENT_AUTO_INSTALL`` is ``0``.
    Thread-safe: when it returns, in any thread, every hook is in place.
    Modules not imported yet (``gevent.pywsgi``, ``gevent.threadpool``,
    ``concurrent.futures``, the servers) are hooked when they are imported.

    :raises Exception: whatever made a hook impossible to set; gevent is
        then left exactly as it was.
    """
    with _state.lock:
        if _state.installed:
            return
        try:
            if any(name not in sys.modules for name in _BY_MODULE):
                finder = _state.finder = _PatchOnImport()
                sys.meta_path.insert(0, finder)
            for row in _PATHS:
                module = _loaded(row.module)
                if module is not None:
                    _apply(row, module)
            Greenlet.add_spawn_callback(_on_spawn)
            _state.spawn_callback = _on_spawn
            _state.companions_on = True
            for companion in _companions:
                companion(True)
        except BaseException:
            _uninstall_locked()
            raise
        _state.installed = _state.ever_installed = True


def uninstall() -> None:
    """Remove every hook and put gevent back as it was. Idempotent. Thread-safe.

    Greenlets spawned afterwards start with an empty context again; those
    already running keep the context they were given. An attribute another
    library wrapped *after* :func:`install` is left to that library (its
    wrapper still calls our hook); everything else gets back exactly what
    it held when :func:`install` ran.
    """
    with _state.lock:
        if _state.installed:
            _uninstall_locked()


def is_installed() -> bool:
    """Whether the hooks are installed."""
    return _state.installed


# -- automatic install: first storage, gevent plugin ---------------------------


def _auto_install_enabled() -> bool:
    """False when ``ASL_GEVENT_AUTO_INSTALL`` is ``0`` (or false/no/off)."""
    value = os.environ.get("ASL_GEVENT_AUTO_INSTALL", "")
    return value.strip().lower() not in ("0", "false", "no", "off")


def _warn_once(why: str) -> None:
    if not _state.warned:
        _state.warned = True
        warnings.warn(
            f"asl_gevent: {why}; stores will not follow spawned greenlets. "
            "Set ASL_GEVENT_AUTO_INSTALL=0 to silence this.", RuntimeWarning, stacklevel=3)


def _auto_install() -> None:
    """install(), or a warning instead of an error: never breaks the caller."""
    if not _auto_install_enabled():
        return
    try:
        install()
    except Exception as exc:
        _warn_once(f"could not install its hooks ({type(exc).__name__}: {exc}); "
                   "gevent is left as it was")


def install_on_first_use() -> None:
    """Install unless hooks were ever installed (then the user decides)."""
    if not _state.ever_installed:
        _auto_install()


def _did_patch_all(event: object) -> None:
    """gevent plugin: ``gevent.plugins.monkey.did_patch_all`` entry point.

    Never raises into ``patch_all()``: a failure is one warning.
    """
    _auto_install()
