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
from types import CoroutineType, MemberDescriptorType, MethodDescriptorType
from typing import (TYPE_CHECKING, Any, Callable, ClassVar, Generic, List, Optional, Set,
                    Tuple, TypeVar)
from weakref import WeakKeyDictionary, WeakSet

from greenlet import getcurrent

from . import _paths
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

    :raises TypeError: if *fn* is not callable.
    """
    check_callable(fn, "AsyncLocalStorage.bind()")
    return bound_to(capture_context(), fn)


def snapshot() -> Callable[..., Any]:
    """Capture the current context; return ``runner(fn, *args, **kwargs)``.

    ``runner`` calls *fn* in a copy of the captured context, like a function
    made by :func:`bind` that takes the function as its first argument.
    ``runner`` raises :class:`TypeError` if its *fn* is not callable.
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

    # In pure Python, ``get_store`` and ``getStore`` are slots, not methods:
    # each instance holds its variable's own bound ``ContextVar.get`` (a C
    # function) in a slot, and ``als.get_store()`` is a slot read plus that
    # call. A slot is a data descriptor on the class, so CPython >= 3.12
    # specialises the lookup (LOAD_ATTR_SLOT): 0.98x a raw ``var.get()`` in
    # instructions on 3.12 and 3.13, 1.09x on 3.10; 3.11 specialises no
    # lookup before a call but a method's: 1.71x. 0.2 kept the bound method in
    # the instance ``__dict__`` over a class method, which no CPython
    # specialises: 1.86x on 3.11, 1.88x on 3.12, 1.97x on 3.13 (callgrind;
    # ``python -m asl_gevent.bench``). With the compiled accelerator the class
    # is remade as a C type whose get_store is a C method (see
    # :func:`_compiled_class`): about 1.0x on every CPython.
    # ``__dict__`` stays, so instances take attributes as before.
    __slots__ = {
        "get_store": """Return the current store, or :attr:`default` when there is none.

        Called as ``als.get_store()``, with no argument. A subclass may
        override it with a method, and :meth:`getStore` then calls the
        override (``super().get_store()`` reads the store). After
        :meth:`disable`, look ``get_store`` up again: a reference taken before
        (``read = als.get_store``) may keep reading the old stores.

        .. versionchanged:: 0.3
           With the compiled accelerator a C method: about 0.95x a raw
           :meth:`contextvars.ContextVar.get` on CPython 3.10-3.13. In pure
           Python a slot holding the variable's ``get``: 0.97-1.10x, 1.71x on
           3.11 (and ``AsyncLocalStorage.get_store(als)``, the class attribute
           called with an instance, does not work; call ``als.get_store()``).
        """,
        "getStore": "Node's name for :attr:`get_store` (calls a subclass's override).",
        "_name": None, "_default": None, "_var": None,
        # Where ``AsyncLocalStorage[str](...)`` puts the alias it was made
        # by: in the instance ``__dict__``, it would stop CPython >= 3.13
        # (3.10 too) specialising ``get_store`` on the compiled class.
        "__orig_class__": None,
        "__dict__": None, "__weakref__": None,
    }

    get_store: Callable[[], Optional[T]]
    getStore: Callable[[], Optional[T]]  # noqa: N815 - Node's name
    #: This class, pure or compiled, for its methods (and a subclass's) to
    #: find it: not ``__class__``, which is the pure one in both.
    _plain: ClassVar[Any]
    #: The pure class's get_store and getStore slot descriptors (None on the
    #: compiled class), kept apart from the class ``__dict__``: see _new_var.
    _slots: ClassVar[Optional[Tuple[Any, Any]]]

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

    def __init_subclass__(cls, **kwargs: Any) -> None:
        plain = cls._plain
        super(plain, cls).__init_subclass__(**kwargs)
        # As the pure-Python class's lookup finds them (see _found).
        get, node = _found(cls.__mro__, "get_store"), _found(cls.__mro__, "getStore")
        if not _reads_the_variable(get) and _reads_the_variable(node):
            # It overrides get_store but not getStore: Node's name calls the
            # override, as the base's getStore did in 0.2.
            cls.getStore = node = _call_get_store  # type: ignore[assignment]
        if plain._slots is None:  # compiled: C methods made for this class
            from . import _speedups

            _place_methods(cls, _speedups.storage_methods(cls), get, node)

    def _new_var(self) -> None:
        # A ContextVar made with a default answers ``get()`` with no argument.
        # ``disable()`` swaps in a fresh variable, which is how stores set
        # before it become unreachable in every context at once.
        label = self._name or f"0x{id(self):x}"
        var: ContextVar[Any] = ContextVar(
            f"asl_gevent.AsyncLocalStorage<{label}>", default=self._default
        )
        self._var = var
        # In pure Python the slots hold the variable's own (C) bound method,
        # written through their descriptors: a subclass's get_store method
        # (found first on lookup) stays in charge, and ``super().get_store()``
        # reads the slot. The descriptors are the ones the class was made
        # with (``self._slots``): not a module global, as after
        # importlib.reload storages made before it are of the old class,
        # whose slots the new class's descriptors refuse; and not the class
        # ``__dict__``, where a test may have patched get_store
        # (mock.patch.object), and storages made meanwhile must still read
        # their stores once the patch is gone.
        reads = self._slots
        if reads is not None:
            get = var.get
            reads[0].__set__(self, get)
            reads[1].__set__(self, get)
        elif getattr(type(self), "_var") is not vars(self._plain)["_var"]:
            # Compiled, a subclass with a _var of its own (``__slots__ =
            # ("_var",)``): the C methods read the class's.
            vars(self._plain)["_var"].__set__(self, var)

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

        :raises TypeError: if *fn* is not callable; nothing is changed.
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

        :raises RuntimeError: when the block is entered twice, or left in
            another greenlet than the one that entered it (or twice); the
            storage's value is left as it was.
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


