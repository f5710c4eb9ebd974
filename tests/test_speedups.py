"""The optional compiled hooks (``asl_gevent._speedups``) and their fallback.

The whole suite runs both ways (CI runs it again with
``ASL_GEVENT_PUREPYTHON=1``); these tests check the switch itself, that the
compiled hooks are in use when built, and the corners where C code could
differ from the Python it replaces: arguments, exceptions, attributes,
reference counts.
"""

from __future__ import annotations

import functools
import gc
import importlib.util
import inspect
import json
import os
import sys
import weakref
from contextvars import Context, ContextVar
from typing import Any, Callable, Dict, Iterator

import gevent
import gevent.event
import gevent.pool
import pytest
from greenlet import getcurrent, greenlet

import asl_gevent
from asl_gevent import _paths
from asl_gevent._paths import Greenlet
from helpers import run_python

BUILT = importlib.util.find_spec("asl_gevent._speedups") is not None

#: The three accelerated hooks: (compiled, pure Python) of each.
NAMES = ("_on_spawn", "_greenlet_run", "_rawlink")

needs_build = pytest.mark.skipif(not BUILT and not os.environ.get("CI"),
                                 reason="asl_gevent._speedups is not built (no C compiler?)")

_PROBE = """
import json, asl_gevent
from asl_gevent import _paths
from asl_gevent.debug import format_run_info
from asl_gevent import AsyncLocalStorage
import gevent
import gevent.event
import gevent.pool
als = AsyncLocalStorage(name="probe")
print(json.dumps({
    "speedups": asl_gevent.SPEEDUPS,
    "types": sorted({type(getattr(_paths, name)).__name__
                     for name in ("_on_spawn", "_greenlet_run", "_rawlink")}),
    "python": all(getattr(_paths, name) is getattr(_paths, "_py" + name)
                  for name in ("_on_spawn", "_greenlet_run", "_rawlink")),
    "header": [line for line in format_run_info(False, False) if line.startswith("* asl_gevent ")],
    "seen": als.run("request", lambda: gevent.spawn(als.get_store).get()),
}))
"""


def _probe(value: str | None) -> Dict[str, Any]:
    env = dict(os.environ)
    env.pop("ASL_GEVENT_PUREPYTHON", None)
    if value is not None:
        env["ASL_GEVENT_PUREPYTHON"] = value
    # run_python adds to os.environ: pass the whole environment, variable removed or set.
    saved = os.environ.pop("ASL_GEVENT_PUREPYTHON", None)
    try:
        proc = run_python(_PROBE, env=env)
    finally:
        if saved is not None:
            os.environ["ASL_GEVENT_PUREPYTHON"] = saved
    result: Dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


@needs_build
@pytest.mark.parametrize("value", [None, "", "0", "off"])
def test_compiled_hooks_are_used_by_default_when_built(value: str | None) -> None:
    """Built, and ``ASL_GEVENT_PUREPYTHON`` unset (or 0/off): SPEEDUPS is True,
    the three hooks are the compiled ones, run info says so, stores follow."""
    out = _probe(value)
    assert out == {"speedups": True, "types": ["hook"], "python": False,
                   "header": ["* asl_gevent %s, spawn + join hooks and get_store compiled "
                              "(asl_gevent.SPEEDUPS)" % asl_gevent.__version__],
                   "seen": "request"}


@pytest.mark.parametrize("value", ["1", "true", " YES "])
def test_env_var_forces_the_pure_python_hooks(value: str) -> None:
    """``ASL_GEVENT_PUREPYTHON=1`` at import: SPEEDUPS is False and every hook
    is the Python function, as without the extension."""
    out = _probe(value)
    assert out == {"speedups": False, "types": ["function"], "python": True,
                   "header": ["* asl_gevent %s, spawn + join hooks and get_store in pure Python "
                              "(asl_gevent.SPEEDUPS)" % asl_gevent.__version__],
                   "seen": "request"}


