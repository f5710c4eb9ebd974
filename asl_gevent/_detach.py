"""Detached work: long-lived work that must not keep a request's context.

A greenlet or thread copies its starter's context (that is the point of the
hooks), so a worker a library starts *lazily*, on first use, inside request
``r1`` -- sentry-sdk's sender, an OpenTelemetry exporter thread, a logging
``QueueListener`` -- would carry ``r1``'s stores and span for the life of the
process, and keep them alive. Work started *detached* starts in an empty
context instead:

>>> import gevent
>>> from asl_gevent import AsyncLocalStorage, detached, run_detached
>>> als = AsyncLocalStorage(name="request")
>>> def handler():
...     audit = gevent.spawn(als.get_store)                # on purpose: keeps the store
...     worker = run_detached(gevent.spawn, als.get_store)  # detached: starts empty
...     with detached():                                    # the block's own code keeps it,
...         sender = gevent.spawn(als.get_store)            # what it starts does not
...         here = als.get_store()
...     return audit.get(), worker.get(), sender.get(), here
>>> als.run("r1", handler)
('r1', None, None, 'r1')

Three ways, for three situations:

* :func:`run_detached` calls a function in a fresh, empty context: the
  function and everything it starts see no store and no context variable of
  the caller.
* ``with detached():`` keeps the block's own code in the request's context,
  but every greenlet, ``spawn_raw``, monkey-patched thread or ``Timer`` (and,
  on Python 3.14 with ``thread_inherit_context``, real thread) started in the
  block starts empty -- unless a context was set on it before it started,
  which is left alone as everywhere. It costs one global load per spawn
  while no block is active.
* :func:`detach_starter` marks a third-party function, by name, so that every
  call of it runs detached -- without editing that library, and without
  importing it: a module not imported yet is patched when it is imported.

The known library workers (:data:`KNOWN_STARTERS`) are marked this way when
the hooks are installed; ``ASL_GEVENT_DETACH_KNOWN=0`` turns that off and
:func:`undetach_starter` turns off one.

.. versionadded:: 0.2
"""

from __future__ import annotations

import functools
import os
import sys
import threading
import warnings
from contextvars import Context, ContextVar
from types import ModuleType, TracebackType
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple, Type, TypeVar

from greenlet import getcurrent

from . import _hooks, _paths
from ._context import call_in, check_callable
from ._imports import cancel_when_imported, when_imported

R = TypeVar("R")

__all__ = ["run_detached", "detached", "detach_starter", "undetach_starter", "KNOWN_STARTERS"]

#: Starter functions of library workers that run for the life of the process
#: and are started lazily, often inside a request. ``module:qualname``, as in
#: entry points; a name the installed version lacks is skipped.
KNOWN_STARTERS: Tuple[str, ...] = (
    # sentry-sdk (2.x): the event sender, and the session, log/metric batch
    # and health-check threads, each started on first use.
    "sentry_sdk.worker:BackgroundWorker.start",
    "sentry_sdk.sessions:SessionFlusher._ensure_running",
    "sentry_sdk._batcher:Batcher._ensure_thread",
    "sentry_sdk.monitor:Monitor._ensure_running",
    # OpenTelemetry SDK: BatchSpanProcessor starts its thread in __init__
    # (<= 1.33 itself, later through the shared BatchProcessor, which the
    # batch log processor uses too), and again after a fork.
    "opentelemetry.sdk.trace.export:BatchSpanProcessor.__init__",
    "opentelemetry.sdk.trace.export:BatchSpanProcessor._at_fork_reinit",
    "opentelemetry.sdk._shared_internal:BatchProcessor.__init__",
    "opentelemetry.sdk._shared_internal:BatchProcessor._at_fork_reinit",
    "opentelemetry.sdk.metrics._internal.export:PeriodicExportingMetricReader.__init__",
    "opentelemetry.sdk.metrics._internal.export:PeriodicExportingMetricReader._at_fork_reinit",
    # The standard library.
    "logging.handlers:QueueListener.start",
    # Celery (5.x): the result drainer greenlet a gevent/eventlet process
    # starts on the first AsyncResult.get() (geventDrainer and eventletDrainer
    # inherit this start); it runs until the process ends. Its backend sits
    # in a threading.local, per greenlet under monkey-patching, so one starts
    # per greenlet that waits for a result.
    "celery.backends.asynchronous:greenletDrainer.start",
)

