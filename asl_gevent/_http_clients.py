"""One small hook per HTTP client, and their exact install/uninstall.

==========================================  ===================================
client                                      hook
==========================================  ===================================
``http.client`` (so ``urllib.request``,     ``HTTPConnection.endheaders``: adds
``xmlrpc.client``, anything built on it)    what the caller did not ``putheader``
``urllib.request`` through a proxy          ``AbstractHTTPHandler.do_open``:
                                            tells http.client the URL fetched
``urllib3`` (so ``requests``)               ``HTTPConnectionPool.urlopen``: once
                                            per hop (redirects, retries)
``requests``                                ``Session.request``: only notes a
                                            header the caller set to ``None``
``httpx`` sync and async                    ``HTTPTransport.handle_request``,
                                            ``AsyncHTTPTransport.handle_async_request``
==========================================  ===================================

Each hook asks :func:`asl_gevent._outgoing.decide` for the headers of the
request it is about to send. Layers stack (requests -> urllib3 ->
http.client): urllib3 decides and marks the call
(:data:`~asl_gevent._outgoing.DECIDED`), and http.client, below it, passes
through, so a request gets one header, never two, and never one urllib3
decided against.

Install and uninstall follow :mod:`asl_gevent._hooks`: originals are
captured at :func:`install`; :func:`uninstall` puts back only attributes that
still hold our hook. A hook another library wrapped since stays inside their
wrapper, disabled (it passes straight through while not installed), and a
later :func:`install` turns it on again instead of wrapping twice. Modules not
imported yet are hooked when they are (:mod:`asl_gevent._imports`).
"""

from __future__ import annotations

import _thread
from types import ModuleType
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from ._hooks import _loaded, _wraps_a_hook
from ._imports import cancel_when_imported, when_imported
from ._outgoing import BOTH, CONNECTION, DECIDED, OPTED_OUT, PROXIED, URL, Where, decide

__all__ = ["install", "uninstall", "is_installed"]

#: Set on each hook: the hook itself (a ``functools.wraps`` copy of its
#: ``__dict__`` is not taken for ours) and what to put back.
_MARK = "__asl_gevent_http_hook__"
_RESTORE = "__asl_gevent_restore__"
_MISSING = "<asl_gevent: not in the owner's own __dict__>"


class _State:
    def __init__(self) -> None:
        #: A real OS lock (``_thread`` locks are never monkey-patched).
        self.lock = _thread.RLock()
        #: Every hook checks this first: False makes it a pass-through.
        self.on = False
        #: ``(owner, name, hook, what to put back)`` for each attribute we set.
        self.patches: List[Tuple[Any, str, Any, Any]] = []
        self.watching: List[str] = []


# Kept across importlib.reload: the hooks in place read it at call time.
if "_state" not in globals():
    _state = _State()


# -- the hooks ----------------------------------------------------------------


def _merged(headers: Any, extra: Mapping[str, str], header_dict: Any,
            added: Dict[str, str]) -> Any:
    """*headers* plus each of *extra* the caller did not set (any case, str or
    bytes names): *headers* itself when nothing is missing, else a copy.
    What it adds is also put in *added*.

    Written out with loops: comprehensions are frames of their own before
    CPython 3.12, and this runs on every call.
    """
    merged: Any = None
    lowered = None if type(headers) is dict else getattr(headers, "_store", None)
    if isinstance(lowered, dict) and type(headers).__name__ == "CaseInsensitiveDict":
        # requests' headers (what a requests call hands urllib3): its _store
        # maps each lower-case name to (name, value), so both the test and the
        # copy run in C. Through its Mapping methods they were a third of
        # this module's cost per requests.get (callgrind, CPython 3.11).
        for key, value in extra.items():
            if key.lower() not in lowered:
                if merged is None:
                    merged = dict(lowered.values())
                merged[key] = value
                added[key] = value
        return headers if merged is None else merged
    present = set()
    for name in headers:
        present.add((name.decode("latin-1") if isinstance(name, (bytes, bytearray))
                     else str(name)).lower())
    for key, value in extra.items():
        if key.lower() not in present:
            if merged is None:
                # Never mutate the caller's mapping (a session's defaults, a
                # pool's): copy it. urllib3's HTTPHeaderDict keeps repeated
                # fields, so it copies itself; anything else becomes a dict.
                merged = (headers.copy() if type(headers) is dict or type(headers) is header_dict
                          or isinstance(headers, header_dict) else dict(headers))
            merged[key] = value
            added[key] = value
    return headers if merged is None else merged


