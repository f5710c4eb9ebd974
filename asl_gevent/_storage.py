"""``AsyncLocalStorage``: Node's request-scoped store, on ``contextvars``.

Each storage owns one :class:`~contextvars.ContextVar`; the store lives in the
current :class:`~contextvars.Context`, which greenlet (>= 1.0) keeps per
greenlet and asyncio per task. The hooks in :mod:`asl_gevent._paths` give every
spawned greenlet a *copy* of its spawner's context, so a store set in
:meth:`~AsyncLocalStorage.run` follows the work it starts and nothing else:

>>> from asl_gevent import AsyncLocalStorage
>>> import gevent
>>> als = AsyncLocalStorage(name="request")
>>> def handler():
...     return gevent.spawn(als.get_store).get()
>>> als.run({"id": 7}, handler)
{'id': 7}
>>> print(als.get_store())
None

The store object itself is shared by reference, as in Node: a child that
mutates a dict store mutates its parent's dict. What is copied is the
*binding*: a child's ``enter_with``/``run`` never reaches its parent or its
siblings.
"""

from __future__ import annotations

from contextvars import ContextVar, copy_context
from types import CoroutineType
from typing import Any, Callable, Generic, List, Optional, TypeVar
from weakref import WeakSet

from greenlet import getcurrent

from ._context import bound_to, call_in, check_callable, in_context
from ._hooks import install_on_first_use
from ._paths import capture_context

T = TypeVar("T")
R = TypeVar("R")

_set_var = ContextVar.set

__all__ = ["AsyncLocalStorage", "bind", "snapshot", "named_storages"]

# Storages made with a name, for the cross-process integrations
# (asl_gevent.celery sends the stores of named storages and restores them by
# name in the worker). Weak: registering a storage never keeps it alive. All
# of them, not one per name: a library or a test may make a second storage
# with a name in use, and that must not hide the first one's stores.
# Kept across importlib.reload (which re-runs this file in the same
# namespace): storages made before it must still be found by name.
_NAMED: "WeakSet[AsyncLocalStorage[Any]]" = globals().get("_NAMED") or WeakSet()


def named_storages() -> List["AsyncLocalStorage[Any]"]:
    """A snapshot of the live storages made with a non-empty ``name``."""
    return list(_NAMED)


def bind(fn: Callable[..., R]) -> Callable[..., R]:
    """Return *fn* bound to the current context.

    Every call of the result runs *fn* in its own copy of the context captured
    now, so it may be called many times, re-entrantly, and from several
    greenlets or threads at once; what *fn* changes is gone when it returns.
    """
    check_callable(fn, "AsyncLocalStorage.bind()")
    return bound_to(capture_context(), fn)


def snapshot() -> Callable[..., Any]:
    """Capture the current context; return ``runner(fn, *args, **kwargs)``.

    ``runner`` calls *fn* in a copy of the captured context, like a function
    made by :func:`bind` that takes the function as its first argument.
    """
    captured = capture_context()

    def runner(fn: Callable[..., R], /, *args: Any, **kwargs: Any) -> R:
        check_callable(fn, "AsyncLocalStorage.snapshot() runner")
        return call_in(captured.copy(), fn, args, kwargs)

    return runner


class _Scope(Generic[T]):
    """The context manager returned by :meth:`AsyncLocalStorage.scope`.

    A ``with`` block cannot enter a :class:`~contextvars.Context` (only
    ``Context.run`` can), so this one sets the storage's variable with a token
    and resets it on exit. A token only resets in the context it was made in,
    so leaving the block in another greenlet, or twice, is refused with a
    :class:`RuntimeError` that says so, before the variable is touched.
    """

    __slots__ = ("_storage", "_store", "_token", "_owner", "_var")

    def __init__(self, storage: AsyncLocalStorage[T], store: T) -> None:
        self._storage = storage
        self._store = store
        self._token: Any = None
        self._owner: Any = None
        self._var: Optional[ContextVar[Any]] = None

    def __enter__(self) -> T:
        if self._owner is not None:
            raise RuntimeError(
                f"this scope() of {self._storage!r} was already entered; "
                "call als.scope(store) again for each with-block"
            )
        var = self._storage._var
        self._owner = getcurrent()
        self._var = var
        self._token = var.set(self._store)
        return self._store

    def __exit__(self, *exc_info: object) -> None:
        token, var = self._token, self._var
        if token is None or var is None:
            raise RuntimeError(
                f"this scope() of {self._storage!r} was already exited (or never "
                "entered); a scope is exited once, by the with-statement that entered it"
            )
        if getcurrent() is not self._owner:
            raise RuntimeError(
                f"scope() of {self._storage!r} exited in another greenlet than the one "
                f"that entered it ({self._owner!r}); use als.run(store, fn) for work "
                "that moves between greenlets"
            )
        try:
            var.reset(token)
        except ValueError:
            raise RuntimeError(
                f"scope() of {self._storage!r} exited in another context than the one "
                "that entered it (the block was split across Context.run calls); "
                "use als.run(store, fn) instead"
            ) from None
        self._token = None


