"""Bad input: a clear built-in error at the call site, and nothing changed.

Every public call, given wrong arguments or used the wrong way, raises a
``TypeError`` or ``RuntimeError`` right where it is called (not later, in
another greenlet) with a message that names the call and the fix. Before and
after the failed call, every store is the same: this storage's, another
storage's and another context variable's, here and in greenlets spawned
afterwards. The table below is the one in the README.
"""

from __future__ import annotations

import asyncio
import io
import re
from contextvars import ContextVar
from typing import Any, Callable, Iterator, NamedTuple, Optional

import gevent
import gevent.event
import pytest

from asl_gevent import AsyncLocalStorage, AsyncResource, install, is_installed, uninstall
from helpers import hub_exception_stream

OTHER: AsyncLocalStorage[str] = AsyncLocalStorage(name="bad-input-other")
VAR: ContextVar[str] = ContextVar("bad_input_var", default="var-unset")

ALS = AsyncLocalStorage[Any]
Call = Callable[[], Any]


def handler() -> str:
    return "handled"


def _not_callable(where: str, got: str) -> str:
    return (rf"^{re.escape(where)} argument 'fn' must be callable, not '{got}'; "
            r"pass the function itself \(handler\), not its result \(handler\(\)\)$")


class Case(NamedTuple):
    """One row: set up, then the bad call; what it raises; how to clean up."""

    prepare: Callable[[ALS], tuple[Call, Optional[Call]]]
    error: type[BaseException]
    match: str


def plain(call: Callable[[ALS], Any]) -> Callable[[ALS], tuple[Call, Optional[Call]]]:
    return lambda als: ((lambda: call(als)), None)


def _scope_entered_twice(als: ALS) -> tuple[Call, Call]:
    scope = als.scope("scoped")
    scope.__enter__()
    return scope.__enter__, lambda: scope.__exit__(None, None, None)


def _scope_exited_twice(als: ALS) -> tuple[Call, None]:
    scope = als.scope("scoped")
    with scope:
        pass
    return (lambda: scope.__exit__(None, None, None)), None


def _scope_never_entered(als: ALS) -> tuple[Call, None]:
    return (lambda: als.scope("scoped").__exit__(None, None, None)), None


def _scope_exited_in_another_greenlet(als: ALS) -> tuple[Call, Call]:
    scope = als.scope("scoped")
    scope.__enter__()

    def elsewhere() -> None:
        """Exit from another greenlet; that greenlet's stores must not move either."""
        before = snapshot_state()
        try:
            scope.__exit__(None, None, None)
        finally:
            assert snapshot_state() == before

    return (lambda: gevent.spawn(elsewhere).get(timeout=5)), lambda: scope.__exit__(None, None, None)


def _scope_exited_outside_its_run(als: ALS) -> tuple[Call, None]:
    scope = als.scope("scoped")
    als.run("run-store", scope.__enter__)  # entered in run()'s copy of the context
    return (lambda: scope.__exit__(None, None, None)), None


NOT_CALLABLE = "pass the function itself"

