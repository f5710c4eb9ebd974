"""``AsyncResource``: a context captured once, entered many times.

Node's ``AsyncResource`` lets a library that queues callbacks itself (a
connection pool, an event emitter) run each callback in the context of the
code that queued it:

>>> from asl_gevent import AsyncLocalStorage, AsyncResource
>>> als = AsyncLocalStorage()
>>> res = als.run("request-1", AsyncResource, "DBQuery")
>>> res.run_in_async_scope(als.get_store)
'request-1'
>>> print(als.get_store())
None
"""

from __future__ import annotations

import builtins
from typing import Any, Callable, TypeVar

from ._context import bound_to, call_in, check_callable
from ._paths import capture_context

R = TypeVar("R")

__all__ = ["AsyncResource"]


class _bind_method:
    """``bind`` that works on the class (Node's static form) and on instances."""

    def __get__(self, instance: AsyncResource | None, owner: type) -> Callable[..., Any]:
        if instance is None:
            return owner._static_bind  # type: ignore[attr-defined,no-any-return]
        return instance._bind


class AsyncResource:
    """Capture the current context now; run functions in it later.

    :param type: what the resource is, e.g. ``"DBQuery"`` (Node's ``type``).

    Each :meth:`run_in_async_scope` call enters its own copy of the captured
    context, so calls may overlap (from several greenlets or threads) and
    what one call changes never reaches the next.

    :param options: Node's ``trigger_async_id`` and ``require_manual_destroy``,
        accepted so that ported code runs, and ignored.
    :raises TypeError: if *type* is not a str, or for any other keyword.

    .. versionadded:: 0.1
    """

    __slots__ = ("type", "_context")

    def __init__(self, type: str, **options: Any) -> None:  # noqa: A002 - Node's name
        if not isinstance(type, str):
            raise TypeError(
                "AsyncResource() argument 'type' must be a str naming the resource, "
                f"not {builtins.type(type).__name__!r}; e.g. AsyncResource('DBQuery')"
            )
        unknown = set(options) - {"trigger_async_id", "require_manual_destroy"}
        if unknown:
            raise TypeError(
                f"AsyncResource() got unexpected keyword argument(s) {sorted(unknown)}; "
                "it takes the type and Node's options trigger_async_id and "
                "require_manual_destroy (accepted for porting, ignored)"
            )
        self.type = type
        self._context = capture_context()

    def run_in_async_scope(self, fn: Callable[..., R], /, *args: Any, **kwargs: Any) -> R:
        """Call ``fn(*args, **kwargs)`` in a copy of the captured context.

        :param fn: the callable to run; *args* and *kwargs* are passed to it.
        :raises TypeError: if *fn* is not callable.
        """
        check_callable(fn, "AsyncResource.run_in_async_scope()")
        return call_in(self._context.copy(), fn, args, kwargs)

    runInAsyncScope = run_in_async_scope  # noqa: N815 - Node's name

    def _bind(self, fn: Callable[..., R]) -> Callable[..., R]:
        check_callable(fn, "AsyncResource.bind()")
        bound = bound_to(self._context, fn)
        bound.asyncResource = self  # type: ignore[attr-defined]  # as in Node
        return bound

    @classmethod
    def _static_bind(cls, fn: Callable[..., R], type: str | None = None) -> Callable[..., R]:  # noqa: A002
        check_callable(fn, "AsyncResource.bind()")
        name = type if type is not None else getattr(fn, "__name__", "bound-anonymous-fn")
        return cls(name)._bind(fn)

    #: ``res.bind(fn)``: *fn* bound to this resource's context.
    #: ``AsyncResource.bind(fn, type=None)``: the same with a new resource.
    #:
    #: :raises TypeError: if *fn* is not callable.
    bind = _bind_method()

    def __repr__(self) -> str:
        return f"<AsyncResource type={self.type!r}>"

