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
``ThreadPoolExecutor.submit``/``map``         :func:`_executor_submit`
``gevent.threadpool.ThreadPool.spawn``        :func:`_threadpool_spawn`
``BaseServer`` handlers (StreamServer, WSGI)  :func:`_server_start`,
                                              :func:`_server_do_handle`
``pywsgi`` keep-alive requests                :func:`_wsgi_handle_one_request`
``Greenlet.run`` (drops a finished            :func:`_greenlet_run`
greenlet's context)
============================================  =================================

The hub is not a request. Code the hub runs for itself (loop callbacks,
timers) may set context variables in the hub's own context; greenlets the hub
spawns must not copy that, so they get an empty context -- unless the hub is
running code *on behalf of* a captured context (a server accepting for the
context it was started in, a ``rawlink`` callback), which we mark with
:data:`_carried`.

:func:`uninstall` puts every patched attribute back as it was.
"""

from __future__ import annotations

import concurrent.futures.thread
import ctypes
import gc
from contextvars import Context, ContextVar, copy_context
from types import MethodType
from typing import Any, Callable, Dict, List, Tuple

import gevent
import gevent.baseserver
import gevent.hub
import gevent.pywsgi
import gevent.threadpool
from gevent.greenlet import Greenlet, SpawnedLink
from greenlet import getcurrent, greenlet

__all__ = ["install", "uninstall", "is_installed"]

_Hub = gevent.hub.Hub

#: True in a context that the hub runs code for on purpose (see module doc).
_carried: ContextVar[bool] = ContextVar("asl_gevent.carried", default=False)

#: ``(owner, name, original, owner_had_it_in_its_own_dict)`` for each patch.
_patches: List[Tuple[Any, str, Any, bool]] = []
_installed = False
_ever_installed = False

#: ``fn(glet)`` run after ours for ``spawn_raw``, which skips gevent's spawn
#: callbacks (``asl_gevent._detach`` adds one while a ``detached()`` block is active).
_spawn_raw_callbacks: List[Callable[[greenlet], None]] = []
#: ``fn(installing)`` called by install() (True) and uninstall() (False):
#: ``asl_gevent._detach`` marks the known library workers' starters.
_companions: List[Callable[[bool], None]] = []


def _carry(context: Context) -> Context:
    """Mark *context* as one the hub may run (and spawn) code for."""
    context.run(_carried.set, True)
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
        if not isinstance(getcurrent(), _Hub) or _carried.get():
            glet.gr_context = copy_context()
        else:
            glet.gr_context = Context()


# -- Greenlet.run: a finished greenlet lets go of its context ----------------

_orig_greenlet_run = vars(Greenlet)["run"]


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
        if type(self).run is _greenlet_run:
            self.gr_context = None


# -- gevent.spawn_raw: skips the spawn callbacks ------------------------------

_orig_spawn_raw = gevent.hub.spawn_raw


def _spawn_raw(function: Callable[..., Any], *args: Any, **kwargs: Any) -> greenlet:
    glet = _orig_spawn_raw(function, *args, **kwargs)
    _on_spawn(glet)  # not switched to yet: spawn_raw only schedules it
    for callback in _spawn_raw_callbacks:
        callback(glet)
    return glet


_spawn_raw.__doc__ = _orig_spawn_raw.__doc__
_spawn_raw.__wrapped__ = _orig_spawn_raw  # type: ignore[attr-defined]


# -- Greenlet.link / link_value / link_exception / rawlink --------------------


class _LinkInContext:
    """A link callback that runs in the context captured at ``link()`` time.

    Compares and hashes like the callback it wraps, so ``unlink(callback)``
    still finds it (gevent removes links with ``list.remove``).
    """

    __slots__ = ("callback", "_context")

    def __init__(self, callback: Callable[[Any], Any], context: Context) -> None:
        self.callback = callback
        self._context = context

    def __call__(self, source: Any) -> Any:
        # Called once (gevent pops a link before calling it), in the hub for a
        # rawlink or in a fresh raw greenlet for link(): a copy per call keeps
        # the captured context enterable even if the callback blocks.
        return self._context.copy().run(self.callback, source)

    def __eq__(self, other: object) -> bool:
        return bool(self.callback == getattr(other, "callback", other))

    def __hash__(self) -> int:
        return hash(self.callback)

    def __repr__(self) -> str:
        return repr(self.callback)


_orig_rawlink = Greenlet.rawlink
_CFunction = type(getcurrent().switch)  # builtin_function_or_method


#: Whether a class is gevent's own (``Group``, ``Waiter``, ``IMap``...), by class.
_gevent_classes: Dict[type, bool] = {}


def _is_bookkeeping(callback: Any) -> bool:
    """True for gevent's own link callbacks, which read no context.

    ``join()``/``get()`` link the waiting greenlet's C-level ``switch`` (which
    resumes that greenlet in *its* context); ``Pool``/``Group`` link their
    ``_discard``, ``wait``/``iwait``/``imap`` a waiter's method. Wrapping them
    would only cost time on every join and every pool spawn. A method of a
    user's ``Greenlet`` subclass is not bookkeeping: it is wrapped.
    """
    if type(callback) is _CFunction:
        return True  # C code runs nothing that could read a store
    if type(callback) is not MethodType:
        return False
    cls = type(callback.__self__)
    owned = _gevent_classes.get(cls)
    if owned is None:
        owned = _gevent_classes[cls] = cls.__module__.startswith("gevent.")
    return owned


def _rawlink(self: Greenlet, callback: Any) -> None:
    """``Greenlet.rawlink`` that remembers the context current at link time.

    ``link``, ``link_value`` and ``link_exception`` wrap the callback in a
    ``SpawnedLink`` and come here too. A ``SpawnedLink`` runs its callback in
    a new raw greenlet, which would start empty, so we wrap its (public,
    writable) ``callback`` rather than the link itself.
    """
    # Every join()/get() comes here with a greenlet's C-level ``switch``: a
    # C callable runs no Python code that could read a store, so it is passed
    # straight through before anything else is looked at (spawn + join is the
    # hottest path this hook sits on; SPEC allows it 5%).
    if (type(callback) is not _CFunction and not _is_bookkeeping(callback)
            and callable(callback)
            and (not isinstance(getcurrent(), _Hub) or _carried.get())):
        if isinstance(callback, SpawnedLink):
            inner = callback.callback
            if not isinstance(inner, _LinkInContext) and not _is_bookkeeping(inner):
                callback.callback = _LinkInContext(inner, copy_context())
        elif not isinstance(callback, _LinkInContext):
            callback = _LinkInContext(callback, _carry(copy_context()))
    _orig_rawlink(self, callback)


# -- concurrent.futures.ThreadPoolExecutor (real or patched threads) ---------

_orig_submit = concurrent.futures.thread.ThreadPoolExecutor.submit


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
        return Context().run(_orig_submit, self, copy_context().run, fn, *args, **kwargs)  # type: ignore[arg-type]
    # Most tasks take no arguments: not building an empty tuple and dict
    # saves about 2% of a submit + result (CPython 3.11).
    return Context().run(_orig_submit, self, copy_context().run, fn)  # type: ignore[arg-type]


# -- gevent.threadpool.ThreadPool (real OS threads) --------------------------

_orig_threadpool_spawn = gevent.threadpool.ThreadPool.spawn


def _threadpool_spawn(self: Any, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run the task in the worker thread inside a copy of the caller's context.

    ``apply``, ``apply_async``, ``map``, ``imap`` and gevent's own
    ``ThreadPoolExecutor`` all come through ``spawn``.
    """
    return _orig_threadpool_spawn(self, copy_context().run, func, *args, **kwargs)


