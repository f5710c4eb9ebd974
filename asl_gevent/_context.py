"""Running a callable inside a :class:`contextvars.Context`, coroutines included.

Everything in this package that "runs *fn* in a context" comes here, so that
``run``, ``exit``, ``bind``, ``snapshot`` and ``AsyncResource`` agree on two
rules:

* A context is entered with :meth:`contextvars.Context.run`, never with a
  ``token``/``reset`` pair: a reset that happens in another greenlet fails with
  "Token was created in a different Context" (gevent#1930).
* If *fn* returns a coroutine, its body has not run yet. We hand back a
  coroutine that steps the coroutine inside the same context, so that
  ``await als.run(store, handler)`` sees *store* across every ``await``, as in
  Node.
"""

from __future__ import annotations

import functools
from contextvars import Context
from types import CoroutineType
from typing import Any, Callable, Coroutine, Generator, TypeVar

R = TypeVar("R")


def check_callable(fn: object, where: str) -> None:
    """Raise :class:`TypeError` naming *where* unless *fn* is callable."""
    if not callable(fn):
        raise TypeError(
            f"{where} argument 'fn' must be callable, not {type(fn).__name__!r}; "
            "pass the function itself (handler), not its result (handler())"
        )


def call_in(context: Context, fn: Callable[..., R], args: tuple[Any, ...],
            kwargs: dict[str, Any]) -> R:
    """Call ``fn(*args, **kwargs)`` inside *context* (which must not be entered)."""
    result = context.run(fn, *args, **kwargs)
    if type(result) is CoroutineType:
        return in_context(context, result)  # type: ignore[arg-type,return-value]
    return result


def bound_to(context: Context, fn: Callable[..., R]) -> Callable[..., R]:
    """*fn* bound to *context*: every call runs in its own copy of it.

    A copy per call lets the result be called many times, re-entrantly, and
    from several greenlets or threads at once (a Context cannot be entered
    twice at once), and drops whatever one call set before the next.
    """
    def bound(*args: Any, **kwargs: Any) -> R:
        return call_in(context.copy(), fn, args, kwargs)

    return functools.update_wrapper(bound, fn)


async def in_context(context: Context, coro: Coroutine[Any, Any, R]) -> R:
    """A coroutine that runs *coro*'s body, step by step, inside *context*.

    *coro* was created inside *context*, but its body only runs when it is
    awaited, in the awaiting task's context. This does for *context* what
    :class:`asyncio.Task` does for a task's own: every ``send`` and ``throw``
    enters it with :meth:`~contextvars.Context.run`. It is a real coroutine,
    so ``asyncio.create_task(als.run(store, handler))`` works too.
    """
    result: R = await _Steps(context, coro)
    return result


class _Steps:
    __slots__ = ("_context", "_coro")

    def __init__(self, context: Context, coro: Coroutine[Any, Any, Any]) -> None:
        self._context = context
        self._coro = coro

    def __await__(self) -> Generator[Any, Any, Any]:
        run = self._context.run
        coro = self._coro
        send, throw = coro.send, coro.throw
        value: Any = None
        error: BaseException | None = None
        while True:
            try:
                if error is None:
                    yielded = run(send, value)
                else:
                    yielded = run(throw, error)
            except StopIteration as stop:
                return stop.value
            value, error = None, None
            try:
                value = yield yielded
            except GeneratorExit:
                run(coro.close)
                raise
            except BaseException as exc:  # cancellation and thrown errors go to the body
                error = exc