def _without(headers: Any, added: Mapping[str, str]) -> Any:
    """*headers* less each of *added* that still holds the value we added (a
    copy; *headers* itself when there is none)."""
    drop = []
    for name in headers:
        text = name.decode("latin-1") if isinstance(name, (bytes, bytearray)) else str(name)
        for key, value in added.items():
            if text.lower() == key.lower() and headers[name] == value:
                drop.append(name)
    if not drop:
        return headers
    kept = headers.copy() if hasattr(headers, "copy") else dict(headers)
    for name in drop:
        del kept[name]
    return kept


def _urllib3_where(pool: Any, url: str) -> Where:
    # A pool with a proxy set (ProxyManager) sends an absolute URL to the
    # proxy, which fetches it: that URL is where the request goes. Any other
    # pool sends to its own host, whatever URL it is given.
    how = URL if getattr(pool, "proxy", None) is not None and url[:1] != "/" else CONNECTION
    return pool.scheme or "http", pool.host or "", pool.port, url, how


def _urllib3_urlopen(original: Any) -> Any:
    # From its own module: this runs right after urllib3.connectionpool is
    # imported, maybe while urllib3/__init__ is still running.
    from urllib3._collections import HTTPHeaderDict

    def urlopen(self: Any, method: str, url: str, body: Any = None,
                headers: Optional[Mapping[str, str]] = None, *args: Any, **kwargs: Any) -> Any:
        if not _state.on:
            return original(self, method, url, body, headers, *args, **kwargs)
        decided = DECIDED.get()
        if decided:
            # Inside our own urlopen: urllib3 following a redirect (or
            # retrying) on this pool recurses here with the headers we gave
            # it. This hop decides for its own URL: what we added for the
            # previous one comes off first (a URL pattern may exclude it).
            if decided is not True and headers is not None:
                try:
                    headers = _without(headers, decided)
                except Exception:  # an exotic mapping: this hop sends nothing of ours
                    return original(self, method, url, body, headers, *args, **kwargs)
        extra = decide(_urllib3_where, self, url)
        added: Dict[str, str] = {}
        if extra:
            try:
                headers = _merged(self.headers if headers is None else headers, extra,
                                  HTTPHeaderDict, added)
            except Exception:  # a caller's exotic mapping: send it as it is
                added.clear()
        # Only what we added: a header the caller set (even to the same id)
        # stays on every hop.
        token = DECIDED.set(added or True)
        try:
            return original(self, method, url, body, headers, *args, **kwargs)
        finally:
            DECIDED.reset(token)

    return urlopen


def _http_client_where(conn: Any) -> Where:
    # http.client keeps the request line and each header line it was given,
    # encoded, in _buffer until endheaders() sends them (CPython 2.7-3.13).
    parts = conn._buffer[0].split(b" ", 2)
    target = parts[1].decode("latin-1") if len(parts) == 3 else "/"
    host = getattr(conn, "_tunnel_host", None)
    if host:  # https through a proxy: the real host is the tunnel's
        port = getattr(conn, "_tunnel_port", None)
    else:
        host, port = conn.host, conn.port
    # An absolute-form target goes to a forward proxy, or straight to a
    # server: http.client cannot tell which. Only urllib.request's
    # ProxyHandler says (PROXIED); otherwise both the host connected to and
    # the URL's host must be targets.
    how = URL if target[:1] != "/" and target == PROXIED.get() else BOTH
    return "https" if getattr(conn, "default_port", 80) == 443 else "http", host, port, target, how