_MARK = "__asl_gevent_detached__"


# -- run_detached -------------------------------------------------------------


def run_detached(fn: Callable[..., R], /, *args: Any, **kwargs: Any) -> R:
    """Call ``fn(*args, **kwargs)`` in a fresh, empty context.

    Inside, no storage has a store and no context variable of the caller is
    set; every greenlet and thread *fn* starts starts empty too, so it holds
    nothing of the caller's request for as long as it lives. Returns *fn*'s
    result (if that is a coroutine, it runs detached when awaited).

    :param fn: the callable to run; *args* and *kwargs* are passed to it.

    :raises TypeError: if *fn* is not callable; nothing is changed.

    .. versionadded:: 0.2
    """
    check_callable(fn, "run_detached()")
    return call_in(Context(), fn, args, kwargs)


# -- with detached(): ---------------------------------------------------------

#: The active ``detached()`` block of a context, if any. The block itself,
#: not a bare True: a copy of the block's context that outlives the block (a
#: ``bind()`` made in it, an executor task submitted in it) must not go on
#: detaching once the block is over.
#: Kept across ``importlib.reload``: a block entered before it resets its token
#: on this variable when it exits.
_detaching: ContextVar[Optional["detached"]] = (
    globals().get("_detaching") or ContextVar("asl_gevent.detaching", default=None))

_blocks_lock: threading.Lock = globals().get("_blocks_lock") or threading.Lock()
#: Blocks active now, in any thread. Kept across ``importlib.reload`` (a
#: block may be active then, and its exit must find the count it entered).
_active_blocks: int = globals().get("_active_blocks", 0)

# Python 3.14 gives each threading.Thread a copy of its starter's context
# (``sys.flags.thread_inherit_context``, on by default in free-threaded
# builds) and runs the thread in it; under monkey-patching that would even
# override the empty context the greenlet got. Thread.start is wrapped then,
# while a block is active.
_THREAD_INHERITS = bool(getattr(sys.flags, "thread_inherit_context", 0))
_orig_thread_start: Optional[Callable[..., Any]] = globals().get("_orig_thread_start")


def _in_active_block() -> bool:
    """Whether the current context is inside an active ``detached()`` block.

    :func:`asl_gevent._paths._on_spawn` asks this, only while some block is
    active, for each greenlet started without a preset context (a context
    set on the greenlet before it starts is left alone, as everywhere).
    """
    block = _detaching.get()
    return block is not None and block._token is not None


def _thread_start(self: threading.Thread) -> None:  # pragma: no cover - Python >= 3.14
    if _in_active_block() and getattr(self, "_context", None) is None:
        self._context = Context()  # type: ignore[attr-defined]
    assert _orig_thread_start is not None
    _orig_thread_start(self)


def _activate() -> None:
    global _active_blocks, _orig_thread_start
    with _blocks_lock:
        _active_blocks += 1
        if _active_blocks == 1:
            # One assignment, not a spawn callback added and removed: gevent
            # keeps those in a set that other OS threads' spawns iterate.
            _paths._detaching_check = _in_active_block
            if _THREAD_INHERITS:  # pragma: no cover - Python >= 3.14
                _orig_thread_start = threading.Thread.start
                threading.Thread.start = _thread_start  # type: ignore[method-assign]


def _deactivate() -> None:
    global _active_blocks, _orig_thread_start
    with _blocks_lock:
        _active_blocks -= 1
        if _active_blocks == 0:
            _paths._detaching_check = None
            if _orig_thread_start is not None:  # pragma: no cover - Python >= 3.14
                if threading.Thread.start is _thread_start:
                    threading.Thread.start = _orig_thread_start  # type: ignore[method-assign]
                _orig_thread_start = None