AsyncLocalStorage._plain = AsyncLocalStorage
AsyncLocalStorage._slots = (vars(AsyncLocalStorage)["get_store"],
                            vars(AsyncLocalStorage)["getStore"])

#: The pure-Python class, whichever runs (the tests hold the two to one
#: behaviour).
PyAsyncLocalStorage = AsyncLocalStorage


def _compiled_class(py: type) -> type:
    """*py* remade on :mod:`asl_gevent._speedups`' storage type.

    The C type has *py*'s slots (``_var``, ``_name``, ``_default``, an
    instance ``__dict__``, weak references) and a C ``get_store`` and
    ``getStore`` with the slots' docstrings; every other attribute of *py*
    (methods, properties, ``__init__``, ``__orig_bases__``...) is copied onto
    it, so both classes run the same Python code.
    """
    from . import _speedups

    docs = {name: f"{name}($self, /)\n--\n\n{py.__slots__[name]}"  # type: ignore[attr-defined]
            for name in ("get_store", "getStore")}
    cls = _speedups.storage_type(py.__bases__, docs["get_store"], docs["getStore"])
    for key, value in vars(py).items():
        if key not in py.__slots__ and key != "__slots__":  # type: ignore[attr-defined]
            setattr(cls, key, value)
    # The slots the C type has, as ``__slots__`` says them for copyreg (what
    # copy.copy and pickle save): without, copy.copy(als) refused the type,
    # which pure Python copies (sharing the variable).
    slots = py.__slots__  # type: ignore[attr-defined]
    cls.__slots__ = tuple(  # type: ignore[attr-defined]
        name for name in slots if name not in ("get_store", "getStore"))
    cls._plain = cls  # type: ignore[attr-defined]
    cls._slots = None  # type: ignore[attr-defined]
    return cls


if _paths.SPEEDUPS and not TYPE_CHECKING:
    AsyncLocalStorage = _compiled_class(AsyncLocalStorage)  # noqa: F811


#: The names of the C methods the compiled class's ``__init_subclass__`` put
#: in a subclass's ``__dict__``, where the pure-Python class has nothing:
#: ``{cls: {names}}``. Names only: a method holds its class, which a value
#: here would keep alive. Kept across importlib.reload, as _NAMED.
_PLACED: "WeakKeyDictionary[type, Set[str]]" = globals().get("_PLACED") or WeakKeyDictionary()


def _placed(klass: type, name: str) -> bool:
    method = vars(klass).get(name)
    return name in _PLACED.get(klass, ()) and type(method) is MethodDescriptorType \
        and method.__objclass__ is klass


def _found(mro: Tuple[type, ...], name: str) -> Any:
    """The first *name* in the ``__dict__`` of the classes of *mro*, passing
    over the C methods placed there (:data:`_PLACED`): what the pure-Python
    class's lookup (or ``super()``'s) finds."""
    for klass in mro:
        if name in vars(klass) and not _placed(klass, name):
            return vars(klass)[name]
    return None


def _place_methods(cls: type, made: Tuple[Any, Any], get: Any, node: Any) -> None:
    """Compiled: give *cls* the C methods *made* for it (which CPython
    specialises, see _speedups.c) where pure Python reads the variable.

    A method placed in a class above would read the variable where pure
    Python finds nothing and goes on along the MRO: to an override, directly
    or through ``super()`` (``class Mine(Library, Logging)``, Logging
    overriding get_store, Library not). Such a method is taken away from its
    class, whose instances then read the same stores through an ancestor's,
    which CPython does not specialise for them.
    """
    for name in ("get_store", "getStore"):
        after = None  # the first entry pure Python finds after klass (walking back)
        for klass in reversed(cls.__mro__[1:]):
            if name not in vars(klass):
                continue
            if not _placed(klass, name):
                after = vars(klass)[name]
            elif not _reads_the_variable(after):
                delattr(klass, name)
                _PLACED[klass].discard(name)
    placed = set()
    for name, value, method in (("get_store", get, made[0]), ("getStore", node, made[1])):
        if _reads_the_variable(value):
            if name not in vars(cls):  # else a slot or an explicit get_store = ...
                placed.add(name)
            setattr(cls, name, method)
    if placed:
        _PLACED[cls] = placed


def _reads_the_variable(attr: Any) -> bool:
    """Whether *attr* (a class's ``get_store`` or ``getStore``) is a storage's
    own read of its variable, a slot or a C method, rather than an override."""
    return type(attr) in (MemberDescriptorType, MethodDescriptorType) \
        and attr.__name__ in ("get_store", "getStore")


def _call_get_store(self: AsyncLocalStorage[T]) -> Optional[T]:
    """Node's name for :attr:`~AsyncLocalStorage.get_store` (calls the subclass's override)."""
    return self.get_store()


_call_get_store.__name__ = _call_get_store.__qualname__ = "getStore"