def _put_missing(conn: Any, extra: Mapping[str, str]) -> None:
    """putheader() each of *extra* the caller did not put (any case)."""
    buffer = conn._buffer
    for key, value in extra.items():
        prefix = key.lower().encode("latin-1") + b":"  # putheader writes b"Name: value"
        size = len(prefix)
        for line in buffer:  # [0] is the request line, which never starts so
            if line[:size].lower() == prefix:
                break
        else:
            conn.putheader(key, value)


def _http_client_endheaders(original: Any) -> Any:
    def endheaders(self: Any, *args: Any, **kwargs: Any) -> Any:
        if _state.on and not DECIDED.get():
            extra = decide(_http_client_where, self)
            if extra:
                try:
                    _put_missing(self, extra)
                except Exception:  # out of order: the original raises its own error
                    pass
        return original(self, *args, **kwargs)

    return endheaders


def _none_valued(headers: Any) -> List[str]:
    """Lower-case names of the headers set to None in *headers* (a mapping or None)."""
    if headers is None:
        return []
    try:
        lowered = getattr(headers, "_store", None)
        if isinstance(lowered, dict):  # requests' CaseInsensitiveDict: lower name -> (name, value)
            for _, value in lowered.values():
                if value is None:
                    break
            else:
                return []
        elif None not in headers.values():
            return []
        return [(key.decode("latin-1") if isinstance(key, bytes) else str(key)).lower()
                for key, value in headers.items() if value is None]
    except Exception:  # not a mapping: requests will say so
        return []


def _requests_request(original: Any) -> Any:
    def request(self: Any, method: Any, url: Any, *args: Any, **kwargs: Any) -> Any:
        # requests drops a header whose value is None (per call, or in the
        # session's defaults) before urllib3 sees the request: note the
        # name, so that no layer below adds it back.
        if _state.on:
            per_call = args[2] if len(args) > 2 else kwargs.get("headers")
            removed = _none_valued(getattr(self, "headers", None))
            if per_call:
                removed += _none_valued(per_call)
            if removed:
                token = OPTED_OUT.set(frozenset(removed))
                try:
                    return original(self, method, url, *args, **kwargs)
                finally:
                    OPTED_OUT.reset(token)
        return original(self, method, url, *args, **kwargs)

    return request


def _httpx_where(request: Any) -> Where:
    url = request.url
    return url.scheme, url.host, url.port, url.raw_path.decode("ascii", "replace"), CONNECTION


def _add_to_httpx(request: Any) -> List[str]:
    """Add what we send and the caller did not; return the names added."""
    extra = decide(_httpx_where, request)
    if not extra:
        return []
    headers = request.headers
    added = []
    for key, value in extra.items():
        if key not in headers:  # httpx.Headers: case-insensitive
            headers[key] = value
            added.append(key)
    return added


def _remove_from_httpx(request: Any, added: List[str]) -> None:
    # Taken off again once sent: a redirect copies the request's headers,
    # and its hop (maybe to another host) decides for itself.
    for key in added:
        try:
            del request.headers[key]
        except KeyError:
            pass


def _httpx_handle_request(original: Any) -> Any:
    def handle_request(self: Any, request: Any) -> Any:
        if not _state.on:
            return original(self, request)
        try:
            added = _add_to_httpx(request)
        except Exception:
            added = []
        try:
            return original(self, request)
        finally:
            if added:
                _remove_from_httpx(request, added)

    return handle_request


def _httpx_handle_async_request(original: Any) -> Any:
    async def handle_async_request(self: Any, request: Any) -> Any:
        if not _state.on:
            return await original(self, request)
        try:
            added = _add_to_httpx(request)
        except Exception:
            added = []
        try:
            return await original(self, request)
        finally:
            if added:
                _remove_from_httpx(request, added)

    return handle_async_request


def _urllib_request_do_open(original: Any) -> Any:
    def do_open(self: Any, http_class: Any, req: Any, **kwargs: Any) -> Any:
        # Through ProxyHandler (http): the connection goes to the proxy and
        # the request-target is the URL it fetches. Tell the http.client hook
        # so (a bare http.client connection cannot know it talks to a proxy).
        if _state.on:
            try:
                proxied = req.selector if req.has_proxy() else None
            except Exception:  # a Request look-alike: http.client decides alone
                proxied = None
            if isinstance(proxied, str):
                token = PROXIED.set(proxied)
                try:
                    return original(self, http_class, req, **kwargs)
                finally:
                    PROXIED.reset(token)
        return original(self, http_class, req, **kwargs)

    return do_open


