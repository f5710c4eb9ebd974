"""Post-import callbacks: the package's one ``sys.meta_path`` finder.

Two things wait for modules the program may import later, without importing
them: the hooks patch ``gevent.pywsgi``, ``gevent.threadpool``, the servers
and ``concurrent.futures`` when they are imported (:mod:`asl_gevent._hooks`),
and ``detach_starter`` marks a library's function when its module is
(:mod:`asl_gevent._detach`). Both ask :func:`when_imported`.

The finder is in ``sys.meta_path`` only while something is waited for, and
costs one dict lookup per import of any other module. For a waited-for
module it asks the finders after it for the spec and wraps the loader for
that one import: the real loader runs the module, then the callbacks run.
The wrapper is never seen afterwards (the real loader is put back on the
spec and the module first) and no callback's error reaches the import.
"""

from __future__ import annotations

import _thread
import os
import sys
import warnings
from types import ModuleType
from typing import Any, Callable, Dict, Optional, Tuple

__all__ = ["when_imported", "cancel_when_imported"]

Callback = Callable[[ModuleType], None]

#: Marks our finder, and the finder of a copy of this module imported afresh
#: (``del sys.modules[...]``): a finder never asks one of those for the spec.
_FINDER_MARK = "__asl_gevent_finder__"


class _State:
    """What is waited for, shared by every run of this module.

    ``importlib.reload`` re-runs this file in the same namespace while the
    finder of the previous run may be in ``sys.meta_path``; keeping this one
    object keeps the callbacks and that finder (whose methods look up this
    module's globals, so they run the reloaded code).
    """

    def __init__(self) -> None:
        #: A real OS lock (``_thread.RLock`` is never monkey-patched). Only
        #: this module's bookkeeping runs under it, never a callback, so
        #: callers may hold their own locks when they call in.
        self.lock = _thread.RLock()
        #: module name -> callbacks. Replaced, never mutated, under the lock,
        #: so the finder and the loader read it without taking the lock.
        self.waiting: Dict[str, Tuple[Callback, ...]] = {}
        self.finder: Optional[_Finder] = None
        self.fork_handler = False


_state: _State = globals().get("_state") or _State()
_waiting = _state.waiting  # the finder's one lookup: no attribute access


def _new_lock_after_fork() -> None:
    # A lock another thread held at fork() time stays held in the child.
    _state.lock = _thread.RLock()


if not _state.fork_handler and hasattr(os, "register_at_fork"):
    _state.fork_handler = True  # once per process, reloads included
    os.register_at_fork(after_in_child=_new_lock_after_fork)


def when_imported(module_name: str, callback: Callback) -> None:
    """Call ``callback(module)`` each time *module_name* is imported from now on.

    Right after the module has executed (an import, or a reload, that found it
    through ``sys.meta_path``), until :func:`cancel_when_imported`. A module
    imported already is not looked at: the caller handles it. Idempotent:
    one callback waits once per module. Thread-safe.
    """
    with _state.lock:
        callbacks = _waiting.get(module_name, ())
        if callback not in callbacks:
            _waiting[module_name] = (*callbacks, callback)
        finder = _state.finder
        if finder is None:
            finder = _state.finder = _Finder()
        if finder not in sys.meta_path:
            sys.meta_path.insert(0, finder)


def cancel_when_imported(module_name: str, callback: Callback) -> None:
    """Undo :func:`when_imported`; the finder leaves when nothing is waited for.

    Idempotent. Thread-safe.
    """
    with _state.lock:
        callbacks = tuple(c for c in _waiting.get(module_name, ()) if c != callback)
        if callbacks:
            _waiting[module_name] = callbacks
        else:
            _waiting.pop(module_name, None)
        if not _waiting and _state.finder is not None:
            try:
                sys.meta_path.remove(_state.finder)
            except ValueError:  # not there (someone replaced sys.meta_path)
                pass


def _imported(module_name: str, module: ModuleType) -> None:
    """Run the callbacks waiting for *module_name*; never raise into the import."""
    for callback in _waiting.get(module_name, ()):
        try:
            callback(module)
        except Exception as exc:
            warnings.warn(f"asl_gevent: {callback!r} failed after {module_name} was imported "
                          f"({type(exc).__name__}: {exc}); the module is left as it was "
                          "imported", RuntimeWarning, stacklevel=2)


# Duck-typed rather than subclassing importlib.abc: importing that module
# costs about 20 ms (CPython 3.11), more than SPEC's whole import budget.


class _CallAfterExec:
    """A module's loader, for one import: runs the module, then the callbacks."""

    def __init__(self, loader: Any, module_name: str) -> None:
        self.loader = loader
        self.module_name = module_name

    def create_module(self, spec: Any) -> Any:
        create = getattr(self.loader, "create_module", None)
        return None if create is None else create(spec)

    def exec_module(self, module: ModuleType) -> None:
        # Put the real loader back first: the module itself and tools
        # (importlib.resources, inspect, pkgutil, reload) look at it, and
        # nothing else should ever see this wrapper.
        module.__loader__ = self.loader
        if module.__spec__ is not None:
            module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        _imported(self.module_name, module)

    def __getattr__(self, name: str) -> Any:
        if name in ("loader", "module_name"):  # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.loader, name)


class _Finder:
    """``sys.meta_path`` finder that answers only for waited-for modules.

    It finds nothing itself: it asks the finders after it and wraps the
    loader of the spec they find.
    """

    __asl_gevent_finder__ = True

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname not in _waiting:
            return None
        finders = list(sys.meta_path)
        try:
            # Those before this one have answered None already; asking them
            # again could recurse through a finder that delegates like this.
            after = finders[finders.index(self) + 1:]
        except ValueError:  # removed meanwhile: this import is not waited for
            return None
        for finder in after:
            if getattr(finder, _FINDER_MARK, False):
                continue  # one from a copy of this module imported afresh
            find_spec = getattr(finder, "find_spec", None)
            spec = None if find_spec is None else find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _CallAfterExec(spec.loader, fullname)
        return spec