class detached:  # noqa: N801 - used like a function: ``with detached():``
    """``with detached():`` -- work started in the block starts empty.

    The block's own code keeps its context (its stores, its span); every
    greenlet (``gevent.spawn``, pools, ``spawn_later``, ``spawn_raw``), every
    monkey-patched ``threading.Thread``/``Timer`` and, on Python 3.14 with
    ``thread_inherit_context``, every real thread started in it gets an empty
    context instead of a copy. Unpatched threads on older Pythons start empty
    anyway. Tasks submitted to executors and thread pools keep running in
    their submitter's context: they are per task, not long-lived.

    Blocks nest. Enter and exit a block in one greenlet (the flag is a
    context variable, set with a token).

    .. versionadded:: 0.2
    """

    __slots__ = ("_token", "_owner")

    def __init__(self) -> None:
        self._token: Any = None
        self._owner: Any = None

    def __enter__(self) -> None:
        if self._owner is not None:
            raise RuntimeError("this detached() block was already entered; "
                               "call detached() again for each with-block")
        _activate()
        self._owner = getcurrent()
        self._token = _detaching.set(self)

    def __exit__(self, exc_type: Optional[Type[BaseException]],
                 exc: Optional[BaseException], tb: Optional[TracebackType]) -> None:
        token = self._token
        if token is None:
            raise RuntimeError("this detached() block was already exited "
                               "(or never entered)")
        if getcurrent() is not self._owner:
            raise RuntimeError(
                f"detached() exited in another greenlet than the one that entered "
                f"it ({self._owner!r}); use run_detached(fn) for work that moves "
                "between greenlets")
        self._token = None
        try:
            _detaching.reset(token)
        except ValueError:
            raise RuntimeError(
                "detached() exited in another context than the one that entered it "
                "(the block was split across Context.run calls); use "
                "run_detached(fn) instead") from None
        finally:
            _deactivate()


# -- detach_starter: mark a (third-party) function by name --------------------

# The marks are kept across ``importlib.reload`` (which re-runs this file in
# the same namespace): what is patched must still be put back by
# undetach_starter()/uninstall(), and what is waited for still marked.
#: target -> (owner, attribute, original as found in owner.__dict__)
_marked: Dict[str, Tuple[Any, str, Any]] = globals().get("_marked", {})
#: module name -> targets to mark when that module is imported
_wanted: Dict[str, Set[str]] = globals().get("_wanted", {})
#: known starters the user turned off (never marked again automatically)
_kept_attached: Set[str] = globals().get("_kept_attached", set())
_marks_lock: Any = globals().get("_marks_lock") or threading.RLock()
#: The previous run's import callbacks, if this is a reload (see the end).
_previous_mark_wanted: Any = globals().get("_mark_wanted")
_previous_mark_again: Any = globals().get("_mark_again")


def _split(target: str, where: str) -> Tuple[str, List[str]]:
    if not isinstance(target, str):
        raise TypeError(
            f"{where} argument 'target' must be a str 'module:qualname', not "
            f"{type(target).__name__!r}; e.g. 'logging.handlers:QueueListener.start'")
    module, sep, qualname = target.partition(":")
    parts = qualname.split(".")
    if not sep or not module or not all(p.isidentifier() for p in parts) \
            or not all(p.isidentifier() for p in module.split(".")):
        raise ValueError(
            f"{where} argument 'target' must look like 'module:qualname', not "
            f"{target!r}; e.g. 'logging.handlers:QueueListener.start'")
    return module, parts


def _wrap(original: Any) -> Any:
    """A detached version of *original* (a function, staticmethod or classmethod).

    *original* was checked by :func:`_find`. :func:`call_in`, not a bare
    ``Context().run``: a coroutine an ``async def`` starter returns runs
    detached too, when it is awaited.
    """
    if isinstance(original, (staticmethod, classmethod)):
        return type(original)(_wrap(original.__func__))

    @functools.wraps(original)
    def starter(*args: Any, **kwargs: Any) -> Any:
        return call_in(Context(), original, args, kwargs)

    setattr(starter, _MARK, True)
    return starter