class AsyncLocalStorage(Generic[T]):
    """A store that follows a request through every greenlet it starts.

    :param name: a readable name, shown in ``repr`` and in the context
        variable's name. Optional.
    :param default: what :meth:`get_store` returns where no store was set
        (Node's ``defaultValue``). Optional, ``None`` by default.

    Stores are kept in the current :class:`contextvars.Context`, one
    :class:`~contextvars.ContextVar` per storage. Setting a store costs
    nothing per key; spawning copies the context in O(1) (a persistent map).

    :raises TypeError: if *name* is not a str.

    .. versionadded:: 0.1
    """

    def __init__(self, name: str = "", *, default: Optional[T] = None) -> None:
        if not isinstance(name, str):
            raise TypeError(
                f"AsyncLocalStorage() argument 'name' must be a str, not "
                f"{type(name).__name__!r}; e.g. AsyncLocalStorage(name='request')"
            )
        self._name = name
        self._default = default
        self._var: ContextVar[Any]
        self._new_var()
        if name:
            _NAMED.add(self)
        install_on_first_use()

    def _new_var(self) -> None:
        # A ContextVar made with a default answers ``get()`` with no argument,
        # so ``get_store`` can be the variable's own (C) bound method: reading a
        # store costs one instance-attribute lookup more than a raw
        # ``var.get()``. Plain assignment, not ``self.__dict__[...]``: touching
        # ``__dict__`` makes CPython 3.11 trade the instance's inline values
        # for a real dict, which made every get_store() ~10% slower.
        # ``disable()`` swaps in a fresh variable, which is how stores set
        # before it become unreachable in every context at once.
        label = self._name or f"0x{id(self):x}"
        var: ContextVar[Any] = ContextVar(
            f"asl_gevent.AsyncLocalStorage<{label}>", default=self._default
        )
        self._var = var
        # Only where the class's own method would do exactly the same: a
        # subclass that overrides get_store (or getStore) keeps its override.
        cls = type(self)
        if cls.get_store is _get_store:
            self.get_store = var.get  # type: ignore[method-assign]
            if cls.getStore is _get_store_alias:
                self.getStore = var.get  # type: ignore[method-assign]

    @property
    def name(self) -> str:
        """The name given at construction (``''`` when none)."""
        return self._name

    @property
    def default(self) -> Optional[T]:
        """What :meth:`get_store` returns where no store is set."""
        return self._default

    def __repr__(self) -> str:
        return f"<AsyncLocalStorage name={self._name!r}>"

    # -- reading ---------------------------------------------------------------

    def get_store(self) -> Optional[T]:  # replaced per instance by ContextVar.get
        """Return the current store, or :attr:`default` when there is none.

        A subclass may override it; :meth:`getStore` then calls the override.
        A reference taken before :meth:`disable` (``read = als.get_store``)
        keeps reading the stores of before it: look ``get_store`` up again.
        """
        return self._var.get()  # type: ignore[no-any-return]

    def getStore(self) -> Optional[T]:  # noqa: N802 - Node's name; replaced per instance too
        """Node's name for :meth:`get_store` (calls a subclass's override)."""
        return self.get_store()

    # -- entering --------------------------------------------------------------

    def run(self, store: T, fn: Callable[..., R], /, *args: Any, **kwargs: Any) -> R:
        """Call ``fn(*args, **kwargs)`` with *store* as the current store.

        *fn* runs in a copy of the current context, as an asyncio task does:
        the store is visible in *fn* and in everything it spawns, and when
        *fn* returns or raises, every storage and context variable is as it
        was before, whatever *fn* set. (Node restores only this storage; we
        restore the whole frame on purpose.) If *fn* returns a coroutine, the
        result is an awaitable whose body runs in that copy, so
        ``await als.run(store, handler)`` works as in Node.

        :raises TypeError: if *fn* is not callable; nothing is changed.
        """
        if not callable(fn):
            check_callable(fn, "AsyncLocalStorage.run()")
        context = copy_context()
        # The unbound ContextVar.set, and no empty argument tuple and dict
        # built for an fn called without arguments: together they take run()
        # from about 2.6x to 1.5x a hand-written token set/reset (CPython
        # 3.11, python -m asl_gevent.bench; SPEC asks for at most 2x).
        context.run(_set_var, self._var, store)
        result = context.run(fn, *args, **kwargs) if args or kwargs else context.run(fn)
        if type(result) is CoroutineType:
            return in_context(context, result)  # type: ignore[arg-type,return-value]
        return result

    def exit(self, fn: Callable[..., R], /, *args: Any, **kwargs: Any) -> R:
        """Call *fn* with no store for this storage (others keep theirs).

        Inside, :meth:`get_store` returns :attr:`default`, here and in work
        spawned from *fn*. Frame semantics are those of :meth:`run`.
        """
        check_callable(fn, "AsyncLocalStorage.exit()")
        context = copy_context()
        context.run(self._var.set, self._default)
        return call_in(context, fn, args, kwargs)

    def enter_with(self, store: T) -> None:
        """Make *store* current for the rest of this greenlet's (or run's) scope.

        Work spawned after this call sees *store*; work spawned before does
        not, and neither does the caller of the enclosing :meth:`run`.
        """
        self._var.set(store)

    def scope(self, store: T) -> _Scope[T]:
        """``with als.scope(store):`` -- :meth:`run` for a block.

        Restores this storage (only) when the block ends, even on error.
        The ``with`` value is *store*. Enter and exit it in one greenlet.
        """
        return _Scope(self, store)

    def disable(self) -> None:
        """Make :meth:`get_store` return :attr:`default` everywhere.

        Running greenlets included, until the next :meth:`run` or
        :meth:`enter_with`. Stores set before never come back; the storage
        stays usable, and holds no reference to them.
        """
        self._new_var()

    # -- static helpers (Node: AsyncLocalStorage.bind / .snapshot) -------------

    bind = staticmethod(bind)
    snapshot = staticmethod(snapshot)

    # -- camelCase aliases for code ported from Node -----------------------------

    enterWith = enter_with  # noqa: N815 - Node's name


# The methods _new_var() may shadow per instance with the variable's own get.
_get_store = AsyncLocalStorage.get_store
_get_store_alias = AsyncLocalStorage.getStore
