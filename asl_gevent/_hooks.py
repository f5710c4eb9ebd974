"""install()/uninstall(): the registry of hooked attributes, and the patching.

The hooks themselves, one small function per gevent path, are in
:mod:`asl_gevent._paths`. Each row of :data:`_PATHS` names one attribute
and its hook; :func:`install` puts the hook in place and binds the
``_orig_*`` global through which it calls what it replaced. A module not
imported yet is patched when it is (:mod:`asl_gevent._imports` calls
:func:`_patch_imported`), so importing this package imports none of them.

:func:`uninstall` puts every patched attribute back as it was, unless
another library has wrapped it since (see :func:`_restore`).
"""

from __future__ import annotations

import _thread
import gc
import os
import sys
import warnings
from types import ModuleType
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

from gevent._abstract_linkable import AbstractLinkable

from . import _paths
from ._imports import cancel_when_imported, when_imported
from ._paths import Greenlet, _on_spawn

__all__ = ["install", "uninstall", "is_installed"]


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
        #: ``(module name, callback)`` given to :func:`asl_gevent._imports.when_imported`:
        #: a copy of this module imported afresh cancels the old one's.
        self.watching: List[Tuple[str, Callable[[ModuleType], None]]] = []
        #: ``(owner, name) -> value`` that uninstall found set over our hook
        #: (by another library, after install) and so left in place.
        self.left: Dict[Tuple[Any, str], Any] = {}
        self.fork_handler = False
        self.companions: List[Callable[[bool], None]] = []
        #: Whether the companions were last told True (so are to be told False).
        self.companions_on = False


#: Set on every hook by :func:`install`: the hook itself (so a wrapper made
#: with ``functools.wraps``, which copies ``__dict__``, is not taken for
#: ours), next to ``__wrapped__`` (what it calls), what to put back and the
#: state that installed it. A reloaded or re-imported copy of this module
#: recognises the hooks by it.
_MARK = "__asl_gevent_hook__"
_RESTORE = "__asl_gevent_restore__"
_STATE = "__asl_gevent_state__"


def _earlier_state() -> Optional[_State]:
    """The state of an earlier run of this module, if there is one to share.

    ``importlib.reload`` re-runs this file in the same namespace, where the
    state is still a global. A copy imported afresh (after ``del
    sys.modules[...]``) gets a new namespace, so the state cannot live only
    there: while hooks are in place it is found on the installed
    ``Greenlet.run`` hook, which :func:`_apply` marked with it.
    """
    state: Optional[_State] = globals().get("_state")
    run: Any = vars(Greenlet).get("run")
    if state is None and run is not None and getattr(run, _MARK, None) is run:
        state = getattr(run, _STATE, None)
    return state


_state: _State = _earlier_state() or _State()


def _new_lock_after_fork() -> None:
    # A lock another thread held at fork() time stays held in the child, where
    # that thread does not exist: the child starts with a free one.
    _state.lock = _thread.RLock()


if not _state.fork_handler and hasattr(os, "register_at_fork"):
    _state.fork_handler = True  # once per process, reloads included
    os.register_at_fork(after_in_child=_new_lock_after_fork)

#: ``fn(installing)`` called by install() (True) and uninstall() (False):
#: ``asl_gevent._detach`` marks the known library workers' starters.
_companions: List[Callable[[bool], None]] = _state.companions


# -- the registry: which attribute of which module each hook replaces ----------


