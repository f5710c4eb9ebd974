"""The one decision every outgoing-HTTP hook asks: which headers go to this URL.

:mod:`asl_gevent._http_clients` has one small hook per client (http.client,
urllib3, requests, httpx); each asks :func:`decide` for the headers of the
request it is about to send, then adds those the caller did not set. All the
rules live here, so every client follows the same ones:

- outside a request store nothing is added (and nothing more is computed);
- ``targets`` (:class:`Targets`) limit the hosts/URLs that get anything;
- a header the caller removed for one call (requests' ``headers={name: None}``,
  recorded in :data:`OPTED_OUT` by the requests hook) is not added back;
- an id the middleware would reject is not sent (warned once);
- each baggage storage is encoded on its own: one that cannot be encoded
  (a lone surrogate), has the wrong shape, or is too big for the W3C limits
  is left out alone (warned once per storage), without encoding all of it;
- :func:`decide` never raises: any error in the decision is one warning and
  no headers, and the caller's call proceeds exactly as without the hook.
"""

from __future__ import annotations

import logging
import re
from contextvars import ContextVar
from itertools import islice
from typing import (Any, Callable, Dict, FrozenSet, Iterable, List, Mapping, Optional,
                    Tuple)
from urllib.parse import quote, urlsplit

from . import _baggage
from ._storage import AsyncLocalStorage
from ._ids import ID_RE as _ID_RE
from ._ids import id_of as _id_of
from .wsgi import _OUTGOING, request_storage

__all__ = ["Config", "Targets", "OPTED_OUT", "DECIDED", "configure", "decide",
           "headers_for_url"]

_log = logging.getLogger("asl_gevent.http")

#: ``(scheme, host, port, request-target)`` of a request, as a hook sees it;
#: the target is the path (``/a?b``) or, through a proxy, an absolute URL.
Where = Tuple[str, str, Optional[int], str]

#: Lower-case header names the caller removed for the call in progress
#: (requests: ``headers={"X-Request-ID": None}`` or a session header set to
#: None). Set by the requests hook around ``Session.request`` only when there
#: is such a header, so the common call pays one ``get``.
OPTED_OUT: ContextVar[FrozenSet[str]] = ContextVar("asl_gevent.http.opted_out")

#: True while a hook that decided for this request runs it (urllib3's
#: ``urlopen``): the layer below (http.client, which urllib3's connections
#: are) passes through, so a request never gets the header twice and never
#: one the upper layer decided against.
DECIDED: ContextVar[bool] = ContextVar("asl_gevent.http.decided", default=False)

_DEFAULT_PORTS = {"http": 80, "https": 443}
_NO_HEADERS: Dict[str, str] = {}