CASES: dict[str, Case] = {
    # -- AsyncLocalStorage() ----------------------------------------------------------
    "AsyncLocalStorage(name=3)": Case(
        plain(lambda als: AsyncLocalStorage(name=3)),  # type: ignore[arg-type]
        TypeError, r"^AsyncLocalStorage\(\) argument 'name' must be a str, not 'int'; "
                   r"e\.g\. AsyncLocalStorage\(name='request'\)$"),
    "AsyncLocalStorage(None)": Case(
        plain(lambda als: AsyncLocalStorage(None)),  # type: ignore[arg-type]
        TypeError, r"^AsyncLocalStorage\(\) argument 'name' must be a str, not 'NoneType'"),
    "AsyncLocalStorage('a', 'b')": Case(
        plain(lambda als: AsyncLocalStorage("a", "b")),  # type: ignore[call-arg]
        TypeError, r"^AsyncLocalStorage\.__init__\(\) takes from 1 to 2 positional "
                   r"arguments but 3 were given$"),
    "AsyncLocalStorage(defaultValue=1)": Case(
        plain(lambda als: AsyncLocalStorage(defaultValue=1)),  # type: ignore[call-arg]
        TypeError, r"^AsyncLocalStorage\.__init__\(\) got an unexpected keyword argument "
                   r"'defaultValue'$"),
    # -- run / exit / enter_with / scope / disable --------------------------------------
    "als.run(store, 42)": Case(
        plain(lambda als: als.run("s", 42)), TypeError,  # type: ignore[arg-type]
        _not_callable("AsyncLocalStorage.run()", "int")),
    "als.run(store, handler())": Case(
        plain(lambda als: als.run("s", None)), TypeError,  # type: ignore[arg-type]
        _not_callable("AsyncLocalStorage.run()", "NoneType")),
    "als.run()": Case(
        plain(lambda als: als.run()), TypeError,  # type: ignore[call-arg]
        r"^AsyncLocalStorage\.run\(\) missing 2 required positional arguments: "
        r"'store' and 'fn'$"),
    "als.run(store)": Case(
        plain(lambda als: als.run("s")), TypeError,  # type: ignore[call-arg]
        r"^AsyncLocalStorage\.run\(\) missing 1 required positional argument: 'fn'$"),
    "als.run(store=s, fn=f)": Case(
        plain(lambda als: als.run(store="s", fn=handler)), TypeError,  # type: ignore[call-arg]
        r"^AsyncLocalStorage\.run\(\) missing 2 required positional arguments: "
        r"'store' and 'fn'$"),
    "als.exit(None)": Case(
        plain(lambda als: als.exit(None)), TypeError,  # type: ignore[arg-type]
        _not_callable("AsyncLocalStorage.exit()", "NoneType")),
    "als.exit()": Case(
        plain(lambda als: als.exit()), TypeError,  # type: ignore[call-arg]
        r"^AsyncLocalStorage\.exit\(\) missing 1 required positional argument: 'fn'$"),
    "als.enter_with()": Case(
        plain(lambda als: als.enter_with()), TypeError,  # type: ignore[call-arg]
        r"^AsyncLocalStorage\.enter_with\(\) missing 1 required positional argument: "
        r"'store'$"),
    "als.scope()": Case(
        plain(lambda als: als.scope()), TypeError,  # type: ignore[call-arg]
        r"^AsyncLocalStorage\.scope\(\) missing 1 required positional argument: 'store'$"),
    "als.disable(store)": Case(
        plain(lambda als: als.disable("s")), TypeError,  # type: ignore[call-arg]
        r"^AsyncLocalStorage\.disable\(\) takes 1 positional argument but 2 were given$"),
    # -- bind / snapshot ----------------------------------------------------------------
    "AsyncLocalStorage.bind(None)": Case(
        plain(lambda als: AsyncLocalStorage.bind(None)), TypeError,  # type: ignore[arg-type]
        _not_callable("AsyncLocalStorage.bind()", "NoneType")),
    "als.bind(3)": Case(
        plain(lambda als: als.bind(3)), TypeError,  # type: ignore[arg-type]
        _not_callable("AsyncLocalStorage.bind()", "int")),
    "AsyncLocalStorage.bind()": Case(
        plain(lambda als: AsyncLocalStorage.bind()), TypeError,  # type: ignore[call-arg]
        r"^bind\(\) missing 1 required positional argument: 'fn'$"),
    "AsyncLocalStorage.snapshot(fn)": Case(
        plain(lambda als: AsyncLocalStorage.snapshot(handler)), TypeError,  # type: ignore[call-arg]
        r"^snapshot\(\) takes 0 positional arguments but 1 was given$"),
    "snapshot runner(1)": Case(
        plain(lambda als: AsyncLocalStorage.snapshot()(1)), TypeError,
        _not_callable("AsyncLocalStorage.snapshot() runner", "int")),
    "snapshot runner()": Case(
        plain(lambda als: AsyncLocalStorage.snapshot()()), TypeError,
        r"^snapshot\.<locals>\.runner\(\) missing 1 required positional argument: 'fn'$"),
    # -- AsyncResource ------------------------------------------------------------------
    "AsyncResource(3)": Case(
        plain(lambda als: AsyncResource(3)), TypeError,  # type: ignore[arg-type]
        r"^AsyncResource\(\) argument 'type' must be a str naming the resource, not 'int'; "
        r"e\.g\. AsyncResource\('DBQuery'\)$"),
    "AsyncResource()": Case(
        plain(lambda als: AsyncResource()), TypeError,  # type: ignore[call-arg]
        r"^AsyncResource\.__init__\(\) missing 1 required positional argument: 'type'$"),
    "AsyncResource('x', triggerAsyncId=1)": Case(
        plain(lambda als: AsyncResource("x", triggerAsyncId=1)), TypeError,
        r"^AsyncResource\(\) got unexpected keyword argument\(s\) \['triggerAsyncId'\]; "
        r"it takes the type and Node's options trigger_async_id and require_manual_destroy "
        r"\(accepted for porting, ignored\)$"),
    "AsyncResource('x').run_in_async_scope(1)": Case(
        plain(lambda als: AsyncResource("x").run_in_async_scope(1)), TypeError,  # type: ignore[arg-type]
        _not_callable("AsyncResource.run_in_async_scope()", "int")),
    "AsyncResource('x').runInAsyncScope(None)": Case(
        plain(lambda als: AsyncResource("x").runInAsyncScope(None)), TypeError,  # type: ignore[arg-type]
        _not_callable("AsyncResource.run_in_async_scope()", "NoneType")),
    "AsyncResource('x').run_in_async_scope()": Case(
        plain(lambda als: AsyncResource("x").run_in_async_scope()), TypeError,  # type: ignore[call-arg]
        r"^AsyncResource\.run_in_async_scope\(\) missing 1 required positional argument: "
        r"'fn'$"),
    "AsyncResource.bind(None)": Case(
        plain(lambda als: AsyncResource.bind(None)), TypeError,
        _not_callable("AsyncResource.bind()", "NoneType")),
    "AsyncResource('x').bind(None)": Case(
        plain(lambda als: AsyncResource("x").bind(None)), TypeError,
        _not_callable("AsyncResource.bind()", "NoneType")),
    "AsyncResource.bind(fn, type=3)": Case(
        plain(lambda als: AsyncResource.bind(handler, type=3)), TypeError,
        r"^AsyncResource\(\) argument 'type' must be a str naming the resource, not 'int'"),
    # -- install -----------------------------------------------------------------------
    "install(True)": Case(
        plain(lambda als: install(True)), TypeError,  # type: ignore[call-arg]
        r"^install\(\) takes 0 positional arguments but 1 was given$"),
    # -- scope() used the wrong way -----------------------------------------------------
    "scope entered twice": Case(
        _scope_entered_twice, RuntimeError,
        r"^this scope\(\) of <AsyncLocalStorage name='bad-input'> was already entered; "
        r"call als\.scope\(store\) again for each with-block$"),
    "scope exited twice": Case(
        _scope_exited_twice, RuntimeError,
        r"^this scope\(\) of <AsyncLocalStorage name='bad-input'> was already exited "
        r"\(or never entered\); a scope is exited once, by the with-statement that "
        r"entered it$"),
    "scope exited, never entered": Case(
        _scope_never_entered, RuntimeError,
        r"^this scope\(\) of <AsyncLocalStorage name='bad-input'> was already exited "
        r"\(or never entered\)"),
    "scope exited in another greenlet": Case(
        _scope_exited_in_another_greenlet, RuntimeError,
        r"^scope\(\) of <AsyncLocalStorage name='bad-input'> exited in another greenlet "
        r"than the one that entered it \(<.*>\); use als\.run\(store, fn\) for work that "
        r"moves between greenlets$"),
    "scope exited outside the run() it was entered in": Case(
        _scope_exited_outside_its_run, RuntimeError,
        r"^scope\(\) of <AsyncLocalStorage name='bad-input'> exited in another context "
        r"than the one that entered it \(the block was split across Context\.run calls\); "
        r"use als\.run\(store, fn\) instead$"),
}