def test_speedups_matches_what_runs() -> None:
    """In this process (either way): SPEEDUPS tells whether the hooks are compiled."""
    compiled = [getattr(_paths, name) is not getattr(_paths, "_py" + name) for name in NAMES]
    assert compiled == [asl_gevent.SPEEDUPS] * 3
    if asl_gevent.SPEEDUPS:
        assert vars(Greenlet)["run"] is _paths._greenlet_run
        assert vars(Greenlet)["rawlink"] is _paths._rawlink


# -- the compiled hooks behave as the Python functions -----------------------------


def _compiled(name: str) -> Callable[..., Any]:
    from asl_gevent import _speedups

    return _speedups.hook(getattr(_paths, "_py" + name))  # type: ignore[no-any-return]


@pytest.fixture(name="impl", params=["compiled", "python"])
def _impl(request: pytest.FixtureRequest) -> Callable[[str], Callable[..., Any]]:
    """Each test below runs on a compiled hook and on the Python function."""
    if request.param == "python":
        return lambda name: getattr(_paths, "_py" + name)  # type: ignore[no-any-return]
    if not BUILT:
        pytest.skip("asl_gevent._speedups is not built")
    return _compiled


@needs_build
def test_compiled_hook_looks_like_its_function() -> None:
    """Name, qualname, module and doc are the function's; it takes attributes
    (install() marks its hooks), weak references, and binds as a method."""
    hook = _compiled("_greenlet_run")
    python = _paths._py_greenlet_run
    for attribute in ("__name__", "__qualname__", "__module__", "__doc__"):
        assert getattr(hook, attribute) == getattr(python, attribute)
    assert hook.python_function is python  # type: ignore[attr-defined]
    assert repr(hook) == f"<compiled {python!r}>"
    hook.__wrapped__ = python  # type: ignore[attr-defined]
    assert hook.__wrapped__ is python  # type: ignore[attr-defined]
    assert weakref.ref(hook)() is hook
    assert hook.__get__(None, Greenlet) is hook  # type: ignore[attr-defined]
    glet = Greenlet(lambda: None)
    bound = hook.__get__(glet, Greenlet)  # type: ignore[attr-defined]
    assert bound.__self__ is glet and bound.__func__ is hook


@needs_build
def test_only_the_three_hooks_compile() -> None:
    from asl_gevent import _speedups

    with pytest.raises(ValueError, match=r"^hook\(\) argument must be asl_gevent\._paths' "):
        _speedups.hook(_paths._spawn_raw)


@pytest.mark.parametrize("name, args, kwargs", [
    ("_on_spawn", (), {}), ("_on_spawn", (1, 2), {}), ("_on_spawn", (), {"glet": 1}),
    ("_greenlet_run", (), {}), ("_rawlink", (1,), {}), ("_rawlink", (1, 2, 3), {}),
    ("_on_spawn", (object(),), {}),
])
def test_bad_calls_fail_as_in_python(name: str, args: Any, kwargs: Any) -> None:
    """A call the hook was not made for raises what the Python function raises."""
    errors = []
    for hook in (getattr(_paths, "_py" + name), *([_compiled(name)] if BUILT else [])):
        with pytest.raises(Exception) as caught:
            hook(*args, **kwargs)
        errors.append((type(caught.value), str(caught.value)))
    assert len(set(errors)) == 1, errors


def test_on_spawn(impl: Callable[[str], Callable[..., Any]]) -> None:
    """A greenlet without a context gets a copy of the current one; a preset
    one is left alone; in a detached() block it gets an empty one."""
    on_spawn = impl("_on_spawn")
    var: ContextVar[str] = ContextVar("test_speedups.var")
    token = var.set("spawner")
    try:
        fresh = greenlet(lambda: None)
        assert on_spawn(fresh) is None
        assert fresh.gr_context is not None and fresh.gr_context[var] == "spawner"
        preset = greenlet(lambda: None)
        preset.gr_context = mine = Context()
        on_spawn(preset)
        assert preset.gr_context is mine
        with asl_gevent.detached():
            detached = greenlet(lambda: None)
            on_spawn(detached)
        assert detached.gr_context is not None and var not in detached.gr_context
    finally:
        var.reset(token)


