"""WSGI middleware: one fresh store per request, current until ``close()``.

:class:`RequestContextMiddleware` runs every request in a fresh
:class:`contextvars.Context` holding a fresh store, ``{"request_id": ...}``
by default. The id comes from the ``X-Request-ID`` request header when that is
well formed, and is generated (``uuid4().hex``) otherwise; the response echoes
it. The store stays current while the app runs, while the server consumes the
response iterable and while it calls the iterable's ``close()``, so code in a
streaming generator, its ``finally`` blocks and everything they spawn see the
request's store:

>>> import gevent
>>> from asl_gevent.wsgi import RequestContextMiddleware, get_request_id
>>> def app(environ, start_response):
...     start_response("200 OK", [("Content-Type", "text/plain")])
...     yield gevent.spawn(get_request_id).get().encode()
>>> wrapped = RequestContextMiddleware(app)
>>> environ = {"HTTP_X_REQUEST_ID": "req-42"}
>>> body = wrapped(environ, lambda status, headers, exc_info=None: print(headers))
>>> b"".join(body)
[('Content-Type', 'text/plain'), ('X-Request-ID', 'req-42')]
b'req-42'
>>> print(get_request_id())
None

Which incoming ids are adopted is a policy the application can set
(``validator=``, ``generator=``, ``trust=``); an id from a client that is not
trusted is kept aside as ``client_request_id``, never used as the request's
id. The ``baggage`` header is client input: see ``docs/security/incoming.rst``.

Every step enters the request's context with :meth:`contextvars.Context.run`
(never a ``token``/``reset`` pair, gevent#1930), so the middleware is correct
under any server, hooks or not: on a keep-alive connection request 2 never
sees what request 1 set, even with ``enter_with`` or after it raised.

.. versionadded:: 0.1
.. versionchanged:: 0.3 the id policy; checked, bounded baggage.
"""

from __future__ import annotations

import logging
from contextvars import Context, ContextVar, copy_context
from functools import partial
from typing import (Any, Callable, Dict, Iterable, Iterator, List, Mapping,
                    Optional, Sequence, Tuple, TypeVar)

from . import _ids
from ._storage import AsyncLocalStorage
from ._watch import LeakWatch, leak_watch_delay

__all__ = ["RequestContextMiddleware", "request_storage", "get_request_id", "request_id_from",
           "ENVIRON_KEY", "CLIENT_ENVIRON_KEY"]

_log = logging.getLogger(__name__)

R = TypeVar("R")

#: The storage :class:`RequestContextMiddleware` uses unless given another, and
#: the one :func:`get_request_id` and :class:`asl_gevent.logfilter.StoreFilter`
#: read by default.
#:
#: .. versionadded:: 0.1
request_storage: AsyncLocalStorage[Dict[str, Any]] = AsyncLocalStorage(name="request")

#: The WSGI environ key under which :class:`RequestContextMiddleware` leaves
#: the request's id (``%({asl_gevent.request_id}e)s`` in gunicorn's
#: ``access_log_format``).
#:
#: .. versionadded:: 0.2
ENVIRON_KEY = "asl_gevent.request_id"

#: The WSGI environ key under which :class:`RequestContextMiddleware` leaves
#: an id the client sent but that was not adopted (untrusted client, or
#: refused by the validator), so access logs can show it.
#:
#: .. versionadded:: 0.3
CLIENT_ENVIRON_KEY = "asl_gevent.client_request_id"

# The id rules live in _ids.py, which asl_gevent.http, celery and django ask
# directly; kept here under their 0.2 names for code that imported them.
_ID_RE = _ids.ID_RE
_HEADER_NAME_RE = _ids.HEADER_NAME_RE
_id_of = _ids.id_of
_new_id = _ids.generate