# -- the harness -----------------------------------------------------------------------------


_STORAGE: list[ALS] = []


def snapshot_state() -> tuple[Any, Any, Any]:
    """This greenlet's stores: the storage under test, another one, a ContextVar."""
    return _STORAGE[0].get_store(), OTHER.get_store(), VAR.get()


@pytest.fixture(name="bad")
def _bad() -> Iterator[ALS]:
    storage: ALS = AsyncLocalStorage(name="bad-input")
    _STORAGE[:] = [storage]
    try:
        yield storage
    finally:
        _STORAGE.clear()


@pytest.fixture(name="hub_stream")
def _hub_stream() -> Iterator[io.StringIO]:
    """What the hub would print about a failing greenlet."""
    with hub_exception_stream() as stream:
        yield stream


@pytest.mark.parametrize("name", list(CASES))
def test_bad_call_raises_at_call_site_and_changes_nothing(
        bad: ALS, hub_stream: io.StringIO, name: str) -> None:
    """The call raises the documented error at once; every store, here and in
    greenlets spawned afterwards, is as before; nothing fails later."""
    case = CASES[name]

    def request() -> None:
        OTHER.enter_with("other-store")
        VAR.set("var-value")
        call, cleanup = case.prepare(bad)
        before = snapshot_state()
        with pytest.raises(case.error, match=case.match):
            call()
        assert snapshot_state() == before
        assert gevent.spawn(snapshot_state).get(timeout=5) == before
        if cleanup is not None:
            cleanup()
        assert snapshot_state() == ("request-store", "other-store", "var-value")

    bad.run("request-store", request)
    for _ in range(3):
        gevent.sleep(0)  # a deferred failure would surface in the hub now
    assert snapshot_state() == (None, None, "var-unset")
    if name != "scope exited in another greenlet":
        assert hub_stream.getvalue() == ""
    assert is_installed()


