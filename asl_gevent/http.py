"""Outgoing HTTP carries the request id: ``requests`` and ``urllib3``.

After :func:`install`, every request sent through ``urllib3`` -- and so every
``requests`` call, whose transport is ``urllib3`` -- while a request store is
current carries the request's id in the header the
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
>>> asl_gevent.http.uninstall()

The hook sits in one place, ``urllib3.HTTPConnectionPool.urlopen``, which
every ``urllib3`` and ``requests`` call (and every redirect and retry) goes
through, so a header is never added twice. Rules:

- a header the caller set (any case) is never overridden;
- outside a request (no store) nothing is added;
- an id the middleware would reject (see
  :func:`~asl_gevent.wsgi.request_id_from`) is not sent; warned once;
- the store is read in the greenlet, pool task or thread that makes the call,
  so work a request spawned carries its id too;
- errors are the library's own: a service that is down fails the call exactly
  as it would without this module.

Optionally, named storages whose stores are strings or flat mappings of
strings travel as W3C ``baggage`` members (see :mod:`asl_gevent._baggage` for
the encoding and limits); give the same storages to the downstream
middleware's ``baggage=`` to restore them there.

:func:`uninstall` puts back the exact function it replaced.

.. versionadded:: 0.2
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

from . import _baggage
from ._storage import AsyncLocalStorage
from .wsgi import _HEADER_NAME_RE, _ID_RE, _OUTGOING, _id_of, request_storage

__all__ = ["install", "uninstall", "is_installed", "outgoing_headers"]

_log = logging.getLogger(__name__)

_lock = threading.Lock()
# (class, attribute, original, ours) for each patched attribute.
_patched: List[Tuple[type, str, Any, Any]] = []


class _Config:
    __slots__ = ("header", "storage", "baggage", "warned")

    def __init__(self, header: Optional[str], storage: Optional[AsyncLocalStorage[Any]],
                 baggage: Tuple[AsyncLocalStorage[Any], ...]) -> None:
        self.header = header
        self.storage = storage
        self.baggage = baggage
        # Names of the storages (and "id") already warned about: once each.
        self.warned: set[str] = set()


_config = _Config(None, None, ())
_HTTPHeaderDict: Any = type(None)  # urllib3's, once install() imported it


def install(*, header: Optional[str] = None,
            storage: Optional[AsyncLocalStorage[Any]] = None,
            baggage: Iterable[AsyncLocalStorage[Any]] = ()) -> None:
    """Make outgoing ``requests``/``urllib3`` calls carry the request id.

    :param header: the header to send the id in. Default: the header of the
        :class:`~asl_gevent.wsgi.RequestContextMiddleware` serving the current
        request, ``X-Request-ID`` for the default middleware or outside one.
    :param storage: where the id is read (``store["request_id"]`` or
        ``store.request_id``). Default: the middleware's storage, else
        :data:`~asl_gevent.wsgi.request_storage`.
    :param baggage: named storages whose str or flat str-mapping stores are
        sent in the W3C ``baggage`` header (unless the caller set one).

    Idempotent: a second call only replaces the settings.

    :raises ImportError: if ``urllib3`` is not installed (``pip install
        asl_gevent[http]``).
    :raises TypeError: bad argument types; :raises ValueError: a bad header
        name or a baggage storage without a token name. Nothing is patched then.
    """
    if header is not None:
        if not isinstance(header, str):
            raise TypeError(f"asl_gevent.http.install() argument 'header' must be a str "
                            f"or None, not {type(header).__name__!r}; e.g. header='X-Request-ID'")
        if _HEADER_NAME_RE.fullmatch(header) is None:
            raise ValueError(f"asl_gevent.http.install() argument 'header' must be an HTTP "
                             f"header name, not {header!r}; e.g. header='X-Request-ID'")
    if storage is not None and not isinstance(storage, AsyncLocalStorage):
        raise TypeError(f"asl_gevent.http.install() argument 'storage' must be an "
                        f"AsyncLocalStorage or None, not {type(storage).__name__!r}")
    from .wsgi import _check_baggage
    storages = _check_baggage(baggage, "asl_gevent.http.install()")
    try:
        from urllib3.connectionpool import HTTPConnectionPool
    except ImportError:
        raise ImportError("asl_gevent.http needs urllib3 (and requests, if you use it): "
                          "pip install 'asl_gevent[http]'") from None
    from urllib3 import HTTPHeaderDict
    global _config, _HTTPHeaderDict
    _HTTPHeaderDict = HTTPHeaderDict
    with _lock:
        _config = _Config(header, storage, storages)
        if _patched:
            return
        original = HTTPConnectionPool.__dict__["urlopen"]
        ours = _wrap_urlopen(original)
        HTTPConnectionPool.urlopen = ours  # type: ignore[method-assign]
        _patched.append((HTTPConnectionPool, "urlopen", original, ours))


def uninstall() -> None:
    """Put back what :func:`install` replaced (idempotent).

    An attribute someone else replaced since is left alone (their patch keeps
    working; ours is then bypassed anyway).
    """
    with _lock:
        while _patched:
            owner, name, original, ours = _patched.pop()
            if owner.__dict__.get(name) is ours:
                setattr(owner, name, original)


def is_installed() -> bool:
    """Whether :func:`install` is in effect."""
    return bool(_patched)


def outgoing_headers() -> Dict[str, str]:
    """The headers an outgoing call would get here and now (maybe ``{}``).

    Handy for clients this module does not patch (``httpx``, ``aiohttp``):
    ``client.get(url, headers=outgoing_headers())``.
    """
    config = _config
    middleware = _OUTGOING.get(None)
    storage = config.storage
    header = config.header
    if middleware is not None:
        storage = storage or middleware[0]
        header = header or middleware[1]
    headers: Dict[str, str] = {}
    request_id = _id_of((storage or request_storage).get_store())
    if request_id is not None:
        if _ID_RE.fullmatch(request_id) is not None:
            headers[header or "X-Request-ID"] = request_id
        else:
            _warn_once(config, "id", "not sending request id %r: the middleware would "
                       "reject it (1-128 of A-Z a-z 0-9 . _ : @ / + = -); warned once",
                       request_id[:200])
    if config.baggage:
        value = _baggage_value(config)
        if value:
            headers["baggage"] = value
    return headers


def _baggage_value(config: _Config) -> str:
    members: List[Tuple[str, str]] = []
    for storage in config.baggage:
        store = storage.get_store()
        if store is None or store is storage.default:
            continue
        found = _baggage.members_of(storage.name, store)
        if found is None:
            _warn_once(config, storage.name, "not sending %r as baggage: its store is "
                       "a %s, not a str or a flat mapping of str to str; warned once",
                       storage, type(store).__name__)
            continue
        members.extend(found)
    value, dropped = _baggage.encode_members(members)
    if dropped:
        _warn_once(config, "baggage-limit", "dropped %d baggage members over the W3C "
                   "limits (%d members, %d bytes); warned once",
                   dropped, _baggage.MAX_MEMBERS, _baggage.MAX_BYTES)
    return value


def _warn_once(config: _Config, key: str, message: str, *args: Any) -> None:
    if key not in config.warned:
        config.warned.add(key)
        _log.warning(message, *args)


def _with_headers(headers: Any, extra: Dict[str, str]) -> Any:
    """A copy of *headers* plus each of *extra* the caller did not set."""
    present = {key.lower() for key in headers}
    missing = [(key, value) for key, value in extra.items() if key.lower() not in present]
    if not missing:
        return headers
    # Never mutate the caller's mapping (a requests PreparedRequest, a
    # session's defaults, a pool's headers): copy it. urllib3's HTTPHeaderDict
    # keeps repeated fields, so it copies itself; anything else becomes a
    # plain dict (urllib3 takes any mapping; a requests CaseInsensitiveDict's
    # own copy() costs 4x more).
    merged = headers.copy() if isinstance(headers, _HTTPHeaderDict) else dict(headers)
    for key, value in missing:
        merged[key] = value
    return merged


def _wrap_urlopen(original: Any) -> Any:
    def urlopen(self: Any, method: str, url: str, body: Any = None,
                headers: Optional[Mapping[str, str]] = None, *args: Any, **kwargs: Any) -> Any:
        extra = outgoing_headers()
        if extra:
            headers = _with_headers(self.headers if headers is None else headers, extra)
        return original(self, method, url, body, headers, *args, **kwargs)

    urlopen.__wrapped__ = original  # type: ignore[attr-defined]
    urlopen.__doc__ = original.__doc__
    urlopen.__name__ = original.__name__
    urlopen.__qualname__ = original.__qualname__
    return urlopen