def test_greenlet_run_drops_the_context_even_when_run_raises(
        impl: Callable[[str], Callable[..., Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    """The context goes in a finally clause; the error comes through, and an
    error raised there has the first one as its __context__, as in Python."""
    run = impl("_greenlet_run")

    def boom(glet: Any) -> None:
        raise KeyError("boom")

    monkeypatch.setattr(_paths, "_orig_greenlet_run", boom)
    glet = Greenlet(lambda: None)
    glet.gr_context = Context()
    with pytest.raises(KeyError, match="boom"):
        run(glet)
    assert glet.gr_context is None
    with pytest.raises(AttributeError) as caught:
        run(object())  # not a greenlet: ``type(self).run`` fails in the finally clause
    assert isinstance(caught.value.__context__, KeyError)


def test_greenlet_run_keeps_the_context_of_a_subclass_with_its_own_run(
        impl: Callable[[str], Callable[..., Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    run = impl("_greenlet_run")
    called = []
    monkeypatch.setattr(_paths, "_orig_greenlet_run", called.append)

    class Own(Greenlet):  # type: ignore[misc]
        def run(self) -> None:  # pragma: no cover - never started
            pass

    class Inherits(Greenlet):  # type: ignore[misc]
        pass

    own, inherits = Own(), Inherits()
    own.gr_context = inherits.gr_context = context = Context()
    assert run(own) is None and run(inherits) is None
    assert called == [own, inherits]
    assert own.gr_context is context and inherits.gr_context is None


def test_rawlink_passes_bookkeeping_through_and_wraps_the_rest(
        impl: Callable[[str], Callable[..., Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    """A greenlet's switch and gevent's own methods reach the original as they
    are; a user's callback is wrapped in its link-time context."""
    rawlink = impl("_rawlink")
    linked = []
    monkeypatch.setattr(_paths, "_orig_rawlink", lambda self, cb: linked.append(cb) or "orig")
    glet = Greenlet(lambda: None)
    switch = getcurrent().switch
    assert rawlink(glet, switch) == "orig"
    discard = gevent.pool.Group()._discard
    rawlink(glet, discard)  # gevent's own method: passed through (and remembered)
    rawlink(glet, discard)
    assert rawlink(glet, id) is None  # a C function not bound to a greenlet: wrapped
    assert linked[:3] == [switch, discard, discard]
    assert isinstance(linked[3], _paths._LinkInContext) and linked[3].callback is id


@needs_build
def test_compiled_hooks_keep_no_references() -> None:
    """Reference counts of everything the hooks in use touch are unchanged
    after 10,000 calls of each, and no object is left behind."""
    var: ContextVar[object] = ContextVar("test_speedups.refs")
    store = object()

    def work() -> object:
        return var.get()

    def spawn_join() -> None:
        glet = gevent.spawn(work)
        glet.join()
        glet.rawlink(id)  # a dead greenlet: the slow path, called at once by the hub
        gevent.pool.Group().spawn(work).join()

    token = var.set(store)
    try:
        for _ in range(100):  # warm up: caches, free lists, gevent's function set
            spawn_join()
        gevent.sleep(0)
        gc.collect()
        before = (sys.getrefcount(store), sys.getrefcount(work), sys.getrefcount(id),
                  sys.getrefcount(getcurrent()), len(gc.get_objects()))
        for _ in range(10_000):
            spawn_join()
        gevent.sleep(0)
        gc.collect()
        after = (sys.getrefcount(store), sys.getrefcount(work), sys.getrefcount(id),
                 sys.getrefcount(getcurrent()), len(gc.get_objects()))
    finally:
        var.reset(token)
    assert after[:4] == before[:4]
    # One object kept per call would be 10,000; other tests' leftovers may go meanwhile.
    assert after[4] - before[4] < 100, (before, after)


class _Waiter(gevent.Greenlet):  # type: ignore[misc]
    def __init__(self, event: gevent.event.Event) -> None:
        super().__init__()
        self.event = event

    def _run(self) -> None:
        self.event.wait()


@pytest.mark.parametrize("how", ["compiled-run", "python-function", "python-method",
                                 "partial"])
def test_a_waiting_greenlet_with_only_compiled_code_shows_its_context(
        als: asl_gevent.AsyncLocalStorage[object], how: str) -> None:
    """``gevent.spawn(event.wait)``: gevent's ``run`` and ``Event.wait`` are
    compiled, and greenlet takes a started greenlet with no Python frame for
    a running one (its ``gr_context`` raises ValueError). The compiled
    ``run`` hook keeps a Python frame at the bottom unless what gevent runs
    is a Python function or method (whose own frame is there), so the leak
    watch and ``stores_of`` can read what the waiting greenlet holds, in
    every case."""
    event = gevent.event.Event()

    def start() -> gevent.Greenlet:
        if how == "compiled-run":
            return gevent.spawn(event.wait)
        if how == "python-function":
            return gevent.spawn(lambda: event.wait())
        if how == "python-method":
            waiter = _Waiter(event)
            waiter.start()
            return waiter
        return gevent.spawn(functools.partial(event.wait, None))

    glet = als.run("request", start)
    try:
        gevent.sleep(0)
        assert not glet.dead
        context = glet.gr_context
        assert context is not None and "request" in context.values()
    finally:
        event.set()
        glet.join()
    assert glet.gr_context is None


# -- the storage class: C type and pure Python behave the same --------------------


def _classes() -> list[Any]:
    from asl_gevent import _storage

    return [pytest.param(_storage.PyAsyncLocalStorage, id="python"),
            pytest.param(asl_gevent.AsyncLocalStorage, id="in-use")]


def test_storage_class_matches_what_runs() -> None:
    """With SPEEDUPS the storage class is the C type (get_store a C method
    found on the class); without, the pure-Python class (get_store a slot)."""
    from asl_gevent import _storage

    cls = asl_gevent.AsyncLocalStorage
    kind = type(vars(cls)["get_store"]).__name__
    if asl_gevent.SPEEDUPS:
        assert cls is not _storage.PyAsyncLocalStorage
        assert (kind, type(vars(cls)["getStore"]).__name__) == ("method_descriptor",) * 2
        # __slots__ says the C type's slots (copyreg reads it): not get_store.
        assert vars(cls)["__slots__"] == (
            "_name", "_default", "_var", "__orig_class__", "__dict__", "__weakref__")
    else:
        assert cls is _storage.PyAsyncLocalStorage
        assert kind == "member_descriptor"
    assert cls.__module__ == "asl_gevent._storage" and cls.__qualname__ == "AsyncLocalStorage"
    assert cls.__mro__[1:] == _storage.PyAsyncLocalStorage.__mro__[1:]
    # One text for both: the slot's docstring is the C method's.
    doc = inspect.getdoc(vars(cls)["get_store"])
    assert doc is not None and doc.startswith("Return the current store")
    assert doc == inspect.cleandoc(_storage.PyAsyncLocalStorage.__slots__["get_store"])


def _subclass(base: Any) -> Any:
    class Shout(base):  # type: ignore[misc,valid-type]
        def get_store(self) -> Any:
            store = super().get_store()
            return None if store is None else f"{store}!"

    return Shout


@pytest.mark.parametrize("cls", _classes())
def test_storage_classes_behave_alike(cls: Any) -> None:
    """Everything a user does with a storage gives the same answers on both
    classes: stores through run/spawn/enter_with/exit/scope/disable, default,
    name, repr, attributes, weak references, generics and subclasses."""
    als = cls("alike", default="none")
    assert (als.name, als.default, repr(als)) == ("alike", "none", "<AsyncLocalStorage name='alike'>")
    assert als.get_store() == als.getStore() == "none"
    assert als.run("s", lambda: gevent.spawn(als.get_store).get(timeout=5)) == "s"
    assert als.run("s", als.exit, als.getStore) == "none"

    def entered() -> Any:
        als.enter_with("e")
        return als.get_store(), gevent.spawn(als.getStore).get(timeout=5)

    assert als.run("s", entered) == ("e", "e")
    with als.scope("w") as value:
        assert value == "w" and als.get_store() == "w"
    assert als.get_store() == "none"
    als.enter_with("kept")
    try:
        als.disable()
        assert als.get_store() == "none"
    finally:
        als.enter_with("none")
    als.extra = 1  # instances take attributes, as before
    assert vars(als) == {"extra": 1}
    assert weakref.ref(als)() is als
    assert cls.__parameters__ and cls.__orig_bases__
    typed = cls[str](name="typed")  # the alias goes to a slot: the __dict__ stays empty
    assert (typed.__orig_class__, vars(typed)) == (cls[str], {})
    shout_class = _subclass(cls)
    shout = shout_class(name="sub")
    assert shout.run("hi", shout.get_store) == shout.run("hi", shout.getStore) == "hi!"
    assert isinstance(shout, cls)
    # Subclasses with and without overrides, in a chain: each reads what its
    # nearest get_store says, through either name.
    quiet = type("Quiet", (cls,), {})(name="quiet")
    assert quiet.run("q", quiet.get_store) == quiet.run("q", quiet.getStore) == "q"
    loud = type("Loud", (shout_class,), {})(name="loud")
    assert loud.run("l", loud.get_store) == loud.run("l", loud.getStore) == "l!"
    with pytest.raises(TypeError, match="argument 'name' must be a str"):
        cls(7)

    class NoInit(cls):  # type: ignore[misc,valid-type]
        def __init__(self) -> None:  # forgets super().__init__()
            pass

    with pytest.raises(AttributeError, match="get_store"):
        NoInit().get_store()


@pytest.mark.parametrize("cls", _classes())
def test_storage_classes_keep_no_references(cls: Any) -> None:
    """Reading a store 10,000 times leaves its reference count as it was; a
    storage in a reference cycle through its own attributes is collected."""
    store = object()
    als = cls("refs")
    als.enter_with(store)
    try:
        before = sys.getrefcount(store)
        for _ in range(10_000):
            als.get_store()
            als.getStore()
        assert sys.getrefcount(store) == before
    finally:
        als.enter_with(None)
    als.me = als
    ref = weakref.ref(als)
    del als
    gc.collect()
    assert ref() is None


def test_each_subclass_gets_c_methods_made_for_it() -> None:
    """Compiled: CPython specialises a C method's call only on an instance of
    the class it was made for, so a subclass that does not override get_store
    gets its own (getStore too); one that overrides keeps its override, and
    getStore calls it. In pure Python, subclasses share the base's slots."""
    base = asl_gevent.AsyncLocalStorage
    if not asl_gevent.SPEEDUPS:
        quiet = type("Quiet", (base,), {})
        assert "get_store" not in vars(quiet) and "getStore" not in vars(quiet)
        return
    from asl_gevent import _speedups

    class Plain(base):  # type: ignore[misc,valid-type]
        pass

    class Override(Plain):
        def get_store(self) -> Any:
            return ("override", super().get_store())

    class Below(Override):
        pass

    for cls in (Plain,):
        for name in ("get_store", "getStore"):
            method = vars(cls)[name]
            assert type(method).__name__ == "method_descriptor" and method.__objclass__ is cls
    assert "get_store" not in vars(Below) and vars(Override)["getStore"].__name__ == "getStore"
    below = Below(name="below")
    assert below.run(1, below.getStore) == below.run(1, below.get_store) == ("override", 1)
    with pytest.raises(TypeError, match="must be a subclass of a storage_type"):
        _speedups.storage_methods(int)
    with pytest.raises(TypeError, match="must be a type"):
        _speedups.storage_methods(Plain(name="x"))


def _read_both_names(classes: list[Any]) -> list[Any]:
    """What ``x.get_store()`` and ``x.getStore()`` give in a run, per class."""
    seen = []
    for cls in classes:
        storage = cls(name="mro")
        seen.append((storage.run("S", storage.get_store), storage.run("S", storage.getStore)))
    return seen


def _cooperative(base: Any) -> list[Any]:
    class Library(base):  # type: ignore[misc,valid-type]  # a plain subclass (helpers only)
        def helper(self) -> str:
            return "helper"

    class Logging(base):  # type: ignore[misc,valid-type]
        def get_store(self) -> Any:
            return ("logging", super().get_store())

    class Tracing(base):  # type: ignore[misc,valid-type]
        def get_store(self) -> Any:
            return ("tracing", super().get_store())

    class Node(base):  # type: ignore[misc,valid-type]
        def getStore(self) -> Any:  # noqa: N802 - Node's name
            return ("node", self.get_store())

    class Mine(Library, Logging):
        pass

    class Chain(Logging, Library, Tracing):  # super() goes Logging -> Tracing
        pass

    class Ported(Library, Node):
        pass

    return [Library, Logging, Mine, Chain, Ported, type("Below", (Chain,), {})]


def test_subclasses_combined_read_through_the_same_overrides() -> None:
    """A class made of a plain subclass and subclasses that override
    get_store or getStore (mixins, cooperative super() chains) reads through
    the same overrides on the compiled class as in pure Python: the C method
    made for the plain subclass must not hide the others' overrides."""
    from asl_gevent import _storage

    expected = [("S", "S"), (("logging", "S"),) * 2, (("logging", "S"),) * 2,
                (("logging", ("tracing", "S")),) * 2, ("S", ("node", "S")),
                (("logging", ("tracing", "S")),) * 2]
    assert _read_both_names(_cooperative(_storage.PyAsyncLocalStorage)) == expected
    assert _read_both_names(_cooperative(asl_gevent.AsyncLocalStorage)) == expected


def _hierarchy(base: Any, shape: list[tuple[str, list[int]]]) -> list[Any]:
    """Classes made on *base* as *shape* says: (kind, indexes of the bases
    among base (0) and the classes made before)."""
    classes = [base]
    for i, (kind, parents) in enumerate(shape):
        body = {
            "plain": "    pass\n",
            "get": "    def get_store(self):\n        return (%(i)d, super().get_store())\n",
            "node": "    def getStore(self):\n        return (-%(i)d, super().getStore())\n",
            "restore": "    get_store = base.__dict__['get_store']\n",
            "restore_node": "    getStore = base.__dict__['getStore']\n",
            "slots": "    __slots__ = ()\n",
        }[kind] % {"i": i + 1}
        namespace = {"bases": tuple(classes[p] for p in parents), "base": base}
        try:
            exec(f"class C(*bases):\n{body}", namespace)  # noqa: S102 - the test's own code
        except TypeError:  # no consistent MRO: the same on both classes
            namespace["C"] = None
        classes.append(namespace["C"])
    return [cls for cls in classes[1:] if cls is not None]


def test_random_hierarchies_read_alike() -> None:
    """200 random hierarchies (diamonds, overrides of either name, plain
    subclasses between them, get_store or getStore put back, empty
    __slots__): every class reads the same through both names on the
    compiled class as on the pure-Python one."""
    import random

    from asl_gevent import _storage

    rng = random.Random(17)
    for _ in range(200):
        shape = []
        for i in range(rng.randint(2, 6)):
            parents = rng.sample(range(i + 1), rng.randint(1, min(3, i + 1)))
            kind = rng.choice(["plain", "get", "node", "restore", "restore_node", "slots"])
            shape.append((kind, parents))
        pure = _read_both_names(_hierarchy(_storage.PyAsyncLocalStorage, shape))
        assert _read_both_names(_hierarchy(asl_gevent.AsyncLocalStorage, shape)) == pure, shape


def _copies(cls: Any) -> list[Any]:
    """What copy.copy of storages keeps, and what deepcopy says."""
    import copy

    class Sub(cls):  # type: ignore[misc,valid-type]
        __slots__ = ("extra",)

    typed = cls[str](name="typed", default="d")
    sub = Sub(name="sub")
    sub.extra, sub.attr = 1, 2
    seen: list[Any] = []
    for storage in (typed, sub):
        twin = copy.copy(storage)
        seen.append((type(twin).__name__, twin.name, twin.default, vars(twin),
                     getattr(twin, "extra", None), getattr(twin, "__orig_class__", None),
                     storage.run("s", twin.get_store), twin.run("t", storage.getStore)))
        twin.disable()  # a new variable for the copy only
        seen.append(storage.run("u", lambda: (storage.get_store(), twin.get_store())))
        with pytest.raises(TypeError, match="cannot pickle '_contextvars.ContextVar' object"):
            copy.deepcopy(storage)
    return seen


@pytest.mark.parametrize("cls", _classes())
def test_storage_classes_copy_alike(cls: Any) -> None:
    """copy.copy(als) gives a storage sharing the variable (it reads the same
    stores until either is disabled) on both classes; deepcopy refuses the
    variable on both. The C type refused copy.copy (and deepcopy and pickle
    said the type, not the variable): copyreg did not know its slots."""
    assert _copies(cls) == [
        ("AsyncLocalStorage", "typed", "d", {}, None, cls[str], "s", "t"), ("u", "d"),
        ("Sub", "sub", None, {"attr": 2}, 1, None, "s", "t"), ("u", None)]


@pytest.mark.parametrize("cls", _classes())
def test_storage_classes_refuse_the_same_unset_attributes(cls: Any) -> None:
    """On an instance whose __init__ did not run, ``default``, get_store()
    and getStore() raise AttributeError naming the attribute on both classes
    (the C type said None, and get_store for both); ``__weakref__`` is there
    on both."""
    bare = cls.__new__(cls)
    with pytest.raises(AttributeError, match="_default"):
        bare.default
    for name in ("get_store", "getStore"):  # the C type said get_store for both
        with pytest.raises(AttributeError, match=f"no attribute '{name}'"):
            getattr(bare, name)()
    storage = cls(name="weak")
    assert "__weakref__" in dir(storage)
    ref = weakref.ref(storage)
    assert storage.__weakref__ is ref or ref in weakref.getweakrefs(storage)


@pytest.mark.parametrize("cls", _classes())
def test_subclasses_made_at_run_time_are_collected(cls: Any) -> None:
    """Subclasses (plain, overriding, combined) made and dropped leave
    nothing alive: no registry of the methods made for them holds them."""
    refs = []
    for _ in range(50):
        made = _cooperative(cls)
        refs.extend(weakref.ref(klass) for klass in made)
        assert _read_both_names(made)[2] == (("logging", "S"),) * 2
    del made
    gc.collect()
    assert [ref() for ref in refs if ref() is not None] == []


@needs_build
@pytest.mark.parametrize("bases", ["()", "(int,)", "(str,)", "(dict,)", "(BaseException,)",
                                   "(type,)", "(1,)", "(type('WithDict', (), {}),)"])
def test_storage_type_refuses_bases_with_fields(bases: str) -> None:
    """_speedups.storage_type() lays StorageObject over its bases' instance
    fields: a base with any (int, dict, BaseException...) crashed the
    interpreter when an instance was made; no base was a SystemError."""
    proc = run_python(f"""
from asl_gevent import _speedups
try:
    cls = _speedups.storage_type({bases}, "get", "getStore")
except TypeError as exc:
    print("refused:", exc)
else:
    obj = cls.__new__(cls) if cls.__base__ is object else cls.__new__(cls, 5)
    obj._var = None
    print("made", cls.__mro__)
""")
    assert proc.stdout.startswith("refused: storage_type() bases must be classes that add no "
                                  "instance fields (typing.Generic), not "), proc.stdout


@pytest.mark.parametrize("cls", _classes())
def test_patching_get_store_on_a_storage_or_its_class(cls: Any) -> None:
    """mock.patch.object on a storage, or on its own class, reads the mock
    and then the store again on both classes. On the base class, the patch
    reaches a subclass's instances in pure Python only: the compiled
    subclass has C methods of its own (docs/performance.rst)."""
    from unittest import mock

    class Requests(cls):  # type: ignore[misc,valid-type]
        pass

    seen = []
    for storage in (cls(name="plain"), Requests(name="sub")):
        for target in (storage, type(storage), cls):
            with mock.patch.object(target, "get_store", return_value="mocked"):
                seen.append(storage.get_store())
            seen.append(storage.run("s", storage.get_store))
    compiled = asl_gevent.SPEEDUPS and cls is asl_gevent.AsyncLocalStorage
    # The subclass's storage, the base class patched: outside a run, no store.
    assert seen == ["mocked", "s"] * 5 + [None if compiled else "mocked", "s"]


@pytest.mark.parametrize("cls", _classes())
@pytest.mark.parametrize("name", ["get_store", "getStore"])
def test_a_storage_made_while_its_class_is_patched_reads_its_stores(cls: Any, name: str) -> None:
    """A storage made while a test has get_store (or getStore) patched on its
    class reads through the patch meanwhile and reads its stores after it, on
    both classes. Pure Python took the slots from the class ``__dict__`` at
    construction, and the patched one made the storage unreadable for good."""
    from unittest import mock

    with mock.patch.object(cls, name, return_value="mocked"):
        made = cls(name="made-while-patched")
        assert getattr(made, name)() == "mocked"
    assert made.run("s", made.get_store) == made.run("s", made.getStore) == "s"
    assert made.get_store() is None and made.getStore() is None


@pytest.mark.parametrize("link", ["default", "__orig_class__"])
def test_a_long_chain_of_storages_is_freed(link: str) -> None:
    """300,000 storages, each the default (or __orig_class__) of the next:
    dropping the last frees them all, on both classes. The C type's dealloc
    had no trashcan: a C stack frame per link, and the interpreter crashed."""
    proc = run_python(f"""
import asl_gevent
from asl_gevent import _storage
for cls in (_storage.PyAsyncLocalStorage, asl_gevent.AsyncLocalStorage):
    last = None
    for i in range(300_000):  # the plain class: a subclass's dealloc has a trashcan
        if {link!r} == "default":
            last = cls(default=last)
        else:
            storage = cls()
            storage.__orig_class__ = last
            last = storage
    storage = None
    del last
print("freed")
""")
    assert proc.stdout.strip() == "freed"


@pytest.mark.parametrize("cls", _classes())
def test_a_subclass_with_its_own_var_slot_reads_alike(cls: Any) -> None:
    """A subclass that lists _var in its __slots__ again (as subclasses
    copying their base's slots do) reads its stores on both classes: the
    compiled get_store read the base's _var slot, which stayed empty."""
    class Again(cls):  # type: ignore[misc,valid-type]
        __slots__ = ("_var",)

    storage = Again(name="again")
    assert storage.run("s", storage.get_store) == storage.run("s", storage.getStore) == "s"
    storage.enter_with("kept")
    storage.disable()
    assert (storage.get_store(), storage.run("t", storage.getStore)) == (None, "t")