# Set to True by asl_gevent.gunicorn.GeventWorker in each connection's
# greenlet (once per connection: a ContextVar.set costs ~1k instructions).
# The worker runs every request in a fresh copy of that context, and runs the
# app, consumes the response and calls close() in it; so a middleware that
# sees the mark AND finds its storage still unset is the first to serve this
# request, and sets its store right there instead of making (and stepping
# into) a second copy. A middleware nested in another with the same storage,
# or called from a greenlet the request spawned, finds the store set and makes
# its own copy as before.
_FRESH_CONTEXT: ContextVar[bool] = ContextVar("asl_gevent.wsgi.fresh_context", default=False)
_UNSET = object()

# gunicorn's Response class, filled in by asl_gevent.gunicorn (this module
# never imports gunicorn). Under GeventWorker the echoed header is added to
# that response's header list once the app has called start_response, instead
# of wrapping start_response: gunicorn charges ~10.5k instructions per
# request for one more header passed through start_response (its checks and
# bookkeeping; tools/request_cost.py "stock+header"), and our wrapper ~4k
# more. Our id needs none of those checks: it is 1-128 safe characters.
_GUNICORN_RESPONSE: List[Any] = [None]
_set_var = ContextVar.set
_id_match = _ids.ID_RE.fullmatch

# Set in a request's context only by a middleware with a non-default storage
# or header (the default costs nothing), so that asl_gevent.http sends the id
# in the header this service's middleware reads, from the storage it fills.
_OUTGOING: ContextVar[Tuple[AsyncLocalStorage[Any], str]] = ContextVar(
    "asl_gevent.wsgi.outgoing")

Headers = List[Tuple[str, str]]
StartResponse = Callable[..., Any]
WSGIApp = Callable[[Dict[str, Any], StartResponse], Iterable[bytes]]


def get_request_id() -> Optional[str]:
    """Return the current request's id, or ``None`` outside a request.

    Reads :data:`request_storage`; a store made by a ``store_factory`` counts
    if it is a mapping with a ``"request_id"`` key or has a ``request_id``
    attribute. Never raises.

    .. versionadded:: 0.1
    """
    return _id_of(request_storage.get_store())


def request_id_from(environ: Mapping[str, Any], header: str = "X-Request-ID") -> str:
    """The id for a request: *header*'s value if well formed, else a new one.

    Well formed: 1 to 128 characters from ``A-Z a-z 0-9 . _ : @ / + = -``
    (surrounding spaces and tabs are ignored). A generated id is a random
    UUID as 32 hex digits. Handy in a ``store_factory`` that wants the
    default id plus fields of its own::

        RequestContextMiddleware(app, store_factory=lambda environ: {
            "request_id": request_id_from(environ), "user": environ.get("REMOTE_USER")})

    This function applies 0.2's rules only (every client trusted); a
    middleware's own policy (``validator=``, ``generator=``, ``trust=``) is
    applied by :meth:`RequestContextMiddleware.request_id_from`.

    :param environ: the WSGI environ of the request.
    :param header: the request header that may carry the id.
    :raises TypeError: if *header* is not a str.

    .. versionadded:: 0.1
    """
    if not isinstance(header, str):
        raise TypeError(f"request_id_from() argument 'header' must be a str, not "
                        f"{type(header).__name__!r}; e.g. header='X-Request-ID'")
    # incoming_id() never returns "": an id has at least one character.
    return _ids.incoming_id(environ, _ids.environ_key(header)) or _new_id()