def _find(target: str, module: ModuleType, parts: Sequence[str]) -> Tuple[Any, str, Any]:
    """``(owner, name, value in owner.__dict__)`` for *target* in *module*.

    :raises AttributeError: the module (or class) has no such name, or the
        method is inherited (then the class that defines it is to be marked:
        patching a subclass would shadow later changes to the base).
    :raises TypeError: the name is not a function, method, staticmethod or
        classmethod.
    """
    where = f"detach_starter() argument 'target' {target!r}"
    owner: Any = module
    for n, part in enumerate(parts[:-1]):
        owner = getattr(owner, part, None)
        if owner is None:
            raise AttributeError(f"{where}: module {module.__name__!r} has no "
                                 f"{'.'.join(parts[:n + 1])!r}")
    name = parts[-1]
    namespace = getattr(owner, "__dict__", {})
    if name not in namespace:
        if hasattr(owner, name):
            raise AttributeError(f"{where}: {name!r} is inherited by {owner!r}; mark the "
                                 "class that defines it")
        what = f"module {module.__name__!r}" if owner is module else repr(owner)
        raise AttributeError(f"{where}: {what} has no attribute {name!r}")
    original = namespace[name]
    function = original.__func__ if isinstance(original, (staticmethod, classmethod)) else original
    if not callable(function):
        raise TypeError(f"{where} must name a function or method, not "
                        f"{type(function).__name__!r} ({function!r})")
    return owner, name, original


def _mark_now(target: str, module: ModuleType, parts: Sequence[str]) -> None:
    """Patch *target* in the imported *module* (errors: see :func:`_find`)."""
    owner, name, original = _find(target, module, parts)
    if getattr(getattr(original, "__func__", original), _MARK, False):
        return  # already ours
    setattr(owner, name, _wrap(original))
    _marked[target] = (owner, name, original)
    # importlib.reload re-runs the module in its namespace and rebinds the
    # name to a fresh, unmarked function (and a fresh class): mark it again
    # after every reload, for as long as the mark stands.
    when_imported(module.__name__, _mark_again)


def detach_starter(target: str) -> bool:
    """Make every call of the function *target* run detached.

    :param target: ``"module:qualname"``, e.g.
        ``"mylib.pool:Reaper.start"`` -- a function, method, staticmethod
        or classmethod (of the class that defines it). If the module is not
        imported yet it is not imported now: the function is patched right
        after the module is imported (a name that is then missing or not a
        function is skipped with a :class:`RuntimeWarning`; the import goes
        on).

    Whatever the function starts -- a thread, a greenlet, a pool -- starts in
    an empty context, so it never holds the store of the request that
    happened to call it first; a coroutine an ``async def`` starter returns
    runs detached when awaited. Idempotent.

    :returns: ``True`` if the function was patched now, ``False`` if its
        module is not imported yet.
    :raises TypeError, ValueError: if *target* is not a ``module:qualname``
        string.
    :raises AttributeError: the module is imported and has no such function
        (or the method is inherited: mark the class that defines it).
    :raises TypeError: the module is imported and *target* is not a
        function or method. Nothing is marked in any of these cases.

    The mark survives ``importlib.reload`` of the module: the reloaded
    function (or the method of the reloaded class) is marked again right
    after the reload, until :func:`undetach_starter`.

    .. versionadded:: 0.2
    .. versionchanged:: 0.3 marks survive ``importlib.reload``.
    """
    module_name, parts = _split(target, "detach_starter()")
    with _marks_lock:
        module = sys.modules.get(module_name)
        if module is not None:
            _mark_now(target, module, parts)
            _kept_attached.discard(target)
            return True
        _kept_attached.discard(target)
        _want(module_name, target)
        return False


def undetach_starter(target: str) -> None:
    """Undo :func:`detach_starter` for *target*, or turn off a known starter.

    The original function is put back if the attribute still holds our
    wrapper (another patcher's later change is left alone). A name from
    :data:`~asl_gevent.KNOWN_STARTERS` stays attached from then on, also when its module
    is imported later or the hooks are installed again. Idempotent.

    :param target: ``"module:qualname"``, as given to :func:`detach_starter`.
    :raises ValueError: if *target* is not of the form ``"module:qualname"``.

    .. versionadded:: 0.2
    """
    module_name, _ = _split(target, "undetach_starter()")
    with _marks_lock:
        if target in KNOWN_STARTERS:
            _kept_attached.add(target)
        _unwant(module_name, target)
        _unmark(target)


def _unmark(target: str) -> None:
    entry = _marked.pop(target, None)
    if entry is None:
        return
    owner, name, original = entry
    current = vars(owner).get(name)
    if getattr(getattr(current, "__func__", current), _MARK, False):
        setattr(owner, name, original)
    module_name = target.partition(":")[0]
    if not any(t.partition(":")[0] == module_name for t in _marked):
        cancel_when_imported(module_name, _mark_again)