def test_every_row_raises_a_builtin_error() -> None:
    """The errors are built-in types a caller already knows how to catch."""
    assert {case.error for case in CASES.values()} <= {TypeError, ValueError, RuntimeError}


def test_run_with_a_coroutine_object_names_the_mistake(bad: ALS) -> None:
    """Passing ``handler()`` (a coroutine object) instead of ``handler`` is a
    TypeError that says so; the coroutine never runs in any store."""
    ran: list[Any] = []

    async def async_handler() -> None:
        ran.append(bad.get_store())

    coro = async_handler()
    try:
        with pytest.raises(TypeError, match=_not_callable("AsyncLocalStorage.run()", "coroutine")):
            bad.run("s", coro)  # type: ignore[arg-type]
    finally:
        coro.close()
    assert ran == []


def test_awaiting_run_result_twice_is_refused(bad: ALS) -> None:
    """The coroutine ``run`` returns for an async handler is awaited once,
    like any coroutine; a second await raises and changes nothing."""
    async def async_handler() -> Any:
        await asyncio.sleep(0)
        return bad.get_store()

    async def main() -> tuple[Any, Any]:
        awaitable = bad.run("async-store", async_handler)
        first = await awaitable
        with pytest.raises(RuntimeError, match=r"^cannot reuse already awaited coroutine$"):
            await awaitable
        return first, bad.get_store()

    assert asyncio.run(main()) == ("async-store", None)


def test_install_uninstall_repeat_calls_never_fail() -> None:
    """install()/uninstall() are idempotent: repeats are no-ops, not errors."""
    uninstall()
    uninstall()
    assert not is_installed()
    install()
    install()
    assert is_installed()


def readme_table() -> str:
    """The README table of bad calls (printed by ``python -m test_bad_input``)."""
    rows = ["| call | error | message |", "|---|---|---|"]
    for name, case in CASES.items():
        message = case.match.strip("^$").replace("\\", "").replace("|", "\\|")
        rows.append(f"| `{name}` | `{case.error.__name__}` | {message} |")
    return "\n".join(rows)


if __name__ == "__main__":  # pragma: no cover - documentation helper
    print(readme_table())


def test_enter_with_in_the_hub_reaches_no_greenlet(bad: ALS) -> None:
    """Misuse: enter_with() in code the hub runs for itself (a loop callback)
    sets the store in the hub's own context; greenlets the hub spawns later
    still start empty, and requests never see it."""
    hub = gevent.get_hub()
    spawned: gevent.event.AsyncResult = gevent.event.AsyncResult()
    hub.loop.run_callback(bad.enter_with, "set-in-hub")
    hub.loop.run_callback(lambda: gevent.spawn(lambda: spawned.set(snapshot_state())))
    assert spawned.get(timeout=5) == (None, None, "var-unset")
    assert bad.run("request", lambda: gevent.spawn(snapshot_state).get(timeout=5)) == \
        ("request", None, "var-unset")
    assert gevent.spawn(snapshot_state).get(timeout=5) == (None, None, "var-unset")