class RequestContextMiddleware:
    """Run each request in a fresh context with a fresh store.

    :param app: the WSGI application to wrap.
    :param storage: the :class:`~asl_gevent.AsyncLocalStorage` that holds the
        store; :data:`request_storage` by default.
    :param header: the request header that carries an incoming id, and the
        response header that echoes it. ``X-Request-ID`` by default.
    :param echo_header: add the id to the response headers (unless the app
        already set that header). A bool.
    :param store_factory: ``store_factory(environ) -> store`` makes the store
        instead of the default ``{"request_id": id}``. The store is then
        yours; if it is a mapping with a ``"request_id"`` (or an object with a
        ``request_id`` attribute) that passes the id rules, it is echoed.
    :param baggage: named storages to restore from the incoming W3C
        ``baggage`` header, as :func:`asl_gevent.http.install` sends them.
        The header is client input: the application declares each store's
        shape, never the client. An item is a storage, restored as a str
        store from the member ``name=value``, or a pair ``(storage, dict)``,
        restored as a new ``dict`` of str to str from the members
        ``name.key=value`` (``(storage, str)`` is the same as the storage
        alone). Members of the other shape, malformed members, and members
        whose decoded value holds a control character (C0, DEL, C1, U+2028,
        U+2029, a bidi control) are dropped; at most 8,192 bytes and 180 members are read,
        whatever the header's size. Storages with no member keep the store
        the request started with. The middleware's own storage (and
        :data:`request_storage`) cannot be a baggage target: the request id
        follows the id policy. Empty by default. New in 0.2.
    :param validator: ``validator(id) -> bool``: an incoming id that passes
        the character rules below is adopted only if this returns true
        (e.g. ``lambda id: len(id) == 32``). ``None`` (default): any id that
        passes the character rules.
    :param generator: ``generator() -> str`` makes the id when none is
        adopted; its result must pass the character rules, or the built-in
        generator's id is used instead (logged once). ``None`` (default):
        a random uuid4 as 32 hex digits, unique in every process model but
        not unpredictable (use ``generator=secrets.token_hex`` if it must be).
    :param trust: which clients may set the id: ``None`` (default, as in
        0.2) trusts every client; a predicate ``trust(environ) -> bool``; or
        a list of networks (``["10.0.0.0/8", "::1"]``) that ``REMOTE_ADDR``
        must be in (your proxies). An untrusted client's id, or one the
        validator refused, is not adopted: a new id is generated, and the
        client's (if it passes the character rules) is kept in the default
        store as ``"client_request_id"`` and in
        ``environ["asl_gevent.client_request_id"]``, where logs can show it.
    :param leak_watch: seconds after the end of a request at which a store it
        left in a live greenlet or patched thread is logged (see
        :mod:`asl_gevent._watch`); ``None`` (the default) reads
        ``ASL_GEVENT_LEAK_WATCH``, ``0`` or ``False`` is off, and ``True``
        means the default delay, 5 seconds. New in 0.2.

    Incoming ids are used only if they are 1 to 128 characters from
    ``A-Z a-z 0-9 . _ : @ / + = -``; anything else (too long, spaces, control
    characters, CR/LF) is replaced by a generated ``uuid4().hex`` and never
    echoed.

    The id (when there is one that passes the id rules, as for the echo) is
    also put in the WSGI environ as ``environ["asl_gevent.request_id"]``, so
    that code running outside the request's context can still log it, e.g.
    gunicorn's access log with ``%({asl_gevent.request_id}e)s`` in
    ``access_log_format``.

    The store is shared by reference between the request and the greenlets it
    spawns (as in Node); the context *binding* is per request, so nothing a
    request sets is visible to the next one on the same connection.

    A list or tuple response is returned as is (iterating it runs no app code,
    and servers use ``len()`` on it). A ``wsgi.file_wrapper`` response is
    returned as is too (the very object, whether ``wsgi.file_wrapper`` is a
    class as in gunicorn or a function as in uWSGI), so the server keeps its
    ``sendfile`` fast path; its ``close`` is rebound to run in the request's
    context where the wrapper allows it (gunicorn's and wsgiref's do). A
    result that is not iterable (gunicorn's ``ALREADY_HANDLED`` sentinel, for
    an app that took over the socket) is returned as is. Anything else is
    wrapped in an iterable that runs each ``next()`` and ``close()`` in the
    request's context.

    :raises TypeError: if *app*, *store_factory*, *validator* or
        *generator* is not callable, *storage* (or an item of *baggage*) is
        not an :class:`~asl_gevent.AsyncLocalStorage`, *header* not a str,
        or *trust* neither callable nor a list of networks.
    :raises ValueError: if *header* is not made of letters, digits and
        ``-``, a *baggage* storage's name is not a header token, a *baggage*
        item is the middleware's own storage, or *trust* holds something that
        is not an IP network.

    .. versionadded:: 0.1
    .. versionchanged:: 0.2 the *leak_watch* argument; the id is also left in
       ``environ["asl_gevent.request_id"]``.
    .. versionchanged:: 0.3 the *validator*, *generator* and *trust*
       arguments; *baggage* stores have the shape the application declares
       and never hold control characters; *header* accepts only letters,
       digits and ``-`` (as the error message always said).
    """

    def __init__(
        self,
        app: WSGIApp,
        storage: Optional[AsyncLocalStorage[Any]] = None,
        *,
        header: str = "X-Request-ID",
        echo_header: bool = True,
        store_factory: Optional[Callable[[Dict[str, Any]], Any]] = None,
        leak_watch: Optional[float] = None,
        baggage: Sequence[Any] = (),
        validator: Optional[Callable[[str], bool]] = None,
        generator: Optional[Callable[[], str]] = None,
        trust: _ids.Trust = None,
    ) -> None:
        if not callable(app):
            raise TypeError(
                f"RequestContextMiddleware() argument 'app' must be a WSGI "
                f"callable, not {type(app).__name__!r}; pass the application "
                f"itself, e.g. RequestContextMiddleware(app)"
            )
        if storage is None:
            storage = request_storage
        elif not isinstance(storage, AsyncLocalStorage):
            raise TypeError(
                f"RequestContextMiddleware() argument 'storage' must be an "
                f"AsyncLocalStorage or None, not {type(storage).__name__!r}"
            )
        if not isinstance(header, str):
            raise TypeError(
                f"RequestContextMiddleware() argument 'header' must be a str, not "
                f"{type(header).__name__!r}; e.g. header='X-Request-ID'"
            )
        if _HEADER_NAME_RE.fullmatch(header) is None:
            raise ValueError(
                f"RequestContextMiddleware() argument 'header' must be an HTTP "
                f"header name (letters, digits, '-'), not {header!r}; "
                f"e.g. header='X-Request-ID'"
            )
        if store_factory is not None and not callable(store_factory):
            raise TypeError(
                f"RequestContextMiddleware() argument 'store_factory' must be "
                f"callable or None, not {type(store_factory).__name__!r}; "
                f"e.g. store_factory=lambda environ: {{'request_id': ...}}"
            )
        if not isinstance(echo_header, bool):
            # bool("no") is True: a truthiness test would echo what the
            # caller meant to turn off.
            raise TypeError(
                f"RequestContextMiddleware() argument 'echo_header' must be a bool, not "
                f"{type(echo_header).__name__!r}; e.g. echo_header=False"
            )
        self.app = app
        self.storage = storage
        self.header = header
        self.echo_header = echo_header
        self.store_factory = store_factory
        self._environ_key = _ids.environ_key(header)
        self._header_lower = header.lower()
        delay = leak_watch_delay(leak_watch, "RequestContextMiddleware()")
        self._watch = LeakWatch(delay) if delay is not None else None
        where = "RequestContextMiddleware()"
        self.validator = _ids.check_validator(validator, where)
        self.generator = _ids.check_generator(generator, where)
        self.trust = trust
        self._trusted = _ids.trust_from(trust, where)
        self._policy = (self.validator is not None or self.generator is not None
                        or self._trusted is not None)
        self._generator_reported = False
        self._incoming_baggage = _check_incoming_baggage(baggage, storage, where)
        #: The baggage storages (0.2's attribute); their shapes are in _incoming_baggage.
        self.baggage = tuple(target for target, _ in self._incoming_baggage)
        self._outgoing = (None if storage is request_storage and self._header_lower == "x-request-id"
                          else (storage, header))
        # A subclass that overrides enter_with is honoured; otherwise the
        # store is set with ContextVar.set directly (one Python frame less).
        self._plain_storage = type(storage).enter_with is AsyncLocalStorage.enter_with
        self._simple = (self._plain_storage and not self._policy and store_factory is None
                        and self._watch is None and not self._incoming_baggage)

    def __repr__(self) -> str:
        return (f"<RequestContextMiddleware app={self.app!r} "
                f"storage={self.storage!r} header={self.header!r}>")

    def request_id_from(self, environ: Mapping[str, Any]) -> str:
        """The id for a request under this middleware's policy: the header's
        value if well formed, from a trusted client and accepted by the
        validator, else a new one.

        .. versionchanged:: 0.3 applies *validator*, *generator* and *trust*.
        """
        if not self._policy:
            return _ids.incoming_id(environ, self._environ_key) or _new_id()
        return self._pick_id(environ)[0]

    def _pick_id(self, environ: Mapping[str, Any]) -> Tuple[str, Optional[str]]:
        """``(request_id, client_request_id)`` under the policy; the second is
        a well-formed id the client sent that was not adopted, else ``None``."""
        sent = _ids.incoming_id(environ, self._environ_key)
        if sent is not None:
            if self._adopt(environ, sent):
                return sent, None
        return self._generate(), sent

    def _adopt(self, environ: Mapping[str, Any], sent: str) -> bool:
        trusted = self._trusted
        validator = self.validator
        try:
            if trusted is not None and not trusted(environ):
                return False
            return validator is None or bool(validator(sent))
        except Exception:
            # The app's predicate failed: not adopting is the safe answer.
            _log.exception("RequestContextMiddleware: trust/validator raised; "
                           "not adopting the client's id")
            return False

    def _generate(self) -> str:
        generator = self.generator
        if generator is None:
            return _new_id()
        try:
            made = generator()
        except Exception:
            made = None
            if not self._generator_reported:
                _log.exception("RequestContextMiddleware: generator raised; using "
                               "the built-in id generator (reported once)")
        if type(made) is str and _ID_RE.fullmatch(made) is not None:
            return made
        if not self._generator_reported:
            self._generator_reported = True
            if made is not None:
                _log.error("RequestContextMiddleware: generator returned %r, not 1 to 128 "
                           "characters from A-Z a-z 0-9 . _ : @ / + = -; using the built-in "
                           "id generator (reported once)", made)
        return _new_id()

    def __call__(self, environ: Dict[str, Any],
                 start_response: StartResponse) -> Iterable[bytes]:
        if self._simple:
            # The default configuration, inlined: every Python frame saved
            # here is ~500 instructions per request (callgrind, CPython 3.11).
            request_id = environ.get(self._environ_key)
            if type(request_id) is not str or _id_match(request_id := request_id.strip(" \t")) is None:
                request_id = _new_id()
            environ[ENVIRON_KEY] = request_id
            var = self.storage._var
            if _FRESH_CONTEXT.get() and var.get(_UNSET) is _UNSET:
                # Under asl_gevent.gunicorn.GeventWorker, no store set yet:
                # this context is the request's own copy, and the worker
                # consumes and closes the response inside it.
                _set_var(var, {"request_id": request_id})
                if self._outgoing is not None:
                    _OUTGOING.set(self._outgoing)
                if self.echo_header:
                    response: Any = getattr(start_response, "__self__", None)
                    if type(response) is _GUNICORN_RESPONSE[0]:
                        result = self.app(environ, start_response)
                        if response.status is not None and not response.headers_sent:
                            # The usual case, inlined: the app called start_response.
                            lower = self._header_lower
                            for key, _ in response.headers:
                                if key.lower() == lower:
                                    return result
                            response.headers.append((self.header, request_id))
                            return result
                        return _echo_into(response, self.header, self._header_lower,  # type: ignore[no-any-return]
                                          request_id, result)
                    start_response = partial(_echoing_start_response, start_response,
                                             self.header, self._header_lower, request_id)
                return self.app(environ, start_response)
            if self.echo_header:
                start_response = partial(_echoing_start_response, start_response,
                                         self.header, self._header_lower, request_id)
            context = copy_context()
            context.run(_set_var, var, {"request_id": request_id})
            if self._outgoing is not None:
                context.run(_OUTGOING.set, self._outgoing)
            return self._respond(context, environ, start_response)
        if self._watch is None:
            if _FRESH_CONTEXT.get() and self.storage._var.get(_UNSET) is _UNSET:
                return self._serve_in_place(environ, start_response)
            return self._serve(environ, start_response)
        return self._watch.call(  # type: ignore[no-any-return]
            self._serve, environ, start_response, _ResponseInContext)

    def _serve(self, environ: Dict[str, Any],
               start_response: StartResponse) -> Iterable[bytes]:
        # A fresh copy of whatever context the server runs us in: what the
        # request sets lives and dies with this copy, whatever the server does
        # between requests on one connection.
        context = copy_context()
        request_id = self._store_in(context, environ)
        if self.echo_header and request_id is not None:
            # A partial, not a closure made by a method: no Python frame and
            # no cells per request (callgrind: ~1,900 instructions less).
            start_response = partial(_echoing_start_response, start_response,
                                     self.header, self._header_lower, request_id)
        return self._respond(context, environ, start_response)

    def _respond(self, context: Context, environ: Dict[str, Any],
                 start_response: StartResponse) -> Iterable[bytes]:
        """Call the app in *context*; wrap its response to step and close there."""
        file_wrapper = environ.get("wsgi.file_wrapper")
        wrapped: Optional[List[Any]] = None
        if file_wrapper is not None and not isinstance(file_wrapper, type):
            # PEP 3333 only says it is a callable (uWSGI's is a function): to
            # know its results we watch what the app makes with it.
            wrapped = []
            environ["wsgi.file_wrapper"] = _watching(file_wrapper, wrapped)
        result = context.run(self.app, environ, start_response)

        if type(result) is list or type(result) is tuple:
            return result
        if wrapped is None:
            if file_wrapper is not None and isinstance(result, file_wrapper):
                _rebind_close(result, context)
                return result  # type: ignore[no-any-return]  # file_wrapper is Any
        else:
            environ["wsgi.file_wrapper"] = file_wrapper
            if any(made is result for made in wrapped):
                _rebind_close(result, context)
                return result
        if not hasattr(type(result), "__iter__"):
            # Not a response body: a server's sentinel such as gunicorn's
            # ALREADY_HANDLED (the app took over the socket), which the server
            # recognises by identity. Wrapping it would hide it.
            return result
        return _ResponseInContext(result, context)

    def _store_in(self, context: Optional[Context], environ: Dict[str, Any]) -> Optional[str]:
        """Make the request's store and set it (and the baggage stores) in
        *context*, or in the current context when *context* is ``None``;
        return the id to echo, if any."""
        client_id: Optional[str] = None
        request_id: Optional[str]
        if self.store_factory is None:
            if self._policy:
                request_id, client_id = self._pick_id(environ)
            else:
                request_id = _ids.incoming_id(environ, self._environ_key) or _new_id()
            store: Any = ({"request_id": request_id} if client_id is None
                          else {"request_id": request_id, "client_request_id": client_id})
        else:
            store = (self.store_factory(environ) if context is None
                     else context.run(self.store_factory, environ))
            try:
                found = _id_of(store)
            except Exception:  # the user's store object; echoing is optional
                _log.exception("cannot read request_id of %r; not echoing it", store)
                found = None
            request_id = found if found is not None and _ID_RE.fullmatch(found) else None
        if self._plain_storage:
            if context is None:
                _set_var(self.storage._var, store)
            else:
                context.run(_set_var, self.storage._var, store)
        elif context is None:
            self.storage.enter_with(store)
        else:
            context.run(self.storage.enter_with, store)
        if request_id is not None:
            # For what runs outside the request's context and sees the
            # environ: gunicorn's access log (it logs after the app, from its
            # own loop), server logging, error pages.
            environ[ENVIRON_KEY] = request_id
        if client_id is not None:
            environ[CLIENT_ENVIRON_KEY] = client_id
        if self._outgoing is not None:
            if context is None:
                _OUTGOING.set(self._outgoing)
            else:
                context.run(_OUTGOING.set, self._outgoing)
        if self._incoming_baggage:
            incoming = environ.get("HTTP_BAGGAGE")
            if isinstance(incoming, str) and incoming:
                _restore_baggage(context, self._incoming_baggage, incoming)
        return request_id

    def _serve_in_place(self, environ: Dict[str, Any],
                        start_response: StartResponse) -> Iterable[bytes]:
        request_id = self._store_in(None, environ)
        if self.echo_header and request_id is not None:
            start_response = partial(_echoing_start_response, start_response,
                                     self.header, self._header_lower, request_id)
        return self.app(environ, start_response)



