"""Django: request ids for requests that never reach the WSGI application.

In production, wrap Django's WSGI application in
:class:`asl_gevent.wsgi.RequestContextMiddleware` (``mysite/wsgi.py``): the
request's store is then current for everything Django does with the request,
its ``request_started`` and ``request_finished`` signals included.

Django's test ``Client`` (``django.test.Client``) does not call that application:
it drives Django's handler directly, so a test suite would see no id at all.
:class:`RequestIdMiddleware`, listed in ``MIDDLEWARE``, gives those requests
their id, as django-guid's middleware does::

    MIDDLEWARE = [
        "asl_gevent.django.RequestIdMiddleware",  # first: every other middleware sees the id
        ...
    ]

Under the wrapped WSGI application it finds the request's store already
current and does nothing, so the two never make two ids for one request.

This module does not import Django.

.. versionadded:: 0.3
"""

from __future__ import annotations

from typing import Any, Callable, Dict

from ._storage import AsyncLocalStorage
from ._ids import HEADER_NAME_RE as _HEADER_NAME_RE
from .wsgi import ENVIRON_KEY, request_id_from, request_storage

__all__ = ["RequestIdMiddleware"]


class RequestIdMiddleware:
    """A Django middleware that runs the request with a store ``{"request_id": ...}``.

    :param get_response: the next middleware or view, as Django passes it.

    If a store is already current in :attr:`storage` (the request came
    through :class:`asl_gevent.wsgi.RequestContextMiddleware`, or a test set
    one around its ``client.get(...)``), the request runs with that store and
    the response is left alone. Otherwise the id comes from the
    :attr:`header` request header when it passes the id rules of
    :func:`asl_gevent.wsgi.request_id_from`, and is generated when not; the
    rest of the middleware chain, the view and every greenlet they spawn run
    with the store (in a copy of the context, so nothing is left behind), and
    the response echoes the id in :attr:`header` unless the view set that
    header itself. The id is also put in ``request.META["asl_gevent.request_id"]``.

    What runs outside the middleware chain sees no id from this middleware:
    Django's ``request_started`` and ``request_finished`` signal handlers, its
    ``Not Found`` log line on ``django.request``, and the iteration of a
    streaming response. Wrap the WSGI application to cover those as well.

    Configure it by subclassing: :attr:`header`, :attr:`storage` and
    :attr:`echo_header` are class attributes. It is a synchronous middleware
    (gevent serves WSGI); under ASGI, Django adapts it.

    :raises TypeError: if *get_response* is not callable, :attr:`header` is not
        a str, :attr:`storage` not an :class:`~asl_gevent.AsyncLocalStorage` or
        :attr:`echo_header` not a bool.
    :raises ValueError: if :attr:`header` is not a valid header name.

    .. versionadded:: 0.3
    """

    #: The request header that carries an incoming id, and the response
    #: header that echoes it.
    header: str = "X-Request-ID"
    #: The storage that holds the store; the one
    #: :func:`asl_gevent.wsgi.get_request_id` and
    #: :class:`asl_gevent.logfilter.StoreFilter` read by default.
    storage: AsyncLocalStorage[Any] = request_storage
    #: Add the id to the response headers.
    echo_header: bool = True

    sync_capable = True
    async_capable = False

    def __init__(self, get_response: Callable[[Any], Any]) -> None:
        name = type(self).__name__
        if not callable(get_response):
            raise TypeError(f"{name}() argument 'get_response' must be callable, not "
                            f"{type(get_response).__name__!r}; list the middleware in "
                            f"MIDDLEWARE and let Django make it")
        if not isinstance(self.header, str):
            raise TypeError(f"{name}.header must be a str, not "
                            f"{type(self.header).__name__!r}; e.g. header = 'X-Request-ID'")
        if _HEADER_NAME_RE.fullmatch(self.header) is None:
            raise ValueError(f"{name}.header must be an HTTP header name (letters, digits, "
                             f"'-'), not {self.header!r}; e.g. header = 'X-Request-ID'")
        if not isinstance(self.storage, AsyncLocalStorage):
            raise TypeError(f"{name}.storage must be an AsyncLocalStorage, not "
                            f"{type(self.storage).__name__!r}")
        if not isinstance(self.echo_header, bool):
            raise TypeError(f"{name}.echo_header must be a bool, not "
                            f"{type(self.echo_header).__name__!r}; e.g. echo_header = False")
        self.get_response = get_response

    def __repr__(self) -> str:
        return (f"<{type(self).__name__} storage={self.storage!r} "
                f"header={self.header!r}>")

    def __call__(self, request: Any) -> Any:
        """Run the rest of the chain with the request's store; return its response."""
        if self.storage.get_store() is not None:
            return self.get_response(request)
        meta: Dict[str, Any] = request.META
        request_id = request_id_from(meta, self.header)
        meta[ENVIRON_KEY] = request_id
        response = self.storage.run({"request_id": request_id}, self.get_response, request)
        if self.echo_header and not response.has_header(self.header):
            response[self.header] = request_id
        return response