class Targets:
    """Where ids and baggage may go: host names, domains, URL patterns.

    - ``"api.internal"``: that host, any port (case-insensitive, a trailing
      dot ignored; an IPv6 address without brackets);
    - ``"api.internal:8443"``: that host on that port only;
    - ``".example.com"``: ``example.com`` and every subdomain of it;
    - ``re.compile(...)``: searched in the request's URL, written
      ``scheme://host[:port]/path?query`` (the port only when it is not the
      scheme's default, the host in lower case).
    """

    __slots__ = ("hosts", "host_ports", "domains", "patterns")

    def __init__(self, items: Iterable[Any], where: str) -> None:
        self.hosts: set[str] = set()
        self.host_ports: set[Tuple[str, int]] = set()
        domains: List[str] = []
        patterns: List["re.Pattern[str]"] = []
        for item in items:
            if isinstance(item, re.Pattern):
                if not isinstance(item.pattern, str):
                    raise TypeError(f"{where} argument 'targets': {item!r} is a bytes "
                                    f"pattern; use a str one, e.g. re.compile(r'^https://api\\.')")
                patterns.append(item)
            elif isinstance(item, str):
                self._add_host(item, domains, where)
            else:
                raise TypeError(f"{where} argument 'targets' must hold host names (str) or "
                                f"compiled URL patterns (re.Pattern), not "
                                f"{type(item).__name__!r}; e.g. targets=['api.internal', "
                                f"'.svc.cluster.local', re.compile(r'^https://billing\\.')]")
        self.domains = tuple(domains)
        self.patterns = tuple(patterns)

    def _add_host(self, item: str, domains: List[str], where: str) -> None:
        text = item.strip().lower()
        if not text or "/" in text or "*" in text or any(c.isspace() for c in text):
            raise ValueError(
                f"{where} argument 'targets': {item!r} is not a host name; give a host "
                f"('api.internal', 'api.internal:8443'), a domain and its subdomains "
                f"('.example.com'), or a URL pattern as re.compile(r'^https://api\\.example\\.com/')")
        if text.startswith("."):
            domains.append(text.rstrip("."))
            return
        host, port = text, None
        if text.startswith("["):  # [::1] or [::1]:8080
            host, _, rest = text[1:].partition("]")
            port = rest[1:] if rest.startswith(":") else (None if not rest else "?")
        elif text.count(":") == 1:  # host:port (more colons: a bare IPv6 address)
            host, port = text.split(":")
        if port is not None:
            if not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{where} argument 'targets': {item!r} has a bad port; "
                                 f"e.g. 'api.internal:8443'")
            self.host_ports.add((host.rstrip("."), int(port)))
        else:
            self.hosts.add(host.rstrip("."))

    def match(self, scheme: str, host: str, port: Optional[int], target: str) -> bool:
        """Whether a request to this place may carry ids and baggage."""
        scheme, host, port, target = _absolute(scheme, host, port, target)
        if host in self.hosts or (host, port) in self.host_ports:
            return True
        for domain in self.domains:  # ".example.com"
            if host.endswith(domain) or host == domain[1:]:
                return True
        if self.patterns:
            url = _url(scheme, host, port, target)
            return any(pattern.search(url) for pattern in self.patterns)
        return False


def _absolute(scheme: str, host: str, port: Optional[int], target: str) -> Where:
    """Normalise a place: lower-case host without brackets or a trailing dot,
    the real port, and the URL's own parts when *target* is absolute (proxy)."""
    if target[:7].lower() == "http://" or target[:8].lower() == "https://":
        parts = urlsplit(target)
        scheme, host = parts.scheme, parts.hostname or ""
        try:
            port = parts.port
        except ValueError:
            port = None
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
    scheme = scheme.lower()
    host = host.lower().strip("[]").rstrip(".")
    if port is None:
        port = _DEFAULT_PORTS.get(scheme)
    return scheme, host, port, target


def _url(scheme: str, host: str, port: Optional[int], target: str) -> str:
    netloc = f"[{host}]" if ":" in host else host
    if port is not None and port != _DEFAULT_PORTS.get(scheme):
        netloc += f":{port}"
    return f"{scheme}://{netloc}{target}"


class Config:
    """What :func:`asl_gevent.http.install` was given."""

    __slots__ = ("header", "storage", "baggage", "targets", "warned")

    def __init__(self, header: Optional[str], storage: Optional[AsyncLocalStorage[Any]],
                 baggage: Tuple[AsyncLocalStorage[Any], ...],
                 targets: Optional[Targets]) -> None:
        self.header = header
        self.storage = storage
        self.baggage = baggage
        #: None: everywhere.
        self.targets = targets
        #: Keys already warned about: "id", "error", "baggage-limit", and each
        #: baggage storage's name. Once each per install().
        self.warned: set[str] = set()


# Kept across importlib.reload (the hooks read it through this module).
if "_config" not in globals():
    _config = Config(None, None, (), None)


def configure(config: Config) -> None:
    global _config
    _config = config