def _echo_into(response: Any, name: str, lower: str, request_id: str, result: Any) -> Any:
    """Add ``(name, request_id)`` to gunicorn *response*'s headers once the app
    has called ``start_response``, unless the app set that header itself.

    An app that calls ``start_response`` lazily (a generator) has not called
    it yet: its response is wrapped so the header is added after the first
    step, before gunicorn writes (and so sends) anything.
    """
    if response.status is not None:
        if not response.headers_sent:
            for key, _ in response.headers:
                if key.lower() == lower:
                    break
            else:
                response.headers.append((name, request_id))
        return result
    if not hasattr(type(result), "__iter__") or type(result) is list or type(result) is tuple:
        return result  # ALREADY_HANDLED, or a body with no start_response: nothing to add
    return _EchoAfterFirstStep(result, response, name, lower, request_id)


class _EchoAfterFirstStep:
    """A lazy app's response: the echo is added after its first step."""

    __slots__ = ("_result", "_iterator", "_echo")

    def __init__(self, result: Iterable[bytes], response: Any, name: str, lower: str,
                 request_id: str) -> None:
        self._result = result
        self._iterator: Optional[Iterator[bytes]] = None
        self._echo: Optional[Tuple[Any, str, str, str]] = (response, name, lower, request_id)

    def __iter__(self) -> "_EchoAfterFirstStep":
        return self

    def __next__(self) -> bytes:
        if self._iterator is None:
            self._iterator = iter(self._result)
        echo = self._echo
        if echo is None:
            return next(self._iterator)
        self._echo = None
        try:
            return next(self._iterator)
        finally:
            response, name, lower, request_id = echo
            _echo_into(response, name, lower, request_id, None)

    def close(self) -> None:
        close = getattr(self._result, "close", None)
        if close is not None:
            close()