class _Row:
    """``<module>.<owner>.<name>`` becomes ``make(original)``."""

    __slots__ = ("module", "owner", "name", "make")

    def __init__(self, module: str, owner: str, name: str,
                 make: Callable[[Any], Any]) -> None:
        self.module, self.owner, self.name, self.make = module, owner, name, make


_ROWS: Tuple[_Row, ...] = (
    _Row("http.client", "HTTPConnection", "endheaders", _http_client_endheaders),
    _Row("urllib.request", "AbstractHTTPHandler", "do_open", _urllib_request_do_open),
    _Row("urllib3.connectionpool", "HTTPConnectionPool", "urlopen", _urllib3_urlopen),
    _Row("requests.sessions", "Session", "request", _requests_request),
    _Row("httpx", "HTTPTransport", "handle_request", _httpx_handle_request),
    _Row("httpx", "AsyncHTTPTransport", "handle_async_request", _httpx_handle_async_request),
)
_MODULES = tuple(dict.fromkeys(row.module for row in _ROWS))


# -- install / uninstall ------------------------------------------------------


def _is_hook(value: Any) -> bool:
    try:
        return getattr(value, _MARK, None) is value
    except Exception:  # an exotic proxy; not ours
        return False


def _apply(row: _Row, module: ModuleType) -> None:
    """Hook one attribute (lock held)."""
    owner = getattr(module, row.owner, None)
    if owner is None:
        return  # an old or new version without it: nothing to hook there
    current = vars(owner).get(row.name, _MISSING)
    if _is_hook(current):
        # Ours, left there by an uninstall while another library's wrapper
        # sat over it (since removed): on again, put back what it replaced.
        hook, restore = current, getattr(current, _RESTORE)
    elif _wraps_a_hook(current, _is_hook):
        # Another library wrapped our hook; uninstall left it inside,
        # disabled. It is back on with _state.on; wrapping again would
        # add the header twice.
        return
    else:
        original = getattr(owner, row.name)
        hook = row.make(original)
        for attribute, value in (("__wrapped__", original), (_MARK, hook), (_RESTORE, current),
                                 ("__doc__", getattr(original, "__doc__", None)),
                                 ("__name__", getattr(original, "__name__", row.name)),
                                 ("__qualname__", getattr(original, "__qualname__", row.name))):
            setattr(hook, attribute, value)
        restore = current
        setattr(owner, row.name, hook)
    _state.patches.append((owner, row.name, hook, restore))


def _apply_rows(name: str, module: ModuleType) -> None:
    """Hook every attribute of module *name* (lock held)."""
    for row in _ROWS:
        if row.module == name:
            _apply(row, module)


def _patch_imported(module: ModuleType) -> None:
    """A client imported after install(): hook it (see :mod:`asl_gevent._imports`)."""
    with _state.lock:
        if _state.on:
            _apply_rows(module.__name__, module)


def install() -> None:
    """Hook every client imported now; the others when they are. Idempotent."""
    with _state.lock:
        if _state.on:
            return
        _state.on = True
        for name in _MODULES:
            module = _loaded(name)
            if module is None:
                _state.watching.append(name)
                when_imported(name, _patch_imported)
            else:
                _apply_rows(name, module)


def uninstall() -> None:
    """Put back every attribute that still holds our hook; disable the rest."""
    with _state.lock:
        _state.on = False
        while _state.watching:
            cancel_when_imported(_state.watching.pop(), _patch_imported)
        while _state.patches:
            owner, name, hook, restore = _state.patches.pop()
            if vars(owner).get(name, _MISSING) is hook:
                if restore is _MISSING:
                    delattr(owner, name)
                else:
                    setattr(owner, name, restore)
            # else: wrapped by another library since; ours stays inside,
            # a pass-through while _state.on is False.


def is_installed() -> bool:
    return _state.on