# -- gevent.baseserver.BaseServer: StreamServer, WSGIServer, gunicorn --------

_SERVER_CONTEXT = "_asl_gevent_context"
_orig_server_start = gevent.baseserver.BaseServer.start
_orig_server_do_handle = gevent.baseserver.BaseServer.do_handle


def _server_start(self: Any) -> None:
    """Remember the context the server was started in, for its handlers."""
    if not isinstance(getcurrent(), _Hub):
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


# -- gevent.pywsgi keep-alive: several requests in one greenlet ---------------

_orig_handle_one_request = gevent.pywsgi.WSGIHandler.handle_one_request


def _wsgi_handle_one_request(self: Any) -> Any:
    """Serve one request in its own copy of the connection's context.

    So request 2 on a keep-alive connection never sees a store or context
    variable request 1 set, even with ``enter_with`` or after it raised.
    """
    return copy_context().run(_orig_handle_one_request, self)


# -- install / uninstall ------------------------------------------------------


def _set_attribute(owner: Any, name: str, value: Any) -> None:
    """``setattr`` that also works on gevent's compiled, immutable types.

    ``Greenlet`` is a Cython extension type (gevent >= 1.3, when gevent is
    compiled); CPython refuses ``setattr`` on it. Its methods are looked up
    in the type's ``__dict__`` like any other, including by Cython's
    ``cpdef`` dispatch, so we write that dict and tell CPython to drop its
    method cache. The original is put back the same way.
    """
    try:
        setattr(owner, name, value)
    except TypeError:
        namespace = gc.get_referents(owner.__dict__)[0]
        namespace[name] = value
        ctypes.pythonapi.PyType_Modified(ctypes.py_object(owner))