def _echoing_start_response(start_response: StartResponse, name: str, lower: str,
                            request_id: str, status: str, headers: Headers,
                            exc_info: Any = None) -> Any:
    """*start_response* with ``(name, request_id)`` added to *headers*,
    unless the app set that header itself."""
    for key, _ in headers:
        if key.lower() == lower:
            break  # the app set its own: keep it, add no duplicate
    else:
        headers = [*headers, (name, request_id)]
    if exc_info is None:
        return start_response(status, headers)
    return start_response(status, headers, exc_info)


def _watching(file_wrapper: Callable[..., Any], made: List[Any]) -> Callable[..., Any]:
    """*file_wrapper* that appends each object it returns to *made*."""
    def watched_file_wrapper(*args: Any, **kwargs: Any) -> Any:
        result = file_wrapper(*args, **kwargs)
        made.append(result)
        return result

    return watched_file_wrapper


def _check_baggage(baggage: Any, where: str) -> Tuple[AsyncLocalStorage[Any], ...]:
    """Validate a ``baggage=`` argument: named storages whose names are tokens."""
    from ._baggage import TOKEN_RE
    if isinstance(baggage, (str, AsyncLocalStorage)):
        raise TypeError(f"{where} argument 'baggage' must be a sequence of "
                        f"AsyncLocalStorage, not {type(baggage).__name__!r}; "
                        f"e.g. baggage=[tenant_storage]")
    try:
        storages = tuple(baggage)
    except TypeError:
        raise TypeError(f"{where} argument 'baggage' must be a sequence of "
                        f"AsyncLocalStorage, not {type(baggage).__name__!r}") from None
    for storage in storages:
        if not isinstance(storage, AsyncLocalStorage):
            raise TypeError(f"{where} argument 'baggage' must hold AsyncLocalStorage "
                            f"instances, not {type(storage).__name__!r}")
        if TOKEN_RE.fullmatch(storage.name) is None:
            raise ValueError(f"{where} argument 'baggage': {storage!r} needs a name "
                             f"that is a header token (letters, digits, '-', '_', '.'), "
                             f"e.g. AsyncLocalStorage(name='tenant')")
    return storages