def decide(where: Optional[Callable[..., Where]], *args: Any) -> Dict[str, str]:
    """The headers for the request ``where(*args)`` describes. Never raises.

    *where* is called only when targets are configured and there is
    something to send, so a call outside a request costs a store lookup.
    ``where=None``: for anywhere (targets are not checked). The dict
    returned may be shared: do not change it. One function, not two: this
    runs on every outgoing call, and a Python frame costs ~1,500
    instructions (callgrind, CPython 3.11).
    """
    config = _config
    try:
        storage = config.storage
        header = config.header
        middleware = _OUTGOING.get(None)
        if middleware is not None:
            storage = storage or middleware[0]
            header = header or middleware[1]
        store = (storage or request_storage).get_store()
        if type(store) is dict:  # the middleware's own store: no Mapping isinstance (3 frames)
            request_id = store.get("request_id")
            if type(request_id) is not str:
                request_id = None
        else:
            request_id = _id_of(store)
        if request_id is None and not config.baggage:
            return _NO_HEADERS
        if (where is not None and config.targets is not None
                and not config.targets.match(*where(*args))):
            return _NO_HEADERS
        header = header or "X-Request-ID"
        opted_out = OPTED_OUT.get(None)
        headers: Dict[str, str] = {}
        if request_id is not None and (opted_out is None or header.lower() not in opted_out):
            if _ID_RE.fullmatch(request_id) is not None:
                headers[header] = request_id
            else:
                _warn_once(config, "id", "not sending request id %r: the middleware would "
                           "reject it (1-128 of A-Z a-z 0-9 . _ : @ / + = -); warned once",
                           request_id[:200])
        if config.baggage and (opted_out is None or "baggage" not in opted_out):
            value = _baggage_value(config)
            if value:
                headers["baggage"] = value
        return headers
    except Exception as exc:
        _warn_once(config, "error", "not adding request id/baggage to an outgoing request: "
                   "%s: %s; the request is sent as it would be without asl_gevent.http; "
                   "warned once", type(exc).__name__, exc)
        return _NO_HEADERS


def headers_for_url(url: Optional[str]) -> Dict[str, str]:
    """:func:`decide` for a URL given as a string (or for anywhere: None)."""
    if url is None:
        return dict(decide(None))
    return dict(decide(_where_url, url))


def _where_url(url: str) -> Where:
    return _absolute("", "", None, url)


def _baggage_value(config: Config) -> str:
    """The ``baggage`` header for the storages' current stores, within the W3C limits.

    Each storage is encoded on its own: one that cannot be (wrong shape, a
    value that is not UTF-8 encodable, a store bigger than the whole header
    may be) is left out alone with one warning, and is never encoded in full.
    """
    parts: List[str] = []
    size = 0
    dropped = 0
    for storage in config.baggage:
        try:
            store = storage.get_store()
            if store is None or store is storage.default:
                continue
            room = max(_baggage.MAX_MEMBERS - len(parts), 0)
            if isinstance(store, Mapping) and len(store) > room:
                # Only the members that can still fit are looked at: a
                # mapping of a million keys costs what 180 cost.
                dropped += len(store) - room
                store = dict(islice(store.items(), room))
            members = _baggage.members_of(storage.name, store)
        except Exception as exc:  # a get_store() override, an exotic mapping
            _warn_once(config, storage.name, "not sending %r as baggage: reading its store "
                       "failed (%s: %s); warned once", storage, type(exc).__name__, exc)
            continue
        if members is None:
            _warn_once(config, storage.name, "not sending %r as baggage: its store is "
                       "a %s, not a str or a flat mapping of str to str; warned once",
                       storage, type(store).__name__)
            continue
        if len(members) > room:  # a str store with no room left
            dropped += len(members) - room
            members = members[:room]
        encoded: List[str] = []
        for key, value in members:
            if len(key) + 1 + len(value) > _baggage.MAX_BYTES:
                encoded.append("")  # cannot fit whatever it encodes to: not encoded
                continue
            try:
                encoded.append(f"{key}={quote(value, safe=_baggage._SAFE)}")
            except UnicodeEncodeError as exc:  # a lone surrogate (os.fsdecode of a bad name)
                _warn_once(config, storage.name, "not sending %r as baggage: %s is not "
                           "UTF-8 encodable (%s); warned once", storage, key, exc.reason)
                break
        else:
            for part in encoded:
                added = len(part) + (1 if parts else 0)
                if not part or size + added > _baggage.MAX_BYTES:
                    dropped += 1
                    continue
                parts.append(part)
                size += added
    if dropped:
        _warn_once(config, "baggage-limit", "dropped %d baggage members over the W3C "
                   "limits (%d members, %d bytes); warned once",
                   dropped, _baggage.MAX_MEMBERS, _baggage.MAX_BYTES)
    return ",".join(parts)


def _warn_once(config: Config, key: str, message: str, *args: Any) -> None:
    if key not in config.warned:
        config.warned.add(key)
        _log.warning(message, *args)