def _patch(owner: Any, name: str, value: Any) -> None:
    own = name in vars(owner)
    _patches.append((owner, name, vars(owner).get(name), own))
    _set_attribute(owner, name, value)


def _unpatch(owner: Any, name: str, original: Any, own: bool) -> None:
    if own:
        _set_attribute(owner, name, original)
    else:
        try:
            delattr(owner, name)
        except TypeError:
            del gc.get_referents(owner.__dict__)[0][name]
            ctypes.pythonapi.PyType_Modified(ctypes.py_object(owner))


def install() -> None:
    """Install the propagation hooks. Idempotent; cheap to call again.

    Runs by itself when the first :class:`AsyncLocalStorage` is made and when
    ``gevent.monkey.patch_all()`` finishes (gevent plugin entry point).
    """
    global _installed, _ever_installed
    if _installed:
        return
    _installed = _ever_installed = True
    Greenlet.add_spawn_callback(_on_spawn)
    _patch(Greenlet, "run", _greenlet_run)
    _patch(gevent, "spawn_raw", _spawn_raw)
    _patch(gevent.hub, "spawn_raw", _spawn_raw)
    _patch(Greenlet, "rawlink", _rawlink)
    _patch(concurrent.futures.thread.ThreadPoolExecutor, "submit", _executor_submit)
    _patch(gevent.threadpool.ThreadPool, "spawn", _threadpool_spawn)
    _patch(gevent.baseserver.BaseServer, "start", _server_start)
    _patch(gevent.baseserver.BaseServer, "do_handle", _server_do_handle)
    _patch(gevent.pywsgi.WSGIHandler, "handle_one_request", _wsgi_handle_one_request)
    for companion in _companions:
        companion(True)


def uninstall() -> None:
    """Remove every hook and put gevent back exactly as it was. Idempotent.

    Greenlets spawned afterwards start with an empty context again; those
    already running keep the context they were given.
    """
    global _installed
    if not _installed:
        return
    Greenlet.remove_spawn_callback(_on_spawn)
    for companion in _companions:
        companion(False)
    while _patches:
        _unpatch(*_patches.pop())
    _installed = False


def is_installed() -> bool:
    """Whether the hooks are installed."""
    return _installed


def install_on_first_use() -> None:
    """Install unless hooks were ever installed (then the user decides)."""
    if not _ever_installed:
        install()


def _did_patch_all(event: object) -> None:
    """gevent plugin: ``gevent.plugins.monkey.did_patch_all`` entry point."""
    install()