def _check_incoming_baggage(baggage: Any, own: AsyncLocalStorage[Any],
                            where: str) -> Tuple[Tuple[AsyncLocalStorage[Any], type], ...]:
    """Validate the middleware's ``baggage=``: storages or ``(storage, shape)``
    pairs, never the middleware's own storage; return ``(storage, shape)`` pairs."""
    if isinstance(baggage, (str, AsyncLocalStorage)):
        _check_baggage(baggage, where)  # raises: one str or storage is not a sequence of them
    try:
        items = tuple(baggage)
    except TypeError:
        _check_baggage(baggage, where)  # raises its TypeError
        raise
    storages = []
    shapes = []
    for item in items:
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], AsyncLocalStorage):
            storage, shape = item
            if shape is not str and shape is not dict:
                raise TypeError(f"{where} argument 'baggage': the shape of {storage!r} must "
                                f"be str or dict, not {shape!r}; e.g. baggage=[(user, dict)]")
        else:
            storage, shape = item, str
        storages.append(storage)
        shapes.append(shape)
    checked = _check_baggage(storages, where)
    for storage in checked:
        if storage is own or storage is request_storage:
            raise ValueError(f"{where} argument 'baggage' must not hold the middleware's own "
                             f"storage {storage!r}: the request id comes from the id header "
                             f"under the id policy (validator=, trust=), never from baggage")
    return tuple(zip(checked, shapes))


