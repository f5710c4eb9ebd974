"""Outgoing HTTP carries the request id: http.client, urllib, requests, urllib3, httpx.

After :func:`install`, every request sent through ``http.client`` (and so
``urllib.request`` and libraries built on it), ``urllib3`` (and so
``requests``) and ``httpx`` (``Client`` and ``AsyncClient``) while a request
store is current carries the request's id in the header the
:class:`~asl_gevent.wsgi.RequestContextMiddleware` reads (``X-Request-ID``
unless configured). The downstream service's middleware picks it up, so its
log lines carry the same id:

>>> import asl_gevent.http
>>> from asl_gevent.wsgi import request_storage
>>> asl_gevent.http.install()
>>> request_storage.run({"request_id": "req-7"}, asl_gevent.http.outgoing_headers)
{'X-Request-ID': 'req-7'}
>>> asl_gevent.http.outgoing_headers()    # outside a request: nothing is added
{}
>>> asl_gevent.http.install(targets=["api.internal", ".svc.cluster.local"])
>>> request_storage.run({"request_id": "req-7"}, asl_gevent.http.outgoing_headers,
...                     "https://api.github.com/")
{}
>>> asl_gevent.http.uninstall()

There is one small hook per client (``asl_gevent._http_clients``) and
one function that decides the headers for a URL
(``asl_gevent._outgoing``). Rules:

- a header the caller set (any case) is never overridden, and one the caller
  removed for a call (``requests``: ``headers={"X-Request-ID": None}``, or a
  session header set to ``None``) is not added back;
- outside a request (no store) nothing is added;
- ``targets=`` limits the hosts/URLs that get anything (default: every
  host, as in 0.2);
- an id the middleware would reject (see
  :func:`~asl_gevent.wsgi.request_id_from`) is not sent; warned once;
- one header per request, whatever the layers (requests -> urllib3 ->
  http.client), and per hop: each redirect decides for its own URL;
- the store is read in the greenlet, pool task, thread or asyncio task that
  makes the call, so work a request spawned carries its id too;
- errors are the library's own: nothing this module computes can make a call
  fail, and a service that is down fails the call exactly as it would without
  this module.

Optionally, named storages whose stores are strings or flat mappings of
strings travel as W3C ``baggage`` members (see :mod:`asl_gevent._baggage` for
the encoding and limits); give the same storages to the downstream
middleware's ``baggage=`` to restore them there. A store that cannot be
encoded is left out alone (warned once per storage); the id still goes.

:func:`uninstall` puts back exactly what :func:`install` replaced, unless
another library wrapped it since: then our hook stays inside their wrapper,
switched off.

.. versionadded:: 0.2
.. versionchanged:: 0.3
   ``http.client``/``urllib.request`` and ``httpx`` are covered; ``targets=``;
   a header set to ``None`` for a call stays out; ``uninstall()`` is exact
   under other patchers; an unencodable store never fails the call.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, Optional

from . import _http_clients, _outgoing
from ._storage import AsyncLocalStorage
from ._ids import HEADER_NAME_RE as _HEADER_NAME_RE
from .wsgi import _check_baggage

__all__ = ["install", "uninstall", "is_installed", "outgoing_headers"]


def install(targets: Optional[Iterable[Any]] = None,
            baggage: Iterable[AsyncLocalStorage[Any]] = (), *,
            header: Optional[str] = None,
            storage: Optional[AsyncLocalStorage[Any]] = None) -> None:
    """Make outgoing HTTP calls made in a request carry its id (and baggage).

    :param targets: where ids and baggage may go; ``None`` (the default):
        every host, as in 0.2. Otherwise an iterable of

        - ``"api.internal"``: that host, on any port (case-insensitive);
        - ``"api.internal:8443"``: that host on that port;
        - ``".example.com"``: ``example.com`` and all its subdomains;
        - ``re.compile(...)``: a pattern searched in each request's URL,
          ``scheme://host[:port]/path?query`` (the port only if not the
          scheme's default), e.g. ``re.compile(r"^https://billing\\.example\\.com/v2/")``.

        A plain string is a host, never a substring of the URL
        (``"api.example.com"`` does not match ``api.example.com.evil.net``).
        ``targets=()`` sends nothing anywhere. Each redirect hop is checked
        on its own URL; through a configured proxy, the URL fetched is;
        a bare ``http.client`` connection given an absolute URL needs both
        its own host and the URL's to be targets.
    :param baggage: named storages whose str or flat str-mapping stores are
        sent in the W3C ``baggage`` header (unless the caller set one).
    :param header: the header to send the id in. Default: the header of the
        :class:`~asl_gevent.wsgi.RequestContextMiddleware` serving the current
        request, ``X-Request-ID`` for the default middleware or outside one.
    :param storage: where the id is read (``store["request_id"]`` or
        ``store.request_id``). Default: the middleware's storage, else
        :data:`~asl_gevent.wsgi.request_storage`.

    Hooks ``http.client``, ``urllib3``, ``requests`` and ``httpx`` where they
    are imported, and each of them when it is imported later. Idempotent: a
    second call only replaces the settings (all of them: what it is not given
    goes back to the default). Thread-safe.

    :raises TypeError: bad argument types; :raises ValueError: a bad header
        name, a target that is neither a host nor a pattern, or a baggage
        storage without a token name. Nothing is patched or changed then.

    .. versionadded:: 0.2
    .. versionchanged:: 0.3
       The *targets* argument (first, so ``install(["api.internal"])``
       works); ``http.client``/``urllib.request`` and ``httpx`` are hooked
       too; no longer needs ``urllib3``.
    """
    where = "asl_gevent.http.install()"
    if header is not None:
        if not isinstance(header, str):
            raise TypeError(f"{where} argument 'header' must be a str "
                            f"or None, not {type(header).__name__!r}; e.g. header='X-Request-ID'")
        if _HEADER_NAME_RE.fullmatch(header) is None:
            raise ValueError(f"{where} argument 'header' must be an HTTP "
                             f"header name, not {header!r}; e.g. header='X-Request-ID'")
    if storage is not None and not isinstance(storage, AsyncLocalStorage):
        raise TypeError(f"{where} argument 'storage' must be an "
                        f"AsyncLocalStorage or None, not {type(storage).__name__!r}")
    storages = _check_baggage(baggage, where)
    parsed: Optional[_outgoing.Targets] = None
    if targets is not None:
        if isinstance(targets, (str, bytes)) or not hasattr(targets, "__iter__"):
            raise TypeError(f"{where} argument 'targets' must be None or an iterable of "
                            f"host names and compiled URL patterns, not "
                            f"{type(targets).__name__!r}; e.g. targets=['api.internal']")
        parsed = _outgoing.Targets(targets, where)
    _outgoing.configure(_outgoing.Config(header, storage, storages, parsed))
    _http_clients.install()


def uninstall() -> None:
    """Put back what :func:`install` replaced (idempotent, thread-safe).

    Every attribute that still holds our hook gets back exactly what it held
    before :func:`install`. One another library wrapped since (an
    OpenTelemetry instrumentation, say) is left to it: our hook stays inside
    their wrapper, switched off (it passes every call straight through), and
    a later :func:`install` switches it on again rather than wrapping twice.

    .. versionadded:: 0.2
    .. versionchanged:: 0.3 exact under other patchers.
    """
    _http_clients.uninstall()


def is_installed() -> bool:
    """Whether :func:`install` is in effect.

    .. versionadded:: 0.2
    """
    return _http_clients.is_installed()


def outgoing_headers(url: Optional[str] = None) -> Dict[str, str]:
    """The headers an outgoing call would get here and now (maybe ``{}``).

    Handy for clients this module does not patch (``aiohttp``, a raw
    socket): ``session.get(url, headers=outgoing_headers(url))``. Whatever
    the stores hold, it never raises.

    :param url: the absolute URL the call goes to: then ``targets=`` apply
        (``{}`` for a URL they do not allow). With ``targets=``, a URL that
        is not ``http``/``https`` or whose authority is not well-formed
        (RFC 3986: a backslash, a space, a second ``@``, a bad port...)
        gets ``{}`` too, since clients disagree on its host. Without *url*,
        the headers are given whatever the targets, and where they go is up
        to the caller.

    :raises TypeError: if *url* is not a str or None.

    .. versionadded:: 0.2
    .. versionchanged:: 0.3 the *url* argument; with ``targets=``, ``{}``
       for a URL whose authority is not well-formed.
    """
    if url is not None and not isinstance(url, str):
        raise TypeError(f"asl_gevent.http.outgoing_headers() argument 'url' must be a str "
                        f"or None, not {type(url).__name__!r}; e.g. 'https://api.internal/'")
    return _outgoing.headers_for_url(url)