class _Path:
    """One hooked attribute: ``<module>.<owner>.<name>`` becomes *hook*.

    *owner* is the (dotted) name of a class in *module* ("" for the module
    itself) or the class itself. *original* names the global of
    :mod:`asl_gevent._paths` through which the hook calls what it replaced;
    :func:`install` binds it (originals are
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
#: imported yet is patched right after it is (see :func:`_patch_imported`),
#: so ``import asl_gevent`` imports none of them.
_PATHS: Tuple[_Path, ...] = (
    _Path("gevent.greenlet", Greenlet, "run", _paths._greenlet_run, "_orig_greenlet_run"),
    _Path("gevent.greenlet", Greenlet, "rawlink", _paths._rawlink, "_orig_rawlink"),
    _Path("gevent.hub", "", "spawn_raw", _paths._spawn_raw, "_orig_spawn_raw"),
    _Path("gevent", "", "spawn_raw", _paths._spawn_raw, "_orig_spawn_raw"),
    _Path("concurrent.futures.thread", "", "_WorkItem", _paths._work_item_class,
          "_orig_work_item", make=True),
    _Path("concurrent.futures.thread", "ThreadPoolExecutor", "_adjust_thread_count",
          _paths._adjust_thread_count, "_orig_adjust_thread_count"),
    _Path("gevent.baseserver", "BaseServer", "start", _paths._server_start, "_orig_server_start"),
    _Path("gevent.baseserver", "BaseServer", "do_handle", _paths._server_do_handle,
          "_orig_server_do_handle"),
    _Path("gevent.pywsgi", "WSGIHandler", "handle_one_request", _paths._wsgi_handle_one_request,
          "_orig_handle_one_request"),
    _Path("gevent._abstract_linkable", AbstractLinkable, "rawlink", _paths._linkable_rawlink,
          "_orig_linkable_rawlink"),
    _Path("gevent.threadpool", "", "ThreadResult", _paths._thread_result_class,
          "_orig_thread_result", make=True),
    _Path("gevent.threadpool", "ThreadPool._WorkerGreenlet", "_before_run_task",
          _paths._before_run_task, "_orig_before_run_task"),
    _Path("gevent.threadpool", "ThreadPool._WorkerGreenlet", "_after_run_task",
          _paths._after_run_task, "_orig_after_run_task"),
    _Path("gevent.baseserver", "BaseServer", "close", _paths._server_close, "_orig_server_close"),
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
    # The hooks call what they replaced through these globals of _paths.
    setattr(_paths, row.original, original)
    _state.bound[row.original] = original
    hook = row.hook(original) if row.make else row.hook
    for attribute, value in (("__wrapped__", original), (_MARK, hook), (_RESTORE, restore),
                             (_STATE, _state)):
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


def _wraps_a_hook(value: Any, is_hook: Callable[[Any], bool] = _is_hook) -> bool:
    """Whether *value* wraps one of our hooks (by its ``__wrapped__`` chain);
    :mod:`asl_gevent._http_clients` passes its own *is_hook*."""
    for _ in range(32):  # a bound: __wrapped__ chains can be cyclic
        try:
            value = getattr(value, "__wrapped__", None)
        except Exception:  # an exotic proxy
            return False
        if value is None:
            return False
        if is_hook(value):
            return True
    return False


def _loaded(name: str) -> Optional[ModuleType]:
    """*name* from ``sys.modules`` if it has finished executing, else None."""
    module = sys.modules.get(name)
    if module is None or getattr(getattr(module, "__spec__", None), "_initializing", False):
        return None  # not imported, or running now: patched when it is done
    return module


# -- hooking modules imported after install() ---------------------------------


def _patch_imported(module: ModuleType) -> None:
    """Hook a watched module that was just imported (see :mod:`asl_gevent._imports`).

    A failure leaves that module as it was, with one warning.
    """
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
    while _state.watching:
        cancel_when_imported(*_state.watching.pop())
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

    .. versionadded:: 0.1
    """
    with _state.lock:
        if _state.installed:
            return
        try:
            if any(name not in sys.modules for name in _BY_MODULE):
                for name in _BY_MODULE:
                    _state.watching.append((name, _patch_imported))
                    when_imported(name, _patch_imported)
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
    it held when :func:`install` ran. Never raises.

    .. versionadded:: 0.1
    """
    with _state.lock:
        if _state.installed:
            _uninstall_locked()


def is_installed() -> bool:
    """Whether the hooks are installed (true only once every hook is in place).

    .. versionadded:: 0.1
    """
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

    Like the first storage, it installs only if the hooks were never
    installed: after an explicit :func:`uninstall` the user decides (a
    ``patch_all()`` that runs later, say in a library, must not undo it).
    Never raises into ``patch_all()``: a failure is one warning.
    """
    install_on_first_use()