def _restore_baggage(context: Optional[Context],
                     targets: Tuple[Tuple[AsyncLocalStorage[Any], type], ...],
                     header: str) -> None:
    from ._baggage import decode, store_for
    members = decode(header)
    if not members:
        return
    for storage, shape in targets:
        store = store_for(storage.name, shape, members)
        if store is not None:
            if context is None:
                storage.enter_with(store)
            else:
                context.run(storage.enter_with, store)


def _rebind_close(result: Any, context: Context) -> None:
    """Make a file wrapper's ``close`` run in the request's context, if it lets us."""
    close = getattr(result, "close", None)
    if close is None:
        return
    try:
        result.close = lambda: _run_in(context, close)
    except (AttributeError, TypeError):  # __slots__ or a read-only type: leave it
        pass


def _run_in(context: Context, fn: Callable[[], R]) -> R:
    try:
        return context.run(fn)
    except RuntimeError as exc:
        # "cannot enter context: ... is already entered": someone calls us from
        # inside a step that is still running (a generator closing its own
        # response, another greenlet closing it mid-iteration). A copy holds
        # the same stores; the app's own RuntimeErrors are re-raised as is.
        if "already entered" not in str(exc):
            raise
    _log.debug("request context busy; running %r in a copy of it", fn)
    return context.copy().run(fn)


class _ResponseInContext:
    """The app's response iterable, stepped and closed in the request's context.

    Each ``next()`` and the ``close()`` is its own :meth:`Context.run`; a
    context cannot be entered twice at once, so nothing here nests.
    """

    __slots__ = ("_result", "_context", "_iterator", "_closed")

    def __init__(self, result: Iterable[bytes], context: Context) -> None:
        self._result = result
        self._context = context
        self._iterator: Optional[Iterator[bytes]] = None
        self._closed = False

    def __iter__(self) -> Iterator[bytes]:
        if self._iterator is None:
            self._iterator = self._context.run(iter, self._result)
        return self

    def __next__(self) -> bytes:
        iterator = self._iterator
        if iterator is None:
            iterator = self._iterator = self._context.run(iter, self._result)
        return self._context.run(next, iterator)

    def close(self) -> None:
        """Close the app's response in the request's context (once).

        Raises only what the app's own ``close()`` raises.
        """
        if self._closed:
            return
        self._closed = True
        close = getattr(self._result, "close", None)
        if close is not None:
            _run_in(self._context, close)

    def __repr__(self) -> str:
        return f"<response in request context {self._result!r}>"