def _mark_again(module: ModuleType) -> None:
    """Mark again the marked starters of *module*, which was just reloaded.

    The reloaded function (or the method of the reloaded class) is wrapped
    and becomes what :func:`undetach_starter` puts back; the old objects
    keep their wrappers (old instances of an old class stay detached). A
    name the reloaded module no longer has is dropped with a
    :class:`RuntimeWarning`; the reload goes on.
    """
    prefix = module.__name__ + ":"
    with _marks_lock:
        for target in sorted(t for t in _marked if t.startswith(prefix)):
            entry = _marked.pop(target)
            try:
                _mark_now(target, module, _split(target, "detach_starter()")[1])
                if target not in _marked:  # the reload left our wrapper in place
                    _marked[target] = entry
            except (AttributeError, TypeError) as exc:
                if target not in KNOWN_STARTERS:
                    warnings.warn(f"asl_gevent: {exc} after importlib.reload; no longer "
                                  "marked", RuntimeWarning, stacklevel=2)
        if not any(t.startswith(prefix) for t in _marked):
            cancel_when_imported(module.__name__, _mark_again)


# -- marking modules as they are imported -------------------------------------


def _want(module_name: str, target: str) -> None:
    """Mark *target* once *module_name* is imported. ``_marks_lock`` held."""
    if module_name not in _wanted:
        when_imported(module_name, _mark_wanted)
    _wanted.setdefault(module_name, set()).add(target)


def _unwant(module_name: str, target: str) -> None:
    """Stop waiting to mark *target*. ``_marks_lock`` held."""
    wanted = _wanted.get(module_name)
    if wanted is not None:
        wanted.discard(target)
        if not wanted:
            del _wanted[module_name]
            cancel_when_imported(module_name, _mark_wanted)


def _mark_wanted(module: ModuleType) -> None:
    """Mark the wanted starters of *module*, which was just imported."""
    with _marks_lock:
        cancel_when_imported(module.__name__, _mark_wanted)
        for target in sorted(_wanted.pop(module.__name__, ())):
            try:
                _mark_now(target, module, _split(target, "detach_starter()")[1])
            except (AttributeError, TypeError) as exc:
                # Never break the user's import over it. A known starter the
                # installed version lacks is expected; the user's own typo
                # is reported, once: the module is imported once.
                if target not in KNOWN_STARTERS:
                    warnings.warn(f"asl_gevent: {exc}; not marked", RuntimeWarning,
                                  stacklevel=2)


# -- the known starters follow install()/uninstall() --------------------------


def _known_starters(installing: bool) -> None:
    """Mark (on install) or unmark (on uninstall) :data:`KNOWN_STARTERS`."""
    if os.environ.get("ASL_GEVENT_DETACH_KNOWN", "1").strip().lower() in ("0", "false", "no", "off"):
        return
    with _marks_lock:
        for target in KNOWN_STARTERS:
            if target in _kept_attached:
                continue
            if installing:
                try:
                    detach_starter(target)
                except (AttributeError, TypeError):
                    pass  # not in the installed version of that library
            else:
                _unwant(_split(target, "undetach_starter()")[0], target)
                _unmark(target)


def _register() -> None:
    """Register this run's callbacks, replacing a previous run's on reload.

    Otherwise a reload would mark twice per install() and leave the previous
    run's companion to re-mark the starters after uninstall().
    """
    with _hooks._state.lock:
        _hooks._companions[:] = [
            c for c in _hooks._companions
            if (getattr(c, "__module__", None), getattr(c, "__qualname__", None))
            != (__name__, _known_starters.__qualname__)]
        _hooks._companions.append(_known_starters)
    previous = _previous_mark_wanted
    if previous is not None and previous is not _mark_wanted:
        with _marks_lock:
            for module_name in _wanted:
                cancel_when_imported(module_name, previous)
                when_imported(module_name, _mark_wanted)
    previous = _previous_mark_again
    if previous is not None and previous is not _mark_again:
        with _marks_lock:
            for module_name in {t.partition(":")[0] for t in _marked}:
                cancel_when_imported(module_name, previous)
                when_imported(module_name, _mark_again)


_register()
del _previous_mark_wanted, _previous_mark_again
if _hooks.is_installed():  # pragma: no cover - install() ran before this import
    _known_starters(True)
