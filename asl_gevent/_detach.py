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
  block starts empty. It costs nothing while no block is active: its spawn
  callback is registered only then.
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
from contextvars import Context, ContextVar
from types import ModuleType, TracebackType
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple, Type, TypeVar

from gevent.greenlet import Greenlet
from greenlet import getcurrent, greenlet

from . import _hooks
from ._context import call_in, check_callable

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
)

_MARK = "__asl_gevent_detached__"


# -- run_detached -------------------------------------------------------------


def run_detached(fn: Callable[..., R], /, *args: Any, **kwargs: Any) -> R:
    """Call ``fn(*args, **kwargs)`` in a fresh, empty context.

    Inside, no storage has a store and no context variable of the caller is
    set; every greenlet and thread *fn* starts starts empty too, so it holds
    nothing of the caller's request for as long as it lives. Returns *fn*'s
    result (if that is a coroutine, it runs detached when awaited).

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
_detaching: ContextVar[Optional["detached"]] = ContextVar("asl_gevent.detaching", default=None)

_blocks_lock = threading.Lock()
_active_blocks = 0

# Python 3.14 gives each threading.Thread a copy of its starter's context
# (``sys.flags.thread_inherit_context``, on by default in free-threaded
# builds) and runs the thread in it; under monkey-patching that would even
# override the empty context the greenlet got. Thread.start is wrapped then,
# while a block is active.
_THREAD_INHERITS = bool(getattr(sys.flags, "thread_inherit_context", 0))
_orig_thread_start: Optional[Callable[..., Any]] = None


def _detach_on_spawn(glet: greenlet) -> None:
    """Spawn callback, registered while a ``detached()`` block is active.

    gevent runs spawn callbacks in no fixed order (a set): if the hooks' own
    callback ran first, the greenlet holds a copy of the starter's context,
    which carries the ``_detaching`` flag; if not, it holds nothing yet.
    Either way it gets an empty context, and the hooks' callback then leaves
    a context set before it alone.
    """
    context = glet.gr_context
    block = _detaching.get() if context is None else context.get(_detaching)
    if block is not None and block._token is not None:
        glet.gr_context = Context()


def _thread_start(self: threading.Thread) -> None:  # pragma: no cover - Python >= 3.14
    block = _detaching.get()
    if block is not None and block._token is not None and getattr(self, "_context", None) is None:
        self._context = Context()  # type: ignore[attr-defined]
    assert _orig_thread_start is not None
    _orig_thread_start(self)


def _activate() -> None:
    global _active_blocks, _orig_thread_start
    with _blocks_lock:
        _active_blocks += 1
        if _active_blocks == 1:
            Greenlet.add_spawn_callback(_detach_on_spawn)
            _hooks._spawn_raw_callbacks.append(_detach_on_spawn)
            if _THREAD_INHERITS:  # pragma: no cover - Python >= 3.14
                _orig_thread_start = threading.Thread.start
                threading.Thread.start = _thread_start  # type: ignore[method-assign]


def _deactivate() -> None:
    global _active_blocks, _orig_thread_start
    with _blocks_lock:
        _active_blocks -= 1
        if _active_blocks == 0:
            Greenlet.remove_spawn_callback(_detach_on_spawn)
            if _detach_on_spawn in _hooks._spawn_raw_callbacks:
                _hooks._spawn_raw_callbacks.remove(_detach_on_spawn)
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

#: target -> (owner, attribute, original as found in owner.__dict__)
_marked: Dict[str, Tuple[Any, str, Any]] = {}
#: module name -> targets to mark when that module is imported
_wanted: Dict[str, Set[str]] = {}
#: known starters the user turned off (never marked again automatically)
_kept_attached: Set[str] = set()
_marks_lock = threading.RLock()


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
    """A detached version of *original* (a function, staticmethod or classmethod)."""
    if isinstance(original, (staticmethod, classmethod)):
        return type(original)(_wrap(original.__func__))
    if not callable(original):
        raise TypeError(f"{original!r} is not callable")

    @functools.wraps(original)
    def starter(*args: Any, **kwargs: Any) -> Any:
        return Context().run(original, *args, **kwargs)

    setattr(starter, _MARK, True)
    return starter


def _mark_now(target: str, module: ModuleType, parts: Sequence[str]) -> bool:
    """Patch *target* in the imported *module*; False if it does not exist."""
    owner: Any = module
    for part in parts[:-1]:
        owner = getattr(owner, part, None)
        if owner is None:
            return False
    name = parts[-1]
    namespace = vars(owner)
    if name not in namespace:
        return False
    original = namespace[name]
    if getattr(getattr(original, "__func__", original), _MARK, False):
        return True  # already ours
    setattr(owner, name, _wrap(original))
    _marked[target] = (owner, name, original)
    return True


def detach_starter(target: str) -> bool:
    """Make every call of the function *target* run detached.

    :param target: ``"module:qualname"``, e.g.
        ``"mylib.pool:Reaper.start"`` -- a function, method, staticmethod
        or classmethod. If the module is not imported yet it is not imported
        now: the function is patched right after the module is imported.

    Whatever the function starts -- a thread, a greenlet, a pool -- starts in
    an empty context, so it never holds the store of the request that
    happened to call it first. Idempotent.

    :returns: ``True`` if the function was patched now, ``False`` if its
        module is not imported yet (or has no such name).
    :raises TypeError, ValueError: if *target* is not a ``module:qualname``
        string.

    .. versionadded:: 0.2
    """
    module_name, parts = _split(target, "detach_starter()")
    with _marks_lock:
        _kept_attached.discard(target)
        module = sys.modules.get(module_name)
        if module is not None:
            return _mark_now(target, module, parts)
        _wanted.setdefault(module_name, set()).add(target)
        _ensure_finder()
        return False


def undetach_starter(target: str) -> None:
    """Undo :func:`detach_starter` for *target*, or turn off a known starter.

    The original function is put back if the attribute still holds our
    wrapper (another patcher's later change is left alone). A name from
    :data:`KNOWN_STARTERS` stays attached from then on, also when its module
    is imported later or the hooks are installed again. Idempotent.

    .. versionadded:: 0.2
    """
    module_name, _ = _split(target, "undetach_starter()")
    with _marks_lock:
        if target in KNOWN_STARTERS:
            _kept_attached.add(target)
        wanted = _wanted.get(module_name)
        if wanted is not None:
            wanted.discard(target)
            if not wanted:
                del _wanted[module_name]
        _unmark(target)


def _unmark(target: str) -> None:
    entry = _marked.pop(target, None)
    if entry is None:
        return
    owner, name, original = entry
    current = vars(owner).get(name)
    if getattr(getattr(current, "__func__", current), _MARK, False):
        setattr(owner, name, original)


# -- marking modules as they are imported -------------------------------------


# Duck-typed rather than subclassing importlib.abc: importing that module
# costs about 20 ms (CPython 3.11), more than SPEC's whole import budget.


class _MarkingLoader:
    """Runs the real loader, then marks the module's wanted starters."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def create_module(self, spec: Any) -> Optional[ModuleType]:
        return self._loader.create_module(spec)  # type: ignore[no-any-return]

    def exec_module(self, module: ModuleType) -> None:
        # Put the real loader back first: tools (importlib.resources,
        # inspect, pkgutil) look at it, and we are done after this call.
        module.__loader__ = self._loader
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        with _marks_lock:
            for target in sorted(_wanted.pop(module.__name__, ())):
                _mark_now(target, module, _split(target, "detach_starter()")[1])

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


class _MarkingFinder:
    """A meta path finder that only answers for modules with wanted starters.

    It finds nothing itself: it asks the finders after it and wraps the
    loader. For every other import it costs one dict lookup.
    """

    def find_spec(self, fullname: str, path: Optional[Sequence[str]],
                  target: Optional[ModuleType] = None) -> Any:
        if fullname not in _wanted:
            return None
        finders: List[Any] = list(sys.meta_path)
        try:
            after = finders[finders.index(self) + 1:]
        except ValueError:
            return None
        for finder in after:
            find_spec = getattr(finder, "find_spec", None)
            if find_spec is None:
                continue
            spec = find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _MarkingLoader(spec.loader)
                return spec
        return None


_finder = _MarkingFinder()


def _ensure_finder() -> None:
    if _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)


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
                detach_starter(target)
            else:
                module_name, _ = _split(target, "undetach_starter()")
                wanted = _wanted.get(module_name)
                if wanted is not None:
                    wanted.discard(target)
                    if not wanted:
                        del _wanted[module_name]
                _unmark(target)
        if not installing and not _wanted and _finder in sys.meta_path:
            sys.meta_path.remove(_finder)


_hooks._companions.append(_known_starters)
if _hooks.is_installed():  # pragma: no cover - install() ran before this import
    _known_starters(True)
